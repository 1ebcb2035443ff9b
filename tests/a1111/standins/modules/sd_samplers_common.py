"""modules.sd_samplers_common: InterruptedException is a BaseException the denoiser raises when the
user presses Interrupt / Skip; samplers catch it in launch_sampling and return the last latent,
so the generation then finishes normally (postprocess runs) -- a1111.md "One pass per step"."""


class InterruptedException(BaseException):
    pass


def apply_refiner(denoiser, sigma):
    return False  # no SDXL refiner-checkpoint switch in the stand-in


def store_latent(latent):
    pass

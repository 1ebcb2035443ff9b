"""The testbed model's parts and their assembly into an SD1.5-format checkpoint.

UNet: the smallest UNet that ComfyUI's stock CheckpointLoaderSimple detects as SD1.5 (model_channels
320, context_dim 768, conv proj_in, no label_emb), made smaller still by keeping only the one
cross-attention transformer that detection needs (in the input block; the two output blocks have
none): channel_mult [1], num_res_blocks [1], transformer_depth [1], transformer_depth_output [0, 0],
no middle block. 13.64M parameters (27.3 MB as float16).
VAE: TAESD format (first_stage_model.taesd_encoder / taesd_decoder, 2.45M parameters), trained on
the synthetic images to the designed latent space of testbed.data.latents_of; vae_scale = 0.18215 so
that the model-space latents (ComfyUI multiplies by the SD1.5 scale factor 0.18215) equal those.
Text encoder: testbed.textenc (regenerated, never committed).

Committed: weights/testbed/unet.safetensors and vae.safetensors (float16). `python -m testbed.assemble`
writes the full checkpoint (about 290 MB) and never commits it.
"""
from __future__ import annotations

import hashlib
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS_DIR = os.path.join(ROOT, "weights", "testbed")
UNET_FILE, VAE_FILE = "unet.safetensors", "vae.safetensors"
REFINER_FILE = "testbed-dice-w5.safetensors"
CKPT_NAME = "cfg-distill-testbed-sd15.safetensors"
SD15_SCALE = 0.18215
INIT_NOISE = 1.0  # scale of the random part of the autoencoder init (times He init)

UNET_KWARGS = dict(
    image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1], channel_mult=[1],
    num_heads=8, num_head_channels=-1, use_spatial_transformer=True, transformer_depth=[1],
    transformer_depth_output=[0, 0], transformer_depth_middle=-2, context_dim=768,
    use_linear_in_transformer=False, legacy=False, adm_in_channels=None, use_temporal_attention=False,
    use_temporal_resblock=False,
)
ZERO_INIT = (".out_layers.3.", ".proj_out.", "out.2.")  # residual branches / output start at zero


def comfy_library():
    """ComfyUI in library mode on the CPU: $COMFYUI_DIR, else the checkout's development tree."""
    import sys

    from comfy_headless import find_comfyui, import_comfy

    if "comfy.cli_args" in sys.modules:  # already imported (a test session, the bench)
        return os.path.dirname(os.path.dirname(sys.modules["comfy.cli_args"].__file__))
    return import_comfy(find_comfyui(None), cpu=True)


def build_sd15_model():
    """ComfyUI's own SD1.5 model object (EPS, scaled-linear discrete schedule) around our UNet config,
    freshly initialised in float32. Returns the comfy BaseModel (diffusion_model + model_sampling)."""
    comfy_library()
    import comfy.supported_models

    unet_config = {k: v for k, v in UNET_KWARGS.items()}
    config = comfy.supported_models.SD15(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_unet_(model.diffusion_model)
    return model


def init_unet_(unet: torch.nn.Module, seed: int = 0) -> None:
    """PyTorch default init for convs / linears (ComfyUI's ops skip it), norms 1 / 0, zero residual outputs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, m in unet.named_modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                (torch.nn.Conv2d if isinstance(m, torch.nn.Conv2d) else torch.nn.Linear).reset_parameters(m)
                if any(z in name + "." for z in ZERO_INIT):
                    torch.nn.init.zeros_(m.weight)
                    if m.bias is not None:
                        torch.nn.init.zeros_(m.bias)
            elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if m.weight is not None:
                    torch.nn.init.ones_(m.weight)
                    torch.nn.init.zeros_(m.bias)


def build_taesd(seed: int = 0):
    """A TAESD-format autoencoder initialised as a working "thumbnail codec": the encoder averages
    8x8-pixel cells into three latent channels (RGB, centred and scaled), the decoder upsamples them
    back (nearest) - plus small random weights everywhere and residual branches starting at zero.
    Training then only has to add the shapes' detail (latent channel 4 and the spatial features);
    from a random init the same network spends hundreds of steps just learning to pass colour."""
    comfy_library()
    import comfy.taesd.taesd

    Block = comfy.taesd.taesd.Block
    from .data import LATENT_COLOR_GAIN as k

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        vae = comfy.taesd.taesd.TAESD()
        for m in vae.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.weight.mul_(INIT_NOISE)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)
        for m in vae.modules():  # residual branches start at zero: each Block is ReLU(x)
            if isinstance(m, Block):
                torch.nn.init.zeros_(m.conv[-1].weight)
                torch.nn.init.zeros_(m.conv[-1].bias)
        enc, dec = vae.taesd_encoder, vae.taesd_decoder
        # the colour channels (encoder 0-2, decoder 0-5) carry exactly the thumbnail: nothing else feeds them
        for i in (0, 2, 6, 10, 14):
            enc[i].weight[:3] = 0.0
            if enc[i].bias is not None:
                enc[i].bias[:3] = 0.0
        enc[14].weight[3:] = 0.0  # latent channel 4 starts at zero and learns the detail
        for i in (1, 7, 12, 17):
            dec[i].weight[:6] = 0.0
        dec[19].weight.zero_()  # the output reads the thumbnail; the random features' readout starts at 0
        for c in range(3):
            enc[0].weight[c, c, 1, 1] = 1.0  # RGB into channels 0-2
            for i in (2, 6, 10):  # stride-2 convs: exact 2x2 box average of channels 0-2
                enc[i].weight[c, c, 1:, 1:] = 0.25
            enc[14].weight[c, c, 1, 1] = k  # latent c = k (mean colour - 0.5)
            enc[14].bias[c] = -0.5 * k
            dec[1].weight[2 * c, c, 1, 1] = 1.0  # +z and -z survive the ReLUs
            dec[1].weight[2 * c + 1, c, 1, 1] = -1.0
            for i in (7, 12, 17):  # after each nearest 2x upsampling: identity
                for ch in (2 * c, 2 * c + 1):
                    dec[i].weight[ch, ch, 1, 1] = 1.0
            dec[19].weight[c, 2 * c, 1, 1] = 1.0 / k
            dec[19].weight[c, 2 * c + 1, 1, 1] = -1.0 / k
            dec[19].bias[c] = 0.5
        vae.vae_scale.fill_(SD15_SCALE)
        vae.vae_shift.fill_(0.0)
    return vae


def checkpoint_state_dict(weights_dir: str = WEIGHTS_DIR) -> dict[str, torch.Tensor]:
    """Committed UNet + VAE plus the regenerated text encoder, under SD1.5 checkpoint names (float16)."""
    from safetensors.torch import load_file

    from .textenc import clip_state_dict

    unet = load_file(os.path.join(weights_dir, UNET_FILE))
    vae = load_file(os.path.join(weights_dir, VAE_FILE))
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    sd.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    sd.update(clip_state_dict())
    return {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def weights_present(weights_dir: str = WEIGHTS_DIR) -> bool:
    return all(os.path.isfile(os.path.join(weights_dir, f)) for f in (UNET_FILE, VAE_FILE))


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

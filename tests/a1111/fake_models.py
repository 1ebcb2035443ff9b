"""Tiny deterministic checkpoints for the webui stand-ins (tests only).

Text encoding: each text gets its own seeded random tokens, so equal texts give equal tensors and
the tests can recompute what the host encoded. Texts of more than 20 words give 154 tokens, of more
than 40 words 231 (the webui's 75-token chunks, shortened here); as with CLIP, every 77-token chunk
starts with the same start-of-text vector. SDXL: {"crossattn": [T, 2048], "vector": [2816]} with the
pooled part first and size embeddings (from the SdConditioning's width / height) after it; an
all-empty NEGATIVE batch is zeroed, as both webuis do (force_zero_negative_prompt).
The UNet records the conditioning of every call and can be told to fail at a step.
"""
import zlib

import torch


def _seeded(text: str, salt: str, *shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{salt}|{text}".encode()))
    return torch.randn(*shape, generator=g)


def _length(text: str) -> int:
    words = len(text.split())
    return 231 if words > 40 else 154 if words > 20 else 77


def _chunks(text: str, salt: str, dim: int) -> torch.Tensor:
    t = _seeded(text, salt, _length(text), dim)
    t[::77] = _seeded("<start of text>", salt, dim)  # CLIP's causal attention: the same in every chunk
    return t


class RecordingUNet:
    """The k-diffusion-wrapped model: inner_model(x, sigma, cond=...) -> denoised."""

    def __init__(self, events=None):
        self.calls = []
        self.fail_at_call = None
        self.events = events if events is not None else []

    def __call__(self, x, sigma, cond):
        if self.fail_at_call is not None and len(self.calls) >= self.fail_at_call:
            raise RuntimeError("simulated failure in the UNet (e.g. out of memory)")
        if "c_crossattn" in cond:
            tokens, vector = cond["c_crossattn"][0], None
        else:
            tokens, vector = cond["crossattn"], cond.get("vector")
        self.events.append("unet")
        self.calls.append({"tokens": tokens.clone(), "vector": None if vector is None else vector.clone(),
                           "rows": x.shape[0]})
        return x * 0.5 + tokens.float().mean(dim=(1, 2))[:, None, None, None] * 0.01


class FakeSD1:
    is_sd1, is_sd2, is_sdxl = True, False, False
    token_dim = 768

    def __init__(self):
        self.events = []  # "unet" and ("encode", texts, negative?) in call order
        self.inner_model = RecordingUNet(self.events)
        self.encode_calls = []

    def _record(self, texts):
        call = (tuple(texts), bool(getattr(texts, "is_negative_prompt", False)))
        self.encode_calls.append(call)
        self.events.append(("encode", *call))

    def encode_one(self, text: str) -> torch.Tensor:
        if text.strip() == "nan":
            return torch.full((77, self.token_dim), float("nan"))
        return _chunks(text, "sd1", self.token_dim)

    def get_learned_conditioning(self, texts):
        self._record(texts)
        encoded = [self.encode_one(t) for t in texts]
        longest = max(e.shape[0] for e in encoded)
        return torch.stack([e.repeat(longest // e.shape[0], 1) for e in encoded])


class FakeSDXL(FakeSD1):
    is_sd1, is_sdxl = False, True
    token_dim = 2048

    def encode_one(self, text: str) -> torch.Tensor:
        return _chunks(text, "sdxl", self.token_dim)

    def pooled(self, text: str) -> torch.Tensor:
        return _seeded(text, "sdxl-pooled", 1280)

    @staticmethod
    def size_embedding(width, height) -> torch.Tensor:
        return _seeded(f"{width}x{height}", "size", 1536)

    def get_learned_conditioning(self, texts):
        self._record(texts)
        width = getattr(texts, "width", None) or 1024
        height = getattr(texts, "height", None) or 1024
        crossattn = torch.stack([self.encode_one(t) for t in texts])
        pooled = torch.stack([self.pooled(t) for t in texts])
        if getattr(texts, "is_negative_prompt", False) and all(t == "" for t in texts):
            crossattn, pooled = torch.zeros_like(crossattn), torch.zeros_like(pooled)
        size = self.size_embedding(width, height).expand(len(texts), -1)
        return {"crossattn": crossattn, "vector": torch.cat([pooled, size], dim=1)}

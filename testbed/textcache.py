"""Prompt encodings with ComfyUI's own SD1.5 text-encoder code, exactly as CLIPTextEncode computes them.

The encoder is built from testbed.textenc's regenerated weights in float32. Layers whose residual
branches are zero are exact identities in float32 (x + 0), so they are skipped here to save time;
the result is bit-identical to running all 12 (tests/test_testbed.py checks it against the full
model and against CLIPTextEncode on the assembled checkpoint)."""
from __future__ import annotations

import torch

from . import textenc


class FastEncoder:
    def __init__(self, skip_identity_layers: bool = True):
        from .model import comfy_library

        comfy_library()
        import comfy.sd1_clip

        self.tokenizer = comfy.sd1_clip.SD1Tokenizer()
        self.model = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
        sd = textenc.clip_state_dict()
        missing, unexpected = self.model.load_state_dict(
            {k[len("cond_stage_model."):]: v.float() for k, v in sd.items()}, strict=False)
        if unexpected or any(k.startswith("transformer.text_model.") for k in missing):
            raise RuntimeError(f"text encoder keys do not match ComfyUI's CLIP-L: {missing} {unexpected}")
        if skip_identity_layers:
            enc = self.model.transformer.text_model.encoder
            enc.layers = enc.layers[:textenc.ACTIVE_LAYERS]
        self.model.eval()

    def tokens(self, prompt: str) -> list[int]:
        chunks = self.tokenizer.tokenize_with_weights(prompt)["l"]
        if len(chunks) != 1:
            raise ValueError(f"prompt longer than 75 tokens: {prompt!r}")
        return [t for t, _w in chunks[0]]

    @torch.no_grad()
    def encode(self, prompts: list[str], batch: int = 64) -> torch.Tensor:
        """[N, 77, 768] float32."""
        out = []
        for i in range(0, len(prompts), batch):
            toks = [self.tokens(p) for p in prompts[i:i + batch]]
            z, _pooled = self.model(toks)
            out.append(z.float())
        return torch.cat(out)

"""Test-only stand-in for CLIPLoader (mounted only in the test server's custom_nodes by
tests/comfy_fixtures.py; the pack never loads it).

The real text encoders of Wan 2.x (UMT5-XXL) and Qwen-Image (Qwen2.5-VL 7B) have their sizes
hard-coded in ComfyUI (comfy/text_encoders/umt5_config_xxl.json: d_model 4096, 24 layers, 256k
vocabulary, ~5.7B parameters; comfy/text_encoders/llama.py Qwen25_7BVLI_Config: 28 layers of 3584,
~7.7B parameters), so the stock CLIPLoader cannot load a tiny one, and the real ones cannot run on a
2-core CPU test machine. This loader returns a real comfy.sd.CLIP (ComfyUI's own wrapper: tokenize,
encode_from_tokens_scheduled, hooks) with a word tokenizer and tools/tiny_families.FamilyEncoder as
its model:
conditioning with the real encoder's token width, length rule and keys (Wan: [1, 512, 4096],
zero-padded, no pooled vector; Qwen-Image: [1, T, 3584], no pooled vector), depending on the prompt."""
import os
import sys
import zlib

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)  # for tools.tiny_families; appended, so ComfyUI's own modules win

# CLIPLoader type -> the tools.tiny_families spec whose encoder output it stands in for.
FAMILY_OF_TYPE = {"wan": "wan21_t2v", "qwen_image": "qwen_image"}


class _WordTokenizer:
    """Words -> ids of the FamilyEncoder's vocabulary (stable across runs)."""

    def __init__(self, embedding_directory=None, tokenizer_data={}, vocab=48):
        self.vocab = vocab

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {"ids": [zlib.crc32(w.encode()) % self.vocab for w in text.lower().replace(",", " ").split()]}

    def untokenize(self, token_weight_pair):
        return []

    def state_dict(self):
        return {}


def _encoder_class(family: str):
    from tools.tiny_families import FamilyEncoder

    class StandInEncoder(torch.nn.Module):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__()
            self.encoder = FamilyEncoder(family)
            self.register_buffer("words", self.encoder.words.clone())  # what ComfyUI's patcher loads
            self.dtypes = {torch.float32}

        def set_clip_options(self, options):
            pass

        def reset_clip_options(self):
            pass

        def encode_token_weights(self, tokens):
            cond, extras = self.encoder.encode(tokens["ids"])
            pooled = extras.pop("pooled_output", None)
            return cond, pooled, extras

        def load_sd(self, sd):
            return [], []

    return StandInEncoder


class StandInTextEncoderLoader:
    CATEGORY = "testing/cfg-distill"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    DESCRIPTION = "TESTS ONLY: stands in for CLIPLoader with a text encoder too large for the test machine."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": ("STRING", {"default": ""}), "type": (list(FAMILY_OF_TYPE),)}}

    def load(self, clip_name, type):
        import comfy.sd
        import comfy.supported_models_base

        target = comfy.supported_models_base.ClipTarget(_WordTokenizer, _encoder_class(FAMILY_OF_TYPE[type]))
        return (comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32}),)


NODE_CLASS_MAPPINGS = {"StandInTextEncoderLoader": StandInTextEncoderLoader}

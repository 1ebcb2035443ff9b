"""Long prompts in A1111 / Forge: the webui encodes a prompt over 75 tokens as 77-token chunks, each
with its own start token; the script keeps every chunk's start token and refines the rest (the same
rule as ComfyUI, cfg_distill.refiner.refine). 154 and 231 tokens, SD1 (A1111) and SDXL (Forge)."""
import pytest
import torch

from cfg_distill import load_refiner, refine_tokens
from sdwebui import logic
from fake_models import FakeSD1, FakeSDXL

WORDS = {77: 8, 154: 30, 231: 50}  # fake_models: > 20 words give 154 tokens, > 40 give 231


def _prompt(tokens):
    return " ".join(f"word{i}" for i in range(WORDS[tokens]))


def _generate(env, refiner_name, **kwargs):
    script = env.script_module.CfgDistillScript()
    p = env.processing.StableDiffusionProcessingTxt2Img(
        scripts=env.scripts.ScriptRunner([script]), script_args=[logic.MODE_DICE, refiner_name, 1.0, True, 1.0],
        **kwargs)
    env.txt2img.txt2img_function(p)
    return p


def _encode(model, texts, negative=False):
    from modules.prompt_parser import SdConditioning
    return model.get_learned_conditioning(SdConditioning(texts, is_negative_prompt=negative, width=64, height=64))


def _check(tokens_seen, c, expected, n_tokens, starts_per_row=None):
    assert tokens_seen.shape[1] == n_tokens
    assert (tokens_seen - expected).abs().max() <= 1e-5  # batched maths may differ in the last bits
    for row in range(c.shape[0]):
        starts = starts_per_row[row] if starts_per_row else list(range(0, n_tokens, 77))
        unchanged = [i for i in range(n_tokens) if torch.equal(tokens_seen[row, i], c[row, i])]
        assert unchanged == starts, "exactly the chunk start tokens are kept"


@pytest.mark.parametrize("n_tokens", [154, 231])
@pytest.mark.parametrize("negative", ["", "long"])
def test_a1111_sd1_long_prompt(make_webui, refiners_dir, n_tokens, negative):
    model = FakeSD1()
    env = make_webui("a1111", model)
    neg_text = _prompt(154) + " blurry" if negative else ""
    _generate(env, "sd15-test.safetensors", prompt=_prompt(n_tokens), negative_prompt=neg_text, steps=2)
    c = _encode(model, [_prompt(n_tokens)])
    uc = _encode(model, [neg_text], negative=True)
    assert uc.shape[1] == (154 if negative else 77)
    expected = refine_tokens(load_refiner(str(refiners_dir / "sd15-test.safetensors")), c, uc, 1.0)
    calls = model.inner_model.calls
    assert len(calls) == 2 and all(call["rows"] == 1 for call in calls)
    for call in calls:
        _check(call["tokens"], c, expected, n_tokens)
    assert not env.errors.reported


@pytest.mark.parametrize("n_tokens", [154, 231])
def test_forge_sdxl_long_prompt(make_webui, refiners_dir, n_tokens):
    model = FakeSDXL()
    env = make_webui("forge", model)
    _generate(env, "sub/sdxl-test.safetensors", prompt=_prompt(n_tokens), negative_prompt="blurry", steps=2)
    c = _encode(model, [_prompt(n_tokens)])
    expected = refine_tokens(load_refiner(str(refiners_dir / "sub" / "sdxl-test.safetensors")), c["crossattn"],
                             _encode(model, ["blurry"], negative=True)["crossattn"], 1.0)
    for call in model.inner_model.calls:
        _check(call["tokens"], c["crossattn"], expected, n_tokens)
        assert torch.equal(call["vector"], c["vector"]), "pooled and size embeddings untouched"
    assert not env.errors.reported


def test_a1111_batch_of_a_short_and_a_long_prompt(make_webui, refiners_dir):
    # the webui brings the rows of a batch to a common length by repeating a shorter row's last token
    # vector: in that row only token 0 is a start token; the long row keeps its three
    model = FakeSD1()
    env = make_webui("a1111", model)
    prompts = ["a red fox", _prompt(231)]
    _generate(env, "sd15-test.safetensors", prompt=prompts, negative_prompt="", batch_size=2, steps=1)
    fox = _encode(model, ["a red fox"])
    c = torch.cat([torch.cat([fox, fox[:, -1:].repeat(1, 154, 1)], dim=1), _encode(model, [_prompt(231)])])
    expected = refine_tokens(load_refiner(str(refiners_dir / "sd15-test.safetensors")), c,
                             _encode(model, [""], negative=True), 1.0)
    (call,) = model.inner_model.calls
    _check(call["tokens"], c, expected, 231, starts_per_row=[[0], [0, 77, 154]])

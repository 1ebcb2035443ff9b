"""Long prompts: CLIP encodes a prompt over 75 tokens as 77-token chunks, each starting with its own
start-of-text token. Refiners are trained on 77-token prompts with the start token kept, so every
chunk keeps its start token; the rest of the prompt is refined against the whole uc in one call,
which gives the same numbers as refining each chunk alone (S's queries are the prompt's tokens).
The ComfyUI test encodes real long prompts with CLIPTextEncode on the real server."""
import pytest
import torch

from cfg_distill import DiceRefiner, refine
from cfg_distill.refiner import CHUNK_TOKENS, start_token_positions
from tools.comfy_server import execution_error, succeeded

from comfy_fixtures import CKPT

# Each repetition is 13 CLIP tokens (12 words and a comma): 5 fill 1 chunk, 10 fill 2, 15 fill 3.
PHRASE = "a very detailed watercolor painting of a quiet harbour town at dawn"
LONG_NEGATIVE = ", ".join(["blurry and dark photo with heavy jpeg artifacts"] * 10)  # 2 chunks


def _refiner(dim=64):
    torch.manual_seed(0)
    return DiceRefiner(dim, inner_dim=32, heads=4)


def test_start_token_positions():
    assert start_token_positions(77) == [0]
    assert start_token_positions(154) == [0, 77]
    assert start_token_positions(231) == [0, 77, 154]
    assert start_token_positions(100) == [0]  # not CLIP chunks: only the first token is a start token
    assert start_token_positions(1) == [0]
    assert CHUNK_TOKENS == 77


@pytest.mark.parametrize("tokens", [154, 231])
def test_every_chunk_keeps_its_start_token_and_the_rest_is_refined(tokens):
    r = _refiner()
    g = torch.Generator().manual_seed(1)
    c, uc = torch.randn(2, tokens, 64, generator=g), torch.randn(1, 77, 64, generator=g)
    out = refine(r, c, uc, alpha=0.7)
    starts = list(range(0, tokens, 77))
    unchanged = [i for i in range(tokens) if torch.equal(out[:, i], c[:, i])]
    assert unchanged == starts
    with torch.no_grad():
        expected = c + 0.7 * r(c, uc)
    others = [i for i in range(tokens) if i not in starts]
    assert (out[:, others] - expected[:, others]).abs().max() <= 1e-6


@pytest.mark.parametrize("tokens", [154, 231])
def test_refining_the_whole_prompt_equals_refining_each_chunk_alone(tokens):
    r = _refiner()
    g = torch.Generator().manual_seed(2)
    c = torch.randn(1, tokens, 64, generator=g)
    for uc in (torch.randn(1, 77, 64, generator=g), torch.randn(1, 154, 64, generator=g)):  # "" or a long negative
        whole = refine(r, c, uc)
        alone = torch.cat([refine(r, c[:, k:k + 77], uc) for k in range(0, tokens, 77)], dim=1)
        assert (whole - alone).abs().max() <= 1e-6


def test_77_tokens_unchanged_rule_and_other_lengths():
    r = _refiner()
    g = torch.Generator().manual_seed(3)
    c, uc = torch.randn(2, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():
        official = torch.cat([c[:, :1], (c + r(c, uc))[:, 1:]], dim=1)
    assert torch.equal(refine(r, c, uc), official)  # bit-identical to the official 77-token rule
    odd = torch.randn(1, 100, 64, generator=g)
    out = refine(r, odd, uc)
    assert [i for i in range(100) if torch.equal(out[:, i], odd[:, i])] == [0]
    # families without a start token (T5): nothing kept, long or not
    long_c = torch.randn(1, 154, 64, generator=g)
    assert not any(torch.equal(refine(r, long_c, uc, keep_first_token=False)[:, i], long_c[:, i]) for i in (0, 77))


def test_a_row_padded_by_repeating_its_last_token_keeps_only_token_0():
    # A1111 pads the shorter prompts of a batch to the longest by repeating their last token vector
    r = _refiner()
    g = torch.Generator().manual_seed(4)
    short, long_ = torch.randn(1, 77, 64, generator=g), torch.randn(1, 231, 64, generator=g)
    c = torch.cat([torch.cat([short, short[:, -1:].repeat(1, 154, 1)], dim=1), long_])
    out = refine(r, c, torch.randn(1, 77, 64, generator=g))
    assert [i for i in range(231) if torch.equal(out[0, i], c[0, i])] == [0]
    assert [i for i in range(231) if torch.equal(out[1, i], c[1, i])] == [0, 77, 154]


def test_gradients_skip_the_kept_start_tokens():
    r = _refiner()
    c = torch.randn(1, 154, 64, requires_grad=True)
    refine(r, c, torch.randn(1, 77, 64)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in r.parameters())
    assert torch.equal(c.grad[0, 0], torch.ones(64)) and torch.equal(c.grad[0, 77], torch.ones(64))


def _graph(text, negative=""):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "DiceRefinerLoader", "inputs": {"refiner_name": "sd15-random.safetensors"}},
        "5": {"class_type": "DiceRefinerApply", "inputs": {"positive": ["2", 0], "negative": ["3", 0],
                                                           "refiner": ["4", 0], "strength": 1.0}},
        "6": {"class_type": "ConditioningProbe", "inputs": {"conditioning": ["5", 0], "reference": ["2", 0]}},
    }


@pytest.mark.server
@pytest.mark.parametrize("repeats,tokens", [(5, 77), (10, 154), (15, 231)])
@pytest.mark.parametrize("negative", ["", LONG_NEGATIVE], ids=["empty-negative", "long-negative"])
def test_comfyui_long_prompt_keeps_every_chunk_start(server, repeats, tokens, negative):
    entry = server.run(_graph(", ".join([PHRASE] * repeats), negative))
    assert succeeded(entry), execution_error(entry)
    (e,) = entry["outputs"]["6"]["conditioning"]
    assert e["shape"] == [1, tokens, 768] and e["finite"]
    assert e["unchanged_positions"] == list(range(0, tokens, 77))
    assert e["max_abs_diff"] > 1e-3

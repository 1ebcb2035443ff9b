"""The refiner against an independent reference written from the published specification."""
import math

import pytest
import torch

from cfg_distill import DiceRefiner, refine
from cfg_distill.refiner import PARAMETER_NAMES


def reference_sharpener(p, c, uc, heads=8):
    """method.md, line by line: fc1+ReLU on both inputs, 8-head attention (no q/k/v bias),
    to_out linear, ReLU, fc2. Written with explicit per-head loops on purpose."""
    lin = lambda x, w, b=None: x @ w.T + (0 if b is None else b)
    h_c = torch.relu(lin(c, p["fc1.weight"], p["fc1.bias"]))
    h_uc = torch.relu(lin(uc, p["fc1.weight"], p["fc1.bias"]))
    q, k, v = (lin(h_c, p["attention.to_q.weight"]), lin(h_uc, p["attention.to_k.weight"]),
               lin(h_uc, p["attention.to_v.weight"]))
    d = q.shape[-1] // heads
    outs = []
    for i in range(heads):
        qi, ki, vi = (t[..., i * d:(i + 1) * d] for t in (q, k, v))
        w = torch.softmax(torch.einsum("bid,bjd->bij", qi, ki) / math.sqrt(d), dim=-1)
        outs.append(torch.einsum("bij,bjd->bid", w, vi))
    a = lin(torch.cat(outs, -1), p["attention.to_out.0.weight"], p["attention.to_out.0.bias"])
    return lin(torch.relu(a), p["fc2.weight"], p["fc2.bias"])


@pytest.fixture
def official_state():
    g = torch.Generator().manual_seed(1)
    shapes = {"fc1.weight": (512, 768), "fc1.bias": (512,), "attention.to_q.weight": (512, 512),
              "attention.to_k.weight": (512, 512), "attention.to_v.weight": (512, 512),
              "attention.to_out.0.weight": (512, 512), "attention.to_out.0.bias": (512,),
              "fc2.weight": (768, 512), "fc2.bias": (768,)}
    # nn.Linear's own scale (1/sqrt(fan_in)), as real refiners have; biases non-zero on purpose.
    return {k: torch.randn(s, generator=g) / (s[-1] ** 0.5) for k, s in shapes.items()}


def test_parameter_names_and_counts():
    assert tuple(DiceRefiner(768).state_dict()) == PARAMETER_NAMES
    counts = {d: sum(p.numel() for p in DiceRefiner(d).parameters()) for d in (768, 2048, 4096)}
    assert counts == {768: 1_836_800, 2048: 3_148_800, 4096: 5_248_000}


def test_official_state_dict_loads_unchanged_and_matches_reference(official_state):
    r = DiceRefiner(768)
    r.load_state_dict(official_state, strict=True)
    g = torch.Generator().manual_seed(2)
    c, uc = torch.randn(2, 154, 768, generator=g), torch.randn(2, 77, 768, generator=g)
    diff = (r(c, uc) - reference_sharpener(official_state, c, uc)).abs().max().item()
    assert diff <= 1e-6, diff


def test_refine_keeps_first_token_and_changes_the_rest(official_state):
    r = DiceRefiner(768)
    r.load_state_dict(official_state)
    c, uc = torch.randn(1, 77, 768), torch.randn(1, 77, 768)
    out = refine(r, c, uc, alpha=1.0)
    assert torch.equal(out[:, 0], c[:, 0])
    expected = c + reference_sharpener(official_state, c, uc)
    assert (out[:, 1:] - expected[:, 1:]).abs().max() <= 1e-5
    assert (out[:, 1:] - c[:, 1:]).abs().min() >= 0  # changed (padding included)
    assert not torch.allclose(out[:, 1:], c[:, 1:])
    # T5-only families have no start token: every token changes.
    no_keep = refine(r, c, uc, keep_first_token=False)
    assert not torch.allclose(no_keep[:, 0], c[:, 0])


def test_alpha_scales_the_correction(official_state):
    r = DiceRefiner(768)
    r.load_state_dict(official_state)
    c, uc = torch.randn(1, 77, 768), torch.randn(1, 77, 768)
    assert torch.equal(refine(r, c, uc, alpha=0.0), c)
    d1, d2 = refine(r, c, uc, 1.0) - c, refine(r, c, uc, 2.0) - c
    assert torch.allclose(d2, 2 * d1, atol=1e-5)


def test_shapes_batches_and_lengths():
    r = DiceRefiner(64, inner_dim=32, heads=4)
    c = torch.randn(3, 231, 64)  # 77*3 tokens
    for uc in (torch.randn(1, 77, 64), torch.randn(3, 154, 64)):
        assert refine(r, c, uc).shape == c.shape
    with pytest.raises(ValueError, match="batch"):
        refine(r, c, torch.randn(2, 77, 64))


def test_dtype_preserved_and_computed_in_fp32():
    r = DiceRefiner(64, inner_dim=32, heads=4)
    c, uc = torch.randn(1, 77, 64), torch.randn(1, 77, 64)
    out16 = refine(r, c.half(), uc.half())
    assert out16.dtype == torch.float16
    assert (out16.float() - refine(r, c.half().float(), uc.half().float())).abs().max() < 1e-2


def test_zero_output_is_identity():
    r = DiceRefiner(64, inner_dim=32, heads=4).zero_output_()
    c = torch.randn(2, 77, 64)
    assert torch.equal(refine(r, c, torch.randn(1, 77, 64)), c)

import pytest
import torch

from cfg_distill import ConditioningError, fuse, fuse_tokens
from cfg_distill.fusion import match_lengths


def test_formula():
    c, n = torch.randn(2, 77, 16), torch.randn(2, 77, 16)
    assert torch.allclose(fuse(c, n, 3.0), c + 3.0 * (c - n))
    assert torch.equal(fuse(c, n, 0.0), c)


def test_pooled_and_broadcast():
    c, n = torch.randn(2, 1280), torch.randn(1, 1280)
    assert torch.allclose(fuse(c, n, 2.0), c + 2.0 * (c - n))


def test_lengths_tiled_to_common_multiple():
    c, n = torch.randn(1, 154, 8), torch.randn(1, 77, 8)
    out = fuse(c, n, 1.0)
    assert out.shape == (1, 154, 8)
    assert torch.allclose(out, c + (c - torch.cat([n, n], 1)))
    a, b = match_lengths(torch.randn(1, 154, 8), torch.randn(1, 231, 8))
    assert a.shape[1] == b.shape[1] == 462


def test_tiling_leaves_cross_attention_unchanged():
    # Why tiling is the right length rule: attention over a repeated sequence is the same attention.
    q, kv = torch.randn(1, 5, 8), torch.randn(1, 77, 8)
    att = lambda k: torch.softmax(q @ k.transpose(1, 2), -1) @ k
    assert torch.allclose(att(kv), att(kv.repeat(1, 2, 1)), atol=1e-6)


def test_dtype_and_errors():
    c, n = torch.randn(1, 77, 8).half(), torch.randn(1, 77, 8).half()
    assert fuse(c, n, 2.0).dtype == torch.float16
    with pytest.raises(ConditioningError, match="768-d.*2048-d|same CLIP"):
        fuse_tokens(torch.randn(1, 77, 768), torch.randn(1, 77, 2048), 1.0)
    bad = torch.randn(1, 77, 8)
    bad[0, 3, 1] = float("nan")
    with pytest.raises(ConditioningError, match="NaN"):
        fuse_tokens(bad, n.float(), 1.0)

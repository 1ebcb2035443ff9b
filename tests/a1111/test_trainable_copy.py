"""wt.trainable_copy on its own (pure torch): what Forge's loaded UNet needs for training. The real
Forge server runs it in tests/webui/test_webui_training.py; this pins down the two failure modes."""
import pytest
import torch

from sdwebui import training as wt


class Block(torch.nn.Module):
    """Like Forge's transformer block: a norm, then the residual added in place."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        x = x * 1.0
        n = self.proj(self.norm(x))
        x += n
        return x


def _inference_model():
    with torch.inference_mode():  # as Forge's loader
        torch.manual_seed(0)
        return torch.nn.Sequential(Block(), Block())


def test_the_loaded_model_cannot_be_differentiated_through():
    model = _inference_model()
    c = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="nference tensors"):
        model(c).sum().backward()


def test_copy_trains_through_and_leaves_the_original_alone():
    model = _inference_model()
    before = [p.clone() for p in model.parameters()]
    model[0].forward = lambda x: x  # an instance-level wrapper (e.g. another extension's)
    clone = wt.trainable_copy(model)
    assert not any(p.is_inference() or p.requires_grad for p in clone.parameters())
    c = torch.randn(2, 8, requires_grad=True)
    clone(c).sum().backward()  # in-place residuals after a norm: fine in the copy
    assert c.grad is not None and torch.isfinite(c.grad).all()
    assert all(p.is_inference() for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with torch.no_grad():
        x = torch.randn(3, 8)
        del model[0].forward
        assert torch.allclose(clone(x), model(x))


def test_ordinary_weights_alone_do_not_help_the_in_place_residual_does():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(Block(), Block()).requires_grad_(False)
    c = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        plain(c).sum().backward()
    wt.trainable_copy(plain)(c).sum().backward()

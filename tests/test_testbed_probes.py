"""The testbed trainer's generalisation probes (RESULTS_dice round 8), as the engine's hooks
(TrainingHooks, no patching of the pack): each acts while training only, does what its flag says, and
leaves the refiner file's format alone."""
from __future__ import annotations

import argparse

import pytest
import torch

from cfg_distill.refiner import refine
from cfg_distill.training import Batch, TrainConfig, new_refiner, train_refiner
from testbed.train_refiner import regularisers


def _args(**kw):
    base = dict(query_noise=0.0, hidden_dropout=0.0, splice_share=0.0)
    base.update(kw)
    return argparse.Namespace(**base)


def _refiner():
    torch.manual_seed(0)
    r = new_refiner(16, 32, heads=4)
    torch.nn.init.normal_(r.fc2.weight, std=0.1)  # new refiners start at zero output
    return r


class _Host:
    def __init__(self, c):
        self.c = c

    def sample_batch(self, step, g):
        return Batch(x_t=torch.zeros(self.c.shape[0], 1), sigma=torch.ones(self.c.shape[0]), c=self.c.clone(),
                     uc=torch.zeros(1, 5, 16))


def _hooked_refiner(**kw):
    r = _refiner()
    regularisers(_args(**kw)).on_refiner(r)
    return r


def test_no_probe_no_hooks():
    assert regularisers(_args()) is None


def test_query_noise_and_dropout_act_in_training_only():
    c, uc = torch.randn(3, 10, 16), torch.randn(1, 5, 16)
    plain = refine(_refiner().eval(), c, uc)
    for kw in (dict(query_noise=0.2), dict(hidden_dropout=0.3)):
        r = _hooked_refiner(**kw)
        assert torch.equal(refine(r.eval(), c, uc), plain), kw
        r.train()
        a, b = refine(r, c, uc), refine(r, c, uc)
        assert not torch.equal(a, plain) and not torch.equal(a, b), kw
        assert torch.equal(a[:, 0], c[:, 0]), kw  # the start token is still kept
        assert set(r.state_dict()) == set(_refiner().state_dict())


def test_query_noise_moves_the_input_not_the_base_tokens():
    r = _hooked_refiner(query_noise=1.0)
    with torch.no_grad():  # S = const: then only the input could move the output
        r.fc2.weight.zero_()
        r.fc2.bias.fill_(0.5)
    c, uc = torch.randn(2, 4, 16), torch.randn(1, 3, 16)
    out = refine(r.train(), c, uc)
    assert torch.allclose(out[:, 1:], c[:, 1:] + 0.5)


def _toy_run(init, hooks=None):
    g = torch.Generator().manual_seed(0)
    c, uc = torch.randn(32, 6, 16, generator=g), torch.randn(1, 3, 16, generator=g)

    def sample_batch(step, gen):
        i = torch.randint(32, (4,), generator=gen)
        return Batch(x_t=torch.zeros(4, 1), sigma=torch.ones(4), c=c[i], uc=uc)  # distinct uc tokens: with
        # equal ones the attention reads the same value whatever the query

    torch.manual_seed(0)
    cfg = TrainConfig(steps=5, batch_size=4, lr=1e-2)
    return train_refiner(cfg, sample_batch, lambda b: 1.5 * b.c.sum(1), lambda b, rc: rc.sum(1), token_dim=16,
                         init=init, hooks=hooks).refiner


def test_the_probes_reach_the_copy_the_trainer_trains():
    # The trainer trains a fresh copy of --init: hooks on the init module alone would do nothing.
    init = _refiner()
    plain = _toy_run(init)
    hooks = regularisers(_args(query_noise=0.5))
    noisy = _toy_run(init, hooks)
    assert not torch.equal(plain.fc2.weight, noisy.fc2.weight)
    assert torch.equal(_toy_run(init).fc2.weight, plain.fc2.weight)  # nothing left behind in the process
    again = _toy_run(init, hooks)  # the result is in eval mode: its hooks are off, its own numbers unchanged
    c = torch.randn(2, 6, 16)
    assert torch.equal(refine(again, c, c[:1]), refine(again, c, c[:1]))


def test_splice_takes_a_tail_from_another_row_of_the_batch():
    rows = torch.arange(8.0).reshape(8, 1, 1).expand(8, 20, 16).clone()

    hooks = regularisers(_args(splice_share=1.0))
    g = torch.Generator().manual_seed(3)
    batch = hooks.on_batch(_Host(rows).sample_batch(0, g), g)
    changed = 0
    for i in range(8):
        own = batch.c[i, :, 0] == i
        assert own[0], "the head of each row is its own"
        k = int(own.float().argmin()) if not own.all() else 20
        assert own[:k].all() and 1 <= k <= 20
        tail = batch.c[i, k:, 0]
        assert (tail == tail[0]).all() if k < 20 else True  # one other row's tail
        changed += k < 20
    assert changed >= 4
    plain = _Host(rows).sample_batch(0, torch.Generator().manual_seed(3))
    assert torch.equal(plain.c, rows)

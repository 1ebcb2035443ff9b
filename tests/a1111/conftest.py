"""Fixtures for the A1111 / Forge extension tests: webui stand-ins, fake checkpoints, refiner files."""
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from cfg_distill import DiceRefiner, RefinerInfo, save_refiner  # noqa: E402
from webui_env import load_webui, purge  # noqa: E402


def _refiner(path, dim, family, seed):
    torch.manual_seed(seed)
    r = DiceRefiner(dim, inner_dim=64, heads=8)
    save_refiner(str(path), r, RefinerInfo(dim, 64, heads=8, base_family=family, guidance_scale=5.0, train_steps=10))


@pytest.fixture(scope="session")
def refiners_dir(tmp_path_factory):
    """Real .safetensors refiners (small, random) as the webui's models/dice_refiners would hold."""
    d = tmp_path_factory.mktemp("dice_refiners")
    _refiner(d / "sd15-test.safetensors", 768, "sd15", 0)
    (d / "sub").mkdir()
    _refiner(d / "sub" / "sdxl-test.safetensors", 2048, "sdxl", 1)
    return d


@pytest.fixture
def make_webui(refiners_dir):
    """make_webui(host, model) -> a fresh stand-in webui with the script loaded."""
    def make(host="a1111", model=None):
        return load_webui(host, model, str(refiners_dir))

    yield make
    purge()

"""K-range refiner files (one refiner per noise-level range, ComfyUI start/end percent per entry) and
the `negatives` metadata: format, validation errors, application; K = 1 files stay official."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cfg_distill import (ConditioningError, DiceRefiner, PARAMETER_NAMES, RefinerFileError, RefinerInfo,
                         load_refiner, read_refiner_info, refine_ranges, refine_tokens, save_refiner)
from cfg_distill.refiner_file import save_range_refiner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _refiner(seed, dim=32, inner=16):
    torch.manual_seed(seed)
    return DiceRefiner(dim, inner, 4).eval()


def _info(**kw):
    return RefinerInfo(32, 16, heads=4, base_family="other", guidance_scale=5.0, **kw)


def test_k_range_round_trip_and_application(tmp_path):
    path = str(tmp_path / "k3.safetensors")
    mods = [_refiner(s) for s in (1, 2, 3)]
    save_range_refiner(path, mods, _info(ranges=[[0, 0.3], [0.3, 0.6], [0.6, 1]], negatives=True))
    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == sorted(f"range{k}.{n}" for k in range(3) for n in PARAMETER_NAMES)
        meta = json.loads(f.metadata()["cfg_distill"])
    assert meta["format_version"] == 2 and meta["negatives"] is True
    loaded = load_refiner(path)
    assert loaded.info.ranges == [[0, 0.3], [0.3, 0.6], [0.6, 1]] and loaded.info.negatives
    assert "3 noise-level ranges" in loaded.info.summary() and "negative prompts supported" in loaded.info.summary()
    c, uc = torch.randn(2, 77, 32), torch.randn(1, 77, 32)
    stages = refine_ranges(loaded, c, uc)
    assert [(a, b) for a, b, _ in stages] == [(0, 0.3), (0.3, 0.6), (0.6, 1)]
    for (_, _, t), m in zip(stages, mods):
        with torch.no_grad():
            want = c + m(c, uc)
        want[:, :1] = c[:, :1]
        assert torch.allclose(t, want, atol=1e-5)
    with pytest.raises(ConditioningError, match="K-range file"):
        refine_tokens(loaded, c, uc)
    assert read_refiner_info(path).ranges == loaded.info.ranges


def test_single_refiner_stays_official(tmp_path):
    path = str(tmp_path / "k1.safetensors")
    m = _refiner(4)
    save_refiner(path, m, _info())
    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == sorted(PARAMETER_NAMES)
        meta = json.loads(f.metadata()["cfg_distill"])
    assert meta["format_version"] == 1 and "ranges" not in meta and meta["negatives"] is False
    loaded = load_refiner(path)
    assert loaded.info.ranges is None and not loaded.info.negatives
    c, uc = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    ((a, b, t),) = refine_ranges(loaded, c, uc)
    assert (a, b) == (0.0, 1.0) and torch.equal(t, refine_tokens(loaded, c, uc))
    with pytest.raises(ValueError, match="save_range_refiner"):
        save_refiner(path, m, _info(ranges=[[0, 0.5], [0.5, 1]]))


@pytest.mark.parametrize("ranges, message", [
    ([[0, 0.5], [0.6, 1]], "starts at 0.6 but range 0 ends at 0.5"),
    ([[0, 0.6], [0.5, 1]], "starts at 0.5 but range 0 ends at 0.6"),
    ([[0.1, 0.5], [0.5, 1]], "must start at 0 and end at 1"),
    ([[0, 0.5], [0.5, 0.9]], "must start at 0 and end at 1"),
    ([[0, 0.5], [0.5, 0.5]], r"0 <= start < end <= 1"),
    ([[0, 1]], "at least two"),
    ([[0, "a"], ["a", 1]], "expected \\[start_percent, end_percent\\]"),
])
def test_bad_ranges_are_refused_clearly(tmp_path, ranges, message):
    path = str(tmp_path / "bad.safetensors")
    mods = [_refiner(s) for s in range(max(len(ranges), 1))]
    with pytest.raises(RefinerFileError, match=message):
        save_range_refiner(path, mods, _info(ranges=ranges))
    # the same metadata written by another tool is refused by the loader too
    tensors = {f"range{k}.{n}": v for k, m in enumerate(mods) for n, v in m.state_dict().items()}
    meta = {**json.loads(_info().to_metadata()["cfg_distill"]), "format_version": 2, "ranges": ranges}
    save_file(tensors, path, metadata={"cfg_distill": json.dumps(meta)})
    with pytest.raises(RefinerFileError, match=message):
        load_refiner(path)


def test_ranges_and_tensors_must_agree(tmp_path):
    path = str(tmp_path / "k.safetensors")
    mods = [_refiner(s) for s in range(3)]
    tensors = {f"range{k}.{n}": v for k, m in enumerate(mods) for n, v in m.state_dict().items()}
    meta = {**json.loads(_info().to_metadata()["cfg_distill"]), "format_version": 2, "ranges": [[0, 0.5], [0.5, 1]]}
    save_file(tensors, path, metadata={"cfg_distill": json.dumps(meta)})
    with pytest.raises(RefinerFileError, match="lists 2 noise-level ranges but the tensors"):
        load_refiner(path)
    save_file(tensors, path, metadata={})  # prefixed tensors, no ranges metadata
    with pytest.raises(RefinerFileError, match="no valid noise-level ranges"):
        load_refiner(path)
    meta["format_version"] = 4  # newer than this pack reads (3: w input)
    save_file(tensors, path, metadata={"cfg_distill": json.dumps(meta)})
    with pytest.raises(RefinerFileError, match="newer cfg-distill"):
        load_refiner(path)


def test_info_cli_reads_both(tmp_path):
    k1, k2 = str(tmp_path / "k1.safetensors"), str(tmp_path / "k2.safetensors")
    save_refiner(k1, _refiner(1), _info())
    save_range_refiner(k2, [_refiner(1), _refiner(2)], _info(ranges=[[0, 0.4], [0.4, 1]], negatives=True))
    run = lambda f: subprocess.run([sys.executable, "-m", "cfg_distill", "info", f], cwd=ROOT,  # noqa: E731
                                   capture_output=True, text=True)
    r1, r2 = run(k1), run(k2)
    assert r1.returncode == 0 and "no negatives" in r1.stdout and "ranges" not in r1.stdout
    assert r2.returncode == 0 and "2 noise-level ranges [0-0.4] [0.4-1]" in r2.stdout
    assert "negative prompts supported" in r2.stdout


@pytest.fixture(scope="module")
def refiner_nodes():
    
    from tools.comfy_env import load_pack, use_comfy_library

    use_comfy_library()
    name = "cfg_distill_pack"
    load_pack()
    return sys.modules[name + ".nodes.refiner_nodes"]


def test_apply_node_emits_one_entry_per_range(tmp_path, refiner_nodes):
    path = str(tmp_path / "k2.safetensors")
    save_range_refiner(path, [_refiner(1), _refiner(2)], _info(ranges=[[0, 0.4], [0.4, 1]]))
    loaded = load_refiner(path)
    pos = [[torch.randn(1, 77, 32), {"pooled_output": None}]]
    neg = [[torch.randn(1, 77, 32), {}]]
    out = refiner_nodes.ApplyDiceRefiner.execute(positive=pos, negative=neg, refiner=loaded, strength=1.0).result[0]
    assert [(e[1]["start_percent"], e[1]["end_percent"]) for e in out] == [(0.0, 0.4), (0.4, 1.0)]
    assert all("pooled_output" in e[1] for e in out) and "start_percent" not in pos[0][1]
    stages = refine_ranges(loaded, pos[0][0], neg[0][0])
    assert all(torch.equal(e[0], t) for e, (_, _, t) in zip(out, stages))
    # an entry already limited by ConditioningSetTimestepRange keeps its limits (intersected)
    pos[0][1]["start_percent"], pos[0][1]["end_percent"] = 0.5, 0.9
    out = refiner_nodes.ApplyDiceRefiner.execute(positive=pos, negative=neg, refiner=loaded, strength=1.0).result[0]
    assert [(e[1]["start_percent"], e[1]["end_percent"]) for e in out] == [(0.5, 0.9)]
    # a single refiner: one entry, keys untouched
    one = str(tmp_path / "k1.safetensors")
    save_refiner(one, _refiner(3), _info())
    out = refiner_nodes.ApplyDiceRefiner.execute(positive=pos, negative=neg, refiner=load_refiner(one),
                                                 strength=1.0).result[0]
    assert len(out) == 1 and out[0][1]["start_percent"] == 0.5 and out[0][1]["end_percent"] == 0.9


def test_the_same_refiner_in_several_ranges_saves(tmp_path):
    path = str(tmp_path / "same.safetensors")
    m = _refiner(7)
    save_range_refiner(path, [m, m], _info(ranges=[[0, 0.5], [0.5, 1]]))
    loaded = load_refiner(path)
    c, uc = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    (_, _, t0), (_, _, t1) = refine_ranges(loaded, c, uc)
    assert torch.equal(t0, t1)

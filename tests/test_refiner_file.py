import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from cfg_distill import DiceRefiner, RefinerFileError, RefinerInfo, load_refiner, read_refiner_info, save_refiner
from cfg_distill import refiner_file


def _refiner(dim=768, seed=0):
    torch.manual_seed(seed)
    return DiceRefiner(dim)


def test_round_trip_with_metadata(tmp_path):
    r = _refiner()
    info = RefinerInfo(768, 512, base_family="sd15", base_checkpoint="v1-5-pruned-emaonly.safetensors",
                       base_hash="6ce0161689", guidance_scale=5.0, train_steps=8000, keep_first_token=True)
    path = str(tmp_path / "r.safetensors")
    save_refiner(path, r, info)
    loaded = load_refiner(path)
    assert loaded.info.base_family == "sd15" and loaded.info.guidance_scale == 5.0
    assert loaded.info.train_steps == 8000 and loaded.info.base_hash == "6ce0161689"
    for k, v in r.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[k], v)
    assert read_refiner_info(path).token_dim == 768
    assert "sd15" in loaded.info.summary()


def test_plain_state_dict_without_metadata_loads_with_inferred_dims(tmp_path):
    r = DiceRefiner(2048, inner_dim=256, heads=8)
    path = str(tmp_path / "plain.safetensors")
    save_file({k: v.contiguous() for k, v in r.state_dict().items()}, path)
    loaded = load_refiner(path)
    assert (loaded.info.token_dim, loaded.info.inner_dim) == (2048, 256)
    assert loaded.info.base_family == "unknown" and not loaded.info.has_metadata


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / "r.safetensors")
    save_refiner(path, _refiner(seed=1), RefinerInfo(768, 512, base_family="sd15"))
    before = open(path, "rb").read()

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(refiner_file, "save_file", boom)
    with pytest.raises(OSError):
        save_refiner(path, _refiner(seed=2), RefinerInfo(768, 512, base_family="sd15"))
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["r.safetensors"]  # no temp file left behind


def test_missing_file(tmp_path):
    with pytest.raises(RefinerFileError, match="does not exist"):
        load_refiner(str(tmp_path / "nope.safetensors"))


def test_truncated_file(tmp_path):
    path = str(tmp_path / "r.safetensors")
    save_refiner(path, _refiner(), RefinerInfo(768, 512))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(RefinerFileError, match="truncated"):
        load_refiner(path)


def test_pickle_renamed_to_safetensors_is_refused(tmp_path):
    path = str(tmp_path / "evil.safetensors")
    with open(path, "wb") as f:
        pickle.dump({"model": {"fc1.weight": [1, 2]}}, f)
    with pytest.raises(RefinerFileError, match="not a .safetensors.*import-official"):
        load_refiner(path)


def test_corrupt_header_and_empty_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!}" + b"\0" * 64)
    with pytest.raises(RefinerFileError, match="corrupt"):
        load_refiner(str(path))
    path.write_bytes(b"")
    with pytest.raises(RefinerFileError, match="empty or truncated"):
        load_refiner(str(path))


def test_not_a_refiner_and_inconsistent_shapes(tmp_path):
    path = str(tmp_path / "lora.safetensors")
    save_file({"lora_unet_down.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(RefinerFileError, match="not a DICE refiner: missing fc1.weight"):
        load_refiner(path)
    sd = {k: v.contiguous() for k, v in DiceRefiner(768).state_dict().items()}
    sd["fc2.bias"] = torch.zeros(10)
    save_file(sd, path)
    with pytest.raises(RefinerFileError, match="inconsistent shapes: fc2.bias"):
        load_refiner(path)


def _rewrite_meta(path, **changes):
    tensors = load_file(path)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["cfg_distill"])
    meta.update(changes)
    save_file(tensors, path, metadata={"cfg_distill": json.dumps(meta)})


def test_metadata_validation(tmp_path):
    path = str(tmp_path / "r.safetensors")
    save_refiner(path, _refiner(), RefinerInfo(768, 512, base_family="sd15"))
    _rewrite_meta(path, base_family="sdxl")
    with pytest.raises(RefinerFileError, match="sdxl uses 2048-d"):
        load_refiner(path)
    _rewrite_meta(path, base_family="sd15", format_version=99)
    with pytest.raises(RefinerFileError, match="newer cfg-distill"):
        load_refiner(path)
    _rewrite_meta(path, format_version=1, heads=7)
    with pytest.raises(RefinerFileError, match="7 heads"):
        load_refiner(path)


def test_nan_weights_refused(tmp_path):
    r = _refiner()
    with torch.no_grad():
        r.fc2.weight[0, 0] = float("nan")
    path = str(tmp_path / "nan.safetensors")
    save_refiner(path, r, RefinerInfo(768, 512))
    with pytest.raises(RefinerFileError, match="NaN"):
        load_refiner(path)

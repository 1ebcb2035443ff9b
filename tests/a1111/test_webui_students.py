"""sdwebui.students: the TeEFusion student LoRAs a webui prompt names, read from real
.safetensors files written by the pack's saver (the real webuis: tests/webui/test_webui_lora.py)."""

import torch
from safetensors.torch import save_file

from cfg_distill.teefusion_training import FUSION_MODULATION, FUSION_TOKENS, LoraInfo, lora_state_dict, save_lora
from sdwebui.students import find_lora_file, lora_names, model_family, read_student, student_notes


def _student(path, family="sd15", fusion=FUSION_TOKENS, w=(2.0, 8.0)):
    layers = {"diffusion_model.input_blocks.1.1.proj_in": (torch.ones(8, 2), torch.ones(2, 8), 2.0, (8, 8))}
    save_lora(str(path), lora_state_dict(layers), LoraInfo(w_min=w[0], w_max=w[1], fusion=fusion, rank=2, alpha=2.0,
                                                           base_family=family))
    return str(path)


def test_lora_names_in_prompt_order():
    prompts = ["a cat <lora:tiny-teefusion:1> <LORA:style:0.5:1>", "<lora:tiny-teefusion:0.8> <lora:x:unet=0.5>",
               "no tags", None, "<hypernet:h:1> <lora:>"]
    assert lora_names(prompts) == ["tiny-teefusion", "style", "x"]


def test_find_by_file_name_in_subfolders(tmp_path):
    (tmp_path / "sub").mkdir()
    target = _student(tmp_path / "sub" / "stu.safetensors")
    (tmp_path / "stu.pt").write_bytes(b"not opened")
    assert find_lora_file(str(tmp_path), "stu") == target
    assert find_lora_file(str(tmp_path), "missing") is None
    assert find_lora_file(str(tmp_path / "nope"), "stu") is None


def test_reads_students_only(tmp_path):
    s = read_student(_student(tmp_path / "s.safetensors", w=(3.0, 6.0)), "s")
    assert (s.name, s.info.w_min, s.info.w_max, s.info.base_family) == ("s", 3.0, 6.0, "sd15")
    plain = str(tmp_path / "style.safetensors")
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, plain, {"ss_network_dim": "2"})
    assert read_student(plain, "style") is None
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert read_student(str(broken), "broken") is None


def test_notes(tmp_path):
    fits = read_student(_student(tmp_path / "a.safetensors"), "a")
    xl = read_student(_student(tmp_path / "b.safetensors", family="sdxl"), "b")
    sd3 = read_student(_student(tmp_path / "c.safetensors", family="sd3", fusion=FUSION_MODULATION), "c")
    family = model_family(is_sd1=True)
    assert family == "sd15" and model_family() is None and model_family(is_sd1=True, is_sdxl=True) == "sdxl"
    assert student_notes([fits], 5.0, family) == []
    assert student_notes([fits], 2.0, family) == [] and student_notes([fits], 8.0, family) == []
    [note] = student_notes([fits], 12.0, family)
    assert "12" in note and "2 to 8" in note and "'a'" in note
    [note] = student_notes([xl], 5.0, family)
    assert "'b'" in note and "SDXL" in note and "SD1.5" in note and "training-free" in note
    assert student_notes([xl], 5.0, None) == []  # unknown checkpoint family: not judged
    [note] = student_notes([sd3], 5.0, family)
    assert "TeEFusion Model Patch" in note
    assert len(student_notes([fits, xl, sd3], 12.0, family)) == 3

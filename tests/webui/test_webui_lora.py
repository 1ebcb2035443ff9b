"""A TeEFusion student LoRA, trained for the tiny checkpoint by this pack's headless trainer, used the
two-step way in the REAL AUTOMATIC1111 1.10.1 and Forge: the webui's own LoRA support loads it
(`<lora:name:1>` in the prompt), cfg-distill's TeEFusion mode fuses the prompt at w, CFG 1.

Reference: the same checkpoint with the LoRA merged into its weights from the LoRA format's definition
(webui_models.merge_lora), run in TeEFusion mode without a LoRA. Matching it means every module of the
file was found in the webui's model and scaled as the format says.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from webui_models import MERGED, MISMATCHED_MODULES, STUDENT
from webui_server import image_array

pytestmark = pytest.mark.webui

PROMPT = "a red circle on a blue background"
W = 4.0  # inside the student's range (2 to 8)
STEPS = 4


def _with(name: str, multiplier: float = 1.0) -> str:
    return f"{PROMPT} <lora:{name}:{multiplier:g}>"


def _params(out) -> str:
    return out["info_dict"]["infotexts"][0]


def _note(out) -> str:
    return out["info_dict"]["extra_generation_params"].get("CFG distill note", "")


def _image(out) -> np.ndarray:
    return image_array(out["images"][0]).astype(np.float64)


def test_student_lora_through_the_webuis_lora_support(webui):
    student, calls = webui.generate("TeEFusion", w=W, prompt=_with(STUDENT))
    assert calls["rows"] == [1] * STEPS, calls  # one UNet pass per step with the LoRA loaded
    assert "CFG distill: TeEFusion" in _params(student) and f"TeEFusion w: {W:g}" in _params(student)
    assert _note(student) == "", _note(student)  # a student that fits, w in its range: nothing to say
    merged, merged_calls = webui.generate("TeEFusion", w=W, prompt=PROMPT,
                                          override_settings={"sd_model_checkpoint": MERGED},
                                          override_settings_restore_afterwards=True)
    assert merged_calls["rows"] == [1] * STEPS
    no_lora, _ = webui.generate("TeEFusion", w=W, prompt=PROMPT)
    no_fusion, _ = webui.generate("Off", prompt=_with(STUDENT))  # the LoRA at plain CFG 1
    doubled, _ = webui.generate("TeEFusion", w=W, prompt=_with(STUDENT, 2))

    s = _image(student)
    to_merged = np.abs(s - _image(merged))
    lora_effect = np.abs(s - _image(no_lora))
    fusion_effect = np.abs(s - _image(no_fusion))
    doubled_effect = np.abs(_image(doubled) - _image(merged))
    print(f"\n[webui] {webui.name} student LoRA (mean / max abs, 0-255): vs merged reference "
          f"{to_merged.mean():.3f} / {to_merged.max():.0f}; vs no LoRA {lora_effect.mean():.2f} / "
          f"{lora_effect.max():.0f}; vs no fusion {fusion_effect.mean():.2f} / {fusion_effect.max():.0f}; "
          f"multiplier 2 vs merged {doubled_effect.mean():.2f} / {doubled_effect.max():.0f}")
    # The LoRA is applied, to the right modules, at the right scale: the webui's image is the merged
    # checkpoint's (up to rounding), and a LoRA left out, or applied at twice its scale, is far from it.
    assert lora_effect.mean() > 2.0, lora_effect.mean()
    assert to_merged.max() <= 2 and to_merged.mean() < 0.05 * lora_effect.mean(), (to_merged.mean(), to_merged.max())
    assert doubled_effect.mean() > 20 * max(to_merged.mean(), 0.01)
    # The fusion is applied on top of the LoRA (the same LoRA at plain CFG 1 is another image).
    assert fusion_effect.mean() > 2.0, fusion_effect.mean()


@pytest.mark.parametrize("family", sorted(MISMATCHED_MODULES))
def test_a_student_for_another_family_is_left_out_and_reported(webui, family):
    name = f"{family}-teefusion"
    no_lora, _ = webui.generate("TeEFusion", w=W, prompt=PROMPT)
    start = os.path.getsize(webui.log)
    out, calls = webui.generate("TeEFusion", w=W, prompt=_with(name))
    with open(webui.log, encoding="utf-8", errors="replace") as f:
        f.seek(start)
        console = f.read()  # the server's console output during this request
    assert calls["rows"] == [1] * STEPS
    # The webuis' real behaviour: keys that name no module are left out without failing the
    # generation, so the image is the one without the LoRA (training-free TeEFusion) ...
    assert (_image(out) == _image(no_lora)).all()
    # ... which cfg-distill says in the infotext (what API users get back) and on the console.
    note = _note(out)
    assert f"'{name}'" in note, note
    assert ("TeEFusion Model Patch" in note) if family == "sd3" else ("SDXL" in note and "training-free" in note)
    assert f"student '{name}'" in console, console[-2000:]
    if webui.name == "forge":  # Forge's own console line for a LoRA that does not fit (A1111 logs it at debug level)
        assert f"{name}.safetensors" in console and ("mismatch" in console or "unmatched keys" in console), console
    if webui.name == "reforge":  # reForge's (ldm_patched) own line for each key it leaves out
        assert "lora key not loaded" in console, console[-2000:]
    print(f"\n[webui] {webui.name} {name}: {note}")


def test_w_outside_the_students_range_is_reported(webui):
    out, calls = webui.generate("TeEFusion", w=12.0, prompt=_with(STUDENT))
    assert calls["rows"] == [1] * STEPS
    assert f"'{STUDENT}'" in _note(out) and "2 to 8" in _note(out), _note(out)
    assert "CFG distill: TeEFusion" in _params(out)  # a note, not a refusal: the user may mean it

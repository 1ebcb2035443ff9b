"""cfg-distill in the REAL AUTOMATIC1111 1.10.1 and Forge servers, driven over HTTP.

Every test runs against both webuis (the `webui` fixture, conftest.py). UNet rows are counted by
the test-only count-unet extension; a table of rows per step per host / mode / sampler is written to
test-artifacts/webui_rows.json.
"""
from __future__ import annotations

import json
import os
import threading

import pytest

from webui_server import ROOT, image_array, png_bytes

pytestmark = pytest.mark.webui

ROWS_TABLE = os.path.join(ROOT, "test-artifacts", "webui_rows.json")


def _record(webui, mode, sampler, calls, steps):
    rows = calls["rows"]
    entry = {"host": webui.name, "mode": mode, "sampler": sampler, "steps": steps, "calls": len(rows),
             "rows_per_step": sum(rows) / steps}
    os.makedirs(os.path.dirname(ROWS_TABLE), exist_ok=True)
    table = []
    if os.path.exists(ROWS_TABLE):
        with open(ROWS_TABLE) as f:
            table = [e for e in json.load(f) if (e["host"], e["mode"], e["sampler"]) != (webui.name, mode, sampler)]
    table.append(entry)
    with open(ROWS_TABLE, "w") as f:
        json.dump(table, f, indent=1)
    return entry


def _off_rows(webui) -> int:
    """Rows per step of the stock webui at CFG 1 (A1111 never skips the negative; Forge does)."""
    return 1 if webui.forge else 2


def _params(out) -> str:
    return out["info_dict"]["infotexts"][0]


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_one_row_per_step_at_cfg1(webui, sampler):
    steps = 4
    for mode in ("Off", "DICE", "TeEFusion"):
        out, calls = webui.generate(mode, steps=steps, sampler_name=sampler)
        entry = _record(webui, mode, sampler, calls, steps)
        expected = _off_rows(webui) if mode == "Off" else 1
        assert calls["rows"] == [expected] * steps, (mode, entry)
        if mode != "Off":
            assert f"CFG distill: {mode}" in _params(out)
            assert "CFG distill note" not in _params(out)
            assert "Skip Early CFG" not in _params(out)  # our transient override is not the user's setting


def test_mode_off_is_byte_identical_to_no_extension(webui):
    plain, _ = webui.generate(None)
    off, _ = webui.generate("Off")
    assert png_bytes(off["images"][0]) == png_bytes(plain["images"][0])
    dice, _ = webui.generate("DICE")
    assert png_bytes(dice["images"][0]) != png_bytes(plain["images"][0])  # the refiner does change the image
    assert "CFG distill" not in _params(off)


def test_infotext_round_trip_png_info_and_paste(webui):
    out, _ = webui.generate("DICE", strength=0.75)
    text = _params(out)
    assert "DICE refiner: tiny_sd15" in text and "DICE strength: 0.75" in text and "DICE refiner hash:" in text
    info = webui.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + out["images"][0]}).json()
    assert info["parameters"]["CFG distill"] == "DICE"
    assert info["parameters"]["DICE refiner"] == "tiny_sd15"
    pasted = webui.post("/count-unet/paste", {"infotext": info["info"]}).json()
    assert pasted["paste_field_names_are_keys"]  # "send to txt2img / img2img" copies our fields
    assert pasted["_paste_mode"]["value"] == "DICE"
    assert pasted["_paste_refiner"]["value"] == "tiny_sd15.safetensors"
    assert "tiny_sd15.safetensors" in pasted["_paste_refiner"]["choices"]
    assert float(pasted["DICE strength"]["value"]) == 0.75
    # An infotext made without cfg-distill sets the mode back to Off and leaves the rest.
    plain, _ = webui.generate(None)
    pasted = webui.post("/count-unet/paste", {"infotext": _params(plain)}).json()
    assert pasted["_paste_mode"]["value"] == "Off"
    assert "value" not in pasted["_paste_refiner"]


def test_paste_fills_a_refiner_dropdown_that_was_empty_at_start(webui):
    folder = os.path.join(webui.data, "models", "dice_refiners")
    text = ("a red circle\nSteps: 4, Sampler: Euler, CFG scale: 1, Seed: 1, Size: 64x64, "
            "CFG distill: DICE, DICE refiner: tiny_sd15, DICE strength: 1.0")
    # The tab is built while the refiner folder is empty; the refiner appears before the paste.
    pasted = webui.post("/count-unet/paste", {"infotext": text, "hide_folder": folder}).json()
    assert pasted["_paste_refiner"]["start_value"] is None
    assert pasted["_paste_refiner"]["value"] == "tiny_sd15.safetensors"
    assert "tiny_sd15.safetensors" in pasted["_paste_refiner"]["choices"]


def test_skip_early_cond_restored_after_success_and_failure(webui):
    webui.post("/sdapi/v1/options", {"skip_early_cond": 0.25})
    try:
        out, calls = webui.generate("DICE")
        assert calls["rows"] == [1] * 4
        assert webui.options()["skip_early_cond"] == 0.25
        assert webui.saved_config()["skip_early_cond"] == 0.25
        webui.post("/count-unet/fail-next")
        r = webui.post("/sdapi/v1/txt2img", {
            "prompt": "x", "steps": 4, "cfg_scale": 1, "width": 64, "height": 64, "sampler_name": "Euler",
            "alwayson_scripts": {"cfg distill (dice / teefusion)": {"args": ["DICE", "tiny_sd15.safetensors", 1, True, 1]}}},
            ok=False)
        assert r.status_code != 200, "the requested UNet failure did not fail the generation"
        assert webui.options()["skip_early_cond"] == 0.25
        assert webui.saved_config()["skip_early_cond"] == 0.25
    finally:
        webui.post("/sdapi/v1/options", {"skip_early_cond": 0.0})


def test_a_settings_save_where_the_host_reads_the_option_never_holds_ours(webui):
    """A save (opts.save, what the settings page and /sdapi/v1/options do) at the exact moment the
    host reads opts.skip_early_cond: A1111 reads our 1.0 there, config.json gets the user's value."""
    for user in (0.25, 0.0):
        webui.post("/sdapi/v1/options", {"skip_early_cond": user})
        webui.post("/count-unet/save-in-step", {"on": True})
        try:
            _, calls = webui.generate("DICE", steps=3)
        finally:
            webui.post("/count-unet/save-in-step", {"on": False})
        assert calls["rows"] == [1] * 3
        reads = [read for read, _ in calls["saves"]]
        # A1111 reads ours (the callback runs in the window); Forge skips by itself: nothing is set.
        assert reads == ([user] * 3 if webui.forge else [1.0] * 3), calls["saves"]
        assert [saved for _, saved in calls["saves"]] == [user] * 3, calls["saves"]
        assert webui.saved_config()["skip_early_cond"] == user
        assert webui.options()["skip_early_cond"] == user


def test_settings_saved_during_runs_never_hold_the_override(webui):
    """Settings saves from another thread (POST /sdapi/v1/options writes all of opts.data to
    config.json) in a bounded loop while DICE runs one after another."""
    seen = []
    done = threading.Event()

    def saver():
        for i in range(2000):  # bounded
            if done.is_set():
                break
            webui.post("/sdapi/v1/options", {"samples_format": "png" if i % 2 else "jpg"})
            seen.append(webui.saved_config().get("skip_early_cond", 0.0))

    webui.post("/sdapi/v1/options", {"skip_early_cond": 0.0})
    t = threading.Thread(target=saver)
    t.start()
    try:
        rows = [webui.generate("DICE", steps=12, seed=s)[1]["rows"] for s in range(3)]
    finally:
        done.set()
        t.join()
        webui.post("/sdapi/v1/options", {"samples_format": "png"})
    assert rows == [[1] * 12] * 3
    assert seen and all(v == 0.0 for v in seen), seen
    assert webui.options()["skip_early_cond"] == 0.0 and webui.saved_config()["skip_early_cond"] == 0.0


@pytest.mark.parametrize("refiner, says", [
    ("missing.safetensors", "missing"),
    ("tiny_sdxl.safetensors", "2048"),
    ("corrupt.safetensors", "corrupt"),
])
def test_bad_input_generates_without_the_mode_and_says_so(webui, refiner, says):
    plain, _ = webui.generate(None)
    out, calls = webui.generate("DICE", refiner=refiner)
    assert calls["rows"] == [_off_rows(webui)] * 4
    # The same pixels as without the extension (the PNG differs: its infotext carries the note).
    assert (image_array(out["images"][0]) == image_array(plain["images"][0])).all()
    note = out["info_dict"]["extra_generation_params"].get("CFG distill note", "")
    assert "without DICE" in note and says in note, note
    assert "CFG distill note" in _params(out)


def test_batch_prompt_editing_and_hires(webui):
    out, calls = webui.generate("DICE", batch_size=2)
    assert calls["rows"] == [2] * 4 and len(out["images"]) == 2
    out, calls = webui.generate("TeEFusion", prompt="[a red circle:a blue square:0.5] on grey")
    assert calls["rows"] == [1] * 4
    # Forge's API leaves hr_additional_modules None, which its hires pass cannot read: send its default.
    forge_hr = {"hr_additional_modules": ["Use same choices"]} if webui.forge else {}
    out, calls = webui.generate("DICE", enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_second_pass_steps=2,
                                denoising_strength=0.6, **forge_hr)
    assert calls["rows"] == [1] * 6, calls
    assert out["info_dict"]["width"] == 96 or "Hires" in _params(out)


def test_and_prompts(webui):
    # Weights summing to 1: exact at CFG 1 (one row per subprompt, no negative row).
    out, calls = webui.generate("DICE", prompt="a red circle :0.5 AND a blue square :0.5")
    assert calls["rows"] == [2] * 4 and "CFG distill: DICE" in _params(out)
    # Default weights (1 + 1): refused, with the reason in the response; the webui's own CFG path.
    out, calls = webui.generate("DICE", prompt="a red circle AND a blue square")
    note = out["info_dict"]["extra_generation_params"].get("CFG distill note", "")
    assert "sum to 1" in note and "without DICE" in note
    assert "CFG distill: DICE" not in _params(out)


def test_img2img_and_inpainting(webui):
    base, _ = webui.generate(None)
    init = "data:image/png;base64," + base["images"][0]
    out, calls = webui.generate("DICE", img2img=True, init_images=[init], denoising_strength=0.75, steps=4)
    assert calls["rows"] and set(calls["rows"]) == {1}, calls
    # An inpainting checkpoint (9 input channels): A1111 passed the untrimmed image conditioning.
    import numpy as np
    from PIL import Image
    import io, base64
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    out, calls = webui.generate("DICE", img2img=True, init_images=[init], mask="data:image/png;base64," +
                                base64.b64encode(buf.getvalue()).decode(), denoising_strength=0.75, steps=4,
                                override_settings={"sd_model_checkpoint": "tiny-inpainting"},
                                override_settings_restore_afterwards=True)
    assert calls["rows"] and set(calls["rows"]) == {1}, calls
    assert all(c == 9 for _, c in calls["shapes"]), calls["shapes"]
    assert "CFG distill: DICE" in _params(out)
    assert image_array(out["images"][0]).shape[:2] == (64, 64)


SAMPLER_TABLE = os.path.join(ROOT, "test-artifacts", "webui_samplers.json")


def _sampler_steps(sampler: str) -> int:
    """Two steps, the fewest that show a second step; UniPC needs more steps than its order (3 by
    default: 'UniPC order must be < sampling steps', the host's own assertion)."""
    return 4 if sampler == "UniPC" else 2


def test_every_listed_sampler_one_row_per_call_or_refused(webui):
    """Every sampler the host lists (/sdapi/v1/samplers), DICE and TeEFusion at CFG 1, two steps:
    every UNet call of the run has one row (batch 1), or the mode is refused with a note naming the
    sampler (then the run is the host's own). The outcome per sampler goes to test-artifacts."""
    samplers = [s["name"] for s in webui.get("/sdapi/v1/samplers")]
    assert len(samplers) >= 10, samplers
    table, problems = {}, []
    for sampler in samplers:
        for mode in ("DICE", "TeEFusion"):
            try:
                out, calls = webui.generate(mode, steps=_sampler_steps(sampler), sampler_name=sampler)
            except AssertionError as e:  # an HTTP error of the host: recorded, reported below
                table[f"{sampler}|{mode}"] = {"error": str(e)[:300]}
                problems.append((sampler, mode, "HTTP error"))
                continue
            note = out["info_dict"]["extra_generation_params"].get("CFG distill note", "")
            applied = f"CFG distill: {mode}" in _params(out)
            rows = calls["rows"]
            table[f"{sampler}|{mode}"] = {"steps": _sampler_steps(sampler), "calls": len(rows),
                                          "rows": sorted(set(rows)), "applied": applied, "note": note}
            if applied and (not rows or set(rows) != {1}):
                problems.append((sampler, mode, rows))
            if not applied and sampler not in note:
                problems.append((sampler, mode, f"not applied, and the note does not name it: {note!r}"))
    os.makedirs(os.path.dirname(SAMPLER_TABLE), exist_ok=True)
    everything = {}
    if os.path.exists(SAMPLER_TABLE):
        with open(SAMPLER_TABLE) as f:
            everything = json.load(f)
    everything[webui.name] = table
    with open(SAMPLER_TABLE, "w") as f:
        json.dump(everything, f, indent=1)
    assert not problems, problems

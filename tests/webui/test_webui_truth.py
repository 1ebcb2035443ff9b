"""The image tells the truth (issue 26), on the REAL A1111 1.10.1 and Forge servers.

- Pasting an image's parameters reproduces it: generate, take the API `info`, parse it as paste does
  (the host's own parser through /sdapi/v1/png-info for the generation fields, the webui's own paste
  function on our script's fields through count-unet), generate again, compare pixels. For every
  mode and every refusal; a refused mode is not claimed, a mode cut short is claimed with its steps.
- Hires fix: the second pass's negative follows the host's hires schedule (prompt editing).
- Forge: a batch whose AND parts Forge would cut runs without the mode, and says so.
"""
from __future__ import annotations

import re

import pytest

from webui_server import image_array

pytestmark = pytest.mark.webui

# Larger than float32's range: the text encoder's emphasis turns "(grey:BIG)" into inf rows.
BIG = "1" + "0" * 39


def _info(out, i=0) -> str:
    return out["info_dict"]["infotexts"][i]


def _pasted(webui, image_b64: str) -> tuple[dict, list]:
    """What "PNG Info -> send to txt2img" gives for an image the API returned: the text in the PNG
    and the generation fields from the host's own parser (/sdapi/v1/png-info), our script's args from
    the webui's own paste function (count-unet; a fresh page: fields the infotext does not set keep
    the page's start value)."""
    info = webui.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + image_b64}).json()
    parsed = info["parameters"]
    fields = webui.post("/count-unet/paste", {"infotext": info["info"]}).json()

    def value(key):
        entry = fields[key]
        return entry["value"] if "value" in entry else entry["start_value"]

    args = [value("_paste_mode"), value("_paste_refiner"), value("DICE strength"), value("DICE negative as null"),
            value("_paste_w")]
    payload = dict(prompt=parsed["Prompt"], negative_prompt=parsed.get("Negative prompt", ""),
                   steps=int(parsed["Steps"]), sampler_name=parsed["Sampler"], cfg_scale=float(parsed["CFG scale"]),
                   seed=int(parsed["Seed"]), width=int(parsed["Size-1"]), height=int(parsed["Size-2"]))
    return payload, args


def _regenerate(webui, out, **extra):
    payload, args = _pasted(webui, out["images"][0])
    payload.update(extra)
    again, _ = webui.generate(*args[:1], refiner=args[1], strength=args[2], negative_as_null=args[3], w=args[4],
                              **payload)
    return again, args


CASES = {
    # name: (generate() arguments, claimed mode or None)
    "dice": (dict(mode="DICE", strength=0.75, negative_prompt="blurry"), "DICE"),
    "dice-empty-null": (dict(mode="DICE", negative_as_null=False, negative_prompt="blurry"), "DICE"),
    "teefusion": (dict(mode="TeEFusion", w=2.5, negative_prompt="blurry"), "TeEFusion"),
    "refused-missing-refiner": (dict(mode="DICE", refiner="missing.safetensors"), None),
    "refused-and-weights": (dict(mode="TeEFusion", prompt="a red circle AND a blue square"), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_paste_regenerates_the_same_pixels(webui, case):
    fields, mode = CASES[case]
    out, _ = webui.generate(**fields)
    text = _info(out)
    if mode:
        assert f"CFG distill: {mode}" in text and "CFG distill note" not in text, text
    else:
        assert "CFG distill:" not in text and "DICE refiner" not in text and "TeEFusion w" not in text, text
        assert "CFG distill note" in text, text
    again, args = _regenerate(webui, out)
    assert args[0] == (mode or "Off"), args
    assert (image_array(again["images"][0]) == image_array(out["images"][0])).all(), (case, args)


def test_a_refusal_in_the_middle_of_the_run_is_claimed_with_its_steps(webui):
    """DICE with the negative as null; the negative switches to infinite rows half-way (prompt
    editing), so DICE refuses from that step on. Forge at CFG 1 never sends the negative to the model,
    so the rest of the run is the plain image. (A1111 runs the negative pass once the mode stops, and
    infinite rows there fail the host's NaN check: not a case A1111 can sample at all.)"""
    if not webui.forge:
        pytest.skip("A1111 sends the negative to the model at the refused steps: an infinite one fails there")
    negative = f"[blurry:(grey:{BIG}):0.5]"
    out, _ = webui.generate("DICE", negative_prompt=negative, steps=4)
    text = _info(out)
    assert "CFG distill: DICE" in text and "could not be applied" in text, text
    m = re.search(r"CFG distill steps: 1-(\d) of 4", text)
    assert m and 1 <= int(m.group(1)) < 4, text
    plain, _ = webui.generate(None, negative_prompt=negative, steps=4)
    assert (image_array(out["images"][0]) != image_array(plain["images"][0])).any(), "the first steps were refined"
    again, args = _regenerate(webui, out)
    assert args[0] == "DICE"
    assert (image_array(again["images"][0]) == image_array(out["images"][0])).all()
    assert m.group(0) in _info(again)


def test_old_dice_infotext_with_teefusion_w_pastes_its_w(webui):
    text = ("a red circle\nSteps: 4, Sampler: Euler, CFG scale: 1, Seed: 1, Size: 64x64, "
            "CFG distill: DICE, DICE refiner: tiny_sd15, DICE strength: 1.0, TeEFusion w: 6.5")
    fields = webui.post("/count-unet/paste", {"infotext": text}).json()
    assert fields["_paste_mode"]["value"] == "DICE" and float(fields["_paste_w"]["value"]) == 6.5
    fields = webui.post("/count-unet/paste", {"infotext": text.replace("TeEFusion w", "DICE w")}).json()
    assert float(fields["_paste_w"]["value"]) == 6.5
    # A TeEFusion image: its own key only.
    fields = webui.post("/count-unet/paste", {"infotext": text.replace("CFG distill: DICE", "CFG distill: TeEFusion")
                                              .replace("TeEFusion w", "DICE w")}).json()
    assert "value" not in fields["_paste_w"]


def test_hires_negative_follows_the_hosts_hires_schedule(webui):
    """[blurry:ugly:0.5] is "ugly" for the whole hires pass (the hires pass counts on from the first
    pass), so it must give the same pixels as the same first pass with hires negative "ugly"."""
    hires = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_second_pass_steps=3, denoising_strength=0.6)
    if webui.forge:  # Forge's API leaves hr_additional_modules None, which its hires pass cannot read
        hires.update(hr_additional_modules=["Use same choices"], hr_cfg=1.0)
    edited, calls = webui.generate("TeEFusion", w=3.0, negative_prompt="[blurry:ugly:0.5]", **hires)
    assert len(calls["rows"]) > 4 and set(calls["rows"]) == {1}, calls  # a hires pass ran, one row per step
    explicit, _ = webui.generate("TeEFusion", w=3.0, negative_prompt="[blurry:ugly:0.5]", hr_negative_prompt="ugly",
                                 **hires)
    other, _ = webui.generate("TeEFusion", w=3.0, negative_prompt="[blurry:ugly:0.5]", hr_negative_prompt="blurry",
                              **hires)
    assert (image_array(edited["images"][0]) == image_array(explicit["images"][0])).all()
    assert (image_array(other["images"][0]) != image_array(explicit["images"][0])).any(), \
        "the hires negative does not change the image: this test could not see a wrong schedule"


def test_forge_refuses_a_batch_whose_and_parts_it_cuts(webui):
    """Prompt matrix makes one batch of "A :0.5 AND B :0.5" and "... AND grey :0" (2 and 3 AND parts,
    weights summing to 1): Forge cuts the second to 2 parts. A1111 composes each image's own parts."""
    fields = dict(prompt="a red circle :0.5 AND a blue square :0.5|AND grey :0", batch_size=2,
                  script_name="prompt matrix", script_args=[False, False, "positive", "space", 0])
    out, _ = webui.generate("DICE", negative_as_null=False, **fields)
    texts = out["info_dict"]["infotexts"]
    singles = [t for t in texts if "AND grey" in t.split("\n")[0] or t.startswith("a red circle :0.5 AND a blue square :0.5\n")]
    assert len(singles) >= 2, texts
    if webui.forge:
        for t in singles:
            assert "CFG distill:" not in t and "shortest AND count" in t, t
        plain, _ = webui.generate(None, **fields)
        assert len(plain["images"]) == len(out["images"])
        for a, b in zip(out["images"], plain["images"]):
            assert (image_array(a) == image_array(b)).all(), "a refused batch is the host's own image"
    else:
        for t in singles:
            assert "CFG distill: DICE" in t and "CFG distill note" not in t, t


def test_hires_schedule_counts_the_hires_samplers_model_calls(webui):
    """A second-order hires sampler (Heun) calls the model twice per step and the host schedules
    the hires pass over those calls: 3 hires steps are 6 calls, so [blurry:ugly:1.5] (half of the
    hires pass) and [blurry:ugly:7] (4 first-pass steps + 3) switch at the same call, and the
    images are the same. Counted as 3, they would switch at calls 1 and 3."""
    hires = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_second_pass_steps=3, denoising_strength=0.9,
                 hr_sampler_name="Heun")
    if webui.forge:
        hires.update(hr_additional_modules=["Use same choices"], hr_cfg=1.0)
    fraction, _ = webui.generate("TeEFusion", w=3.0, negative_prompt="[blurry:ugly:1.5]", **hires)
    count, _ = webui.generate("TeEFusion", w=3.0, negative_prompt="[blurry:ugly:7]", **hires)
    assert (image_array(fraction["images"][0]) == image_array(count["images"][0])).all()

"""The script's ui() built with the REAL gradio 3.41.2 (A1111, reForge, Forge-classic) inside
gr.Blocks, and its paste fields read back through real components.

gradio 3.41 pins packages the ComfyUI test venv needs newer, so it lives in its own venv,
.venv-gradio (bash tools/setup_gradio_env.sh). Run from the main venv, this file re-runs itself
there; it skips, saying why, when that venv is absent."""
import importlib.util
import os
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GRADIO_PY = os.path.join(ROOT, ".venv-gradio", "bin", "python")

if importlib.util.find_spec("gradio") is None:

    def test_ui_with_real_gradio_in_its_own_venv():
        if not os.path.exists(GRADIO_PY):
            pytest.skip("no .venv-gradio: run `bash tools/setup_gradio_env.sh` (CI does) to test the UI "
                        "with the real gradio 3.41.2")
        result = subprocess.run([GRADIO_PY, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
                                cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]

else:
    import gradio as gr

    from sdwebui import logic
    from fake_models import FakeSDXL

    def build(env, is_img2img=False, with_cfg_slider=True):
        script = env.script_module.CfgDistillScript()
        script.is_img2img = is_img2img
        tab = "img2img" if is_img2img else "txt2img"
        with gr.Blocks() as demo:
            if with_cfg_slider:  # created by the tab before the scripts' accordions
                cfg = gr.Slider(minimum=1.0, maximum=30.0, step=0.1, value=7.0, label="CFG Scale",
                                elem_id=f"{tab}_cfg_scale")
                script.after_component(cfg, elem_id=f"{tab}_cfg_scale")
            components = script.ui(is_img2img)
        return script, demo, components

    def test_gradio_is_the_webuis_version():
        assert gr.__version__ == "3.41.2"

    @pytest.mark.parametrize("is_img2img", [False, True])
    @pytest.mark.parametrize("with_cfg_slider", [True, False])
    def test_ui_builds_inside_blocks(make_webui, is_img2img, with_cfg_slider):
        env = make_webui("a1111", FakeSDXL())
        script, demo, components = build(env, is_img2img, with_cfg_slider)
        mode, refiner, strength, negative, w = components
        assert isinstance(mode, gr.Radio) and mode.value == logic.MODE_OFF
        assert isinstance(refiner, gr.Dropdown) and isinstance(negative, gr.Checkbox)
        assert isinstance(strength, gr.Slider) and isinstance(w, gr.Slider)
        choices = [c[0] if isinstance(c, (tuple, list)) else c for c in refiner.choices]
        assert choices == ["sd15-test.safetensors", "sub/sdxl-test.safetensors"]
        assert script._cfg_slider is (None if not with_cfg_slider else script._cfg_slider)
        demo.get_config_file()  # every component serialises (e.g. the dropdown value is a choice)
        assert len(demo.dependencies) == (4 if with_cfg_slider else 3)

    def test_event_helpers_return_gradio_updates(make_webui):
        env = make_webui("a1111", FakeSDXL())
        m = env.script_module
        update = m._refresh_update(gr, "gone.safetensors")
        assert update["__type__"].endswith("update") and update["value"] == "sd15-test.safetensors"
        assert update["choices"] == ["sd15-test.safetensors", "sub/sdxl-test.safetensors"]
        warn = m._warning_update(gr, logic.MODE_DICE, 7.0)
        assert warn["visible"] and "CFG scale is 7" in warn["value"]
        assert m._warning_update(gr, logic.MODE_DICE, 1.0)["visible"] is False
        assert "family sdxl" in m._describe("sub/sdxl-test.safetensors")

    def test_paste_fields_round_trip_through_real_components(make_webui):
        env = make_webui("a1111", FakeSDXL())
        script, demo, (mode, refiner, strength, negative, w) = build(env)
        runner = env.scripts.ScriptRunner([env.script_module.CfgDistillScript()])
        p = env.processing.StableDiffusionProcessingTxt2Img(
            scripts=runner, prompt="a castle", steps=1,
            script_args=[logic.MODE_DICE, "sub/sdxl-test.safetensors", 0.65, False, 1.0])
        processed = env.txt2img.txt2img_function(p)
        params = env.infotext_utils.parse_generation_parameters(processed.infotexts[0])
        values = env.infotext_utils.paste_values(script.infotext_fields, params)
        assert values == {mode: "DICE", refiner: "sub/sdxl-test.safetensors", strength: 0.65, negative: False}
        # "send to txt2img / img2img" matches paste_field_names against the infotext_fields keys
        assert set(script.paste_field_names) == {key for _, key in script.infotext_fields}

"""The "DICE Training" tab built with the REAL gradio 3.41.2 (A1111, reForge, Forge-classic): the
on_ui_tabs callback returns [(gr.Blocks, title, elem_id)], every component serialises, the events
are wired to the wrapped Train handler, and the handler's outputs fit the output components.

Like test_gradio_ui.py, run from the main venv this file re-runs itself in .venv-gradio (where
gradio 3.41 lives); it skips, saying why, when that venv is absent."""
import importlib.util
import os
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GRADIO_PY = os.path.join(ROOT, ".venv-gradio", "bin", "python")

if importlib.util.find_spec("gradio") is None:

    def test_train_tab_with_real_gradio_in_its_own_venv():
        if not os.path.exists(GRADIO_PY):
            pytest.skip("no .venv-gradio: run `bash tools/setup_gradio_env.sh` (CI does) to test the UI "
                        "with the real gradio 3.41.2")
        result = subprocess.run([GRADIO_PY, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
                                cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]

else:
    import gradio as gr
    import numpy as np

    from fake_trainable import A1111Model

    @pytest.fixture
    def env(tmp_path):
        from webui_env import load_webui, purge

        yield load_webui("a1111", A1111Model(), str(tmp_path))
        purge()

    def build(env):
        callbacks = env.script_callbacks.callback_map["callbacks_ui_tabs"]
        assert callbacks == [env.train_tab.on_ui_tabs]
        tabs = callbacks[0]()
        assert len(tabs) == 1
        return tabs[0]

    def test_on_ui_tabs_returns_a_blocks_tab(env):
        assert gr.__version__ == "3.41.2"
        blocks, title, elem_id = build(env)
        assert isinstance(blocks, gr.Blocks)
        assert (title, elem_id) == ("DICE Training", "cfg_distill_train")
        config = blocks.get_config_file()  # every component serialises
        ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
        for name in ("prompts", "name", "resume", "w", "loss", "steps", "batch", "lr", "resolution", "seed",
                     "save_every", "train", "interrupt", "progress", "plot", "status"):
            assert f"cfg_distill_train_{name}" in ids, name

    def test_events_are_wired_to_the_wrapped_handlers(env):
        blocks, _, _ = build(env)
        by_id = {id(block): block for block in blocks.blocks.values()}
        components = {getattr(b, "elem_id", None): b for b in by_id.values()}
        wired = {}
        for dep, fn in zip(blocks.dependencies, blocks.fns):
            trigger = blocks.blocks[dep["targets"][0]] if isinstance(dep["targets"][0], int) else \
                blocks.blocks[dep["targets"][0][0]]
            wired[trigger.elem_id] = (fn.fn, [blocks.blocks[i] for i in dep["inputs"]],
                                      [blocks.blocks[i] for i in dep["outputs"]])
        fn, inputs, outputs = wired["cfg_distill_train_train"]
        assert fn is env.train_tab.train_click
        assert [c.elem_id.replace("cfg_distill_train_", "") for c in inputs] == [
            "prompts", "w", "steps", "batch", "lr", "loss", "resolution", "seed", "name", "save_every", "resume",
            "negatives", "negative_share", "grad_accum", "w_min", "w_max"]
        assert outputs == [components["cfg_distill_train_plot"], components["cfg_distill_train_status"]]
        assert isinstance(outputs[1], gr.HTML), "wrap_gradio_call appends to the LAST output: it must be HTML"
        assert wired["cfg_distill_train_interrupt"][0] is env.train_tab.interrupt
        assert wired["cfg_distill_train_progress"][0] is env.train_tab.show_progress

    def test_handler_outputs_fit_the_components(env):
        """The UI's default values go through the handler (a bad name, so nothing trains) and the
        outputs post-process through the real components."""
        blocks, _, _ = build(env)
        components = {getattr(b, "elem_id", None): b for b in blocks.blocks.values()}
        values = [components[f"cfg_distill_train_{n}"].value for n in
                  ("prompts", "w", "steps", "batch", "lr", "loss", "resolution", "seed", "name", "save_every",
                   "resume", "negatives", "negative_share", "grad_accum", "w_min", "w_max")]
        # The defaults every front door shares (cfg_distill.request): lr 5e-4 x grad_accum 4, as the node's.
        assert values[1:] == [5.0, 2000, 4, 5e-4, "l2", 512, 0, "my_dice_refiner", 200, False, "", 0.5, 4, 0.0, 0.0]
        values[8] = "bad/name"
        image, status = env.train_tab.train_click(*values)
        assert "not a plain file name" in status
        assert components["cfg_distill_train_plot"].postprocess(image).startswith("data:image/png;base64,")
        env.train_tab.interrupt()
        assert env.shared.state.interrupted
        image, status = env.train_tab.show_progress()
        assert isinstance(image, np.ndarray) and "not a plain file name" in status

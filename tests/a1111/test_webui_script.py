"""The A1111 / Forge script against the webui stand-ins: what the model sees each step, AND rows,
Forge's missing negative at CFG 1, skip_early_cond restore paths, infotext, warnings.

Why stand-ins still, next to the real servers of tests/webui/: these check what the real servers
cannot show here. (1) SDXL dict conditioning: no tiny SDXL checkpoint loads in the real webuis yet
(see the issue 13 report). (2) The exact tensors the model sees per row (refined AND rows per image
with their own negatives, Forge's self-encoded negative, prompt-editing schedules): the real tests
count rows and compare images, but cannot read the conditioning tensors of a step. (3) Interrupt
and the option-restore state machine at chosen steps. Rows per step, mode Off, infotext / paste,
bad inputs, skip_early_cond, hires, img2img, inpainting and AND-prompts run on the real servers."""
import gc

import pytest
import torch

from cfg_distill import fuse_tokens, load_refiner, refine_tokens
from sdwebui import logic
from fake_models import FakeSD1, FakeSDXL

SD15 = "sd15-test.safetensors"
SDXL = "sub/sdxl-test.safetensors"


def dice(refiner=SD15, strength=1.0, negative=True):
    return [logic.MODE_DICE, refiner, strength, negative, 1.0]


def tee(w=2.0):
    return [logic.MODE_TEEFUSION, None, 1.0, True, w]


OFF = [logic.MODE_OFF, None, 1.0, True, 1.0]


def generate(env, args, kind="txt2img", **kwargs):
    script = env.script_module.CfgDistillScript()
    runner = env.scripts.ScriptRunner([script])
    cls = {"txt2img": env.processing.StableDiffusionProcessingTxt2Img,
           "img2img": env.processing.StableDiffusionProcessingImg2Img}[kind]
    p = cls(scripts=runner, script_args=list(args), **kwargs)
    processed = env.txt2img.txt2img_function(p)
    return p, processed


def refiner(refiners_dir, name):
    return load_refiner(str(refiners_dir / name))


def neg(model, text):
    """How the host encodes a negative prompt (batch of one)."""
    from modules.prompt_parser import SdConditioning
    return model.get_learned_conditioning(SdConditioning([text], is_negative_prompt=True, width=64, height=64))


def pos(model, text, width=64, height=64):
    from modules.prompt_parser import SdConditioning
    return model.get_learned_conditioning(SdConditioning([text], width=width, height=height))


# ---------------------------------------------------------------------------------------------
# What the model sees

def test_sd1_dice_refines_exactly_as_the_core_one_pass_per_step(make_webui, refiners_dir):
    model = FakeSD1()
    env = make_webui("a1111", model)
    p, processed = generate(env, dice(strength=0.8), prompt="a red fox", negative_prompt="", steps=4)

    c, empty = pos(model, "a red fox"), pos(model, "")
    expected = refine_tokens(refiner(refiners_dir, SD15), c, empty, 0.8)
    calls = model.inner_model.calls
    assert len(calls) == 4, "one model call per step"
    for call in calls:
        assert call["rows"] == 1, "the negative pass is skipped at CFG 1 (skip_early_cond)"
        assert torch.equal(call["tokens"], expected)
    assert not env.errors.reported


def test_sd1_dice_uses_the_negative_prompt_when_asked(make_webui, refiners_dir):
    model = FakeSD1()
    env = make_webui("a1111", model)
    loaded = refiner(refiners_dir, SD15)

    generate(env, dice(negative=True), prompt="a red fox", negative_prompt="blurry", steps=2)
    with_negative = refine_tokens(loaded, pos(model, "a red fox"), neg(model, "blurry"), 1.0)
    assert all(torch.equal(call["tokens"], with_negative) for call in model.inner_model.calls)

    model.inner_model.calls.clear()
    generate(env, dice(negative=False), prompt="a red fox", negative_prompt="blurry", steps=2)
    with_empty = refine_tokens(loaded, pos(model, "a red fox"), pos(model, ""), 1.0)
    assert all(torch.equal(call["tokens"], with_empty) for call in model.inner_model.calls)


def test_sdxl_dice_refines_crossattn_only_and_uses_a_real_empty_encoding(make_webui, refiners_dir):
    model = FakeSDXL()
    env = make_webui("a1111", model)
    p, _ = generate(env, dice(SDXL), prompt="a castle", negative_prompt="", steps=3)

    c = pos(model, "a castle")
    # The host zeroes an empty SDXL negative; DICE was trained on the real encoding of "".
    expected = refine_tokens(refiner(refiners_dir, SDXL), c["crossattn"], pos(model, "")["crossattn"], 1.0)
    for call in model.inner_model.calls:
        assert call["rows"] == 1
        assert torch.equal(call["tokens"], expected)
        assert torch.equal(call["vector"], c["vector"]), "pooled and size embeddings untouched"
    assert not env.errors.reported  # the denoiser read .shape of the dict we returned


def test_sdxl_teefusion_fuses_tokens_and_pooled_but_not_size_embeddings(make_webui):
    model = FakeSDXL()
    env = make_webui("a1111", model)
    generate(env, tee(w=3.0), prompt="a castle", negative_prompt="fog", steps=2)

    c, n = pos(model, "a castle"), neg(model, "fog")
    tokens = fuse_tokens(c["crossattn"], n["crossattn"], 3.0)
    pooled = fuse_tokens(c["vector"][:, :1280], n["vector"][:, :1280], 3.0)
    for call in model.inner_model.calls:
        assert torch.equal(call["tokens"], tokens)
        assert torch.equal(call["vector"][:, :1280], pooled)
        assert torch.equal(call["vector"][:, 1280:], c["vector"][:, 1280:])


def test_and_rows_are_refined_with_their_own_images_negative(make_webui, refiners_dir):
    model = FakeSD1()
    env = make_webui("a1111", model)
    prompts = ["a cat:0.5 AND a hat:0.5", "a dog:0.25 AND a ball:0.25 AND grass:0.5"]  # weights sum to 1
    generate(env, dice(), prompt=prompts, negative_prompt=["blurry", "dark"], batch_size=2, steps=2)

    loaded = refiner(refiners_dir, SD15)
    # the host keeps the space after "AND" in the subprompt's text
    rows = [pos(model, t) for t in ("a cat", " a hat", "a dog", " a ball", " grass")]
    image0 = refine_tokens(loaded, torch.cat(rows[:2]), neg(model, "blurry"), 1.0)
    image1 = refine_tokens(loaded, torch.cat(rows[2:]), neg(model, "dark"), 1.0)
    expected = torch.cat([image0, image1])
    for call in model.inner_model.calls:
        assert call["rows"] == 5, "one row per AND-subprompt, no negative rows"
        assert torch.equal(call["tokens"], expected)


def test_and_rows_with_a_shared_negative_are_refined_in_one_call(make_webui, refiners_dir):
    model = FakeSD1()
    env = make_webui("a1111", model)
    generate(env, dice(), prompt="a cat:0.5 AND a hat:0.5", negative_prompt="blurry", batch_size=2, steps=1)
    rows = torch.cat([pos(model, "a cat"), pos(model, " a hat")] * 2)
    expected = refine_tokens(refiner(refiners_dir, SD15), rows, neg(model, "blurry"), 1.0)
    assert torch.equal(model.inner_model.calls[0]["tokens"], expected)


def test_prompt_editing_refines_each_steps_conditioning(make_webui, refiners_dir):
    model = FakeSD1()
    env = make_webui("a1111", model)
    p, _ = generate(env, dice(), prompt="a [cat:dog:2] on grass", negative_prompt="", steps=4)

    loaded, empty = refiner(refiners_dir, SD15), pos(model, "")
    before = refine_tokens(loaded, pos(model, "a cat on grass"), empty, 1.0)
    after = refine_tokens(loaded, pos(model, "a dog on grass"), empty, 1.0)
    seen = [call["tokens"] for call in model.inner_model.calls]
    assert [torch.equal(s, before) for s in seen] == [True, True, True, False]
    assert torch.equal(seen[3], after)


def test_hires_fix_pass_is_refined_too(make_webui, refiners_dir):
    model = FakeSD1()
    env = make_webui("a1111", model)
    generate(env, dice(), prompt="a red fox", negative_prompt="", steps=2, enable_hr=True, hr_second_pass_steps=3)
    expected = refine_tokens(refiner(refiners_dir, SD15), pos(model, "a red fox"), pos(model, ""), 1.0)
    calls = model.inner_model.calls
    assert len(calls) == 5 and all(c["rows"] == 1 for c in calls)
    assert all(torch.equal(c["tokens"], expected) for c in calls)


def test_img2img_is_refined(make_webui, refiners_dir):
    model = FakeSD1()
    env = make_webui("a1111", model)
    generate(env, dice(), kind="img2img", prompt="a red fox", negative_prompt="", steps=4,
             init_latent=torch.zeros(1, 4, 8, 8), denoising_strength=0.5)
    expected = refine_tokens(refiner(refiners_dir, SD15), pos(model, "a red fox"), pos(model, ""), 1.0)
    assert len(model.inner_model.calls) == 2
    assert all(torch.equal(c["tokens"], expected) for c in model.inner_model.calls)


def test_the_hosts_cond_caches_are_never_modified(make_webui):
    model = FakeSD1()
    env = make_webui("a1111", model)
    p, _ = generate(env, dice(), prompt="a red fox", negative_prompt="blurry", steps=2)
    cached_c = env.processing.StableDiffusionProcessing.cached_c[1]
    cached_uc = env.processing.StableDiffusionProcessing.cached_uc[1]
    assert torch.equal(cached_c.batch[0][0].schedules[0].cond, pos(model, "a red fox")[0])
    assert torch.equal(cached_uc[0][0].cond, neg(model, "blurry")[0])


# ---------------------------------------------------------------------------------------------
# Forge: the negative is never encoded at CFG 1

def test_forge_teefusion_encodes_the_negative_itself_at_cfg_1(make_webui):
    model = FakeSD1()
    env = make_webui("forge", model)
    seen_uncond = []
    env.script_callbacks.on_cfg_denoiser(lambda params: seen_uncond.append(params.text_uncond))
    generate(env, tee(w=2.0), prompt="a red fox", negative_prompt="ugly", steps=3)

    assert seen_uncond == [None, None, None], "Forge gives no negative at CFG 1"
    assert (("ugly",), True) in model.encode_calls, "encoded by the script as a negative prompt"
    assert model.events.index(("encode", ("ugly",), True)) < model.events.index("unet"), \
        "encoded before sampling starts (process_before_every_sampling), not between UNet steps"
    expected = fuse_tokens(pos(model, "a red fox"), neg(model, "ugly"), 2.0)
    calls = model.inner_model.calls
    assert len(calls) == 3 and all(c["rows"] == 1 for c in calls), "Forge skips the pass by itself"
    assert all(torch.equal(c["tokens"], expected) for c in calls)
    assert "skip_early_cond" not in env.shared.opts.data, "never touched on Forge"


def test_forge_dice_with_a_negative_and_and_rows(make_webui, refiners_dir):
    model = FakeSDXL()
    env = make_webui("forge", model)
    generate(env, dice(SDXL), prompt="a cat:0.5 AND a hat:0.5", negative_prompt="blurry", steps=2)
    encodings = sum(1 for texts, negative in model.encode_calls if texts == ("blurry",) and negative)
    assert encodings == 1, "encoded once per run, not per step"
    rows = torch.cat([pos(model, "a cat")["crossattn"], pos(model, " a hat")["crossattn"]])
    expected = refine_tokens(refiner(refiners_dir, SDXL), rows, neg(model, "blurry")["crossattn"], 1.0)
    assert all(torch.equal(c["tokens"], expected) for c in model.inner_model.calls)


def test_forge_hires_pass_at_cfg_1_encodes_the_hires_negative(make_webui):
    model = FakeSD1()
    env = make_webui("forge", model)
    generate(env, tee(w=1.5), prompt="a red fox", negative_prompt="ugly", steps=2,
             enable_hr=True, hr_cfg=1.0, hr_negative_prompt="grainy")
    calls = model.inner_model.calls
    assert len(calls) == 4
    hires_encode = model.events.index(("encode", ("grainy",), True))
    assert [e for e in model.events[:hires_encode] if e == "unet"] == ["unet", "unet"], \
        "the hires negative is encoded between the passes"
    first = fuse_tokens(pos(model, "a red fox"), neg(model, "ugly"), 1.5)
    second = fuse_tokens(pos(model, "a red fox"), neg(model, "grainy"), 1.5)
    assert all(torch.equal(c["tokens"], first) for c in calls[:2])
    assert all(torch.equal(c["tokens"], second) for c in calls[2:])


# ---------------------------------------------------------------------------------------------
# skip_early_cond: held at 1.0 during the run, the user's value put back on every path

def test_skip_early_cond_restored_after_success(make_webui):
    env = make_webui("a1111", FakeSD1())
    opts = env.shared.opts
    opts.data["skip_early_cond"] = 0.3
    during = []
    env.script_callbacks.on_cfg_denoiser(lambda params: during.append(opts.skip_early_cond))
    p, processed = generate(env, dice(), prompt="a fox", steps=2)
    assert during == [1.0, 1.0]
    assert opts.data["skip_early_cond"] == 0.3

    del opts.data["skip_early_cond"]  # a user who never touched the option
    generate(env, dice(), prompt="a fox", steps=2)
    assert "skip_early_cond" not in opts.data, "not written into the user's settings"


def test_a_settings_save_at_the_moment_the_host_reads_the_option_never_holds_ours(make_webui):
    """A callback after ours runs exactly where the host then reads opts.skip_early_cond: the host
    sees 1.0 there, and a settings save at that moment (Options.save dumps opts.data) does not."""
    import json
    env = make_webui("a1111", FakeSD1())
    opts = env.shared.opts
    for user in (0.25, None):  # a value the user set, and a user who never touched the option
        if user is None:
            opts.data.pop("skip_early_cond", None)
        else:
            opts.data["skip_early_cond"] = user
        read, saved = [], []

        def save_now(params):
            read.append(opts.skip_early_cond)
            saved.append(json.loads(json.dumps(opts.data)))

        env.script_callbacks.on_cfg_denoiser(save_now)
        generate(env, dice(), prompt="a fox", steps=3)
        env.script_callbacks.callback_map["callbacks_cfg_denoiser"].pop()
        assert read == [1.0] * 3, "the save really happened while the host reads our value"
        expected = {} if user is None else {"skip_early_cond": user}
        assert all({k: v for k, v in s.items() if k == "skip_early_cond"} == expected for s in saved), saved
        assert env.shared.sd_model.inner_model.calls[-1]["rows"] == 1
        assert "skip_early_cond" not in vars(opts), "nothing left on the options object"


def test_a_settings_change_during_the_run_is_kept_as_made(make_webui):
    env = make_webui("a1111", FakeSD1())
    opts = env.shared.opts
    opts.data["skip_early_cond"] = 0.25

    def settings_page(params):
        if params.denoiser.step == 1:
            opts.skip_early_cond = 0.6  # Options.__setattr__, as the settings page / API does

    env.script_callbacks.on_cfg_denoiser(settings_page)
    generate(env, dice(), prompt="a fox", steps=3)
    assert all(c["rows"] == 1 for c in env.shared.sd_model.inner_model.calls)
    assert opts.data["skip_early_cond"] == 0.6 and opts.skip_early_cond == 0.6


def test_settings_dumped_from_another_thread_during_runs_never_hold_ours(make_webui):
    import json
    import sys
    import threading
    env = make_webui("a1111", FakeSD1())
    opts = env.shared.opts
    opts.data["skip_early_cond"] = 0.0
    seen, done = set(), threading.Event()

    def saver():
        for _ in range(200000):  # bounded
            if done.is_set():
                break
            seen.add(json.loads(json.dumps(opts.data)).get("skip_early_cond"))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    t = threading.Thread(target=saver)
    t.start()
    try:
        for _ in range(20):
            generate(env, dice(), prompt="a fox", steps=8)
    finally:
        done.set()
        t.join()
        sys.setswitchinterval(interval)
    assert seen == {0.0}, seen


def test_more_model_calls_than_the_host_counts_steps_still_one_row_each(make_webui, monkeypatch):
    """DPM adaptive calls the model any number of times while the host's total_steps is the step
    count; the host skips while step / total_steps <= the option, so 1.0 would stop skipping."""
    env = make_webui("a1111", FakeSD1())
    opts = env.shared.opts
    opts.data["skip_early_cond"] = 0.25
    launch = env.processing.Sampler.launch_sampling

    def adaptive(self, steps, func):
        def run():
            self.model_wrap_cfg.total_steps = 2  # 8 calls against a count of 2
            return func()
        return launch(self, steps, run)

    monkeypatch.setattr(env.processing.Sampler, "launch_sampling", adaptive)
    p, processed = generate(env, dice(), prompt="a fox", steps=8)
    assert [c["rows"] for c in env.shared.sd_model.inner_model.calls] == [1] * 8
    assert opts.data["skip_early_cond"] == 0.25 and "skip_early_cond" not in vars(opts)
    assert "Skip Early CFG" not in processed.infotexts[0]


def test_a_cfgpp_sampler_on_reforge_is_refused_naming_it(make_webui, tmp_path, monkeypatch):
    """reForge (its backend is ldm_patched) runs the negative pass at CFG 1 for CFG++ samplers."""
    (tmp_path / "ldm_patched").mkdir()
    (tmp_path / "ldm_patched" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    env = make_webui("forge", FakeSD1())
    p, processed = generate(env, dice(), prompt="a fox", steps=2, sampler_name="Euler CFG++")
    note = p.extra_generation_params.get("CFG distill note", "")
    assert "'Euler CFG++'" in note and "without DICE" in note, note
    assert "CFG distill: DICE" not in processed.infotexts[0]
    p, processed = generate(env, dice(), prompt="a fox", steps=2, sampler_name="Euler")
    assert "CFG distill: DICE" in processed.infotexts[0]


def test_skip_early_cond_kept_out_of_the_infotext(make_webui):
    env = make_webui("a1111", FakeSD1())
    p, processed = generate(env, dice(), prompt="a fox", steps=2)
    assert "Skip Early CFG" not in processed.infotexts[0]
    assert "CFG distill: DICE" in processed.infotexts[0]


def test_skip_early_cond_is_back_before_the_model_runs_so_a_failure_cannot_leave_it(make_webui):
    model = FakeSD1()
    env = make_webui("a1111", model)
    opts = env.shared.opts
    opts.data["skip_early_cond"] = 0.25
    model.inner_model.fail_at_call = 1
    script = env.script_module.CfgDistillScript()
    p = env.processing.StableDiffusionProcessingTxt2Img(
        scripts=env.scripts.ScriptRunner([script]), script_args=dice(), prompt="a fox", steps=3)
    with pytest.raises(RuntimeError, match="simulated failure"):
        env.txt2img.txt2img_function(p)
    assert opts.data["skip_early_cond"] == 0.25, "held only until the host read it, never across the model call"


def test_skip_early_cond_restored_by_the_next_run_when_the_failed_p_lives_on(make_webui):
    model = FakeSD1()
    env = make_webui("a1111", model)
    opts = env.shared.opts
    opts.data["skip_early_cond"] = 0.25
    model.inner_model.fail_at_call = 1
    script = env.script_module.CfgDistillScript()
    failed = env.processing.StableDiffusionProcessingTxt2Img(
        scripts=env.scripts.ScriptRunner([script]), script_args=dice(), prompt="a fox", steps=3)
    with pytest.raises(RuntimeError):
        env.txt2img.txt2img_function(failed)

    model.inner_model.fail_at_call = None
    model.inner_model.calls.clear()
    seen = []
    env.script_callbacks.on_cfg_denoiser(lambda params: seen.append(opts.skip_early_cond))
    # The next generation has cfg-distill off and overrides the option itself (XYZ plot style):
    p, _ = generate(env, OFF, prompt="a fox", steps=2, cfg_scale=7.0,
                    override_settings={"skip_early_cond": 0.5})
    assert seen == [0.5, 0.5]
    assert opts.data["skip_early_cond"] == 0.25, "the user's value, not ours, was saved and restored"
    del failed
    gc.collect()
    assert opts.data["skip_early_cond"] == 0.25, "the old run's late safety net changes nothing"


def test_skip_early_cond_restored_after_an_interrupt(make_webui):
    env = make_webui("a1111", FakeSD1())
    opts = env.shared.opts
    opts.data["skip_early_cond"] = 0.4

    def interrupt(params):
        if params.denoiser.step == 1:
            env.shared.state.interrupted = True  # what the Interrupt button does

    env.script_callbacks.on_cfg_denoiser(interrupt)
    p, processed = generate(env, dice(), prompt="a fox", steps=4)
    assert len(env.shared.sd_model.inner_model.calls) == 2
    assert opts.data["skip_early_cond"] == 0.4


# ---------------------------------------------------------------------------------------------
# Infotext, warnings, state

def test_infotext_round_trip(make_webui, refiners_dir):
    env = make_webui("a1111", FakeSDXL())
    p, processed = generate(env, dice(SDXL, strength=0.75, negative=False), prompt="a castle", steps=1)
    params = env.infotext_utils.parse_generation_parameters(processed.infotexts[0])
    found = logic.parse_infotext(params)
    assert found["mode"] == logic.MODE_DICE
    assert found["refiner"] == "sdxl-test"
    assert found["refiner_hash"] == env.script_module.STORE.short_hash(SDXL)
    assert (found["strength"], found["negative_as_null"]) == (0.75, False)
    store = env.script_module.STORE
    assert logic.resolve_refiner(found["refiner"], found["refiner_hash"], store.names(), store.short_hash) == SDXL

    p, processed = generate(env, tee(w=2.5), prompt="a castle", steps=1)
    params = env.infotext_utils.parse_generation_parameters(processed.infotexts[0])
    assert logic.parse_infotext(params)["mode"] == logic.MODE_TEEFUSION
    assert logic.parse_infotext(params)["w"] == 2.5 and logic.INFO_STRENGTH not in params

    p, processed = generate(env, OFF, prompt="a castle", steps=1)
    params = env.infotext_utils.parse_generation_parameters(processed.infotexts[0])
    assert logic.parse_infotext(params)["mode"] == logic.MODE_OFF
    assert not any(k in processed.infotexts[0] for k in logic.INFOTEXT_KEYS)


def test_renamed_refiner_is_found_by_hash(make_webui, refiners_dir):
    env = make_webui("a1111", FakeSD1())
    h = env.script_module.STORE.short_hash(SD15)
    params = {logic.INFO_MODE: "DICE", logic.INFO_REFINER: "old-name", logic.INFO_REFINER_HASH: h}
    store = env.script_module.STORE
    assert logic.resolve_refiner("old-name", h, store.names(), store.short_hash) == SD15


def test_cfg_not_1_warns_and_still_refines(make_webui, refiners_dir, capsys):
    model = FakeSD1()
    env = make_webui("a1111", model)
    p, processed = generate(env, dice(), prompt="a red fox", negative_prompt="blurry", steps=2, cfg_scale=7.0)
    assert "CFG scale is 7" in processed.comments
    assert "CFG scale is 7" in capsys.readouterr().out
    expected = refine_tokens(refiner(refiners_dir, SD15), pos(model, "a red fox"), neg(model, "blurry"), 1.0)
    for call in model.inner_model.calls:
        assert call["rows"] == 2, "both passes run: the user asked for CFG"
        assert torch.equal(call["tokens"][:1], expected)
        assert torch.equal(call["tokens"][1:], neg(model, "blurry")), "the negative is not changed"
    assert "skip_early_cond" not in env.shared.opts.data


def test_callback_registered_once_and_off_means_untouched(make_webui):
    model = FakeSD1()
    env = make_webui("a1111", model)
    callbacks = env.script_callbacks.callback_map["callbacks_cfg_denoiser"]
    assert callbacks == [env.script_module._on_cfg_denoiser]
    script = env.script_module.CfgDistillScript()
    p = env.processing.StableDiffusionProcessingTxt2Img(
        scripts=env.scripts.ScriptRunner([script]), script_args=dice(), prompt="a fox", steps=1)
    env.txt2img.txt2img_function(p)
    # The same p object generated again with cfg-distill off: its old state must not apply.
    p.script_args = OFF
    model.inner_model.calls.clear()
    env.txt2img.txt2img_function(p)
    generate(env, tee(), prompt="a fox", steps=1)
    assert callbacks == [env.script_module._on_cfg_denoiser]
    assert torch.equal(model.inner_model.calls[0]["tokens"][:1], pos(model, "a fox"))


def test_configuration_errors_are_shown_and_do_not_stop_generation(make_webui):
    env = make_webui("a1111", FakeSD1())
    p, processed = generate(env, dice(refiner=""), prompt="a fox", steps=1)
    assert "no refiner is selected" in processed.comments
    assert "CFG distill: " not in processed.infotexts[0]
    assert "no refiner is selected" in processed.infotexts[0], "API users read the note in the infotext"
    assert "skip_early_cond" not in env.shared.opts.data

    p, processed = generate(env, dice(refiner=SDXL), prompt="a fox", steps=1)
    assert "2048-d" in processed.comments and "768-d" in processed.comments
    assert not env.errors.reported, "handled by the script, not dumped as a traceback by the host"


def test_a_failure_inside_the_callback_is_reported_once(make_webui):
    model = FakeSD1()
    env = make_webui("a1111", model)
    p, processed = generate(env, dice(), prompt="nan", steps=3)
    assert processed.comments.count("could not be applied") == 1
    assert "NaN" in processed.comments
    assert len(model.inner_model.calls) == 3, "generation went on"
    assert not env.errors.reported


def test_script_unload_restores_the_option(make_webui):
    env = make_webui("a1111", FakeSD1())
    opts = env.shared.opts
    opts.data["skip_early_cond"] = 0.2
    assert env.script_module.SKIP.apply(opts, object()) and opts.skip_early_cond == 1.0
    env.script_callbacks.script_unloaded_callback()
    assert opts.skip_early_cond == 0.2 and opts.data["skip_early_cond"] == 0.2
    assert "skip_early_cond" not in vars(opts)


def test_refiner_folder_from_the_command_line_flag(make_webui, refiners_dir, tmp_path):
    import argparse
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("cfg_distill_preload", os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "preload.py"))
    preload = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preload)
    parser = argparse.ArgumentParser()
    preload.preload(parser)
    args = parser.parse_args(["--dice-refiners-dir", str(refiners_dir)])

    env = make_webui("a1111", FakeSD1())
    env.shared.cmd_opts.dice_refiners_dir = args.dice_refiners_dir
    assert env.script_module.refiner_folder() == str(refiners_dir)
    assert env.script_module.STORE.names() == [SD15, SDXL]
    env.shared.cmd_opts.dice_refiners_dir = None
    assert env.script_module.refiner_folder() == os.path.join(env.paths.models_path, "dice_refiners")


# ---------------------------------------------------------------------------------------------
# The infotext says what was sampled (issue 26); pasting it back gives the same model inputs

def _pasted_args(env, infotext):
    """The script args "send to txt2img" gives for an infotext: the host's parser and our keys
    (the real servers run the webui's own paste function, tests/webui)."""
    params = env.infotext_utils.parse_generation_parameters(infotext)
    found = logic.parse_infotext(params)
    store = env.script_module.STORE
    name = logic.resolve_refiner(found["refiner"], found["refiner_hash"], store.names(), store.short_hash)
    return [found["mode"], name, found["strength"], found["negative_as_null"], found["w"]]


def _inputs(model):
    return [(c["rows"], c["tokens"]) for c in model.inner_model.calls]


def _same_inputs(a, b):
    return len(a) == len(b) and all(ra == rb and ta.shape == tb.shape and torch.allclose(ta, tb, rtol=0, atol=0, equal_nan=True)
                                    for (ra, ta), (rb, tb) in zip(a, b))


@pytest.mark.parametrize("host", ["a1111", "forge"])
@pytest.mark.parametrize("case", ["dice", "dice-negative", "teefusion", "no-refiner", "nan-first-step",
                                  "nan-mid-run"])
def test_pasted_infotext_regenerates_the_same_model_inputs(make_webui, host, case):
    model = FakeSD1()
    env = make_webui(host, model)
    args, prompt = {"dice": (dice(strength=0.7, negative=False), "a fox"),
                    "dice-negative": (dice(), "a fox"),
                    "teefusion": (tee(w=3.0), "a fox"),
                    "no-refiner": (dice(refiner=""), "a fox"),
                    "nan-first-step": (dice(), "nan"),
                    "nan-mid-run": (dice(), "[a fox:nan:0.5]")}[case]
    p, processed = generate(env, args, prompt=prompt, negative_prompt="blurry", steps=4)
    first = _inputs(model)
    text = processed.infotexts[0]
    claimed = "CFG distill: " in text
    assert claimed == (case in ("dice", "dice-negative", "teefusion", "nan-mid-run")), text
    if case == "nan-mid-run":
        refined = sum(1 for _, t in first if torch.isfinite(t[:1]).all() and not torch.equal(t[:1], pos(model, "a fox")))
        assert 0 < refined < 4
        assert f"CFG distill steps: 1-{refined} of 4" in text, text
        assert "could not be applied" in text
    else:
        assert "CFG distill steps" not in text

    model.inner_model.calls.clear()
    generate(env, _pasted_args(env, text), prompt=prompt, negative_prompt="blurry", steps=4)
    assert _same_inputs(_inputs(model), first), "the pasted parameters sample something else"


def test_a_refusal_at_the_first_step_claims_nothing_and_later_batches_neither(make_webui):
    env = make_webui("a1111", FakeSD1())
    p, processed = generate(env, dice(), prompt=["nan", "a fox"], batch_size=1, n_iter=2, steps=2)
    for text in processed.infotexts:
        assert "CFG distill: " not in text and "DICE refiner" not in text, text
        assert "could not be applied" in text


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_hires_negative_follows_the_hosts_hires_schedule(make_webui, host):
    """[blurry:ugly:0.5]: the hires pass counts on from the first pass (new scheduling), so its
    negative is "ugly" at every hires step. A1111 passes its own; Forge at hires CFG 1 passes none
    and the script encodes it with the hires pass's schedule."""
    model = FakeSD1()
    env = make_webui(host, model)
    generate(env, tee(w=2.0), prompt="a red fox", negative_prompt="[blurry:ugly:0.5]", steps=4,
             enable_hr=True, hr_second_pass_steps=3, hr_cfg=1.0)
    calls = model.inner_model.calls
    assert len(calls) == 7
    c = pos(model, "a red fox")
    blurry, ugly = fuse_tokens(c, neg(model, "blurry"), 2.0), fuse_tokens(c, neg(model, "ugly"), 2.0)
    assert any(torch.equal(call["tokens"], blurry) for call in calls[:4]), "the first pass starts on 'blurry'"
    assert all(torch.equal(call["tokens"], ugly) for call in calls[4:]), "hires: 'ugly' throughout"


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_negative_follows_old_prompt_editing_timelines(make_webui, host):
    """opts.use_old_scheduling changes the first pass too: "[blurry:ugly:1.0]" switches after step 1
    with the old timelines (N >= 1 is a step count) and never with the new ones (1.0 is the end)."""
    model = FakeSD1()
    env = make_webui(host, model)
    env.shared.opts.data["use_old_scheduling"] = True
    generate(env, tee(w=2.0), prompt="a red fox", negative_prompt="[blurry:ugly:1.0]", steps=4)
    c = pos(model, "a red fox")
    blurry, ugly = fuse_tokens(c, neg(model, "blurry"), 2.0), fuse_tokens(c, neg(model, "ugly"), 2.0)
    calls = model.inner_model.calls
    assert len(calls) == 4 and torch.equal(calls[0]["tokens"], blurry)
    assert all(torch.equal(call["tokens"], ugly) for call in calls[2:])


def test_forge_refuses_a_batch_whose_and_prompts_it_would_cut(make_webui, refiners_dir):
    model = FakeSD1()
    env = make_webui("forge", model)
    prompts = ["a cat :0.5 AND a hat :0.5", "a dog", "a cat :0.5 AND a hat :0.5", "a cow :0.5 AND a bell :0.5"]
    p, processed = generate(env, dice(negative=False), prompt=prompts, batch_size=2, n_iter=2, steps=2)
    first, second = processed.infotexts[:2], processed.infotexts[2:]
    for text in first:  # 2 and 1 AND parts: Forge cuts the first prompt to "a cat"
        assert "CFG distill: " not in text and "shortest AND count" in text, text
    for text in second:  # same count, same weights: DICE applies, and the first batch's note is gone
        assert "CFG distill: DICE" in text and "shortest AND count" not in text, text
    calls = model.inner_model.calls
    assert all(torch.equal(call["tokens"][:1], pos(model, "a cat")) for call in calls[:2]), "the host's own conds"
    assert not any(torch.equal(call["tokens"][:1], pos(model, "a cat")) for call in calls[2:]), "refined"

    # What the webui writes to params.txt right after process_batch says the same.
    model = FakeSD1()
    env = make_webui("forge", model)
    seen = []

    class Spy(env.scripts.Script):
        def show(self, is_img2img):
            return env.scripts.AlwaysVisible

        def process_batch(self, p, *args, **kwargs):
            seen.append("CFG distill" in p.extra_generation_params)

    runner = env.scripts.ScriptRunner([env.script_module.CfgDistillScript()])
    runner.add(Spy(), n_args=0)
    p = env.processing.StableDiffusionProcessingTxt2Img(scripts=runner, script_args=dice(negative=False), prompt=prompts,
                                                        batch_size=2, n_iter=2, steps=2)
    env.txt2img.txt2img_function(p)
    assert seen == [False, True]

    # A1111 composes each image's own subprompts: nothing to refuse.
    env = make_webui("a1111", FakeSD1())
    p, processed = generate(env, dice(negative=False), prompt=prompts[:2], batch_size=2, steps=2)
    assert all("CFG distill: DICE" in text for text in processed.infotexts)

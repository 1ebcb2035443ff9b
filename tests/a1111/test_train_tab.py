"""The "DICE Training" tab (scripts/cfg_distill_train_tab.py over sdwebui.training) against
the webui stand-ins and tiny trainable checkpoints, on both model paths (A1111 apply_model with
integer t, Forge's k-diffusion UNet patcher): the refiner it writes, its metadata, the held-out gap,
Interrupt, Resume, the queue lock, shared.state progress and the model's requires_grad flags.

Why stand-ins still: the real servers (tests/webui/test_webui_training.py) train through
POST /cfg-distill/train on the real loaded models of A1111 and Forge and check the held-out gap;
what they cannot cover cheaply is kept here: SDXL dict conditioning (no tiny SDXL loads in the real
webuis yet), v-prediction models, Interrupt at a chosen step, Resume and its refusals."""
import html
import os
import re

import pytest
import torch

from cfg_distill import load_refiner, read_refiner_info
from sdwebui import training as wt
from cfg_distill.training import evaluate_gap, load_training_state
from fake_trainable import A1111Model, ForgeModel, sd_alphas_cumprod

TRAIN = ["a red fox in the snow", "a blue car on a road", "a green tree in a field", "an old house by the sea",
         "a black cat on a sofa", "a yellow flower in rain", "a white horse at sunset", "a small boat on a lake"]
HELD_OUT = ["a red car in the snow", "a black horse by the sea", "a green boat in rain", "an old cat in a field"]


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared cores: one torch thread per test process avoids oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    wt._LATENT_CACHE.clear()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def webui(tmp_path):
    """make(host, model) -> a fresh stand-in webui with both scripts loaded, refiners in tmp_path."""
    from webui_env import load_webui, purge

    yield lambda host, model: load_webui(host, model, str(tmp_path))
    purge()


def click(env, prompts=TRAIN, w=5.0, steps=10, batch=4, lr=2e-3, loss="l2", resolution=64, seed=0, name="ref",
          save_every=0, resume=False):
    """The Train button as gradio calls it: through the wrapped handler, with the UI's values."""
    image, status = env.train_tab.train_click("\n".join(prompts) if isinstance(prompts, list) else prompts, w, steps,
                                              batch, lr, loss, resolution, seed, name, save_every, resume)
    return image, status


def held_out_gap(env, model, refiner_path, resolution=64):
    """evaluate_gap on prompts and noised latents the run never saw: refined one pass vs plain cfg 1,
    both against the CFG teacher at w=5."""
    wm = env.train_tab.webui_model(model, resolution)
    with torch.no_grad():
        null = wt.split_cond(wm.encode([""]), "cpu")[0]
    held = wt.encode_prompts(wm, HELD_OUT)
    if wm.load is not None:
        wm.load()
    host = wt.WebuiDistillHost(wm, held, null, 5.0, 4)
    host.make_latents(len(HELD_OUT), (resolution // 8, resolution // 8), seed=1234)
    g = torch.Generator().manual_seed(99)
    batches = [host.sample_batch(i, g) for i in range(10)]
    return evaluate_gap(load_refiner(refiner_path).module, batches, host.teacher, host.student, loss="l2")


def flags(module):
    return [p.requires_grad for p in module.parameters()]


def mixed_flags(module):
    """A pattern of requires_grad flags the run must give back exactly (A1111 leaves them True)."""
    for i, p in enumerate(module.parameters()):
        p.requires_grad_(i % 3 != 0)
    return flags(module)


# ---------------------------------------------------------------------------------------------
# Training on each path


def test_a1111_sd1_tab_trains_a_refiner_that_beats_cfg1_on_held_out_prompts(webui, tmp_path):
    model = A1111Model(name="tinySD15.safetensors", shorthash="1a2b3c4d5e")
    env = webui("a1111", model)
    before = mixed_flags(model)
    seen = []

    texts = []

    def on_apply(m):  # every model pass: the queue lock is held and the whole model is frozen
        seen.append((env.call_queue.queue_lock.locked(), any(p.requires_grad for p in m.parameters()),
                     env.shared.state.job))
        texts.append(env.shared.state.textinfo)

    model.on_apply = on_apply
    image, status = click(env, steps=40, save_every=15)

    path = tmp_path / "ref.safetensors"
    assert "Done: 40/40 steps, saved ref.safetensors" in status and "class='error'" not in status
    # the held-out progress check, live (under the step line) and in the outcome: steps 0, 4, ..., 40
    live = [t for t in texts if t and t.startswith("step ") and "held-out check at step 4/40" in t]
    assert live and "% of the start's gap left" in live[-1], texts[-3:]
    assert re.search(r"Held-out check: \d+% of the start.{1,6}s gap to the CFG teacher is left \(11 checks, steps 0-40\)",
                     status), status
    assert path.is_file() and (tmp_path / "ref.dice-train-state").is_file()
    info = read_refiner_info(str(path))
    assert (info.base_family, info.token_dim, info.base_checkpoint, info.base_hash) == (
        "sd15", 768, "tinySD15.safetensors", "1a2b3c4d5e")
    assert (info.guidance_scale, info.train_steps, info.keep_first_token) == (5.0, 40, True)

    assert seen and all(locked for locked, _, _ in seen), "training ran outside the queue lock"
    assert not any(grad for _, grad, _ in seen), "the model was not frozen during training"
    assert {job for _, _, job in seen} == {"cfg-distill-train"}
    assert flags(model) == before, "requires_grad flags were not restored"
    assert not env.call_queue.queue_lock.locked()

    state = env.shared.state
    assert state.begun == 1 and state.job_no == 40 and state.job == "" and state.job_count == 0
    assert state.textinfo.startswith("Done: 40/40")
    assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3

    gap = held_out_gap(env, model, str(path))
    assert gap.refined < 0.9 * gap.baseline, gap

    # the generation accordion lists the new refiner (and never the training state)
    assert env.script_module.STORE.names() == ["ref.safetensors"]
    assert env.script_module.refiner_folder() == env.train_tab.refiner_folder() == str(tmp_path)


def test_forge_sd1_tab_trains_on_inference_mode_conditioning(webui, tmp_path):
    model = ForgeModel(name="tinyForge15.safetensors", shorthash="9f8e7d6c5b")
    env = webui("forge", model)
    kmodel = model.forge_objects.unet.model
    before = mixed_flags(kmodel)
    assert model.get_learned_conditioning(["x"]).is_inference(), "Forge encodes under inference_mode"
    assert not wt.split_cond(model.get_learned_conditioning(["x"]), "cpu")[0].tokens.is_inference(), "cloned"
    seen = []
    # Training runs on a trainable copy (wt.trainable_copy): the generation model's flags never change.
    model.on_apply = lambda m: seen.append((env.call_queue.queue_lock.locked(), flags(kmodel) != before))

    image, status = click(env, steps=40)

    assert "Done: 40/40 steps" in status, status
    info = read_refiner_info(str(tmp_path / "ref.safetensors"))
    assert (info.base_family, info.token_dim, info.base_checkpoint, info.base_hash, info.train_steps) == (
        "sd15", 768, "tinyForge15.safetensors", "9f8e7d6c5b", 40)
    assert env.memory_management.loaded[-1] is model.forge_objects.unet, "the UNet was not loaded for training"
    assert seen and all(locked and not grad for locked, grad in seen)
    assert flags(kmodel) == before

    gap = held_out_gap(env, model, str(tmp_path / "ref.safetensors"))
    assert gap.refined < 0.9 * gap.baseline, gap


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_sdxl_dict_conditioning_trains_and_is_recorded_as_sdxl(webui, tmp_path, host):
    model = A1111Model(sdxl=True) if host == "a1111" else ForgeModel(sdxl=True)
    env = webui(host, model)
    _, status = click(env, steps=3, batch=2, prompts=TRAIN[:3], resolution=64)
    assert "Done: 3/3 steps" in status, status
    loaded = load_refiner(str(tmp_path / "ref.safetensors"))
    assert (loaded.info.base_family, loaded.info.token_dim, loaded.info.train_steps) == ("sdxl", 2048, 3)
    assert loaded.module.fc2.weight.abs().sum() > 0, "the refiner learned nothing"


# ---------------------------------------------------------------------------------------------
# The eps both paths give to the loss


@pytest.mark.parametrize("host,kind", [("a1111", "eps"), ("a1111", "v"), ("forge", "epsilon"),
                                       ("forge", "v_prediction")])
@pytest.mark.parametrize("sdxl", [False, True])
def test_both_paths_give_the_networks_eps_for_eps_and_v_models(host, kind, sdxl):
    if host == "a1111":
        model = A1111Model(sdxl=sdxl, parameterization=kind)
        net, denoiser = model.model.diffusion_model, wt.A1111Denoiser(model, "cpu")
    else:
        model = ForgeModel(sdxl=sdxl, prediction_type=kind)
        model.forge_objects.unet.loaded = True
        net, denoiser = model.forge_objects.unet.model.diffusion_model, wt.ForgeDenoiser(
            model.forge_objects.unet.model, "cpu")
    acp = sd_alphas_cumprod()
    t = torch.tensor([0, 250, 999])
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    x = x0 + denoiser.sigmas[t].view(-1, 1, 1, 1) * noise  # k-diffusion scale
    cond = model._encode(["a", "b c", "d"])
    tokens, vector = (cond["crossattn"], cond["vector"]) if sdxl else (cond, None)
    with torch.no_grad():
        got = denoiser.eps(x, t, tokens, vector)
        a = acp[t].float().view(-1, 1, 1, 1)
        expected = net(x * a.sqrt(), t, tokens, vector)  # the DDPM-scaled x_t the network was built for
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_teacher_uses_the_real_empty_encoding_and_passes_the_vector_unchanged():
    """SDXL: only crossattn is refined; the student sees the prompt's own vector, the teacher's uncond
    half the vector of the real "" encoding (not the zeros the webuis use for an empty negative)."""
    model = A1111Model(sdxl=True)
    calls = []

    class Spy:
        sigmas, device = wt.A1111Denoiser(model, "cpu").sigmas, torch.device("cpu")

        def eps(self, x, t, tokens, vector):
            calls.append((tokens.clone(), vector.clone()))
            return torch.zeros_like(x)

    wm = wt.WebuiModel(denoiser=Spy(), encode=model.get_learned_conditioning, freeze=[model])
    empty = model.get_learned_conditioning([""])
    null = wt.split_cond(empty, "cpu")[0]
    prompts = wt.encode_prompts(wm, ["a red fox", "a blue car"])
    host = wt.WebuiDistillHost(wm, prompts, null, 5.0, 2)
    host.x0 = [torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)]
    batch = host.sample_batch(0, torch.Generator().manual_seed(0))
    host.teacher(batch)
    refined = batch.c + 1.0
    host.student(batch, refined)
    (t_tokens, t_vector), (s_tokens, s_vector) = calls
    assert torch.count_nonzero(empty["vector"]) > 0
    assert torch.equal(t_vector[2:], empty["vector"].expand(2, -1)) and torch.equal(t_tokens[2:], null.tokens.expand(2, -1, -1))
    assert torch.equal(t_vector[:2], batch.extra["vector"]) and torch.equal(s_vector, batch.extra["vector"])
    assert torch.equal(s_tokens, refined)


def test_negatives_reach_the_teacher_with_their_own_vector():
    """Training with negatives: a sample's second input is a negative's encoding (tokens and, for SDXL,
    its own pooled vector) and the teacher is CFG with exactly that negative."""
    model = A1111Model(sdxl=True)
    calls = []

    class Spy:
        sigmas, device = wt.A1111Denoiser(model, "cpu").sigmas, torch.device("cpu")

        def eps(self, x, t, tokens, vector):
            calls.append((tokens.clone(), vector.clone()))
            return torch.zeros_like(x)

    wm = wt.WebuiModel(denoiser=Spy(), encode=model.get_learned_conditioning, freeze=[model])
    null = wt.split_cond(model.get_learned_conditioning([""]), "cpu")[0]
    prompts = wt.encode_prompts(wm, ["a red fox", "a blue car"])
    negatives = wt.encode_prompts(wm, ["blurry", "a green tree at night"])
    host = wt.WebuiDistillHost(wm, prompts, null, 5.0, 8, negatives, 1.0)
    host.x0 = [torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)]
    batch = host.sample_batch(0, torch.Generator().manual_seed(0))
    host.teacher(batch)
    tokens, vector = calls[0]
    assert torch.equal(tokens[8:], batch.uc)
    used = set()
    for row in range(8):
        match = [k for k, n in enumerate(negatives)
                 if torch.equal(tokens[8 + row], n.tokens[0]) and torch.equal(vector[8 + row], n.vector[0])]
        assert match, row  # every uncond row is one of the negatives (share 1), with its own vector
        used.update(match)
    assert used == {0, 1}
    with pytest.raises(wt.TrainTabError, match="needs negative prompts"):
        wt.WebuiDistillHost(wm, prompts, null, 5.0, 2, (), 0.5)


def test_family_comes_from_the_conditioning():
    assert wt.family_of_cond(torch.zeros(1, 77, 768)) == "sd15"
    assert wt.family_of_cond(torch.zeros(1, 77, 1024)) == "sd2"
    assert wt.family_of_cond({"crossattn": torch.zeros(1, 77, 2048), "vector": torch.zeros(1, 2816)}) == "sdxl"
    with pytest.raises(wt.TrainTabError, match="SDXL refiner"):  # the SDXL refiner checkpoint: 1280-d
        wt.family_of_cond({"crossattn": torch.zeros(1, 77, 1280), "vector": torch.zeros(1, 2560)})
    with pytest.raises(wt.TrainTabError, match="4096-d"):
        wt.family_of_cond(torch.zeros(1, 77, 4096))


# ---------------------------------------------------------------------------------------------
# Interrupt and Resume


def test_interrupt_saves_what_was_learned_and_resume_continues_exactly(webui, tmp_path):
    model = A1111Model(parameterization="v")
    env = webui("a1111", model)
    state = env.shared.state
    # the user clicks Interrupt in step 4 (a training pass: the held-out checks run without gradients)
    model.on_apply = lambda m: state.job_no >= 3 and torch.is_grad_enabled() and state.interrupt()

    _, status = click(env, steps=6, batch=2, name="run")
    assert "Interrupted at step 4/6: saved what was learned to run.safetensors" in status, status
    assert read_refiner_info(str(tmp_path / "run.safetensors")).train_steps == 4
    assert load_training_state(str(tmp_path / "run.dice-train-state")).step == 4
    # the tab trains with the same cosine schedule as the node and the headless trainer (their default)
    assert load_training_state(str(tmp_path / "run.dice-train-state")).config["lr_schedule"] == "cosine"
    assert state.interrupted is False, "the webui clears the flag after the call"

    model.on_apply = None
    _, status = click(env, steps=6, batch=2, name="run", resume=True)
    assert "Done: 6/6 steps" in status and "Resumed from step 4." in status, status
    resumed = load_refiner(str(tmp_path / "run.safetensors"))
    assert resumed.info.train_steps == 6
    assert len(load_training_state(str(tmp_path / "run.dice-train-state")).losses) == 6
    calls = model.calls
    _, status = click(env, steps=6, batch=2, name="run", resume=True)
    assert "already trained for 6 steps" in status and model.calls == calls, "nothing left to do"

    # the same run without the interruption gives the same refiner
    wt._LATENT_CACHE.clear()
    _, status = click(env, steps=6, batch=2, name="straight")
    straight = load_refiner(str(tmp_path / "straight.safetensors"))
    for key, value in straight.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_interrupt_while_making_latents_saves_nothing(webui, tmp_path):
    model = A1111Model()
    env = webui("a1111", model)
    model.on_apply = lambda m: env.shared.state.interrupt()
    _, status = click(env, steps=5, batch=2)
    assert "Interrupted while making the training latents" in status
    assert not os.listdir(tmp_path)


def test_a_lazily_loaded_forge_checkpoint_is_loaded_before_training(webui, tmp_path, monkeypatch):
    """Forge loads the selected checkpoint at the first generation; a Train click before any image
    must load it (as Forge's own checkpoint merger does), not train on the placeholder."""
    import sys
    import types

    model = ForgeModel()
    env = webui("forge", model)
    env.shared.sd_model = None  # nothing generated yet
    reloads = []

    def forge_model_reload():
        reloads.append(1)
        env.shared.sd_model = model
        return model, True

    monkeypatch.setitem(sys.modules, "modules.sd_models", types.SimpleNamespace(forge_model_reload=forge_model_reload))
    _, status = click(env, steps=2, batch=2, prompts=TRAIN[:2])
    assert reloads == [1] and "class='error'" not in status, status
    assert os.path.isfile(tmp_path / "ref.safetensors")


def test_resume_refuses_another_guidance_scale_or_checkpoint(webui, tmp_path):
    model = A1111Model(shorthash="aaaaaaaaaa")
    env = webui("a1111", model)
    click(env, steps=2, batch=2, prompts=TRAIN[:2])
    _, status = click(env, steps=3, batch=2, prompts=TRAIN[:2], w=7.0, resume=True)
    assert "class='error'" in status and "guidance scale 5" in status
    env.shared.sd_model = other = A1111Model(shorthash="bbbbbbbbbb")
    _, status = click(env, steps=3, batch=2, prompts=TRAIN[:2], resume=True)
    assert "class='error'" in status and "[aaaaaaaaaa]" in status
    assert read_refiner_info(str(tmp_path / "ref.safetensors")).train_steps == 2
    assert other.calls == 0, "refused before any model pass"


# ---------------------------------------------------------------------------------------------
# Settings and failures


@pytest.mark.parametrize("field,value,message", [
    ("name", "../evil", "not a plain file name"),
    ("steps", 0, "steps must be a whole number >= 1"),
    ("resolution", 100, "multiple of 8"),
    ("loss", "huber", "loss must be l1 or l2"),
    ("lr", -1, "learning rate must be > 0"),
])
def test_bad_settings_are_reported_without_touching_the_model(webui, tmp_path, field, value, message):
    model = A1111Model()
    env = webui("a1111", model)
    image, status = click(env, **{field: value})
    assert "class='error'" in status and message in html.unescape(status), status
    assert model.calls == 0 and not os.listdir(tmp_path)
    assert image.shape[2] == 3


def test_no_checkpoint_loaded(webui):
    env = webui("a1111", None)
    _, status = click(env)
    assert "no checkpoint is loaded" in status


def test_empty_prompt_box_uses_the_bundled_list():
    request = wt.TrainRequest.from_ui("  \n", 5, 10, 2, 2e-4, "l1", 512, 0, "x.safetensors", 0, False)
    assert request.training_prompts() == wt.default_prompts() and len(request.training_prompts()) > 100
    assert request.name == "x" and request.uses_default_prompts
    request = wt.TrainRequest.from_ui("# comment\na cat\n\na dog ", 5, 10.0, 2, 2e-4, "l1", 512, 0, "x", 0, False)
    assert request.prompts == ["a cat", "a dog"] and request.steps == 10
    assert request.negative_prompts == [] and request.negative_share_used == 0.0  # "" only unless negatives are given
    request = wt.TrainRequest.from_ui("a cat", 5, 10, 2, 2e-4, "l1", 512, 0, "x", 0, False, "blurry\n# no\n\nred ", 0.3)
    assert request.negative_prompts == ["blurry", "red"] and request.negative_share == 0.3
    with pytest.raises(wt.TrainTabError, match="negative share must be between 0 and 1"):
        wt.TrainRequest.from_ui("a cat", 5, 10, 2, 2e-4, "l1", 512, 0, "x", 0, False, "red", 1.5)


def test_an_unexpected_error_shows_the_webuis_error_box_and_restores_the_model(webui, tmp_path):
    model = A1111Model()
    env = webui("a1111", model)
    before = mixed_flags(model)

    def fail(m):
        if env.shared.state.job_no >= 2:
            raise RuntimeError("CUDA out of memory (simulated)")

    model.on_apply = fail
    image, status = click(env, steps=5, batch=2)
    assert image is None and "class='error'" in status and "CUDA out of memory" in status
    assert flags(model) == before
    assert not env.call_queue.queue_lock.locked()
    assert load_training_state(str(tmp_path / "ref.dice-train-state")).step == 2, "the loop keeps what was learned"


def test_tab_is_registered_with_on_ui_tabs(webui):
    env = webui("forge", ForgeModel())
    callbacks = env.script_callbacks.callback_map["callbacks_ui_tabs"]
    assert callbacks == [env.train_tab.on_ui_tabs]


def test_progress_text():
    assert wt.progress_text(12, 200, 0.123456, 65) == "step 12/200 loss 0.1235 eta 1m05s"
    assert re.fullmatch(r"step \d+/\d+ loss \S+ eta \S+", wt.progress_text(1, 2, 3.0, 4000))


def test_inpainting_checkpoints_are_refused(webui, tmp_path):
    model = A1111Model()
    model.model.diffusion_model.in_channels = 9  # A1111 concatenates the masked image: not text-to-image
    env = webui("a1111", model)
    _, status = click(env)
    assert "inpainting" in status and model.calls == 0 and not os.listdir(tmp_path)

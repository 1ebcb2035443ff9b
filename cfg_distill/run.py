"""One training run, whatever the front door: `run(request, host, reporter)`.

The request (cfg_distill.request) says what to train; the host adapter (ComfyUI's in nodes/, the
webui's in sdwebui/) knows the model: its folders, its text encoder, how to make training data and
the teacher / student passes. This module holds the rules every front door shares: the state-file
and resume rules, the start file, the loop, cancel and divergence, and what is saved.

    host.folder(kind) -> str                  the model folder for "dice_refiners" / "loras"
    host.checkpoint() -> (name, short hash)   recorded in the file, checked on resume
    host.prepare(request, start, reporter)    -> a Session: prompts encoded, model set up, no sampling yet
    host.is_interrupt(error) -> bool          the host's own cancel exception (ComfyUI raises one)

A Session holds what prepare made: `family`, `token_dim`, `device`, `make_data(reporter)` (the
training latents; False when stopped), `sample_batch`, `teacher`, and for DICE
`student(batch, refined_c)`; for TeEFusion `lora_student()`, `lora_tensors()`, `lora_info`;
`cleanup()` ends it. The run checks the request against the model (start file, saved run) before any
sampling. Only the main rank (torch.distributed) writes files.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch

from .families import FAMILIES
from .refiner import DiceRefiner
from .refiner_file import LoadedRefiner, RefinerFileError, RefinerInfo, load_refiner, read_refiner_info, save_refiner
from .request import OUTPUT_KIND, RequestError, TrainRequest
from .training import (Check, TrainConfig, TrainingDiverged, TrainingHooks, TrainingStateError, check_ratio,
                       load_training_state, train_refiner, train_student)

CHECKS_PER_RUN = 10  # progress checks: at the start, every tenth of the run and at the end


class Reporter:
    """How a run talks to its front door; the defaults say nothing and never stop."""
    main_rank = True

    def should_stop(self) -> bool:
        return False

    def status(self, text: str) -> None:
        pass

    def step(self, step: int, total: int, loss: float, elapsed_s: float, eta_s: float) -> None:
        pass

    def check(self, step: int, total: int, checks: list[Check]) -> None:
        """A progress check (see check_text); front doors that draw it override this."""
        self.status(check_text(checks, total))


def check_every(steps: int) -> int:
    return max(1, round(steps / CHECKS_PER_RUN))


def check_text(checks: list[Check], total: int) -> str:
    """What a progress check tells the user: how much of the start's gap to the CFG teacher is left
    on the run's held-out check samples, and how fast it still falls (to stop early knowingly)."""
    last = checks[-1]
    if len(checks) == 1:
        return (f"held-out check at step {last.step}/{total}: loss {last.loss:.4g} (the start; later checks "
                "say how much of it is left)")
    text = f"held-out check at step {last.step}/{total}: {100 * check_ratio(checks):.0f}% of the start's gap left"
    prev = checks[-2]
    if checks[0].loss > 0:
        fall = 100 * (prev.loss - last.loss) / checks[0].loss
        text += f" ({'down' if fall >= 0 else 'up'} {abs(fall):.1f} points since step {prev.step})"
    return text


class TrainingHost(Protocol):
    def folder(self, kind: str) -> str: ...

    def checkpoint(self) -> tuple[str, str]: ...

    def prepare(self, request: TrainRequest, start: Any, reporter: Reporter) -> Any: ...

    def is_interrupt(self, error: BaseException) -> bool: ...


@dataclass
class Outcome:
    """What a run did; `message` is what the front door shows."""
    request: TrainRequest
    path: str | None  # the saved file (None: nothing saved)
    state_path: str
    step: int = 0
    losses: list[float] = field(default_factory=list)
    cancelled: bool = False
    resumed_from: int | None = None
    family: str = ""
    refiner: LoadedRefiner | None = None  # DICE
    lora_tensors: dict | None = None  # TeEFusion
    lora_info: Any = None  # TeEFusion: its LoraInfo
    checks: list[Check] = field(default_factory=list)  # the progress checks (held-out samples)
    seconds: float = 0.0
    message: str = ""

    @property
    def final_loss(self) -> float:
        return final_loss(self.losses)


def teacher_samples(r: TrainRequest, steps: int) -> int:
    """CFG teacher targets a run of `steps` optimizer steps trains on (every process draws its own)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_available() and \
        torch.distributed.is_initialized() else 1
    return int(steps) * r.batch_size * r.grad_accum * world


def final_loss(losses: list[float]) -> float:
    """The mean of the last tenth (at most 10 steps): less noisy than the last loss, never dominated
    by the first steps of a short run."""
    tail = max(1, min(10, len(losses) // 10))
    return float(np.mean(losses[-tail:])) if losses else float("nan")


def config_of(r: TrainRequest, keep_first_token: bool = True) -> TrainConfig:
    """The loop's settings for a validated request."""
    guidance = r.guidance_scale if r.method == "dice" else (r.w_min + r.w_max) / 2
    return TrainConfig(guidance_scale=guidance, steps=r.steps, batch_size=r.batch_size, lr=r.lr,
                       lr_schedule=r.lr_schedule, loss=r.loss, grad_accum=r.grad_accum,
                       autocast=None if r.autocast == "none" else r.autocast, seed=r.seed,
                       save_every=r.save_every, keep_first_token=keep_first_token, inner_dim=r.inner_dim).validate()


# ---------------------------------------------------------------------------------------------
# Start files and saved runs


def read_start(r: TrainRequest) -> Any:
    """The file a run starts from: a LoadedRefiner (DICE) or (tensors, LoraInfo) (TeEFusion)."""
    if not r.start_from:
        return None
    path, name = r.start_from, os.path.basename(r.start_from)
    if not os.path.isfile(path):
        raise RequestError(f"start file {path!r} does not exist: give a .safetensors "
                           f"{'refiner' if r.method == 'dice' else 'student LoRA'} made by this pack")
    if r.method == "dice":
        try:
            loaded = load_refiner(path)
        except RefinerFileError as e:
            raise RequestError(f"cannot start from {name!r}: {e}") from None
        if len(loaded.stages) != 1:
            raise RequestError(f"cannot start from {name!r}: it holds {len(loaded.stages)} noise-level ranges; "
                               "start from a single refiner")
        want = r.w_input()
        have = loaded.info.w_input
        if have is not None and (want is None or list(have["range"]) != list(want["range"])):
            got = f"w {have['range'][0]:g}-{have['range'][1]:g}"
            raise RequestError(f"cannot start from {name!r}: it was trained for {got}, this run trains "
                               f"{'w ' + format(r.w_min, 'g') + '-' + format(r.w_max, 'g') if want else 'w ' + format(r.guidance_scale, 'g')}"
                               "; set the same w range or start from another file")
        if have is None and loaded.info.guidance_scale is not None and \
                not math.isclose(loaded.info.guidance_scale, r.guidance_scale):
            raise RequestError(f"cannot start from {name!r}: it was trained at w {loaded.info.guidance_scale:g}, this "
                               f"run's (reference) w is {r.guidance_scale:g}")
        return loaded
    from .teefusion_training import read_student_lora

    try:
        tensors, info = read_student_lora(path)
    except ValueError as e:
        raise RequestError(str(e)) from None
    if info.rank != r.rank:
        raise RequestError(f"cannot start from {name!r}: it is a {info.summary()}; this run trains rank {r.rank}. "
                           "Set the same rank or start from another file")
    return tensors, info


def check_family(r: TrainRequest, start: Any, family: str, token_dim: int, folder_checkpoint: tuple[str, str]) -> None:
    """After the host knows its model: refuse a start file made for another model."""
    if start is None:
        return
    name = os.path.basename(r.start_from)
    if r.method == "dice":
        info = start.info
        if info.token_dim != token_dim:
            raise RequestError(f"cannot start from {name!r}: it is for {info.token_dim}-d prompt tokens, this model's "
                               f"are {token_dim}-d (another model family)")
        if info.base_family not in ("unknown", "", family):
            raise RequestError(f"cannot start from {name!r}: it was made for a {info.base_family} model, this one is "
                               f"{family}")
    else:
        _tensors, info = start
        if info.base_family not in ("", "unknown", family):
            raise RequestError(f"cannot start from {name!r}: it was made for a {info.base_family} model, this one is "
                               f"{family}")


def check_existing(r: TrainRequest, state_path: str) -> int | None:
    """The saved step a run resumes at (None: a fresh run); refuses what must not be replaced or resumed."""
    if not os.path.exists(state_path):
        return None
    try:
        saved = load_training_state(state_path)
    except TrainingStateError as e:
        raise RequestError(f"{e}. Move it away, or pick another name.") from None
    if not r.resume:
        if not r.overwrite:
            raise RequestError(f"{state_path} holds a saved run of {r.name!r} at step {saved.step}: resume it "
                               "(--resume), start afresh (--overwrite replaces it), or pick another name.")
        return None
    config = saved.config or {}
    w = config.get("guidance_scale")
    want = config_of(r).guidance_scale
    if w is not None and not math.isclose(float(w), want):
        raise RequestError(f"cannot resume {r.name!r}: it was trained at guidance scale {float(w):g}, this run asks "
                           f"for {want:g}. Set it back to {float(w):g}, or turn resume off / pick a new name.")
    return saved.step


def check_resume_model(r: TrainRequest, state_path: str, family: str, base_hash: str) -> None:
    """A saved DICE run made for another checkpoint is not resumed on this one."""
    if not (r.resume and r.method == "dice" and os.path.exists(state_path)):
        return
    try:
        saved = read_refiner_info(state_path)
    except RefinerFileError:
        return
    if saved.base_family not in ("unknown", family):
        raise RequestError(f"cannot resume {r.name!r}: it was trained for a {saved.base_family} checkpoint, the loaded "
                           f"one is {family}. Load that checkpoint, or pick a new name.")
    if saved.base_hash and base_hash and saved.base_hash != base_hash:
        raise RequestError(f"cannot resume {r.name!r}: it was trained on checkpoint {saved.base_checkpoint or '?'} "
                           f"[{saved.base_hash}], the loaded one is [{base_hash}]. Load that checkpoint, or pick a new "
                           "name.")


# ---------------------------------------------------------------------------------------------
# The run


def run(request: TrainRequest, host: TrainingHost, reporter: Reporter | None = None,
        hooks: TrainingHooks | None = None) -> Outcome:
    """Validate, prepare (the host), train (resumable, cancellable), save. Errors the user can fix
    raise RequestError; a diverged run raises TrainingDiverged and leaves every file as it was."""
    reporter = reporter or Reporter()
    r = request.validate()
    folder = host.folder(OUTPUT_KIND[r.method])
    path, state_path = r.output_file(folder), r.state_file(folder)
    resumed_at = check_existing(r, state_path)
    had_state = os.path.exists(state_path)
    start = read_start(r)
    ckpt_name, ckpt_hash = host.checkpoint()
    reporter.status(r.settings_line())
    started = time.monotonic()
    with torch.inference_mode(False), torch.enable_grad():
        session = host.prepare(r, start, reporter)
        try:
            check_family(r, start, session.family, session.token_dim, (ckpt_name, ckpt_hash))
            check_resume_model(r, state_path, session.family, ckpt_hash)
            size = getattr(session, "size", None)  # (w, h, source): the host's answer to a size of 0
            if size is not None and (size[0], size[1]) != (r.width, r.height):
                r = replace(r, width=size[0], height=size[1])
                reporter.status(f"training at {r.width}x{r.height} px ({size[2]})")
            if not session.make_data(reporter):
                return Outcome(r, None, state_path, cancelled=True, family=session.family,
                               message="Stopped while preparing the training data: nothing was trained or saved.")
            reporter.status(f"training: {resumed_at or 0} of {r.steps} steps done")
            if r.method == "dice":
                out = _train_dice(r, session, start, state_path, reporter, hooks, ckpt_name, ckpt_hash, host)
            else:
                out = _train_teefusion(r, session, start, state_path, reporter, hooks, ckpt_name, ckpt_hash, host)
        finally:
            session.cleanup()
    out.family, out.resumed_from, out.seconds = session.family, resumed_at, time.monotonic() - started
    if reporter.main_rank:  # torch.distributed: one rank writes; the others name the same file
        if r.method == "dice":
            save_refiner(path, out.refiner.module, out.refiner.info)
        else:
            from .teefusion_training import save_lora

            save_lora(path, out.lora_tensors, out.lora_info)
    out.path = path
    out.message = summary(out, had_state)
    return out


def _loop_or_saved_state(loop, restore, state_path: str, host: TrainingHost) -> tuple[int, list[float], bool]:
    """(step, losses, cancelled) of the loop. A host cancel raised inside a model pass (ComfyUI's) ends
    it as a cancel: the loop saved its state before re-raising, and restore(state) takes it back."""
    try:
        return loop()
    except TrainingDiverged:
        raise  # every file stays as it was
    except BaseException as e:
        if not (host.is_interrupt(e) and os.path.exists(state_path)):
            raise
        state = load_training_state(state_path)
        restore(state)
        return state.step, list(state.losses), True


def _train_dice(r, session, start, state_path, reporter, hooks, ckpt_name, ckpt_hash, host) -> Outcome:
    family = session.family
    keep_first = FAMILIES.get(family, FAMILIES["other"]).keep_first_token
    config = config_of(r, keep_first)
    info = RefinerInfo(session.token_dim, config.inner_dim, config.heads, base_family=family,
                       base_checkpoint=ckpt_name, base_hash=ckpt_hash, guidance_scale=r.guidance_scale,
                       keep_first_token=keep_first, negatives=bool(r.negative_prompts) and r.negative_share > 0,
                       w_input=r.w_input())
    extra = {}
    if r.percent_range != (0.0, 1.0):  # one range of a K-range refiner (combined later)
        extra["trained_percent_range"] = list(r.percent_range)
    if start is not None:
        extra["started_from"] = f"{os.path.basename(r.start_from)} ({start.info.train_steps or 0} steps)"
    if r.command:
        extra["command"] = r.command
    info = replace(info, extra={**info.extra, **extra}) if extra else info
    init = start.module if start is not None else None
    trained, checks = {}, []
    on_check = _recording(checks, reporter)

    def loop():
        result = train_refiner(config, session.sample_batch, session.teacher, session.student,
                               token_dim=session.token_dim, device=session.device, state_path=state_path,
                               resume=r.resume, init=init, should_stop=reporter.should_stop, on_step=reporter.step,
                               info=info, hooks=hooks, check_every=check_every(r.steps), on_check=on_check)
        trained["refiner"] = result.refiner
        return result.step, list(result.losses), result.cancelled

    def restore(state):
        trained["refiner"] = DiceRefiner(*state.shape)
        trained["refiner"].load_state_dict(state.refiner)

    step, losses, cancelled = _loop_or_saved_state(loop, restore, state_path, host)
    refiner = trained["refiner"].cpu().eval().requires_grad_(False)
    info = replace(info, train_steps=step, extra={**info.extra, "teacher_samples": teacher_samples(r, step),
                                                  **_checks_extra(checks, state_path)})
    return Outcome(r, None, state_path, step=step, losses=losses, cancelled=cancelled, checks=_saved_checks(checks, state_path),
                   refiner=LoadedRefiner(refiner, info, os.path.basename(r.output_file(""))))


def _train_teefusion(r, session, start, state_path, reporter, hooks, ckpt_name, ckpt_hash, host) -> Outcome:
    config = config_of(r)
    info = session.lora_info
    info.base_checkpoint, info.base_hash = ckpt_name, ckpt_hash
    if start is not None:
        tensors, start_info = start
        if start_info.fusion != info.fusion:
            raise RequestError(f"cannot start from {os.path.basename(r.start_from)!r}: it is a {start_info.summary()}; "
                               f"this model needs fusion {info.fusion}")
        session.load_lora_tensors(tensors)
        info.continued_from = f"{os.path.basename(r.start_from)} ({start_info.train_steps} steps)"
    info.command = r.command
    student = session.lora_student()
    checks = []
    on_check = _recording(checks, reporter)

    def state_meta(step):
        info.train_steps = step
        return info.to_metadata()

    def loop():
        done = train_student(config, student, session.sample_batch, session.teacher, device=session.device,
                             state_path=state_path, resume=r.resume, should_stop=reporter.should_stop,
                             on_step=reporter.step, metadata=state_meta,
                             on_batch=hooks.on_batch if hooks is not None else None,
                             check_every=check_every(r.steps), on_check=on_check)
        return done.step, list(done.losses), done.cancelled

    def restore(state):
        with torch.no_grad():
            for key, p in student.named_trainable():
                p.copy_(state.refiner[key])

    step, losses, cancelled = _loop_or_saved_state(loop, restore, state_path, host)
    info.train_steps, info.teacher_samples = step, teacher_samples(r, step)
    checks = _saved_checks(checks, state_path)
    info.checks = [[c.step, c.loss] for c in checks]
    return Outcome(r, None, state_path, step=step, losses=losses, cancelled=cancelled, checks=checks,
                   lora_tensors=session.lora_tensors(), lora_info=info)


def _recording(checks: list[Check], reporter: Reporter):
    def on_check(step: int, total: int, series: list[Check]) -> None:
        checks[:] = series
        reporter.check(step, total, series)
    return on_check


def _saved_checks(checks: list[Check], state_path: str) -> list[Check]:
    """The run's checks; after a host cancel inside a model pass, the series the state file kept."""
    if checks or not os.path.exists(state_path):
        return list(checks)
    try:
        return load_training_state(state_path).checks
    except TrainingStateError:
        return []


def _checks_extra(checks: list[Check], state_path: str) -> dict:
    saved = _saved_checks(checks, state_path)
    return {"checks": [[c.step, c.loss] for c in saved]} if saved else {}


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def summary(out: Outcome, had_state: bool) -> str:
    """What the front door shows after a run."""
    r = out.request
    name = os.path.basename(out.path or r.output_file(""))
    lines = []
    if out.cancelled:
        lines.append(f"Interrupted at step {out.step}/{r.steps}: saved what was learned to {name}.")
    elif out.resumed_from is not None and out.step <= out.resumed_from:
        lines.append(f"{r.name!r} was already trained for {out.resumed_from} steps (>= {r.steps}): nothing to do; "
                     f"raise Steps to train further. Saved {name}.")
    else:
        lines.append(f"Done: {out.step}/{r.steps} steps, saved {name}.")
    if out.resumed_from is not None:
        lines.append(f"Resumed from step {out.resumed_from}.")
    elif r.resume:
        lines.append(f"No saved run named {r.name!r} was found: started from scratch.")
    elif had_state:
        lines.append(f"Started a new run: the earlier training state of {r.name!r} was replaced "
                     "(resume continues a run instead).")
    lines.append(f"Final loss (mean of the last steps) {out.final_loss:.4g}; trained in {duration(out.seconds)}.")
    if len(out.checks) > 1:
        lines.append(f"Held-out check: {100 * check_ratio(out.checks):.0f}% of the start's gap to the CFG teacher is "
                     f"left ({len(out.checks)} checks, steps {out.checks[0].step}-{out.checks[-1].step}).")
    if out.path:
        lines.append(f"Folder: {os.path.dirname(out.path)}. Training state: {os.path.basename(out.state_path)} "
                     "(resume with the same name to continue).")
    if r.uses_default_prompts:
        lines.append(f"Prompts: the bundled list of {len(r.training_prompts())}.")
    return "\n".join(lines)


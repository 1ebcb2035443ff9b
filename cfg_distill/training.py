"""The distillation loop, host-independent (torch, safetensors and numpy only). One loop, pluggable
students: a DICE refiner (train_refiner) or any other set of trainable tensors, e.g. a LoRA on the
model (train_student with a Student; the TeEFusion student in cfg_distill.teefusion_training).

A refiner S is trained so that ONE pass of the frozen model with c' = c + S(c, uc) matches the
classifier-free-guided output at scale w. The host supplies three callables, so the loop knows
nothing about the architecture:

    sample_batch(step, generator) -> Batch    x_t, sigma (opaque), prompt tokens c, null tokens uc;
                                              called grad_accum times per step (0-based step); draw
                                              randomness from `generator` so that resume is exact
    teacher(batch) -> target                  CFG output at w (two passes); run under no_grad here
    student(batch, refined_c) -> prediction   one pass with refined tokens; must stay differentiable

The frozen model's parameters should have requires_grad=False (the host's job): gradients only
need to flow through it, into the refiner.

Training state (weights, AdamW moments, RNG states, losses) is written atomically as .safetensors
with JSON metadata: no pickle anywhere. Its parameter tensors use the official names and it
carries refiner metadata, so the state file also loads as a refiner.

Under torch.distributed (torchrun), gradients are averaged across ranks before each update; each
rank draws its own data (generator seeded with seed + rank); only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from .refiner import DEFAULT_HEADS, DEFAULT_INNER_DIM, DiceRefiner, refine
from .refiner_file import RefinerInfo, atomic_save_safetensors

STATE_FORMAT = "cfg-distill.training-state"
STATE_FORMAT_VERSION = 1
_STATE_KEY = "cfg_distill_training"  # metadata entry of the state file, a JSON object
LOSS_KINDS = ("l1", "l2")
_AUTOCAST = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
_ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")
REFINER_KIND = "dice-refiner"


class TrainingDiverged(ValueError):
    """The loss (or a gradient) became NaN / inf. That update was not applied and no file written."""

    def __init__(self, step: int, loss: float, config: "TrainConfig | None" = None):
        self.step, self.loss = step, loss
        hints = []
        if config is not None and config.autocast:
            hints.append("train in fp32 (autocast off)")
        hints.append(f"lower the learning rate (e.g. {config.lr / 4:g})" if config is not None
                     else "lower the learning rate")
        hints.append("check that the teacher's output is finite (fp32 model weights / VAE latents)")
        super().__init__(
            f"training diverged at step {step}: the loss is {loss} (not finite). The update was not "
            f"applied; the last saved training state, if any, is kept unchanged. Try to {'; '.join(hints)}, "
            "then resume from the last state.")


class TrainingStateError(ValueError):
    """A training-state file that cannot be resumed from; the message says why."""


LR_SCHEDULES = ("constant", "cosine")


def lr_at(config: "TrainConfig", step: int) -> float:
    """Learning rate of optimizer step `step` (0-based). Cosine: half a cosine from lr to 0 over config.steps."""
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, config.steps) / config.steps))
    return config.lr


@dataclass
class TrainConfig:
    """Settings of one distillation run. Defaults follow the DICE paper (AdamW 2e-4, wd 1e-2, w 5).

    batch_size is per process and per micro-batch: the effective batch of one update is
    batch_size * grad_accum * world_size. The loop validates it; the host's sample_batch uses it.
    """
    guidance_scale: float = 5.0
    steps: int = 4000
    batch_size: int = 8
    lr: float = 2e-4
    lr_schedule: str = "constant"  # "constant" | "cosine" (lr -> 0 over `steps`; a function of the step, so resume is exact)
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    loss: str = "l2"  # paper: "l1" for SD1.5, "l2" for SDXL; both summed / batch
    grad_accum: int = 1
    autocast: str | None = None  # None | "bf16" | "fp16"; CUDA only (fp16 adds a GradScaler)
    seed: int = 0
    save_every: int = 0  # 0: save only at the end (and on cancel / error)
    alpha: float = 1.0  # refinement strength during training (1 in the paper)
    keep_first_token: bool = True  # False for T5-only families (no start-of-text token)
    inner_dim: int = DEFAULT_INNER_DIM
    heads: int = DEFAULT_HEADS

    def validate(self) -> "TrainConfig":
        def need(ok: bool, what: str):
            if not ok:
                raise ValueError(f"invalid training setting: {what}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        need(is_int(self.steps) and self.steps > 0, f"steps must be an integer >= 1 (got {self.steps!r})")
        need(is_int(self.batch_size) and self.batch_size > 0,
             f"batch_size must be an integer >= 1 (got {self.batch_size!r})")
        need(is_int(self.grad_accum) and self.grad_accum > 0,
             f"grad_accum must be an integer >= 1 (got {self.grad_accum!r})")
        need(is_int(self.save_every) and self.save_every >= 0,
             f"save_every must be an integer >= 0, 0 = only at the end (got {self.save_every!r})")
        need(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
             f"lr must be a finite number > 0, e.g. 2e-4 (got {self.lr!r})")
        need(self.lr_schedule in LR_SCHEDULES,
             f"lr_schedule must be one of {', '.join(LR_SCHEDULES)} (got {self.lr_schedule!r})")
        need(isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < math.inf,
             f"weight_decay must be a finite number >= 0 (got {self.weight_decay!r})")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1), e.g. (0.9, 0.999) (got {self.betas!r})")
        need(self.loss in LOSS_KINDS, f"loss must be 'l1' or 'l2' (got {self.loss!r})")
        need(self.autocast in _AUTOCAST, f"autocast must be None, 'bf16' or 'fp16' (got {self.autocast!r})")
        need(isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale),
             f"guidance_scale must be a finite number, e.g. 5 (got {self.guidance_scale!r})")
        need(isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha),
             f"alpha must be a finite number, 1 in training (got {self.alpha!r})")
        need(is_int(self.inner_dim) and is_int(self.heads) and self.heads > 0 and self.inner_dim > 0
             and self.inner_dim % self.heads == 0,
             f"inner_dim must be a positive multiple of heads (got {self.inner_dim!r} / {self.heads!r})")
        return self

    def to_json(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class Batch:
    """One micro-batch from the host. sigma and extra are passed through untouched."""
    x_t: torch.Tensor  # noised latents
    sigma: Any  # sigma or timestep, in whatever form the host's model wants
    c: torch.Tensor  # prompt tokens [B, T, D]
    uc: torch.Tensor  # null ("") tokens [1 or B, T', D]
    extra: dict = field(default_factory=dict)  # e.g. SDXL pooled vector / y


@dataclass
class TrainResult:
    refiner: DiceRefiner  # eval mode, fp32, on the training device
    step: int  # optimizer steps done in total (including those before a resume)
    losses: list[float]  # loss of every step, across all ranks
    cancelled: bool
    state_path: str | None  # the training-state file holding this result (None if none was asked)
    resumed_from: int = 0  # step the run continued from (0: a fresh run)
    config: TrainConfig | None = None
    checks: list[Check] = field(default_factory=list)  # progress checks (train_student's check_every)

    def info(self, **fields) -> RefinerInfo:
        """Refiner-file metadata for save_refiner: shape, w and steps filled in; family etc. from fields."""
        r, cfg = self.refiner, self.config or TrainConfig()
        base = dict(token_dim=r.token_dim, inner_dim=r.inner_dim, heads=r.heads,
                    guidance_scale=float(cfg.guidance_scale), train_steps=self.step,
                    keep_first_token=cfg.keep_first_token)
        return RefinerInfo(**{**base, **fields})


@dataclass
class GapReport:
    refined: float  # mean per-sample loss of one pass with refined tokens vs the CFG teacher
    baseline: float  # the same with plain tokens: cfg 1, i.e. the untrained (identity) refiner
    samples: int

    @property
    def ratio(self) -> float:
        return self.refined / self.baseline if self.baseline > 0 else float("nan")


@dataclass
class Check:
    """One progress check: the student's loss on the run's fixed check samples at `step`."""
    step: int
    loss: float


def check_ratio(checks: list[Check]) -> float:
    """The last check's loss as a share of the first's (the run's start: a fresh run's is the model at
    cfg 1 / without the LoRA); < 1 means the gap to the CFG teacher is closing."""
    if len(checks) < 1 or not checks[0].loss > 0:
        return float("nan")
    return checks[-1].loss / checks[0].loss


class ProgressCheck:
    """Fixed samples the run never trains on: prompts of the training pool, with noise and noise levels
    from a stream of their own (so the training stream is untouched), and their CFG targets made once.
    `measure(student)` is the mean loss of the student's one pass on them, with no gradient; the
    global RNG is forked so that measuring changes nothing a resumed run would do differently."""
    SEED_OFFSET = 7_777_777

    def __init__(self, sample_batch, teacher, config: TrainConfig, batches: int, device: torch.device,
                 amp_dtype=None):
        self.config, self.device, self.amp_dtype = config, device, amp_dtype
        g = torch.Generator().manual_seed(config.seed + self.SEED_OFFSET)
        self.data = []
        with self._forked(), torch.no_grad(), self._amp():
            torch.manual_seed(config.seed + self.SEED_OFFSET)  # the same samples after a resume, too
            for _ in range(batches):
                batch = sample_batch(0, g)
                self.data.append((batch, teacher(batch).detach()))

    def _forked(self):
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def _amp(self):
        return torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def measure(self, student: "Student") -> float:
        total = count = 0.0
        with self._forked(), torch.no_grad(), self._amp():
            for batch, target in self.data:
                n = batch.x_t.shape[0]
                total += float(distill_loss(student.predict(batch), target, self.config.loss)) * n
                count += n
        return total / count


@dataclass
class TrainingState:
    """The contents of a training-state file."""
    step: int
    refiner: dict[str, torch.Tensor]  # the student's trainable tensors (a refiner's: official names)
    optimizer: dict[str, torch.Tensor]  # "<param>.exp_avg" / ".exp_avg_sq" / ".step"
    rng: dict[int, dict[str, torch.Tensor]]  # rank -> {"torch_cpu", "generator"[, "cuda"]}
    losses: list[float]
    config: dict
    world_size: int = 1
    scaler: dict | None = None
    shape: tuple = (0, 0, 0)  # the student's signature; a refiner's: token_dim, inner_dim, heads
    student: str = REFINER_KIND  # Student.kind of the run that wrote it
    checks: list[Check] = field(default_factory=list)  # the progress checks so far (older states: none)


@dataclass
class TrainingHooks:
    """What an experiment may change in a run without patching the pack (the testbed's probes):
    on_refiner(module) sees the trainable refiner once, before the first step (e.g. to register
    training-only forward hooks); on_batch(batch, generator) may replace each micro-batch after the
    host drew it (draw from `generator` so that resume stays exact)."""
    on_refiner: Callable[[torch.nn.Module], None] | None = None
    on_batch: Callable[["Batch", torch.Generator], "Batch"] | None = None


class Student(Protocol):
    """What the loop trains. The loop owns optimizer, RNG, saving, resume and divergence handling.

    kind:               recorded in the state file; resume refuses a state of another kind
    named_trainable():  [(name, parameter)] in a fixed order: optimised, and saved under these names
    predict(batch):     the differentiable one-pass prediction for a batch (compared to the teacher)
    signature():        JSON-able shape description; resume refuses a state with another one
    check_batch(batch): optional; raise ValueError before any model pass when the batch cannot fit
    """
    kind: str

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]: ...

    def predict(self, batch: Batch) -> torch.Tensor: ...

    def signature(self) -> list: ...


class RefinerStudent:
    """A DiceRefiner as a Student: prediction = the host's one pass with refined tokens."""
    kind = REFINER_KIND

    def __init__(self, refiner: DiceRefiner, student: Callable[[Batch, torch.Tensor], torch.Tensor],
                 config: TrainConfig):
        self.refiner, self.student, self.config = refiner, student, config

    def named_trainable(self):
        return list(self.refiner.named_parameters())

    def signature(self) -> list:
        return [self.refiner.token_dim, self.refiner.inner_dim, self.refiner.heads]

    def check_batch(self, batch: Batch) -> None:
        for what, t in (("prompt", batch.c), ("null", batch.uc)):
            if t.shape[-1] != self.refiner.token_dim:
                raise ValueError(f"the {what} tokens are {t.shape[-1]}-d but the refiner is "
                                 f"{self.refiner.token_dim}-d: token_dim must be the text encoder's width")

    def predict(self, batch: Batch) -> torch.Tensor:
        refined = refine(self.refiner, batch.c, batch.uc, self.config.alpha, self.config.keep_first_token,
                         w_amount=batch.extra.get("w_amount") if batch.extra else None)
        return self.student(batch, refined)


# ---------------------------------------------------------------------------------------------
# Maths


def cfg_target(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + w * (cond - uncond)."""
    return pred_uncond + w * (pred_cond - pred_uncond)


def distill_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Sum over all elements divided by the batch size (official DICE: L1 for SD1.5, L2 for SDXL).

    Computed in fp32. With this reduction, averaging over ranks or micro-batches of equal size
    equals one big batch."""
    if pred.shape != target.shape:
        raise ValueError(f"student output {tuple(pred.shape)} and teacher output {tuple(target.shape)} "
                         "differ in shape: both must be the model output for the same x_t")
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss must be 'l1' or 'l2' (got {kind!r})")
    diff = pred.float() - target.float()
    return (diff.abs() if kind == "l1" else diff.square()).sum() / pred.shape[0]


def new_refiner(token_dim: int, inner_dim: int = DEFAULT_INNER_DIM, heads: int = DEFAULT_HEADS,
                seed: int = 0) -> DiceRefiner:
    """Default-initialised refiner with a zero last layer: S = 0, so it starts as plain cfg 1.

    fc2's gradient is relu(a)^T @ grad, non-zero, so learning starts at the first step. The
    global RNG is left untouched (the same seed gives the same init on every rank)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiceRefiner(token_dim, inner_dim, heads).zero_output_()


# ---------------------------------------------------------------------------------------------
# Distributed helpers (no-ops in a single process)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _any_rank(flag: bool, device: torch.device) -> bool:
    """All ranks must agree on stopping, or the next all_reduce would hang."""
    if _world()[1] == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _gather_rng(snapshot: dict[str, torch.Tensor], device: torch.device) -> dict[int, dict[str, torch.Tensor]]:
    """Every rank's RNG states, so that rank 0 can save them all (collective)."""
    rank, world = _world()
    if world == 1:
        return {0: snapshot}
    out: dict[int, dict[str, torch.Tensor]] = {r: {} for r in range(world)}
    for key in sorted(snapshot):
        mine = snapshot[key].to(device)
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
        for r, part in enumerate(parts):
            out[r][key] = part.cpu()
    return out


# ---------------------------------------------------------------------------------------------
# RNG and training-state file


def _rng_snapshot(generator: torch.Generator) -> dict[str, torch.Tensor]:
    snap = {"torch_cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initialise CUDA just for this
        snap["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return snap


def _restore_rng(snap: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(snap["torch_cpu"])
    generator.set_state(snap["generator"])
    cuda = snap.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() == cuda.shape[0]:
        torch.cuda.set_rng_state_all(list(cuda))


def save_training_state(path: str, refiner: DiceRefiner, optimizer: torch.optim.Optimizer, *, step: int,
                        losses: list[float], rng: dict[int, dict[str, torch.Tensor]], config: TrainConfig,
                        scaler: "torch.amp.GradScaler | None" = None, info: RefinerInfo | None = None) -> None:
    """Atomically write weights + AdamW moments + RNG states + losses as .safetensors (no pickle)."""
    save_student_state(path, RefinerStudent(refiner, None, config), optimizer, step=step, losses=losses, rng=rng,
                       config=config, scaler=scaler, metadata=_refiner_state_info(refiner, config, step, info))


def save_student_state(path: str, student: Student, optimizer: torch.optim.Optimizer, *, step: int,
                       losses: list[float], rng: dict[int, dict[str, torch.Tensor]], config: TrainConfig,
                       scaler: "torch.amp.GradScaler | None" = None, metadata: dict[str, str] | None = None,
                       checks: list[Check] | None = None) -> None:
    """save_training_state for any Student; metadata: the student's own file metadata (strings)."""
    named = student.named_trainable()
    tensors = {k: v.detach().float() for k, v in named}
    for name, p in named:
        for key, value in optimizer.state.get(p, {}).items():
            if key not in _ADAM_KEYS:
                raise TrainingStateError(f"unexpected optimizer state {key!r}: only AdamW state is saved")
            tensors[f"optim.{name}.{key}"] = torch.as_tensor(value)
    for rank, snap in rng.items():
        for key, t in snap.items():
            tensors[f"rng.rank{rank}.{key}"] = t
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
    meta = dict(format=STATE_FORMAT, format_version=STATE_FORMAT_VERSION, step=step,
                config=config.to_json(), shape=list(student.signature()),
                world_size=max(rng) + 1 if rng else 1,
                scaler=scaler.state_dict() if scaler is not None else None)
    if student.kind != REFINER_KIND:  # refiner states stay exactly as before
        meta["student"] = student.kind
    if checks:
        meta["checks"] = [[c.step, c.loss] for c in checks]
    metadata = {**(metadata or {}), _STATE_KEY: json.dumps(meta, sort_keys=True)}
    atomic_save_safetensors(tensors, path, metadata)


def load_training_state(path: str) -> TrainingState:
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise TrainingStateError(f"training state {name!r} does not exist (looked at {path})")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(_STATE_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise TrainingStateError(f"{name!r} is not a readable .safetensors training state: {e}") from None
    if raw is None:
        raise TrainingStateError(f"{name!r} has no training state (it may be a plain refiner file). "
                                 "To fine-tune an existing refiner, pass it as init instead of resuming.")
    meta = json.loads(raw)
    if meta.get("format") != STATE_FORMAT or meta.get("format_version", 0) > STATE_FORMAT_VERSION:
        raise TrainingStateError(f"{name!r}: unsupported training-state format {meta.get('format')!r} "
                                 f"version {meta.get('format_version')!r}")
    state = TrainingState(step=int(meta["step"]), refiner={}, optimizer={}, rng={},
                          losses=tensors.pop("losses").tolist(), config=meta["config"],
                          world_size=int(meta.get("world_size", 1)), scaler=meta.get("scaler"),
                          shape=tuple(meta["shape"]), student=meta.get("student", REFINER_KIND),
                          checks=[Check(int(a), float(b)) for a, b in meta.get("checks", [])])
    for key, t in tensors.items():
        if key.startswith("optim."):
            state.optimizer[key[len("optim."):]] = t
        elif key.startswith("rng.rank"):
            rank, kind = key[len("rng.rank"):].split(".", 1)
            state.rng.setdefault(int(rank), {})[kind] = t
        else:
            state.refiner[key] = t
    for k, v in state.refiner.items():
        if not torch.isfinite(v).all():
            raise TrainingStateError(f"{name!r}: parameter {k} is not finite; use an earlier state")
    return state


def _load_optimizer(optimizer: torch.optim.Optimizer, named: list, saved: dict[str, torch.Tensor]) -> None:
    sd = optimizer.state_dict()  # keeps the param groups (lr, betas...) of the current config
    sd["state"] = {}
    for index, (name, _) in enumerate(named):
        if f"{name}.exp_avg" in saved:
            sd["state"][index] = {k: saved[f"{name}.{k}"].clone() for k in _ADAM_KEYS}
    optimizer.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# The loop


def _autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    dtype = _AUTOCAST[config.autocast]
    if dtype is not None and device.type != "cuda":
        warnings.warn(f"autocast {config.autocast!r} applies on CUDA only; training on {device.type} in fp32")
        return None
    return dtype


def _grads_flat(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _train_step(student: Student, optimizer, scaler, sample_batch, teacher, config: TrainConfig,
                step: int, generator, amp_dtype, device, on_batch=None) -> float:
    """One optimizer step over grad_accum micro-batches (and all ranks); returns the global loss."""
    optimizer.zero_grad(set_to_none=True)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(config, step)
    params = [p for _, p in student.named_trainable()]
    amp = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    total = torch.zeros((), device=device)
    for _ in range(config.grad_accum):
        batch = sample_batch(step, generator)
        if on_batch is not None:
            batch = on_batch(batch, generator)
        if hasattr(student, "check_batch"):
            student.check_batch(batch)
        with amp():
            with torch.no_grad():
                target = teacher(batch)
            pred = student.predict(batch)
        loss = distill_loss(pred, target, config.loss) / config.grad_accum
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach().float().to(device)

    # One buffer: grads + loss, averaged across ranks in a single all_reduce.
    flat = torch.cat([_grads_flat(params), total.reshape(1)])
    _, world = _world()
    if world > 1:
        dist.all_reduce(flat)
        flat /= world
        total = flat[-1]  # rank-mean of per-rank means = global mean
    loss_value = float(total)
    # With fp16, inf grads are the scaler's business (it skips the step); otherwise they diverge.
    if not math.isfinite(loss_value) or (scaler is None and not bool(torch.isfinite(flat).all())):
        raise TrainingDiverged(step + 1, loss_value, config)
    if world > 1:
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss_value


def train_refiner(config: TrainConfig,
                  sample_batch: Callable[[int, torch.Generator], Batch],
                  teacher: Callable[[Batch], torch.Tensor],
                  student: Callable[[Batch, torch.Tensor], torch.Tensor],
                  *, token_dim: int, device: str | torch.device = "cpu",
                  state_path: str | None = None, resume: bool = False,
                  init: DiceRefiner | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  on_step: Callable[[int, int, float, float, float], None] | None = None,
                  info: RefinerInfo | None = None, hooks: TrainingHooks | None = None,
                  check_every: int = 0, on_check: Callable[[int, int, list[Check]], None] | None = None) -> TrainResult:
    """Distil CFG at config.guidance_scale into a DiceRefiner; see the module docstring.

    state_path: where the training state is written (every save_every steps, at the end, on cancel
    and when a callback raises; never after divergence). resume: continue from state_path if it
    exists (else start fresh). init: start from this refiner instead of a zero-output one.
    should_stop() is polled before every step; on True the state is saved and the result says
    cancelled. on_step(step, total, loss, elapsed_s, eta_s) follows every step. info: refiner
    metadata (family, base model) written into the state file so it also loads as a refiner.
    hooks: an experiment's changes to the run (TrainingHooks). check_every / on_check: train_student's.
    """
    config.validate()
    if not isinstance(token_dim, int) or token_dim <= 0:
        raise ValueError(f"token_dim must be a positive integer, the prompt token width (got {token_dim!r})")
    device = torch.device(device)

    if init is not None:
        if init.token_dim != token_dim:
            raise ValueError(f"init refiner is {init.token_dim}-d but token_dim is {token_dim}")
        refiner = DiceRefiner(init.token_dim, init.inner_dim, init.heads)
        refiner.load_state_dict({k: v.float() for k, v in init.state_dict().items()})
    else:
        refiner = new_refiner(token_dim, config.inner_dim, config.heads, config.seed)
    refiner.to(device).train().requires_grad_(True)
    if hooks is not None and hooks.on_refiner is not None:
        hooks.on_refiner(refiner)
    run = train_student(config, RefinerStudent(refiner, student, config), sample_batch, teacher, device=device,
                        state_path=state_path, resume=resume, should_stop=should_stop, on_step=on_step,
                        metadata=(lambda step: _refiner_state_info(refiner, config, step, info)),
                        on_batch=hooks.on_batch if hooks is not None else None,
                        check_every=check_every, on_check=on_check)
    refiner.eval().requires_grad_(False)
    return TrainResult(refiner=refiner, step=run.step, losses=run.losses, cancelled=run.cancelled,
                       state_path=run.state_path, resumed_from=run.resumed_from, config=config, checks=run.checks)


def _refiner_state_info(refiner: DiceRefiner, config: TrainConfig, step: int, info: RefinerInfo | None) -> dict:
    """Refiner metadata for the state file, so that a state also loads as a refiner."""
    return replace(info or RefinerInfo(0, 0), token_dim=refiner.token_dim, inner_dim=refiner.inner_dim,
                   heads=refiner.heads, guidance_scale=float(config.guidance_scale), train_steps=step,
                   keep_first_token=config.keep_first_token).to_metadata()


@dataclass
class StudentRun:
    """What train_student did; the student's parameters hold the result."""
    step: int
    losses: list[float]
    cancelled: bool
    state_path: str | None
    resumed_from: int = 0
    checks: list[Check] = field(default_factory=list)


def train_student(config: TrainConfig, student: Student,
                  sample_batch: Callable[[int, torch.Generator], Batch],
                  teacher: Callable[[Batch], torch.Tensor], *,
                  device: str | torch.device = "cpu", state_path: str | None = None, resume: bool = False,
                  should_stop: Callable[[], bool] | None = None,
                  on_step: Callable[[int, int, float, float, float], None] | None = None,
                  metadata: Callable[[int], dict[str, str]] | None = None,
                  on_batch: Callable[[Batch, torch.Generator], Batch] | None = None,
                  check_every: int = 0, check_batches: int | None = None,
                  on_check: Callable[[int, int, list[Check]], None] | None = None) -> StudentRun:
    """The loop for any Student (train_refiner's state, resume, cancel and divergence rules).

    The student's parameters must be on `device`, trainable and already initialised (the same on
    every rank, or rank 0's are broadcast). metadata(step) -> extra string metadata of state files.
    on_batch(batch, generator) -> batch: TrainingHooks.on_batch.
    check_every > 0: the progress check (ProgressCheck, check_batches micro-batches, by default
    min(grad_accum, 4): at most an optimizer step's worth of forwards per check; rank 0 only) at
    the start, every check_every steps and at the end; on_check(step, total, checks) sees each, and
    the checks are saved with the state (a resumed run continues the series)."""
    config.validate()
    rank, _ = _world()
    device = torch.device(device)
    amp_dtype = _autocast_dtype(config, device)
    named = student.named_trainable()
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas),
                                  weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None
    generator = torch.Generator().manual_seed(config.seed + rank)  # each rank its own data
    torch.manual_seed(config.seed + rank)

    step, losses, resumed, checks = 0, [], False, []
    if resume and state_path and os.path.exists(state_path):
        state = load_training_state(state_path)
        name = os.path.basename(state_path)
        if state.student != student.kind:
            raise TrainingStateError(f"{name!r} is the training state of a {state.student}, this run trains "
                                     f"a {student.kind}: use another name or resume off")
        shape = tuple(student.signature())
        if tuple(state.shape) != shape:
            what = ("holds a refiner of token dim / inner dim / heads" if student.kind == REFINER_KIND
                    else f"holds a {state.student} of shape")
            raise TrainingStateError(f"{name!r} {what} {tuple(state.shape)}, this run wants {shape}")
        with torch.no_grad():
            for key, p in named:
                if key not in state.refiner:
                    raise TrainingStateError(f"{name!r} has no tensor {key!r}: it was written by a different set-up")
                p.copy_(state.refiner[key])
        _load_optimizer(optimizer, named, state.optimizer)
        if scaler is not None and state.scaler:
            scaler.load_state_dict(state.scaler)
        if rank in state.rng:
            _restore_rng(state.rng[rank], generator)
        else:  # saved by a different world size (or after a crash): new but well-defined streams
            generator.manual_seed(config.seed + rank + 1_000_003 * state.step)
        step, losses, resumed = state.step, list(state.losses), True
        checks = list(state.checks)
    if _world()[1] > 1:  # all ranks start from rank 0's weights
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    start_step, started = step, time.monotonic()
    check_batches = check_batches or min(config.grad_accum, 4)
    probe = ProgressCheck(sample_batch, teacher, config, check_batches, device, amp_dtype) \
        if check_every > 0 and rank == 0 and step < config.steps else None

    def check() -> None:
        checks.append(Check(step, probe.measure(student)))
        if on_check is not None:
            on_check(step, config.steps, list(checks))

    if probe is not None and not checks:  # a resumed run continues its series (older states start one)
        check()

    def save(rng_by_rank) -> None:
        if rank == 0 and state_path:
            save_student_state(state_path, student, optimizer, step=step, losses=losses, rng=rng_by_rank,
                               config=config, scaler=scaler, metadata=metadata(step) if metadata else None,
                               checks=checks)

    cancelled = False
    rng_now = _rng_snapshot(generator)  # always the RNG state a run resumed at `step` must start from
    try:
        while step < config.steps:
            if config.save_every and step > start_step and step % config.save_every == 0:
                save(_gather_rng(rng_now, device))
            if _any_rank(bool(should_stop()) if should_stop else False, device):
                cancelled = True
                break
            loss = _train_step(student, optimizer, scaler, sample_batch, teacher, config,
                               step, generator, amp_dtype, device, on_batch)
            step += 1
            losses.append(loss)
            rng_now = _rng_snapshot(generator)
            if on_step is not None:
                elapsed = time.monotonic() - started
                on_step(step, config.steps, loss, elapsed, elapsed / (step - start_step) * (config.steps - step))
            if probe is not None and (step % check_every == 0 or step == config.steps):
                check()
    except TrainingDiverged:
        raise  # keep the last good state file as it is
    except BaseException:
        # A host interrupt (ComfyUI raises) or a failing callback: keep what was learned. Other
        # ranks' RNG states are not reachable here without a collective, so only this rank's go in.
        if step > start_step:
            try:
                save({rank: rng_now})
            except Exception as e:  # the original error matters more
                warnings.warn(f"could not save the training state after an error: {e}")
        raise
    if step > start_step or not resumed:
        save(_gather_rng(rng_now, device))
    return StudentRun(step=step, losses=losses, cancelled=cancelled, state_path=state_path if state_path else None,
                      resumed_from=start_step if resumed else 0, checks=checks)


@torch.no_grad()
def evaluate_gap(refiner: DiceRefiner, batches: Iterable[Batch],
                 teacher: Callable[[Batch], torch.Tensor],
                 student: Callable[[Batch, torch.Tensor], torch.Tensor], *,
                 loss: str = "l2", alpha: float = 1.0, keep_first_token: bool = True) -> GapReport:
    """Held-out distillation gap: per-sample loss of refined one-pass vs CFG, and of plain cfg 1."""
    was_training = refiner.training
    refiner.eval()
    refined_sum = baseline_sum = 0.0
    samples = 0
    try:
        for batch in batches:
            target = teacher(batch)
            n = batch.c.shape[0]
            refined = refine(refiner, batch.c, batch.uc, alpha, keep_first_token)
            refined_sum += float(distill_loss(student(batch, refined), target, loss)) * n
            baseline_sum += float(distill_loss(student(batch, batch.c), target, loss)) * n
            samples += n
    finally:
        refiner.train(was_training)
    if samples == 0:
        raise ValueError("evaluate_gap got no batches")
    return GapReport(refined=refined_sum / samples, baseline=baseline_sum / samples, samples=samples)

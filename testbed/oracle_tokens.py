"""How far can ANY rewrite of the prompt tokens take one pass towards CFG? (issue 11, item 1)

A DICE refiner is one small network shared by all prompts, trained on other prompts than the ones it
is judged on. This script removes both limits: every held-out prompt gets its own free token offsets
(77 x 768 numbers, start token kept), trained with the refiner's own loss and loop against CFG w=5
on images of THAT prompt's combination. The held-out prompts are then sampled at cfg 1 with their
optimised tokens and judged like the bench. It is a probe, not a method (it needs the answer's
images). Meant as an upper bound for a token rewrite, it did not turn out as one: at 2000 x 16 it
reached 72% of CFG's gain, below the shared refiner's 77-83% (each prompt saw only about 530
samples); see testbed/RESULTS_dice.md.

    python -m testbed.oracle_tokens --prompts 60 --seeds 4 --steps 2000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from testbed import data, judge  # noqa: E402
from testbed.model import WEIGHTS_DIR  # noqa: E402


class TokenTable:
    """A Student of the core loop: one free offset table per prompt, added to its tokens."""
    kind = "token-table"

    def __init__(self, prompts, student):
        self.index = {id(p): i for i, p in enumerate(prompts)}
        _, t, d = prompts[0].tokens.shape
        self.delta = torch.nn.Parameter(torch.zeros(len(prompts), t, d))
        self.mask = torch.ones(1, t, 1)
        self.mask[:, 0] = 0.0  # the start token stays, as a refiner keeps it
        self.student = student

    def named_trainable(self):
        return [("delta", self.delta)]

    def signature(self) -> list:
        return list(self.delta.shape)

    def offsets(self, rows: list[int]) -> torch.Tensor:
        return self.delta[rows] * self.mask

    def predict(self, batch):
        rows = [self.index[id(p)] for p in batch.extra["prompts"]]
        return self.student(batch, batch.c + self.offsets(rows).to(batch.c))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=60, help="held-out prompts (the bench's first N)")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--per-combo", type=int, default=16, help="training images per held-out combination")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1, help="the bench's base seed")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "testbed", "oracle_tokens.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("TESTBED_THREADS", "2")))

    from testbed.assemble import assemble
    from testbed.bench import Runner, load_pack
    from testbed.train_refiner import skip_identity_layers

    pack = load_pack()
    import comfy.sd

    training = sys.modules[pack.__name__ + ".cfg_distill.training"]
    host_mod = sys.modules[pack.__name__ + ".nodes.comfy_training"]
    ckpt = assemble(os.path.join(ROOT, "out", "testbed"), WEIGHTS_DIR)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt)[:3]
    skip_identity_layers(clip)

    _train, held = data.split()
    combos = held[:args.prompts]
    prompts = [c.prompt(i) for i, c in enumerate(combos)]  # as the bench phrases them
    images, index, _captions = data.make_set(combos, args.per_combo, 777)
    encoded = host_mod.encode_prompts(clip, prompts)
    null = host_mod.encode_prompts(clip, [""])[0]
    host = host_mod.ComfyDistillHost(model, encoded, null, 5.0, args.batch_size)
    host.load()
    with torch.no_grad():
        host.add_x0_from_images(vae.encode(torch.from_numpy(images)[..., :3].clone()), list(index))
    table = TokenTable(encoded, host.student)
    config = training.TrainConfig(guidance_scale=5.0, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                  lr_schedule="cosine", weight_decay=0.0, seed=0)
    t0 = time.monotonic()

    def on_step(step, total, loss, elapsed, eta):
        if step % 50 == 0 or step == total:
            print(f"[{time.strftime('%H:%M:%S')}] step {step}/{total} loss {loss:.4g} eta {eta:.0f}s", flush=True)

    with torch.inference_mode(False), torch.enable_grad():
        run = training.train_student(config, table, host.sample_batch, host.teacher, device=host.device,
                                     on_step=on_step)
    host.cleanup()
    train_seconds = time.monotonic() - t0
    print(f"trained {run.step} steps in {train_seconds:.0f}s; final losses {np.round(run.losses[-5:], 3).tolist()}")

    runner = Runner(ckpt)
    c = runner.encode(prompts)
    null_c = runner.encode([""])
    with torch.no_grad():
        tuned = c + table.offsets(list(range(len(prompts)))).to(c)
    rep = lambda t: t.repeat_interleave(args.seeds, dim=0)  # noqa: E731  row = prompt * seeds + seed
    row_combos = [cb for cb in combos for _ in range(args.seeds)]
    rows = {}
    for key, pos, cfg in (("cfg1", c, 1.0), ("cfg5", c, 5.0), ("oracle", tuned, 1.0)):
        imgs, _ = runner.sample(rep(pos), null_c, cfg, args.sample_steps, args.seed)
        rows[key] = judge.score(imgs, row_combos)["alignment"]
        print(f"  {key}: alignment {rows[key]:.1f}%", flush=True)
    recovery = (rows["oracle"] - rows["cfg1"]) / (rows["cfg5"] - rows["cfg1"])
    print(f"per-prompt token offsets (oracle) recover {100 * recovery:.0f}% of CFG w=5's gain "
          f"({args.prompts} held-out prompts x {args.seeds} seeds)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(vars(args), alignment=rows, recovery=recovery, train_seconds=round(train_seconds),
                       final_loss=float(np.mean(run.losses[-20:]))), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

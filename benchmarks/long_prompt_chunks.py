"""Long prompts (several 77-token chunks) on the testbed model: which start tokens to keep.

    python benchmarks/long_prompt_chunks.py [--prompts 24]

Prompts are the testbed's held-out prompts repeated to 2 and 3 chunks and encoded by ComfyUI's own
CLIPTextEncode (library mode), so the chunking is ComfyUI's. The refiner is the testbed's
(trained on 77-token prompts). Prints:
- how far each chunk's start token is from token 0 (CLIP's causal attention makes the start token's
  output the same in every chunk, so the model only ever sees that one vector there);
- refining the whole prompt at once vs each 77-token chunk alone against the same uc;
- the guidance gap left, ||D(refined) - D_cfg|| / ||D(c) - D_cfg|| (D = the model's denoised output
  at forward-noised data latents of the prompt's own images, D_cfg = CFG w=5 with ""), for the rule "keep every chunk's start
  token" vs "keep token 0 only" (the rule before long prompts were handled). Lower is better.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise-levels", type=int, default=4, help="noise levels per prompt")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from testbed import data
    from testbed.assemble import assemble
    from testbed.bench import load_pack
    from testbed.model import REFINER_FILE, WEIGHTS_DIR

    pack = load_pack()
    core = sys.modules[pack.__name__ + ".cfg_distill"]
    import comfy.sd
    import nodes

    model, clip = comfy.sd.load_checkpoint_guess_config(assemble())[:2]
    loaded = core.load_refiner(os.path.join(WEIGHTS_DIR, REFINER_FILE))
    refiner = loaded.module.float().eval()
    enc = nodes.CLIPTextEncode()

    def encode(text):
        return enc.encode(clip, text)[0][0][0].float()

    _train, held = data.split()
    combos = held[:args.prompts]
    _images, _index, _p, latents = data.make_set(combos, 1, args.seed, with_latents=True)
    latents = torch.from_numpy(latents)
    uc = encode("")
    g = torch.Generator().manual_seed(args.seed)
    k = args.noise_levels
    sigmas = torch.exp(torch.empty(len(combos), k).uniform_(np.log(0.1), np.log(10.0), generator=g))
    noise = torch.randn((len(combos), k) + tuple(latents.shape[1:]), generator=g)

    def denoised(x, sigma, cond):
        with torch.no_grad():
            return model.model.apply_model(x, sigma, c_crossattn=cond)

    rows = []
    for chunks in (1, 2, 3):
        start_diff, split_diff, gap_all, gap_first = [], [], [], []
        for i, combo in enumerate(combos):
            text = combo.prompt(i)
            n = 1
            while len(clip.tokenize(", ".join([text] * (n + 1)))["l"]) <= chunks:
                n += 1  # the longest repetition that still fits in `chunks` chunks (tokenizing is cheap)
            c = encode(", ".join([text] * n))
            if c.shape[1] != 77 * chunks:
                raise SystemExit(f"{n} x {text!r} gives {c.shape[1]} tokens, not {77 * chunks}")
            starts = core.refiner.start_token_positions(c.shape[1])
            start_diff.append(max((c[:, p] - c[:, 0]).abs().max().item() for p in starts))
            with torch.no_grad():
                joint = core.refine(refiner, c, uc)
                alone = torch.cat([core.refine(refiner, c[:, k:k + 77], uc) for k in range(0, c.shape[1], 77)], 1)
                first_only = torch.cat([c[:, :1], (c + refiner(c, uc))[:, 1:]], dim=1)
            split_diff.append((joint - alone).abs().max().item())
            x = latents[i:i + 1] + sigmas[i][:, None, None, None] * noise[i]  # [k, 4, h, w]
            s_ = sigmas[i]
            rep = lambda t: t.expand(k, -1, -1)  # noqa: E731
            d_c, d_uc = denoised(x, s_, rep(c)), denoised(x, s_, rep(uc))
            d_cfg = d_uc + 5.0 * (d_c - d_uc)
            base = (d_c - d_cfg).flatten(1).norm(dim=1)
            gap_all += ((denoised(x, s_, rep(joint)) - d_cfg).flatten(1).norm(dim=1) / base).tolist()
            gap_first += ((denoised(x, s_, rep(first_only)) - d_cfg).flatten(1).norm(dim=1) / base).tolist()
        better = float(np.mean(np.array(gap_all) < np.array(gap_first))) if chunks > 1 else float("nan")
        rows.append((77 * chunks, max(start_diff), max(split_diff), np.mean(gap_all), np.mean(gap_first), better,
                     np.median(gap_all), np.median(gap_first)))

    print(f"testbed, {len(combos)} held-out prompts x {k} noise levels (sigma log-uniform 0.1..10), CFG w=5 target")
    print("| tokens | max |start_k - start_0| | max |joint - per chunk| | gap left, keep every chunk start "
          "| gap left, keep token 0 only | cases where keeping every start is better |")
    print("|---|---|---|---|---|---|")
    for t, sd, sp, ga, gf, b, ma, mf in rows:
        print(f"| {t} | {sd:.3g} | {sp:.3g} | mean {ga:.3f}, median {ma:.3f} | mean {gf:.3f}, median {mf:.3f} "
              f"| {'-' if b != b else f'{100 * b:.0f}%'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

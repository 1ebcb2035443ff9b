#!/usr/bin/env python
"""GPU check: the pack's nodes on ComfyUI 0.33's dynamic-VRAM model loading (ModelPatcherDynamic).

Why a GPU script and not a CPU test: ComfyUI 0.33 selects dynamic VRAM in main.py only for NVIDIA /
AMD devices through comfy-aimdo's native library (`--cpu` turns it off; `--cpu --enable-dynamic-vram`
crashes in comfy_aimdo.control.init_devices on the CPU device's missing index), and
ModelPatcherDynamic.__new__ itself hands a CPU load device back to the legacy ModelPatcher. So the
dynamic path cannot run on a CPU, and this script is run on a lent NVIDIA GPU
(benchmarks/gpu_dynamic_vram.sh prepares and runs it).

Library mode, as ComfyUI's main.py would set it up on an NVIDIA GPU: comfy-aimdo initialised for the
device, CoreModelPatcher = ModelPatcherDynamic and memory_management.aimdo_enabled (the three things
main.py does when dynamic VRAM is on; checked below through the patcher class the loader returns).
Then, on the tiny SD1.5 checkpoint (tools/tiny_models.py) and a tiny SD3 (MMDiT, ComfyUI's own class):
  1. Apply DICE Refiner and TeEFusion Conditioning -> stock KSampler at cfg 1: one model pass per step,
     finite, the refined / fused run differs from the plain one, and equals the legacy patcher's run
     on the same GPU (same model, ModelPatcher instead of ModelPatcherDynamic) within --tol;
  2. TeEFusion Model Patch on the SD3 wrapped in ModelPatcherDynamic: same checks;
  3. Train DICE Refiner and Train TeEFusion (a few steps each) on the dynamic MODEL: finite losses,
     files written, the MODEL's own sampling output unchanged afterwards, the host's training flag put back.
Prints one line per check and `N passed, N failed`; exit status 1 on any failure.

    python3 benchmarks/gpu_dynamic_vram_check.py --comfyui PATH/TO/ComfyUI-0.33.0       # GPU, dynamic
    python benchmarks/gpu_dynamic_vram_check.py --comfyui .comfyui-0.33.0/ComfyUI --legacy-cpu
        # the same checks through the legacy patcher on CPU (a dry run of this script, no dynamic VRAM)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
results: list[tuple[str, bool, str]] = []


def check(name):
    def run(fn):
        try:
            detail = fn() or ""
            results.append((name, True, detail))
            print(f"PASS {name} {detail}", flush=True)
        except Exception as e:  # noqa: BLE001  every check reports, the script goes on
            results.append((name, False, repr(e)))
            print(f"FAIL {name}: {e!r}", flush=True)
            traceback.print_exc()
        return fn
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfyui", required=True, help="a ComfyUI 0.33 tree (its folder holding main.py)")
    ap.add_argument("--legacy-cpu", action="store_true", help="dry run on CPU through the legacy ModelPatcher")
    ap.add_argument("--tol", type=float, default=2e-2, help="max |dynamic - legacy| of sampled latents")
    opts = ap.parse_args()

    comfy_dir = os.path.abspath(opts.comfyui)
    os.environ["CFG_DISTILL_COMFYUI"] = comfy_dir  # tools/comfy_env.py (used by tools/tiny_models.py)
    sys.path[:0] = [comfy_dir, ROOT]
    import torch

    from tools.torchaudio_cpu_shim import stand_in_if_missing

    # ComfyUI imports PyAV (video I/O) at start-up; where it is not installed (the wheel is too big to
    # carry to a GPU machine) a stand-in that refuses use. A real installation always wins.
    stand_in_if_missing("av", " (benchmarks/gpu_dynamic_vram_check.py: video I/O is not part of this check)")

    from comfy_headless import import_comfy, load_pack, pack_module

    import_comfy(comfy_dir, cpu=opts.legacy_cpu)
    import tools.tiny_models

    # The tiny-model builders call the tests' library-mode helper, which forces CPU; here the device
    # is this script's to choose (ComfyUI is already on sys.path).
    tools.tiny_models.use_comfy_library = lambda: comfy_dir
    import comfy.model_management as mm
    import comfy.memory_management
    import comfy.model_patcher

    if not opts.legacy_cpu:
        # What ComfyUI 0.33's main.py does on an NVIDIA GPU when dynamic VRAM is on (its default there).
        assert torch.cuda.is_available(), "no CUDA device: run with --legacy-cpu for a CPU dry run"
        import comfy_aimdo.control

        assert comfy_aimdo.control.init(), "comfy-aimdo's native library did not load"
        device = mm.get_torch_device()
        assert comfy_aimdo.control.init_devices([device.index or 0]), "comfy-aimdo did not take the GPU"
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    dynamic_cls = comfy.model_patcher.ModelPatcherDynamic
    legacy_cls = comfy.model_patcher.ModelPatcher

    import folder_paths
    import nodes  # ComfyUI's nodes.py first, as in the server

    pack = load_pack()
    refiner_nodes = pack_module(pack, "nodes.refiner_nodes")
    fusion_nodes = pack_module(pack, "nodes.fusion_nodes")
    teefusion_patch = pack_module(pack, "nodes.teefusion_patch")
    comfy_host = pack_module(pack, "nodes.comfy_host")
    from cfg_distill import DiceRefiner, LoadedRefiner, RefinerInfo
    from cfg_distill.request import TrainRequest
    from tools.tiny_models import build_tiny_sd3, write_tiny_sd15

    work = tempfile.mkdtemp(prefix="cfg-distill-gpu-")
    for folder in ("dice_refiners", "loras"):
        os.makedirs(os.path.join(work, folder))
        folder_paths.folder_names_and_paths[folder] = ([os.path.join(work, folder)], {".safetensors"})
    ckpt = write_tiny_sd15(os.path.join(work, "tiny-sd15.safetensors"))
    import comfy.sd

    model, clip = comfy.sd.load_checkpoint_guess_config(ckpt)[:2]
    print(f"torch {torch.__version__}; device {mm.get_torch_device()}; MODEL patcher {type(model).__name__}",
          flush=True)
    want_cls = legacy_cls if opts.legacy_cpu else dynamic_cls

    @check("the loader returns the expected patcher")
    def _():
        assert type(model) is want_cls, f"{type(model).__name__}, expected {want_cls.__name__}"
        return type(model).__name__

    def legacy_twin(mp):
        """The same checkpoint under the legacy patcher on the same device: the host's own way
        (clone(disable_dynamic=True) loads a second, non-dynamic copy)."""
        return mp if type(mp) is legacy_cls else mp.clone(disable_dynamic=True)

    def sample(mp, pos, neg, shape, steps=4, sampler="euler", scheduler="normal"):
        rows = [0]
        mp = mp.clone()

        def count(apply_model, args):
            rows[0] += int(args["input"].shape[0])
            return apply_model(args["input"], args["timestep"], **args["c"])

        mp.set_model_unet_function_wrapper(count)
        latent = {"samples": torch.zeros(shape)}
        with torch.inference_mode():
            out = nodes.common_ksampler(mp, 7, steps, 1.0, sampler, scheduler, pos, neg, latent)[0]["samples"]
        assert rows[0] == steps, f"{rows[0]} model rows for {steps} steps at cfg 1"
        assert torch.isfinite(out).all()
        return out.float().cpu()

    pos = nodes.CLIPTextEncode().encode(clip, "a red fox in the snow")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    torch.manual_seed(0)
    module = DiceRefiner(768).eval()
    torch.nn.init.normal_(module.fc2.weight, std=0.05)  # a visible change
    refiner = LoadedRefiner(module, RefinerInfo(768, 512, base_family="sd15", guidance_scale=5.0, train_steps=0),
                            "sd15-random.safetensors")
    plain = sample(model, pos, neg, (1, 4, 8, 8))

    def one_pass_and_legacy(conditioning):
        out = sample(model, conditioning, neg, (1, 4, 8, 8))
        assert (out - plain).abs().max() > 1e-4, "the conditioning changed nothing"
        ref = sample(legacy_twin(model), conditioning, neg, (1, 4, 8, 8))
        diff = float((out - ref).abs().max())
        assert diff <= opts.tol, f"dynamic vs legacy patcher: max |diff| {diff:.3g} > {opts.tol}"
        return f"(max |dynamic - legacy| {diff:.2g})"

    @check("Apply DICE Refiner -> KSampler cfg 1")
    def _():
        refined = refiner_nodes.ApplyDiceRefiner.execute(pos, neg, refiner, 1.0).result[0]
        return one_pass_and_legacy(refined)

    @check("TeEFusion Conditioning -> KSampler cfg 1")
    def _():
        fused = fusion_nodes.TeEFusionConditioning.execute(pos, neg, 5.0, True, True).result[0]
        return one_pass_and_legacy(fused)

    @check("TeEFusion Model Patch (tiny SD3) -> KSampler cfg 1")
    def _():
        sd3 = build_tiny_sd3(seed=3)
        mp = sd3 if opts.legacy_cpu else dynamic_cls(sd3.model, mm.get_torch_device(), mm.unet_offload_device())
        assert type(mp) is want_cls, type(mp).__name__
        g = torch.Generator().manual_seed(0)
        ctx, p_c, p_null = torch.randn(1, 12, 4096, generator=g), torch.randn(1, 2048, generator=g), \
            torch.randn(1, 2048, generator=g)
        c = [[ctx, {"pooled_output": p_c}]]
        n = [[torch.zeros_like(ctx), {"pooled_output": p_null}]]
        patched = teefusion_patch.apply_teefusion_patch(mp, p_null, 5.0)
        out = sample(patched, c, n, (1, 16, 8, 8), scheduler="simple")
        base = sample(mp, c, n, (1, 16, 8, 8), scheduler="simple")
        assert (out - base).abs().max() > 1e-4, "the patch changed nothing"
        if opts.legacy_cpu:
            twin = patched
        else:  # the same weights (same seed) under the legacy patcher on the GPU, patched the same way
            again = build_tiny_sd3(seed=3)
            twin = teefusion_patch.apply_teefusion_patch(
                legacy_cls(again.model, mm.get_torch_device(), mm.unet_offload_device()), p_null, 5.0)
        ref = sample(twin, c, n, (1, 16, 8, 8), scheduler="simple")
        diff = float((out - ref).abs().max())
        assert diff <= opts.tol, f"dynamic vs legacy patcher: max |diff| {diff:.3g} > {opts.tol}"
        return f"(max |dynamic - legacy| {diff:.2g})"

    prompts = ["a red fox in the snow", "a blue car on a bridge", "a bowl of fruit", "a castle at night"]
    small = dict(prompts=prompts, steps=6, batch_size=2, loss="l2", width=64, height=64, seed=0, save_every=0,
                 x0_steps=2)

    @check(f"Train DICE Refiner on the {want_cls.__name__} MODEL")
    def _():
        request = TrainRequest(method="dice", name="gpu-dynamic", guidance_scale=5.0, lr=1e-3, **small)
        out = comfy_host.train(request, model, clip, checkpoint="tiny-sd15.safetensors")
        loaded = out.refiner
        assert os.path.isfile(os.path.join(work, "dice_refiners", "gpu-dynamic.safetensors"))
        assert all(torch.isfinite(p).all() for p in loaded.module.parameters())
        after = sample(model, pos, neg, (1, 4, 8, 8))
        assert torch.equal(after, plain), "training changed the MODEL's own output"
        assert getattr(mm, "in_training", False) is False, "the host's in_training flag was left set"
        return f"({out.step} steps, final loss {out.final_loss:.4g})"

    @check(f"Train TeEFusion on the {want_cls.__name__} MODEL")
    def _():
        request = TrainRequest(method="teefusion", name="gpu-dynamic-teefusion", w_min=2.0, w_max=8.0, lr=3e-4,
                               rank=4, **small)
        out = comfy_host.train(request, model, clip, checkpoint="tiny-sd15.safetensors")
        assert os.path.isfile(os.path.join(work, "loras", "gpu-dynamic-teefusion.safetensors"))
        after = sample(model, pos, neg, (1, 4, 8, 8))
        assert torch.equal(after, plain), "training changed the MODEL's own output"
        assert getattr(mm, "in_training", False) is False, "the host's in_training flag was left set"
        assert out.final_loss == out.final_loss, "NaN loss"
        return f"({out.step} steps, final loss {out.final_loss:.4g})"

    passed = sum(ok for _, ok, _ in results)
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Measurement nodes for tests, the demo and benchmarks (never loaded for users).

CountModelCalls clones a MODEL and wraps its diffusion-model call through the documented
set_model_unet_function_wrapper hook, recording the batch size and duration of every call;
ReportModelCalls (run after the sampler, through its LATENT) returns the record as UI output so
/history shows it."""
import hashlib
import time

import torch

_RECORDS: dict[str, list] = {}


class CountModelCalls:
    CATEGORY = "testing/cfg-distill"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "wrap"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "label": ("STRING", {"default": "run"})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # re-run every time so each prompt starts a fresh record

    def wrap(self, model, label):
        record = _RECORDS[label] = []
        m = model.clone()

        def wrapper(apply_model, args):
            start = time.perf_counter()
            out = apply_model(args["input"], args["timestep"], **args["c"])
            record.append({"batch": int(args["input"].shape[0]), "start": start,
                           "seconds": time.perf_counter() - start,
                           "cond_or_uncond": list(args.get("cond_or_uncond", []))})
            return out

        m.set_model_unet_function_wrapper(wrapper)
        return (m,)


class ReportModelCalls:
    CATEGORY = "testing/cfg-distill"
    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "label": ("STRING", {"default": "run"})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def report(self, samples, label):
        calls = _RECORDS.get(label, [])
        span = (calls[-1]["start"] + calls[-1]["seconds"] - calls[0]["start"]) if calls else 0.0
        latent = samples["samples"]
        summary = {"label": label, "calls": len(calls), "batches": [c["batch"] for c in calls],
                   "cond_or_uncond": [c["cond_or_uncond"] for c in calls],
                   "model_seconds": sum(c["seconds"] for c in calls), "sampling_seconds": span,
                   "latent_finite": bool(torch.isfinite(latent).all()),
                   "latent_mean": float(latent.float().mean()), "latent_std": float(latent.float().std()),
                   "latent_sha256": hashlib.sha256(latent.float().contiguous().numpy().tobytes()).hexdigest()}
        return {"ui": {"model_calls": [summary]}, "result": ()}


class ConditioningProbe:
    """Exposes a CONDITIONING's shapes and a few statistics as UI output (for assertions)."""
    CATEGORY = "testing/cfg-distill"
    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)},
                "optional": {"reference": ("CONDITIONING",)}}

    def probe(self, conditioning, reference=None):
        entries = []
        for i, (tokens, extras) in enumerate(conditioning):
            e = {"shape": list(tokens.shape), "dtype": str(tokens.dtype), "keys": sorted(extras),
                 "finite": bool(torch.isfinite(tokens).all()), "sum": float(tokens.double().sum())}
            pooled = extras.get("pooled_output")
            if pooled is not None:
                e["pooled_shape"] = list(pooled.shape)
                e["pooled_sum"] = float(pooled.double().sum())
            if reference is not None and i < len(reference):
                ref_t, ref_x = reference[i]
                if ref_t.shape == tokens.shape:
                    d = (tokens.float() - ref_t.float()).abs()
                    e["max_abs_diff"] = float(d.max())
                    e["first_token_diff"] = float(d[:, 0].max())
                    e["unchanged_positions"] = [int(i) for i in torch.nonzero(d.amax(dim=(0, 2)) == 0).flatten()]
                if pooled is not None and ref_x.get("pooled_output") is not None:
                    e["pooled_equal"] = bool(torch.equal(pooled, ref_x["pooled_output"]))
            entries.append(e)
        return {"ui": {"conditioning": entries}, "result": ()}


NODE_CLASS_MAPPINGS = {"CountModelCalls": CountModelCalls, "ReportModelCalls": ReportModelCalls,
                       "ConditioningProbe": ConditioningProbe}


class PoisonConditioning:
    """Returns a copy of the conditioning with one NaN token value (to test error handling)."""
    CATEGORY = "testing/cfg-distill"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "poison"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    def poison(self, conditioning):
        out = []
        for tokens, extras in conditioning:
            t = tokens.clone()
            t[0, 1, 0] = float("nan")
            out.append([t, dict(extras)])
        return (out,)


NODE_CLASS_MAPPINGS["PoisonConditioning"] = PoisonConditioning


class EmitFakeTrainingProgress:
    """Sends the training node's websocket events without training (browser tests of the live view).

    Same contract as the real TrainDiceRefiner: "cfg_distill.train.progress" once per step with
    {node, step, total, loss, eta_s, elapsed_s}, then "cfg_distill.train.done" with
    {node, final_loss, file, cancelled, steps}. `target_node` names the node the view draws on;
    empty means this node itself."""
    CATEGORY = "testing/cfg-distill"
    RETURN_TYPES = ()
    FUNCTION = "emit"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": ("INT", {"default": 8, "min": 1, "max": 10000}),
                             "seconds_per_step": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 10.0}),
                             "file": ("STRING", {"default": "fake-refiner.safetensors"}),
                             "target_node": ("STRING", {"default": ""})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def emit(self, steps, seconds_per_step, file, target_node, unique_id=None):
        import comfy.model_management
        from server import PromptServer

        node = target_node or str(unique_id)
        send = PromptServer.instance.send_sync
        start, loss, done = time.perf_counter(), 1.0, 0
        for step in range(1, steps + 1):
            time.sleep(seconds_per_step)
            try:
                comfy.model_management.throw_exception_if_processing_interrupted()
            except comfy.model_management.InterruptProcessingException:
                send("cfg_distill.train.done", {"node": node, "final_loss": loss, "file": "",
                                                "cancelled": True, "steps": done})
                raise
            loss = 0.05 + 0.95 * 0.7 ** step  # a plausible decreasing curve
            done = step
            elapsed = time.perf_counter() - start
            send("cfg_distill.train.progress", {"node": node, "step": step, "total": steps, "loss": loss,
                                                "eta_s": elapsed / step * (steps - step), "elapsed_s": elapsed})
        send("cfg_distill.train.done", {"node": node, "final_loss": loss, "file": file,
                                        "cancelled": False, "steps": done})
        return {"ui": {"fake_training": [{"node": node, "steps": done, "final_loss": loss}]}, "result": ()}


NODE_CLASS_MAPPINGS["EmitFakeTrainingProgress"] = EmitFakeTrainingProgress


class PoisonModelAfter:
    """A clone of MODEL whose outputs turn NaN after `calls` diffusion-model calls (tests NaN handling)."""
    CATEGORY = "testing/cfg-distill"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "wrap"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "calls": ("INT", {"default": 10, "min": 0})}}

    def wrap(self, model, calls):
        m = model.clone()
        seen = [0]

        def wrapper(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            seen[0] += 1
            return out * float("nan") if seen[0] > calls else out

        m.set_model_unet_function_wrapper(wrapper)
        return (m,)


NODE_CLASS_MAPPINGS["PoisonModelAfter"] = PoisonModelAfter

"""Load a DICE refiner and apply it to CLIP conditioning ahead of a stock KSampler at cfg 1."""
import os

from comfy_api.latest import io

from ..cfg_distill import ConditioningError, load_refiner, refine_ranges
from ..cfg_distill.refiner_file import RefinerFileError
from . import folders
from .conditioning import first_tokens

DiceRefinerType = io.Custom("DICE_REFINER")

CFG1_RULE = (
    "Set the KSampler's cfg to exactly 1.0: at cfg 1 ComfyUI runs ONE model pass per step, which is "
    "the whole speed-up (at any other cfg it runs two, and the refined prompt is guided twice). "
    "Avoid *_cfg_pp samplers: they always run the negative pass.")


class LoadDiceRefiner(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiceRefinerLoader",
            display_name="Load DICE Refiner",
            category="conditioning/cfg-distill",
            description="Loads a DICE refiner (.safetensors) from models/dice_refiners or the pack's "
                        "weights/ folder. A refiner belongs to one base model family (SD1.5, SDXL...).",
            inputs=[io.Combo.Input("refiner_name", options=folders.refiner_names(),
                                   tooltip="Refiner file; its base family is checked when applied.")],
            outputs=[DiceRefinerType.Output(display_name="refiner")],
        )

    @classmethod
    def fingerprint_inputs(cls, refiner_name):
        # A refiner retrained under the same name must be reloaded.
        try:
            st = os.stat(folders.refiner_path(refiner_name))
            return f"{refiner_name}:{st.st_mtime_ns}:{st.st_size}"
        except (FileNotFoundError, OSError):
            return refiner_name

    @classmethod
    def execute(cls, refiner_name) -> io.NodeOutput:
        path = folders.refiner_path(refiner_name)
        try:
            loaded = load_refiner(path)
        except RefinerFileError as e:
            raise ValueError(f"Load DICE Refiner: {e}") from None
        loaded.name = refiner_name
        return io.NodeOutput(loaded)


class ApplyDiceRefiner(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiceRefinerApply",
            display_name="Apply DICE Refiner",
            category="conditioning/cfg-distill",
            description="Rewrites the positive prompt's token embeddings with a DICE refiner so that one "
                        "pass reproduces classifier-free guidance. " + CFG1_RULE,
            inputs=[
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative", tooltip="Encoding of the empty prompt \"\" for plain DICE, or a "
                                      "real negative prompt. Use a real negative only with a refiner whose file "
                                      "says 'negative prompts supported' (trained with negatives; "
                                      "python -m cfg_distill info FILE prints it): for refiners trained with \"\" only it can fail badly (see "
                                      "the README's testbed table)."),
                DiceRefinerType.Input("refiner"),
                io.Float.Input("strength", default=1.0, min=-2.0, max=4.0, step=0.05,
                               tooltip="alpha in c + alpha * S(c, uc); 1.0 is what the refiner was trained for."),
                io.Float.Input("w", default=5.0, min=0.0, max=30.0, step=0.1, optional=True,
                               tooltip="The CFG scale to reproduce, for refiners trained for a range of w ('one "
                                       "refiner for w a-b' in python -m cfg_distill info FILE); it must lie in "
                                       "that range. Single-w refiners reproduce the w they were trained at and "
                                       "ignore this."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive",
                                            tooltip="Refined positive: feed a KSampler at cfg 1.0.")],
        )

    @classmethod
    def execute(cls, positive, negative, refiner, strength, w=5.0) -> io.NodeOutput:
        uc, neg_extras = first_tokens(negative, "negative")
        first_tokens(positive, "positive")
        try:
            # Only the main token tensor is refined; every other key (pooled vector, attention mask,
            # HiDream's Llama tensor, guidance, areas...) is kept as it is.
            refined = []
            for tokens, extras in positive:
                stages = refine_ranges(refiner, tokens, uc, strength, extras=extras, neg_extras=neg_extras, w=w)
                refined += range_entries(stages, extras)
        except ConditioningError as e:
            raise ValueError(f"Apply DICE Refiner: {e}") from None
        return io.NodeOutput(refined)


def range_entries(stages, extras: dict) -> list:
    """CONDITIONING entries for refine_ranges' output. A K-range refiner gives one entry per range,
    each with ComfyUI's own start_percent / end_percent keys (as ConditioningSetTimestepRange sets
    them), so the stock sampler evaluates exactly one per step; ranges the entry already had are
    intersected. A single refiner (0..1) keeps the entry's keys as they are."""
    if len(stages) == 1:
        return [[stages[0][2], dict(extras)]]
    own_start, own_end = extras.get("start_percent", 0.0), extras.get("end_percent", 1.0)
    out = []
    for start, end, tokens in stages:
        a, b = max(start, own_start), min(end, own_end)
        if a < b:
            out.append([tokens, {**extras, "start_percent": a, "end_percent": b}])
    return out

"""modules.prompt_parser (a1111.md "Changing the conditioning").

- Prompt editing: "[from:to:when]" switches text at a step (when < 1 is a fraction of the steps);
  the stand-in parses this one form (no nesting, no alternation) -- enough for conds that CHANGE
  between steps. In the hires pass the host passes (first-pass steps, hires_steps): with the new
  scheduling a fraction counts over both passes (1.0-2.0 is the hires pass), an integer counts on
  from the first pass's steps, so "[a:b:0.5]" is "b" for the whole hires pass.
- get_learned_conditioning(model, prompts, steps) -> per prompt a list of
  ScheduledPromptConditioning(end_at_step, cond); cond is a tensor [T, D] (SD1/2) or a dict of
  per-prompt tensors {"crossattn": [T, 2048], "vector": [2816]} (SDXL). SdConditioning carries
  is_negative_prompt and the image size to the model.
- AND: get_multicond_learned_conditioning splits each prompt at "AND" (optional ":weight") into
  a MulticondLearnedConditioning whose batch has one list of ComposableScheduledPromptConditioning
  per image.
- reconstruct_cond_batch / reconstruct_multicond_batch build FRESH batch tensors for the current
  step (dicts become DictWithShape, whose .shape the denoiser reads); the multicond one stacks one
  row per AND-subprompt, padding shorter token sequences with their last token.
"""
import re
from collections import namedtuple

import torch

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])

_EDIT = re.compile(r"\[([^\[\]:]*):([^\[\]:]*):\s*([0-9.]+)\s*\]")


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):
    # The hires pass (hires_steps given, new scheduling): the pass has hires_steps steps and the
    # whole run is 0..2 as a fraction (1.0-2.0 is the hires pass) or base_steps + n as a step count.
    hires = hires_steps is not None and not use_old_scheduling
    steps = hires_steps if hires else base_steps

    def schedule(prompt):
        m = _EDIT.search(prompt)
        if not m:
            return [[steps, prompt]]
        text = m.group(3)
        when = float(text)
        if use_old_scheduling:
            when = int(when * steps) if when < 1 else int(when)
        elif "." in text:
            when = int((when - (1.0 if hires else 0.0)) * steps)
        else:
            when = int(when - (base_steps if hires else 0))
        when = min(steps, when)
        if when < 1:  # switched before this pass: the "to" side throughout
            return [[steps, prompt[:m.start()] + m.group(2) + prompt[m.end():]]]
        before = prompt[:m.start()] + m.group(1) + prompt[m.end():]
        after = prompt[:m.start()] + m.group(2) + prompt[m.end():]
        return [[when, before], [steps, after]] if when < steps else [[steps, before]]

    return [schedule(p) for p in prompts]


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None, distilled_cfg_scale=None):
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res, cache = [], {}
    schedules = get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps, use_old_scheduling)
    for prompt, prompt_schedule in zip(prompts, schedules):
        if prompt in cache:
            res.append(cache[prompt])
            continue
        texts = SdConditioning([x[1] for x in prompt_schedule], copy_from=prompts)
        conds = model.get_learned_conditioning(texts)
        schedule = []
        for i, (end_at_step, _) in enumerate(prompt_schedule):
            cond = {k: v[i] for k, v in conds.items()} if isinstance(conds, dict) else conds[i]
            schedule.append(ScheduledPromptConditioning(end_at_step, cond))
        cache[prompt] = schedule
        res.append(schedule)
    return res


_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def get_multicond_prompt_list(prompts):
    res_indexes, flat, index_of = [], SdConditioning(prompts), {}
    flat.clear()
    for prompt in prompts:
        indexes = []
        for sub in _AND.split(prompt):
            text, weight = _WEIGHT.search(sub).groups()
            weight = float(weight) if weight is not None else 1.0
            if text not in index_of:
                index_of[text] = len(flat)
                flat.append(text)
            indexes.append((index_of[text], weight))
        res_indexes.append(indexes)
    return res_indexes, flat, index_of


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules = schedules
        self.weight = weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape = shape
        self.batch = batch


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res_indexes, flat, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(model, flat, steps, hires_steps, use_old_scheduling)
    batch = [[ComposableScheduledPromptConditioning(learned[i], w) for i, w in indexes] for indexes in res_indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


class DictWithShape(dict):
    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


def _pick(schedules, step):
    for entry in schedules:
        if step <= entry.end_at_step:
            return entry.cond
    return schedules[0].cond


def reconstruct_cond_batch(c, current_step):
    first = c[0][0].cond
    if isinstance(first, dict):
        res = DictWithShape({k: torch.zeros((len(c),) + v.shape, device=v.device, dtype=v.dtype) for k, v in first.items()})
        for i, schedules in enumerate(c):
            for k, v in _pick(schedules, current_step).items():
                res[k][i] = v
        return res
    res = torch.zeros((len(c),) + first.shape, device=first.device, dtype=first.dtype)
    for i, schedules in enumerate(c):
        res[i] = _pick(schedules, current_step)
    return res


def _stack(tensors):
    longest = max(t.shape[0] for t in tensors)
    padded = [t if t.shape[0] == longest else torch.vstack([t, t[-1:].repeat(longest - t.shape[0], 1)]) for t in tensors]
    return torch.stack(padded)


def reconstruct_multicond_batch(c, current_step):
    tensors, conds_list = [], []
    for composable_prompts in c.batch:
        row = []
        for composable in composable_prompts:
            row.append((len(tensors), composable.weight))
            tensors.append(_pick(composable.schedules, current_step))
        conds_list.append(row)
    if isinstance(tensors[0], dict):
        return conds_list, DictWithShape({k: _stack([t[k] for t in tensors]) for k in tensors[0]})
    return conds_list, _stack(tensors)

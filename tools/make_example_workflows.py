"""Regenerate example_workflows/*.json (ComfyUI's saved UI format) from one description.

    python tools/make_example_workflows.py

Each workflow uses stock loaders, encoders, KSampler at cfg 1.0 and SaveImage around our nodes,
plus a note explaining the cfg 1 rule. The DiT families (SD3.5, Wan 2.1 text-to-video, Qwen-Image)
use the loaders, model-sampling shift, latent and save nodes of ComfyUI's own templates."""
from __future__ import annotations

import json
import os

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows")

CFG1_NOTE = (
    "cfg-distill: one model pass per step\n\n"
    "The KSampler's cfg must be exactly 1.0. At cfg 1 ComfyUI skips the negative pass, which is the "
    "whole speed-up: the guidance is already inside the refined (DICE) or fused (TeEFusion) "
    "conditioning. Any other cfg runs two passes per step and guides twice.\n"
    "Avoid *_cfg_pp samplers: they always run the negative pass.\n"
    "A DICE refiner belongs to one base model (SD1.5, SDXL, ...): pick the one trained for your checkpoint.")

# Output socket names / types of the nodes we use, for the UI format's outputs lists.
OUTPUTS = {
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "EmptyLatentImage": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")],
    "KSamplerAdvanced": [("LATENT", "LATENT")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "SaveImage": [],
    "DiceRefinerLoader": [("refiner", "DICE_REFINER")],
    "DiceRefinerApply": [("positive", "CONDITIONING")],
    "TeEFusionConditioning": [("positive", "CONDITIONING")],
    "Note": [],
    "EmptySD3LatentImage": [("LATENT", "LATENT")],
    "UNETLoader": [("MODEL", "MODEL")],
    "TeEFusionModelPatch": [("model", "MODEL")],
    "CLIPLoader": [("CLIP", "CLIP")],
    "VAELoader": [("VAE", "VAE")],
    "ModelSamplingSD3": [("MODEL", "MODEL")],
    "ModelSamplingAuraFlow": [("MODEL", "MODEL")],
    "EmptyHunyuanLatentVideo": [("LATENT", "LATENT")],
    "SaveAnimatedWEBP": [],
}
INPUTS = {  # linked inputs, in socket order
    "CLIPTextEncode": [("clip", "CLIP")],
    "KSampler": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                 ("latent_image", "LATENT")],
    "KSamplerAdvanced": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                         ("latent_image", "LATENT")],
    "VAEDecode": [("samples", "LATENT"), ("vae", "VAE")],
    "SaveImage": [("images", "IMAGE")],
    "DiceRefinerApply": [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("refiner", "DICE_REFINER")],
    "TeEFusionConditioning": [("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
    "TeEFusionModelPatch": [("model", "MODEL"), ("null_conditioning", "CONDITIONING")],
    "ModelSamplingSD3": [("model", "MODEL")],
    "ModelSamplingAuraFlow": [("model", "MODEL")],
    "SaveAnimatedWEBP": [("images", "IMAGE")],
}


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, type_, pos, widgets, title=None, size=(315, 120), color=None):
        nid = len(self.nodes) + 1
        node = {"id": nid, "type": type_, "pos": list(pos), "size": list(size), "flags": {},
                "order": nid - 1, "mode": 0,
                "inputs": [{"name": n, "type": t, "link": None} for n, t in INPUTS.get(type_, [])],
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                            for i, (n, t) in enumerate(OUTPUTS[type_])],
                "properties": {"Node name for S&R": type_}, "widgets_values": widgets}
        if title:
            node["title"] = title
        if color:
            node["color"], node["bgcolor"] = color
        self.nodes.append(node)
        return nid

    def link(self, src, slot, dst, input_name):
        lid = len(self.links) + 1
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        idx = next(i for i, x in enumerate(d["inputs"]) if x["name"] == input_name)
        type_ = s["outputs"][slot]["type"]
        self.links.append([lid, src, slot, dst, idx, type_])
        s["outputs"][slot]["links"].append(lid)
        d["inputs"][idx]["link"] = lid

    def to_json(self):
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}}, "version": 0.4}


def build(ckpt, prompt, negative, size, method, refiner=None, strength=1.0, w=1.0, seed=42, steps=20):
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", (0, 200), [ckpt], size=(315, 98))
    pos = g.add("CLIPTextEncode", (360, 40), [prompt], title="Prompt", size=(400, 140))
    neg = g.add("CLIPTextEncode", (360, 230), [negative],
                title="Negative (empty prompt for plain DICE)" if negative == "" else "Negative prompt",
                size=(400, 110))
    g.link(ck, 1, pos, "clip")
    g.link(ck, 1, neg, "clip")
    if method == "dice":
        ld = g.add("DiceRefinerLoader", (360, 400), [refiner], size=(400, 60))
        ap = g.add("DiceRefinerApply", (800, 200), [strength], size=(280, 100))
        g.link(pos, 0, ap, "positive")
        g.link(neg, 0, ap, "negative")
        g.link(ld, 0, ap, "refiner")
    else:
        ap = g.add("TeEFusionConditioning", (800, 200), [w, True, True], size=(280, 130))
        g.link(pos, 0, ap, "positive")
        g.link(neg, 0, ap, "negative")
    lat = g.add("EmptyLatentImage", (800, 400), [size, size, 1], size=(280, 110))
    ks = g.add("KSampler", (1120, 120), [seed, "fixed", steps, 1.0, "dpmpp_2m", "karras", 1.0],
               title="KSampler (cfg 1.0 = one pass per step)", size=(315, 262))
    g.link(ck, 0, ks, "model")
    g.link(ap, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    dec = g.add("VAEDecode", (1480, 120), [], size=(210, 46))
    g.link(ks, 0, dec, "samples")
    g.link(ck, 2, dec, "vae")
    save = g.add("SaveImage", (1720, 120), [f"cfg-distill/{method}"], size=(400, 430))
    g.link(dec, 0, save, "images")
    g.add("Note", (0, 360), [CFG1_NOTE], title="Read me: cfg 1.0", size=(330, 300),
          color=("#432", "#653"))
    return g.to_json()


TEEFUSION_SD3_NOTE = (
    "TeEFusion Model Patch: the released TeEFusion SD3 model\n\n"
    "Weights: AIDC-AI's TeEFusion (a fine-tuned SD3 transformer, license CC-BY-NC-4.0: non-commercial). "
    "Download them yourself and put them in models/diffusion_models; nothing is downloaded by this pack. "
    "Text encoders and VAE come from the stock SD3 medium checkpoint (sd3_medium_incl_clips).\n\n"
    "Connect the PLAIN prompt encoding as positive (TeEFusion's SD3 model takes tokens and pooled vector "
    "unfused); the patch adds the guidance term w to the block modulation, using the pooled vector of "
    "\"\" (the empty-prompt encoding) as p_null. The release's example uses w = 5 and 50 Euler steps.\n\n"
    + CFG1_NOTE.split("\n\n", 1)[1])


def build_teefusion_sd3(prompt, w=5.0, seed=42, steps=50, size=1024):
    """Stock SD3 loaders around the patch: the transformer from UNETLoader, CLIP + VAE from the checkpoint."""
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", (0, 300), ["sd3_medium_incl_clips.safetensors"], size=(315, 98),
               title="SD3 text encoders + VAE")
    un = g.add("UNETLoader", (0, 120), ["teefusion_sd3.safetensors", "default"], size=(315, 82),
               title="TeEFusion SD3 transformer (AIDC-AI, CC-BY-NC-4.0)")
    pos = g.add("CLIPTextEncode", (360, 40), [prompt], title="Prompt", size=(400, 140))
    null = g.add("CLIPTextEncode", (360, 230), [""], title="Empty prompt \"\" (p_null; also the negative)",
                 size=(400, 110))
    g.link(ck, 1, pos, "clip")
    g.link(ck, 1, null, "clip")
    patch = g.add("TeEFusionModelPatch", (800, 40), [w], size=(280, 80))
    g.link(un, 0, patch, "model")
    g.link(null, 0, patch, "null_conditioning")
    lat = g.add("EmptySD3LatentImage", (800, 400), [size, size, 1], size=(280, 110))
    ks = g.add("KSampler", (1120, 120), [seed, "fixed", steps, 1.0, "euler", "simple", 1.0],
               title="KSampler (cfg 1.0 = one pass per step)", size=(315, 262))
    g.link(patch, 0, ks, "model")
    g.link(pos, 0, ks, "positive")
    g.link(null, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    dec = g.add("VAEDecode", (1480, 120), [], size=(210, 46))
    g.link(ks, 0, dec, "samples")
    g.link(ck, 2, dec, "vae")
    save = g.add("SaveImage", (1720, 120), ["cfg-distill/teefusion_sd3"], size=(400, 430))
    g.link(dec, 0, save, "images")
    g.add("Note", (0, 460), [TEEFUSION_SD3_NOTE], title="Read me: TeEFusion SD3", size=(330, 360),
          color=("#432", "#653"))
    return g.to_json()


# The DiT families, as ComfyUI's own templates load them (stock loaders, the template's model
# sampling shift, latent node and save node), with DICE in front of the sampler at cfg 1.
DIT_NOTE = ("\n\nUse a refiner trained for this base model (Train DICE Refiner on it); a refiner of another "
            "family stops with an error naming both.")


def build_dit(prompt, loaders, latent, sampling, sampler, refiner, save, note=""):
    """loaders: ("checkpoint", ckpt) or ("separate", unet, (clip_name, clip_type), vae).
    latent: (node type, widgets); sampling: (ModelSampling node type, shift) or None;
    sampler: (steps, sampler_name, scheduler); save: (node type, widgets)."""
    g = Graph()
    if loaders[0] == "checkpoint":
        ck = g.add("CheckpointLoaderSimple", (0, 200), [loaders[1]], size=(315, 98))
        model, clip, vae = (ck, 0), (ck, 1), (ck, 2)
        note_y = 360
    else:
        _, unet, (clip_name, clip_type), vae_name = loaders
        un = g.add("UNETLoader", (0, 40), [unet, "default"], size=(315, 82))
        cl = g.add("CLIPLoader", (0, 170), [clip_name, clip_type, "default"], size=(315, 106))
        va = g.add("VAELoader", (0, 320), [vae_name], size=(315, 58))
        model, clip, vae = (un, 0), (cl, 0), (va, 0)
        note_y = 420
    if sampling:
        ms = g.add(sampling[0], (360, -120), [sampling[1]], size=(315, 58))
        g.link(*model, ms, "model")
        model = (ms, 0)
    pos = g.add("CLIPTextEncode", (360, 40), [prompt], title="Prompt", size=(400, 140))
    neg = g.add("CLIPTextEncode", (360, 230), [""], title="Negative (empty prompt for plain DICE)", size=(400, 110))
    g.link(*clip, pos, "clip")
    g.link(*clip, neg, "clip")
    ld = g.add("DiceRefinerLoader", (360, 400), [refiner], size=(400, 60))
    ap = g.add("DiceRefinerApply", (800, 200), [1.0], size=(280, 100))
    g.link(pos, 0, ap, "positive")
    g.link(neg, 0, ap, "negative")
    g.link(ld, 0, ap, "refiner")
    lat = g.add(latent[0], (800, 400), list(latent[1]), size=(280, 130))
    steps, sampler_name, scheduler = sampler
    ks = g.add("KSampler", (1120, 120), [42, "fixed", steps, 1.0, sampler_name, scheduler, 1.0],
               title="KSampler (cfg 1.0 = one pass per step)", size=(315, 262))
    g.link(*model, ks, "model")
    g.link(ap, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    dec = g.add("VAEDecode", (1480, 120), [], size=(210, 46))
    g.link(ks, 0, dec, "samples")
    g.link(*vae, dec, "vae")
    out = g.add(save[0], (1720, 120), list(save[1]), size=(400, 430))
    g.link(dec, 0, out, "images")
    g.add("Note", (0, note_y), [CFG1_NOTE + DIT_NOTE + note], title="Read me: cfg 1.0", size=(330, 320),
          color=("#432", "#653"))
    return g.to_json()


WAN_REFINER_NOTE = ("\n\nWan 2.1 and 2.2 share the UMT5-XXL text encoder, so a Wan refiner loads on either; "
                    "train it on the model you sample with (the refiner learns that model's CFG).")
WAN22_NOTE = (
    "\n\nWan 2.2 A14B: two experts, the high-noise model for the first half of the steps and the "
    "low-noise model for the rest (two KSamplerAdvanced). Both take the same refined prompt, and both "
    "samplers run at cfg 1." + WAN_REFINER_NOTE)


def build_wan22_t2v(prompt, steps=20, switch=10, size=(640, 640), frames=81):
    """ComfyUI's Wan 2.2 14B text-to-video template: high- and low-noise experts, each behind its own
    ModelSamplingSD3 (shift 8), sampled by two KSamplerAdvanced that split the steps."""
    g = Graph()
    hi = g.add("UNETLoader", (0, -100), ["wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "default"],
               title="Wan 2.2 high-noise expert", size=(315, 82))
    lo = g.add("UNETLoader", (0, 40), ["wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", "default"],
               title="Wan 2.2 low-noise expert", size=(315, 82))
    cl = g.add("CLIPLoader", (0, 170), ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"], size=(315, 106))
    va = g.add("VAELoader", (0, 320), ["wan_2.1_vae.safetensors"], size=(315, 58))
    ms_hi = g.add("ModelSamplingSD3", (360, -260), [8.0], size=(315, 58))
    ms_lo = g.add("ModelSamplingSD3", (360, -160), [8.0], size=(315, 58))
    g.link(hi, 0, ms_hi, "model")
    g.link(lo, 0, ms_lo, "model")
    pos = g.add("CLIPTextEncode", (360, 40), [prompt], title="Prompt", size=(400, 140))
    neg = g.add("CLIPTextEncode", (360, 230), [""], title="Negative (empty prompt for plain DICE)", size=(400, 110))
    g.link(cl, 0, pos, "clip")
    g.link(cl, 0, neg, "clip")
    ld = g.add("DiceRefinerLoader", (360, 400), ["dice_wan.safetensors"], size=(400, 60))
    ap = g.add("DiceRefinerApply", (800, 200), [1.0], size=(280, 100))
    g.link(pos, 0, ap, "positive")
    g.link(neg, 0, ap, "negative")
    g.link(ld, 0, ap, "refiner")
    lat = g.add("EmptyHunyuanLatentVideo", (800, 400), [size[0], size[1], frames, 1], size=(280, 130))
    k1 = g.add("KSamplerAdvanced", (1120, -40), ["enable", 42, "fixed", steps, 1.0, "euler", "simple", 0, switch,
                                                "enable"], title="KSamplerAdvanced high noise (cfg 1.0)", size=(315, 334))
    k2 = g.add("KSamplerAdvanced", (1480, -40), ["disable", 0, "fixed", steps, 1.0, "euler", "simple", switch, 10000,
                                                "disable"], title="KSamplerAdvanced low noise (cfg 1.0)", size=(315, 334))
    for k, ms in ((k1, ms_hi), (k2, ms_lo)):
        g.link(ms, 0, k, "model")
        g.link(ap, 0, k, "positive")
        g.link(neg, 0, k, "negative")
    g.link(lat, 0, k1, "latent_image")
    g.link(k1, 0, k2, "latent_image")
    dec = g.add("VAEDecode", (1840, -40), [], size=(210, 46))
    g.link(k2, 0, dec, "samples")
    g.link(va, 0, dec, "vae")
    out = g.add("SaveAnimatedWEBP", (2080, -40), ["cfg-distill/dice_wan22", 16, False, 90, "default"], size=(400, 430))
    g.link(dec, 0, out, "images")
    g.add("Note", (0, 420), [CFG1_NOTE + DIT_NOTE + WAN22_NOTE], title="Read me: cfg 1.0", size=(330, 360),
          color=("#432", "#653"))
    return g.to_json()


WORKFLOWS = {
    "dice_sd15.json": build("v1-5-pruned-emaonly.safetensors",
                            "a red fox sitting in a snowy forest at sunrise, highly detailed", "", 512,
                            "dice", refiner="dice_sd15.safetensors"),
    "dice_sdxl.json": build("sd_xl_base_1.0.safetensors",
                            "a lighthouse on a rocky coast under a stormy sky, oil painting", "", 1024,
                            "dice", refiner="dice_sdxl.safetensors"),
    "dice_negative_prompt.json": build("v1-5-pruned-emaonly.safetensors",
                                       "portrait photo of an old fisherman, natural light",
                                       "blurry, low quality, watermark, text", 512,
                                       "dice", refiner="dice_sd15.safetensors"),
    "teefusion_sd15.json": build("v1-5-pruned-emaonly.safetensors",
                                 "a bowl of ripe peaches on a wooden table, still life", "", 512,
                                 "teefusion", w=1.0),
    # SD3.5 Medium / Large: one checkpoint with its text encoders and VAE (ComfyUI's SD3.5 template).
    "dice_sd35.json": build_dit(
        "a lighthouse on a rocky coast under a stormy sky, oil painting",
        ("checkpoint", "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"),
        ("EmptySD3LatentImage", [1024, 1024, 1]), None, (40, "euler", "sgm_uniform"), "dice_sd3.safetensors",
        ("SaveImage", ["cfg-distill/dice_sd35"])),
    # Wan 2.1 text-to-video 1.3B (ComfyUI's text_to_video_wan template: shift 8, 832 x 480, 33 frames).
    "dice_wan_t2v.json": build_dit(
        "a red fox running through fresh snow in a pine forest, morning light",
        ("separate", "wan2.1_t2v_1.3B_fp16.safetensors", ("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan"),
         "wan_2.1_vae.safetensors"),
        ("EmptyHunyuanLatentVideo", [832, 480, 33, 1]), ("ModelSamplingSD3", 8.0), (30, "uni_pc", "simple"),
        "dice_wan.safetensors", ("SaveAnimatedWEBP", ["cfg-distill/dice_wan", 16, False, 90, "default"]),
        note=WAN_REFINER_NOTE),
    # Wan 2.2 A14B text-to-video (ComfyUI's Wan 2.2 14B T2V template: two experts, 640 x 640, 81 frames).
    "dice_wan22_t2v.json": build_wan22_t2v("a paper boat drifting down a rain-soaked street, cinematic"),
    # Qwen-Image (ComfyUI's qwen_image template: AuraFlow shift 3.1, 1328 x 1328).
    "dice_qwen_image.json": build_dit(
        "a cozy bookshop at night, warm window light, a sign that reads \"OPEN\"",
        ("separate", "qwen_image_fp8_e4m3fn.safetensors", ("qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image"),
         "qwen_image_vae.safetensors"),
        ("EmptySD3LatentImage", [1328, 1328, 1]), ("ModelSamplingAuraFlow", 3.1), (20, "euler", "simple"),
        "dice_qwen_image.safetensors", ("SaveImage", ["cfg-distill/dice_qwen_image"])),
    "teefusion_sd3_patch.json": build_teefusion_sd3("a glass teapot with blooming tea, studio photo, soft light"),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, wf in WORKFLOWS.items():
        with open(os.path.join(OUT, name), "w") as f:
            json.dump(wf, f, indent=1)
            f.write("\n")
        print("wrote", os.path.join("example_workflows", name))


if __name__ == "__main__":
    main()

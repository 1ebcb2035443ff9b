"""The one training request (cfg_distill.request): parsing, names, defaults, checks and the command
line generated from it. Every front door (nodes, webui tab and route, command line) builds one of
these, so these rules are tested here once."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from cfg_distill.prompts import default_prompts
from cfg_distill.request import (METHODS, RequestError, TrainRequest, add_arguments, file_name, from_arguments,
                                 parse_lines)
from cfg_distill.run import check_existing, read_start
from cfg_distill.refiner_file import RefinerInfo, save_refiner
from cfg_distill.training import new_refiner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lines_skip_blanks_and_comments_for_every_list():
    assert parse_lines("# comment\n a cat \n\n#x\na dog") == ["a cat", "a dog"]
    assert parse_lines(["a", " ", "# b", "c "]) == ["a", "c"]
    r = TrainRequest(prompts="# c\na\n", negative_prompts="blurry\n# no\nred", captions="x\n\n").validate()
    assert r.prompts == ["a"] and r.negative_prompts == ["blurry", "red"] and r.captions == ["x"]
    empty = TrainRequest(prompts="  \n# only a comment").validate()
    assert empty.prompts == [] and empty.uses_default_prompts and empty.training_prompts() == default_prompts()


@pytest.mark.parametrize("raw, name", [("my run", "my run"), ("x.safetensors", "x"), (" a-b_c.1 ", "a-b_c.1")])
def test_names_are_plain_file_names(raw, name):
    assert file_name(raw) == name


@pytest.mark.parametrize("raw", ["", "../escape", "a/b", ".hidden", "a\\b", "x" * 200])
def test_names_that_could_leave_the_folder_are_refused(raw):
    with pytest.raises(RequestError, match="not a plain file name"):
        TrainRequest(name=raw).validate()


def test_defaults_per_method_fill_only_what_is_unset():
    dice, tee = TrainRequest(method="dice").validate(), TrainRequest(method="teefusion").validate()
    assert (dice.lr, dice.lr_schedule, dice.grad_accum, dice.name) == (5e-4, "cosine", 4, "my_dice_refiner")
    # TeEFusion: 2000 x 4 x 4 at 1e-3 cosine (the testbed: 95-98% of CFG's gain at w 3-7; the former
    # 1e-4 constant without accumulation 64-77%)
    assert (tee.lr, tee.lr_schedule, tee.grad_accum, tee.name) == (1e-3, "cosine", 4, "my_teefusion_lora")
    assert (tee.w_min, tee.w_max) == (2.0, 8.0) and dice.w_range is None and dice.w_input() is None
    assert TrainRequest(method="dice", lr=1e-3, grad_accum=1).validate().lr == 1e-3
    assert TrainRequest.defaults("dice")["grad_accum"] == 4
    with pytest.raises(RequestError, match="method must be one of"):
        TrainRequest(method="lora").validate()


@pytest.mark.parametrize("change, message", [
    (dict(steps=0), "steps must be a whole number >= 1"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(batch_size=True), "batch size must be a whole number"),
    (dict(lr=0.0), "learning rate must be > 0"),
    (dict(lr=float("nan")), "learning rate must be a finite number"),
    (dict(loss="l3"), "loss must be l1 or l2"),
    (dict(lr_schedule="linear"), "lr_schedule must be one of"),
    (dict(width=100), "multiples of 8"),
    (dict(negative_share=1.5), "negative share must be between 0 and 1"),
    (dict(guidance_scale=0.5), "guidance scale must be between 1 and 30"),
    (dict(w_min=6.0, w_max=8.0), "w range must satisfy"),
    (dict(percent_range=(0.5, 0.2)), "percent_range must satisfy"),
    (dict(autocast="int8"), "autocast must be one of"),
])
def test_bad_settings_name_the_setting(change, message):
    with pytest.raises(RequestError, match=message):
        TrainRequest(method="dice", **change).validate()


def test_teefusion_w_range_and_rank_are_checked():
    with pytest.raises(RequestError, match="w range must satisfy 0 <= w_min <= w_max"):
        TrainRequest(method="teefusion", w_min=5.0, w_max=2.0).validate()
    with pytest.raises(RequestError, match="rank must be a whole number >= 1"):
        TrainRequest(method="teefusion", rank=0).validate()


def test_w_input_follows_the_range():
    r = TrainRequest(method="dice", guidance_scale=5.0, w_min=3.0, w_max=7.0).validate()
    assert r.w_input() == {"range": [3.0, 7.0], "ref": 5.0, "scale": 0.25}
    assert TrainRequest(method="dice", w_min=3, w_max=7, w_input_scale=0.1).validate().w_input()["scale"] == 0.1


def test_images_need_one_caption_each():
    with pytest.raises(RequestError, match="3 captions for 2 images"):
        TrainRequest(images=torch.zeros(2, 8, 8, 3), captions="a\nb\nc").validate()


def test_state_and_output_files_follow_one_rule(tmp_path):
    dice = TrainRequest(method="dice", name="r").validate()
    tee = TrainRequest(method="teefusion", name="l").validate()
    assert dice.state_file(str(tmp_path)) == str(tmp_path / "r.dice-train-state")
    assert tee.state_file(str(tmp_path)) == str(tmp_path / "l.teefusion-train-state")
    assert dice.output_file(str(tmp_path)) == str(tmp_path / "r.safetensors")


def test_a_saved_run_is_resumed_or_replaced_only_when_asked(tmp_path):
    from cfg_distill.training import TrainConfig, train_refiner
    from cfg_distill.training import Batch

    state = tmp_path / "r.dice-train-state"

    def batch(step, g):
        return Batch(x_t=torch.zeros(2, 1), sigma=torch.ones(2), c=torch.randn(2, 3, 8, generator=g),
                     uc=torch.zeros(1, 3, 8))

    train_refiner(TrainConfig(steps=2, batch_size=2), batch, lambda b: b.c.sum(1), lambda b, rc: rc.sum(1),
                  token_dim=8, state_path=str(state))
    with pytest.raises(RequestError, match="holds a saved run of 'r' at step 2.*--resume"):
        check_existing(TrainRequest(name="r", overwrite=False).validate(), str(state))
    assert check_existing(TrainRequest(name="r", overwrite=True).validate(), str(state)) is None
    assert check_existing(TrainRequest(name="r", resume=True).validate(), str(state)) == 2
    with pytest.raises(RequestError, match="trained at guidance scale 5, this run asks for 7"):
        check_existing(TrainRequest(name="r", resume=True, guidance_scale=7.0).validate(), str(state))
    state.write_bytes(b"not a state")
    with pytest.raises(RequestError, match="Move it away"):
        check_existing(TrainRequest(name="r", resume=True).validate(), str(state))


def test_start_files_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(RequestError, match="does not exist"):
        read_start(TrainRequest(start_from=str(tmp_path / "missing.safetensors")).validate())
    single = tmp_path / "single.safetensors"
    save_refiner(str(single), new_refiner(8, 16, 4), RefinerInfo(8, 16, 4, guidance_scale=5.0))
    assert read_start(TrainRequest(start_from=str(single)).validate()).info.token_dim == 8
    # A single-w refiner at the reference w is a valid start for a range around it; another w is not.
    assert read_start(TrainRequest(start_from=str(single), w_min=3, w_max=7).validate()) is not None
    with pytest.raises(RequestError, match="trained at w 5, this run's .*w is 6"):
        read_start(TrainRequest(start_from=str(single), guidance_scale=6.0).validate())
    ranged = tmp_path / "ranged.safetensors"
    save_refiner(str(ranged), new_refiner(8, 16, 4), RefinerInfo(8, 16, 4, guidance_scale=5.0,
                                                                 w_input={"range": [3.0, 7.0], "ref": 5.0,
                                                                          "scale": 0.25}))
    with pytest.raises(RequestError, match="trained for w 3-7, this run trains w 2-8"):
        read_start(TrainRequest(start_from=str(ranged), w_min=2, w_max=8).validate())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\0" * 64)
    with pytest.raises(RequestError, match="cannot start from 'junk.safetensors'"):
        read_start(TrainRequest(start_from=str(junk)).validate())
    with pytest.raises(RequestError, match="no TeEFusion student metadata"):
        read_start(TrainRequest(method="teefusion", start_from=str(single)).validate())


@pytest.mark.parametrize("method", METHODS)
def test_every_command_line_flag_maps_onto_a_request_field(method, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser, method)
    prompts = tmp_path / "p.txt"
    prompts.write_text("# header\na cat\na dog\n", encoding="utf-8")
    args = parser.parse_args(["--steps", "7", "--prompts", str(prompts), "--seed", "3", "--resume",
                              "--lr", "0.01", "--name", "x"])
    r = from_arguments(args, method).validate()
    assert (r.method, r.steps, r.prompts, r.seed, r.resume, r.lr, r.name) == \
        (method, 7, ["a cat", "a dog"], 3, True, 0.01, "x")
    assert r.lr_schedule == TrainRequest.defaults(method)["lr_schedule"]  # unset flags keep the method's default
    flags = {a for action in parser._actions for a in action.option_strings}
    assert ("--rank" in flags) == (method == "teefusion") and ("--negative-prompts" in flags) == (method == "dice")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n", encoding="utf-8")
    with pytest.raises(RequestError, match="has no prompts"):
        from_arguments(parser.parse_args(["--prompts", str(empty)]), method)


def test_train_help_is_generated_from_the_request():
    out = subprocess.run([sys.executable, "-m", "cfg_distill", "train", "dice", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--ckpt", "--steps", "--grad-accum", "--negative-prompts", "--w-min", "--start-from",
                 "--percent-range", "lab options"):
        assert flag in out.stdout, flag
    bad = subprocess.run([sys.executable, "-m", "cfg_distill", "train", "teefusion", "--ckpt", "x", "--steps", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "steps must be a whole number >= 1" in bad.stderr


def test_a_size_of_zero_is_the_model_s_own():
    """Width / height 0 (the default): the checkpoint's modelspec.resolution, else the family's size;
    a size the user set always wins, and a malformed modelspec falls back to the family."""
    from cfg_distill.families import model_size

    assert TrainRequest.defaults("dice")["width"] == 0 and TrainRequest.defaults("teefusion")["height"] == 0
    assert TrainRequest(name="x").validate().size_text == "the model's own size"
    assert model_size(0, 0, "sd15")[:2] == (512, 512)
    assert model_size(0, 0, "sdxl")[:2] == (1024, 1024)
    assert model_size(0, 0, "sd2")[:2] == (768, 768)
    assert model_size(0, 0, "no-such-family")[:2] == (512, 512)
    w, h, source = model_size(0, 0, "sd15", {"modelspec.resolution": "32x32"})
    assert (w, h) == (32, 32) and "modelspec" in source
    assert model_size(0, 0, "sdxl", {"modelspec.resolution": "1152 x 896"})[:2] == (1152, 896)
    assert model_size(0, 0, "sdxl", {"modelspec.resolution": "huge"})[:2] == (1024, 1024)
    assert model_size(0, 0, "sdxl", {"modelspec.resolution": "1001x1000"})[:2] == (1024, 1024)  # not a multiple of 8
    assert model_size(256, 0, "sdxl", {"modelspec.resolution": "1024x768"})[:2] == (256, 768)
    assert model_size(640, 384, "sd15", {"modelspec.resolution": "32x32"}) == (640, 384, "as set")
    with pytest.raises(RequestError, match="or 0 for the model's own size"):
        TrainRequest(name="x", width=4).validate()

"""sdwebui.logic on its own: no webui, no stand-ins."""
import os

import pytest
import torch

from cfg_distill import ConditioningError, DiceRefiner, LoadedRefiner, RefinerInfo, fuse_tokens, refine_tokens
from sdwebui import logic


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(3)
    return LoadedRefiner(DiceRefiner(32, inner_dim=16, heads=4).eval(), RefinerInfo(32, 16, heads=4, base_family="other"))


def settings(mode, **kw):
    return logic.Settings(mode=mode, refiner="r.safetensors", **kw)


# -- skip_early_cond: a shadow the webui reads, never a setting -------------------------------

class _Options:
    """The webui's Options the way it serves a setting: opts.data, read through __getattr__."""

    def __init__(self, data):
        object.__setattr__(self, "data", data)

    def __getattr__(self, item):
        data = object.__getattribute__(self, "data")
        if item in data:
            return data[item]
        return 0.0 if item in ("skip_early_cond", "k") else object.__getattribute__(self, item)

    def __setattr__(self, key, value):
        self.data[key] = value  # a settings change goes to opts.data, like the webui's


def test_shadow_is_read_but_never_in_the_settings():
    import json
    opts = _Options({"skip_early_cond": 0.3})
    o, t = logic.OptionShadow("skip_early_cond", 1.0), object()
    assert o.apply(opts, t) and o.active and o.overrode(t)
    assert opts.skip_early_cond == 1.0, "what the host's `shared.opts.skip_early_cond` reads"
    assert opts.data == {"skip_early_cond": 0.3} and json.loads(json.dumps(opts.data)) == {"skip_early_cond": 0.3}
    opts.skip_early_cond = 0.6  # the settings page while the shadow is up: kept exactly as set
    assert opts.data == {"skip_early_cond": 0.6}
    assert o.restore(opts, t) and not o.active
    assert opts.skip_early_cond == 0.6 and opts.data == {"skip_early_cond": 0.6}
    assert not o.restore(opts), "idempotent"

    opts = _Options({})  # a user who never touched the option
    o.apply(opts, t)
    assert opts.skip_early_cond == 1.0 and opts.data == {}
    o.restore(opts)
    assert opts.skip_early_cond == 0.0 and opts.data == {}


def test_shadow_ignores_a_late_safety_net_of_an_older_run():
    opts = _Options({"k": 0.5})
    o = logic.OptionShadow("k", 1.0)
    old, new = object(), object()
    o.apply(opts, old)
    o.apply(opts, new)
    assert not o.restore(opts, old), "the old run's finaliser must not end the new run's shadow"
    assert opts.k == 1.0
    o.restore(opts, new)
    assert opts.k == 0.5 and opts.data == {"k": 0.5}


def test_shadow_left_by_an_earlier_copy_of_the_module_is_removed():
    opts = _Options({"k": 0.5})
    logic.OptionShadow("k", 1.0).apply(opts, object())  # a module copy that was reloaded away
    assert opts.k == 1.0
    logic.OptionShadow("k", 1.0).restore(opts)  # the new copy's restore without token
    assert opts.k == 0.5


def test_shadow_of_a_value_the_user_already_had_is_not_reported_as_ours():
    opts = _Options({"k": 1.0})
    o, t = logic.OptionShadow("k", 1.0), object()
    o.apply(opts, t)
    assert not o.overrode(t)


def test_shadow_refuses_options_that_would_not_read_it():
    class Strict(_Options):  # serves every read from data itself: a shadow would not be seen
        def __getattribute__(self, item):
            data = object.__getattribute__(self, "data")
            return data[item] if item in data else object.__getattribute__(self, item)

    opts = Strict({"k": 0.5})
    o = logic.OptionShadow("k", 1.0)
    assert not logic.OptionShadow.reads_through(opts, "k")
    assert not o.apply(opts, object()) and not o.active
    assert "k" not in vars(opts) and opts.data == {"k": 0.5}

    class Plain:  # not an Options at all (no data dict)
        pass

    assert not o.apply(Plain(), object())


# -- rows, nulls, warnings --------------------------------------------------------------------

def test_image_of_rows():
    assert logic.image_of_rows(5, 2, [2, 3]) == [0, 0, 1, 1, 1]
    assert logic.image_of_rows(3, 3) == [0, 1, 2]
    assert logic.image_of_rows(3, 1) == [0, 0, 0]
    assert logic.image_of_rows(5, 2) is None
    assert logic.image_of_rows(5, 2, [2, 2]) is None, "a multicond batch that does not add up is not trusted"


def test_null_plan():
    dice_neg = settings(logic.MODE_DICE, negative_as_null=True)
    assert logic.null_plan(dice_neg, ["blurry", "", "  "], 3) == ["negative", "empty", "empty"]
    assert logic.null_plan(settings(logic.MODE_DICE, negative_as_null=False), ["blurry"], 1) == ["empty"]
    assert logic.null_plan(settings(logic.MODE_TEEFUSION), ["", "x"], 2) == ["negative", "negative"]
    assert logic.null_plan(dice_neg, None, 2) == ["negative", "negative"]


def test_cfg_warning():
    assert logic.cfg_warning(logic.MODE_DICE, 1.0) is None
    assert logic.cfg_warning(logic.MODE_OFF, 7.0) is None
    text = logic.cfg_warning(logic.MODE_TEEFUSION, 7.5)
    assert "CFG scale is 7.5" in text and "still applied" in text and "Set CFG scale to 1" in text
    assert "Hires CFG scale is 3" in logic.cfg_warning(logic.MODE_DICE, 1.0, 3.0)


def test_settings_from_ui():
    s = logic.Settings.from_ui("DICE", "a.safetensors", 0.5, False, 2)
    assert (s.mode, s.strength, s.negative_as_null, s.w, s.active) == ("DICE", 0.5, False, 2.0, True)
    assert not logic.Settings.from_ui(None, None, None, None, None).active
    with pytest.raises(ValueError, match="unknown cfg-distill mode"):
        logic.Settings.from_ui("CFG++", None, 1, True, 1)


# -- infotext ---------------------------------------------------------------------------------

def test_infotext_params_and_parse():
    s = logic.Settings(logic.MODE_DICE, "sub/my-ref.safetensors", 0.8, False, 3.0)
    info = logic.infotext_params(s, "abcdef1234")
    assert info == {"CFG distill": "DICE", "DICE refiner": "my-ref", "DICE refiner hash": "abcdef1234",
                    "DICE strength": 0.8, "DICE negative as null": False}
    parsed = logic.parse_infotext({k: str(v) for k, v in info.items()})
    assert parsed == {"mode": "DICE", "refiner": "my-ref", "refiner_hash": "abcdef1234", "strength": 0.8,
                      "negative_as_null": False, "w": logic.DEFAULT_W, "has_w": False, "steps": ""}
    tee = logic.infotext_params(logic.Settings(logic.MODE_TEEFUSION, w=2.0))
    assert tee == {"CFG distill": "TeEFusion", "TeEFusion w": 2.0}
    assert logic.infotext_params(logic.Settings()) == {}
    assert logic.parse_infotext({"CFG distill": "bogus"})["mode"] == logic.MODE_OFF


def test_w_keys_are_named_after_their_mode_and_old_dice_infotexts_still_parse():
    dice = logic.Settings(logic.MODE_DICE, "r.safetensors", 1.0, True, 6.5)
    info = logic.infotext_params(dice, "h", refiner_takes_w=True)
    assert info["DICE w"] == 6.5 and "TeEFusion w" not in info
    assert logic.parse_infotext({k: str(v) for k, v in info.items()})["w"] == 6.5
    # Written before DICE had its own key: DICE's w under "TeEFusion w".
    old = logic.parse_infotext({"CFG distill": "DICE", "DICE refiner": "r", "TeEFusion w": "4.5"})
    assert old["w"] == 4.5 and old["has_w"]
    # Both keys (a DICE image whose text also carries a stray TeEFusion w): DICE's own key wins.
    both = logic.parse_infotext({"CFG distill": "DICE", "DICE w": "3", "TeEFusion w": "9"})
    assert both["w"] == 3.0
    # TeEFusion reads only its own key; a mode that is off reads no w at all.
    assert logic.parse_infotext({"CFG distill": "TeEFusion", "DICE w": "3"})["has_w"] is False
    assert logic.parse_infotext({"CFG distill": "TeEFusion", "TeEFusion w": "3"})["w"] == 3.0
    assert logic.parse_infotext({"TeEFusion w": "3"})["has_w"] is False


def test_forge_and_batch_problem():
    assert logic.forge_and_batch_problem([[0.5, 0.5]]) is None  # one image: nothing to cut
    assert logic.forge_and_batch_problem([[1.0], [1.0]]) is None
    assert logic.forge_and_batch_problem([[0.5, 0.5], [0.5, 0.5]]) is None
    cut = logic.forge_and_batch_problem([[0.5, 0.5], [1.0]])
    assert "shortest AND count" in cut and "1 of 2/1" in cut
    weights = logic.forge_and_batch_problem([[0.3, 0.7], [0.5, 0.5]])
    assert "last image" in weights and "0.3/0.5" in weights


def test_applied_steps_describes_what_was_sampled():
    a = logic.AppliedSteps()
    assert a.describe() is None  # nothing ran
    for step in range(4):
        a.ran(False, step, 4, True)
    assert a.describe() == ""  # every step: the plain claim
    a.reset()
    a.ran(False, 0, 4, True), a.ran(False, 1, 4, True), a.ran(False, 2, 4, False), a.ran(False, 3, 4, False)
    assert a.describe() == "1-2 of 4"
    a.ran(True, 0, 2, False)
    assert a.describe() == "1-2 of 4, hires none"
    a.reset()
    a.ran(False, 0, 4, False)  # refused at its first step: not applied at all
    assert a.describe() is None
    a.reset()
    for step in range(4):
        a.ran(False, step, 4, True)
    a.ran(True, 0, 3, True), a.ran(True, 1, 3, False)
    assert a.describe() == "first pass, hires 1 of 3"


def test_resolve_refiner():
    names = ["a.safetensors", "sub/b.safetensors"]
    hashes = {"a.safetensors": "111", "sub/b.safetensors": "222"}
    assert logic.resolve_refiner("b", "", names) == "sub/b.safetensors"
    assert logic.resolve_refiner("renamed", "111", names, hashes.__getitem__) == "a.safetensors"
    assert logic.resolve_refiner("zzz", "999", names, hashes.__getitem__) is None


# -- the conditioning transform ---------------------------------------------------------------

def test_tensor_cond_refined_exactly_and_cached(loaded):
    t = logic.CondTransform(settings(logic.MODE_DICE, strength=0.7), loaded)
    c, uc = torch.randn(2, 7, 32), torch.randn(1, 5, 32)
    out = t(c, [uc, uc.clone()], [0, 1])
    assert torch.equal(out, refine_tokens(loaded, c, uc, 0.7))
    again = t(c.clone(), [uc.clone(), uc.clone()], [0, 1])
    assert torch.equal(again, out) and again is not out and t.computed == 1
    t(c + 1, [uc, uc], [0, 1])
    assert t.computed == 2


def test_dict_cond_keeps_class_and_other_keys_and_does_not_touch_the_hosts_dict(loaded):
    class DictWithShape(dict):
        def __init__(self, x, shape=None):
            super().__init__()
            self.update(x)

        @property
        def shape(self):
            return self["crossattn"].shape

    c = DictWithShape({"crossattn": torch.randn(1, 7, 32), "vector": torch.randn(1, 2816), "guidance": torch.ones(1)})
    before = {k: v.clone() for k, v in c.items()}
    null = {"crossattn": torch.randn(1, 7, 32), "vector": torch.randn(1, 2816)}
    out = logic.CondTransform(settings(logic.MODE_DICE), loaded)(c, [null], [0])
    assert type(out) is DictWithShape and out is not c and out.shape == (1, 7, 32)
    assert torch.equal(out["crossattn"], refine_tokens(loaded, c["crossattn"], null["crossattn"], 1.0))
    assert out["vector"] is c["vector"] and out["guidance"] is c["guidance"]
    assert all(torch.equal(c[k], before[k]) for k in before)


def test_teefusion_on_dicts_fuses_pooled_only():
    c = {"crossattn": torch.randn(2, 7, 16), "vector": torch.randn(2, 2816)}
    null = {"crossattn": torch.randn(1, 14, 16), "vector": torch.randn(1, 2816)}
    out = logic.CondTransform(settings(logic.MODE_TEEFUSION, w=2.0))(c, [null, null], [0, 0])
    assert torch.equal(out["crossattn"], fuse_tokens(c["crossattn"], null["crossattn"], 2.0))
    assert out["crossattn"].shape[1] == 14
    assert torch.equal(out["vector"][:, :1280], fuse_tokens(c["vector"][:, :1280], null["vector"][:, :1280], 2.0))
    assert torch.equal(out["vector"][:, 1280:], c["vector"][:, 1280:])


def test_groups_of_different_lengths_are_tiled_to_a_common_length():
    c = torch.randn(2, 7, 16)
    short, long = torch.randn(1, 7, 16), torch.randn(1, 14, 16)
    out = logic.CondTransform(settings(logic.MODE_TEEFUSION, w=1.0))(c, [short, long], [0, 1])
    assert out.shape == (2, 14, 16)
    assert torch.equal(out[0], fuse_tokens(c[:1], short, 1.0).repeat(1, 2, 1)[0])
    assert torch.equal(out[1], fuse_tokens(c[1:], long, 1.0)[0])


def test_unknown_row_owners_with_different_negatives_is_a_clear_error(loaded):
    t = logic.CondTransform(settings(logic.MODE_DICE), loaded)
    c = torch.randn(5, 7, 32)
    with pytest.raises(ConditioningError, match="Use the same negative prompt"):
        t(c, [torch.randn(1, 7, 32), torch.randn(1, 7, 32)], None)
    same = torch.randn(1, 7, 32)
    assert t(c, [same, same.clone()], None).shape == c.shape


def test_wrong_width_is_the_cores_clear_error(loaded):
    t = logic.CondTransform(settings(logic.MODE_DICE), loaded)
    with pytest.raises(ConditioningError, match="expects 32-d"):
        t(torch.randn(1, 7, 768), [torch.randn(1, 7, 768)], [0])


def test_model_family_check():
    logic.check_refiner_for_model(RefinerInfo(768, 512, base_family="sd15"), "x", 768)
    logic.check_refiner_for_model(RefinerInfo(1280, 512, base_family="other"), "x", 2048)  # SDXL refiner model
    logic.check_refiner_for_model(RefinerInfo(768, 512, base_family="sd15"), "x", None)
    with pytest.raises(ConditioningError, match="2048-d"):
        logic.check_refiner_for_model(RefinerInfo(2048, 512, base_family="sdxl"), "x.safetensors",
                                      logic.model_token_dim(is_sd1=True))
    assert logic.model_token_dim(is_sdxl=True) == 2048 and logic.model_token_dim() is None


# -- the refiner folder -----------------------------------------------------------------------

def test_store_lists_loads_once_and_stays_inside(tmp_path):
    from cfg_distill import save_refiner

    user, bundled = tmp_path / "user", tmp_path / "bundled"
    (user / "sub").mkdir(parents=True)
    bundled.mkdir()
    torch.manual_seed(0)
    save_refiner(str(user / "sub" / "a.safetensors"), DiceRefiner(32, 16, 4), RefinerInfo(32, 16, 4))
    save_refiner(str(bundled / "b.safetensors"), DiceRefiner(32, 16, 4), RefinerInfo(32, 16, 4))
    (user / "c.pkl").write_bytes(b"\x80\x04")
    store = logic.RefinerStore(lambda: [str(user), str(bundled), str(tmp_path / "missing")])
    assert store.names() == ["b.safetensors", "sub/a.safetensors"]
    first = store.load("sub/a.safetensors")
    assert store.load("sub/a.safetensors") is first and first.name == "a"
    assert store.path("b.safetensors") == str(bundled / "b.safetensors")
    assert len(store.short_hash("b.safetensors")) == 10
    with pytest.raises(ValueError, match="outside"):
        store.path("../../etc/passwd")
    os.utime(user / "sub" / "a.safetensors", ns=(1, 1))
    assert store.load("sub/a.safetensors") is not first, "a changed file is loaded again"


def test_remove_note_takes_out_one_message():
    extra = {}
    logic.add_note(extra, "a")
    logic.add_note(extra, "b")
    logic.remove_note(extra, "a")
    assert extra[logic.INFO_NOTE] == "b"
    logic.remove_note(extra, "b")
    assert logic.INFO_NOTE not in extra
    logic.remove_note(extra, "c")  # nothing there: nothing happens
    assert extra == {}

"""The config schema: every flag at and just past its bounds, through the real parser and checks."""

import math

import pytest

from imgcls.cli import build_parser, main
from imgcls.config import FIELDS, TYPES, TrainConfig, build_config, flag
from imgcls.errors import UserError

# Options a bounded field needs beside it to form a valid config (layer decay means nothing from scratch).
CONTEXT = {"layer_decay": {"pretrained": "w.pt", "strategy": "finetune"},
           "group_lrs": {"pretrained": "w.pt", "strategy": "finetune"},
           "unfreeze_every": {"pretrained": "w.pt", "strategy": "gradual"},
           "unfreeze_at": {"pretrained": "w.pt", "strategy": "gradual"},
           "whiten_bias_epochs": {"whiten": True},
           "final_lr_factor": {"schedule": "linear"}}
BOUNDED = [n for n, f in FIELDS.items() if f.metadata["low"] is not None or f.metadata["high"] is not None]


def _is_int(name: str) -> bool:
    return int in (TYPES[name], *getattr(TYPES[name], "__args__", ())) or "int]" in str(TYPES[name])


def _edges(name: str):
    """(values that must pass, values that must fail) at this field's bounds."""
    meta, step = FIELDS[name].metadata, 1 if _is_int(name) else 1e-6
    ok, bad = [], []
    for bound, is_open, sign in ((meta["low"], meta["open_low"], -1), (meta["high"], meta["open_high"], +1)):
        if bound is None:
            continue
        inside = bound - sign * step if is_open else bound
        ok.append(int(inside) if _is_int(name) else inside)
        bad.append(int(bound + sign * step) if _is_int(name) and not is_open else
                   (bound if is_open else bound + sign * step))
    return ok, bad


@pytest.mark.parametrize("name", BOUNDED)
def test_every_bounded_flag_at_and_past_its_bounds(name, capsys):
    ok, bad = _edges(name)
    wrap = (lambda v: [v]) if "list" in str(TYPES[name]) else (lambda v: v)
    for value in ok:
        cfg = build_config(**CONTEXT.get(name, {}), **{name: wrap(value)})
        got = getattr(cfg, name)
        assert math.isclose((got[0] if isinstance(got, list) else got), value), (name, value)
    for value in bad:
        with pytest.raises(UserError, match=f"{flag(name)} must be"):
            build_config(**CONTEXT.get(name, {}), **{name: wrap(value)})
        # the same through the command line: one line, exit 2, before anything is loaded
        text = ",".join(map(str, wrap(value))) if isinstance(wrap(value), list) else str(value)
        extra = [a for k, v in CONTEXT.get(name, {}).items() for a in ((flag(k),) if v is True else (flag(k), v))]
        assert main(["train", *extra, f"{flag(name)}={text}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{flag(name)} must be" in err[0], err


@pytest.mark.parametrize("name", [n for n, f in FIELDS.items() if f.metadata["choices"]])
def test_every_choice_flag_refuses_what_it_does_not_offer(name):
    with pytest.raises(UserError, match=f"{flag(name)} must be one of"):
        build_config(**{name: "no-such-choice"})


@pytest.mark.parametrize("name", [n for n in FIELDS if TYPES[n] in (int, float)])
def test_numbers_refuse_text_nan_and_infinity(name):
    for value in ("abc", "nan", "inf", "1e999"):
        with pytest.raises(UserError, match=f"{flag(name)} takes"):
            build_config(**{name: value})


def test_every_field_has_a_flag_with_its_help():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    by_flag = {a.option_strings[0]: a for a in train._actions if a.option_strings}
    for name, f in FIELDS.items():
        assert flag(name) in by_flag, name
        assert f.metadata["help"] in by_flag[flag(name)].help.replace("%%", "%")  # argparse's escape of %


def test_flag_values_keep_their_types():
    args = build_parser().parse_args(["train", "--lr", "3e-4", "--epochs", "7", "--mixup", "--group-lrs", "1e-4,1e-3",
                                      "--pretrained", "w.pt", "--strategy", "finetune", "--whiten"])
    cfg = build_config(**{n: getattr(args, n) for n in FIELDS})
    assert (cfg.lr, cfg.epochs, cfg.mixup, cfg.group_lrs, cfg.whiten) == (3e-4, 7, 0.2, [1e-4, 1e-3], True)
    assert cfg.pretrained == "w.pt" and isinstance(cfg, TrainConfig)


@pytest.mark.parametrize("legacy", ["math", "flash", "efficient"])
def test_a_pinned_sdpa_backend_of_an_older_run_is_read_as_sdpa(legacy, tmp_path):
    import yaml

    from imgcls.config import load_config

    assert build_config(attention=legacy, eval_attention=legacy).attention == "sdpa"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**TrainConfig().to_dict(), "attention": legacy, "eval_attention": legacy}))
    cfg = load_config(path)
    assert (cfg.attention, cfg.eval_attention) == ("sdpa", "sdpa")
    with pytest.raises(UserError, match="--attention must be one of"):
        build_config(attention="warp-drive")


def test_the_plan_resolves_every_auto_once_and_resolving_it_again_changes_nothing():
    from imgcls.config import KERNEL_FIELDS, Facts, resolve, unresolved

    cfg = build_config(data="cifar10-mini", aug="standard")
    assert {"precision", "eval_precision", "attention", "memory_format", "img_size", "eval_batch_size",
            "prefetch", "monitor"} <= set(unresolved(cfg))
    kernels = {"attention": "none", "eval_attention": "none", "depthwise_precision": "none",
               "eval_depthwise_precision": "none", "memory_format": "channels_last", "compile": "off",
               "eval_batch_size": 128}
    assert set(kernels) == set(KERNEL_FIELDS)
    facts = Facts("cpu", "fp32", "fp32", 32, "cifar", "memory", "off", "balanced_acc", kernels)
    plan = resolve(cfg, facts)
    assert unresolved(plan) == [] and unresolved(cfg)  # a new object; cfg is left as it was
    assert resolve(plan, facts) == plan
    assert (plan.img_size, plan.eval_batch_size, plan.prefetch, plan.normalize) == (32, 128, "off", "cifar")
    assert plan.monitor == "balanced_acc"
    assert plan.random_erasing == 0.2 and plan.crop_padding is None  # standard's erasing; no random crop
    basic = resolve(build_config(aug="basic"), facts)
    assert basic.crop_padding == 4 and basic.random_erasing == 0.0  # size/8 at 32 px


@pytest.mark.parametrize("text, value", [("seed: 010", 10), ("seed: 1:00", "1:00"), ("lr: 0x2", "0x2"),
                                         ("lr: 1e-3", 1e-3), ("epochs: +7", 7)])
def test_a_recipe_reads_numbers_as_the_command_line_does(tmp_path, text, value):
    """YAML 1.1 read `seed: 010` as 8 (octal), `1:00` as 60 and `0x2` as 2, where --seed 010 is 10 and
    --lr 0x2 is refused: numbers in a file are decimal, the other forms text, which the schema refuses."""
    from imgcls.yamlio import load_yaml_mapping

    path = tmp_path / "recipe.yaml"
    path.write_text(text + "\n")
    assert list(load_yaml_mapping(path, "recipe").values()) == [value]
    if isinstance(value, str):
        with pytest.raises(UserError, match="recipe"):
            build_config(str(path))


@pytest.mark.parametrize("text", ["epochs: !!int 1_0", "lr: !!float 0.0_0_1", "epochs: !!int 0x1", "seed: !!int 010_0"])
def test_an_explicit_number_tag_reads_only_the_decimal_form(tmp_path, text):
    """`!!int` and `!!float` have constructors of their own that take 1_0 and 0x1: the same decimal rule, and one
    line naming the file and the line."""
    from imgcls.yamlio import load_yaml_mapping

    path = tmp_path / "recipe.yaml"
    path.write_text("model: fastnet_cifar_small\n" + text + "\n")
    with pytest.raises(UserError, match=r"recipe .*recipe.yaml is not valid YAML \('.*' is not a decimal .*, line 2\)"):
        load_yaml_mapping(path, "recipe")
    path.write_text("epochs: !!int 12\nlr: !!float 1e-3\nfloor: .inf\n")
    assert load_yaml_mapping(path, "recipe") == {"epochs": 12, "lr": 0.001, "floor": float("inf")}


def test_a_recipe_that_gives_an_option_under_both_spellings_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("epochs: 1\nlabel_smoothing: 0.1\nlabel-smoothing: 0.2\n")
    with pytest.raises(UserError, match="gives label_smoothing twice \\(as - and _\\); keep one"):
        build_config(str(path))


def test_a_date_in_a_recipe_is_text_refused_as_the_flag_would_be(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lr: 2019-01-01\n")
    with pytest.raises(UserError, match="--lr") as e:
        build_config(str(path))
    assert "datetime" not in str(e.value) and "2019-01-01" in str(e.value)

"""Config: YAML loading, dotted overrides, one-line validation errors, resolved dump."""

from __future__ import annotations

import pytest
import yaml

from rtrain.config import (
    Config,
    ConfigError,
    add_config_arguments,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_overrides,
)


def test_defaults_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  lr: 0.02\n  epochs: 5\nmodel:\n  name: seed\n")
    cfg = load_config(path, ["train.lr=0.05", "model.width=0.5", "train.optimizer=adamw"])
    assert cfg.train.lr == 0.05  # override beats file
    assert cfg.train.epochs == 5  # file beats default
    assert cfg.model.name == "seed"
    assert cfg.model.width == 0.5
    assert cfg.train.optimizer == "adamw"
    assert cfg.train.batch_size == Config().train.batch_size  # untouched default


def test_int_is_accepted_for_float_and_null_for_optional():
    cfg = load_config(None, ["train.lr=1", "model.width=null"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert cfg.model.width is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=0.1"], "unknown key train.lrr"),
        (["bogus.x=1"], "unknown section 'bogus'"),
        (["train.epochs=ten"], "train.epochs: expected int"),
        (["train.epochs=2.5"], "train.epochs: expected int"),
        (["train.amp=3"], "train.amp: expected bool"),
        (["model.width=4.0"], "model.width: 4.0 is out of range"),
        (["train.lr=-1"], "train.lr: -1.0 is out of range"),
        (["train.optimizer=adam"], "train.optimizer: expected one of"),
        (["lr=0.1"], "keys look like section.key"),
        (["train.lr"], "expected section.key=value"),
        (["model.backbone=mobilenetv3_small_100"], 'model.backbone: expected "" (the variant\'s own'),
        (["model.backbone='timm:'"], 'model.backbone: expected "" (the variant\'s own'),
        (["model.pretrained=true"], "model.pretrained: pretrained trunk weights come with a timm backbone"),
        (["model.backbone_weights=w.pth"], "model.backbone_weights: pretrained trunk weights come with"),
        (["model.backbone=timm:lcnet_050", "model.width=0.5"], "model.width: multiplies rtrain's own trunks"),
        (["model.backbone=timm:lcnet_050", "model.depth=2"], "model.depth: multiplies rtrain's own trunks"),
    ],
)
def test_bad_values_give_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_a_timm_backbone_reads_from_yaml_as_a_string(tmp_path):
    path = tmp_path / "timm.yaml"
    path.write_text("model:\n  backbone: timm:mobilenetv3_small_100\n  pretrained: true\n")
    m = load_config(path).model
    assert (m.backbone, m.pretrained, m.backbone_weights) == ("timm:mobilenetv3_small_100", True, "")


def test_errors_name_the_file(tmp_path):
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("data:\n  img_sise: 320\n")
    with pytest.raises(ConfigError, match=r"bad_key.yaml: unknown key data.img_sise"):
        load_config(bad_key)

    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+:"):
        load_config(broken)

    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_config(not_mapping)

    with pytest.raises(ConfigError, match="missing.yaml: cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_is_read_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("run:\n  name: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError):
        load_config(evil)
    assert not (tmp_path / "pwned").exists()


def test_dump_round_trips_the_resolved_config(tmp_path):
    cfg = load_config(None, ["train.lr=0.003", "data.train=/x/shards", "model.head_convs=2"])
    out = dump_config(cfg, tmp_path / "run" / "config.yaml")
    data = yaml.safe_load(out.read_text())
    assert data["train"]["lr"] == 0.003
    assert config_from_dict(data) == cfg
    assert config_to_dict(cfg) == data
    assert not list(out.parent.glob("*.tmp"))


def test_parse_overrides_does_not_touch_callers_values():
    items = ["train.lr=0.1", "train.epochs=3", "run.name=abc"]
    nested = parse_overrides(items)
    assert nested == {"train": {"lr": 0.1, "epochs": 3}, "run": {"name": "abc"}}
    assert items == ["train.lr=0.1", "train.epochs=3", "run.name=abc"]


def test_cli_set_is_repeatable_and_takes_several_pairs():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--set", "train.lr=0.1", "model.width=0.5", "--set", "train.epochs=2"])
    cfg = load_config(args.config, args.overrides)
    assert (cfg.train.lr, cfg.model.width, cfg.train.epochs) == (0.1, 0.5, 2)


def test_batch_size_is_a_positive_int_or_auto():
    assert load_config(None, ["train.batch_size=auto"]).train.batch_size == "auto"
    assert load_config(None, ["train.batch_size=48"]).train.batch_size == 48
    cfg = config_from_dict({"train": {"batch_size": "auto", "autobatch_fraction": 0.8}})
    assert (cfg.train.batch_size, cfg.train.autobatch_fraction) == ("auto", 0.8)
    assert Config().train.autobatch_fraction == 0.6
    assert config_from_dict(config_to_dict(cfg)) == cfg  # "auto" survives config.yaml / checkpoints


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("big", "train.batch_size: expected int | 'auto', got 'big'"),
        ("AUTO", "train.batch_size: expected int | 'auto', got 'AUTO'"),
        ("2.5", "train.batch_size: expected int | 'auto', got 2.5"),
        ("true", "train.batch_size: expected int | 'auto', got True"),
        ("null", "train.batch_size: expected int | 'auto', got None"),
        ("0", "train.batch_size: 0 is out of range [1, 4096]"),
        ("-8", "train.batch_size: -8 is out of range [1, 4096]"),
    ],
)
def test_bad_batch_sizes_are_refused_in_one_line(value, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"train.batch_size={value}"])
    assert str(info.value) == message


@pytest.mark.parametrize("value", ["0.05", "0.99", "auto"])
def test_autobatch_fraction_range(value):
    with pytest.raises(ConfigError, match="train.autobatch_fraction"):
        load_config(None, [f"train.autobatch_fraction={value}"])


def test_warmup_defaults_and_ranges():
    t = Config().train
    assert (t.warmup_start_ratio, t.warmup_bias_lr, t.warmup_momentum) == (0.1, 0.1, 0.8)
    for bad in ["train.warmup_start_ratio=1.5", "train.warmup_momentum=1.0", "train.warmup_bias_lr=-0.1"]:
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


def test_every_shipped_config_loads():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if "search" not in data:  # sweep specs are checked in tests/search/test_sweep.py
            load_config(path)

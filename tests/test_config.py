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
        (["train.memory_format=nhwc"], "train.memory_format: expected one of 'auto' | 'contiguous'"),
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


# ------------------------------------------------------------------------------- worker counts


def test_worker_counts_are_an_int_or_an_elastic_min_max(tmp_path):
    from rtrain.config import is_elastic, uses_gpu, worker_range

    path = tmp_path / "elastic.yaml"
    path.write_text("run:\n  workers: 1:2\n")  # YAML 1.1 would read 1:2 as the base-60 number 62
    cfg = load_config(path)
    assert cfg.run.workers == "1:2" and worker_range(cfg.run) == (1, 2) and is_elastic(cfg.run)
    gpus = load_config(None, ["run.gpus=2:4", "train.batch_size=12"]).run
    assert uses_gpu(gpus) and worker_range(gpus) == (2, 4) and is_elastic(gpus)
    for workers, want in ((2, (2, 2)), (0, (1, 1))):  # a fixed count behaves as before (0 runs as 1)
        run = load_config(None, [f"run.workers={workers}"]).run
        assert run.workers == workers and worker_range(run) == want and not is_elastic(run)
    assert not uses_gpu(load_config(None, ["run.gpus=0"]).run)
    dumped = dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(dumped).run.workers == "1:2"
    assert "'1:2'" in dumped.read_text()  # quoted: any YAML reader gets the string back


def test_base_60_numbers_are_not_read_anywhere_in_a_config(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  epochs: 1:30\n")  # yaml.safe_load: 90
    with pytest.raises(ConfigError, match=r"train.epochs: expected int, got str '1:30'"):
        load_config(path)
    cfg = load_config(None, ["train.lr=0.5", "train.epochs=12", "model.width=.5",
                             "train.weight_decay=1.0e-3"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.model.width, cfg.train.weight_decay) == (0.5, 12, 0.5, 0.001)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("3:2", "run.workers: '3:2': MIN 3 is above MAX 2"),
        ("0:2", "run.workers: '0:2': MIN must be at least 1"),
        ("1:x", "run.workers: '1:x': MIN and MAX must be whole numbers"),
        ("1.5:2", "run.workers: '1.5:2': MIN and MAX must be whole numbers"),
        ("-1:2", "run.workers: '-1:2': MIN and MAX must be whole numbers"),
        ("1:2:3", "run.workers: expected a whole number or MIN:MAX (e.g. 1:4), got '1:2:3'"),
        ("two", "run.workers: expected a whole number or MIN:MAX (e.g. 1:4), got 'two'"),
        ("1:5000", "run.workers: '1:5000': MAX 5000 is out of range"),
    ],
)
def test_bad_worker_counts_are_one_line_errors_naming_the_key(tmp_path, value, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"run.workers={value}"])
    assert message in str(info.value) and "\n" not in str(info.value)
    path = tmp_path / "bad.yaml"
    path.write_text(f"run:\n  gpus: '{value}'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message.replace("run.workers", "run.gpus") in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["run.workers=2:4", "train.batch_size=16"],
         "run.workers=2:4: the global batch train.batch_size x 4 = 64 does not split evenly over 3 workers; "
         "use a train.batch_size that is a multiple of 3 (e.g. 18)"),
        (["run.gpus=1:3", "train.batch_size=3"],
         "does not split evenly over 2 workers; use a train.batch_size that is a multiple of 2 (e.g. 4)"),
        (["run.workers=1:2", "train.batch_size=auto"], "train.batch_size=auto cannot be used with an elastic "
                                                       "run.workers=1:2"),
        (["run.workers=1:2", "run.placement_strategy=STRICT_SPREAD"],
         "run.placement_strategy=STRICT_SPREAD cannot be used with an elastic run.workers=1:2"),
    ],
)
def test_an_elastic_range_must_keep_one_global_batch(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert load_config(None, ["run.workers=2:4", "train.batch_size=18"]).run.workers == "2:4"
    assert load_config(None, ["run.workers=2", "train.batch_size=auto"]).train.batch_size == "auto"

"""Fine-tuning (`model.init`) against training from scratch, in the same BCCD training budget.

    python benchmarks/finetune.py                    # 6 min pretraining, 8 min BCCD each
    python benchmarks/finetune.py --pretrain-min 10 --budget-min 12
    python benchmarks/finetune.py --smoke            # about 3 minutes on 2 cores: tiny data, 15 s runs

1. Pretrain: the synthetic shapes (`rtrain.training.quickstart.prepare_synthetic`, its recipe, the model
   variant `--model`) for `--pretrain-min` minutes; its last.pt (EMA weights) is the init.
2. Fine-tune: configs/bccd.yaml with `model.init=<that last.pt>` (6 synthetic classes -> 3 BCCD
   classes: every tensor but the class logits is loaded) for `--budget-min` minutes.
3. Scratch: the same config, the same budget, no init.
Both BCCD runs train on the BCCD `train` split (shards made here with `python -m data_prep.shard`
in a temp dir), are scored by pycocotools on the `test` split in original pixels
(`rtrain.evaluation.weights.evaluate_weights` on their last.pt) and evaluate nothing before the end (no
selection on the test split). Budgets count from the first training batch (`train.time_limit_min`).
One local Ray serves the three runs. The last line is one JSON object; `mAP_gain` = fine-tuned
minus scratch mAP.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_shards import find_bccd, shard_bccd_splits, work_dir  # noqa: E402

from rtrain.training.runner import FitError  # noqa: E402

CONFIG = ROOT / "configs" / "bccd.yaml"



def _fit(config, overrides: list[str], work: Path, name: str):
    from rtrain.training.runner import fit

    result = fit(config, overrides=overrides, workers=1, storage=work / "runs", name=name, plots=False)
    weights = result.last_weights or result.best_weights
    if weights is None:
        raise SystemExit(f"finetune: run {name} left no weights in {result.run_dir}")
    return result, weights


def pretrain(work: Path, model: str, minutes: float, images: int) -> Path:
    from rtrain.training.quickstart import prepare_synthetic, quickstart_config_dict

    prepare_synthetic(work / "synthetic", images=images)
    cfg = quickstart_config_dict(work / "synthetic")
    cfg["model"] = {"name": model}
    cfg["train"].update(time_limit_min=minutes, epochs=100000)
    cfg["eval"]["interval"] = 100000
    _, weights = _fit(cfg, [], work, "pretrain")
    return weights


def bccd_run(work: Path, name: str, model: str, minutes: float, train_dir: Path, test_dir: Path,
             init: Path | None) -> dict:
    from rtrain.evaluation.weights import evaluate_weights
    from rtrain.runs import run_dir

    overrides = [f"model.name={model}", f"train.time_limit_min={minutes}", "train.epochs=100000",
                 "eval.interval=100000", f"data.train={train_dir}", f"data.val={test_dir}"]
    if init is not None:
        overrides.append(f"model.init={init}")
    result, weights = _fit(str(CONFIG), overrides, work, name)
    metrics = evaluate_weights(weights, test_dir, device="cpu")
    rows = run_dir.read_metrics(result.run_dir)
    return {"run": name, "epochs": len(rows), "images": sum(r.get("images", 0) for r in rows),
            "mAP": metrics["mAP"], "mAP50": metrics["mAP50"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="compact_s", help="model variant of all three runs")
    p.add_argument("--pretrain-min", type=float, default=6.0, help="pretraining minutes (synthetic shapes)")
    p.add_argument("--budget-min", type=float, default=8.0, help="BCCD training minutes, each run")
    p.add_argument("--bccd", help="BCCD root (VOC layout; default: ../shared/data/bccd)")
    p.add_argument("--work", help="keep shards and runs here (default: a temp dir, removed)")
    p.add_argument("--smoke", action="store_true",
                   help="about 3 minutes: 120 synthetic / 32 BCCD train / 16 test images, 15 s each")
    args = p.parse_args(argv)
    if args.smoke:
        args.pretrain_min, args.budget_min = min(args.pretrain_min, 0.25), min(args.budget_min, 0.25)
    bccd = find_bccd(args.bccd, "finetune")
    if bccd is None:
        return 2
    import ray

    from rtrain.ray_session import start_ray

    with work_dir(args.work, "finetune-") as work:
        n_train, n_test = (32, 16) if args.smoke else (None, None)
        train_dir, test_dir = shard_bccd_splits(bccd, work / "bccd", n_train, n_test, "finetune")
        started = start_ray()  # one Ray for the three runs (fit reuses an initialised one)
        try:
            print(f"pretraining {args.model} on synthetic shapes, {args.pretrain_min:g} min ...", flush=True)
            init = pretrain(work, args.model, args.pretrain_min, 120 if args.smoke else 600)
            runs = []
            for name, weights in (("finetune", init), ("scratch", None)):
                print(f"BCCD {name}: {args.budget_min:g} min ...", flush=True)
                runs.append(bccd_run(work, name, args.model, args.budget_min, train_dir, test_dir, weights))
        except FitError as exc:
            print(f"finetune: {exc}", file=sys.stderr)
            return 1
        finally:
            if started:
                ray.shutdown()

    tuned, scratch = runs
    print(f"\nBCCD test split, {args.budget_min:g} min training each, {args.model}; init pretrained "
          f"{args.pretrain_min:g} min on synthetic shapes{' (SMOKE: tiny data)' if args.smoke else ''}")
    header = f"{'run':<10} {'epochs':>6} {'images':>7} {'mAP':>6} {'mAP50':>6}"
    print(header + "\n" + "-" * len(header))
    for r in runs:
        print(f"{r['run']:<10} {r['epochs']:>6} {r['images']:>7} {r['mAP']:>6.3f} {r['mAP50']:>6.3f}")
    summary = {"mAP_gain": round(tuned["mAP"] - scratch["mAP"], 4), "finetune_mAP": round(tuned["mAP"], 4),
               "scratch_mAP": round(scratch["mAP"], 4), "finetune_mAP50": round(tuned["mAP50"], 4),
               "scratch_mAP50": round(scratch["mAP50"], 4), "model": args.model,
               "pretrain_min": args.pretrain_min, "budget_min": args.budget_min, "smoke": args.smoke}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

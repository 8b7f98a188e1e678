"""What each of Ray's processes in an rtrain run pays to import what it unpickles, against torch.

Ray pickles functions and classes by reference, so every process imports the modules of what it
unpickles (docs/design.md, "What Ray's own processes import"). Each role's modules are imported in
a fresh interpreter (`python -c`), `--repeats` times, and the median wall time is reported with
whether torch / torchvision got loaded. Peers in the same run: `import ray`, `import ray.data` (what
a data process loads anyway), and `import torch, torchvision` (what each of those processes paid
before the decode step moved to a torch-free module).

    python benchmarks/process_imports.py --repeats 3

Last line: one JSON object {"repeats", "roles": {role: {"modules", "median_s", "torch", "torchvision"}}}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# role -> the modules that process imports (its own runtime's, then what it unpickles from rtrain)
ROLES = {
    "ray (any Ray worker)": ["ray"],
    "ray.data (a data process's runtime)": ["ray.data"],
    "torch + torchvision (peer)": ["torch", "torchvision"],
    "EpochClock actor": ["ray", "rtrain.data.decode_augment"],
    "decode actor / SplitCoordinator / DatasetManager / read task":
        ["ray.data", "rtrain.data.decode_augment", "rtrain.data.epoch_stream"],
    "Train controller": ["ray.train.torch", "rtrain.training.runner"],
    "Train worker (the loop)": ["ray.train.torch", "rtrain.training.train_loop"],
}

PROBE = """
import importlib, json, sys, time
t = time.perf_counter()
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps({"s": time.perf_counter() - t, "torch": "torch" in sys.modules,
                  "torchvision": "torchvision" in sys.modules}))
"""


def measure(modules: list[str], repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"modules": modules, "median_s": round(statistics.median(r["s"] for r in runs), 3),
            "torch": runs[-1]["torch"], "torchvision": runs[-1]["torchvision"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    roles = {role: measure(modules, args.repeats) for role, modules in ROLES.items()}
    width = max(len(r) for r in roles)
    print(f"{'process':<{width}}  import s  torch  torchvision")
    for role, r in roles.items():
        print(f"{role:<{width}}  {r['median_s']:8.2f}  {'yes' if r['torch'] else 'no':>5}  "
              f"{'yes' if r['torchvision'] else 'no':>11}")
    print(json.dumps({"repeats": args.repeats, "roles": roles}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What Ray's own processes unpickle at the start of a run loads no torch: the CPU decode step and
the EpochClock (`rtrain.data.decode_augment`, which the decode actors, the SplitCoordinator and
Ray Train's DatasetManager import), the train stream, and the trainer's loop function (which Ray
Train's controller imports). Each torch + torchvision import costs seconds of CPU on the path to
the first batch. Checked in a fresh interpreter on a real BCCD JPEG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CODE = r"""
import json, pickle, sys
import numpy as np
from PIL import Image

from rtrain.data.decode_augment import DecodeAugment, EpochClock
from rtrain.data import epoch_stream
from rtrain.training.runner import run_train_loop

path = sys.argv[1]
data = open(path, "rb").read()
w, h = Image.open(path).size
def rows():
    ragged = lambda x, t: np.array([np.asarray(x, t)] + [None], dtype=object)[:1]
    return {"image_id": np.array([7]), "file_name": np.array(["a.jpg"], dtype=object),
            "jpeg": np.array([data, b""], dtype=object)[:1], "width": np.array([w]), "height": np.array([h]),
            "orig_width": np.array([w]), "orig_height": np.array([h]),
            "boxes": ragged([10.0, 20.0, 200.0, 220.0], np.float32), "labels": ragged([1], np.int32),
            "iscrowd": ragged([False], bool)}
seen = {"imported": sorted(m for m in ("torch", "torchvision") if m in sys.modules)}
pickle.loads(pickle.dumps(run_train_loop)), EpochClock().set(3)
train = DecodeAugment(train=True, img_size=160, seed=0, epoch=1)(rows())  # a reduced DCT decode
seen["train_shape"] = list(train["image"].shape)
seen["after_train_decode"] = sorted(m for m in ("torch", "torchvision") if m in sys.modules)
val = DecodeAugment(train=False, img_size=640)(rows())  # full size: torchvision's decoder
seen["val_shape"] = list(val["image"].shape)
seen["after_val_decode"] = sorted(m for m in ("torch", "torchvision") if m in sys.modules)
print(json.dumps(seen))
"""


def test_the_decode_step_clock_stream_and_loop_entry_import_no_torch(shared_data):
    jpeg = sorted((shared_data / "bccd" / "JPEGImages").glob("*.jpg"))[0]  # 640 x 480
    done = subprocess.run([sys.executable, "-c", CODE, str(jpeg)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["imported"] == [] and seen["after_train_decode"] == []
    assert seen["train_shape"] == [1, 160, 160, 3]
    # the full-size decode still works: it imports torchvision when it first needs it
    assert seen["val_shape"] == [1, 640, 640, 3] and seen["after_val_decode"] == ["torch", "torchvision"]

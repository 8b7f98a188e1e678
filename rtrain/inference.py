"""Kept for one release: the standalone runtime moved to `rtrain.deploy.inference`."""

import warnings

from rtrain.deploy.inference import *  # noqa: F403
from rtrain.deploy.inference import ExportedModel, decode, preprocess, read_image, sidecar_path  # noqa: F401

warnings.warn("rtrain.inference moved to rtrain.deploy.inference; the old name goes in the next release",
              DeprecationWarning, stacklevel=2)

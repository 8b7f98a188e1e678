"""Kept for one release: this module moved to `rtrain.training.runner` (`fit`, `FitError`, ...)."""

import warnings

from rtrain.training.runner import *  # noqa: F403
from rtrain.training.runner import FitError, FitResult, fit  # noqa: F401

warnings.warn("rtrain.runner moved to rtrain.training.runner; the old name goes in the next release",
              DeprecationWarning, stacklevel=2)

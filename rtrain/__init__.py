"""rtrain: Ray-native training of small, fast depthwise-separable object detectors."""

__version__ = "0.1.0"

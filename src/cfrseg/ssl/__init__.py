"""Semi-supervised learning pieces of the re-training stage: losses, ramps, EMA teacher, the SSL methods, and
the two-stream (labeled + unlabeled) patch sampling with its augmentations (``sampling``, ``augment``)."""

from cfrseg.ssl.ema import update_ema
from cfrseg.ssl.methods import METHODS, SSLMethod, build_method
from cfrseg.ssl.ramps import linear_rampup, sigmoid_rampup

__all__ = ["METHODS", "SSLMethod", "build_method", "linear_rampup", "sigmoid_rampup", "update_ema"]

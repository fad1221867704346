"""Named 3D segmentation networks, built by name from configs and ``model.pt`` artifacts.

``vnet`` is the full UA-MT/DTC V-Net (``n_filters=16`` by default; the ``lite`` profile may pass a smaller
``n_filters`` such as 8). ``tiny`` is the same network with ``n_filters=2``, for fast tests.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from cfrseg.errors import ConfigError
from cfrseg.models.vnet import VNet


def _vnet(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    return VNet(in_channels=in_channels, num_classes=num_classes, **kwargs)


def _tiny(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    kwargs.setdefault("n_filters", 2)
    return VNet(in_channels=in_channels, num_classes=num_classes, **kwargs)


NETWORKS: dict[str, Callable[..., nn.Module]] = {"vnet": _vnet, "tiny": _tiny}
_VNET_OPTIONS = sorted(set(inspect.signature(VNet).parameters) - {"in_channels", "num_classes"})


def build_network(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """A freshly initialised network ``name`` (a key of :data:`NETWORKS`) mapping (B, in_channels, X, Y, Z)
    images to (B, num_classes, X, Y, Z) logits. ``kwargs`` are network options (for the V-Nets: n_filters,
    normalization, has_dropout). Unknown names or options raise :class:`ConfigError`."""
    if name not in NETWORKS:
        raise ConfigError(f"unknown network {name!r}; choose one of {sorted(NETWORKS)}")
    unknown = sorted(set(kwargs) - set(_VNET_OPTIONS))
    if unknown:
        raise ConfigError(f"network {name!r}: unknown option(s) {unknown}; known: {_VNET_OPTIONS}")
    return NETWORKS[name](in_channels, num_classes, **kwargs)

"""Named 3D segmentation networks, built by name from configs and ``model.pt`` artifacts.

``vnet`` is the full UA-MT/DTC V-Net (``n_filters=16`` by default; the ``lite`` profile may pass a smaller
``n_filters`` such as 8). ``tiny`` is the same network with ``n_filters=2``, for fast tests. ``vnet_magic`` is
the V-Net with MagicNet's cube-location head (:mod:`cfrseg.models.magic`; options ``patch``, ``grid``,
``fc_hidden`` on top of the V-Net's); ``--ssl magicnet`` builds it from the configured V-Net.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from cfrseg.errors import ConfigError
from cfrseg.models.magic import VNetMagic
from cfrseg.models.vnet import VNet


def _vnet(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    return VNet(in_channels=in_channels, num_classes=num_classes, **kwargs)


def _tiny(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    kwargs.setdefault("n_filters", 2)
    return VNet(in_channels=in_channels, num_classes=num_classes, **kwargs)


def _vnet_magic(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    return VNetMagic(in_channels=in_channels, num_classes=num_classes, **kwargs)


NETWORKS: dict[str, Callable[..., nn.Module]] = {"vnet": _vnet, "tiny": _tiny, "vnet_magic": _vnet_magic}


def _options(cls: type) -> list[str]:
    return sorted(set(inspect.signature(cls).parameters) - {"in_channels", "num_classes"})


_OPTIONS = {"vnet": _options(VNet), "tiny": _options(VNet), "vnet_magic": _options(VNetMagic)}


def build_network(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """A freshly initialised network ``name`` (a key of :data:`NETWORKS`) mapping (B, in_channels, X, Y, Z)
    images to (B, num_classes, X, Y, Z) logits. ``kwargs`` are network options (for the V-Nets: n_filters,
    normalization, has_dropout). Unknown names or options raise :class:`ConfigError`."""
    if name not in NETWORKS:
        raise ConfigError(f"unknown network {name!r}; choose one of {sorted(NETWORKS)}")
    unknown = sorted(set(kwargs) - set(_OPTIONS[name]))
    if unknown:
        raise ConfigError(f"network {name!r}: unknown option(s) {unknown}; known: {_OPTIONS[name]}")
    return NETWORKS[name](in_channels, num_classes, **kwargs)

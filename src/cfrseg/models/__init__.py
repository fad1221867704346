"""3D networks (V-Net, V-Net with MagicNet's location head), their registry, and inference-time BatchNorm
folding.

SAM-side models are in :mod:`cfrseg.sam`.
"""

from cfrseg.models.magic import VNetMagic
from cfrseg.models.registry import NETWORKS, build_network
from cfrseg.models.vnet import VNet

__all__ = ["NETWORKS", "VNet", "VNetMagic", "build_network"]

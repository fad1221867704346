"""3D networks (V-Net), their registry, and inference-time BatchNorm folding.

SAM-side models are in :mod:`cfrseg.sam`.
"""

from cfrseg.models.registry import NETWORKS, build_network
from cfrseg.models.vnet import VNet

__all__ = ["NETWORKS", "VNet", "build_network"]

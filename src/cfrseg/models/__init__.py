"""3D networks (V-Net) and their registry. SAM-side models live in sibling modules owned by the SAM stages."""

from cfrseg.models.registry import NETWORKS, build_network
from cfrseg.models.vnet import VNet

__all__ = ["NETWORKS", "VNet", "build_network"]

"""V-Net architecture and the network registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cfrseg.errors import ConfigError
from cfrseg.models import NETWORKS, VNet, build_network


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_count_matches_reference_without_aux_heads() -> None:
    assert n_params(VNet(in_channels=1, num_classes=2, n_filters=16)) == 9_448_866
    # reference totals for 14 / 9 classes minus their aux heads (reference-implementation.md sec. 4.1)
    assert n_params(VNet(num_classes=14)) == 9_452_248 - 3_178
    assert n_params(VNet(num_classes=9)) == 9_451_028 - 2_043


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("norm", ["batchnorm", "instancenorm", "groupnorm", "none"])
def test_output_shape(k: int, norm: str) -> None:
    net = VNet(num_classes=k, n_filters=2, normalization=norm, has_dropout=True)
    out = net(torch.randn(2, 1, 16, 32, 48))
    assert out.shape == (2, k, 16, 32, 48)


def test_two_input_channels() -> None:
    assert VNet(in_channels=2, n_filters=2).eval()(torch.randn(1, 2, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


@pytest.mark.parametrize(
    "shape", [(1, 1, 20, 16, 16), (1, 1, 16, 16, 8), (1, 2, 16, 16, 16), (1, 16, 16, 16)]
)
def test_bad_input_raises_value_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="VNet"):
        VNet(n_filters=2)(torch.randn(*shape))


def test_dropout_only_when_asked() -> None:
    assert not any(isinstance(m, nn.Dropout3d) for m in VNet(n_filters=2).modules())
    net = VNet(n_filters=2, has_dropout=True).eval()
    assert any(isinstance(m, nn.Dropout3d) for m in net.modules())
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(net(x), net(x))  # eval: deterministic


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="normalization"):
        VNet(normalization="layernorm")
    with pytest.raises(ConfigError, match="num_classes"):
        VNet(num_classes=1)


def test_registry() -> None:
    assert set(NETWORKS) == {"vnet", "tiny", "vnet_magic"}
    tiny = build_network("tiny", 1, 3)
    assert isinstance(tiny, VNet) and tiny.n_filters == 2 and tiny.num_classes == 3
    assert build_network("vnet", 1, 2, n_filters=8).n_filters == 8
    assert build_network("vnet", 1, 2).n_filters == 16
    with pytest.raises(ConfigError, match=r"unknown network 'unet'.*\['tiny', 'vnet', 'vnet_magic'\]"):
        build_network("unet", 1, 2)
    with pytest.raises(ConfigError, match="n_filter"):
        build_network("vnet", 1, 2, n_filter=8)


def test_fold_batchnorm_is_exact_and_leaves_the_model_alone():
    from cfrseg.models.fuse import fold_batchnorm

    torch.manual_seed(0)
    net = VNet(n_filters=4, num_classes=3)
    # non-trivial running statistics and affine parameters, as after training
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fused, n = fold_batchnorm(net)
    assert n == sum(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules()) == 29
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fused.modules())
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        ref, out = net(x), fused(x)
    assert torch.allclose(ref, out, atol=1e-4, rtol=1e-4), float((ref - out).abs().max())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())

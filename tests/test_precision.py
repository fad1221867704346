"""cfrseg.stages.precision: bf16 detection from CPU flags, "auto" resolution, the autocast context."""

from __future__ import annotations

import pytest
import torch

from cfrseg.stages import precision as P


def test_cpuinfo_flags(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_vnni\n\nprocessor\t: 1\nflags\t: avx512_bf16\n")
    assert P._cpuinfo_has_bf16(f) is False            # the first CPU's flags decide
    f.write_text("model name\t: x\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    assert P._cpuinfo_has_bf16(f) is True
    f.write_text("flags\t: fpu amx_tile amx_bf16\n")
    assert P._cpuinfo_has_bf16(f) is True
    assert P._cpuinfo_has_bf16(tmp_path / "missing") is False


def test_resolve_and_autocast(monkeypatch):
    assert P.resolve_precision("fp32", "cpu") == "fp32" and P.resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(P, "cpu_bf16_native", lambda: False)
    assert P.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(P, "cpu_bf16_native", lambda: True)
    assert P.resolve_precision("auto", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        P.resolve_precision("fp16", "cpu")
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with P.autocast("cpu", "bf16"):
        assert lin(x).dtype == torch.bfloat16
    with P.autocast("cpu", "fp32"):
        assert lin(x).dtype == torch.float32
    monkeypatch.setattr(P, "cpu_bf16_native", lambda: False)
    with P.autocast("cpu", "auto"):
        assert lin(x).dtype == torch.float32

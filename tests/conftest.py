"""Shared fixtures. LA tests read the real data from $CFRSEG_LA_DIR (scripts/test.sh points it at
../shared/data/la2018); without it they are skipped with a plain message and the rest still runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny networks gain nothing from 2 threads, and the shared 2-core CPU
    makes them thrash. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _la_dir() -> Path | None:
    d = os.environ.get("CFRSEG_LA_DIR")
    if d and (Path(d) / "train.list").is_file():
        return Path(d)
    return None


@pytest.fixture(scope="session")
def la_dir() -> Path:
    d = _la_dir()
    if d is None:
        pytest.skip("LA data not found: set CFRSEG_LA_DIR to the la2018 folder (with train.list) to run this test")
    return d


@pytest.fixture(scope="session")
def la_ids(la_dir: Path) -> list[str]:
    return [l.strip() for l in (la_dir / "train.list").read_text().splitlines() if l.strip()]

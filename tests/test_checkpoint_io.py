"""Checkpoints load with torch.load(weights_only=True): RNG states survive the round trip, a file holding any
other pickled object is refused with a clear error before the object is built (no code runs), and checkpoints
written before (NumPy arrays pickled as such) still load."""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cfrseg.errors import InputError
from cfrseg.stages import checkpoint as ckpt_io
from cfrseg.store import LocalStore


class _Payload:
    """Unpickling this touches a file: the stand-in for "arbitrary code" in a hostile checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _rng() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def test_round_trip_keeps_rng_states_and_tensors():
    np.random.seed(7)
    random.seed(7)
    state = {"iteration": 3, "weights": {"w": torch.arange(6.0)}, "rng": _rng(), "history": [{"loss": 0.5}],
             "scalar": np.float32(1.5), "ids": ("a", "b")}
    data = ckpt_io.dumps(state)
    # the file itself holds nothing torch's restricted unpickler refuses
    assert torch.load(io.BytesIO(data), weights_only=True)["iteration"] == 3
    want = np.random.random(4)
    back = ckpt_io.loads(data, "mem")
    np.random.set_state(back["rng"]["numpy"])
    assert np.array_equal(np.random.random(4), want)
    random.setstate(back["rng"]["python"])
    assert torch.equal(back["weights"]["w"], torch.arange(6.0)) and back["scalar"] == 1.5
    assert back["ids"] == ("a", "b") and back["history"] == [{"loss": 0.5}]


def test_pickled_object_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"iteration": 1, "extra": _Payload(marker)}, buf)
    # (plain pickle would run it: the payload is real)
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))
    assert (tmp_path / "control").exists()
    with pytest.raises(InputError, match=r"ck\.pt: refused to load: it contains pickled Python objects"):
        ckpt_io.loads(buf.getvalue(), "ck.pt")
    assert not marker.exists()


def test_legacy_numpy_checkpoint_still_loads():
    buf = io.BytesIO()
    torch.save({"rng": {"numpy": np.random.get_state()}, "w": torch.ones(2)}, buf)  # the old way
    back = ckpt_io.loads(buf.getvalue(), "old.pt")
    assert isinstance(back["rng"]["numpy"][1], np.ndarray) and back["rng"]["numpy"][1].dtype == np.uint32


def test_stages_refuse_a_hostile_checkpoint(tmp_path):
    from cfrseg.stages.finetune import _load_pt
    from cfrseg.stages.retrain import load_checkpoint

    marker = tmp_path / "pwned"
    store = LocalStore(tmp_path / "stage")
    buf = io.BytesIO()
    torch.save({"iteration": 1, "x": _Payload(marker)}, buf)
    store.put_bytes("checkpoint.pt", buf.getvalue())
    with pytest.raises(InputError, match="refused to load"):
        load_checkpoint(store)
    with pytest.raises(InputError, match="checkpoint.pt: refused to load"):
        _load_pt(store, "checkpoint.pt")
    assert not marker.exists()

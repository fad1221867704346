"""The device a stage service computes on, its start-up check, and the one-job-per-device lock.

- :func:`service_device`: ``CFRSEG_DEVICE`` -> the device string given to the stage configs: ``cuda`` ->
  ``cuda:$CFRSEG_GPU``; ``cuda:N``, ``cpu`` as given; ``auto`` -> ``cuda:$CFRSEG_GPU`` when a GPU is usable, else
  ``cpu`` with a warning in the log (never silently); ``""`` keeps each config's own ``device``.
- :func:`check_cuda`: with a CUDA device asked for, ``torch.cuda.is_available()`` and a tiny allocation on it;
  a failure becomes the service's NOT_SERVING reason (services/common/health.py) and fails jobs fast with
  FAILED_PRECONDITION, instead of training on the CPU.
- :class:`DeviceLock`: one job per device at a time across processes (the three stage services share a GPU on a
  one-GPU host) and threads (retrain's ``Segment`` and its training job): an in-process lock plus, when
  ``CFRSEG_LOCK_DIR`` is set, ``fcntl.flock`` on ``$CFRSEG_LOCK_DIR/<device>.lock``. The kernel releases a flock
  when its process dies, so a crashed holder never blocks the device. The holder writes who it is into the file
  (pid, service, run), so waiters can say what they wait for. GPUs are named by their UUID when torch knows it, so
  two containers that each see "their" GPU as ``cuda:0`` still share one lock file per physical GPU.
- :func:`release_memory`: after each job, ``gc.collect()`` and ``torch.cuda.empty_cache()`` (when CUDA is in use).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("cfrseg.services.device")
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_GUARD = threading.Lock()


def cuda_index(device: str) -> int | None:
    """``cuda:N`` -> N, ``cuda`` -> 0, anything else -> None."""
    if device == "cuda":
        return 0
    m = re.fullmatch(r"cuda:(\d+)", device)
    return int(m.group(1)) if m else None


def visible_index(gpu: int) -> tuple[int, str]:
    """The CUDA index to use for ``CFRSEG_GPU=gpu`` and a note. A container that reserves one GPU sees it as
    index 0 whatever its host index, so when exactly one GPU is visible any ``gpu`` maps to 0 (with a note)."""
    import torch

    n = torch.cuda.device_count()
    if gpu < n:
        return gpu, ""
    if n == 1:
        return 0, f"CFRSEG_GPU={gpu} but one GPU is visible (the container's reservation): using cuda:0"
    return gpu, ""


def check_cuda(index: int) -> str | None:
    """None when ``cuda:index`` is usable (a tiny allocation and a sum on it), else the reason (one line)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        return f"torch is not importable: {e}"
    if not torch.cuda.is_available():
        return (f"a GPU was asked for (CFRSEG_DEVICE) but torch.cuda.is_available() is False: no GPU visible to "
                f"this process, or the driver does not fit torch {torch.__version__} (CUDA {torch.version.cuda})")
    n = torch.cuda.device_count()
    if index >= n:
        return f"cuda:{index} asked for (CFRSEG_GPU) but only {n} GPU(s) are visible"
    try:
        x = torch.ones(256, device=f"cuda:{index}")
        ok = float(x.sum().item()) == 256.0
        del x
        torch.cuda.synchronize(index)
    except Exception as e:  # noqa: BLE001
        return f"cuda:{index} is not usable: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return None if ok else f"cuda:{index} computed a wrong sum: the GPU is not usable"


def service_device(device: str, gpu: int) -> tuple[str, str | None]:
    """(device for the configs, reason it is unusable or None) from ``CFRSEG_DEVICE`` and ``CFRSEG_GPU``."""
    d = device.strip().lower()
    if d in ("", "cpu"):
        return d, None
    if d == "auto":
        try:
            import torch

            if torch.cuda.is_available():
                idx, note = visible_index(gpu)
                if note:
                    log.info("%s", note)
                why = check_cuda(idx)
                if why is None:
                    return f"cuda:{idx}", None
            else:
                why = "torch.cuda.is_available() is False"
        except ImportError as e:  # pragma: no cover
            why = str(e)
        log.warning("CFRSEG_DEVICE=auto: no usable GPU (%s); this service computes on the CPU", why)
        return "cpu", None
    idx = gpu if d == "cuda" else int(d.split(":", 1)[1])
    try:
        import torch

        if torch.cuda.is_available():
            idx, note = visible_index(idx)
            if note:
                log.info("%s", note)
    except ImportError:  # pragma: no cover
        pass
    dev = f"cuda:{idx}"
    return dev, check_cuda(idx)


def lock_name(device: str) -> str:
    """The lock file's name for a device: ``cpu``, ``gpu-<uuid>`` (or ``cuda<N>`` when the UUID is unknown)."""
    idx = cuda_index(device)
    if idx is None:
        return "cpu"
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(idx).uuid)
        uuid = re.sub(r"[^A-Za-z0-9_-]", "", uuid)
        if uuid:
            return f"gpu-{uuid}"
    except Exception:  # noqa: BLE001  (no CUDA here: name it by index)
        log.debug("no UUID for cuda:%d; naming its lock by index", idx)
    return f"cuda{idx}"


def label(device: str) -> str:
    idx = cuda_index(device)
    return "the CPU" if idx is None else f"GPU {idx}"


class DeviceLock:
    """One holder per device at a time, across threads and (with ``lock_dir``) processes.

    Args:
        device: the device string (``cpu``, ``cuda:N``); names the lock.
        lock_dir: folder of the lock files (``CFRSEG_LOCK_DIR``, shared by the services of one host);
            "" = in-process only.
        name: the lock's name (default :func:`lock_name` of ``device``).
    """

    def __init__(self, device: str, lock_dir: str = "", name: str | None = None) -> None:
        self.device = device or "cpu"
        self.name = name or lock_name(self.device)
        self.path = Path(lock_dir) / f"{self.name}.lock" if lock_dir else None
        with _GUARD:
            self._thread_lock = _THREAD_LOCKS.setdefault(self.name, threading.Lock())
        self._fd: int | None = None
        self._held = False

    def try_acquire(self, holder: dict[str, Any]) -> bool:
        """Take the lock without waiting; True when taken (then ``holder`` is written to the lock file)."""
        if self._held:
            raise RuntimeError(f"lock {self.name} is already held by this object")
        if not self._thread_lock.acquire(blocking=False):
            return False
        if self.path is None:
            self._held = True
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            self._thread_lock.release()
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self._thread_lock.release()
            return False
        except BaseException:
            os.close(fd)
            self._thread_lock.release()
            raise
        self._fd = fd
        self._held = True
        try:
            data = json.dumps({**holder, "pid": os.getpid(), "since": time.time()}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError:  # the holder note is informative only
            pass
        return True

    def acquire(self, holder: dict[str, Any], *, timeout: float | None = None,
                should_stop: Callable[[], bool] = lambda: False,
                on_wait: Callable[[str], None] | None = None, poll_s: float = 0.25,
                report_every_s: float = 10.0) -> bool:
        """Wait for the lock; False when ``timeout`` passed or ``should_stop()`` turned true first. ``on_wait``
        gets a message (``waiting for GPU 0 (held by ...)``) at once and then every ``report_every_s``."""
        start = time.monotonic()
        last_report = -1e9
        while not self.try_acquire(holder):
            now = time.monotonic()
            if should_stop() or (timeout is not None and now - start >= timeout):
                return False
            if on_wait is not None and now - last_report >= report_every_s:
                last_report = now
                on_wait(self.waiting_message())
            time.sleep(poll_s)
        return True

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock, as its holder wrote it (None when unknown or free)."""
        if self.path is None:
            return None
        try:
            return json.loads(self.path.read_bytes() or b"null")
        except (OSError, ValueError):
            return None

    def waiting_message(self) -> str:
        h = self.holder()
        who = ""
        if h:
            parts = [str(h.get(k)) for k in ("service", "run_id", "what") if h.get(k)]
            since = f", for {time.time() - float(h.get('since', time.time())):.0f} s" if h.get("since") else ""
            who = f" (held by {' '.join(parts) or 'pid ' + str(h.get('pid'))}{since})"
        return f"waiting for {label(self.device)}{who}"

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._thread_lock.release()

    @contextlib.contextmanager
    def held(self, holder: dict[str, Any], **kw: Any) -> Iterator[bool]:
        """``with lock.held(holder, timeout=...) as got:`` -- releases on exit when taken."""
        got = self.acquire(holder, **kw)
        try:
            yield got
        finally:
            if got:
                self.release()


def release_memory() -> None:
    """Give memory back after a job: ``gc.collect()`` and, when CUDA is initialised, ``torch.cuda.empty_cache()``."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:
        log.debug("empty_cache failed", exc_info=True)

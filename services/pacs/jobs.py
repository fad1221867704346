"""PACS job records: one per (route, model, series, set of instances), shared by the DICOM node (creates),
the worker (advances), and the gateway (lists, retries, creates pull jobs).

Job id = ``pacs-`` + sha256(route, model id, SeriesInstanceUID, sorted SOPInstanceUIDs)[:16], so the same series
delivered again maps to the same job and makes no second SEG (unless the job is retried with ``force``). Objects
(``pacs/jobs/{job_id}/``): ``record.json`` (the JobStore record), ``source.tar`` (the instances as received),
``volume.nii`` (the decoded series), ``seg.dcm`` (the SEG). The sources, volume and SEG carry patient data and
are deleted when the job ends DONE (and ``keep_failed_days`` after FAILED/REJECTED). ``pacs/series/{h}.json``
indexes the jobs of a series (h = sha256 of the SeriesInstanceUID), so late instances note the earlier job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cfrseg.errors import InputError, NotFoundError
from services.orchestrator.records import check_id, new_token

Record = dict[str, Any]
STATES = ("RECEIVING", "QUEUED", "CHECKING", "SEGMENTING", "ENCODING", "SENDING", "DONE", "IGNORED", "REJECTED",
          "FAILED")
FINAL = frozenset({"DONE", "IGNORED", "REJECTED", "FAILED"})
STEP_TASK = "cfrseg.pacs.step"
LOCK_TTL_S = 10.0        # renewed every third of it while held (a step can take minutes: segmentation)


def job_id_for(route: str, model_id: str, series_uid: str, sop_uids: Iterable[str]) -> str:
    h = hashlib.sha256("\n".join([route, model_id, series_uid, *sorted(sop_uids)]).encode()).hexdigest()
    return f"pacs-{h[:16]}"


def prefix(job_id: str) -> str:
    return f"pacs/jobs/{check_id(job_id, 'PACS job id')}/"


def job_key(job_id: str) -> str:
    return prefix(job_id) + "record.json"


def series_index_key(series_uid: str) -> str:
    return f"pacs/series/{hashlib.sha256(series_uid.encode()).hexdigest()[:24]}.json"


def new_record(job_id: str, *, state: str, origin: dict[str, Any], series: dict[str, Any],
               route: dict[str, Any] | None = None, reason: str = "", detail: str = "") -> Record:
    now = time.time()
    return {"job_id": job_id, "state": state, "reason": reason, "detail": detail, "origin": origin,
            "series": series, "route": route, "seg": {}, "sends": {}, "timings": {}, "created": now,
            "updated": now, "finished": now if state in FINAL else None, "token": new_token(), "seq": 0,
            "attempts": 0, "previous_job_id": "", "sources_deleted": False}


def _keep(lock: Any, stop: threading.Event) -> None:
    while not stop.wait(LOCK_TTL_S / 3):
        try:
            lock.reacquire()
        except Exception:  # noqa: BLE001  (lost or released: nothing left to keep)
            return


def pack(files: Iterable[Path], tar_path: Path) -> int:
    """Store ``files`` (flat, by name) in an uncompressed tar; returns its size in bytes."""
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "w") as tf:
        for f in files:
            tf.add(str(f), arcname=Path(f).name, recursive=False)
    return tar_path.stat().st_size


def unpack(tar_path: Path, folder: Path) -> list[Path]:
    """Extract a sources tar (regular files only, flat names) into ``folder``; returns the files, sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with tarfile.open(tar_path, "r") as tf:
        for m in tf.getmembers():
            name = Path(m.name).name
            if not m.isfile() or name != m.name or name.startswith("."):
                raise InputError(f"sources archive: unexpected member {m.name!r}")
            src = tf.extractfile(m)
            assert src is not None
            (folder / name).write_bytes(src.read())
            out.append(folder / name)
    return sorted(out)


class PacsJobs:
    """Records and objects of PACS jobs on the object store (through a JobStore) plus the Celery hand-off."""

    def __init__(self, store: Any, jobs: Any, enqueue: Any = None) -> None:
        self.store = store
        self.jobs = jobs
        self._enqueue = enqueue

    # ---- records ----
    def get(self, job_id: str) -> Record:
        rec = self.find(job_id)
        if rec is None:
            raise NotFoundError(f"no PACS job {job_id!r}")
        return rec

    def find(self, job_id: str) -> Record | None:
        key = job_key(job_id)
        for attempt in range(4):
            try:
                return self.jobs.find(key)
            except ValueError:   # a torn read of a record being rewritten (seen with nanio under load): read again
                if attempt == 3:
                    raise
                time.sleep(0.05 * (attempt + 1))
        return None

    def put(self, rec: Record) -> None:
        rec["updated"] = time.time()
        rec["seq"] = int(rec.get("seq", 0)) + 1
        self.jobs.put(job_key(rec["job_id"]), rec)

    def all(self) -> list[Record]:
        ids = [k.split("/")[2] for k in self.jobs.keys("pacs/jobs/", "/record.json") if k.count("/") == 3]
        recs = [r for r in (self.find(i) for i in ids) if r is not None]
        return sorted(recs, key=lambda r: (r.get("created", 0), r["job_id"]), reverse=True)

    @contextlib.contextmanager
    def lock(self, job_id: str, blocking_s: float = 10.0) -> Iterator[bool]:
        """The job's writer lock (Redis; always granted without Redis)."""
        redis = getattr(self.jobs, "redis", None)
        if redis is None:
            with self.jobs.lock(job_key(job_id)):
                yield True
            return
        lk = redis.lock(f"cfrseg:lock:pacs:{job_id}", timeout=LOCK_TTL_S, blocking_timeout=blocking_s)
        got = bool(lk.acquire())
        stop = threading.Event()
        if got:   # keep the lock alive while the holder lives: a killed worker's lock expires in LOCK_TTL_S
            threading.Thread(target=_keep, args=(lk, stop), daemon=True, name=f"lock-{job_id}").start()
        try:
            yield got
        finally:
            stop.set()
            if got:
                with contextlib.suppress(Exception):
                    lk.release()

    # ---- series index (late instances, pull by C-MOVE) ----
    def series_jobs(self, series_uid: str) -> list[str]:
        try:
            return list(json.loads(self.store.get_bytes(series_index_key(series_uid))))
        except NotFoundError:
            return []

    def index(self, series_uid: str, job_id: str) -> None:
        ids = self.series_jobs(series_uid)
        if job_id not in ids:
            self.store.put_bytes(series_index_key(series_uid), json.dumps([*ids, job_id]).encode())

    # ---- objects ----
    def put_sources(self, job_id: str, tar_path: Path) -> None:
        self.store.put_file(prefix(job_id) + "source.tar", tar_path)

    def delete_objects(self, job_id: str) -> int:
        """Delete every object of the job except its record; returns how many."""
        keys = [k for k in self.store.list(prefix(job_id)) if not k.endswith("/record.json")]
        for k in keys:
            self.store.delete(k)
        return len(keys)

    # ---- hand-off to the worker ----
    def enqueue(self, rec: Record, countdown: float = 0.0) -> None:
        if self._enqueue is None:
            from services.orchestrator.app import QUEUE, app

            app.send_task(STEP_TASK, args=[rec["job_id"], rec["token"]], countdown=max(0.0, countdown), queue=QUEUE)
        else:
            self._enqueue(rec["job_id"], rec["token"], countdown)

    def restart(self, rec: Record, state: str = "QUEUED") -> Record:
        """Put a job back in ``state`` with a fresh step token and enqueue it (the caller holds the lock)."""
        rec.update(state=state, reason="", detail="", finished=None, token=new_token())
        rec["attempts"] = int(rec.get("attempts", 0)) + 1
        self.put(rec)
        self.enqueue(rec)
        return rec

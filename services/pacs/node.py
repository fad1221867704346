"""The DICOM node: a pynetdicom C-STORE SCP that spools series to disk and turns each stable series into a PACS
job (docs/pacs.md).

- **Who may send:** associations from calling AEs not in ``callers`` are rejected (A-ASSOCIATE-RJ reason 3), a
  called AE other than ours on that port is rejected (reason 7); a known AE from a host outside its allow-list
  gets C-STORE status 0x0124 (not authorised). Each case is a ``security_alert`` in the audit trail.
- **Receive:** every storage SOP class in every transfer syntax pynetdicom knows (plus LABELMAP SEG), so that a
  PACS routing a whole study never sees a failure for series we ignore. Each instance's encoded bytes are
  written to ``spool/{series}/{sop}.dcm`` (temp file, fsync, rename) before the success status is returned;
  only a few header tags are parsed (UIDs), never the pixels.
- **Limits:** an instance, a series (instances, bytes) or a disk too full gets 0xA700 (out of resources) for
  every instance beyond the limit; the series' spool is deleted and its job ends REJECTED ``oversized``.
- **Stable series:** no instance for ``stable_after_s``, or ``release_grace_s`` after the association that sent
  it was released. The spool is then matched to a route, packed (tar) into the object store, recorded as a job
  (QUEUED, or IGNORED ``no_route``/``own_output``, or the existing job for a repeated delivery) and handed to
  the Celery worker. A spool left by a crash is picked up again at start.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfrseg.errors import ConfigError
from services.pacs.audit import Audit
from services.pacs.config import PacsConfig
from services.pacs.dimse import quiet_pynetdicom
from services.pacs.jobs import PacsJobs, job_id_for, new_record, pack
from services.pacs.models import snapshot

log = logging.getLogger("cfrseg.pacs.node")
UID_RE = re.compile(r"^[0-9.]{1,64}$")
SUCCESS, NOT_AUTHORISED, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0x0124, 0xA700, 0xC000
LABELMAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]


@dataclass
class SeriesSpool:
    key: str
    folder: Path
    called_ae: str
    calling_ae: str
    peer: str
    series_uid: str
    study_uid: str
    sops: dict[str, int] = field(default_factory=dict)   # SOP instance UID -> bytes
    refused: int = 0
    oversized: str = ""                                   # why, once a limit was hit
    first_time: float = field(default_factory=time.time)
    last_time: float = field(default_factory=time.time)
    assocs: set[int] = field(default_factory=set)
    released_at: float = 0.0

    @property
    def num_bytes(self) -> int:
        return sum(self.sops.values())

    def save_meta(self) -> None:
        meta = {k: getattr(self, k) for k in ("called_ae", "calling_ae", "peer", "series_uid", "study_uid")}
        (self.folder / ".series.json").write_text(json.dumps(meta))


def _file_name(sop_uid: str) -> str:
    return (sop_uid if UID_RE.match(sop_uid) else hashlib.sha256(sop_uid.encode()).hexdigest()[:40]) + ".dcm"


def _write_durable(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DicomNode:
    def __init__(self, config: PacsConfig, jobs: PacsJobs, audit: Audit, spool_dir: str | Path,
                 resolved: dict[str, dict[str, Any]]) -> None:
        self.config = config
        self.jobs = jobs
        self.audit = audit
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.resolved = resolved                  # route name -> {"route", "segments", "model"} (checked)
        self.series: dict[str, SeriesSpool] = {}
        self._lock = threading.Lock()
        self._alerted: set[int] = set()
        self._stop = threading.Event()
        self._servers: list[Any] = []
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pacs-finalize")
        self._thread: threading.Thread | None = None
        self.ports: dict[str, int] = {}
        self.finalized = 0

    # ---- lifecycle ----
    def start(self) -> dict[str, int]:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        if not self.config.callers:
            raise ConfigError("callers: list at least one calling AE (ae_title + host) allowed to send to cfrseg")
        quiet_pynetdicom()
        self._recover()
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_RELEASED, self._on_closed), (evt.EVT_ABORTED, self._on_closed)]
        for ae_title, port in self.config.called_aes().items():
            ae = AE(ae_title=ae_title)
            ae.require_called_aet = True
            ae.require_calling_aet = sorted({c.ae_title for c in self.config.callers})
            ae.maximum_associations = self.config.max_associations
            ae.dimse_timeout = ae.acse_timeout = self.config.dimse_timeout_s
            ae.network_timeout = max(60.0, self.config.dimse_timeout_s)
            for cx in AllStoragePresentationContexts:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
            ae.add_supported_context(LABELMAP_SEG, ALL_TRANSFER_SYNTAXES)
            ae.add_supported_context(Verification)
            srv = ae.start_server((self.config.bind, port), block=False, evt_handlers=handlers)
            self._servers.append(srv)
            self.ports[ae_title] = int(srv.socket.getsockname()[1])
        self._thread = threading.Thread(target=self._loop, name="pacs-stable", daemon=True)
        self._thread.start()
        log.info("DICOM node listening: %s", ", ".join(f"{a}@{self.config.bind}:{p}" for a, p in self.ports.items()))
        return self.ports

    def stop(self) -> None:
        self._stop.set()
        for s in self._servers:
            s.shutdown()
        if self._thread is not None:
            self._thread.join(5)
        self._pool.shutdown(wait=True)

    def _recover(self) -> None:
        """Series spooled before a crash or restart: finalised after the quiet time, like new ones."""
        for d in sorted(p for p in self.spool_dir.iterdir() if p.is_dir()):
            meta_f = d / ".series.json"
            files = [f for f in d.glob("*.dcm")]
            if not meta_f.is_file() or not files:
                shutil.rmtree(d, ignore_errors=True)
                continue
            meta = json.loads(meta_f.read_text())
            sp = SeriesSpool(key=d.name, folder=d, **meta)
            for f in files:
                sp.sops[f.stem] = f.stat().st_size
            self.series[sp.key] = sp
            log.info("recovered spooled series %s (%d instances)", sp.series_uid, len(sp.sops))

    # ---- association events ----
    def _on_accepted(self, event: Any) -> None:
        a = event.assoc
        self.audit.event("association", "accepted", calling_ae=a.requestor.ae_title, called_ae=a.acceptor.ae_title,
                         peer=a.requestor.address)

    def _on_rejected(self, event: Any) -> None:
        a = event.assoc
        self.audit.event("association", "rejected", calling_ae=a.requestor.ae_title, called_ae=a.acceptor.ae_title,
                         peer=a.requestor.address)
        self.audit.event("security_alert", "rejected", calling_ae=a.requestor.ae_title,
                         peer=a.requestor.address, detail="association rejected: unknown calling or called AE")
        log.warning("association rejected: calling AE %r from %s", a.requestor.ae_title, a.requestor.address)

    def _on_closed(self, event: Any) -> None:
        aid = id(event.assoc)
        now = time.time()
        with self._lock:
            self._alerted.discard(aid)
            for sp in self.series.values():
                if aid in sp.assocs:
                    sp.assocs.discard(aid)
                    sp.released_at = now

    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    # ---- C-STORE ----
    def _on_store(self, event: Any) -> int:
        a = event.assoc
        calling, peer, called = a.requestor.ae_title.strip(), a.requestor.address, a.acceptor.ae_title.strip()
        if not self.config.allowed(calling, peer):
            if id(a) not in self._alerted:
                self._alerted.add(id(a))
                self.audit.event("security_alert", "refused", calling_ae=calling, called_ae=called, peer=peer,
                                 detail="C-STORE from a host not allowed for this AE title (0x0124)")
                log.warning("C-STORE refused: AE %r is not allowed from %s", calling, peer)
            return NOT_AUTHORISED
        try:
            data = event.encoded_dataset()
        except Exception:  # noqa: BLE001  (undecodable command/dataset)
            return CANNOT_UNDERSTAND
        lim = self.config.limits
        try:
            import pydicom

            hdr = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=HEADER_TAGS)
            series_uid, sop_uid = str(hdr.SeriesInstanceUID), str(hdr.SOPInstanceUID)
            study_uid = str(hdr.get("StudyInstanceUID", ""))
        except Exception:  # noqa: BLE001
            log.warning("C-STORE from %r: dataset without readable UIDs", calling)
            return CANNOT_UNDERSTAND
        key = hashlib.sha256(f"{called}\n{series_uid}".encode()).hexdigest()[:24]
        with self._lock:
            sp = self.series.get(key)
            if sp is None:
                folder = self.spool_dir / key
                folder.mkdir(parents=True, exist_ok=True)
                sp = SeriesSpool(key, folder, called, calling, peer, series_uid, study_uid)
                sp.save_meta()
                self.series[key] = sp
            sp.last_time = time.time()
            sp.assocs.add(id(a))
            if not sp.oversized:
                if len(data) > lim.max_instance_mb * 2**20:
                    sp.oversized = f"an instance of {len(data) / 2**20:.0f} MB > {lim.max_instance_mb:g} MB"
                elif len(sp.sops) + (sop_uid not in sp.sops) > lim.max_instances:
                    sp.oversized = f"more than {lim.max_instances} instances"
                elif sp.num_bytes + len(data) > lim.max_series_mb * 2**20:
                    sp.oversized = f"more than {lim.max_series_mb:g} MB"
                elif shutil.disk_usage(self.spool_dir).free < lim.spool_min_free_mb * 2**20 + len(data):
                    sp.oversized = f"less than {lim.spool_min_free_mb:g} MB free for the spool"
                if sp.oversized:
                    log.warning("series %s refused: %s", series_uid, sp.oversized)
                    for f in sp.folder.glob("*.dcm"):
                        f.unlink(missing_ok=True)
            if sp.oversized:
                sp.refused += 1
                sp.sops.setdefault(sop_uid, 0)
                return OUT_OF_RESOURCES
        _write_durable(sp.folder / _file_name(sop_uid), data)
        with self._lock:
            sp.sops[sop_uid] = len(data)
            sp.last_time = time.time()
        return SUCCESS

    # ---- stability ----
    def _stable(self, sp: SeriesSpool, now: float) -> bool:
        if now - sp.last_time >= self.config.stable_after_s:
            return True
        g = self.config.release_grace_s
        return bool(g > 0 and not sp.assocs and sp.released_at >= sp.last_time and now - sp.released_at >= g)

    def _loop(self) -> None:
        last_heartbeat = 0.0
        while not self._stop.wait(0.1):
            now = time.time()
            with self._lock:
                ready = [sp for sp in self.series.values() if self._stable(sp, now)]
                for sp in ready:
                    del self.series[sp.key]
            for sp in ready:
                self._pool.submit(self._finalize_safe, sp, now)
            if now - last_heartbeat > 2.0:
                last_heartbeat = now
                hb = self.spool_dir.parent / "node.alive"
                hb.write_text(json.dumps({"pid": os.getpid(), "time": now, "ports": self.ports}))

    def _finalize_safe(self, sp: SeriesSpool, stable_at: float) -> None:
        try:
            self.finalize(sp, stable_at)
        except Exception:
            log.exception("series %s: could not hand over the series; spool kept in %s", sp.series_uid, sp.folder)

    def finalize(self, sp: SeriesSpool, stable_at: float) -> dict[str, Any] | None:
        """Turn a stable spool into a job record (and hand it to the worker); returns the record."""
        timings = {"first_received": sp.first_time, "last_received": sp.last_time, "stable": stable_at,
                   "quiet_s": stable_at - sp.last_time}
        origin = {"kind": "push", "calling_ae": sp.calling_ae, "called_ae": sp.called_ae, "peer": sp.peer}
        files = sorted(sp.folder.glob("*.dcm"))
        series = {"study_uid": sp.study_uid, "series_uid": sp.series_uid, "num_instances": len(sp.sops),
                  "num_bytes": sp.num_bytes}
        if sp.oversized:
            rec = self._final(job_id_for("", "", sp.series_uid, sp.sops), "REJECTED", "oversized",
                              f"{sp.oversized}; {sp.refused} instance(s) refused with 0xA700", origin, series, timings)
            self._audit_received(sp, None, rec, outcome="refused")
            shutil.rmtree(sp.folder, ignore_errors=True)
            return rec
        import pydicom

        from cfrseg.dicom.series import scan_series

        metas = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files[:1]]
        info = scan_series(metas)
        series.update(modality=info.modality, sop_class=info.sop_class_uids[0] if info.sop_class_uids else "",
                      series_description_set=bool(info.series_description))
        attrs = metas[0]
        route = None
        for jid in reversed(self.jobs.series_jobs(sp.series_uid)):   # a pull (C-MOVE) waiting for this series
            prev = self.jobs.find(jid)
            if prev and prev["state"] == "RECEIVING" and (prev.get("origin") or {}).get("method") == "move":
                route = self.config.route(prev["route"]["name"]) if prev.get("route") else None
                break
        if info.is_own_output:
            rec = self._final(job_id_for("", "", sp.series_uid, sp.sops), "IGNORED", "own_output",
                              "a segmentation (ours or another's) is never segmented again", origin, series, timings)
        elif route is None and (route := self.config.match(sp.called_ae, attrs)) is None:
            rec = self._final(job_id_for("", "", sp.series_uid, sp.sops), "IGNORED", "no_route",
                              f"no route matches this {info.modality or '?'} series on {sp.called_ae}", origin,
                              series, timings)
        else:
            rec = self._submit(sp, route.name, files, origin, series, timings)
        self._audit_received(sp, attrs, rec)
        shutil.rmtree(sp.folder, ignore_errors=True)
        self.finalized += 1
        return rec

    def _final(self, job_id: str, state: str, reason: str, detail: str, origin: dict[str, Any],
               series: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
        with self.jobs.lock(job_id):
            old = self.jobs.find(job_id)
            if old is not None:
                return old
            rec = new_record(job_id, state=state, origin=origin, series=series, reason=reason, detail=detail)
            rec["timings"] = timings
            self.jobs.put(rec)
        log.info("job %s %s %s: %s", job_id, state, reason, detail)
        return rec

    def _submit(self, sp: SeriesSpool, route_name: str, files: list[Path], origin: dict[str, Any],
                series: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
        snap = snapshot(self.config, route_name, self.resolved[route_name])
        job_id = job_id_for(route_name, snap["model_id"], sp.series_uid, sp.sops)
        with self.jobs.lock(job_id):
            old = self.jobs.find(job_id)
            if old is not None and old["state"] != "RECEIVING" and not old.get("redo"):
                log.info("series %s delivered again: job %s already exists (%s); no new job", sp.series_uid,
                         job_id, old["state"])
                old.setdefault("deliveries", 1)
                old["deliveries"] += 1
                self.jobs.put(old)
                return old
            t0 = time.time()
            with tempfile.TemporaryDirectory(dir=self.spool_dir.parent) as d:
                tar = Path(d) / "source.tar"
                pack(files, tar)
                self.jobs.put_sources(job_id, tar)
            timings["upload_s"] = time.time() - t0
            if old is not None and old["state"] == "RECEIVING":
                rec = old
                rec["timings"].update(timings)
                rec["series"].update(series)
            else:
                earlier = [j for j in self.jobs.series_jobs(sp.series_uid) if j != job_id]
                rec = new_record(job_id, state="QUEUED", origin=origin, series=series, route=snap)
                rec["timings"] = timings
                rec["previous_job_id"] = earlier[-1] if earlier else ""
                if old is not None:  # forced redo of a finished job: a newer write of the same record
                    rec["attempts"] = int(old.get("attempts", 0)) + 1
                    rec["write_seq"] = int(old.get("write_seq", 0) or 0)
            rec["state"] = "QUEUED"
            rec["redo"] = False
            self.jobs.put(rec)
            self.jobs.index(sp.series_uid, job_id)
            self.jobs.enqueue(rec)
        log.info("job %s queued: route %s, %d instances", job_id, route_name, len(files))
        return rec

    def _audit_received(self, sp: SeriesSpool, attrs: Any, rec: dict[str, Any], outcome: str = "success") -> None:
        self.audit.event("instances_received", outcome, calling_ae=sp.calling_ae, called_ae=sp.called_ae,
                         peer=sp.peer, study_uid=sp.study_uid, series_uid=sp.series_uid,
                         patient_id=str(attrs.get("PatientID", "")) if attrs is not None else "",
                         instances=len(sp.sops), bytes=sp.num_bytes, job_id=rec["job_id"], state=rec["state"],
                         reason=rec.get("reason", ""), route=(rec.get("route") or {}).get("name", ""))

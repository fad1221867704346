"""DIMSE client side (pynetdicom): send a SEG by C-STORE (one association per SEG), C-ECHO, and pull mode
(C-FIND at SERIES and IMAGE level, C-MOVE to our own AE, C-GET without an inbound port).

Errors are :class:`RemoteError` with a reason code: ``destination_rejected`` (no accepted presentation context,
or a C-STORE status other than success; the status is in the detail), ``destination_unreachable`` (connection
refused, association rejected or aborted, timeout), ``retrieve_failed`` (C-FIND/C-MOVE/C-GET failure status).
Identifiers (PHI) never go to the logs: pynetdicom's identifier logging is switched off at import.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("cfrseg.pacs.dimse")
SEG_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


class RemoteError(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def quiet_pynetdicom() -> None:
    """No identifiers (patient names, IDs) in pynetdicom's logs; its chatter at WARNING."""
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _ae(calling_ae: str, timeout_s: float) -> Any:
    from pynetdicom import AE

    quiet_pynetdicom()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = timeout_s
    ae.network_timeout = max(timeout_s, 10.0)
    ae.connection_timeout = min(timeout_s, 10.0)
    return ae


def _associate(ae: Any, node: Any, **kw: Any) -> Any:
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, **kw)
    if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
        classes = sorted({c.abstract_syntax for c in assoc.rejected_contexts})
        raise RemoteError("destination_rejected", f"{node.name} accepts no presentation context for SOP class "
                          f"{', '.join(classes)} (e.g. LABELMAP SEG on Orthanc without UnknownSopClassAccepted)")
    if not assoc.is_established:
        how = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise RemoteError("destination_unreachable", f"association with {node.name} ({node.ae_title}@"
                          f"{node.host}:{node.port}) {how}")
    return assoc


def echo(node: Any, calling_ae: str) -> bool:
    from pynetdicom.sop_class import Verification

    ae = _ae(calling_ae, node.timeout_s)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, node)
    try:
        st = assoc.send_c_echo()
        return bool(st) and st.Status == 0
    finally:
        assoc.release()


def store(node: Any, calling_ae: str, path: str | Path, sop_class: str) -> int:
    """C-STORE one file (a SEG) on one association. Returns 0x0000; RemoteError otherwise."""
    ae = _ae(calling_ae, node.timeout_s)
    ae.add_requested_context(sop_class, [EXPLICIT_LE, IMPLICIT_LE])
    assoc = _associate(ae, node)
    try:
        if not any(c.abstract_syntax == sop_class for c in assoc.accepted_contexts):
            raise RemoteError("destination_rejected", f"{node.name} accepts no presentation context for SOP class "
                              f"{sop_class} (e.g. LABELMAP SEG on Orthanc without UnknownSopClassAccepted)")
        st = assoc.send_c_store(str(path))
        if not st or "Status" not in st:
            raise RemoteError("destination_unreachable", f"{node.name}: no C-STORE response (timeout or abort)")
        if st.Status not in (0x0000, 0xB000, 0xB007, 0xB006):
            raise RemoteError("destination_rejected", f"{node.name} answered C-STORE status 0x{st.Status:04X}")
        return int(st.Status)
    finally:
        if assoc.is_established:
            assoc.release()


# ---------------------------------------------------------------------------------------------- pull mode


def _find(assoc: Any, ds: Any) -> list[Any]:
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    out = []
    for status, ident in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind):
        if not status:
            raise RemoteError("retrieve_failed", "C-FIND: no response (timeout or abort)")
        if status.Status in (0xFF00, 0xFF01):
            if ident is not None:
                out.append(ident)
        elif status.Status != 0x0000:
            raise RemoteError("retrieve_failed", f"C-FIND status 0x{status.Status:04X}")
    return out


def find_series(node: Any, calling_ae: str, study_uid: str, series_uid: str = "") -> list[dict[str, Any]]:
    """The series of a study (or one series) with their matching attributes and SOP instance UIDs."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    ae = _ae(calling_ae, node.timeout_s)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, node)
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid or ""
        for k in ("Modality", "SeriesDescription", "SeriesNumber", "BodyPartExamined", "ProtocolName"):
            setattr(q, k, "")
        out = []
        for s in _find(assoc, q):
            iq = Dataset()
            iq.QueryRetrieveLevel = "IMAGE"
            iq.StudyInstanceUID = study_uid
            iq.SeriesInstanceUID = str(s.SeriesInstanceUID)
            iq.SOPInstanceUID = ""
            iq.SOPClassUID = ""
            iq.ImageType = ""
            iq.Manufacturer = ""
            inst = _find(assoc, iq)
            attrs = {k: str(s.get(k, "")) for k in ("Modality", "SeriesDescription", "SeriesNumber",
                                                     "BodyPartExamined", "ProtocolName")}
            if inst:
                attrs["SOPClassUID"] = str(inst[0].get("SOPClassUID", ""))
                attrs["Manufacturer"] = str(inst[0].get("Manufacturer", ""))
                it = inst[0].get("ImageType")
                attrs["ImageType"] = [str(v) for v in it] if it else []
            out.append({"series_uid": str(s.SeriesInstanceUID), "attrs": attrs,
                        "sop_uids": sorted(str(i.SOPInstanceUID) for i in inst),
                        "sop_classes": sorted({str(i.get("SOPClassUID", "")) for i in inst} - {""})})
        return out
    finally:
        assoc.release()


def _series_id(study_uid: str, series_uid: str) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    return ds


def move_series(node: Any, calling_ae: str, destination_ae: str, study_uid: str, series_uid: str) -> int:
    """C-MOVE a series to ``destination_ae`` (our node); returns the number of completed sub-operations."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    ae = _ae(calling_ae, node.timeout_s)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = _associate(ae, node)
    completed = 0
    try:
        for status, _ in assoc.send_c_move(_series_id(study_uid, series_uid), destination_ae,
                                           StudyRootQueryRetrieveInformationModelMove):
            if not status:
                raise RemoteError("retrieve_failed", "C-MOVE: no response (timeout or abort)")
            completed = int(status.get("NumberOfCompletedSuboperations", completed) or completed)
            if status.Status not in (0x0000, 0xFF00, 0xFF01):
                raise RemoteError("retrieve_failed", f"C-MOVE to {destination_ae} status 0x{status.Status:04X}")
        return completed
    finally:
        assoc.release()


def get_series(node: Any, calling_ae: str, study_uid: str, series_uid: str, sop_classes: list[str],
               on_file: Callable[[bytes, str], None]) -> int:
    """C-GET a series on one association (we take the SCP role for ``sop_classes``); each instance's encoded
    bytes go to ``on_file(data, sop_uid)`` without decoding. Returns the number of instances received."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    if not sop_classes:
        raise RemoteError("retrieve_failed", "C-GET: the source reported no SOP class for this series")
    ae = _ae(calling_ae, node.timeout_s)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for c in sop_classes[:100]:
        ae.add_requested_context(c, ALL_TRANSFER_SYNTAXES[:12])
    got = [0]

    def handle(event: Any) -> int:
        on_file(event.encoded_dataset(), str(event.request.AffectedSOPInstanceUID))
        got[0] += 1
        return 0x0000

    roles = [build_role(c, scp_role=True) for c in sop_classes[:100]]
    assoc = _associate(ae, node, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, handle)])
    try:
        for status, _ in assoc.send_c_get(_series_id(study_uid, series_uid),
                                          StudyRootQueryRetrieveInformationModelGet):
            if not status:
                raise RemoteError("retrieve_failed", "C-GET: no response (timeout or abort)")
            if status.Status not in (0x0000, 0xFF00, 0xFF01):
                raise RemoteError("retrieve_failed", f"C-GET status 0x{status.Status:04X}")
        return got[0]
    finally:
        assoc.release()

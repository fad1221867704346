"""A small DICOMweb client (PS3.18) on the standard library: STOW-RS (store a SEG, then check it is there by
QIDO: a 200 is not trusted, see dicomweb-client #42), QIDO-RS (series and instances of a study) and WADO-RS
(a series as ``multipart/related; type="application/dicom"``). A bearer token (``token_file`` of the node) is
sent when configured. Errors are :class:`services.pacs.dimse.RemoteError` with the same reason codes as DIMSE.

Plain ``urllib`` instead of dicomweb-client: the four calls cfrseg makes fit in this file, with no extra
dependency (requests, retrying) in the gateway image.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

from services.pacs.dimse import RemoteError

DICOM_JSON = "application/dicom+json"


def _request(node: Any, method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None,
             code: str = "destination_unreachable") -> tuple[int, dict[str, str], bytes]:
    url = node.dicomweb_url.rstrip("/") + path
    h = dict(headers or {})
    token = node.token()
    if token:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=node.timeout_s) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode("utf-8", "replace")
        raise RemoteError("destination_rejected" if code == "destination_unreachable" else code,
                          f"{node.name}: HTTP {e.code} for {method} {path.split('?')[0]}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise RemoteError(code, f"{node.name}: {method} {path.split('?')[0]}: {getattr(e, 'reason', e)}") from None


def stow(node: Any, data: bytes, study_uid: str, sop_uid: str) -> None:
    """STOW-RS one instance, then confirm by QIDO that it is stored."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
            + f"\r\n--{boundary}--\r\n".encode())
    status, _, resp = _request(node, "POST", "/studies", body=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', "Accept": DICOM_JSON})
    try:
        info = json.loads(resp) if resp else {}
    except json.JSONDecodeError:
        info = {}
    failed = (info.get("00081198") or {}).get("Value") or []
    if failed:
        reason = failed[0].get("00081197", {}).get("Value", ["?"])[0]
        raise RemoteError("destination_rejected", f"{node.name}: STOW-RS refused the SEG (FailureReason {reason})")
    found = qido(node, f"/studies/{study_uid}/instances?SOPInstanceUID={urllib.parse.quote(sop_uid)}",
                 code="destination_rejected")
    if not any(sop_uid in json.dumps(x) for x in found):
        raise RemoteError("destination_rejected", f"{node.name}: STOW-RS answered {status} but the SEG is not found "
                          f"by QIDO afterwards")


def qido(node: Any, path: str, code: str = "retrieve_failed") -> list[dict[str, Any]]:
    status, _, body = _request(node, "GET", path, headers={"Accept": DICOM_JSON}, code=code)
    if status == 204 or not body:
        return []
    try:
        out = json.loads(body)
    except json.JSONDecodeError:
        raise RemoteError(code, f"{node.name}: QIDO answer is not JSON") from None
    return out if isinstance(out, list) else []


def _val(item: dict[str, Any], tag: str) -> Any:
    v = (item.get(tag) or {}).get("Value") or []
    return v[0] if len(v) == 1 else (v or "")


def find_series(node: Any, study_uid: str, series_uid: str = "") -> list[dict[str, Any]]:
    """Like :func:`services.pacs.dimse.find_series`, over QIDO-RS."""
    q = f"/studies/{study_uid}/series" + (f"?SeriesInstanceUID={urllib.parse.quote(series_uid)}" if series_uid else "")
    out = []
    for s in qido(node, q):
        suid = str(_val(s, "0020000E"))
        inst = qido(node, f"/studies/{study_uid}/series/{suid}/instances?includefield=00080008&includefield=00080070")
        attrs = {"Modality": str(_val(s, "00080060")), "SeriesDescription": str(_val(s, "0008103E")),
                 "SeriesNumber": str(_val(s, "00200011"))}
        if inst:
            attrs["SOPClassUID"] = str(_val(inst[0], "00080016"))
            attrs["Manufacturer"] = str(_val(inst[0], "00080070"))
            it = (inst[0].get("00080008") or {}).get("Value") or []
            attrs["ImageType"] = [str(v) for v in it]
        out.append({"series_uid": suid, "attrs": attrs, "sop_uids": sorted(str(_val(i, "00080018")) for i in inst),
                    "sop_classes": sorted({str(_val(i, "00080016")) for i in inst} - {""})})
    return out


def retrieve_series(node: Any, study_uid: str, series_uid: str, on_file: Callable[[bytes, str], None]) -> int:
    """WADO-RS a series; each part's bytes go to ``on_file(data, "")``. Returns the number of instances."""
    _, headers, body = _request(node, "GET", f"/studies/{study_uid}/series/{series_uid}",
                                headers={"Accept": 'multipart/related; type="application/dicom"'},
                                code="retrieve_failed")
    ctype = headers.get("content-type", "")
    params = dict(p.strip().split("=", 1) for p in ctype.split(";")[1:] if "=" in p)
    boundary = params.get("boundary", "").strip('"')
    if not boundary:
        raise RemoteError("retrieve_failed", f"{node.name}: WADO-RS answer is not multipart ({ctype!r})")
    n = 0
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        _head, sep, data = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        if data.endswith(b"\r\n"):
            data = data[:-2]
        on_file(data, "")
        n += 1
    return n

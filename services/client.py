"""``cfrseg client``: a command-line client of the gateway (on :mod:`services.sdk`).

    cfrseg client [--address A] [--token T | --token-file F] [--tls-ca CA [--tls-cert C --tls-key K]]
                  [--tls-server-name N] [--stack-dir .stack] COMMAND ...

The connection options may also follow the command (``cfrseg client list --stack-dir .stack``).
Address and token default to $CFRSEG_ADDRESS / $CFRSEG_TOKEN, else the local stack's ``stack.json``/``token``.
TLS: ``--tls-ca`` (default $CFRSEG_CLIENT_CA), client certificate ``--tls-cert``/``--tls-key`` (default
$CFRSEG_CLIENT_CERT/$CFRSEG_CLIENT_KEY); a local stack started with ``--tls`` is used with its own CA.
Commands: upload-dataset, submit, watch, get, list, cancel, models, artifacts, fetch, segment, health,
pacs (jobs, job, retry, segment-study).
Exit status: 0 ok, 1 the run ended FAILED/CANCELLED (watch/submit --watch) or something is not healthy (health),
2 an error (printed as ``error: CODE: message``, plus a ``hint:`` line for the usual TLS mistakes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # no gRPC core INFO lines (TLS handshake failures) on stderr

import grpc

from cfrseg.cli import add_class_arguments, class_names_arg
from services.sdk import FINAL, Client, state_name

FETCH = ("retrain/model.pt", "retrain/config.json", "report.md", "evaluate/metrics.json")


def _connect(a: argparse.Namespace) -> Client:
    d = Path(a.stack_dir)
    address = a.address or os.environ.get("CFRSEG_ADDRESS", "")
    token = a.token or os.environ.get("CFRSEG_TOKEN", "")
    if a.token_file:
        token = Path(a.token_file).read_text().strip()
    ca, cert, key = a.tls_ca, a.tls_cert, a.tls_key
    if not address and (d / "stack.json").is_file():
        st = json.loads((d / "stack.json").read_text())
        address = st["gateway"]
        tls = st.get("tls") or {}
        ca = ca or tls.get("ca", "")
        if tls.get("client_required"):
            cert, key = cert or tls.get("client_cert", ""), key or tls.get("client_key", "")
    if not token and (d / "token").is_file():
        token = (d / "token").read_text().strip()
    if not address or not token:
        raise SystemExit("error: no gateway address/token: pass --address and --token (or --token-file), set "
                         "CFRSEG_ADDRESS/CFRSEG_TOKEN, or start a local stack (cfrseg stack up)")
    if bool(cert) != bool(key):
        raise SystemExit("error: a client certificate needs both --tls-cert and --tls-key "
                         "(or CFRSEG_CLIENT_CERT and CFRSEG_CLIENT_KEY)")
    return Client(address, token, ca or None, cert or None, key or None, server_name=a.tls_server_name or None)


def _run_line(r: Any) -> str:
    st = next((s for s in r.stages if s.stage == r.stage), None)
    prog = f" {st.step}/{st.total}" if st is not None and st.total else ""
    metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted(r.metrics.items()))
    return f"{r.run_id}  {state_name(r.state):10s} {r.stage}{prog}  {r.profile}/{r.ssl_method}  {metrics}".rstrip()


def _watch(c: Client, run_id: str, quiet: bool = False) -> int:
    from tqdm import tqdm

    bar = None
    stage = ""
    for ev in c.watch_run(run_id):
        p = ev.progress
        if quiet:
            continue
        if p.stage != stage:
            if bar is not None:
                bar.close()
            stage = p.stage
            bar = tqdm(total=p.total or None, desc=stage, unit="step", dynamic_ncols=True)
        if bar is not None:
            if p.total and bar.total != p.total:
                bar.total = p.total
            bar.n = p.step
            post = {k: f"{v:.3g}" for k, v in sorted(p.losses.items())}
            if p.HasField("eta_s"):
                post["eta"] = f"{p.eta_s:.0f}s"
            bar.set_postfix(post, refresh=False)
            bar.refresh()
    if bar is not None:
        bar.close()
    r = c.get_run(run_id)
    print(_run_line(r))
    if r.error.code:
        print(f"error: {r.error.code}: {r.error.message}", file=sys.stderr)
    return 0 if r.state == FINAL[0] else 1


def cmd_upload_dataset(c: Client, a: argparse.Namespace) -> int:
    from tqdm import tqdm

    labeled: Any = a.labeled
    if labeled is not None and not labeled.isdigit():
        labeled = [x for x in labeled.split(",") if x]
    elif labeled is not None:
        labeled = int(labeled)
    bar = tqdm(desc="upload", unit="case", dynamic_ncols=True)

    def progress(case_id: str, done: int, total: int) -> None:
        bar.total = total
        bar.set_postfix_str(case_id, refresh=False)
        bar.update(done - bar.n)

    try:
        ds = c.create_dataset(a.folder, name=a.name, num_classes=a.num_classes, labeled=labeled,
                              holdout=a.holdout, test=[x for x in a.test.split(",") if x], progress=progress,
                              subject=a.subject_pattern, modality=a.modality,
                              class_names=class_names_arg(a.class_names))
    finally:
        bar.close()
    print(f"dataset {ds.dataset_id}: {ds.num_labeled} labeled, {ds.num_unlabeled} unlabeled, {ds.num_test} test "
          f"({ds.num_classes} classes: {', '.join(ds.class_names[1:])}; {ds.modality})")
    return 0


def _overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    from cfrseg.config import parse_overrides
    from cfrseg.errors import ConfigError

    try:
        return parse_overrides(items)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def cmd_submit(c: Client, a: argparse.Namespace) -> int:
    r = c.submit_run(a.dataset, profile=a.profile, ssl_method=a.ssl, name=a.name,
                     labeled=[x for x in a.labeled.split(",") if x],
                     unlabeled=[x for x in a.unlabeled.split(",") if x], overrides=_overrides(a.set),
                     request_id=a.request_id or None)
    print(_run_line(r))
    return _watch(c, r.run_id) if a.watch else 0


def cmd_watch(c: Client, a: argparse.Namespace) -> int:
    return _watch(c, a.run_id, a.quiet)


def cmd_get(c: Client, a: argparse.Namespace) -> int:
    from google.protobuf import json_format

    print(json.dumps(json_format.MessageToDict(c.get_run(a.run_id), preserving_proto_field_name=True), indent=2))
    return 0


def cmd_list(c: Client, a: argparse.Namespace) -> int:
    for r in c.list_runs(state=a.state, dataset_id=a.dataset):
        print(_run_line(r))
    return 0


def cmd_cancel(c: Client, a: argparse.Namespace) -> int:
    print(_run_line(c.cancel_run(a.run_id)))
    return 0


def cmd_models(c: Client, a: argparse.Namespace) -> int:
    for m in c.list_models():
        metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted(m.metrics.items()))
        print(f"{m.model_id}  {m.network}  {m.num_classes} classes  {m.ssl_method}  {metrics}".rstrip())
        for cl in m.classes:
            print(f"    {cl.value}: {cl.name}" + (f"  ({cl.code})" if cl.code else ""))
    return 0


def cmd_artifacts(c: Client, a: argparse.Namespace) -> int:
    for ref in c.list_artifacts(a.run_id):
        print(f"{ref.size:>12d}  {ref.key}")
    return 0


def cmd_fetch(c: Client, a: argparse.Namespace) -> int:
    out = Path(a.out or a.run_id)
    names = a.name or list(FETCH)
    for name in names:
        try:
            p = c.download_artifact(a.run_id, name, out / name)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND and not a.name:
                continue  # optional parts (e.g. no test cases: no metrics.json)
            raise
        print(f"{name} -> {p}")
    return 0


def cmd_segment(c: Client, a: argparse.Namespace) -> int:
    res = c.segment_file(a.model, a.input, a.output)
    print(f"{a.output}: {res.num_classes} classes, {res.seconds:.1f} s (stored as {res.label.key})")
    return 0


def cmd_health(c: Client, a: argparse.Namespace) -> int:
    rep = c.health(include_components=not a.gateway_only)
    ok = rep.serving
    for r in [rep, *rep.components]:
        state = "SERVING" if r.serving else "NOT SERVING"
        print(f"{r.service:12s} {state:12s} {r.address or c.address}")
        if r.error:
            print(f"  unreachable: {r.error}")
        for ch in r.checks:
            note = "" if ch.critical else " (reported only)"
            print(f"  {'ok' if ch.ok else 'FAIL':4s}  {ch.name:12s} {ch.reason}{note}".rstrip())
        ok &= r.serving
    return 0 if ok else 1


def _pacs_line(j: Any) -> str:
    from services.sdk import pacs_state_name

    why = f" {j.reason}" if j.reason else ""
    seg = f" SEG {j.seg_type} {j.seg_frames} frames" if j.seg_sop_uid else ""
    return (f"{j.job_id}  {pacs_state_name(j.state):10s}{why}  route={j.route or '-'}  series={j.series_uid}  "
            f"{j.num_instances} inst{seg}").rstrip()


def cmd_pacs_jobs(c: Client, a: argparse.Namespace) -> int:
    for j in c.list_pacs_jobs(state=a.state, study_uid=a.study, series_uid=a.series, route=a.route):
        print(_pacs_line(j))
    return 0


def cmd_pacs_job(c: Client, a: argparse.Namespace) -> int:
    from google.protobuf import json_format

    print(json.dumps(json_format.MessageToDict(c.get_pacs_job(a.job_id), preserving_proto_field_name=True),
                     indent=2))
    return 0


def cmd_pacs_retry(c: Client, a: argparse.Namespace) -> int:
    print(_pacs_line(c.retry_pacs_job(a.job_id, force=a.force)))
    return 0


def cmd_pacs_segment_study(c: Client, a: argparse.Namespace) -> int:
    from services.sdk import PACS_FINAL

    r = c.segment_study(a.source, a.study_uid, series_uid=a.series, route=a.route, method=a.method)
    for s in r.skipped_series:
        print(f"skipped {s}")
    code = 0
    for j in r.jobs:
        if a.wait:
            j = c.wait_pacs_job(j.job_id, timeout=a.timeout)
            code |= int(j.state != PACS_FINAL[0])
        print(_pacs_line(j))
        if a.wait and j.detail:
            print(f"  {j.detail}")
    return code


def _add_pacs(sub: Any, conn: argparse.ArgumentParser) -> None:
    p = sub.add_parser("pacs", help="PACS jobs of the DICOM node and pull mode (docs/pacs.md)")
    ps = p.add_subparsers(dest="pacs_cmd", required=True, metavar="PACS_COMMAND")
    _add = ps.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return _add(name, parents=[conn], **kw)

    ps.add_parser = add_parser  # type: ignore[method-assign]
    q = ps.add_parser("jobs", help="list PACS jobs (newest first)")
    q.add_argument("--state", default="", help="RECEIVING|QUEUED|...|DONE|IGNORED|REJECTED|FAILED")
    q.add_argument("--study", default="", help="StudyInstanceUID")
    q.add_argument("--series", default="", help="SeriesInstanceUID")
    q.add_argument("--route", default="")
    q.set_defaults(func=cmd_pacs_jobs)
    q = ps.add_parser("job", help="one PACS job as JSON (state, reason, UIDs, SEG, timings)")
    q.add_argument("job_id")
    q.set_defaults(func=cmd_pacs_job)
    q = ps.add_parser("retry", help="resume a FAILED job (--force: re-run a finished one)")
    q.add_argument("job_id")
    q.add_argument("--force", action="store_true")
    q.set_defaults(func=cmd_pacs_retry)
    q = ps.add_parser("segment-study", help="segment a study that is in a configured PACS (pull mode)")
    q.add_argument("source", help="a destination name of the PACS config, e.g. pacs")
    q.add_argument("study_uid")
    q.add_argument("--series", default="", help="only this SeriesInstanceUID")
    q.add_argument("--route", default="", help="use this route for every series (default: match rules)")
    q.add_argument("--method", default="", choices=["", "get", "move", "wado"],
                   help="C-GET (default for DIMSE), C-MOVE to our AE, or WADO-RS (default for DICOMweb)")
    q.add_argument("--wait", action="store_true", help="wait until every job ends (exit 1 if one is not DONE)")
    q.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait per job (default 1800)")
    q.set_defaults(func=cmd_pacs_segment_study)


def _connection_options() -> argparse.ArgumentParser:
    """The connection options, accepted before and after the command (defaults filled in by :func:`parse`)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection (before or after the command)")
    S = argparse.SUPPRESS
    g.add_argument("--address", default=S, help="gateway host:port (default $CFRSEG_ADDRESS or the local stack)")
    g.add_argument("--token", default=S, help="bearer token (default $CFRSEG_TOKEN or the local stack's)")
    g.add_argument("--token-file", default=S, help="file holding the token")
    g.add_argument("--tls-ca", default=S, metavar="CA", help="CA bundle (PEM) to verify the gateway: TLS "
                   "(default $CFRSEG_CLIENT_CA; a --tls local stack's own CA)")
    g.add_argument("--tls-cert", default=S, metavar="CERT", help="client certificate (PEM) for mTLS "
                   "(default $CFRSEG_CLIENT_CERT)")
    g.add_argument("--tls-key", default=S, metavar="KEY", help="its private key (default $CFRSEG_CLIENT_KEY)")
    g.add_argument("--tls-server-name", default=S, metavar="NAME",
                   help="check the gateway's certificate against this name instead of the address's host")
    g.add_argument("--stack-dir", default=S, help="local stack folder (default .stack)")
    return p


def _defaults() -> dict[str, str]:
    env = os.environ
    return {"address": "", "token": "", "token_file": "", "tls_ca": env.get("CFRSEG_CLIENT_CA", ""),
            "tls_cert": env.get("CFRSEG_CLIENT_CERT", ""), "tls_key": env.get("CFRSEG_CLIENT_KEY", ""),
            "tls_server_name": "", "stack_dir": ".stack"}


def build_parser() -> argparse.ArgumentParser:
    conn = _connection_options()
    ap = argparse.ArgumentParser(prog="cfrseg client", description="gRPC client of the cfrseg gateway",
                                 parents=[conn])
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    _add_parser = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return _add_parser(name, parents=[conn], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    p = sub.add_parser("upload-dataset", help="upload a dataset folder (LA h5 layout, nnU-Net, images/ + labels/)")
    p.add_argument("folder")
    p.add_argument("--name", default=None)
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes, background included (required for images/ + labels/ folders)")
    add_class_arguments(p)
    p.add_argument("--labeled", default=None, help="number of labeled cases, or comma-separated case ids")
    p.add_argument("--holdout", type=int, default=0, help="hold out the last N cases as test cases")
    p.add_argument("--test", default="", help="comma-separated case ids to use as test cases")
    p.add_argument("--subject-pattern", default=None, metavar="REGEX",
                   help="group cases by patient (first group or whole match of REGEX in the case id): --labeled N "
                        "and --holdout count patients (as `cfrseg run --subject-pattern`)")
    p.set_defaults(func=cmd_upload_dataset)

    p = sub.add_parser("submit", help="submit a run")
    p.add_argument("--dataset", required=True)
    p.add_argument("--profile", default="", help="lite | paper | tiny (default: the server's, lite; tiny is a "
                                               "random toy for smoke tests)")
    p.add_argument("--ssl", default="mt", help="none | mt | st | uamt | acmt | magicnet (default mt)")
    p.add_argument("--labeled", default="", help="comma-separated labeled case ids (default all)")
    p.add_argument("--unlabeled", default="", help="comma-separated unlabeled case ids (default all)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE")
    p.add_argument("--name", default="")
    p.add_argument("--request-id", default="", help="idempotency key (default: a fresh one)")
    p.add_argument("--watch", action="store_true", help="then watch it until it ends")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("watch", help="watch a run with progress bars until it ends")
    p.add_argument("run_id")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_watch)
    for name, fn, helptext in (("get", cmd_get, "a run as JSON"), ("cancel", cmd_cancel, "cancel a run"),
                               ("artifacts", cmd_artifacts, "list a run's artifacts")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run_id")
        p.set_defaults(func=fn)
    p = sub.add_parser("list", help="list runs")
    p.add_argument("--state", default="")
    p.add_argument("--dataset", default="")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("models", help="list trained models")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("fetch", help="download the model and report of a run")
    p.add_argument("run_id")
    p.add_argument("--out", default="", help="folder (default ./<run_id>)")
    p.add_argument("--name", action="append", default=[], help=f"artifact to fetch (default {list(FETCH)})")
    p.set_defaults(func=cmd_fetch)
    p = sub.add_parser("segment", help="segment a volume file with a run's model")
    p.add_argument("--model", required=True, help="model id (= the run id)")
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(func=cmd_segment)
    p = sub.add_parser("health", help="the gateway's and the stage services' health checks, with reasons")
    p.add_argument("--gateway-only", action="store_true", help="do not ask the stage services")
    p.set_defaults(func=cmd_health)
    _add_pacs(sub, conn)
    return ap


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    a = build_parser().parse_args(argv)
    for k, v in _defaults().items():
        if not hasattr(a, k):
            setattr(a, k, v)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    c = None
    try:
        with _connect(a) as c:
            return int(a.func(c, a))
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        hint = c.explain(e) if c is not None else ""
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``cfrseg`` command line. Thin ``*_cmd`` functions parse arguments and call the typed core functions.

Every command prints ``error: <message>`` and exits with status 2 on bad input (cfrseg.errors.CfrsegError).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from cfrseg.errors import CfrsegError

SSL_METHODS = ("none", "mt", "st", "uamt", "acmt", "magicnet")  # = cfrseg.ssl.methods.METHODS (tested)


def _add_data_args(p: argparse.ArgumentParser, labeled_required: bool = True) -> None:
    p.add_argument("--data", required=True, help="dataset folder: LA layout (train.list + <id>/mri_norm2.h5), "
                   "nnU-Net/MSD (dataset.json, imagesTr, labelsTr) or a folder with images/ and labels/")
    p.add_argument("--labeled", type=int, required=labeled_required, default=None,
                   help="number of labeled cases (the first L of the list; subjects with --subject-pattern)")
    p.add_argument("--holdout", type=int, default=0,
                   help="hold out the last N cases of the list as test cases (never used in training)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N cases of the list")
    p.add_argument("--subject-pattern", default=None, metavar="REGEX",
                   help="group cases by patient: the first group (or whole match) of REGEX in the case id names "
                        "the subject, and --labeled / --holdout count subjects, so that no patient is split "
                        "between labeled, unlabeled and test (ACDC: 'patient\\d+' puts both frames together)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="number of classes, background included (required for images/ + labels/ folders; "
                        "LA: 2; nnU-Net: from dataset.json 'labels')")
    add_class_arguments(p)


def add_class_arguments(p: argparse.ArgumentParser) -> None:
    """--class-names and --modality, as `cfrseg run` and `cfrseg client upload-dataset` take them."""
    p.add_argument("--class-names", default=None,
                   help="comma-separated class names (background first, or foreground only); default: "
                        "dataset.json 'labels', else background, class_1, ...")
    p.add_argument("--modality", type=str.upper, choices=("MR", "CT"), default=None,
                   help="intensity normalisation: CT (clip to foreground HU percentiles + dataset z-score) or MR "
                        "(per-volume z-score); default: dataset.json channel name, else MR")


def class_names_arg(value: str | None) -> list[str] | None:
    """The list behind --class-names a,b,... (None when not given)."""
    return [n.strip() for n in value.split(",")] if value else None


def _profile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="lite", help="tiny | lite | paper | path to a profile .json (default lite)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override one profile value, e.g. --set retrain.iterations=100 (JSON value)")


def _manifest(args: argparse.Namespace):
    from cfrseg.data.datasets import build_manifest

    names = class_names_arg(args.class_names)
    return build_manifest(args.data, labeled=args.labeled, holdout=args.holdout, limit=args.limit,
                          subject=getattr(args, "subject_pattern", None),
                          num_classes=args.num_classes, class_names=names, modality=args.modality)


def _profile(args: argparse.Namespace) -> dict:
    from cfrseg.config import apply_overrides, load_profile

    return apply_overrides(load_profile(args.profile), args.set)


def retrain_cmd(args: argparse.Namespace) -> int:
    from cfrseg.cli_progress import Bars
    from cfrseg.stages.retrain import RetrainConfig, run_retrain
    from cfrseg.store import LocalStore

    prof = _profile(args)
    sec = dict(prof.get("retrain", {}), ssl=args.ssl, resume=args.resume)
    if args.pl_weight is not None:
        sec["pl_weight"] = args.pl_weight
    if args.iterations is not None:
        sec["iterations"] = args.iterations
    cfg = RetrainConfig.from_dict(sec)
    data = _manifest(args)
    if args.pseudo_labels:
        data = _attach_pseudo_labels(data, Path(args.pseudo_labels))
    bars = Bars()
    res = run_retrain(cfg, data, LocalStore(args.out), progress=bars)
    bars.close()
    print(f"model written to {Path(args.out) / 'model.pt'} ({res.iterations} iterations, {res.wall_s:.0f} s)")
    return 0


def _attach_pseudo_labels(data, folder: Path):
    from cfrseg.errors import InputError

    if not folder.is_dir():
        raise InputError(f"--pseudo-labels {folder} is not a folder")
    found = {}
    for c in data.unlabeled:
        for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
            f = folder / f"{c.case_id}{ext}"
            if f.is_file():
                found[c.case_id] = str(f)
                break
    missing = [c.case_id for c in data.unlabeled if c.case_id not in found]
    if missing:
        raise InputError(f"--pseudo-labels {folder}: no label file for unlabeled case(s) {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} (expected <case_id>.nii.gz)")
    return data.with_pseudo_labels(found)


def segment_cmd(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cfrseg.data.io import read_volume, write_volume
    from cfrseg.errors import InputError
    from cfrseg.stages.infer import InferConfig, load_model, segment_volume

    model, meta = load_model(args.model, device=args.device)
    icfg = InferConfig.from_dict(dict(meta.get("infer", {}), device=args.device))
    src, dst = Path(args.input), Path(args.output)
    if not src.exists():
        raise InputError(f"--input {src} does not exist")
    if src.is_dir() and not _is_dicom_dir(src):
        files = sorted(p for p in src.iterdir() if p.is_file() and _is_volume_file(p))
        if not files:
            raise InputError(f"--input {src}: no volume files (.nii.gz, .nii, .nrrd, .mha, .h5) found")
        dst.mkdir(parents=True, exist_ok=True)
        pairs = [(f, dst / (_stem(f) + ".nii.gz")) for f in files]
    else:
        pairs = [(src, dst)]
    for f, out in tqdm(pairs, desc="segment", unit="case", disable=len(pairs) == 1):
        vol = _read_any(f, read_volume)
        lab = segment_volume(model, vol, icfg, meta.get("preprocess", {}))
        write_volume(lab, out)
        print(f"{f} -> {out}")
    return 0


def _is_volume_file(p: Path) -> bool:
    n = p.name.lower()
    return n.endswith((".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".h5"))


def _is_dicom_dir(p: Path) -> bool:
    return any(f.suffix.lower() == ".dcm" for f in p.iterdir()) if p.is_dir() else False


def _stem(p: Path) -> str:
    n = p.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".h5"):
        if n.lower().endswith(ext):
            return n[: -len(ext)]
    return p.stem


def _read_any(path: Path, read_volume: Callable):
    if path.suffix == ".h5":
        from cfrseg.data.io import read_la_h5

        return read_la_h5(path, "image")
    return read_volume(path)


def evaluate_cmd(args: argparse.Namespace) -> int:
    from cfrseg.stages.evaluate import evaluate_folders

    summary = evaluate_folders(args.pred, args.gt, num_classes=args.num_classes, json_path=args.json)
    print(summary["table"])
    if args.json:
        print(f"wrote {args.json}")
    return 0


def run_cmd(args: argparse.Namespace) -> int:
    from cfrseg.cli_progress import Bars
    from cfrseg.stages.pipeline import PipelineConfig, run_pipeline
    from cfrseg.store import LocalStore

    prof = _profile(args)
    cfg = PipelineConfig.from_profile(prof, ssl=args.ssl, resume=args.resume, sam_checkpoint=args.sam_checkpoint,
                                      profile=args.profile)
    data = _manifest(args)
    test = None
    if args.test_data:
        from dataclasses import replace

        from cfrseg.data.datasets import build_manifest

        test = build_manifest(args.test_data, test=True, num_classes=data.num_classes)
        test = replace(test, class_names=data.class_names, modality=data.modality)
    bars = Bars()
    res = run_pipeline(cfg, data, LocalStore(args.out), test_data=test, progress=bars)
    bars.close()
    print(res.summary)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def finetune_cmd(args: argparse.Namespace) -> int:
    from cfrseg.cli_progress import Bars
    from cfrseg.stages.finetune import FinetuneConfig, run_finetune
    from cfrseg.store import LocalStore

    prof = _profile(args)
    sec = dict(prof.get("finetune", {}), resume=args.resume)
    if args.sam_checkpoint:
        sec["checkpoint"] = args.sam_checkpoint
    cfg = FinetuneConfig.from_dict(sec)
    bars = Bars()
    run_finetune(cfg, _manifest(args), LocalStore(args.out), progress=bars)
    bars.close()
    print(f"fine-tuned SAM written to {Path(args.out) / 'finetune.pt'}")
    return 0


def pseudolabel_cmd(args: argparse.Namespace) -> int:
    from cfrseg.cli_progress import Bars
    from cfrseg.stages.pseudolabel import PseudolabelConfig, run_pseudolabel
    from cfrseg.store import LocalStore

    prof = _profile(args)
    cfg = PseudolabelConfig.from_dict(dict(prof.get("pseudolabel", {}), resume=args.resume))
    bars = Bars()
    run_pseudolabel(cfg, _manifest(args), LocalStore(args.out), finetuned=LocalStore(args.finetuned),
                    progress=bars)
    bars.close()
    print(f"pseudo-labels written to {Path(args.out) / 'labels'}")
    return 0


def plan_cmd(args: argparse.Namespace) -> int:
    from cfrseg.data.plan import plan_for
    from cfrseg.store import LocalStore, get_json

    data = _manifest(args)
    store = LocalStore(args.out) if args.out else None
    plan = plan_for(data, store)
    print(f"dataset {data.name!r}: {len(data.labeled)} labeled, {len(data.unlabeled)} unlabeled, "
          f"{len(data.test)} test; classes {', '.join(data.names)}")
    print(f"plan: {plan.describe()}")
    print(f"median shape at the target spacing: {plan.median_shape}; working axes (canonical): "
          f"{plan.working_order}")
    if store is not None:
        fp = get_json(store, "fingerprint.json")
        orients = sorted({c["orientation"] for c in fp["cases"]})
        print(f"orientations found: {orients}; foreground intensities: {fp['foreground']}")
        print(f"wrote {store.path('plan.json')} and {store.path('fingerprint.json')}")
    return 0


def data_fetch_cmd(args: argparse.Namespace) -> int:
    from cfrseg.data.datasets import fetch_la2018

    if args.dataset != "la2018":
        from cfrseg.errors import InputError

        raise InputError(f"unknown dataset {args.dataset!r}; known: la2018")
    kw = {"base_url": args.base_url} if args.base_url else {}
    fetch_la2018(args.dest, **kw)
    return 0


def weights_cmd(args: argparse.Namespace) -> int:
    from cfrseg.sam.weights import run_args

    return run_args(args)


#: ``cfrseg stack ...`` / ``cfrseg client ...``: their own parsers (services layer), reached before this one parses
SERVICE_COMMANDS = {"stack": "services.stack", "client": "services.client"}


def _run_services(module: str, argv: list[str]) -> int:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise CfrsegError(f"the service layer is not installed ({e}); run scripts/setup.sh") from None
    return int(mod.main(argv) or 0)


def _services_cmd(module: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return _run_services(module, args.rest)

    return run


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cfrseg", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the whole CFR pipeline: fine-tune SAM, pseudo-label, re-train, evaluate")
    _profile_arg(p)
    _add_data_args(p)
    p.add_argument("--ssl", choices=SSL_METHODS, default="mt")
    p.add_argument("--out", required=True)
    p.add_argument("--test-data", help="a dataset folder whose cases are all evaluated (LA: its test.list); refused "
                   "if any case shares an id or an image with the training data")
    p.add_argument("--sam-checkpoint", help="SAM checkpoint file (vit_b/l/h); lite uses the cached LiteMedSAM")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.set_defaults(func=run_cmd)

    p = sub.add_parser("retrain", help="semi-supervised re-training of the 3D network")
    _profile_arg(p)
    _add_data_args(p)
    p.add_argument("--ssl", choices=SSL_METHODS, default="mt")
    p.add_argument("--pseudo-labels", help="folder of SAM pseudo-labels <case_id>.nii.gz for the unlabeled cases")
    p.add_argument("--pl-weight", type=float, default=None, help="weight lambda of the pseudo-label loss")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=retrain_cmd)

    p = sub.add_parser("finetune", help="fine-tune SAM (LoRA) on mosaics of the labeled volumes")
    _profile_arg(p)
    _add_data_args(p)
    p.add_argument("--sam-checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=finetune_cmd)

    p = sub.add_parser("pseudolabel", help="label the unlabeled volumes with a fine-tuned SAM")
    _profile_arg(p)
    _add_data_args(p)
    p.add_argument("--finetuned", required=True, help="output folder of `cfrseg finetune`")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue in --out (finished cases are kept)")
    p.set_defaults(func=pseudolabel_cmd)

    p = sub.add_parser("plan", help="fingerprint a dataset and print its plan (orientation, spacing, intensities)")
    _add_data_args(p, labeled_required=False)
    p.add_argument("--out", default=None, help="also write fingerprint.json and plan.json to this folder")
    p.set_defaults(func=plan_cmd)

    p = sub.add_parser("segment", help="segment a volume (or a folder of volumes) with a trained model")
    p.add_argument("--model", required=True, help="folder with model.pt (output of retrain/run)")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=segment_cmd)

    p = sub.add_parser("evaluate", help="Dice/Jaccard/ASD/HD95 of predictions against ground truth")
    p.add_argument("--pred", required=True, help="folder of <case_id>.nii.gz predictions")
    p.add_argument("--gt", required=True, help="folder of label files, or an LA-layout folder")
    p.add_argument("--num-classes", type=int, default=None, help="including background (default: from data)")
    p.add_argument("--json", help="write per-case and mean/std metrics here")
    p.set_defaults(func=evaluate_cmd)

    p = sub.add_parser("data", help="datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("fetch", help="download a public dataset (la2018: the UA-MT preprocessed LA files)")
    q.add_argument("dataset")
    q.add_argument("--dest", required=True)
    q.add_argument("--base-url", default=None)
    q.set_defaults(func=data_fetch_cmd)

    p = sub.add_parser("weights", help="model weights: fetch lite_medsam [--dest ./weights], add sam_vit_b "
                                       "(--file), check (sha256)")
    from cfrseg.sam.weights import add_arguments as _weights_args

    _weights_args(p)
    p.set_defaults(func=weights_cmd)

    for name, module, helptext in (
        ("stack", "services.stack", "start/stop the local service stack (redis, S3, gRPC services, worker)"),
        ("client", "services.client", "gRPC client of the gateway (upload, submit, watch, fetch, segment)"),
    ):
        p = sub.add_parser(name, help=helptext, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_services_cmd(module))
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SERVICE_COMMANDS:  # every option, --help included, goes to their own parser
            return _run_services(SERVICE_COMMANDS[argv[0]], argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except CfrsegError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run again with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

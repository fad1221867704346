"""cfrseg.data.datasets / cfrseg.data.la: manifest builders, layout detection, the validating loader, the LA downloader."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from cfrseg.data.datasets import (
    build_manifest,
    detect_layout,
    fetch_la2018,
    load_case,
    load_pseudo_label,
    manifest_from_folders,
    manifest_from_la,
    manifest_from_la_test,
    manifest_from_nnunet,
)
from cfrseg.data.io import write_volume
from cfrseg.data.manifest import Case, Manifest
from cfrseg.data.volume import Volume
from cfrseg.errors import InputError

SHAPE = (8, 7, 6)
SP = (0.8, 0.8, 2.0)
OR = (1.0, -2.0, 3.0)


def img(seed: int = 0, shape=SHAPE) -> Volume:
    return Volume(np.random.default_rng(seed).normal(size=shape).astype(np.float32), SP, OR)


def lab(value: int = 1, shape=SHAPE) -> Volume:
    a = np.zeros(shape, np.uint8)
    a[2:5, 2:5, 1:4] = value
    return Volume(a, SP, OR)


def folder_tree(root: Path, n: int = 4, n_labels: int = 3, suffix: str = "_0000") -> Path:
    """images/case{i}_0000.nii.gz (n) and labels/case{i}.nii.gz for the first n_labels cases."""
    for i in range(n):
        write_volume(img(i), root / "images" / f"case{i}{suffix}.nii.gz")
        if i < n_labels:
            write_volume(lab(1 + i % 2), root / "labels" / f"case{i}.nii.gz", label=True)
    return root


def la_tree(root: Path, ids: list[str], shape=(10, 9, 8), label_value: int = 1) -> Path:
    for k, cid in enumerate(ids):
        (root / cid).mkdir(parents=True)
        with h5py.File(root / cid / "mri_norm2.h5", "w") as f:
            f["image"] = np.random.default_rng(k).normal(size=shape).astype(np.float32)
            lb = np.zeros(shape, np.uint8)
            lb[3:6, 3:6, 2:5] = label_value
            f["label"] = lb
    return root


# ------------------------------------------------------------------------------------------- folders


def test_manifest_from_folders(tmp_path: Path) -> None:
    root = folder_tree(tmp_path)
    # num_classes is explicit: never guessed from the labeled cases' values
    with pytest.raises(InputError, match=r"number of classes is not known.*--num-classes"):
        manifest_from_folders(root / "images", root / "labels")
    m = manifest_from_folders(root / "images", root / "labels", num_classes=3)
    assert [c.case_id for c in m.cases] == ["case0", "case1", "case2", "case3"]
    assert [c.role for c in m.cases] == ["labeled", "labeled", "labeled", "unlabeled"]
    assert m.cases[3].label is None and m.num_classes == 3
    assert m.names == ("background", "class_1", "class_2") and m.modality == "MR"
    m1 = manifest_from_folders(root / "images", root / "labels", labeled=1, num_classes=5)
    assert [c.role for c in m1.cases] == ["labeled", "unlabeled", "unlabeled", "unlabeled"]
    assert m1.cases[1].label is not None and m1.num_classes == 5
    m2 = manifest_from_folders(root / "images", root / "labels", labeled=["case2"], holdout=1, num_classes=3)
    assert [c.role for c in m2.cases] == ["unlabeled", "unlabeled", "labeled", "test"]
    only_images = manifest_from_folders(root / "images", num_classes=2)
    assert {c.role for c in only_images.cases} == {"unlabeled"}
    assert Manifest.from_dict(json.loads(m.to_json())) == m
    image, label = load_case(m.cases[0], m)
    assert image.array.dtype == np.float32 and label is not None and label.array.dtype == np.uint8
    assert image.shape == SHAPE and image.spacing == pytest.approx(SP)


def test_folders_bad_input(tmp_path: Path) -> None:
    root = folder_tree(tmp_path / "a", n=2, n_labels=2)
    with pytest.raises(InputError, match=r"asked for 3 labeled cases but only 2"):
        manifest_from_folders(root / "images", root / "labels", labeled=3, num_classes=3)
    with pytest.raises(InputError, match=r"labeled case id\(s\) \['nope'\] not found"):
        manifest_from_folders(root / "images", root / "labels", labeled=["nope"], num_classes=3)
    # duplicate ids: the same case in two formats
    write_volume(img(), root / "images" / "case0.nrrd")
    with pytest.raises(InputError, match=r"duplicate case ids.*case0"):
        manifest_from_folders(root / "images", root / "labels", num_classes=3)
    # a label without an image
    b = folder_tree(tmp_path / "b", n=1, n_labels=1)
    write_volume(lab(), b / "labels" / "ghost.nii.gz", label=True)
    with pytest.raises(InputError, match=r"label\(s\) without a matching image.*ghost"):
        manifest_from_folders(b / "images", b / "labels", num_classes=2)
    # multi-channel
    c = folder_tree(tmp_path / "c", n=1, n_labels=1)
    write_volume(img(), c / "images" / "case0_0001.nii.gz")
    with pytest.raises(InputError, match=r"several channels"):
        manifest_from_folders(c / "images", c / "labels", num_classes=2)
    # ids that merely end in 4 digits are not channels; a label may carry its image's _0000 name
    e = tmp_path / "e"
    write_volume(img(), e / "images" / "case_0001.nii.gz")
    write_volume(img(), e / "images" / "case_0002_0000.nii.gz")
    write_volume(lab(), e / "labels" / "case_0001.nii.gz", label=True)
    write_volume(lab(), e / "labels" / "case_0002_0000.nii.gz", label=True)
    me = manifest_from_folders(e / "images", e / "labels", num_classes=2)
    assert [(c.case_id, c.role) for c in me.cases] == [("case_0001", "labeled"), ("case_0002", "labeled")]
    # empty label set and missing folders
    d = folder_tree(tmp_path / "d", n=1, n_labels=0)
    (d / "labels").mkdir()
    with pytest.raises(InputError, match=r"no label volumes found \(empty label set\)"):
        manifest_from_folders(d / "images", d / "labels", num_classes=2)
    with pytest.raises(InputError, match=r"images folder not found"):
        manifest_from_folders(tmp_path / "none")


def test_subject_pattern_keeps_patients_whole(tmp_path: Path) -> None:
    # 4 patients x 2 frames; patient p3's second frame has no label
    root = tmp_path / "frames"
    for p in range(4):
        for f in (1, 2):
            cid = f"pat{p}_frame{f}"
            write_volume(img(p * 2 + f), root / "images" / f"{cid}.nii.gz")
            if (p, f) != (2, 2):
                write_volume(lab(), root / "labels" / f"{cid}.nii.gz", label=True)
    m = build_manifest(root, labeled=2, holdout=1, num_classes=2, subject=r"(pat\d+)_")
    roles = {c.case_id: c.role for c in m.cases}
    assert roles == {"pat0_frame1": "labeled", "pat0_frame2": "labeled", "pat1_frame1": "labeled",
                     "pat1_frame2": "labeled", "pat2_frame1": "unlabeled", "pat2_frame2": "unlabeled",
                     "pat3_frame1": "test", "pat3_frame2": "test"}
    # without the pattern the same numbers count frames: patients are split
    m0 = build_manifest(root, labeled=2, holdout=1, num_classes=2)
    assert [c.role for c in m0.cases][:3] == ["labeled", "labeled", "unlabeled"] and m0.cases[-2].role != "test"
    # the whole match names the subject when the pattern has no group
    assert {c.role for c in build_manifest(root, labeled=1, holdout=2, num_classes=2, subject=r"pat\d+").cases
            if c.case_id.startswith("pat1")} == {"unlabeled"}
    with pytest.raises(InputError, match=r"asked for 4 labeled subjects but only 3 \(non-test\) subjects"):
        build_manifest(root, labeled=4, holdout=1, num_classes=2, subject=r"pat\d+")
    with pytest.raises(InputError, match=r"holdout must be in \[0, 3\] for 4 subjects"):
        build_manifest(root, labeled=1, holdout=4, num_classes=2, subject=r"pat\d+")
    with pytest.raises(InputError, match=r"'pat0_frame1' does not match the subject pattern"):
        build_manifest(root, labeled=1, num_classes=2, subject=r"patient\d+")
    with pytest.raises(InputError, match=r"not a valid regular expression"):
        build_manifest(root, labeled=1, num_classes=2, subject=r"pat(")
    la = la_tree(tmp_path / "la", ["a", "b"])
    (la / "train.list").write_text("a\nb\n")
    with pytest.raises(InputError, match=r"subject pattern applies to nnU-Net and folder datasets only"):
        build_manifest(la, labeled=1, subject=r"\w")


# ------------------------------------------------------------------------------------------- nnU-Net / MSD


def nnunet_tree(root: Path, meta: dict | str | None = None) -> Path:
    for i in range(3):
        write_volume(img(i), root / "imagesTr" / f"la_{i:03d}_0000.nii.gz")
        write_volume(lab(), root / "labelsTr" / f"la_{i:03d}.nii.gz", label=True)
    write_volume(img(9), root / "imagesTs" / "la_100_0000.nii.gz")
    if meta is None:
        meta = {"name": "Dataset001_Toy", "channel_names": {"0": "MRI"},
                "labels": {"background": 0, "atrium": 1, "wall": 2}, "numTraining": 3, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return root


def test_manifest_from_nnunet_v2(tmp_path: Path) -> None:
    m = manifest_from_nnunet(nnunet_tree(tmp_path))
    assert m.name == "Dataset001_Toy" and m.num_classes == 3
    assert m.names == ("background", "atrium", "wall") and m.modality == "MR"
    assert [(c.case_id, c.role) for c in m.cases] == [
        ("la_000", "labeled"), ("la_001", "labeled"), ("la_002", "labeled"), ("la_100", "test")]
    m1 = manifest_from_nnunet(tmp_path, labeled=1)
    assert [c.role for c in m1.cases] == ["labeled", "unlabeled", "unlabeled", "test"]
    assert detect_layout(tmp_path) == "nnunet"


def test_manifest_from_msd(tmp_path: Path) -> None:
    root = tmp_path / "Task02_Heart"
    for i in range(2):
        write_volume(img(i), root / "imagesTr" / f"la_{i:03d}.nii.gz")
        write_volume(lab(), root / "labelsTr" / f"la_{i:03d}.nii.gz", label=True)
    write_volume(img(5), root / "imagesTs" / "la_050.nii.gz")
    (root / "imagesTr" / "._la_000.nii.gz").write_bytes(b"macOS junk")  # ignored: hidden
    meta = {"name": "LeftAtrium", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left atrium"},
            "training": [{"image": f"./imagesTr/la_{i:03d}.nii.gz", "label": f"./labelsTr/la_{i:03d}.nii.gz"}
                         for i in range(2)],
            "test": ["./imagesTs/la_050.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(meta))
    m = build_manifest(root)
    assert m.num_classes == 2 and m.name == "LeftAtrium" and m.names == ("background", "left atrium")
    assert [(c.case_id, c.role) for c in m.cases] == [("la_000", "labeled"), ("la_001", "labeled"),
                                                      ("la_050", "test")]
    assert {c.role for c in build_manifest(root, test=True).cases} == {"test"}
    meta["training"].append({"image": "./imagesTr/missing.nii.gz", "label": "./labelsTr/missing.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"training\[2\]: listed file './imagesTr/missing.nii.gz' not found"):
        manifest_from_nnunet(root)


@pytest.mark.parametrize("meta, message", [
    ('{"labels": {"background": 0', r"dataset\.json: malformed JSON"),
    ('[1, 2]', r"expected a JSON object"),
    ({"channel_names": {"0": "CT"}}, r"missing 'labels'"),
    ({"channel_names": {"0": "CT"}, "labels": {"a": 1}}, r"must contain background 0"),
    ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": "one"}}, r"values must be integers"),
    ({"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "x": 1}}, r"single-channel"),
    ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumor": [1, 2]}}, r"region-based"),
    # {0, 7} is not an 8-class problem: labels must be consecutive 0..K-1
    ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 7}}, r"consecutive.*\[1, 2, 3, 4, 5, 6\]"),
])
def test_malformed_dataset_json(tmp_path: Path, meta, message: str) -> None:
    with pytest.raises(InputError, match=message):
        manifest_from_nnunet(nnunet_tree(tmp_path, meta))


# ------------------------------------------------------------------------------------------- LA


def test_manifest_from_la_synthetic(tmp_path: Path) -> None:
    ids = [f"ID{i:02d}" for i in range(6)]
    root = la_tree(tmp_path, ids)
    (root / "train.list").write_text("\n".join(ids) + "\n")
    m = manifest_from_la(root, labeled=2, holdout=1)
    assert [c.role for c in m.cases] == ["labeled", "labeled", "unlabeled", "unlabeled", "unlabeled", "test"]
    assert all(c.label == c.image for c in m.cases) and m.spacing == (0.625, 0.625, 0.625)
    assert [c.case_id for c in manifest_from_la(root, 1, limit=3).cases] == ids[:3]
    image, label = load_case(m.cases[4], m)  # unlabeled cases keep their label for evaluation
    assert label is not None and label.array.max() == 1 and image.spacing == (0.625, 0.625, 0.625)
    assert detect_layout(root) == "la"
    # the LA test reader never falls back to train.list
    with pytest.raises(InputError, match=r"no test\.list.*never used as a test set"):
        build_manifest(root, test=True)
    with pytest.raises(InputError, match=r"train\.list holds the training cases"):
        manifest_from_la_test(root, "train.list")
    (root / "test.list").write_text("ID05\n")
    assert [c.case_id for c in manifest_from_la_test(root).cases] == ["ID05"]
    t = build_manifest(root, test=True)
    assert [c.case_id for c in t.cases] == ["ID05"] and {c.role for c in t.cases} == {"test"}
    with pytest.raises(InputError, match=r"labeled must be in \[0, 5\]"):
        manifest_from_la(root, labeled=6, holdout=1)
    (root / "bad.list").write_text("ID00\nID01\nID00\n")
    with pytest.raises(InputError, match=r"bad\.list: duplicate case ids \['ID00'\]"):
        manifest_from_la(root, 1, list_file="bad.list")
    (root / "gone.list").write_text("ID00\nNOPE\n")
    with pytest.raises(InputError, match=r"gone\.list: 1 listed case\(s\) have no mri_norm2\.h5.*NOPE"):
        manifest_from_la(root, 1, list_file="gone.list")


@pytest.mark.la
def test_manifest_from_la_real(la_dir: Path, la_ids: list[str]) -> None:
    m = build_manifest(la_dir, labeled=16)
    assert m.num_classes == 2 and len(m.cases) == 80
    assert [c.case_id for c in m.labeled] == la_ids[:16]
    assert m.labeled[0].case_id == "06SR5RBREL16DQ6M8LWS" and len(m.unlabeled) == 64
    m1 = manifest_from_la(la_dir, labeled=1, holdout=20)
    assert len(m1.labeled) == 1 and len(m1.unlabeled) == 59 and len(m1.test) == 20
    image, label = load_case(m.labeled[0], m)
    assert image.shape == label.shape and image.shape[2] == 88 and image.spacing == (0.625,) * 3
    assert set(np.unique(label.array).tolist()) == {0, 1}


# ------------------------------------------------------------------------------------------- load_case


def one_case(tmp_path: Path, label: Volume | None, image: Volume | None = None, role: str = "labeled",
             num_classes: int = 2, pseudo: Volume | None = None) -> tuple[Case, Manifest]:
    ip = write_volume(image or img(), tmp_path / "c_img.nii.gz")
    lp = write_volume(label, tmp_path / "c_lab.nii.gz") if label is not None else None
    pp = write_volume(pseudo, tmp_path / "c_pseudo.nii.gz") if pseudo is not None else None
    case = Case("c", str(ip), str(lp) if lp else None, role, str(pp) if pp else None)  # type: ignore[arg-type]
    return case, Manifest("t", num_classes, (case,))


@pytest.mark.parametrize("label, message", [
    (lab(shape=(8, 7, 5)), r"label geometry does not match the image \(shape differ\).*\(8, 7, 6\).*\(8, 7, 5\)"),
    (Volume(lab().array, (0.8, 0.8, 2.5), OR), r"\(spacing differ\).*spacing \(0\.8, 0\.8, 2\.0\).*2\.5"),
    (Volume(lab().array, SP, (1.0, -2.0, 13.0)), r"\(origin differ\).*origin \(1\.0, -2\.0, 13\.0\)"),
    (Volume(lab().array, SP, OR, (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)), r"\(direction differ\)"),
    (lab(value=3), r"label values \[3\] are outside \[0, 2\)"),
    (lab().with_array(lab().array.astype(np.int16) - 1), r"label values \[-1\] are outside \[0, 2\)"),
    (lab().with_array(lab().array * np.float32(0.5)), r"label has non-integer values \[0\.5\]"),
    (lab(value=0), r"label has no foreground \(every voxel is 0\)"),
])
def test_load_case_rejects_bad_labels(tmp_path: Path, label: Volume, message: str) -> None:
    case, m = one_case(tmp_path, label)
    with pytest.raises(InputError, match=message) as e:
        load_case(case, m)
    assert "case 'c'" in str(e.value) and "c_lab.nii.gz" in str(e.value)


def test_load_case_accepts(tmp_path: Path) -> None:
    # float labels with integral values are fine; empty labels are fine outside the labeled role
    case, m = one_case(tmp_path, lab().with_array(lab().array.astype(np.float32)))
    assert load_case(case, m)[1].array.dtype == np.uint8
    case, m = one_case(tmp_path, lab(value=0), role="test")
    assert load_case(case, m)[1].array.max() == 0
    case, m = one_case(tmp_path, None, role="unlabeled", pseudo=lab())
    image, label = load_case(case, m)
    assert label is None and load_pseudo_label(case, m, image).array.sum() == lab().array.sum()
    m_sp = Manifest("t", 2, (case,), spacing=(1.0, 1.0, 1.0))
    assert load_case(case, m_sp)[0].spacing == (1.0, 1.0, 1.0)


def test_load_case_bad_pseudo_label_and_image(tmp_path: Path) -> None:
    case, m = one_case(tmp_path, None, role="unlabeled", pseudo=lab(value=4))
    with pytest.raises(InputError, match=r"c_pseudo\.nii\.gz.*pseudo-label values \[4\]"):
        load_case(case, m)
    bad = img()
    bad.array[0, 0, 0] = np.nan
    case, m = one_case(tmp_path, lab())
    case = Case("c", str(write_volume(bad, tmp_path / "nan.nrrd")), case.label)  # (ITK's NIfTI reader zeroes NaN)
    with pytest.raises(InputError, match=r"case 'c'.*image has NaN or infinite values"):
        load_case(case, m)
    case = Case("x", str(tmp_path / "missing.nii.gz"))  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"missing\.nii\.gz: file not found"):
        load_case(case, Manifest("t", 2, (Case("x", case.image, None, "unlabeled"),)))


def test_duplicate_ids_in_manifest() -> None:
    with pytest.raises(InputError, match=r"duplicate case ids.*\['a'\]"):
        Manifest("t", 2, (Case("a", "x", None, "unlabeled"), Case("a", "y", None, "unlabeled")))


# ------------------------------------------------------------------------------------------- layouts


def test_detect_layout(tmp_path: Path) -> None:
    folder_tree(tmp_path / "pair", n=2, n_labels=1)
    assert detect_layout(tmp_path / "pair") == "folders"
    m = build_manifest(tmp_path / "pair", num_classes=3)
    assert m.name == "pair" and m.num_classes == 3 and [c.role for c in m.cases] == ["labeled", "unlabeled"]
    assert detect_layout(tmp_path / "pair" / "images") == "folders"
    m.save(tmp_path / "m.json")
    assert detect_layout(tmp_path / "m.json") == "manifest" and build_manifest(tmp_path / "m.json") == m
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hi")
    with pytest.raises(InputError, match=r"junk: unknown data layout.*found \['readme\.txt'\]"):
        detect_layout(tmp_path / "junk")
    with pytest.raises(InputError, match=r"data path not found"):
        build_manifest(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------- fetch


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def la_server(tmp_path: Path):
    """A loopback HTTP server over a fake UA-MT data tree: train.list (3 ids), test.list (1 id)."""
    srv_root = tmp_path / "srv"
    ids = ["AAA", "BBB", "CCC", "DDD"]
    la_tree(srv_root / "2018LA_Seg_Training Set", ids)
    (srv_root / "train.list").write_text("AAA\nBBB\nCCC\n")
    (srv_root / "test.list").write_text("DDD\n")
    _Handler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(srv_root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", srv_root
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_la2018(tmp_path: Path, la_server) -> None:
    url, srv_root = la_server
    dest = tmp_path / "dest"
    assert fetch_la2018(dest, base_url=url, progress=False, retries=0) == dest
    for cid in ["AAA", "BBB", "CCC", "DDD"]:
        assert (dest / cid / "mri_norm2.h5").read_bytes() == (
            srv_root / "2018LA_Seg_Training Set" / cid / "mri_norm2.h5").read_bytes()
    assert not list(dest.rglob(".*.part"))
    m = build_manifest(dest, labeled=1)
    assert [c.role for c in m.cases] == ["labeled", "unlabeled", "unlabeled"]
    assert [c.case_id for c in build_manifest(dest, test=True).cases] == ["DDD"]
    # resume: valid files are skipped, a corrupt one is fetched again
    (dest / "BBB" / "mri_norm2.h5").write_bytes(b"half a file")
    _Handler.requests = []
    fetch_la2018(dest, base_url=url, progress=False, retries=0)
    h5_requests = [r for r in _Handler.requests if r.endswith(".h5")]
    assert h5_requests == ["/2018LA_Seg_Training%20Set/BBB/mri_norm2.h5"]
    assert load_case(m.case("BBB"), m)[1] is not None


def test_fetch_la2018_failures(tmp_path: Path, la_server) -> None:
    url, srv_root = la_server
    with h5py.File(srv_root / "2018LA_Seg_Training Set" / "BBB" / "mri_norm2.h5", "w") as f:
        f["image"] = np.zeros((4, 4, 4), np.float32)
        f["label"] = np.full((4, 4, 4), 2, np.uint8)
    with pytest.raises(InputError, match=r"BBB/mri_norm2\.h5 is invalid.*label values must be 0/1, found \[2\]"):
        fetch_la2018(tmp_path / "d1", base_url=url, progress=False, retries=0)
    assert not (tmp_path / "d1" / "BBB" / "mri_norm2.h5").exists()
    assert (tmp_path / "d1" / "AAA" / "mri_norm2.h5").is_file()  # what was fetched before stays
    (srv_root / "2018LA_Seg_Training Set" / "CCC" / "mri_norm2.h5").unlink()
    (srv_root / "train.list").write_text("AAA\nCCC\n")
    with pytest.raises(InputError, match=r"download failed: .*CCC/mri_norm2\.h5: HTTP 404"):
        fetch_la2018(tmp_path / "d2", base_url=url, progress=False, retries=0)
    with pytest.raises(InputError, match=r"download failed after 1 tries: http://127\.0\.0\.1:1/train\.list"):
        fetch_la2018(tmp_path / "d3", base_url="http://127.0.0.1:1", progress=False, retries=0, timeout=2)

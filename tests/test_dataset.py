import csv
import json
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from medaug.data import (
    DatasetError,
    load_info,
    load_split,
    load_split_masks,
    prepare_dataset,
    read_manifest,
    split_patients,
)
from medaug.io import write_dicom_series, write_nifti
from medaug.phantoms import make_demo_dataset
from medaug.preprocessing import IntensityWindow, PercentileNormalization
from pipelines import prepare

from .conftest import CONF_DIR, WINDOW, compose_cfg
from .test_pipelines import _cli

REPO = CONF_DIR.parent


def test_prepared_dataset_shapes_and_range(prepared):
    info = load_info(prepared)
    images, labels = load_split(prepared, "train")
    assert images.shape[1:] == (1, *info.image_shape)
    assert images.min() >= -1 and images.max() <= 1
    assert set(labels.tolist()) == {0, 1, 2}
    assert info.class_names == ["healthy", "multi_lesion", "single_lesion"]


def test_no_patient_in_two_splits(prepared):
    splits = {}
    for row in read_manifest(prepared):
        splits.setdefault(row["patient"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert {r["split"] for r in read_manifest(prepared)} == {"train", "val", "test"}


def test_manifest_holds_pseudonyms_only(prepared):
    text = (prepared / "manifest.csv").read_text() + (prepared / "dataset.json").read_text()
    assert "phantom" not in text  # the raw patient ids of the demo data


def test_split_is_seeded_and_stratified():
    patients = {f"p{i}": ("a" if i < 10 else "b") for i in range(20)}
    s1, s2 = split_patients(patients, (0.6, 0.2, 0.2), 7), split_patients(patients, (0.6, 0.2, 0.2), 7)
    assert s1 == s2
    for cls in "ab":
        got = [s1[p] for p, c in patients.items() if c == cls]
        assert got.count("train") == 6 and got.count("val") == 2 and got.count("test") == 2


def test_second_prepare_reuses_cache_without_reading_dicom(tmp_path, monkeypatch):
    labels = make_demo_dataset(tmp_path / "raw", spatial_dims=2, n_per_class=3, size=8)
    args = dict(window=WINDOW, spatial_size=[8, 8, -1], spatial_dims=2)
    prepare_dataset(labels, tmp_path / "p", **args)
    stamp = (tmp_path / "p" / "DONE").stat().st_mtime_ns

    def no_reading(*a, **k):
        raise AssertionError("DICOM read on a cached run")

    monkeypatch.setattr(pydicom, "dcmread", no_reading)
    prepare_dataset(labels, tmp_path / "p", **args)
    assert (tmp_path / "p" / "DONE").stat().st_mtime_ns == stamp


def test_2d_slices_from_3d_volumes(tmp_path):
    labels = make_demo_dataset(tmp_path / "raw", spatial_dims=3, n_per_class=2, size=8)
    info = prepare_dataset(
        labels, tmp_path / "p", WINDOW, spatial_size=[8, 8, -1], spatial_dims=2, slice_rule="central", slice_band=0.5
    )
    images, _ = load_split(tmp_path / "p", "train")
    assert info.image_shape == [8, 8]
    assert len(read_manifest(tmp_path / "p")) == 6 * 4  # 4 central slices of 8 per volume


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing_file", "not found"),
        ("empty_class", "no training images"),
    ],
)
def test_bad_labels_are_refused(tmp_path, problem, message):
    labels = make_demo_dataset(tmp_path / "raw", spatial_dims=2, n_per_class=3, size=8)
    rows = list(csv.DictReader(open(labels)))
    if problem == "missing_file":
        rows[0]["path"] = "images/nowhere.nii.gz"
    else:
        rows[0]["label"] = "lonely"
        rows[0]["split"] = "test"
    with open(labels, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(DatasetError, match=message):
        prepare_dataset(labels, tmp_path / "p", WINDOW, spatial_size=[8, 8, -1], spatial_dims=2)
    assert not (tmp_path / "p").exists()


def _nifti(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(path, np.asarray(array, np.float32), np.eye(4) if affine is None else affine)


def _declared(patient):
    return {"PatientID": patient, "PatientIdentityRemoved": "YES", "DeidentificationMethod": "test corpus"}


def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_folder_per_class_layout_mixes_nifti_and_dicom(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(["benign", "malignant"]):
        for p in range(3):
            volume = rng.normal(size=(6, 6, 2)) * 50 + 100 * c
            if p == 0:  # a patient folder with two DICOM series (files without extension)
                for s in range(2):
                    for f in write_dicom_series(
                        tmp_path / "tmp" / f"{name}{s}", volume, np.eye(4), _declared(f"{name}-p0")
                    ):
                        (tmp_path / "raw" / name / f"{name}-p0").mkdir(parents=True, exist_ok=True)
                        f.rename(tmp_path / "raw" / name / f"{name}-p0" / f"s{s}_{f.stem}")
            else:
                _nifti(tmp_path / "raw" / name / f"{name}-p{p}.nii.gz", volume)
    info = prepare_dataset(
        tmp_path / "raw",
        tmp_path / "p",
        WINDOW,
        spatial_size=[6, 6, -1],
        spatial_dims=2,
        slice_rule="all",
        split_fractions=(0.34, 0.33, 0.33),
    )
    rows = read_manifest(tmp_path / "p")
    assert info.class_names == ["benign", "malignant"]
    assert info.summary["patients"] == 6 and info.summary["series"] == 4 and info.summary["images"] == 8
    assert len(rows) == 8 * 2 and {r["label"] for r in rows if r["class_name"] == "malignant"} == {1}
    assert len({r["patient"] for r in rows}) == 6


@pytest.mark.parametrize("flavour", ["msd", "nnunet"])
def test_msd_and_nnunet_dataset_json_with_masks_and_nonempty_slices(tmp_path, flavour):
    root = tmp_path / "Task01"
    entries = []
    for i in range(6):
        image = np.full((4, 4, 6), 100.0 * i)
        mask = np.zeros((4, 4, 6))
        if i % 2:  # odd cases: a tumour (label 2) in slices 2-3 and a little edema (1) in slice 2
            mask[1:3, 1:3, 2:4] = 2
            mask[0, 0, 2] = 1
        else:  # even cases: edema only, in slice 1
            mask[0:2, 0:2, 1] = 1
        name = f"case_{i:03d}"
        image_rel = f"imagesTr/{name}_0000.nii.gz" if flavour == "nnunet" else f"imagesTr/{name}.nii.gz"
        _nifti(root / image_rel, image)
        _nifti(root / f"labelsTr/{name}.nii.gz", mask)
        entries.append({"image": f"./{image_rel}", "label": f"./labelsTr/{name}.nii.gz"})
    meta = (
        {"labels": {"0": "background", "1": "edema", "2": "tumour"}, "training": entries}
        if flavour == "msd"
        else {"labels": {"background": 0, "edema": 1, "tumour": 2}, "file_ending": ".nii.gz"}
    )
    (root / "dataset.json").write_text(json.dumps(meta))
    info = prepare_dataset(
        root / "dataset.json",
        tmp_path / "p",
        IntensityWindow(0, 500, "a.u."),
        spatial_size=[4, 4, -1],
        spatial_dims=2,
        slice_rule="nonempty",
        split_fractions=(0.34, 0.33, 0.33),
    )
    rows = read_manifest(tmp_path / "p")
    assert info.class_names == ["edema", "tumour"]  # each case's class: its mask's label with most voxels
    tumour = {r["patient"] for r in rows if r["class_name"] == "tumour"}
    assert tumour == {"patient_0002", "patient_0004", "patient_0006"}
    assert len(rows) == 3 * 2 + 3 * 1  # only the slices where the mask is non-empty
    if flavour == "msd":  # an image listed twice is refused
        (root / "dataset.json").write_text(
            json.dumps({**meta, "training": [*entries, {**entries[1], "image": entries[1]["image"][2:]}]})
        )
        with pytest.raises(
            ValueError,
            match=r"training\[6\]: image 'imagesTr/case_001.nii.gz' is listed twice "
            r"\(training\[1\] and training\[6\]\)",
        ):
            prepare_dataset(
                root / "dataset.json",
                tmp_path / "p2",
                IntensityWindow(0, 500, "a.u."),
                spatial_size=[4, 4, -1],
                spatial_dims=2,
                split_fractions=(0.34, 0.33, 0.33),
            )


def test_labels_row_may_name_a_series_uid_in_a_mixed_folder(tmp_path):
    rows = []
    (tmp_path / "raw" / "all").mkdir(parents=True)
    for i in range(6):  # six series with constant values 0, 10, ..., 50, all files in one folder
        files = write_dicom_series(
            tmp_path / "tmp" / str(i), np.full((4, 4, 2), 10.0 * i), np.eye(4), _declared(f"p{i}")
        )
        uid = pydicom.dcmread(files[0]).SeriesInstanceUID
        for f in files:
            f.rename(tmp_path / "raw" / "all" / f"{i}_{f.name}")
        rows.append({"series_uid": uid, "patient_id": f"p{i}", "label": "ab"[i % 2]})
    labels = _write_csv(tmp_path / "raw" / "labels.csv", rows)
    info = prepare_dataset(
        labels,
        tmp_path / "p",
        IntensityWindow(0, 50, "a.u."),
        spatial_size=[4, 4, -1],
        spatial_dims=2,
        slice_rule="all",
        split_fractions=(0.34, 0.33, 0.33),
    )
    assert info.summary["series"] == 6 and len(read_manifest(tmp_path / "p")) == 12
    images, classes = load_split(tmp_path / "p", "train")
    series_index = torch.round((images.mean(dim=(1, 2, 3)) + 1) / 2 * 5).long()  # back to i from 10 * i
    assert torch.equal(series_index % 2, classes)  # each series got the label of its own row
    assert "1.2." not in (tmp_path / "p" / "manifest.csv").read_text()  # UIDs never reach the manifest


def _bad_input(tmp_path, problem):
    """A small dataset with one problem; returns (labels, prepare kwargs)."""
    raw = tmp_path / "raw"
    rows = []
    for i in range(6):
        _nifti(raw / f"img{i}.nii.gz", np.random.default_rng(i).normal(size=(4, 4, 3)))
        rows.append({"path": f"img{i}.nii.gz", "patient_id": f"p{i}", "label": "ab"[i % 2]})
    kwargs = {}
    if problem == "missing_file":
        rows[0]["path"] = "nowhere.nii.gz"
    elif problem == "unknown_class":
        rows[1]["label"] = "c"
        kwargs["class_names"] = ["a", "b"]
    elif problem == "empty_class":
        kwargs["class_names"] = ["a", "b", "c"]
    elif problem == "nan":
        bad = np.zeros((4, 4, 3))
        bad[0, 0, 0] = np.nan
        _nifti(raw / "img0.nii.gz", bad)
    elif problem == "no_images":
        (raw / "empty" / "a").mkdir(parents=True)
        return raw / "empty", kwargs
    elif problem == "no_class_folders":
        return raw, kwargs
    elif problem == "slices_in_class_folder":  # data.labels names a folder of series folders
        for name in ("series_a", "series_b"):
            write_dicom_series(raw / "study" / name, np.zeros((4, 4, 3)), np.eye(4), _declared("p0"))
        return raw / "study", kwargs
    elif problem == "one_slice_3d":
        write_dicom_series(raw / "one", np.zeros((4, 4, 1)), np.eye(4), _declared("p0"))
        rows[0]["path"] = "one"
        kwargs["spatial_dims"] = 3
    elif problem in ("uneven", "mixed_orientation"):
        files = write_dicom_series(raw / "s", np.zeros((4, 4, 4)), np.eye(4), _declared("p0"))
        if problem == "uneven":
            files[1].unlink()
        else:
            ds = pydicom.dcmread(files[1])
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
            ds.save_as(files[1])
        rows[0]["path"] = "s"
    elif problem in ("non_dicom_strict", "two_series"):
        write_dicom_series(raw / "s", np.zeros((4, 4, 2)), np.eye(4), _declared("p0"))
        if problem == "two_series":
            write_dicom_series(raw / "s" / "other", np.zeros((4, 4, 2)), np.eye(4), _declared("p0"))
        else:
            (raw / "s" / "README").write_text("scanner export notes")
            kwargs["strict"] = True
        rows[0]["path"] = "s"
    elif problem == "split_conflict":
        rows[1]["patient_id"] = "p0"
        rows[0]["split"], rows[1]["split"] = "train", "test"
        for row in rows[2:]:
            row["split"] = ""
    elif problem == "duplicate_row":
        rows.append(dict(rows[2], path="./img2.nii.gz"))
    elif problem == "mixed_spacing":  # half 0.7x0.7x5 mm, half 1.5x1.5x3 mm
        for i in range(6):
            spacing = [0.7, 0.7, 5, 1] if i < 3 else [1.5, 1.5, 3, 1]
            _nifti(raw / f"img{i}.nii.gz", np.random.default_rng(i).normal(size=(4, 4, 3)), np.diag(spacing))
    elif problem == "missing_column":
        rows = [{"file": r.pop("path"), **r} for r in rows]
    elif problem == "phi":
        write_dicom_series(raw / "s", np.zeros((4, 4, 2)), np.eye(4), {"PatientName": "DOE^J"})
        rows[0]["path"] = "s"
    return _write_csv(raw / "labels.csv", rows), kwargs


BAD_INPUTS = {
    "missing_file": r"labels.csv:2: image 'nowhere.nii.gz' not found",
    "unknown_class": r"labels.csv:3: unknown class 'c'.*data.classes",
    "empty_class": r"class 'c' has no images",
    "nan": r"img0.nii.gz: image contains NaN or Inf",
    "no_images": r"empty: folder with no images",
    "no_class_folders": r"raw: the folder-per-class layout needs one sub-folder per class; found image files directly "
    r"in it \(e.g. img0.nii.gz\).*labels CSV",
    "slices_in_class_folder": r"study/series_a: slice_0000.dcm and slice_0001.dcm are slices of one DICOM series; "
    r"each patient's series must be in its own folder inside the class folder",
    "one_slice_3d": r"labels.csv:2: a single-slice image cannot train a 3D model",
    "uneven": r"raw/s: uneven slice spacing.*prepare.uneven_spacing=resample",
    "mixed_orientation": r"raw/s: slices have different orientations",
    "non_dicom_strict": r"s/README: not a readable DICOM file.*prepare.strict",
    "two_series": r"labels.csv:2: .*holds 2 DICOM series; name one per row by its SeriesInstanceUID",
    "split_conflict": r"labels.csv:3: patient is given splits 'train' and 'test'",
    "duplicate_row": r"labels.csv:8: image './img2.nii.gz' is listed twice \(rows 4 and 8\)",
    "mixed_spacing": r"img0.nii.gz 0.7x0.7 mm and .*img3.nii.gz 1.5x1.5 mm.*data.pixdim=\[1.1,1.1\]",
    "missing_column": r"labels.csv: needs columns .*missing: \['path'\]; found: \['file', 'patient_id', 'label'\]",
    "phi": r"gate \(refuse\): 4 findings in 2 DICOM files \(tags: PatientName, PatientIdentityRemoved\); .*deid_report",
}


@pytest.mark.parametrize("problem", sorted(BAD_INPUTS))
def test_bad_input_is_refused_with_file_and_fix_and_leaves_nothing(tmp_path, problem):
    labels, kwargs = _bad_input(tmp_path, problem)
    args = dict(window=WINDOW, spatial_size=[4, 4, -1], spatial_dims=2, split_fractions=(0.34, 0.33, 0.33))
    if kwargs.get("spatial_dims") == 3:
        args["spatial_size"] = [4, 4, 4]
    args.update(kwargs)
    with pytest.raises(ValueError, match=BAD_INPUTS[problem]):
        prepare_dataset(labels, tmp_path / "p", **args)
    left = {"raw", "deid_report.csv"} if problem == "phi" else {"raw"}  # the gate's report, beside the job
    assert {p.name for p in tmp_path.iterdir()} == left  # no prepared folder, no temp folder


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["missing_file", "uneven"])
def test_bad_input_exits_2_from_the_cli(tmp_path, problem):
    labels, _ = _bad_input(tmp_path, problem)
    r = _cli(
        [
            "pipelines.prepare",
            "data=labels",
            f"data.labels={labels}",
            "data.image_size=[4,4]",
            "tracking=none",
            f"paths.output_dir={tmp_path}/job",
        ],
        REPO,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("medaug prepare: error: ")
    assert re.search(BAD_INPUTS[problem], r.stderr) and "Traceback" not in r.stderr
    assert not (tmp_path / "job" / "prepared").exists()


def test_slice_thickness_may_differ_in_2d_but_needs_a_pixdim_in_3d(tmp_path):
    raw, rows = tmp_path / "raw", []
    for i in range(6):  # x spacing within 1 %, slice thickness 2 or 3 mm
        spacing = [1.0 + 0.005 * (i % 2), 1.0, 2.0 + i % 2, 1.0]
        _nifti(raw / f"img{i}.nii.gz", np.random.default_rng(i).normal(size=(4, 4, 4)), np.diag(spacing))
        rows.append({"path": f"img{i}.nii.gz", "patient_id": f"p{i}", "label": "ab"[i % 2]})
    labels = _write_csv(raw / "labels.csv", rows)
    args = dict(window=WINDOW, split_fractions=(0.34, 0.33, 0.33))
    info = prepare_dataset(labels, tmp_path / "p2", spatial_size=[4, 4, -1], spatial_dims=2, **args)
    assert info.summary["images"] == 6
    with pytest.raises(DatasetError, match=r"img0.nii.gz 1x1x2 mm and .*img1.nii.gz 1.005x1x3 mm.*data.pixdim=\["):
        prepare_dataset(labels, tmp_path / "p3", spatial_size=[4, 4, 4], spatial_dims=3, **args)
    info = prepare_dataset(labels, tmp_path / "p3", spatial_size=[4, 4, 4], spatial_dims=3, pixdim=[1, 1, 2.5], **args)
    assert np.linalg.norm(info.affine[:3, :3], axis=0) == pytest.approx([1, 1, 2.5])


def test_a_class_with_no_held_out_patient_and_a_single_class_are_warned_about(tmp_path, caplog):
    raw, rows = tmp_path / "raw", []
    for i in range(7):  # classes a and b with 3 patients each, class c with one
        _nifti(raw / f"img{i}.nii.gz", np.random.default_rng(i).normal(size=(4, 4, 3)))
        rows.append({"path": f"img{i}.nii.gz", "patient_id": f"p{i}", "label": "c" if i == 6 else "ab"[i % 2]})
    args = dict(window=WINDOW, spatial_size=[4, 4, -1], spatial_dims=2, split_fractions=(0.34, 0.33, 0.33))
    with caplog.at_level(logging.WARNING, logger="medaug"):
        info = prepare_dataset(_write_csv(raw / "labels.csv", rows), tmp_path / "p", **args)
    assert info.counts["train"]["c"] > 0 and "c" not in info.counts["val"] | info.counts["test"]
    assert re.search(r"class 'c'.*1 patient.*no held-out.*evaluate cannot measure it", caplog.text)
    assert "class 'a'" not in caplog.text and "two classes" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medaug"):
        prepare_dataset(_write_csv(raw / "one.csv", [dict(r, label="a") for r in rows]), tmp_path / "p1", **args)
    assert re.search(r"one class \('a'\).*classifier metrics need two classes", caplog.text)


def test_labels_csv_saved_by_excel_with_bom_and_spaces_after_commas(tmp_path):
    raw = tmp_path / "raw"
    lines = ["path, patient_id, label"]
    for i in range(6):
        _nifti(raw / f"img{i}.nii.gz", np.random.default_rng(i).normal(size=(4, 4, 3)))
        lines.append(f"img{i}.nii.gz, p{i}, {'ab'[i % 2]}")
    (raw / "labels.csv").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8-sig")
    info = prepare_dataset(
        raw / "labels.csv",
        tmp_path / "p",
        WINDOW,
        spatial_size=[4, 4, -1],
        spatial_dims=2,
        split_fractions=(0.34, 0.33, 0.33),
    )
    assert info.class_names == ["a", "b"] and info.summary["patients"] == 6


def test_uneven_series_can_be_resampled_by_config(tmp_path):
    labels, _ = _bad_input(tmp_path, "uneven")
    info = prepare_dataset(
        labels,
        tmp_path / "p",
        WINDOW,
        spatial_size=[4, 4, -1],
        spatial_dims=2,
        slice_rule="all",
        split_fractions=(0.34, 0.33, 0.33),
        uneven_spacing="resample",
    )
    assert info.summary["source_slices"] == 5 * 3 + 4  # the gap is filled: 4 slices again


def test_non_image_files_are_skipped_and_summarised(tmp_path):
    labels, _ = _bad_input(tmp_path, "non_dicom_strict")
    with pytest.warns(UserWarning, match="skipping .*README"):
        info = prepare_dataset(
            labels, tmp_path / "p", WINDOW, spatial_size=[4, 4, -1], spatial_dims=2, split_fractions=(0.34, 0.33, 0.33)
        )
    assert info.summary["skipped_files"] == 1 and info.summary["skipped_why"] == {"not a readable DICOM file": 1}
    assert info.skipped[0][0].endswith("README")
    assert "README" not in (tmp_path / "p" / "dataset.json").read_text()


def test_stray_file_in_a_class_folder_is_skipped_and_listed_or_stops_when_strict(tmp_path):
    raw = tmp_path / "raw"
    for i in range(6):
        _nifti(raw / "ab"[i % 2] / f"p{i}.nii.gz", np.random.default_rng(i).normal(size=(4, 4, 3)))
    (raw / "a" / "notes.txt").write_text("scanner export notes")
    _nifti(raw / "loose.nii.gz", np.zeros((4, 4, 3)))  # beside the class folders: no class, ignored with a warning
    args = dict(window=WINDOW, spatial_size=[4, 4, -1], spatial_dims=2, split_fractions=(0.34, 0.33, 0.33))
    with pytest.raises(ValueError, match=r"a/notes.txt: not a readable DICOM file.*prepare.strict"):
        prepare_dataset(raw, tmp_path / "p", strict=True, **args)
    with pytest.warns(UserWarning) as warned:
        info = prepare_dataset(raw, tmp_path / "p", **args)
    messages = [str(w.message) for w in warned]
    assert any("skipping" in m and "notes.txt" in m for m in messages)
    assert any("1 file(s) beside the class folders ignored (e.g. loose.nii.gz)" in m for m in messages)
    assert info.summary["patients"] == 6 and info.summary["images"] == 6
    assert [Path(f).name for f, _ in info.skipped] == ["notes.txt"]
    assert info.summary["skipped_why"] == {"not a readable DICOM file": 1}


def test_mr_percentile_dataset_stores_each_window_and_the_median_for_export(tmp_path):
    raw = tmp_path / "raw"
    rows = []
    for i in range(6):  # scans of different gain: the same anatomy times 1..6
        array = np.zeros((6, 6, 3))
        array[1:5, 1:5] = np.linspace(100, 500, 16 * 3).reshape(4, 4, 3) * (i + 1)
        _nifti(raw / f"mr{i}.nii.gz", array)
        rows.append({"path": f"mr{i}.nii.gz", "patient_id": f"p{i}", "label": "ab"[i % 2]})
    labels = _write_csv(raw / "labels.csv", rows)
    info = prepare_dataset(
        labels,
        tmp_path / "p",
        PercentileNormalization(0, 100),
        spatial_size=[6, 6, -1],
        spatial_dims=2,
        slice_rule="all",
        split_fractions=(0.34, 0.33, 0.33),
    )
    manifest = read_manifest(tmp_path / "p")
    lows = sorted({float(r["source_lo"]) for r in manifest})
    assert lows == pytest.approx([100.0 * k for k in range(1, 7)])  # one window per scan
    assert info.window == IntensityWindow(350.0, 1750.0, "MR a.u.")  # median window, used by export
    meta = json.loads((tmp_path / "p" / "dataset.json").read_text())
    assert meta["normalization"]["kind"] == "percentile"
    images, _ = load_split(tmp_path / "p", "train")
    assert images.max() == pytest.approx(1.0) and images.min() == pytest.approx(-1.0)


def test_prepare_stage_prints_the_summary(tmp_path, caplog):
    labels, _ = _bad_input(tmp_path, "non_dicom_strict")
    cfg = compose_cfg(
        "prepare",
        tmp_path / "job",
        [
            "data=labels",
            f"data.labels={labels}",
            "data.image_size=[4,4]",
            "data.split=[0.34,0.33,0.33]",
            "tracking=none",
        ],
    )
    with caplog.at_level(logging.INFO, logger="medaug"), pytest.warns(UserWarning, match="skipping"):
        result = prepare.run(cfg)
    text = caplog.text
    assert "6 patients, 6 images (1 DICOM series), 17 source slices" in text
    assert "classes: 0=a (" in text and "de-identification: policy refuse, 0 findings" in text
    assert "skipped files: 1" in text and "README: not a readable DICOM file" in text
    assert result["data/patients"] == 6 and result["data/skipped_files"] == 1


def test_non_image_dicom_object_is_refused_alone_naming_its_sop_class_and_skipped_beside_a_series(tmp_path):
    """pydicom's liver_1frame.dcm is a DICOM Segmentation. Before: alone, it was read as a training image; beside
    its CT series, the folder 'holds 2 DICOM series'."""
    import shutil

    from pydicom.data import get_testdata_file

    seg = Path(get_testdata_file("liver_1frame.dcm", download=False))
    raw, rows = tmp_path / "raw", []
    for i in range(6):
        _nifti(raw / f"img{i}.nii.gz", np.random.default_rng(i).normal(size=(4, 4, 3)))
        rows.append({"path": f"img{i}.nii.gz", "patient_id": f"p{i}", "label": "ab"[i % 2]})
    write_dicom_series(raw / "ct", np.zeros((4, 4, 2)), np.eye(4), _declared("p0"))
    shutil.copy(seg, raw / "ct" / "seg.dcm")
    shutil.copy(seg, raw / "seg.dcm")
    args = dict(window=WINDOW, spatial_size=[4, 4, -1], spatial_dims=2, split_fractions=(0.34, 0.33, 0.33))
    rows[0]["path"] = "seg.dcm"
    with (
        pytest.warns(UserWarning),
        pytest.raises(
            DatasetError,
            match=r"labels.csv:2: .*seg.dcm holds no readable image \(Segmentation Storage is not an "
            r"image; give it as the mask of its image, converted to a NIfTI label map",
        ),
    ):
        prepare_dataset(_write_csv(raw / "labels.csv", rows), tmp_path / "p", **args)
    assert not (tmp_path / "p").exists()
    rows[0]["path"] = "ct"
    with pytest.warns(UserWarning, match=r"skipping .*ct/seg.dcm: Segmentation Storage is not an image"):
        info = prepare_dataset(_write_csv(raw / "labels.csv", rows), tmp_path / "p", **args)
    assert info.summary["images"] == 6 and [Path(f).name for f, _ in info.skipped] == ["seg.dcm"]
    assert list(info.summary["skipped_why"]) == [
        "Segmentation Storage is not an image; give it as the mask of its "
        "image, converted to a NIfTI label map on the image's grid, e.g. "
        "with dcmqi's segimage2itkimage"
    ]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_masks_keep_their_geometry_and_values_through_prepare(tmp_path, spatial_dims):
    depth = 4
    rows = []
    for i in range(6):
        image = np.full((16, 16, depth), 40.0, np.float32)
        mask = np.zeros((16, 16, depth), np.uint8)
        mask[4 + i % 3 : 10, 3:9, 1:3] = 255  # a 0/255 mask, as image editors save them
        mask[12:14, 12:14, 1:3] = 128
        image[mask == 255] = 200.0
        _nifti(tmp_path / f"img{i}.nii.gz", image)
        _nifti(tmp_path / f"mask{i}.nii.gz", mask)
        rows.append({"path": f"img{i}.nii.gz", "mask": f"mask{i}.nii.gz", "patient_id": f"p{i}", "label": "a"})
    _write_csv(tmp_path / "labels.csv", rows)
    size = [8, 8, -1] if spatial_dims == 2 else [8, 8, 2]
    pixdim = [2.0, 2.0, 0.0] if spatial_dims == 2 else [2.0, 2.0, 2.0]
    info = prepare_dataset(
        tmp_path / "labels.csv", tmp_path / "p", WINDOW, size, spatial_dims, pixdim=pixdim, slice_rule="all"
    )
    assert info.mask_labels == {"background": 0, "label_1": 1, "label_2": 2}  # 128 -> 1, 255 -> 2 (sorted)
    manifest = read_manifest(tmp_path / "p")
    assert all(r["mask"] == f"masks/{r['item_id']}.nii.gz" for r in manifest)
    for split in ("train", "val", "test"):
        images, _ = load_split(tmp_path / "p", split)
        masks = load_split_masks(tmp_path / "p", split)
        assert masks.dtype == torch.long and masks.shape == images.shape
    row = manifest[1]
    image_nii, mask_nii = nib.load(tmp_path / "p" / row["path"]), nib.load(tmp_path / "p" / row["mask"])
    assert mask_nii.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(mask_nii.affine, image_nii.affine)  # one grid
    label_map, image = np.asarray(mask_nii.dataobj), np.asarray(image_nii.dataobj)
    assert set(np.unique(label_map)) <= {0, 1, 2}
    assert image[label_map == 2].min() > 0.5 and image[label_map != 2].max() < 0.5  # aligned with the bright box
    if spatial_dims == 2:  # slices with no label in them are items too (slice_rule=all), their masks empty
        assert (
            len(manifest) == 6 * depth
            and sum(np.asarray(nib.load(tmp_path / "p" / r["mask"]).dataobj).any() for r in manifest) == 6 * 2
        )


def test_msd_label_names_reach_dataset_json_and_a_dataset_without_masks_has_none(tmp_path, prepared_2d):
    root = tmp_path / "Task"
    entries = []
    for i in range(3):
        mask = np.zeros((4, 4, 1))
        mask[1:3, 1:3] = 2
        _nifti(root / f"imagesTr/c{i}.nii.gz", np.full((4, 4, 1), 10.0 * i))
        _nifti(root / f"labelsTr/c{i}.nii.gz", mask)
        entries.append({"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz", "class": "x"})
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "edema", "2": "tumour"}, "training": entries})
    )
    info = prepare_dataset(
        root / "dataset.json",
        tmp_path / "p",
        IntensityWindow(0, 50, "a.u."),
        [4, 4, -1],
        2,
        split_fractions=(1.0, 0.0, 0.0),
    )
    assert info.mask_labels == {"background": 0, "edema": 1, "tumour": 2}  # declared values kept as they are
    assert json.loads((tmp_path / "p" / "dataset.json").read_text())["labels"] == info.mask_labels
    assert set(load_split_masks(tmp_path / "p", "train").unique().tolist()) == {0, 2}
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "edema"}, "training": entries}))
    with pytest.raises(
        DatasetError,
        match=r"values \[2\] that the declared labels \(data.mask_labels, or dataset.json's labels\) do not name",
    ):
        prepare_dataset(
            root / "dataset.json",
            tmp_path / "p2",
            IntensityWindow(0, 50, "a.u."),
            [4, 4, -1],
            2,
            split_fractions=(1.0, 0.0, 0.0),
        )
    no_masks = tmp_path / "nomask"
    make_demo_dataset(no_masks, spatial_dims=2, n_per_class=3, size=8, masks=False)
    info = prepare_dataset(no_masks / "labels.csv", tmp_path / "p3", WINDOW, [8, 8, -1], 2)
    assert info.mask_labels == {} and load_split_masks(tmp_path / "p3", "train") is None
    assert "mask" not in read_manifest(tmp_path / "p3")[0]


def test_mask_labels_name_the_values_of_a_labels_csv(tmp_path):
    from medaug.data import declared_mask_labels
    from medaug.phantoms import DEMO_MASK_LABELS

    raw = make_demo_dataset(tmp_path / "raw", spatial_dims=2, n_per_class=3, size=8)
    info = prepare_dataset(raw, tmp_path / "p", WINDOW, [8, 8, -1], 2)
    assert info.mask_labels == {"background": 0, "label_1": 1}  # no names: label_<k> as before
    info = prepare_dataset(raw, tmp_path / "p", WINDOW, [8, 8, -1], 2, mask_labels=DEMO_MASK_LABELS)
    assert (
        info.mask_labels == {"background": 0, "lesion": 1} and load_info(tmp_path / "p").mask_labels == info.mask_labels
    )
    with pytest.raises(DatasetError, match=r"masks hold values \[1\] that the declared labels"):
        prepare_dataset(raw, tmp_path / "p2", WINDOW, [8, 8, -1], 2, mask_labels={"tumour": 2})
    assert declared_mask_labels({"lesion": 1, "background": 0}) == declared_mask_labels({"lesion": 1})
    assert declared_mask_labels({"lesion": 1}) == {0: "background", 1: "lesion"}
    for bad, message in (
        ({"x": 0}, "data.mask_labels.x=0: 0 is the background"),
        ({"x": 300}, "data.mask_labels.x=300: give each label an integer value 1..255"),
        ({"x": "1"}, "data.mask_labels.x='1'"),
        ({"a": 1, "b": 1}, "names value 1 twice"),
    ):
        with pytest.raises(DatasetError, match=re.escape(message)):
            declared_mask_labels(bad)


def test_demo_phantom_masks_cover_their_lesions_in_nifti_and_dicom_items(prepared):
    info = load_info(prepared)
    assert info.mask_labels == {"background": 0, "lesion": 1}  # the phantoms name their label (DEMO_MASK_LABELS)
    rows = [r for r in read_manifest(prepared) if r["split"] == "train"]
    images, labels = load_split(prepared, "train")
    masks = load_split_masks(prepared, "train")
    names = info.class_names
    for row, image, label, mask in zip(rows, images, labels, masks):
        assert row["class_name"] == names[label]
        if names[label] == "healthy":
            assert not mask.any()
        else:  # the lesions are brighter than the tissue around them, in items read from DICOM too
            assert mask.any() and image[mask == 1].mean() > image[(mask == 0) & (image > -0.9)].mean() + 0.3


def test_masks_on_some_entries_only_are_not_stored_and_say_so(tmp_path):
    rows = []
    for i in range(3):
        _nifti(tmp_path / f"img{i}.nii.gz", np.full((4, 4, 1), 10.0 * i))
        rows.append({"path": f"img{i}.nii.gz", "patient_id": f"p{i}", "label": "a", "mask": ""})
    _nifti(tmp_path / "m0.nii.gz", np.ones((4, 4, 1)))
    rows[0]["mask"] = "m0.nii.gz"
    _write_csv(tmp_path / "labels.csv", rows)
    with pytest.warns(UserWarning, match="1 of 3 entries have a mask; masks are stored only when every entry has one"):
        info = prepare_dataset(
            tmp_path / "labels.csv", tmp_path / "p", WINDOW, [4, 4, -1], 2, split_fractions=(1, 0, 0)
        )
    assert info.mask_labels == {} and load_split_masks(tmp_path / "p", "train") is None

import csv

import pytest
import torch

from medaug.dataset import DatasetError, load_info, load_split, prepare_dataset, read_manifest, split_patients
from medaug.phantoms import make_demo_dataset

from .conftest import WINDOW


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


def test_second_prepare_reuses_cache(tmp_path):
    labels = make_demo_dataset(tmp_path / "raw", spatial_dims=2, n_per_class=3, size=8)
    args = dict(window=WINDOW, spatial_size=[8, 8, -1], spatial_dims=2)
    prepare_dataset(labels, tmp_path / "p", **args)
    stamp = (tmp_path / "p" / "DONE").stat().st_mtime_ns
    prepare_dataset(labels, tmp_path / "p", **args)
    assert (tmp_path / "p" / "DONE").stat().st_mtime_ns == stamp


def test_2d_slices_from_3d_volumes(tmp_path):
    labels = make_demo_dataset(tmp_path / "raw", spatial_dims=3, n_per_class=2, size=8)
    info = prepare_dataset(labels, tmp_path / "p", WINDOW, spatial_size=[8, 8, -1], spatial_dims=2,
                           slice_rule="central", slice_band=0.5)
    images, _ = load_split(tmp_path / "p", "train")
    assert info.image_shape == [8, 8]
    assert len(read_manifest(tmp_path / "p")) == 6 * 4  # 4 central slices of 8 per volume


@pytest.mark.parametrize("problem, message", [
    ("missing_file", "not found"),
    ("empty_class", "no training images"),
])
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

import csv

import numpy as np

from medaug.io import read_volume
from medaug.phantoms import DEMO_CLASSES, LESION_HU, make_demo_dataset, make_phantom


def test_classes_differ_in_lesion_volume():
    rng = np.random.default_rng(0)
    lesion_px = {c: np.mean([(make_phantom(c, (48, 48), rng) > 100).sum() for _ in range(5)]) for c in range(3)}
    assert lesion_px[0] == 0
    assert lesion_px[1] > 50 and lesion_px[2] > 10


def test_demo_dataset_is_seeded_and_uses_nifti_and_dicom(tmp_path):
    a = make_demo_dataset(tmp_path / "a", spatial_dims=3, n_per_class=2, size=8, seed=3)
    b = make_demo_dataset(tmp_path / "b", spatial_dims=3, n_per_class=2, size=8, seed=3)
    rows = list(csv.DictReader(open(a)))
    assert [r["label"] for r in rows] == [c for c in DEMO_CLASSES for _ in range(2)]
    assert any(r["path"].endswith(".nii.gz") for r in rows) and any(not r["path"].endswith(".nii.gz") for r in rows)
    for r in rows:
        va, vb = read_volume(a.parent / r["path"]), read_volume(b.parent / r["path"])
        assert va.array.shape == (8, 8, 8)
        np.testing.assert_allclose(va.array, vb.array, atol=1.0)  # DICOM stores whole HU
        np.testing.assert_allclose(va.affine, vb.affine)
        assert va.array.max() <= LESION_HU + 100

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medaug.io import (ImageReadError, atomic_folder, is_complete, read_dicom_series, read_nifti, read_volume,
                       write_dicom_series, write_nifti)


def oblique_affine():
    """RAS affine with rotated axes, anisotropic spacing and a negative slice direction."""
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, -1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 0.7, 2.5])
    affine[:3, 3] = [-40.0, 25.0, 60.0]
    return affine


def test_nifti_roundtrip_keeps_array_and_affine(tmp_path):
    array = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    write_nifti(tmp_path / "a.nii.gz", array, oblique_affine())
    vol = read_nifti(tmp_path / "a.nii.gz")
    np.testing.assert_allclose(vol.array, array, atol=1e-6)
    np.testing.assert_allclose(vol.affine, oblique_affine(), atol=1e-5)
    assert vol.spacing == pytest.approx((0.8, 0.7, 2.5), abs=1e-5)


def test_2d_nifti_reads_as_one_slice(tmp_path):
    img = nib.Nifti1Image(np.ones((4, 3), np.float32), np.eye(4))
    nib.save(img, tmp_path / "flat.nii")
    assert read_volume(tmp_path / "flat.nii").array.shape == (4, 3, 1)


@pytest.mark.parametrize("bad", ["nan", "4d"])
def test_bad_nifti_is_refused_with_file_name(tmp_path, bad):
    array = np.zeros((3, 3, 3, 2) if bad == "4d" else (3, 3, 3), np.float32)
    if bad == "nan":
        array[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / "bad.nii.gz")
    with pytest.raises(ImageReadError, match="bad.nii.gz"):
        read_volume(tmp_path / "bad.nii.gz")


def flip_slices(array, affine):
    """The same image in world space with its slice axis reversed."""
    flipped = affine.copy()
    flipped[:3, 2] *= -1
    flipped[:3, 3] = affine[:3, :3] @ [0, 0, array.shape[2] - 1] + affine[:3, 3]
    return array[:, :, ::-1], flipped


@pytest.mark.parametrize("slice_direction", [1, -1])
def test_dicom_series_roundtrip_geometry_and_hu(tmp_path, slice_direction):
    rng = np.random.default_rng(1)
    hu = rng.integers(-1000, 1500, size=(6, 5, 4)).astype(np.float32)
    affine = oblique_affine()
    affine[:3, 2] *= -slice_direction  # oblique_affine's slices run against the normal
    files = write_dicom_series(tmp_path / "s", hu, affine, {"PatientID": "x"})
    # shuffled order and a rescale intercept must not matter
    for f in files:
        ds = pydicom.dcmread(f)
        ds.RescaleIntercept = "-1024"
        ds.PixelData = (ds.pixel_array.astype(np.int32) + 1024).astype(np.int16).tobytes()
        ds.save_as(f)
    vol = read_dicom_series(list(reversed(files)))
    # slices come back ordered along the slice normal: a negative direction is the same
    # image in world space with the slice axis reversed
    want, want_affine = (hu, affine) if slice_direction == 1 else flip_slices(hu, affine)
    np.testing.assert_allclose(vol.array, want, atol=1e-3)
    np.testing.assert_allclose(vol.affine, want_affine, atol=1e-3)


def test_dicom_folder_with_two_series_is_refused(tmp_path):
    write_dicom_series(tmp_path / "mix" / "a", np.zeros((4, 4, 2)), np.eye(4), {})
    write_dicom_series(tmp_path / "mix" / "b", np.zeros((4, 4, 2)), np.eye(4), {})
    with pytest.raises(ImageReadError, match="2 DICOM series"):
        read_volume(tmp_path / "mix")


def test_dicom_missing_slice_is_refused(tmp_path):
    files = write_dicom_series(tmp_path / "s", np.zeros((4, 4, 5)), np.eye(4), {})
    files[2].unlink()
    with pytest.raises(ImageReadError, match="uneven slice spacing"):
        read_volume(tmp_path / "s")


def test_pydicom_shipped_ct_reads_in_hu():
    from pydicom.data import get_testdata_file

    vol = read_volume(get_testdata_file("CT_small.dcm"))
    assert vol.array.shape == (128, 128, 1)
    assert vol.meta == {"modality": "CT"}
    assert -1100 < vol.array.min() < vol.array.max() < 3100   # HU, after rescale
    assert vol.spacing[:2] == pytest.approx((0.661468, 0.661468), abs=1e-5)


def test_atomic_folder_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("interrupted")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "full.txt").write_text("x")
    assert is_complete(tmp_path / "out") and (tmp_path / "out" / "full.txt").exists()

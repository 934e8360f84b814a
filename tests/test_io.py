import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest

from medaug.deid import ALLOWED_META
from medaug.atomic import atomic_file, atomic_folder, is_complete, temp_name
from medaug.io import (
    ImageReadError,
    index_dicom,
    read_dicom_series,
    read_nifti,
    read_volume,
    write_dicom_series,
    write_nifti,
)


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
    with pytest.raises(ImageReadError, match="uneven slice spacing.*prepare.uneven_spacing=resample"):
        read_volume(tmp_path / "s")


def test_pydicom_shipped_ct_reads_in_hu():
    from pydicom.data import get_testdata_file

    vol = read_volume(get_testdata_file("CT_small.dcm"))
    assert vol.array.shape == (128, 128, 1)
    assert vol.meta["modality"] == "CT" and set(vol.meta) <= set(ALLOWED_META.values())
    assert -1100 < vol.array.min() < vol.array.max() < 3100  # HU, after rescale
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


def test_atomic_file_replaces_on_success_and_leaves_the_old_file_on_error(tmp_path):
    target = tmp_path / "sub" / "run.json"
    with atomic_file(target) as tmp:  # the parent folder is made
        assert tmp == temp_name(target) and tmp.parent == target.parent
        tmp.write_text("old")
        assert not target.exists()  # nothing at the final name until the write is done
    assert target.read_text() == "old"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["run.json"]
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["run.json"]


def test_atomic_file_removes_a_dead_writers_temp_unless_told_not_to(tmp_path):
    from .test_faults import dead_pid

    target = tmp_path / "a.nii.gz"
    pid = dead_pid()
    stale, stale_suffixed = tmp_path / f".a.nii.gz.tmp{pid}", tmp_path / f".a.nii.gz.tmp{pid}.nii.gz"
    stale.write_bytes(b"half")
    stale_suffixed.write_bytes(b"half")
    with pytest.warns(UserWarning, match="removed 2 temp"):
        with atomic_file(target, suffix=".nii.gz") as tmp:
            assert tmp.name.endswith(".nii.gz") and not stale.exists() and not stale_suffixed.exists()
            tmp.write_bytes(b"full")
    assert target.read_bytes() == b"full"
    stale.write_bytes(b"half")
    with atomic_file(target, clean=False) as tmp:
        tmp.write_bytes(b"again")
    assert stale.exists() and target.read_bytes() == b"again"


def test_atomic_file_mode_is_set_before_the_caller_writes(tmp_path):
    target = tmp_path / "report.csv"
    target.write_text("old")
    target.chmod(0o644)
    with atomic_file(target, mode=0o600) as tmp:
        assert tmp.stat().st_mode & 0o777 == 0o600 and tmp.read_bytes() == b""
        with open(tmp, "w") as fh:
            fh.write("file,tag,reason\n")
    assert target.stat().st_mode & 0o777 == 0o600 and target.read_text() == "file,tag,reason\n"
    with atomic_file(tmp_path / "plain.txt") as tmp:
        assert not tmp.exists()  # without a mode the caller creates the file (default permissions)
        tmp.write_text("x")


def test_writers_leave_no_temp_when_the_write_fails(tmp_path, monkeypatch):
    def broken_save(img, filename):
        Path(filename).write_bytes(b"half a volume")
        raise OSError("disk full")

    write_nifti(tmp_path / "a.nii.gz", np.zeros((2, 2, 2)), np.eye(4))
    before = (tmp_path / "a.nii.gz").read_bytes()
    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(tmp_path / "a.nii.gz", np.ones((2, 2, 2)), np.eye(4))
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"] and (tmp_path / "a.nii.gz").read_bytes() == before


PYDICOM_FILES = Path(pydicom.data.get_testdata_file("CT_small.dcm", download=False)).parent


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    hu = (np.arange(4 * 3 * 2, dtype=np.float32) * 85 - 1024).reshape(4, 3, 2)  # stored = (HU + 1024) / 2.5 is whole
    files = write_dicom_series(tmp_path / "s", hu, np.eye(4), {})
    for f in files:  # store (HU + 1024) / 2.5 → slope 2.5, intercept -1024
        ds = pydicom.dcmread(f)
        ds.RescaleSlope, ds.RescaleIntercept = "2.5", "-1024"
        ds.PixelData = np.round((ds.pixel_array + 1024) / 2.5).astype(np.int16).tobytes()
        ds.save_as(f)
    np.testing.assert_allclose(read_volume(tmp_path / "s").array, hu, atol=1e-3)


def test_two_series_in_one_folder_without_extensions_are_grouped(tmp_path):
    rng = np.random.default_rng(2)
    truth = {}
    for name, affine in (("a", oblique_affine()), ("b", np.diag([0.5, 0.5, 3.0, 1.0]))):
        hu = rng.integers(-1000, 1000, size=(5, 4, 3)).astype(np.float32)
        for f in write_dicom_series(tmp_path / "tmp" / name, hu, affine, {}):
            target = tmp_path / "mixed" / f"{name}{f.stem[-2:]}"  # no extension, one flat folder
            target.parent.mkdir(exist_ok=True)
            f.rename(target)
        truth[name] = (hu, affine)
    index = index_dicom(tmp_path / "mixed")
    assert len(index.series) == 2 and not index.skipped
    for series in index.series.values():
        vol = read_dicom_series(series.files)
        name = series.files[0].name[0]
        want, want_affine = flip_slices(*truth[name]) if name == "a" else truth[name]
        np.testing.assert_allclose(vol.array, want, atol=1e-3)
        np.testing.assert_allclose(vol.affine, want_affine, atol=1e-3)


def enhanced_multiframe(tmp_path, hu, affine, order):
    """One enhanced CT file holding the slices of ``hu`` in ``order`` (per-frame positions, shared geometry)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    files = write_dicom_series(tmp_path / "single", hu, affine, {})
    slices = [pydicom.dcmread(f) for f in files]
    ds = slices[0]
    ds.NumberOfFrames = len(order)
    plane, measures, rescale = Dataset(), Dataset(), Dataset()
    plane.ImageOrientationPatient = ds.ImageOrientationPatient
    measures.PixelSpacing, measures.SliceThickness = ds.PixelSpacing, ds.SliceThickness
    rescale.RescaleSlope, rescale.RescaleIntercept = ds.RescaleSlope, ds.RescaleIntercept
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([plane])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in order:
        position, item = Dataset(), Dataset()
        position.ImagePositionPatient = slices[k].ImagePositionPatient
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "RescaleSlope"):
        delattr(ds, keyword)
    ds.PixelData = b"".join(slices[k].PixelData for k in order)
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)
    return path


@pytest.mark.parametrize("order", [[3, 0, 5, 1, 4, 2], [0]], ids=["6-frames-shuffled", "1-frame"])
def test_enhanced_multiframe_file_reads_like_the_series(tmp_path, order):
    hu = np.random.default_rng(3).integers(-1000, 1000, size=(5, 4, len(order))).astype(np.float32)
    affine = np.diag([0.7, 0.8, 2.0, 1.0])
    path = enhanced_multiframe(tmp_path, hu, affine, order=order)
    vol = read_volume(path)
    np.testing.assert_allclose(vol.array, hu, atol=1e-3)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)


def test_compressed_pixel_data_without_decoder_names_syntax_and_extra(tmp_path):
    # JPEG Lossless (process 14): no decoder of the default install reads it (highdicom brings a JPEG-LS one,
    # so pydicom's JPEG-LS file now decodes); the file is pydicom's JPEG-LS file relabelled
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1
    ds.save_as(tmp_path / "jpeg_lossless.dcm")
    with pytest.raises(ImageReadError, match=r"JPEG Lossless, Non-Hierarchical.*pip install 'medaug\[jpeg\]'"):
        read_volume(tmp_path / "jpeg_lossless.dcm")
    # JPEG-LS lossless decodes with what is installed and equals the uncompressed file
    np.testing.assert_array_equal(
        read_volume(PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm").array,
        read_volume(PYDICOM_FILES / "MR_small.dcm").array,
    )
    # JPEG 2000 lossless decodes with what is installed and equals the uncompressed file
    np.testing.assert_array_equal(
        read_volume(PYDICOM_FILES / "MR_small_jp2klossless.dcm").array,
        read_volume(PYDICOM_FILES / "MR_small.dcm").array,
    )


def test_truncated_and_non_dicom_files_are_skipped_or_refused_when_strict(tmp_path):
    hu = np.zeros((4, 4, 3), np.float32)
    files = write_dicom_series(tmp_path / "s", hu, np.eye(4), {})
    (tmp_path / "s" / "notes.txt").write_text("not an image")
    data = files[0].read_bytes()
    (tmp_path / "s" / "broken").write_bytes(data[: len(data) - 10])
    with pytest.warns(UserWarning, match="skipping"):
        index = index_dicom(tmp_path / "s")
    why = {p.name: reason for p, reason in index.skipped}
    assert set(why) == {"notes.txt", "broken"}
    assert "not a readable DICOM" in why["notes.txt"] and "truncated" in why["broken"]
    assert read_volume(tmp_path / "s").array.shape == (4, 4, 3)
    with pytest.raises(ImageReadError, match="broken: truncated.*prepare.strict"):
        read_volume(tmp_path / "s", strict=True)
    shutil.copy(PYDICOM_FILES / "MR_truncated.dcm", tmp_path / "mr")
    with pytest.warns(UserWarning), pytest.raises(ImageReadError, match="no readable DICOM image.*truncated"):
        read_volume(tmp_path / "mr")


def test_uneven_spacing_can_be_resampled(tmp_path):
    hu = np.broadcast_to(np.arange(6, dtype=np.float32) * 100, (3, 3, 6)).copy()  # linear along z
    files = write_dicom_series(tmp_path / "s", hu, np.diag([1.0, 1.0, 2.0, 1.0]), {})
    files[2].unlink()
    vol = read_volume(tmp_path / "s", uneven="resample")
    assert vol.array.shape == (3, 3, 6) and vol.spacing == pytest.approx((1, 1, 2))
    np.testing.assert_allclose(vol.array[0, 0], np.arange(6) * 100, atol=1e-3)  # the gap is interpolated


def test_nifti_4d_needs_a_volume_index(tmp_path):
    array = np.stack([np.full((3, 3, 2), k, np.float32) for k in range(3)], axis=-1)
    nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / "t.nii.gz")
    with pytest.raises(ImageReadError, match=r"t.nii.gz.*data.volume_index"):
        read_volume(tmp_path / "t.nii.gz")
    assert read_volume(tmp_path / "t.nii.gz", volume_index=2).array.max() == 2


def test_pydicom_shipped_ct_series_is_ordered_by_position():
    """dicomdirtests/98892001/CT5N: 5 real CT slices, files named against the slice order."""
    folder = PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N"
    vol = read_volume(folder)
    assert vol.array.shape == (16, 16, 5) and vol.meta["modality"] == "CT"
    np.testing.assert_allclose(vol.affine[:3, 2], [0, 0, 2.5], atol=1e-4)  # ascending along +S
    np.testing.assert_allclose(vol.affine[:3, 3], [72.2, 143.0, -1.2375], atol=1e-3)  # LPS → RAS origin
    by_z = sorted(folder.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    first = pydicom.dcmread(by_z[0])
    want = first.pixel_array.T * float(first.RescaleSlope) + float(first.RescaleIntercept)
    np.testing.assert_allclose(vol.array[:, :, 0], want)


def test_pydicom_shipped_tree_is_indexed_and_bad_series_are_refused():
    root = PYDICOM_FILES / "dicomdirtests"
    with pytest.warns(UserWarning):
        index = index_dicom(root)
    assert any("DICOMDIR" in why for _, why in index.skipped)
    assert sum(s.num_frames for s in index.series.values()) == len(index.headers)
    with pytest.raises(ImageReadError, match="uneven slice spacing"):
        read_volume(root / "77654033" / "CT2")
    with pytest.raises(ImageReadError, match="different orientations"):
        read_volume(root / "98892001" / "CT2N")


def test_nibabel_shipped_nifti_keep_their_affine():
    data = Path(nib.__file__).parent / "tests" / "data"
    anat = nib.load(data / "anatomical.nii")
    vol = read_volume(data / "anatomical.nii")
    np.testing.assert_allclose(vol.affine, anat.affine)
    np.testing.assert_allclose(vol.array, np.asarray(anat.dataobj, np.float32))
    four_d = nib.load(data / "example4d.nii.gz")
    with pytest.raises(ImageReadError, match=r"example4d.nii.gz: NIfTI image has shape .*data.volume_index"):
        read_volume(data / "example4d.nii.gz")
    vol = read_volume(data / "example4d.nii.gz", volume_index=1)
    np.testing.assert_allclose(vol.array, np.asarray(four_d.dataobj[..., 1], np.float32))
    np.testing.assert_allclose(vol.affine, four_d.affine)


def _as_sop_class(src: Path, dst: Path, sop_class: str, pixels: bool = True, in_meta_only: bool = False) -> Path:
    """A copy of the DICOM file ``src`` declaring ``sop_class`` (in the dataset, or only in its file meta)."""
    ds = pydicom.dcmread(src)
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    if in_meta_only:
        del ds.SOPClassUID
    else:
        ds.SOPClassUID = sop_class
    if not pixels:
        del ds.PixelData
    ds.save_as(dst)
    return dst


@pytest.mark.parametrize(
    "name, fix",
    [
        ("liver_1frame.dcm", r"Segmentation Storage is not an image; give it as the mask of its image"),
        ("rtdose.dcm", r"RT Dose Storage is not an image.*remove it"),
        ("rtdose_1frame.dcm", r"RT Dose Storage is not an image"),
        ("test-SR.dcm", r"Comprehensive SR Storage is not an image; a structured report.*remove it"),
        ("rtplan.dcm", r"RT Plan Storage is not an image.*remove it"),
    ],
)
def test_pydicom_shipped_non_image_objects_are_refused_by_sop_class(name, fix):
    """Before: the SEG and the 1-frame dose read as images; the 15-frame dose said 'all 15 slices share one
    position (duplicate files...)'; SR and plan said only 'no pixel data'."""
    with pytest.warns(UserWarning, match=fix), pytest.raises(ImageReadError, match=f"{name}: .*{fix}"):
        read_volume(PYDICOM_FILES / name)


@pytest.mark.parametrize(
    "sop_class, pixels, fix",
    [
        (
            pydicom.uid.RTStructureSetStorage,
            False,
            r"RT Structure Set Storage is not an image; convert its contours "
            r"to a label map",
        ),
        (
            pydicom.uid.GrayscaleSoftcopyPresentationStateStorage,
            False,
            r"Grayscale Softcopy Presentation State Storage is not an image; it holds display settings.*remove it",
        ),
        (
            pydicom.uid.KeyObjectSelectionDocumentStorage,
            False,
            r"Key Object Selection Document Storage is not an image",
        ),
        (pydicom.uid.SegmentationStorage, True, r"Segmentation Storage is not an image"),
    ],
)
@pytest.mark.parametrize("in_meta_only", [False, True], ids=["SOPClassUID", "MediaStorageSOPClassUID"])
def test_non_image_sop_class_is_skipped_beside_its_series_and_refused_alone(
    tmp_path, sop_class, pixels, fix, in_meta_only
):
    hu = np.zeros((4, 4, 3), np.float32)
    files = write_dicom_series(tmp_path / "s", hu, np.eye(4), {})
    odd = _as_sop_class(files[0], tmp_path / "s" / "object", sop_class, pixels, in_meta_only)
    with pytest.warns(UserWarning, match=fix):
        index = index_dicom(tmp_path / "s")
    assert [(p.name, bool(re.search(fix, why))) for p, why in index.skipped] == [("object", True)]
    with pytest.warns(UserWarning, match=fix):
        assert read_volume(tmp_path / "s").array.shape == (4, 4, 3)  # the series beside it is not blocked
    with (
        pytest.warns(UserWarning),
        pytest.raises(ImageReadError, match=f"object: no readable DICOM image found \\({fix}"),
    ):
        read_volume(odd)
    with pytest.raises(ImageReadError, match=f"object: {fix}.*prepare.strict") as refused:
        read_volume(tmp_path / "s", strict=True)
    assert "remove it; remove it" not in str(refused.value)
    with pytest.raises(ImageReadError, match=f"object: {fix}"):
        read_dicom_series([odd])


def test_image_storage_classes_and_files_without_sop_class_are_read(tmp_path):
    files = write_dicom_series(tmp_path / "s", np.zeros((4, 4, 1)), np.eye(4), {})
    for sop_class in (
        pydicom.uid.MRImageStorage,
        pydicom.uid.SecondaryCaptureImageStorage,
        pydicom.uid.PositronEmissionTomographyImageStorage,
        "1.2.3.4.5.6.7",
    ):  # the last: private
        _as_sop_class(files[0], tmp_path / "one.dcm", sop_class)
        assert read_volume(tmp_path / "one.dcm").array.shape == (4, 4, 1)
    ds = pydicom.dcmread(files[0])
    del ds.SOPClassUID, ds.file_meta.MediaStorageSOPClassUID
    ds.save_as(tmp_path / "none.dcm")
    assert read_volume(tmp_path / "none.dcm").array.shape == (4, 4, 1)


NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def test_cifti_file_without_affine_is_refused_in_one_line():
    """Before: AttributeError 'Cifti2Image' object has no attribute 'affine'."""
    with pytest.raises(ImageReadError, match=r"row_major.dconn.nii: a CIFTI-2 image.*has no affine.*not a volume"):
        read_volume(NIBABEL_DATA / "row_major.dconn.nii")


@pytest.mark.parametrize(
    "srow",
    [
        dict(srow_x=[0, 0, 0, 0], srow_y=[0, 0, 0, 0], srow_z=[0, 0, 1, 0]),  # zero column and rows
        dict(srow_y=[0, 0, 0, 0]),
        dict(srow_z=[0, 0, np.nan, 0]),
    ],
    ids=["zero-column", "zero-row", "nan"],
)
def test_nifti_with_singular_affine_is_refused_naming_the_header_field(tmp_path, srow):
    """Before: read, and MONAI raised a RuntimeError traceback in preprocessing. (A zero pixdim nibabel itself
    sets to 1, and a qform is a rotation times zooms: only an sform can be singular.)"""
    hdr = nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.eye(4)).header
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    for key, value in srow.items():
        hdr[key] = value
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.float32), None, hdr), tmp_path / "flat.nii.gz")
    affine = nib.load(tmp_path / "flat.nii.gz").affine
    assert not np.isfinite(affine).all() or np.linalg.matrix_rank(affine[:3, :3]) < 3
    with pytest.raises(
        ImageReadError,
        match=r"flat.nii.gz: its affine \(voxel → mm, from the sform\) is singular "
        r"or not finite.*fix the header's sform/qform",
    ):
        read_volume(tmp_path / "flat.nii.gz")


def _with_header(src: Path, dst: Path, **changes) -> Path:
    ds = pydicom.dcmread(src)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(dst)
    return dst


@pytest.mark.parametrize(
    "changes, why",
    [
        (dict(Rows=3), r"pixel data holds 48 bytes but Rows × Columns × frames \(3 × 4 × 1\) at 16 bits need 24"),
        (dict(Rows=7), r"pixel data holds 48 bytes but Rows × Columns × frames \(7 × 4 × 1\) at 16 bits need 56"),
        (dict(NumberOfFrames=2), r"pixel data holds 48 bytes but .*\(6 × 4 × 2\) at 16 bits need 96"),
        ("long", r"pixel data holds 96 bytes but .*\(6 × 4 × 1\) at 16 bits need 48"),
    ],
    ids=["half-the-rows", "more-rows", "more-frames", "longer-pixel-data"],
)
def test_dicom_whose_rows_and_columns_disagree_with_its_pixel_data_is_named(tmp_path, changes, why):
    """Before: half the rows or twice the pixel data raised 'cannot reshape array of size 48 into shape (1,6,4)'
    naming no file (pydicom returns the excess as extra frames); more rows or frames said 'truncated'."""
    (src,) = write_dicom_series(tmp_path / "s", np.zeros((4, 6, 1)), np.eye(4), {})
    if changes == "long":
        changes = dict(PixelData=pydicom.dcmread(src).PixelData * 2)
    bad = _with_header(src, tmp_path / "bad.dcm", **changes)
    with pytest.warns(UserWarning, match=why), pytest.raises(ImageReadError, match=f"bad.dcm: .*{why}"):
        read_volume(bad)
    with pytest.raises(ImageReadError, match=f"bad.dcm: {why}"):
        read_dicom_series([bad])


def test_pixel_data_longer_by_less_than_a_frame_is_read_as_padding_with_a_warning(tmp_path):
    """pydicom's MR_small_padded.dcm has one row (128 bytes) of trailing padding; a Rows one too small looks the
    same. Before: both read silently (the second a sheared image)."""
    with pytest.warns(
        UserWarning,
        match=r"MR_small_padded.dcm: pixel data holds 128 bytes more than .*64 × 64 × 1.* "
        r"read as padding; if the image looks sheared, check Rows and Columns",
    ):
        assert read_volume(PYDICOM_FILES / "MR_small_padded.dcm").array.shape == (64, 64, 1)
    (src,) = write_dicom_series(tmp_path / "s", np.zeros((4, 6, 1)), np.eye(4), {})
    with pytest.warns(UserWarning, match=r"bad.dcm: pixel data holds 8 bytes more than"):
        assert read_volume(_with_header(src, tmp_path / "bad.dcm", Rows=5)).array.shape == (4, 5, 1)


@pytest.mark.parametrize(
    "name, changes, counted",
    [
        ("MR_small_jp2klossless.dcm", dict(Rows=32), r"32 × 64 × 1"),
        ("MR_small_RLE.dcm", dict(Rows=65), r"65 × 64 × 1"),
        ("MR_small_RLE.dcm", dict(NumberOfFrames=2), r"64 × 64 × 2"),
    ],
)
def test_compressed_frames_that_rows_and_columns_do_not_describe_are_not_blamed_on_decoders(
    tmp_path, name, changes, counted
):
    """Before: 'no installed decoder handles it; install the decoders', though the decoder is installed."""
    bad = _with_header(PYDICOM_FILES / name, tmp_path / "bad.dcm", **changes)
    with pytest.raises(
        ImageReadError,
        match=r"bad.dcm: pixel data compressed as '.*' could not be decoded \(.+\); "
        f"if Rows × Columns × frames \\({counted}\\) are right, install more "
        r"decoders: pip install 'medaug\[jpeg\]'",
    ):
        read_volume(bad)


@pytest.mark.parametrize("multiframe", [False, True])
def test_mr_is_written_as_mr_without_hu_and_z_scores_keep_their_precision(tmp_path, multiframe):
    from medaug.io import write_dicom_multiframe

    z = np.random.default_rng(3).normal(size=(6, 5, 4)).astype(np.float32)  # z-scored MR: values of order 1
    affine = np.diag([0.8, 0.7, 2.5, 1.0])
    if multiframe:
        files = [write_dicom_multiframe(tmp_path / "mr.dcm", z, affine, {}, "MR", window=(0.0, 4.0))]
    else:
        files = write_dicom_series(tmp_path / "s", z, affine, {}, "MR", window=(0.0, 4.0))
    ds = pydicom.dcmread(files[0])
    sop = pydicom.uid.EnhancedMRImageStorage if multiframe else pydicom.uid.MRImageStorage
    assert ds.SOPClassUID == sop and ds.Modality == "MR" and "Laterality" not in ds
    rwv = (ds.SharedFunctionalGroupsSequence[0] if multiframe else ds).RealWorldValueMappingSequence[0]
    assert rwv.MeasurementUnitsCodeSequence[0].CodeMeaning == "arbitrary unit"
    stored = np.stack([pydicom.dcmread(f).pixel_array for f in files]) if not multiframe else ds.pixel_array
    assert np.abs(stored).max() == 32767  # the int16 range, not whole units (which would round z to -3..3)
    if multiframe:  # its Pixel Value Transformation (RescaleType US) brings the source values back
        assert ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleType == "US"
        np.testing.assert_allclose(read_volume(files[0]).array, z, atol=1e-3)
    else:
        assert not {"RescaleSlope", "RescaleIntercept", "RescaleType"} & set(ds.dir())
        source = read_volume(tmp_path / "s").array * float(rwv.RealWorldValueSlope)
        np.testing.assert_allclose(source, z, atol=1e-3)
    with pytest.raises(ValueError, match="modality='PT'.*CT or MR"):
        write_dicom_series(tmp_path / "pt", z, np.eye(4), {}, "PT")

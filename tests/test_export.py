import csv
import hashlib
import json
import shutil
import subprocess
import tarfile
import warnings
import zipfile

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.uid import UID

from medaug.data import DatasetError, load_info, prepare_dataset
from medaug.export import ExportError, archive_folder, export_dataset, png_planes, render_card
from medaug.io import read_volume, write_dicom_series, write_nifti
from medaug.preprocessing import IntensityWindow, PercentileNormalization

from .conftest import CONF_DIR

TEMPLATE = CONF_DIR.parent / "data_cards" / "TEMPLATE.md"
CARD = dict(
    name="t",
    created="2026-01-01",
    medaug_version="0",
    checkpoint_id="abc",
    training_steps=5,
    model="M",
    dataset_fingerprint="f",
    mlflow_run_id="run-7f3a",
    sampler="ddim",
    guidance_scale=2,
    seed=1,
    spatial_dims=2,
    image_shape="8 × 8",
    spacing="2 × 2",
    intensity="HU",
    class_counts="a: 2",
    metrics="| m | 1 |",
    privacy="not audited",
    deid="gate policy `refuse`",
    differential_privacy="none",
)
WINDOW = IntensityWindow(-160, 240)
MR_WINDOW = IntensityWindow(20.0, 900.0, "MR a.u.")  # the median percentile window of MR training scans
WINDOWS = {"CT": WINDOW, "MR": MR_WINDOW}
# An oblique, right-handed geometry (rotation about x) with anisotropic voxels, RAS mm.
_C, _S = np.cos(0.3), np.sin(0.3)
AFFINE = np.array([[0.8, 0, 0, -40.0], [0, 0.7 * _C, -2.5 * _S, 12.5], [0, 0.7 * _S, 2.5 * _C, 30.25], [0, 0, 0, 1]])

# Every attribute a medaug DICOM file may hold (file meta included); anything else is a leak.
DICOM_ALLOWED = {
    "FileMetaInformationGroupLength",
    "FileMetaInformationVersion",
    "MediaStorageSOPClassUID",
    "MediaStorageSOPInstanceUID",
    "TransferSyntaxUID",
    "ImplementationClassUID",
    "ImplementationVersionName",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "SeriesNumber",
    "InstanceNumber",
    "ImageType",
    "PatientPosition",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "SeriesDescription",
    "ImageComments",
    "DerivationDescription",
    "BurnedInAnnotation",
    "Manufacturer",
    "Laterality",
    "ImageLaterality",
    "ContentDate",
    "ContentTime",
    "PositionReferenceIndicator",
    "KVP",
    "AcquisitionNumber",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
    "SliceThickness",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "PixelData",
}
# The Enhanced CT option adds its functional groups, dimensions and equipment attributes.
ENHANCED_ALLOWED = DICOM_ALLOWED - {"Laterality", "KVP", "AcquisitionNumber", "DerivationDescription"} | {
    "NumberOfFrames",
    "ManufacturerModelName",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "ContentQualification",
    "PixelPresentation",
    "VolumetricProperties",
    "VolumeBasedCalculationTechnique",
    "PresentationLUTShape",
    "LossyImageCompression",
    "AcquisitionContextSequence",
    "DimensionOrganizationType",
    "DimensionOrganizationSequence",
    "DimensionOrganizationUID",
    "DimensionIndexSequence",
    "DimensionIndexPointer",
    "FunctionalGroupPointer",
    "DimensionDescriptionLabel",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "PixelMeasuresSequence",
    "PlaneOrientationSequence",
    "PlanePositionSequence",
    "PixelValueTransformationSequence",
    "FrameVOILUTSequence",
    "CTImageFrameTypeSequence",
    "FrameType",
    "FrameAnatomySequence",
    "AnatomicRegionSequence",
    "CodeValue",
    "CodingSchemeDesignator",
    "CodeMeaning",
    "FrameLaterality",
    "IrradiationEventIdentificationSequence",
    "IrradiationEventUID",
    "FrameContentSequence",
    "DimensionIndexValues",
}
# MR Image: no CT attributes, no Modality LUT (the IOD has none: Rescale* would be non-standard); the MR Image
# module's type 1/2 attributes, and a Real World Value Mapping from stored values to the source units.
MR_ALLOWED = DICOM_ALLOWED - {"KVP", "RescaleSlope", "RescaleIntercept", "RescaleType"} | {
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "MRAcquisitionType",
    "RepetitionTime",
    "EchoTime",
    "EchoTrainLength",
    "RealWorldValueMappingSequence",
}
ENHANCED_MR_ALLOWED = ENHANCED_ALLOWED - {
    "CTImageFrameTypeSequence",
    "IrradiationEventIdentificationSequence",
    "IrradiationEventUID",
} | {
    "MRImageFrameTypeSequence",
    "ComplexImageComponent",
    "AcquisitionContrast",
    "RealWorldValueMappingSequence",
    "RealWorldValueFirstValueMapped",
    "RealWorldValueLastValueMapped",
    "RealWorldValueSlope",
    "RealWorldValueIntercept",
    "LUTExplanation",
    "LUTLabel",
    "MeasurementUnitsCodeSequence",
    "RescaleType",
    "ApplicableSafetyStandardAgency",
}
# Type 1 and 2 attributes of the CT Image IOD's modules (patient, study, series, frame of
# reference, equipment, image, plane, pixel, CT image, SOP common).
CT_REQUIRED = {
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "Manufacturer",
    "InstanceNumber",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelData",
    "ImageType",
    "RescaleIntercept",
    "RescaleSlope",
    "KVP",
    "AcquisitionNumber",
    "SOPClassUID",
    "SOPInstanceUID",
}


def _rows(n):
    return [
        {
            "index": i,
            "label": i % 2,
            "class_name": "ab"[i % 2],
            "seed": 10 + i,
            "guidance_scale": 2.0,
            "checkpoint_id": "abc",
        }
        for i in range(n)
    ]


def _images(n, spatial_dims, size=8):
    g = torch.Generator().manual_seed(spatial_dims)
    return torch.rand(n, 1, *([size] * spatial_dims), generator=g) * 2 - 1


def _export(tmp_path, images, name="e", **kwargs):
    kwargs.setdefault("card_fields", CARD)
    kwargs["window"] = kwargs.get("window") or WINDOWS[kwargs.get("modality", "CT")]
    return export_dataset(images, _rows(len(images)), tmp_path / name, affine=AFFINE, template=TEMPLATE, **kwargs)


def dciodvfy_problems(path, iod):
    """The Error and Warning lines of dicom3tools' IOD validator on one file (it reports on stderr)."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    report = run.stdout + run.stderr
    assert iod in report.split(), report  # it names the IOD it checked against
    return [line for line in report.splitlines() if line.startswith(("Error", "Warning"))]


def rwv_to_source(ds, stored):
    """Stored MR values → source units with the file's Real World Value Mapping (an MR Image has no Rescale)."""
    rwv = ds.RealWorldValueMappingSequence[0]
    return np.asarray(stored, np.float64) * float(rwv.RealWorldValueSlope) + float(rwv.RealWorldValueIntercept)


def _manifest(out):
    return list(csv.DictReader(open(out / "manifest.csv")))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_export_writes_hu_nifti_with_geometry(tmp_path, spatial_dims):
    images = torch.linspace(-1, 1, 2 * 8**spatial_dims).reshape(2, 1, *([8] * spatial_dims))
    out = _export(tmp_path, images)
    manifest = _manifest(out)
    assert [m["class_name"] for m in manifest] == ["a", "b"] and len(json.load(open(out / "manifest.json"))) == 2
    assert manifest[1]["seed"] == "11" and manifest[1]["checkpoint_id"] == "abc" and manifest[1]["privacy_score"] == ""
    vol = read_volume(out / manifest[1]["path"])
    np.testing.assert_allclose(vol.affine, AFFINE)
    np.testing.assert_allclose(vol.array.reshape(-1), WINDOW.to_source(images[1].reshape(-1).numpy()), atol=1e-3)
    card = (out / "DATA_CARD.md").read_text()
    assert "synthetic" in card.lower() and "abc" in card and "run-7f3a" in card and "$" not in card
    assert (out / "DONE").exists()


@pytest.mark.parametrize("modality", ["CT", "MR"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_dicom_reads_back_like_the_nifti_with_valid_headers(tmp_path, spatial_dims, modality):
    from monai.transforms import LoadImage

    out = _export(tmp_path, _images(3, spatial_dims), formats=["nifti", "dicom"], modality=modality)
    manifest = _manifest(out)
    uids, studies = set(), set()
    for i, row in enumerate(manifest):
        nifti = read_volume(out / row["nifti"])
        dicom_path = out / row["dicom"]
        assert dicom_path.is_file() if spatial_dims == 2 else len(list(dicom_path.glob("*.dcm"))) == 8
        dicom = read_volume(dicom_path)
        first = pydicom.dcmread(dicom_path if spatial_dims == 2 else sorted(dicom_path.glob("*.dcm"))[0])
        # CT: stored as whole HU (RescaleSlope 1); MR: the int16 range, mapped back by the Real World Value Mapping
        to_source, atol = (lambda v: v, 0.5 + 1e-3) if modality == "CT" else (lambda v: rwv_to_source(first, v), 0.02)
        np.testing.assert_allclose(to_source(dicom.array), nifti.array, atol=atol)
        np.testing.assert_allclose(dicom.affine, nifti.affine, atol=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            monai = LoadImage(reader="PydicomReader", image_only=True)(str(dicom_path))
        np.testing.assert_allclose(to_source(np.asarray(monai)).reshape(nifti.array.shape), nifti.array, atol=atol)
        cols = 4 if spatial_dims == 3 else 2  # a single 2D image has no slice step for MONAI to measure
        np.testing.assert_allclose(np.asarray(monai.affine)[:3, :cols], nifti.affine[:3, :cols], atol=1e-3)
        np.testing.assert_allclose(np.asarray(monai.affine)[:3, 3], nifti.affine[:3, 3], atol=1e-3)

        files = [dicom_path] if spatial_dims == 2 else sorted(dicom_path.glob("*.dcm"))
        series = set()
        for f in files:
            ds = pydicom.dcmread(f)
            keywords = {e.keyword for e in ds} | {e.keyword for e in ds.file_meta}
            allowed = DICOM_ALLOWED if modality == "CT" else MR_ALLOWED
            assert keywords <= allowed, keywords - allowed
            assert "Laterality" not in keywords and ds.ImageLaterality == "U"  # an empty Laterality is invalid
            if modality == "CT":
                assert CT_REQUIRED <= keywords, CT_REQUIRED - keywords
                assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
                assert ds.RescaleType == "HU" and float(ds.RescaleSlope) == 1
                assert float(ds.WindowCenter) == 40 and float(ds.WindowWidth) == 400
            else:
                assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
                assert not {"RescaleType", "RescaleSlope", "RescaleIntercept", "KVP"} & keywords  # no HU, no CT
                rwv = ds.RealWorldValueMappingSequence[0]
                assert "arbitrary units" in rwv.LUTExplanation and rwv.MeasurementUnitsCodeSequence[0].CodeValue
                centre = rwv_to_source(ds, float(ds.WindowCenter))
                width = float(ds.WindowWidth) * rwv.RealWorldValueSlope
                assert centre == pytest.approx(460, abs=0.1) and width == pytest.approx(880, abs=0.1)
            assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
            assert "SYNTHETIC" in ds.SeriesDescription and "SYNTHETIC" in ds.ImageComments
            assert ds.PatientIdentityRemoved == "YES" and ds.PatientID == f"SYN{i:05d}"
            assert str(ds.PatientName) == f"SYNTHETIC^SYN{i:05d}"
            assert float(ds.PixelSpacing[0]) == pytest.approx(0.7) and float(ds.PixelSpacing[1]) == pytest.approx(0.8)
            assert float(ds.SliceThickness) == pytest.approx(2.5)
            for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID):
                assert UID(uid).is_valid
            assert ds.SOPInstanceUID not in uids
            uids.add(ds.SOPInstanceUID)
            series.add((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID))
        assert len(series) == 1  # one series per sample
        studies |= series
    flat = [u for s in studies for u in s]
    assert len(studies) == 3 and len(set(flat)) == len(flat) and not set(flat) & uids
    if shutil.which("dciodvfy"):  # dicom3tools' IOD validator, where installed: no error and no warning
        for f in sorted(out.joinpath("dicom").rglob("*.dcm")):
            assert dciodvfy_problems(f, f"{modality}Image") == [], f


def read_enhanced_ct(path):
    """Volume (X, Y, Z) in source units and RAS affine of an Enhanced CT/MR file, from its functional groups."""
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    rescale = shared.PixelValueTransformationSequence[0]
    array = ds.pixel_array.astype(np.float64) * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept)
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    spacing = np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, float)
    frames = ds.PerFrameFunctionalGroupsSequence
    ipp = [np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float) for f in frames]
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = iop[:3] * spacing[1], iop[3:] * spacing[0]
    lps[:3, 2], lps[:3, 3] = (ipp[-1] - ipp[0]) / (len(ipp) - 1), ipp[0]
    return ds, array.transpose(2, 1, 0), np.diag([-1.0, -1, 1, 1]) @ lps


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_enhanced_multiframe_option_matches_the_nifti(tmp_path, modality):
    out = _export(tmp_path, _images(2, 3), formats=["nifti", "dicom"], dicom_multiframe=True, modality=modality)
    for i, row in enumerate(_manifest(out)):
        nifti = read_volume(out / row["nifti"])
        ds, array, affine = read_enhanced_ct(out / row["dicom"])
        np.testing.assert_allclose(array, nifti.array, atol=0.5 + 1e-3 if modality == "CT" else 0.02)
        np.testing.assert_allclose(affine, nifti.affine, atol=1e-3)
        np.testing.assert_allclose(read_volume(out / row["dicom"]).array, nifti.array, atol=0.5 + 1e-3)  # as medaug
        sop = {"CT": pydicom.uid.EnhancedCTImageStorage, "MR": pydicom.uid.EnhancedMRImageStorage}[modality]
        assert ds.SOPClassUID == sop and ds.Modality == modality and ds.NumberOfFrames == 8
        assert ds.PatientIdentityRemoved == "YES" and "SYNTHETIC" in ds.ImageComments and ds.ImageType[0] == "DERIVED"
        shared = ds.SharedFunctionalGroupsSequence[0]
        assert float(shared.FrameVOILUTSequence[0].WindowWidth) == (400 if modality == "CT" else 880)
        rescale_type = shared.PixelValueTransformationSequence[0].RescaleType
        assert rescale_type == ("HU" if modality == "CT" else "US")  # US: unspecified, the MR signal has no unit
        if modality == "MR":
            rwv = shared.RealWorldValueMappingSequence[0]
            assert "arbitrary units" in rwv.LUTExplanation and rwv.MeasurementUnitsCodeSequence[0].CodeValue
        assert all(UID(u).is_valid for u in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID))
        keywords = {e.keyword for e in ds.iterall()} | {e.keyword for e in ds.file_meta}
        allowed = ENHANCED_ALLOWED if modality == "CT" else ENHANCED_MR_ALLOWED
        assert keywords <= allowed, keywords - allowed
        if shutil.which("dciodvfy"):
            assert dciodvfy_problems(out / row["dicom"], f"Enhanced{modality}Image") == []


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_png_previews_map_the_window_to_the_bit_depth(tmp_path, spatial_dims, bits):
    images = _images(2, spatial_dims)
    corner = (0, 0) if spatial_dims == 2 else (0, 0, 4)  # 3D: in the axial mid-slice
    images[(0, 0, *corner)] = -1.0
    images[(0, 0, 1, *corner[1:])] = 1.0
    out = _export(tmp_path, images, formats=["png"], png_bits=bits)
    files = _manifest(out)[0]["png"].split(";")
    assert len(files) == (1 if spatial_dims == 2 else 3)
    png = np.asarray(Image.open(out / files[0]))
    planes = png_planes(images[0], bits)
    np.testing.assert_array_equal(png, next(iter(planes.values())))
    assert png.shape == (8, 8) and png.min() == 0 and png.max() == 2**bits - 1
    # display orientation: x (array axis 0) runs left→right, y (axis 1) bottom→top
    assert png[-1, 0] == 0 and png[-1, 1] == 2**bits - 1  # voxels x=0 (-1) and x=1 (+1) at y=0
    with pytest.raises(ExportError, match="png_bits"):
        png_planes(images[0], 12)


def test_keep_drops_samples_and_privacy_scores_fill_the_column(tmp_path):
    out = _export(tmp_path, _images(4, 2), keep=[True, False, True, False], privacy_scores=[0.1, 0.9, None, 0.8])
    manifest = _manifest(out)
    assert [m["path"] for m in manifest] == ["images/synth_00000_a.nii.gz", "images/synth_00002_a.nii.gz"]
    assert [m["privacy_score"] for m in manifest] == ["0.1", ""]
    assert "2 of 4 samples dropped by the copy filter" in (out / "DATA_CARD.md").read_text()
    with pytest.raises(ExportError, match="keep has 3 entries for 4 samples"):
        _export(tmp_path, _images(4, 2), name="f", keep=[True] * 3)
    with pytest.raises(ExportError, match="nothing to export"):
        _export(tmp_path, _images(2, 2), name="g", keep=[False, False])
    with pytest.raises(ExportError, match="choose one or more of"):
        _export(tmp_path, _images(2, 2), name="h", formats=["jpeg"])
    with pytest.raises(ExportError, match=r"dataset_json=true lists NIfTI files.*add nifti to export.format"):
        _export(tmp_path, _images(2, 2), name="i", formats=["dicom"], dataset_json=True)
    assert not (tmp_path / "i").exists()


@pytest.mark.parametrize("archive", ["tar.gz", "zip"])
def test_share_bundle_is_one_archive_without_provenance(tmp_path, archive):
    report = tmp_path / "privacy_report.md"
    report.write_text("# privacy: pass\n")
    out = _export(
        tmp_path,
        _images(2, 3),
        formats=["nifti", "dicom", "png"],
        profile="share",
        archive=archive,
        dataset_json=True,
        privacy_files=[report],
    )
    bundle = tmp_path / f"e.{archive}"
    digest, name = (tmp_path / f"e.{archive}.sha256").read_text().split()
    assert name == bundle.name and digest == hashlib.sha256(bundle.read_bytes()).hexdigest()
    if archive == "zip":
        members = zipfile.ZipFile(bundle).namelist()
    else:
        members = [m.name for m in tarfile.open(bundle).getmembers() if m.isfile()]
    assert all(m.startswith("e/") for m in members)
    wanted = {"e/manifest.csv", "e/DATA_CARD.md", "e/SHA256SUMS", "e/dataset.json", "e/privacy/privacy_report.md"}
    assert wanted <= set(members)
    assert len(members) == len([p for p in out.rglob("*") if p.is_file()])
    manifest = _manifest(out)
    assert set(manifest[0]) == {"path", "nifti", "dicom", "png", "class_name", "label", "privacy_score", "synthetic"}
    assert "run-7f3a" not in (out / "DATA_CARD.md").read_text()
    sums = dict(line.split("  ")[::-1] for line in (out / "SHA256SUMS").read_text().splitlines())
    assert len(sums) == len(members) - 2  # all but SHA256SUMS and DONE
    for rel, digest in sums.items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["numTraining"] == 2 and dataset["labels"] == {"0": "a", "1": "b"}
    assert all((out / item["image"]).is_file() for item in dataset["training"])
    # the archive is reproducible: packing the same folder again gives the same checksum
    assert archive_folder(out, archive)[1].read_text().split()[0] == digest_of(bundle)


def digest_of(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_refuses_to_overwrite_and_leaves_no_partial(tmp_path):
    window, affine = IntensityWindow(-1, 1), np.eye(4)
    rows = [{"label": 0, "class_name": "a", "seed": 0, "checkpoint_id": "x"}]
    (tmp_path / "e").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_dataset(
            torch.zeros(1, 1, 4, 4),
            rows,
            tmp_path / "e",
            window=window,
            affine=affine,
            card_fields=CARD,
            template=TEMPLATE,
        )
    with pytest.raises(ExportError, match="placeholder"):
        export_dataset(
            torch.zeros(1, 1, 4, 4),
            rows,
            tmp_path / "f",
            window=window,
            affine=affine,
            card_fields={},
            template=TEMPLATE,
        )
    assert not (tmp_path / "f").exists() and [p.name for p in tmp_path.iterdir()] == ["e"]


def test_render_card_fills_every_placeholder():
    text = render_card(
        TEMPLATE, {**CARD, "num_samples": 2, "files": "NIfTI", "filtered": "none", "modality": "CT", "units": "HU"}
    )
    assert "${" not in text and "| m | 1 |" in text


@pytest.mark.parametrize("modality", [None, "MR"])  # None: samples of a checkpoint from before it was recorded
def test_export_stage_writes_every_format_and_the_share_bundle(tmp_path, modality):
    from medaug.atomic import atomic_folder
    from medaug.sampling import samples_id, save_samples
    from pipelines import export as export_stage

    from .conftest import compose_cfg

    images = _images(3, 2)
    rows = [
        dict(
            index=i,
            label=i % 2,
            class_name="ab"[i % 2],
            seed=5 + i,
            guidance_scale=2.0,
            sampler="ddim",
            steps=3,
            checkpoint_id="abc",
        )
        for i in range(3)
    ]
    info = dict(
        checkpoint_id="abc",
        checkpoint_step=4,
        mlflow_run_id="run-7f3a",
        class_names=["a", "b"],
        spatial_dims=2,
        image_shape=[8, 8],
        window=WINDOWS[modality or "CT"].as_dict(),
        affine=AFFINE.tolist(),
        dataset="fp",
        model="M",
        sample=dict(sampler="ddim", steps=3, eta=0.0, guidance_scale=2.0, seed=5),
    )
    if modality:
        info["modality"] = modality
    save_samples(tmp_path / "samples", images, rows, info, ["a", "b"])
    with atomic_folder(tmp_path / "eval") as ev:
        (ev / "metrics.json").write_text(json.dumps({"fidelity/label_acc": 0.5, "privacy/copy_rate": 0.0}))
        (ev / "per_sample.csv").write_text("index,copy_score\n0,0.25\n1,0.3\n2,0.5\n")
        (ev / "privacy.json").write_text(
            json.dumps(
                {"threshold": 0.9, "space": "pixel", "verdict": "pass", "samples_id": samples_id(tmp_path / "samples")}
            )
        )
        (ev / "report.md").write_text("![neighbour](data:image/png;base64,AAAA)\n")  # embeds pixels: never copied
    cfg = compose_cfg(
        "export",
        tmp_path,
        ["tracking=none", "export.format=[nifti,dicom,png]", "export.profile=share", "export.dataset_json=true"],
    )
    result = export_stage.run(cfg)
    out = tmp_path / "export"
    assert result["formats"] == ["nifti", "dicom", "png"] and result["archive"] == str(tmp_path / "export.tar.gz")
    assert (tmp_path / "export.tar.gz.sha256").is_file() and (out / "dataset.json").is_file()
    manifest = _manifest(out)
    assert [m["privacy_score"] for m in manifest] == ["0.25", "0.3", "0.5"] and "seed" not in manifest[0]
    assert sorted(p.name for p in (out / "privacy").iterdir()) == ["metrics.json", "privacy.json"]
    card = (out / "DATA_CARD.md").read_text()
    assert "verdict **pass**: `privacy/copy_rate` 0" in card and "run-7f3a" not in card and "${" not in card
    assert "0 of 3 samples dropped" in card  # the copy filter is on for share exports
    assert all((out / m["dicom"]).is_file() and (out / m["png"]).is_file() for m in manifest)
    ds = pydicom.dcmread(out / manifest[0]["dicom"])
    assert ds.Modality == (modality or "CT") and json.loads((out / "dataset.json").read_text())["modality"] == {
        "0": modality or "CT"
    }


@pytest.mark.parametrize("modality, units", [("CT", "HU"), ("MR", "MR signal, arbitrary units, percentile-normalised")])
def test_nifti_dataset_json_and_card_say_the_modality_and_units(tmp_path, modality, units):
    window = WINDOWS[modality]
    card = {**CARD, "intensity": f"training window [{window.lo:g}, {window.hi:g}] {window.unit}"}
    out = _export(tmp_path, _images(2, 2), modality=modality, dataset_json=True, card_fields=card)
    assert units in nib.load(out / _manifest(out)[0]["nifti"]).header["descrip"].item().decode()
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["modality"] == {"0": modality} and dataset["channel_names"] == {"0": modality}
    card = (out / "DATA_CARD.md").read_text()
    assert f"| modality | {modality} |" in card and units in card
    assert ("HU" in card) == (modality == "CT")


def test_export_modality_falls_back_for_old_checkpoints_and_refuses_what_it_cannot_write(tmp_path):
    from medaug.export import export_modality

    assert export_modality("MR", MR_WINDOW) == "MR" and export_modality("ct", WINDOW) == "CT"
    assert export_modality(None, WINDOW) == "CT"  # a checkpoint from before the modality was recorded: HU is CT
    assert export_modality("", MR_WINDOW) == "MR"  # and "MR a.u." (the percentile normalisation's unit) is MR
    assert export_modality("unknown", IntensityWindow(0, 1, "a.u.")) == "unknown"
    with pytest.raises(ExportError, match="modality is 'PT'.*DICOM of CT or MR only; drop dicom from export.format"):
        _export(tmp_path, _images(1, 2), formats=["dicom"], modality="PT", window=IntensityWindow(0, 10, "SUV"))
    with pytest.raises(ExportError, match="'unknown'.*prepare and train again"):
        _export(tmp_path, _images(1, 2), formats=["dicom"], modality="unknown", window=IntensityWindow(0, 1, "a.u."))
    out = _export(
        tmp_path, _images(1, 2), name="pt", formats=["nifti"], modality="PT", window=IntensityWindow(0, 10, "SUV")
    )
    assert "SUV" in (out / "DATA_CARD.md").read_text()


def _mr_nifti_cases(raw, n=4, size=8):
    rows = []
    for i in range(n):
        array = np.zeros((size, size, 1))
        array[2:6, 2:6] = 100.0 * (i + 1) + np.arange(16).reshape(4, 4, 1)
        write_nifti(raw / f"mr{i}.nii.gz", array, np.eye(4))
        rows.append(f"mr{i}.nii.gz,p{i},{'ab'[i % 2]}")
    (raw / "labels.csv").write_text("path,patient_id,label\n" + "\n".join(rows) + "\n")
    return raw / "labels.csv"


def test_prepare_records_the_modality_from_headers_or_the_normalisation(tmp_path):
    labels = _mr_nifti_cases(tmp_path / "raw")
    kw = dict(spatial_size=[8, 8, -1], spatial_dims=2, split_fractions=(0.5, 0.5, 0.0))
    mr = prepare_dataset(labels, tmp_path / "mr", PercentileNormalization(), **kw)  # NIfTI: "unknown" in the header
    assert mr.modality == "MR" and json.loads((tmp_path / "mr" / "dataset.json").read_text())["modality"] == "MR"
    assert prepare_dataset(labels, tmp_path / "ct", WINDOW, **kw).modality == "CT"  # an HU window
    # DICOM headers say it: an MR series next to a CT series is refused
    raw = tmp_path / "dicom"
    for i, modality in enumerate(["MR", "MR", "CT", "MR"]):
        write_dicom_series(
            raw / f"s{i}",
            np.arange(64.0).reshape(8, 8, 1) + 10 * i,
            np.eye(4),
            {"PatientID": f"p{i}", "PatientIdentityRemoved": "YES", "DeidentificationMethod": "test corpus"},
            modality,
        )
    (raw / "labels.csv").write_text(
        "path,patient_id,label\n" + "\n".join(f"s{i},p{i},{'ab'[i % 2]}" for i in range(4)) + "\n"
    )
    with pytest.raises(DatasetError, match=r"mixed modalities.*CT.*MR.*one modality per dataset"):
        prepare_dataset(raw / "labels.csv", tmp_path / "mixed", PercentileNormalization(), **kw)
    assert not (tmp_path / "mixed").exists()
    # an older dataset.json without it reads as unknown; export then goes by the window's unit
    meta = json.loads((tmp_path / "ct" / "dataset.json").read_text())
    del meta["modality"]
    (tmp_path / "ct" / "dataset.json").write_text(json.dumps(meta))
    assert load_info(tmp_path / "ct").modality == ""


def test_mr_modality_flows_from_prepare_through_train_and_sample_to_the_dicom(tmp_path):
    from pipelines import export as export_stage
    from pipelines import sample as sample_stage
    from pipelines import train as train_stage

    from .conftest import TINY, compose_cfg

    labels = _mr_nifti_cases(tmp_path / "raw", n=4, size=16)
    prepare_dataset(
        labels,
        tmp_path / "prepared",
        PercentileNormalization(),
        spatial_size=[16, 16, -1],
        spatial_dims=2,
        split_fractions=(0.5, 0.5, 0.0),
    )
    overrides = [
        "experiment=demo_2d",
        *TINY,
        "training.max_steps=1",
        "sample.num_per_class=1",
        "sample.steps=1",
        f"paths.prepared_dir={tmp_path}/prepared",
        "export.format=[nifti,dicom]",
        "export.copy_filter=false",
    ]
    for stage in (train_stage, sample_stage, export_stage):
        stage.run(compose_cfg(stage.__name__.split(".")[-1], tmp_path, overrides))
    manifest = _manifest(tmp_path / "export")
    ds = pydicom.dcmread(tmp_path / "export" / manifest[0]["dicom"])
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR" and "RescaleType" not in ds
    assert "| modality | MR |" in (tmp_path / "export" / "DATA_CARD.md").read_text()


# ----------------------------------------------------------------------------- image/label pairs (samples with masks)

SEG_LABELS = {"background": 0, "lesion": 1, "organ": 2}


def _masks(n, spatial_dims, size=8):
    """Label maps (n, 1, *spatial): a lesion box (1) in every sample, an organ box (2) in odd ones."""
    m = torch.zeros(n, 1, *([size] * spatial_dims), dtype=torch.long)
    for i in range(n):
        m[(i, 0, *[slice(1 + i % 3, 4 + i % 3)] * spatial_dims)] = 1
        if i % 2:
            m[(i, 0, *[slice(5, 7)] * spatial_dims)] = 2
    return m


def _seg_rows(n, sources=("generated", "user")):
    return [r | {"mask_source": sources[i % len(sources)]} for i, r in enumerate(_rows(n))]


def _export_pairs(tmp_path, spatial_dims, n=3, name="e", **kwargs):
    images, masks = _images(n, spatial_dims), _masks(n, spatial_dims)
    kwargs.setdefault("formats", ["nifti", "dicom", "png"])
    out = export_dataset(
        images,
        _seg_rows(n),
        tmp_path / name,
        window=WINDOW,
        affine=AFFINE,
        card_fields=CARD,
        template=TEMPLATE,
        masks=masks,
        mask_labels=SEG_LABELS,
        **kwargs,
    )
    return out, images, masks


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_pairs_export_as_an_nnunet_v2_dataset(tmp_path, spatial_dims):
    out, images, masks = _export_pairs(tmp_path, spatial_dims, n=4, formats=["nifti"], keep=[True, False, True, True])
    dataset = json.loads((out / "dataset.json").read_text())
    # what nnU-Net v2 requires of dataset.json
    assert dataset["channel_names"] == {"0": "CT"} and dataset["file_ending"] == ".nii.gz"
    assert dataset["labels"] == SEG_LABELS and dataset["labels"]["background"] == 0
    assert sorted(dataset["labels"].values()) == list(range(len(dataset["labels"])))  # consecutive
    assert dataset["numTraining"] == 3  # the dropped sample is not listed
    assert not (out / "images").exists()
    # nnU-Net's pairing: imagesTr/<case>_0000.nii.gz (one channel) <-> labelsTr/<case>.nii.gz, nothing else
    images_tr = sorted(p.name for p in (out / "imagesTr").iterdir())
    labels_tr = sorted(p.name for p in (out / "labelsTr").iterdir())
    assert len(images_tr) == len(labels_tr) == dataset["numTraining"]
    assert [n.removesuffix("_0000.nii.gz") for n in images_tr] == [n.removesuffix(".nii.gz") for n in labels_tr]
    manifest = _manifest(out)
    assert [m["index"] for m in manifest] == ["0", "2", "3"]
    assert [m["mask_source"] for m in manifest] == ["generated", "generated", "user"]
    for m, i in zip(manifest, (0, 2, 3)):
        image, label = nib.load(out / m["nifti"]), nib.load(out / m["mask"])
        assert label.get_data_dtype() == np.uint8 and label.shape == image.shape
        np.testing.assert_array_equal(label.affine, image.affine)  # the same geometry
        np.testing.assert_allclose(label.affine, AFFINE)
        labels = np.asarray(label.dataobj)
        np.testing.assert_array_equal(labels.reshape(masks[i, 0].shape), masks[i, 0].numpy())
        assert set(np.unique(labels).tolist()) <= set(dataset["labels"].values())
        np.testing.assert_allclose(
            read_volume(out / m["nifti"]).array.reshape(-1), WINDOW.to_source(images[i].reshape(-1).numpy()), atol=1e-3
        )
    assert {"image": f"./{manifest[0]['nifti']}", "label": f"./{manifest[0]['mask']}", "class_name": "a"} in dataset[
        "training"
    ]
    card = (out / "DATA_CARD.md").read_text()
    assert "labelsTr" in card and "imagesTr" in card and "${" not in card
    assert "(masks: 2 generated, 1 user)" in card


@pytest.mark.parametrize(
    "spatial_dims, multiframe", [(2, False), (3, False), (3, True)], ids=["2d", "3d-series", "3d-enhanced"]
)
def test_dicom_seg_references_the_exported_series(tmp_path, spatial_dims, multiframe):
    import highdicom as hd

    out, _, masks = _export_pairs(tmp_path, spatial_dims, formats=["dicom"], dicom_multiframe=multiframe)
    for i, row in enumerate(_manifest(out)):
        source = out / row["dicom"]
        files = [source] if source.is_file() else sorted(source.glob("*.dcm"))
        images = [pydicom.dcmread(f) for f in files]
        seg = pydicom.dcmread(out / row["dicom_seg"])
        assert seg.SOPClassUID == pydicom.uid.SegmentationStorage and seg.Modality == "SEG"
        assert seg.StudyInstanceUID == images[0].StudyInstanceUID and seg.PatientID == f"SYN{i:05d}"
        assert seg.FrameOfReferenceUID == images[0].FrameOfReferenceUID
        assert seg.SeriesInstanceUID != images[0].SeriesInstanceUID
        (ref,) = seg.ReferencedSeriesSequence
        assert ref.SeriesInstanceUID == images[0].SeriesInstanceUID
        referenced = {item.ReferencedSOPInstanceUID for item in ref.ReferencedInstanceSequence}
        assert referenced == {ds.SOPInstanceUID for ds in images}  # every instance of the series
        sources = {
            s.ReferencedSOPInstanceUID
            for frame in seg.PerFrameFunctionalGroupsSequence
            for s in frame.DerivationImageSequence[0].SourceImageSequence
        }
        slices = masks[i, 0].reshape(*masks.shape[2:4], -1).flatten(0, 1).any(0).tolist()  # which hold a segment
        used = [ds for ds, k in zip(images * len(slices) if multiframe else images, slices) if k]
        assert sources == {ds.SOPInstanceUID for ds in used}  # enhanced: its frames, of the one instance
        # one segment per foreground label, named; generated masks by an algorithm, given ones by hand
        present = sorted(set(masks[i].unique().tolist()) - {0})
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion", "organ"]
        assert [s.SegmentNumber for s in seg.SegmentSequence] == [1, 2]
        assert {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {("AUTOMATIC", "MANUAL")[i % 2]}
        assert "SYNTHETIC" in seg.SeriesDescription and seg.PatientIdentityRemoved == "YES"
        # the frames hold the mask where the image's slices are
        stack = hd.seg.Segmentation.from_dataset(seg)
        if multiframe:
            pixels = stack.get_pixels_by_source_frame(
                source_sop_instance_uid=images[0].SOPInstanceUID,
                source_frame_numbers=list(range(1, masks.shape[-1] + 1)),
                combine_segments=True,
                assert_missing_frames_are_empty=True,
            )
        else:
            pixels = stack.get_pixels_by_source_instance(
                source_sop_instance_uids=[ds.SOPInstanceUID for ds in images],
                combine_segments=True,
                assert_missing_frames_are_empty=True,
            )
        expected = masks[i, 0].numpy().reshape(*masks.shape[2:4], -1).transpose(2, 1, 0)  # (Z, rows, cols)
        np.testing.assert_array_equal(pixels, expected)
        assert present == sorted(set(np.unique(pixels).tolist()) - {0})


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dicom3tools' dciodvfy is not installed")
@pytest.mark.parametrize(
    "modality, spatial_dims, multiframe", [("CT", 3, False), ("MR", 3, False), ("CT", 2, False), ("MR", 3, True)]
)
def test_dicom_seg_passes_dciodvfy(tmp_path, modality, spatial_dims, multiframe):
    images, masks = _images(2, spatial_dims), _masks(2, spatial_dims)
    masks[1] = 0  # an empty mask still makes a valid object
    out = export_dataset(
        images,
        _seg_rows(2),
        tmp_path / "e",
        window=WINDOWS[modality],
        affine=AFFINE,
        card_fields=CARD,
        template=TEMPLATE,
        formats=["dicom"],
        modality=modality,
        dicom_multiframe=multiframe,
        masks=masks,
        mask_labels=SEG_LABELS,
    )
    for row in _manifest(out):
        assert dciodvfy_problems(out / row["dicom_seg"], "Segmentation") == []  # no error, no warning either


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_png_overlays_outline_each_label_in_its_colour(tmp_path, spatial_dims):
    from medaug.export import LABEL_RGB, overlay_planes

    out, images, masks = _export_pairs(tmp_path, spatial_dims, n=2, formats=["png"])
    row = _manifest(out)[1]
    files = row["png_overlay"].split(";")
    assert len(files) == (1 if spatial_dims == 2 else 3) and all("_overlay" in f for f in files)
    rgb = np.asarray(Image.open(out / files[0]))
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.shape[0] >= 128
    np.testing.assert_array_equal(rgb, next(iter(overlay_planes(images[1], masks[1]).values())))
    colours = {tuple(c) for f in files for c in np.asarray(Image.open(out / f)).reshape(-1, 3).tolist()}
    assert tuple(LABEL_RGB[0]) in colours  # the lesion's outline; 2D: the organ's too (3D: not in these planes)
    assert (tuple(LABEL_RGB[1]) in colours) == (spatial_dims == 2)
    for f in files:  # 3D: every plane is a slice with the most mask, so each shows the lesion
        assert tuple(LABEL_RGB[0]) in {tuple(c) for c in np.asarray(Image.open(out / f)).reshape(-1, 3).tolist()}
    if spatial_dims == 2:  # (3D overlays show the slices with the most mask, the previews the middle ones)
        grey = np.asarray(Image.open(out / row["png"]))
        scale = rgb.shape[0] // grey.shape[0]
        background = rgb[:scale, :scale]  # the top-left voxel is background: the plain image, grey
        assert (background == grey[0, 0]).all()


def test_pairs_refuse_what_segmenters_could_not_read(tmp_path):
    images, masks = _images(2, 2), _masks(2, 2)
    kw = dict(window=WINDOW, affine=AFFINE, card_fields=CARD, template=TEMPLATE)
    with pytest.raises(ExportError, match="masks have shape"):
        export_dataset(images, _seg_rows(2), tmp_path / "a", masks=masks[:1], **kw)
    with pytest.raises(ExportError, match="must name background 0 and every value"):
        export_dataset(images, _seg_rows(2), tmp_path / "b", masks=masks, mask_labels={"background": 0, "x": 1}, **kw)
    out = export_dataset(images, _seg_rows(2), tmp_path / "c", masks=masks, **kw)  # unnamed labels: label_<k>
    assert json.loads((out / "dataset.json").read_text())["labels"] == {"background": 0, "label_1": 1, "label_2": 2}
    plain = _export(tmp_path, images, name="d", formats=["nifti", "dicom", "png"])  # no masks: as before
    assert (plain / "images").is_dir() and not (plain / "labelsTr").exists() and not (plain / "dataset.json").exists()
    assert not list((plain / "dicom").glob("*_seg.dcm")) and "mask" not in _manifest(plain)[0]


def test_export_stage_exports_the_pairs_the_copy_filter_keeps(tmp_path):
    from medaug.atomic import atomic_folder
    from medaug.sampling import samples_id, save_samples
    from pipelines import export as export_stage

    from .conftest import compose_cfg
    from .test_segmentation import add_sample_masks

    images, masks = _images(3, 2), _masks(3, 2)
    masks[masks == 2] = 1  # the contract's demo: one label, lesion
    info = dict(
        checkpoint_id="abc",
        checkpoint_step=4,
        class_names=["a", "b"],
        spatial_dims=2,
        image_shape=[8, 8],
        window=WINDOW.as_dict(),
        affine=AFFINE.tolist(),
        model="M",
        sample=dict(sampler="ddim", steps=3, eta=0.0, guidance_scale=2.0, seed=5),
    )
    save_samples(tmp_path / "samples", images, _rows(3), info, ["a", "b"])
    add_sample_masks(tmp_path / "samples", masks)
    with atomic_folder(tmp_path / "eval") as ev:
        (ev / "metrics.json").write_text(json.dumps({"privacy/copy_rate": 0.33}))
        (ev / "per_sample.csv").write_text("index,copy_score\n0,0.25\n1,0.95\n2,0.5\n")  # sample 1 is a copy
        (ev / "privacy.json").write_text(
            json.dumps(  # the share gate lets a warn verdict through
                {"threshold": 0.9, "space": "pixel", "verdict": "warn", "samples_id": samples_id(tmp_path / "samples")}
            )
        )
    overrides = ["tracking=none", "export.format=[nifti,dicom]", "export.profile=share", "export.regenerate=false"]
    export_stage.run(compose_cfg("export", tmp_path, overrides))
    out = tmp_path / "export"
    manifest = _manifest(out)
    assert [m["class_name"] for m in manifest] == ["a", "a"] and [m["mask_source"] for m in manifest] == [
        "generated"
    ] * 2
    for m, i in zip(manifest, (0, 2)):  # each kept image with its own mask
        labels = np.asarray(nib.load(out / m["mask"]).dataobj)[:, :, 0]
        np.testing.assert_array_equal(labels, masks[i, 0].numpy())
        assert [s.SegmentLabel for s in pydicom.dcmread(out / m["dicom_seg"]).SegmentSequence] == ["lesion"]
    assert json.loads((out / "dataset.json").read_text())["labels"] == {"background": 0, "lesion": 1}
    with tarfile.open(tmp_path / "export.tar.gz") as tar:
        assert "export/labelsTr/synth_00001_a.nii.gz" in tar.getnames()

"""Prepared datasets: labels in, canonical cache + manifest out, patient-level splits.

A prepared dataset is a folder::

    dataset.json   spatial dims, image shape, class names (index = position), intensity
                   window for export, normalisation, geometry, de-identification policy, summary
    manifest.csv   item_id, path, patient (pseudonym), label, class_name, split,
                   source_lo/source_hi (the item's window: [-1, 1] ↔ source units)
    deid_log.csv   with prepare.deid=strip|trust: file pseudonym, tag, why, action (no values)
    items/         one NIfTI per item, in model space [-1, 1], with its affine
    masks/         when every case has a mask: one uint8 label map per item on the item's grid (0 = background),
                   named in the manifest's ``mask`` column; dataset.json ``labels`` names the values
    DONE           written last: a folder without it is never trusted

Labels come as a CSV (path or SeriesInstanceUID, patient_id, label, optional split and
mask), a folder-per-class tree, or an MSD/nnU-Net ``dataset.json`` (:func:`read_cases`).
Patient identifiers are only used to split; the manifest holds pseudonyms
(``patient_0001``…) in order of first appearance. Nothing from a DICOM header but
geometry and the allow-listed basics of :mod:`medaug.deid` reaches any output.

Example::

    summary = prepare_dataset("raw/labels.csv", "prepared", window, spatial_size=(32, 32, 1), spatial_dims=2)
    images, labels = load_split("prepared", "train")      # (N, 1, 32, 32) in [-1, 1], (N,)
    masks = load_split_masks("prepared", "train")         # (N, 1, 32, 32) int64 label maps, or None
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np

from ..dicomweb import fetch_series
from ..deid import POLICIES, apply_policy, scan_headers
from ..atomic import atomic_folder, is_complete
from ..io import DicomIndex, DicomSeries, index_dicom, is_nifti, read_dicom_series, read_volume, write_nifti
from ..preprocessing import IntensityWindow, Normalization, PercentileNormalization, preprocess_case, slice_volume
from .labels import (
    Case,
    declared_mask_labels,
    mask_label_names,
    DEID_REPORT,
    DatasetError,
    MANIFEST_FIELDS,
    SPLITS,
    _looks_like_uid,
    read_cases,
    split_patients,
)
from .prepared import PreparedInfo, load_info
from ..progress import progress_bar

log = logging.getLogger("medaug")


def _labels_root(labels: Path) -> Path:
    return labels if labels.is_dir() else labels.parent


def fingerprint(labels: Path, params: dict, cases: list[Case] | None = None, dicom_root: Path | None = None) -> str:
    """Hash of the labels file, the files its cases name (size and mtime) and the preparation parameters."""
    labels = Path(labels)
    root = _labels_root(labels)
    cases = read_cases(labels) if cases is None else cases
    h = hashlib.sha256(labels.read_bytes() if labels.is_file() else b"folders")
    sources = {root / c.source for c in cases if not _looks_like_uid(c.source)}
    sources |= {root / c.mask for c in cases if c.mask}
    if any(_looks_like_uid(c.source) for c in cases):
        sources.add(Path(dicom_root) if dicom_root else root)
        h.update("".join(sorted(c.source for c in cases)).encode())
    for path in sorted(sources):
        for p in sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path]:
            stat = p.stat()
            h.update(f"{p}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:16]


SLICE_RULES = ("all", "central", "nonempty")


def _slice_indices(depth: int, rule: str, band: float, mask: np.ndarray | None = None) -> list[int]:
    """Which slices (array axis 2) of a volume become 2D items: all, a central band, or where the mask is non-empty."""
    if rule not in SLICE_RULES:
        raise DatasetError(f"slice rule {rule!r} unknown; use one of {', '.join(SLICE_RULES)}")
    if rule == "nonempty":
        if mask is None:
            raise DatasetError(
                "slice rule 'nonempty' needs a mask per image: add a 'mask' column to the labels "
                "CSV (or labels in dataset.json), or use data.slice_rule=central|all"
            )
        return [k for k in range(depth) if mask[:, :, k].any()]
    if rule == "all" or depth == 1:
        return list(range(depth))
    half = max(1, int(round(depth * band / 2)))
    mid = depth // 2
    return list(range(max(0, mid - half), min(depth, mid + half)))


@dataclass
class _Item:
    """A resolved case: a NIfTI file or one DICOM series, ready to read, with the DICOM headers of every
    file that reading it (and its mask) will open."""

    case: Case
    path: Path | None = None
    series: DicomSeries | None = None
    headers: dict = field(default_factory=dict)  # file -> header (no pixel data), image and mask

    def __post_init__(self):
        if self.series is not None:
            self.headers.update(zip(self.series.files, self.series.headers))


def _resolve(cases: list[Case], root: Path, dicom_root: Path | None, strict: bool) -> tuple[list[_Item], DicomIndex]:
    """Find the files of every case; DICOM headers are read here (no pixel data). A file in a class folder
    that is no image (notes.txt) is skipped and listed like a stray file in a DICOM folder. One series (or
    one DICOM instance) reached by two entries is refused: it would pass the gate once and could put one
    patient's image into two patients and two splits."""
    items, seen = [], DicomIndex()
    uid_index = None
    series_file: dict[str, Path] = {}  # folder-per-class: series UID → the first file case holding it
    for case in progress_bar(cases, desc="index", unit="case", leave=False):
        if _looks_like_uid(case.source) and not (root / case.source).exists():
            if uid_index is None:
                uid_index = index_dicom(dicom_root or root, strict=strict)
                seen.skipped += uid_index.skipped
            series = uid_index.series.get(case.source)
            if series is None:
                raise DatasetError(
                    f"{case.where}: no DICOM series with SeriesInstanceUID {case.source} under "
                    f"{dicom_root or root}; check the UID or set data.dicom_root"
                )
            items.append(_Item(case, series=series))
            seen.series[series.uid] = series
            continue
        path = root / case.source
        if is_nifti(path):
            items.append(_Item(case, path=path))
            continue
        index = index_dicom(path, strict=strict)
        seen.skipped += index.skipped
        if not index.series and case.many_series and path.is_file():
            continue  # a stray file in a class folder (notes.txt): skipped and listed like any other
        if not index.series:
            why = "; ".join(sorted({w for _, w in index.skipped})) or "empty"
            raise DatasetError(f"{case.where}: {path} holds no readable image ({why}); fix or remove this entry")
        if len(index.series) > 1 and not case.many_series:
            raise DatasetError(
                f"{case.where}: {path} holds {len(index.series)} DICOM series; name one per row "
                "by its SeriesInstanceUID in the path column, or give each series its own folder"
            )
        for series in index.series.values():
            if case.many_series and path.is_file():
                first = series_file.setdefault(series.uid, path)
                if first != path:
                    raise DatasetError(
                        f"{path.parent}: {first.name} and {path.name} are slices of one DICOM series; each "
                        "patient's series must be in its own folder inside the class folder "
                        "(<labels>/<class>/<patient>/<files>); loose in a class folder, every slice would count "
                        "as a patient"
                    )
            items.append(_Item(case, series=series))
            seen.series[series.uid] = series
    for item in items:
        if item.case.mask and not is_nifti(root / item.case.mask):  # a DICOM mask's headers pass the gate too
            mask_index = index_dicom(root / item.case.mask, strict=strict)
            seen.skipped += mask_index.skipped
            item.headers.update(mask_index.headers)
    _refuse_shared_dicom(items)
    return items, seen


def _refuse_shared_dicom(items: list[_Item]) -> None:
    """Refuse one DICOM series, or one instance (SOPInstanceUID, a copied file), reached by two entries."""
    owner: dict[tuple[str, str], _Item] = {}
    for item in items:
        if item.series is None:
            continue
        keys = [("series", item.series.uid)]
        keys += [("instance", str(h.SOPInstanceUID)) for h in item.series.headers if "SOPInstanceUID" in h]
        for kind, uid in dict.fromkeys(keys):
            first = owner.setdefault((kind, uid), item)
            if first is not item:
                what = f"DICOM series {uid}" if kind == "series" else f"DICOM instance {uid} (a copy of one file)"
                here, there = (it.case.where or str(it.case.source) for it in (item, first))
                if here.rpartition(":")[0] == there.rpartition(":")[0]:  # rows of one labels file
                    there = f"row {there.rpartition(':')[2]}"
                raise DatasetError(
                    f"{here}: {what} is also reached by {there}; each series may be listed once, "
                    "under one patient: remove the duplicate entry or the copied files"
                )


def _reason(why: str) -> str:
    """A skip reason without details that could echo file content."""
    return why.split(" (")[0].split(":")[0]


def prepare_dataset(
    labels_csv: str | Path,
    out_dir: str | Path,
    window: Normalization,
    spatial_size: Sequence[int],
    spatial_dims: int,
    pixdim: Sequence[float] | None = None,
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    slice_rule: str = "central",
    slice_band: float = 0.5,
    seed: int = 0,
    *,
    deid: str = "refuse",
    strict: bool = False,
    uneven_spacing: str = "error",
    volume_index: int | None = None,
    crop: str = "center",
    class_names: Sequence[str] | None = None,
    dicom_root: str | Path | None = None,
    deid_report: str | Path | None = None,
    dicomweb: Mapping | None = None,
    mask_labels: Mapping[str, int] | None = None,
) -> PreparedInfo:
    """Read every labelled image, pass the de-identification gate, preprocess and write the prepared dataset.

    ``labels_csv`` is a labels CSV, a folder-per-class root or an MSD/nnU-Net ``dataset.json``
    (see :func:`read_cases`). Every DICOM header is scanned by :mod:`medaug.deid` before any
    pixel data is read; ``deid`` is the policy (refuse | strip | trust). ``window`` is a
    fixed :class:`IntensityWindow` (CT) or a :class:`PercentileNormalization` (MR).
    For ``spatial_dims=2`` each volume gives slices along array axis 2 chosen by
    ``slice_rule`` (all | central | nonempty, the last needs masks); a 2D input gives its one
    slice. ``class_names`` fixes the classes and their order (indices); by default the sorted
    names found. If ``out_dir`` already holds a complete dataset prepared from the same
    files and parameters, it is reused as is (no DICOM is read).

    A refusal by the gate raises :class:`medaug.deid.PHIError` in one line and lists every finding
    (file, tag, why; no values) in ``deid_report`` (default ``<out_dir's parent>/deid_report.csv``, beside
    the job's folders, never inside the prepared dataset or MLflow).

    ``dicomweb`` (``url``, ``cache_dir``, optional ``query``, ``label_column``, ``netrc``, ``retries``,
    ``backoff_s``, ``timeout_s``): first fetch the series that ``labels_csv`` names (or the query finds) from a
    DICOMweb server into ``cache_dir`` (:func:`medaug.dicomweb.fetch_series`, gate before pixel data), then
    prepare from that cache like from a folder.

    ``mask_labels`` (``{name: value}``, e.g. ``{"lesion": 1}``) names the mask values as they are (a value it
    does not name is refused); default: an MSD / nnU-Net ``dataset.json``'s labels, else ``label_<k>``.
    """
    if dicomweb is not None:
        report = Path(deid_report) if deid_report else Path(out_dir).parent / DEID_REPORT
        labels_csv = fetch_series(labels=labels_csv, deid=deid, report_path=report, **dicomweb)
    labels_csv, out_dir = Path(labels_csv), Path(out_dir)
    root = _labels_root(labels_csv)
    dicom_root = Path(dicom_root) if dicom_root else None
    if slice_rule not in SLICE_RULES:
        raise DatasetError(f"slice rule {slice_rule!r} unknown; use one of {', '.join(SLICE_RULES)}")
    params = dict(
        window=window.as_dict(),
        spatial_size=list(spatial_size),
        spatial_dims=spatial_dims,
        pixdim=None if pixdim is None else list(pixdim),
        split=list(split_fractions),
        slice_rule=slice_rule,
        slice_band=slice_band,
        seed=seed,
        deid=deid,
        strict=strict,
        uneven_spacing=uneven_spacing,
        volume_index=volume_index,
        crop=crop,
        class_names=None if class_names is None else list(class_names),
    )
    declared = declared_mask_labels(mask_labels) if mask_labels else None
    if declared:  # only when given: datasets prepared before keep their fingerprint
        params["mask_labels"] = {name: value for value, name in sorted(declared.items())}
    if deid not in POLICIES:
        raise DatasetError(f"prepare.deid={deid!r}; choose one of {', '.join(POLICIES)}")
    cases = read_cases(labels_csv)
    with_masks = all(c.mask for c in cases)  # label maps are stored only when every case has one
    if with_masks:
        params["masks"] = "label maps"  # a dataset prepared before masks were stored is not reused
    elif any(c.mask for c in cases):
        warnings.warn(
            f"{labels_csv}: {sum(1 for c in cases if c.mask)} of {len(cases)} entries have a mask; masks are "
            "stored only when every entry has one (they still choose slices and crops): add the missing masks",
            stacklevel=2,
        )
    fp = fingerprint(labels_csv, params, cases, dicom_root)
    if is_complete(out_dir):
        info = load_info(out_dir)
        if info.fingerprint == fp:
            return info

    found = sorted({c.label for c in cases})
    if class_names is not None:
        unknown = [c for c in cases if c.label not in class_names]
        if unknown:
            raise DatasetError(
                f"{unknown[0].where}: unknown class {unknown[0].label!r} ({len(unknown)} entries); "
                f"data.classes lists {list(class_names)}: fix the label or add the class"
            )
        empty = [name for name in class_names if name not in found]
        if empty:
            raise DatasetError(
                f"{labels_csv}: class {empty[0]!r} has no images; add images or drop it from data.classes"
            )
    class_names = list(class_names) if class_names is not None else found
    class_index = {name: i for i, name in enumerate(class_names)}

    items, index = _resolve(cases, root, dicom_root, strict)
    cases = list({id(item.case): item.case for item in items}.values())  # without the files skipped
    headers = {f: h for item in items for f, h in item.headers.items()}
    findings = scan_headers(headers)  # the gate: every file to be read, no pixels yet
    report = Path(deid_report) if deid_report else out_dir.parent / DEID_REPORT
    deid_log = apply_policy(findings, deid, report_path=report)
    report.unlink(missing_ok=True)  # a refusal's report of earlier files no longer describes the input
    if deid == "trust":
        log.warning(
            "de-identification gate set to 'trust': %d header findings in %d files let through as you "
            "said (listed in deid_log.csv, recorded in dataset.json and on the data card)",
            len(findings),
            len({f.file for f in findings}),
        )

    pseudonyms: dict[str, str] = {}
    for case in cases:
        pseudonyms.setdefault(case.patient_id, f"patient_{len(pseudonyms) + 1:04d}")
    patient_class = {}
    for case in cases:
        patient_class.setdefault(pseudonyms[case.patient_id], case.label)
    explicit = {}
    for case in cases:
        if case.split and explicit.setdefault(pseudonyms[case.patient_id], case.split) != case.split:
            raise DatasetError(
                f"{case.where}: patient is given splits {explicit[pseudonyms[case.patient_id]]!r} and "
                f"{case.split!r}; a patient belongs to one split: fix the split column"
            )
    assignment = split_patients(patient_class, split_fractions, seed)
    assignment.update(explicit)

    manifest, affine, windows, source_slices, spacings, modalities = [], None, [], 0, [], {}
    mask_values: set[int] = set()
    with atomic_folder(out_dir) as tmp:
        (tmp / "items").mkdir()
        if with_masks:
            (tmp / "masks").mkdir()
        for item in progress_bar(items, desc="prepare", unit="image"):
            case = item.case
            where = case.where or str(item.path)
            if item.series is not None:
                volume = read_dicom_series(item.series.files, source=item.series.files[0].parent, uneven=uneven_spacing)
            else:
                volume = read_volume(item.path, volume_index=volume_index)
            if spatial_dims == 3 and volume.array.shape[2] == 1:
                raise DatasetError(
                    f"{where}: a single-slice image cannot train a 3D model; use data.spatial_dims=2 "
                    "or supply the complete series"
                )
            if np.ptp(volume.array) == 0:
                warnings.warn(f"{where}: constant image (every voxel {volume.array.flat[0]:g})", stacklevel=2)
            mask = None
            if case.mask:
                mask = read_volume(root / case.mask, volume_index=volume_index).array
                if mask.shape != volume.array.shape:
                    raise DatasetError(
                        f"{where}: mask shape {mask.shape} differs from image shape "
                        f"{volume.array.shape}; masks must be on the image's grid"
                    )
            prepared = preprocess_case(volume, window, spatial_size, pixdim, mask=mask, crop=crop)
            modalities.setdefault(_modality_of(volume.meta.get("modality", ""), window), where)
            if len(modalities) > 1:
                raise DatasetError(
                    f"{labels_csv}: mixed modalities "
                    + ", ".join(f"{m} ({w})" for m, w in sorted(modalities.items()))
                    + "; prepare one modality per dataset (export writes one modality on every image)"
                )
            source_slices += volume.array.shape[2]
            windows.append(prepared.window)
            vol = prepared.volume
            spacings.append((item.path or item.series.files[0].parent, vol.spacing))  # mm along RAS axes
            if spatial_dims == 3:
                keep = [None]
            else:
                keep = _slice_indices(vol.array.shape[2], slice_rule, slice_band, prepared.mask)
                if not keep:
                    warnings.warn(f"{where}: no slice passes slice rule {slice_rule!r}; image skipped", stacklevel=2)
            patient = pseudonyms[case.patient_id]
            for k in keep:
                piece = vol if k is None else slice_volume(vol, k)
                item_id = f"item_{len(manifest):05d}"
                write_nifti(tmp / "items" / f"{item_id}.nii.gz", piece.array, piece.affine)
                affine = piece.affine if affine is None else affine
                row = dict(
                    item_id=item_id,
                    path=f"items/{item_id}.nii.gz",
                    patient=patient,
                    label=class_index[case.label],
                    class_name=case.label,
                    split=assignment[patient],
                    source_lo=f"{prepared.window.lo:.6g}",
                    source_hi=f"{prepared.window.hi:.6g}",
                )
                if with_masks:
                    label_map = prepared.mask if k is None else prepared.mask[:, :, k : k + 1]
                    mask_values |= _check_label_values(label_map, root / case.mask)
                    row["mask"] = f"masks/{item_id}.nii.gz"
                    write_nifti(tmp / row["mask"], label_map, piece.affine, dtype=np.uint8)
                manifest.append(row)
        _check_one_spacing(spacings, pixdim, spatial_dims)
        if not manifest:
            raise DatasetError(
                f"{labels_csv}: no images left after preparation (slice rule {slice_rule!r}); "
                "check the masks or use data.slice_rule=central"
            )
        counts = {s: dict(Counter(m["class_name"] for m in manifest if m["split"] == s)) for s in SPLITS}
        for name in class_names:
            if not counts["train"].get(name):
                raise DatasetError(f"{labels_csv}: class {name!r} has no training images; add images or drop the class")
        patients = Counter(patient_class.values())
        for name in class_names:
            if not counts["val"].get(name) and not counts["test"].get(name):
                log.warning(
                    "class %r: all its %d patient(s) are in train, no held-out (val/test) image of it: "
                    "evaluate cannot measure it; add patients of this class",
                    name,
                    patients[name],
                )
        if len(class_names) == 1:
            log.warning(
                "one class (%r): evaluate's classifier metrics need two classes (with one, label accuracy "
                "is trivially 1 and kappa and AUC are undefined); add a second class",
                class_names[0],
            )
        shape = [int(v) for v in nib.load(tmp / manifest[0]["path"]).shape]
        image_shape = shape[:2] if spatial_dims == 2 else shape
        mask_labels = (
            _mask_labels(tmp, manifest, mask_values, declared or mask_label_names(labels_csv)) if with_masks else {}
        )
        with open(tmp / "manifest.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS + (["mask"] if with_masks else []))
            writer.writeheader()
            writer.writerows(manifest)
        if deid_log:
            with open(tmp / "deid_log.csv", "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=["file", "tag", "reason", "action"])
                writer.writeheader()
                writer.writerows(deid_log)
        dataset_window = _dataset_window(window, windows)
        summary = dict(
            patients=len(pseudonyms),
            images=len(items),
            series=len(index.series),
            source_slices=source_slices,
            items=len(manifest),
            classes={n: sum(1 for m in manifest if m["class_name"] == n) for n in class_names},
            skipped_files=len(index.skipped),
            skipped_why=dict(Counter(_reason(w) for _, w in index.skipped)),
        )
        meta = dict(
            format="medaug-prepared/1",
            spatial_dims=spatial_dims,
            image_shape=image_shape,
            class_names=class_names,
            window=dataset_window.as_dict(),
            normalization=window.as_dict(),
            modality=next(iter(modalities), "unknown"),
            affine=np.asarray(affine).tolist(),
            counts=counts,
            fingerprint=fp,
            params=params,
            deid=dict(
                policy=deid,
                findings=len(findings),
                files=len({f.file for f in findings}),
                log="deid_log.csv" if deid_log else None,
            ),
            summary=summary,
        )
        if with_masks:
            meta["labels"] = mask_labels  # nnU-Net v2 style: name -> value
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
    info = load_info(out_dir)
    info.skipped = [(str(p), why) for p, why in index.skipped]
    return info


def _check_label_values(label_map: np.ndarray, source: Path) -> set[int]:
    """The values of a prepared label map; refuses values a uint8 label map cannot hold."""
    values = {int(v) for v in np.unique(label_map)}
    if min(values) < 0 or max(values) > 255:
        raise DatasetError(
            f"{source}: mask values {min(values)}..{max(values)}; a label map holds integers 0..255 "
            "(0 = background): relabel the mask"
        )
    return values


def _mask_labels(root: Path, manifest: list[dict], found: set[int], declared: dict[int, str]) -> dict[str, int]:
    """``{"background": 0, name: value, ...}`` of the prepared masks (nnU-Net v2 style).

    ``declared`` (``data.mask_labels``, or an MSD / nnU-Net dataset.json's labels) names the values as they are; a
    value it does not
    declare is refused. Without it the values found become 1..K in sorted order (a 0/255 mask is stored as
    0/1; the mask files are rewritten) and are named ``label_<k>``."""
    if declared:
        unknown = sorted(found - set(declared))
        if unknown:
            raise DatasetError(
                f"masks hold values {unknown} that the declared labels (data.mask_labels, or dataset.json's labels) do "
                f"not name ({declared}); add them to those labels"
            )
        names = {0: "background", **declared}
        return {names[v]: v for v in sorted(names)}
    foreground = sorted(found - {0})
    lookup = np.zeros(256, dtype=np.uint8)
    lookup[foreground] = np.arange(1, len(foreground) + 1)
    if foreground != list(range(1, len(foreground) + 1)):
        log.info("mask values %s stored as %s", foreground, list(range(1, len(foreground) + 1)))
        for row in manifest:
            img = nib.load(root / row["mask"])
            label_map = lookup[np.asarray(img.dataobj, dtype=np.uint8)]
            write_nifti(root / row["mask"], label_map, img.affine, dtype=np.uint8)
    return {"background": 0, **{f"label_{k}": k for k in range(1, len(foreground) + 1)}}


def _check_one_spacing(spacings: list[tuple[Path, tuple]], pixdim: Sequence[float] | None, spatial_dims: int) -> None:
    """Refuse images whose voxel spacing (mm, on the axes the model sees that ``pixdim`` leaves as they are)
    differs by more than 1 %: the model would mix scales, and export writes one spacing on every image."""
    if not spacings:
        return
    sources, values = [s for s, _ in spacings], np.array([v for _, v in spacings])[:, :spatial_dims]
    for axis in range(spatial_dims):
        if pixdim is not None and pixdim[axis] > 0:
            continue
        lo, hi = int(np.argmin(values[:, axis])), int(np.argmax(values[:, axis]))
        if values[hi, axis] > 1.01 * values[lo, axis]:
            mm = ["x".join(f"{v:.4g}" for v in values[k]) for k in (lo, hi)]
            median = ",".join(f"{v:.4g}" for v in np.median(values, axis=0))
            raise DatasetError(
                f"images differ in voxel spacing: {sources[lo]} {mm[0]} mm and {sources[hi]} {mm[1]} "
                "mm; with data.pixdim=null all must share one (export writes one spacing on every "
                f"image): resample to one, e.g. the median data.pixdim=[{median}]"
            )


def _modality_of(header_modality: str, norm: Normalization) -> str:
    """A volume's modality: its DICOM header's, else (NIfTI: "unknown") what the normalisation implies
    (MR percentiles → MR, an HU window → CT), else "unknown"."""
    if header_modality and header_modality.lower() != "unknown":
        return header_modality.upper()
    if isinstance(norm, PercentileNormalization):
        return "MR"
    return "CT" if norm.unit == "HU" else "unknown"


def _dataset_window(norm: Normalization, windows: list[IntensityWindow]) -> IntensityWindow:
    """The window stored for export: the CT window itself, or the median MR percentile window of the items."""
    if isinstance(norm, IntensityWindow):
        return norm
    return IntensityWindow(
        float(np.median([w.lo for w in windows])), float(np.median([w.hi for w in windows])), norm.unit
    )

"""DICOMweb (PACS) in and out: fetch labelled series into a local cache, store exported series with STOW-RS.

Ingest (:func:`fetch_series`): the series named by a labels CSV (``SeriesInstanceUID`` or ``series_uid``,
optional ``StudyInstanceUID``/``study_uid``, ``label``, optional ``patient_id`` and ``split``) or found by
a QIDO-RS ``query`` (the label read from the attribute ``label_column``) are looked up (QIDO-RS), their
headers fetched as metadata (no pixel data) and passed through the de-identification gate of
:mod:`medaug.deid`; only then are the instances retrieved (WADO-RS) into ``<cache>/series/<uid>/dicom/``,
each series written atomically (:func:`medaug.atomic.atomic_folder`: a half-downloaded series never
enters the cache). A cached series is never downloaded again. A local ``labels.csv`` naming the cached
folders is written, which the local prepare then reads like any folder.

Credentials come from ``MEDAUG_DICOMWEB_USER``/``MEDAUG_DICOMWEB_PASSWORD`` or a netrc file (``netrc``,
else ``$NETRC`` or ``~/.netrc``); a URL holding ``user:password@`` is refused. They are never logged or
written. Network errors are retried with exponential back-off and end in one :class:`DicomwebError` line.

Example::

    labels = fetch_series("http://pacs:8042/dicom-web", "series.csv", "outputs/job/raw/dicomweb")
"""

from __future__ import annotations

import csv
import hashlib
import logging
import netrc as netrc_module
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence
from urllib.parse import urlsplit

import pydicom
import requests
from pydicom import Dataset

from .atomic import atomic_file, atomic_folder, is_complete
from .deid import apply_policy, scan_headers

ENV_USER, ENV_PASSWORD = "MEDAUG_DICOMWEB_USER", "MEDAUG_DICOMWEB_PASSWORD"
RETRY_STATUS = (429, 500, 502, 503, 504)
log = logging.getLogger("medaug")


class DicomwebError(ValueError):
    """The DICOMweb server cannot be reached, refuses us, or lacks a series; one line, never a credential."""


def _auth(url: str, netrc_file: str | None) -> tuple[str, str] | None:
    user, password = os.environ.get(ENV_USER), os.environ.get(ENV_PASSWORD)
    if user and password:
        return user, password
    file = Path(netrc_file or os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    if not file.is_file():
        if netrc_file:
            raise DicomwebError(f"{file}: netrc file not found; fix the netrc key or set {ENV_USER}/{ENV_PASSWORD}")
        return None
    try:
        entry = netrc_module.netrc(str(file)).authenticators(urlsplit(url).hostname or "")
    except netrc_module.NetrcParseError as err:
        raise DicomwebError(
            f"{file}: not a netrc file (line {err.lineno}); write 'machine HOST login USER password PASSWORD'"
        ) from None
    return (entry[0], entry[2]) if entry else None


class Server:
    """A DICOMweb server (``dicomweb_client``) whose calls retry network errors with back-off.

    ``key`` names the config key of the URL in error messages (``data.dicomweb.url``).
    """

    def __init__(
        self,
        url: str,
        *,
        key: str = "data.dicomweb.url",
        netrc: str | None = None,
        retries: int = 4,
        backoff_s: float = 1.0,
        timeout_s: float = 30.0,
    ):
        from dicomweb_client import DICOMwebClient

        parts = urlsplit(str(url or ""))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DicomwebError(
                f"{key}={url!r} is no http(s) URL; give the DICOMweb root, e.g. http://pacs:8042/dicom-web"
            )
        if parts.username or parts.password:
            raise DicomwebError(
                f"{key} holds a user name or password; remove it from the URL and set "
                f"{ENV_USER}/{ENV_PASSWORD} or a netrc file instead"
            )
        self.url, self.key, self.retries, self.backoff_s = str(url).rstrip("/"), key, int(retries), float(backoff_s)
        session = requests.Session()
        session.auth = _auth(self.url, netrc)
        self.client = DICOMwebClient(self.url, session=session, timeout=timeout_s)
        self.client.set_http_retry_params(retry=False)  # retried here, network errors included

    def call(self, what: str, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` retried on connection errors, timeouts and HTTP 429/5xx."""
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except requests.HTTPError as err:
                status = err.response.status_code if err.response is not None else 0
                if status in (401, 403):
                    raise DicomwebError(
                        f"DICOMweb server {self.url} refused the credentials (HTTP {status}) for "
                        f"{what}; set {ENV_USER}/{ENV_PASSWORD} or a netrc file"
                    ) from None
                if status not in RETRY_STATUS:
                    raise DicomwebError(
                        f"DICOMweb server {self.url}: {what} failed with HTTP {status}; check {self.key} and the UIDs"
                    ) from None
                reason = f"HTTP {status}"
            except (requests.ConnectionError, requests.Timeout, ConnectionError) as err:
                reason = "connection refused" if "refused" in str(err).lower() else type(err).__name__
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise DicomwebError(
            f"DICOMweb server {self.url} not reachable for {what} ({reason}) after "
            f"{self.retries + 1} tries; check {self.key} and that the server is up"
        )


def _first(row: Mapping, *names: str) -> str:
    return next((str(row[n]).strip() for n in names if row.get(n) and str(row[n]).strip()), "")


def _value(item: Mapping, keyword: str) -> str:
    """A DICOM JSON attribute's first value (names as keyword), '' when absent."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    element = item.get(f"{tag:08X}" if tag is not None else keyword, {})
    values = element.get("Value") or [""]
    value = values[0]
    return str(value.get("Alphabetic", "") if isinstance(value, dict) else value)


def _wanted(server: Server, labels: Path | None, query: Mapping | None, label_column: str | None) -> list[dict]:
    """Rows (series_uid, study_uid, label, patient_id, split, where) from a labels CSV or a QIDO-RS query."""
    if labels is not None and Path(labels).is_file():
        with open(labels, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
        wanted = []
        for i, row in enumerate(rows, start=2):
            uid = _first(row, "SeriesInstanceUID", "series_uid")
            if not uid or not _first(row, "label"):
                raise DicomwebError(f"{labels}:{i}: needs a SeriesInstanceUID (or series_uid) and a label")
            wanted.append(
                dict(
                    series_uid=uid,
                    study_uid=_first(row, "StudyInstanceUID", "study_uid"),
                    label=_first(row, "label"),
                    patient_id=_first(row, "patient_id"),
                    split=_first(row, "split"),
                    where=f"{labels}:{i}",
                )
            )
        return wanted
    if not query or not label_column:
        raise DicomwebError(
            f"data.source=dicomweb needs data.labels (a CSV of SeriesInstanceUID, label) or "
            f"data.dicomweb.query with data.dicomweb.label_column (got labels {labels})"
        )
    found = server.call(
        "QIDO-RS series search",
        server.client.search_for_series,
        search_filters=dict(query),
        fields=[label_column, "StudyInstanceUID", "PatientID"],
        get_remaining=True,
    )
    wanted = [
        dict(
            series_uid=_value(s, "SeriesInstanceUID"),
            study_uid=_value(s, "StudyInstanceUID"),
            label=_value(s, label_column),
            patient_id="",
            split="",
            where=f"query {dict(query)}",
        )
        for s in found
    ]
    if not wanted:
        raise DicomwebError(f"DICOMweb server {server.url}: no series match data.dicomweb.query={dict(query)}")
    return wanted


def _pseudonym(patient_id: str) -> str:
    return "pid_" + hashlib.sha256(patient_id.encode()).hexdigest()[:16]


def _metadata(server: Server, row: dict) -> list[Dataset]:
    """The headers of a series (WADO-RS metadata: no pixel data), as pydicom datasets."""
    if not row["study_uid"]:
        found = server.call(
            "QIDO-RS series lookup",
            server.client.search_for_series,
            search_filters={"SeriesInstanceUID": row["series_uid"]},
        )
        if not found:
            raise DicomwebError(f"{row['where']}: no series {row['series_uid']} on {server.url}; check the UID")
        row["study_uid"] = _value(found[0], "StudyInstanceUID")
    items = server.call("WADO-RS metadata", server.client.retrieve_series_metadata, row["study_uid"], row["series_uid"])
    return [Dataset.from_json(item, bulk_data_uri_handler=lambda *a: b"") for item in items]


def _download(server: Server, row: dict, folder: Path, expected: int) -> None:
    """Retrieve one series into ``folder`` atomically (all its instances or nothing)."""

    def once():
        with atomic_folder(folder) as tmp:
            (tmp / "dicom").mkdir()
            n = 0
            for n, ds in enumerate(server.client.iter_series(row["study_uid"], row["series_uid"]), start=1):
                ds.save_as(tmp / "dicom" / f"{n:05d}.dcm", enforce_file_format=True)
            if n != expected:
                raise requests.ConnectionError(f"series {row['series_uid']}: {n} of {expected} instances received")

    server.call(f"WADO-RS retrieve of series {row['series_uid']}", once)


def fetch_series(
    url: str,
    labels: str | Path | None,
    cache_dir: str | Path,
    *,
    query: Mapping | None = None,
    label_column: str | None = None,
    deid: str = "refuse",
    report_path: str | Path | None = None,
    netrc: str | None = None,
    retries: int = 4,
    backoff_s: float = 1.0,
    timeout_s: float = 30.0,
    **_ignored,
) -> Path:
    """Cache the labelled series of ``url`` under ``cache_dir``; return the local labels CSV to prepare.

    The gate (``deid``: refuse | strip | trust, as in prepare) sees the headers of every series not yet
    cached before any instance is retrieved; ``refuse`` with a finding raises :class:`medaug.deid.PHIError`
    and downloads nothing. The written CSV has columns path (``series/<SeriesInstanceUID>/dicom``), patient_id
    (the CSV's, else a hash of the header's PatientID), label, split.
    """
    cache = Path(cache_dir).expanduser()
    server = Server(url, netrc=netrc, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s)
    wanted = _wanted(server, Path(labels) if labels else None, query, label_column)
    missing = [row for row in wanted if not is_complete(cache / "series" / row["series_uid"])]
    headers, counts = {}, {}
    for row in missing:
        datasets = _metadata(server, row)
        if not datasets:
            raise DicomwebError(f"{row['where']}: series {row['series_uid']} has no instances on {server.url}")
        counts[row["series_uid"]] = len(datasets)
        headers.update({Path(row["series_uid"]) / f"{k:05d}": ds for k, ds in enumerate(datasets)})
        row.setdefault("_pid", str(datasets[0].get("PatientID", "")))
    apply_policy(scan_headers(headers), deid, report_path=report_path)  # the gate, before any pixel data
    for row in missing:
        log.info(
            "DICOMweb: retrieving series %d of %d (%d instances)",
            missing.index(row) + 1,
            len(missing),
            counts[row["series_uid"]],
        )
        _download(server, row, cache / "series" / row["series_uid"], counts[row["series_uid"]])
    out = []
    for row in wanted:
        folder = cache / "series" / row["series_uid"]
        pid = (
            row["patient_id"]
            or row.get("_pid")
            or str(pydicom.dcmread(next(folder.glob("dicom/*.dcm")), stop_before_pixels=True).get("PatientID", ""))
        )
        if not pid:
            raise DicomwebError(f"{row['where']}: series {row['series_uid']} has no PatientID; add a patient_id column")
        out.append(
            dict(
                path=f"series/{row['series_uid']}/dicom",
                patient_id=row["patient_id"] or _pseudonym(pid),
                label=row["label"],
                split=row["split"],
            )
        )
    return _write_labels(cache / "labels.csv", out)


def _write_labels(path: Path, rows: Sequence[dict]) -> Path:
    """Write the local labels CSV, leaving an identical one untouched (its mtime is part of prepare's fingerprint)."""
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["path", "patient_id", "label", "split"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    if not path.is_file() or path.read_text() != buf.getvalue():
        with atomic_file(path) as tmp:
            tmp.write_text(buf.getvalue())
    return path


STORED = "dicomweb_stored.json"


def store_export(
    out_dir: str | Path,
    url: str,
    *,
    netrc: str | None = None,
    retries: int = 4,
    backoff_s: float = 1.0,
    timeout_s: float = 30.0,
    **_ignored,
) -> dict:
    """STOW-RS every DICOM series of a complete export folder to ``url``; record what is stored.

    A series the server already holds with all its instances is not sent again. The record,
    ``<out_dir>/dicomweb_stored.json`` (url, and per series its manifest path, StudyInstanceUID,
    SeriesInstanceUID, instances, whether sent now), is written after the store. Returns the record.
    """
    import json

    out_dir = Path(out_dir)
    server = Server(
        url, key="export.dicomweb.url", netrc=netrc, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s
    )
    series: dict[str, list[Path]] = {}
    for file in sorted((out_dir / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        series.setdefault(str(ds.SeriesInstanceUID), []).append(file)
    record = []
    for uid, files in series.items():
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        held = server.call(
            "QIDO-RS instance search", server.client.search_for_instances, search_filters={"SeriesInstanceUID": uid}
        )
        sent = len(held) < len(files)
        if sent:
            server.call(f"STOW-RS of series {uid}", server.client.store_instances, [pydicom.dcmread(f) for f in files])
        rel = files[0].relative_to(out_dir)
        record.append(
            dict(
                path=str(rel.parent if len(files) > 1 else rel),
                study_uid=study,
                series_uid=uid,
                instances=len(files),
                sent=sent,
            )
        )
    result = dict(url=server.url, series=record)
    with atomic_file(out_dir / STORED) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    log.info(
        "DICOMweb: %d series in %s (%d sent now, %d already there)",
        len(record),
        server.url,
        sum(r["sent"] for r in record),
        sum(not r["sent"] for r in record),
    )
    return result

"""A real Orthanc PACS with its DICOMweb plugin, for the DICOMweb tests.

:func:`start_orthanc` writes a JSON config (HTTP on a free loopback port, the DICOM server off,
remote access refused, basic auth on with one registered user, storage in a temp folder, the
DICOMweb plugin at ``/dicom-web/``), starts ``/usr/sbin/Orthanc`` on it, waits until it answers and
returns an :class:`Orthanc` whose ``stop()`` ends that process by its PID. Orthanc 1.10 has no bind
address option: it listens on every interface, and ``RemoteAccessAllowed: false`` refuses any client
that is not on this machine; the tests only talk to 127.0.0.1.

Tests that need it skip with the reason when Orthanc or the plugin is missing (``make sysdeps``
installs the Debian packages ``orthanc`` and ``orthanc-dicomweb``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "medaug", "s3cret-Orthanc-pw"


def missing() -> str | None:
    """Why Orthanc cannot run here, or None."""
    for path, pkg in ((ORTHANC, "orthanc"), (DICOMWEB_PLUGIN, "orthanc-dicomweb")):
        if not path.exists():
            return f"{path} not found: install the Debian package {pkg} (make sysdeps, as root)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    """A running Orthanc: its DICOMweb root, REST root, credentials and process."""

    port: int
    folder: Path
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def rest(self, route: str, method: str = "GET", **kw):
        """Orthanc's own REST API (statistics, deleting resources), as the registered user."""
        r = requests.request(method, f"{self.url}{route}", auth=(USER, PASSWORD), timeout=10, **kw)
        r.raise_for_status()
        return r.json() if r.content else None

    def statistics(self) -> dict:
        return self.rest("/statistics")

    def clear(self) -> None:
        """Delete every study (tests that need an empty server)."""
        for study in self.rest("/studies"):
            self.rest(f"/studies/{study}", method="DELETE")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def start_orthanc(folder: Path, timeout: float = 30.0) -> Orthanc:
    """Start Orthanc with storage, index and log under ``folder``; return once ``/system`` answers."""
    folder = Path(folder)
    (folder / "storage").mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": "medaug-test",
        "HttpPort": port,
        "HttpServerEnabled": True,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "ExecuteLuaEnabled": False,
        "SaveJobs": False,
        "HttpThreadsCount": 4,
        "ConcurrentJobs": 1,
    }
    (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = open(folder / "orthanc.log", "w")
    process = subprocess.Popen(
        [str(ORTHANC), str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=folder
    )
    log.close()
    server = Orthanc(port, folder, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}; see {folder / 'orthanc.log'}")
        try:
            server.rest("/system")
            requests.get(f"{server.dicomweb}/studies", auth=(USER, PASSWORD), timeout=5).raise_for_status()
            return server
        except requests.RequestException:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"Orthanc did not answer on port {port} within {timeout:.0f} s; see {folder / 'orthanc.log'}")

"""Shared fixtures: tiny demo datasets made in tmp folders, and Hydra composition."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from medaug.data import prepare_dataset
from medaug.phantoms import DEMO_MASK_LABELS, make_demo_dataset
from medaug.preprocessing import IntensityWindow

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
WINDOW = IntensityWindow(-160.0, 240.0)
TINY = [
    "model=unet_tiny",
    "tracking=none",
    "training.max_steps=4",
    "training.batch_size=4",
    "training.log_every=2",
    "training.ckpt_every=2",
    "data.demo.n_per_class=6",
    "sample.num_per_class=2",
    "sample.steps=3",
    "evaluate.classifier_steps=5",
    "evaluate.n_pairs=4",
]


def compose_cfg(stage: str, out: Path, overrides=()) -> object:
    """The config of ``stage`` with outputs under ``out`` (every stage accepts every stage's overrides)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=stage, overrides=[f"paths.output_dir={out}", *overrides])


def _prepared(root: Path, spatial_dims: int) -> Path:
    size = 16 if spatial_dims == 2 else 12
    labels = make_demo_dataset(root / "raw", spatial_dims=spatial_dims, n_per_class=6, size=size, seed=0)
    shape = [size, size, -1] if spatial_dims == 2 else [size] * 3
    prepare_dataset(
        labels, root / "prepared", WINDOW, spatial_size=shape, spatial_dims=spatial_dims, mask_labels=DEMO_MASK_LABELS
    )
    return root / "prepared"


@pytest.fixture(scope="session")
def prepared_2d(tmp_path_factory) -> Path:
    return _prepared(tmp_path_factory.mktemp("demo2d"), 2)


@pytest.fixture(scope="session")
def prepared_3d(tmp_path_factory) -> Path:
    return _prepared(tmp_path_factory.mktemp("demo3d"), 3)


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def prepared(request, prepared_2d, prepared_3d) -> Path:
    return prepared_2d if request.param == 2 else prepared_3d


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real Orthanc with DICOMweb on a free loopback port, basic auth on (tests/orthanc.py); stopped by PID."""
    from tests.orthanc import missing, start_orthanc

    why = missing()
    if why:
        pytest.skip(why)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()

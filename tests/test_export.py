import csv
import json

import numpy as np
import pytest
import torch

from medaug.export import ExportError, export_dataset, render_card
from medaug.io import read_volume
from medaug.preprocessing import IntensityWindow

from .conftest import CONF_DIR

TEMPLATE = CONF_DIR.parent / "data_cards" / "TEMPLATE.md"
CARD = dict(name="t", created="2026-01-01", medaug_version="0", checkpoint_id="abc", training_steps=5,
            model="M", dataset_fingerprint="f", mlflow_run_id="r", sampler="ddim", guidance_scale=2, seed=1,
            spatial_dims=2, image_shape="8 × 8", spacing="2 × 2", intensity="HU", class_counts="a: 2",
            metrics="| m | 1 |")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_export_writes_hu_nifti_with_geometry(tmp_path, spatial_dims):
    window = IntensityWindow(-160, 240)
    images = torch.linspace(-1, 1, 2 * 8**spatial_dims).reshape(2, 1, *([8] * spatial_dims))
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    rows = [{"label": i, "class_name": "ab"[i], "seed": i, "checkpoint_id": "abc"} for i in range(2)]
    out = export_dataset(images, rows, tmp_path / "e", window=window, affine=affine, card_fields=CARD,
                         template=TEMPLATE)
    manifest = list(csv.DictReader(open(out / "manifest.csv")))
    assert [m["class_name"] for m in manifest] == ["a", "b"] and len(json.load(open(out / "manifest.json"))) == 2
    vol = read_volume(out / manifest[1]["path"])
    np.testing.assert_allclose(vol.affine, affine)
    np.testing.assert_allclose(vol.array.reshape(-1), window.to_source(images[1].reshape(-1).numpy()), atol=1e-3)
    card = (out / "DATA_CARD.md").read_text()
    assert "synthetic" in card.lower() and "abc" in card and "$" not in card
    assert (out / "DONE").exists()


def test_export_refuses_to_overwrite_and_leaves_no_partial(tmp_path):
    window, affine = IntensityWindow(-1, 1), np.eye(4)
    rows = [{"label": 0, "class_name": "a", "seed": 0, "checkpoint_id": "x"}]
    (tmp_path / "e").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_dataset(torch.zeros(1, 1, 4, 4), rows, tmp_path / "e", window=window, affine=affine,
                       card_fields=CARD, template=TEMPLATE)
    with pytest.raises(ExportError, match="placeholder"):
        export_dataset(torch.zeros(1, 1, 4, 4), rows, tmp_path / "f", window=window, affine=affine,
                       card_fields={}, template=TEMPLATE)
    assert not (tmp_path / "f").exists() and [p.name for p in tmp_path.iterdir()] == ["e"]


def test_render_card_fills_every_placeholder():
    text = render_card(TEMPLATE, {**CARD, "num_samples": 2})
    assert "${" not in text and "| m | 1 |" in text

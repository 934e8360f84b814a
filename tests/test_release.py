"""medaug.release: what export reads (evaluation, copy filter, card fields) and medaug.regeneration."""

import json

import numpy as np
import pytest
import torch

from medaug.atomic import atomic_folder
from medaug.export import ExportError
from medaug.regeneration import Regenerated, regenerate_copies
from medaug.release import card_fields, filter_copies, manifest_scores, read_evaluation
from medaug.sampling import samples_id, save_samples

AFFINE = np.diag([0.8, 0.7, 2.5, 1.0])


def _job(tmp_path, scores=(0.25, 0.95, 0.5), space="pixel"):
    """A samples folder of 3 images (classes a, b, a) and its evaluation with per-sample copy scores."""
    rows = [dict(index=i, label=i % 2, class_name="ab"[i % 2], seed=5 + i) for i in range(3)]
    info = dict(
        checkpoint_id="abc",
        checkpoint_step=4,
        class_names=["a", "b"],
        spatial_dims=2,
        image_shape=[4, 4],
        window={"lo": -160, "hi": 240},
        affine=AFFINE.tolist(),
        model="M",
        sample=dict(sampler="ddim", steps=3, eta=0.0, guidance_scale=2.0, seed=5),
    )
    images = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 4, 4).clone()
    save_samples(tmp_path / "samples", images, rows, info, ["a", "b"])
    with atomic_folder(tmp_path / "eval") as ev:
        (ev / "metrics.json").write_text(json.dumps({"privacy/copy_rate": 0.33, "fidelity/fd_std": 1.0}))
        (ev / "per_sample.csv").write_text("index,copy_score\n" + "".join(f"{i},{s}\n" for i, s in enumerate(scores)))
        (ev / "privacy.json").write_text(
            json.dumps(
                {"threshold": 0.9, "space": space, "verdict": "warn", "samples_id": samples_id(tmp_path / "samples")}
            )
        )
        (ev / "report.md").write_text("![x](data:image/png;base64,AAAA)\n")
    return images, torch.tensor([0, 1, 0]), rows, info


def test_read_evaluation_and_card_fields(tmp_path):
    images, labels, rows, info = _job(tmp_path)
    ev = read_evaluation(tmp_path / "eval", tmp_path / "samples")
    assert ev.complete and ev.audited and [p.name for p in ev.reports] == ["metrics.json", "privacy.json"]
    card = card_fields("job", info, rows, ev, tmp_path / "prepared")  # no prepared dataset.json: not recorded
    assert card["privacy"] == "verdict **warn**: `privacy/copy_rate` 0.33" and card["class_counts"] == "a: 2, b: 1"
    assert card["spacing"] == "0.80 × 0.70" and card["deid"] == "not recorded" and "fd_std" not in card["metrics"]
    assert card["filtered"] == "copy filter off"
    assert manifest_scores(ev, rows) == [0.25, 0.95, 0.5]
    (tmp_path / "samples" / "manifest.csv").write_text("index\n")  # other samples than the evaluated ones
    with pytest.raises(ExportError, match="evaluated other samples"):
        read_evaluation(tmp_path / "eval", tmp_path / "samples")


def test_filter_copies_drops_and_hands_the_verdict_to_regenerate(tmp_path):
    images, labels, rows, _ = _job(tmp_path)
    kept = filter_copies(images, labels, rows, tmp_path / "eval")
    assert [r["index"] for r in kept.rows] == [0, 2] and kept.images[:, 0, 0, 0].tolist() == [0.0, 2.0]
    assert kept.scores.tolist() == [0.25, 0.5]
    assert kept.note == "copy filter on (threshold 0.9000): 1 of 3 samples dropped"
    seen = {}

    def regenerate(images, labels, rows, keep, scores, threshold):
        seen.update(keep=keep.tolist(), threshold=threshold)
        return Regenerated(images[:2], list(rows[:2]), np.array([0.25, 0.1]), 1, 5)

    new = filter_copies(images, labels, rows, tmp_path / "eval", regenerate)
    assert seen == {"keep": [True, False, True], "threshold": 0.9} and len(new.rows) == 2
    assert new.note.endswith("1 of 3 samples dropped and 0 regenerated; 1 could not be replaced in 5 rounds")


def test_regeneration_needs_a_pixel_audit_and_the_samples_checkpoint(tmp_path):
    images, labels, rows, info = _job(tmp_path, space="classifier")
    with pytest.raises(ExportError, match="pixel space"):
        filter_copies(images, labels, rows, tmp_path / "eval", lambda *a: pytest.fail("regenerated"))
    from medaug.model import EMA, save_checkpoint

    net = torch.nn.Linear(1, 1)
    ckpt = save_checkpoint(
        tmp_path / "last.pt",
        model=net,
        ema=EMA(net, 0.9),
        optimizer=None,
        step=1,
        config={"model": {"_target_": "torch.nn.Linear"}},
        meta={"class_names": ["a", "b"]},
    )
    with pytest.raises(ValueError, match="last.pt is not the checkpoint these samples came from"):
        regenerate_copies(
            images,
            labels,
            rows,
            np.array([True, False, True]),
            np.zeros(3),
            0.9,
            sample_info=info,
            ckpt_path=ckpt,
            prepared_dir=tmp_path / "prepared",
        )


def test_masks_follow_the_rows_the_copy_filter_keeps():
    from medaug.release import masks_for

    masks = torch.arange(3).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    rows = [dict(index=str(i)) for i in range(3)]
    kept = masks_for(masks, rows, [rows[2], rows[0]])
    assert kept[:, 0, 0, 0].tolist() == [2, 0] and masks_for(None, rows, rows) is None
    with pytest.raises(ExportError, match="export.regenerate=false"):
        masks_for(masks, rows, [rows[0], dict(index=3, replaces_copy=True)])  # a regenerated sample has no mask

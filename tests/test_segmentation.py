"""Segmentation metrics (medaug.metrics.segmentation), the mask readers (medaug.masks) and the segmentation part
of the evaluate stage, on planted masks."""

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from medaug.data import load_split, read_manifest
from medaug.data import load_split_masks
from medaug.masks import mask_labels
from medaug.privacy import read_mask_copy_scores
from medaug.sampling import load_sample_masks
from medaug.metrics.segmentation import (
    SegUtilityResult,
    foreground_names,
    predict_masks,
    segmentation_scores,
    segmentation_utility,
    train_segmenter,
)
from medaug.sampling import save_samples

from .test_evaluate_stage import FAST, planted_samples, run_eval

LESION = 0.35  # model-space threshold of the demo lesions (about 150 HU in the [-160, 240] window: 0.55)
SEG_FAST = ["evaluate.segmentation.steps=30", "evaluate.segmentation.seeds=[0]", "evaluate.segmentation.batch_size=8"]


def squares(n, shape, size=4, seed=0):
    """``n`` images (n, 1, *shape) in [-1, 1] with one bright ``size``-voxel square (cube) each, and its mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *shape, generator=g) * 0.1 - 0.5
    m = torch.zeros(n, 1, *shape, dtype=torch.long)
    for i in range(n):
        corner = torch.randint(1, min(shape) - size - 1, (len(shape),), generator=g)
        box = (i, 0, *(slice(int(c), int(c) + size) for c in corner))
        m[box], x[box] = 1, x[box] + 1.0
    return x, m


def test_dice_and_hd95_on_planted_masks():
    target = torch.zeros(3, 1, 10, 10, dtype=torch.long)
    target[:2, :, 2:6, 2:6] = 1  # a 4x4 square; case 2 has no lesion
    perfect = segmentation_scores(target, target, 2, spacing=(1.5, 1.5))
    assert perfect.dice[:2, 0].tolist() == [1.0, 1.0] and perfect.hd95[:2, 0].tolist() == [0.0, 0.0]
    assert np.isnan(perfect.dice[2, 0]) and np.isnan(perfect.hd95[2, 0])  # no reference lesion: undefined
    shifted = torch.roll(target, 1, dims=2)  # one voxel along x: overlap 3x4 = 12 of 16 + 16 voxels
    s = segmentation_scores(shifted, target, 2, spacing=(1.5, 1.5))
    assert s.dice[0, 0] == pytest.approx(2 * 12 / (16 + 16))  # 0.75
    # every edge voxel is at most one voxel from the other edge, and a whole side (4 of 12) is exactly one away
    assert s.hd95[0, 0] == pytest.approx(1.5)
    missed = segmentation_scores(torch.zeros_like(target), target, 2, spacing=(1.5, 2.0))
    assert missed.dice[0, 0] == 0.0 and missed.hd95[0, 0] == pytest.approx(np.hypot(15.0, 20.0))  # the diagonal
    with pytest.raises(ValueError, match="differ"):
        segmentation_scores(target[:1], target, 2)


def test_two_labels_are_scored_apart_and_named():
    target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target[0, 0, 1:3, 1:3], target[0, 0, 5:7, 5:7] = 1, 2
    pred = target.clone()
    pred[0, 0, 5:7, 5:7] = 0  # label 2 missed
    s = segmentation_scores(pred, target, 3)
    assert s.dice[0].tolist() == [1.0, 0.0]
    assert foreground_names({"background": 0, "liver": 1, "tumour": 2}) == ["liver", "tumour"]
    assert mask_labels({}, 3) == {"background": 0, "label_1": 1, "label_2": 2}
    assert mask_labels({"mask_labels": {"lesion": 1, "background": 0}}) == {"background": 0, "lesion": 1}


@pytest.mark.parametrize("shape", [(16, 16), (12, 12, 12), (15, 17)], ids=["2d", "3d", "odd"])
def test_segmenter_learns_planted_squares_deterministically(shape):
    x, m = squares(16, shape)
    tx, tm = squares(6, shape, seed=1)
    model = train_segmenter(x, m, 2, steps=60, batch_size=8, progress=False)
    pred = predict_masks(model, tx)
    assert pred.shape == tm.shape and pred.dtype == torch.long
    assert np.nanmean(segmentation_scores(pred, tm, 2).dice) > 0.8
    again = predict_masks(train_segmenter(x, m, 2, steps=60, batch_size=8, progress=False), tx)
    assert torch.equal(pred, again)  # seeded


def test_utility_ranks_wrong_masks_below_right_ones_and_names_every_metric():
    train, test = squares(16, (16, 16)), squares(6, (16, 16), seed=1)
    synth_x, _ = squares(16, (16, 16), seed=2)
    wrong = (synth_x.clone(), torch.zeros_like(train[1]))  # masks that mark nothing
    labels = {"background": 0, "lesion": 1}
    result = segmentation_utility(train, wrong, test, labels, seeds=[0, 1], steps=60, batch_size=8, spacing=(2.0, 2.0))
    m = result.metrics()
    assert m["segmentation/dice/real"] > 0.8 and m["segmentation/dice/synthetic"] < 0.2
    assert m["segmentation/hd95/synthetic"] > m["segmentation/hd95/real"]
    assert m["segmentation/dice/real/lesion"] == m["segmentation/dice/real"]  # one label: the same
    names = {
        f"segmentation/{k}/{s}{std}{lab}"
        for k in ("dice", "hd95")
        for s in ("real", "synthetic", "mixed")
        for std in ("", "_std")
        for lab in ("", "/lesion")
    }
    assert names | {"segmentation/dice_gain", "segmentation/dice_gain_std"} == set(m)
    planted = SegUtilityResult(["a"], {"real": [np.array([0.5]), np.array([0.7])], "mixed": [np.array([0.8])] * 2})
    out = planted.metrics()
    assert out["segmentation/dice/real"] == pytest.approx(0.6) and out["segmentation/dice/real_std"] == pytest.approx(
        0.1
    )
    assert out["segmentation/dice_gain"] == pytest.approx(0.2)


# ----------------------------------------------------------------------------- the contract's folders


def prepared_with_masks(prepared, out):
    """A copy of a prepared dataset with a lesion mask per item (the contract: a ``mask`` column and labels)."""
    shutil.copytree(prepared, out)
    rows = list(csv.DictReader(open(out / "manifest.csv", newline="")))
    (out / "masks").mkdir(exist_ok=True)  # the phantoms bring their own masks: replaced here
    for r in rows:
        img = nib.load(out / r["path"])
        mask = (np.asarray(img.dataobj) > LESION).astype(np.uint8)
        r["mask"] = f"masks/{r['item_id']}.nii.gz"
        nib.save(nib.Nifti1Image(mask, img.affine), out / r["mask"])
    with open(out / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = json.loads((out / "dataset.json").read_text())
    (out / "dataset.json").write_text(json.dumps(meta | {"labels": {"background": 0, "lesion": 1}}))
    return out


def add_sample_masks(samples, masks, source="generated"):
    """The contract's samples folder: ``masks`` in samples.pt, ``mask_labels`` in info.json, ``mask_source``."""
    data = torch.load(samples / "samples.pt")
    torch.save(data | {"masks": masks}, samples / "samples.pt")
    info = json.loads((samples / "info.json").read_text())
    (samples / "info.json").write_text(json.dumps(info | {"mask_labels": {"background": 0, "lesion": 1}}))
    rows = list(csv.DictReader(open(samples / "manifest.csv", newline="")))
    with open(samples / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*rows[0], "mask_source"])
        writer.writeheader()
        writer.writerows([r | {"mask_source": source} for r in rows])


def test_mask_readers_follow_the_contract(tmp_path, prepared_2d):
    prepared = prepared_with_masks(prepared_2d, tmp_path / "p")
    x, _ = load_split(prepared, "train")
    masks = load_split_masks(prepared, "train")
    assert masks.shape == x.shape and masks.dtype == torch.long and set(masks.unique().tolist()) == {0, 1}
    assert torch.equal(masks, (x > LESION).long())  # in the order of load_split
    plain = tmp_path / "plain"  # the same dataset without its mask column
    shutil.copytree(prepared_2d, plain)
    rows = list(csv.DictReader(open(plain / "manifest.csv", newline="")))
    with open(plain / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[k for k in rows[0] if k != "mask"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert load_split_masks(plain, "train") is None  # no mask column
    rows = [dict(index=i, label=0, class_name="healthy") for i in range(2)]
    save_samples(tmp_path / "s", x[:2], rows, dict(class_names=["healthy"]), ["healthy"])
    assert load_sample_masks(tmp_path / "s") is None
    add_sample_masks(tmp_path / "s", masks[:2])
    assert torch.equal(load_sample_masks(tmp_path / "s"), masks[:2])
    add_sample_masks(tmp_path / "s", masks[:1])
    with pytest.raises(ValueError, match="one \\(1, \\*spatial\\) label map per image"):
        load_sample_masks(tmp_path / "s")


@pytest.mark.slow
def test_evaluate_with_masks_reports_segmentation_and_catches_copied_masks(tmp_path, prepared_2d):
    prepared = prepared_with_masks(prepared_2d, tmp_path / "p")
    held = planted_samples(prepared, ["val", "test"], tmp_path / "s")  # new images: no image copies
    train_masks = load_split_masks(prepared, "train")
    copied = train_masks[torch.arange(len(held)) % len(train_masks)]  # each "generated" mask a training mask
    add_sample_masks(tmp_path / "s", copied)
    result = run_eval(tmp_path, prepared, SEG_FAST)
    for key in (
        "fidelity_dice",
        "fidelity_dice_real",
        "dice/real",
        "dice/synthetic",
        "dice/mixed",
        "hd95/mixed",
        "dice/real/lesion",
        "hd95/real_std/lesion",
        "dice_gain",
    ):
        assert f"segmentation/{key}" in result, key
    assert 0 <= result["segmentation/fidelity_dice_real"] <= 1
    assert result["privacy/copy_rate"] <= 0.1  # the images are new ...
    assert result["privacy/mask_copy_rate"] == 1.0  # ... their masks are not (every non-empty one is audited)
    assert result["privacy/verdict"] == "fail"
    privacy = json.loads((tmp_path / "eval" / "privacy.json").read_text())
    assert privacy["mask"]["verdict"] == "fail" and any(r.startswith("masks: copy rate") for r in privacy["reasons"])
    index, mask_scores, mask_threshold = read_mask_copy_scores(tmp_path / "eval")  # per sample, for export's filter
    audited = copied.flatten(1).any(1).numpy()  # the non-empty masks
    assert mask_threshold == privacy["mask"]["threshold"] and np.isnan(mask_scores[~audited]).all()
    assert (mask_scores[audited] > mask_threshold).all() and len(index) == len(held)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["privacy/verdict_code"] == 2.0 and "segmentation/dice/real" in metrics
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Segmentation" in report and "| real + synthetic | lesion |" in report
    cached = sorted(p.name for p in (tmp_path / "eval_classifiers").iterdir())
    assert any(n.startswith("seg_unet_s30_") for n in cached)

    # masks the user gave are not audited; the fidelity segmenter comes from the cache (same numbers)
    add_sample_masks(tmp_path / "s", (held > LESION).long(), source="user")
    again = run_eval(tmp_path, prepared, SEG_FAST)
    assert "privacy/mask_copy_rate" not in again and again["privacy/verdict"] == "pass"
    assert read_mask_copy_scores(tmp_path / "eval") is None
    assert again["segmentation/fidelity_dice_real"] == result["segmentation/fidelity_dice_real"]
    assert again["segmentation/fidelity_dice"] == again["segmentation/fidelity_dice_real"]  # the same images


def test_masks_labelled_otherwise_than_the_dataset_are_refused(tmp_path, prepared_2d):
    from medaug.evaluation import load_seg_data

    prepared = prepared_with_masks(prepared_2d, tmp_path / "p")
    x = planted_samples(prepared, ["val", "test"], tmp_path / "s")
    add_sample_masks(tmp_path / "s", (x > LESION).long() * 2)  # values the dataset's labels do not name
    with pytest.raises(ValueError, match="evaluate samples of a model trained on this dataset"):
        load_seg_data(tmp_path / "s", prepared, ["val", "test"], [], {})


def test_no_masks_no_segmentation_metrics(tmp_path, prepared_2d):
    planted_samples(prepared_2d, ["val", "test"], tmp_path / "s")
    result = run_eval(tmp_path, prepared_2d, [*FAST, "evaluate.utility.seeds=[]"])
    assert not any(k.startswith("segmentation/") or "mask" in k for k in result)
    assert [r["split"] for r in read_manifest(prepared_2d)]  # the fixture was only read

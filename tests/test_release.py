"""medaug.release: what export reads (evaluation, copy filter, card fields) and medaug.regeneration."""

import json

import numpy as np
import pytest
import torch

from medaug.atomic import atomic_folder
from medaug.export import ExportError
from medaug.regeneration import Regenerated, regenerate_copies
from medaug.release import card_fields, filter_copies, manifest_scores, membership_text, read_evaluation, share_gate
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


FAILED = ["closer_to_train 0.66 > 0.55 (p=0.005)", "mia_auc 0.71 > 0.60 (95% CI 0.62-0.80)"]


def _audited(tmp_path, verdict="fail", failed=FAILED):
    """``_job`` with an audit of the given verdict (and its failed checks in privacy.json)."""
    job = _job(tmp_path, scores=(0.25, 0.3, 0.5))
    summary = json.loads((tmp_path / "eval" / "privacy.json").read_text())
    (tmp_path / "eval" / "privacy.json").write_text(json.dumps(summary | {"verdict": verdict, "failed": failed}))
    return job


def _share(tmp_path, *overrides):
    from pipelines import export as export_stage

    from .conftest import compose_cfg

    cfg = compose_cfg(
        "export", tmp_path, ["tracking=none", "export.profile=share", "export.regenerate=false", *overrides]
    )
    return export_stage.run(cfg)


def test_share_gate_refuses_a_failed_audit_naming_the_checks_and_writes_nothing(tmp_path):
    _audited(tmp_path)
    with pytest.raises(ExportError) as err:
        _share(tmp_path)
    message = str(err.value)
    assert message.startswith("privacy audit verdict fail: closer_to_train 0.66 > 0.55 (p=0.005); mia_auc 0.71")
    assert "export.allow_failed_audit=true" in message and "\n" not in message
    assert not (tmp_path / "export").exists() and not (tmp_path / "export.tar.gz").exists()
    ev = read_evaluation(tmp_path / "eval", tmp_path / "samples")
    assert share_gate(ev, "augment") == ""  # only the share profile is gated


def test_share_gate_passes_warn_and_pass_verdicts_without_a_warning(tmp_path):
    _audited(tmp_path, verdict="warn", failed=[])
    assert share_gate(read_evaluation(tmp_path / "eval", tmp_path / "samples"), "share") == ""
    assert _share(tmp_path)["samples"] == 3
    card = (tmp_path / "export" / "DATA_CARD.md").read_text()
    assert "WARNING" not in card and card.splitlines()[2].startswith("**Every image in this dataset is synthetic.**")


def test_allow_failed_audit_exports_and_the_card_opens_with_the_warning(tmp_path):
    _audited(tmp_path)
    result = _share(tmp_path, "export.allow_failed_audit=true")
    assert result["samples"] == 3 and (tmp_path / "export.tar.gz").is_file()
    lines = (tmp_path / "export" / "DATA_CARD.md").read_text().splitlines()
    assert lines[0].startswith("# Data card") and lines[2].startswith("> **WARNING: this dataset FAILED its privacy")
    assert FAILED[0] in lines[2] and "export.allow_failed_audit=true" in lines[2]


def test_share_gate_refuses_samples_without_an_audit(tmp_path):
    _audited(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "eval")
    with pytest.raises(ExportError, match="no privacy audit of these samples"):
        _share(tmp_path)
    assert not (tmp_path / "export").exists()
    ev = read_evaluation(tmp_path / "eval", tmp_path / "samples")
    assert "WITHOUT a privacy audit" in share_gate(ev, "share", allow_failed=True)


def test_the_card_says_the_membership_attack_in_one_sentence(tmp_path):
    _job(tmp_path)
    mia = {
        "privacy/mia_auc": 0.55,
        "privacy/mia_auc_lo": 0.41,
        "privacy/mia_auc_hi": 0.7,
        "privacy/mia_tpr_at_1pct_fpr": 0.0,
        "privacy/mia_members": 10.0,
        "privacy/mia_nonmembers": 12.0,
    }
    metrics = {"privacy/copy_rate": 0.33} | mia
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    ev = read_evaluation(tmp_path / "eval", tmp_path / "samples")
    assert ev.verdict == (
        "verdict **warn**: `privacy/copy_rate` 0.33; membership inference (loss attack, 10 training vs 12 held-out "
        "images): AUC 0.55 (95 % CI 0.41-0.70; 0.5 = no leakage), TPR 0.0% at 1 % FPR"
    )
    assert membership_text(metrics | {"privacy/mia_auc_lo": None}).count("n/a") == 1 and membership_text({}) == ""


def test_masks_follow_the_images_the_copy_filter_keeps_or_regenerates(tmp_path):
    images, labels, rows, _ = _job(tmp_path)  # scores 0.25, 0.95, 0.5 against threshold 0.9: sample 1 is a copy
    masks = torch.arange(3).view(3, 1, 1, 1).expand(3, 1, 4, 4).clone()
    kept = filter_copies(images, labels, rows, tmp_path / "eval", masks=masks)
    assert kept.masks[:, 0, 0, 0].tolist() == [0, 2] and [r["index"] for r in kept.rows] == [0, 2]
    assert filter_copies(images, labels, rows, tmp_path / "eval").masks is None

    def regenerate(images, labels, rows, keep, scores, threshold, masks=None):  # the replacement keeps its mask
        order = [*np.flatnonzero(keep), *np.flatnonzero(~keep)]
        return Regenerated(images[order], [rows[i] for i in order], scores[order], 0, 5, masks[order])

    new = filter_copies(images, labels, rows, tmp_path / "eval", regenerate, masks)
    assert new.masks[:, 0, 0, 0].tolist() == [0, 2, 1] and [r["index"] for r in new.rows] == [0, 2, 1]


def _mask_audit(tmp_path, mask_scores=("", "", "0.97")):
    """``_job`` plus an audit of the generated masks: sample 1's image is a copy (0.95 > 0.9), sample 2's mask is
    (0.97 > the mask threshold 0.8); sample 0's mask was not audited (empty score)."""
    images, labels, rows, info = _job(tmp_path)
    (tmp_path / "eval" / "per_sample.csv").write_text(
        "index,copy_score,mask_copy_score,mask_is_copy\n"
        + "".join(
            f"{i},{s},{m},{int(bool(m) and float(m) > 0.8)}\n"
            for i, (s, m) in enumerate(zip((0.25, 0.95, 0.5), mask_scores))
        )
    )
    summary = json.loads((tmp_path / "eval" / "privacy.json").read_text())
    (tmp_path / "eval" / "privacy.json").write_text(json.dumps(summary | {"mask": {"threshold": 0.8}}))
    return images, labels, rows, torch.arange(3).view(3, 1, 1, 1).expand(3, 1, 4, 4).clone()


def test_the_copy_filter_drops_a_pair_whose_generated_mask_is_a_copy(tmp_path):
    images, labels, rows, masks = _mask_audit(tmp_path)
    kept = filter_copies(images, labels, rows, tmp_path / "eval", masks=masks)
    assert [r["index"] for r in kept.rows] == [0] and kept.masks[:, 0, 0, 0].tolist() == [0]
    assert kept.note == (
        "copy filter on (threshold 0.9000): 2 of 3 samples dropped (1 image copies; 1 generated masks copying a "
        "training mask, mask threshold 0.8000)"
    )
    seen = {}

    def regenerate(images, labels, rows, keep, scores, threshold, masks=None, mask_copy=None, mask_threshold=None):
        seen.update(keep=keep.tolist(), mask_copy=mask_copy.tolist(), mask_threshold=mask_threshold)
        return Regenerated(images, list(rows), scores, 0, 5, masks + 10 * torch.from_numpy(mask_copy).view(3, 1, 1, 1))

    new = filter_copies(images, labels, rows, tmp_path / "eval", regenerate, masks)
    assert seen == {"keep": [True, False, False], "mask_copy": [False, False, True], "mask_threshold": 0.8}
    assert new.masks[:, 0, 0, 0].tolist() == [0, 1, 12] and new.note.endswith("and 2 regenerated")
    # without masks the mask audit is not read: only the image copy goes, the note as before
    assert filter_copies(images, labels, rows, tmp_path / "eval").note.endswith("1 of 3 samples dropped")
    _, _, _, _ = _mask_audit(tmp_path, ("", "", "0.5"))  # no mask copy: the image-copy path alone
    kept = filter_copies(images, labels, rows, tmp_path / "eval", masks=masks)
    assert [r["index"] for r in kept.rows] == [0, 2] and "0 generated masks copying" in kept.note


def test_share_refuses_images_conditioned_on_real_patients_masks_even_with_allow_failed_audit(tmp_path):
    from .test_segmentation import add_sample_masks

    _audited(tmp_path, verdict="pass", failed=[])
    masks = torch.zeros(3, 1, 4, 4, dtype=torch.long)
    masks[:, :, 1:3, 1:3] = 1
    add_sample_masks(tmp_path / "samples", masks, source="real")  # sample.masks=prepared:<split>
    samples = json.loads((tmp_path / "eval" / "privacy.json").read_text())
    (tmp_path / "eval" / "privacy.json").write_text(
        json.dumps(samples | {"samples_id": samples_id(tmp_path / "samples")})
    )
    for extra in ([], ["export.allow_failed_audit=true"]):  # not an audit result: the override does not lift it
        with pytest.raises(ExportError) as err:
            _share(tmp_path, *extra)
        message = str(err.value)
        assert message.startswith("3 of 3 samples are conditioned on real patients' masks (mask_source=real")
        assert "sample.masks=generate" in message and "export.profile=augment" in message and "\n" not in message
        assert not (tmp_path / "export").exists()
    result = _share(tmp_path, "export.profile=augment")  # for use where the training data may be used
    assert result["samples"] == 3 and (tmp_path / "export" / "labelsTr").is_dir()
    add_sample_masks(tmp_path / "samples", masks, source="generated")  # new masks: shared as before
    (tmp_path / "eval" / "privacy.json").write_text(
        json.dumps(samples | {"samples_id": samples_id(tmp_path / "samples")})
    )
    assert _share(tmp_path)["samples"] == 3

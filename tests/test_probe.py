"""Memorisation-aware checkpoints (medaug.probe): best_private on a planted probe history, the probe hook on a tiny
training run, and `medaug sample ckpt_path=best_private`."""

import json

import pytest
import torch

from medaug.model import file_id
from medaug.privacy import PrivacyFlags
from medaug.probe import BEST_PRIVATE, best_private, chained, read_probes, write_probe


def _row(step, val_loss, closer=0.5, p=0.5, auc=0.5, lo=0.4, copy_rate=0.0):
    metrics = {
        "privacy/copy_rate": copy_rate,
        "privacy/copies": copy_rate * 12,
        "privacy/threshold": 0.9,
        "privacy/memorised_patients": 0.0,
        "privacy/closer_to_train": closer,
        "privacy/closer_to_train_p": p,
        "privacy/dcr_ratio": 1.1,
        "privacy/mia_auc": auc,
        "privacy/mia_auc_lo": lo,
        "privacy/mia_auc_hi": min(1.0, auc + 0.1),
        "privacy/mia_tpr_at_1pct_fpr": 0.0,
    }
    return dict(step=step, checkpoint=f"step_{step}.pt", samples=12, verdict="?", val_loss=val_loss, metrics=metrics)


@pytest.fixture
def history(tmp_path):
    """Four probes: the model gets better (val loss falls) and starts to memorise after step 200."""
    rows = [
        _row(100, 0.30),
        _row(200, 0.20),
        _row(300, 0.15, closer=0.7, p=0.001),  # best fidelity, but closer to train significantly
        _row(400, 0.12, auc=0.8, lo=0.7),  # better still, and its members are found
    ]
    for r in rows:
        write_probe(tmp_path, r)
        (tmp_path / r["checkpoint"]).write_bytes(b"x")
    return tmp_path


def test_best_private_takes_the_best_fidelity_that_passes_the_flags(history):
    assert [r["step"] for r in read_probes(history)] == [100, 200, 300, 400]
    assert best_private(history) == history / "step_200.pt"
    # the flags are judged again when choosing: lenient flags let the later checkpoints through
    lenient = PrivacyFlags(max_closer_share=0.75, max_mia_auc=0.9)
    assert best_private(history, lenient) == history / "step_400.pt"
    assert best_private(history, PrivacyFlags(max_closer_share=0.75)) == history / "step_300.pt"  # 400 still fails
    write_probe(history, _row(200, 0.30))  # a resumed run probes step 200 again: replaced, a tie with 100
    assert len(read_probes(history)) == 4 and best_private(history) == history / "step_200.pt"  # later on a tie
    (history / "step_200.pt").unlink()  # a probe without its checkpoint file is not a candidate
    assert best_private(history) == history / "step_100.pt"


def test_best_private_names_each_failed_probe_or_the_missing_history(history, tmp_path_factory):
    strict = PrivacyFlags(max_closer_share=0.4, alpha=1.0)  # every share of 0.5 is now "significant"
    with pytest.raises(ValueError) as err:
        best_private(history, strict)
    assert "step 100: closer_to_train 0.50 > 0.40" in str(err.value) and "step 400: closer_to_train" in str(err.value)
    assert "training.dp.enabled=true" in str(err.value)
    with pytest.raises(FileNotFoundError, match="training.privacy_probe_every"):
        best_private(tmp_path_factory.mktemp("none"))


def test_chained_calls_every_callback_in_order():
    seen = []
    assert chained(None, None) is None
    chained(lambda s: seen.append(("a", s)), None, lambda s: seen.append(("b", s)))(3)
    assert seen == [("a", 3), ("b", 3)]


@pytest.mark.slow
def test_probe_hook_keeps_checkpoints_with_their_probes_and_sample_takes_best_private(tmp_path):
    from pipelines import prepare, sample, train

    from .conftest import TINY, compose_cfg

    lenient = ["evaluate.privacy.max_copy_rate=1.0", "evaluate.privacy.max_closer_share=1.0"]
    overrides = ["experiment=demo_2d", *TINY, "training.privacy_probe_every=2", *lenient]
    prepare.run(compose_cfg("prepare", tmp_path, overrides))
    train.run(compose_cfg("train", tmp_path, overrides))
    ckpts = tmp_path / "train" / "checkpoints"
    rows = read_probes(ckpts)
    assert [r["step"] for r in rows] == [2, 4] and all((ckpts / f"step_{s}.pt").is_file() for s in (2, 4))
    assert torch.load(ckpts / "step_2.pt", weights_only=True)["step"] == 2
    row = rows[0]
    assert row["samples"] == 3 * 2 and row["verdict"] in ("pass", "warn", "fail") and row["val_loss"] > 0
    assert 0 <= row["metrics"]["privacy/mia_auc"] <= 1 and "privacy/closer_to_train_p" in row["metrics"]
    assert json.loads((ckpts / "probes.json").read_text())["fidelity"] == "probe/val_loss"
    chosen = best_private(ckpts, PrivacyFlags(max_copy_rate=1.0, max_closer_share=1.0, max_mia_auc=1.0))
    sample.run(
        compose_cfg("sample", tmp_path, [*overrides, f"ckpt_path={BEST_PRIVATE}", "evaluate.privacy.max_mia_auc=1.0"])
    )
    info = json.loads((tmp_path / "samples" / "info.json").read_text())
    assert info["checkpoint_id"] == file_id(chosen) and info["checkpoint_step"] in (2, 4)


def test_the_probe_draws_the_samples_that_sample_draws_from_its_checkpoint(tmp_path, monkeypatch):
    """What the probe judges is what the audit will judge: the same images, not a cheaper stand-in."""
    import medaug.probe
    from medaug.data import load_split
    from medaug.sampling import load_samples
    from pipelines import prepare, sample, train

    from .conftest import TINY, compose_cfg

    judged = {}
    audit = medaug.probe.privacy_audit

    def spy(synth, train, heldout, *args, **kwargs):
        judged[len(judged)] = synth.clone(), len(heldout)
        return audit(synth, train, heldout, *args, **kwargs)

    monkeypatch.setattr(medaug.probe, "privacy_audit", spy)
    overrides = ["experiment=demo_2d", *TINY, "training.privacy_probe_every=4", "sample.num_per_class={healthy: 3}"]
    prepare.run(compose_cfg("prepare", tmp_path, overrides))
    train.run(compose_cfg("train", tmp_path, overrides))
    assert read_probes(tmp_path / "train" / "checkpoints")[0]["samples"] == 3
    sample.run(compose_cfg("sample", tmp_path, [*overrides, f"ckpt_path={tmp_path / 'train/checkpoints/step_4.pt'}"]))
    images, labels = load_samples(tmp_path / "samples")[:2]
    assert labels.tolist() == [0, 0, 0]
    assert torch.allclose(judged[0][0], images, atol=1e-5)
    splits = [load_split(tmp_path / "prepared", s)[0] for s in ("val", "test")]
    assert judged[0][1] == sum(len(x) for x in splits)  # against evaluate.real_split=[val, test], as the audit

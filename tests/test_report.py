"""Evaluation pictures and the Markdown report."""

import numpy as np
import pytest
import torch
from PIL import Image

from medaug.report import nearest_pairs, score_histograms, side_by_side, write_report


def test_nearest_pairs_draws_the_top_scores_in_a_grid(tmp_path):
    synth, train = torch.rand(20, 1, 8, 8) * 2 - 1, torch.rand(5, 1, 8, 8) * 2 - 1
    scores = np.linspace(0, 1, 20)
    out = nearest_pairs(synth, train, scores, np.arange(20) % 5, 0.9, tmp_path / "p.png", top=6, columns=4)
    w, h = Image.open(out).size
    assert w == 4 * (2 * 64 + 4 + 8) and h == 18 + 2 * (64 + 18)  # 6 pairs: 4 columns, 2 rows
    vol = nearest_pairs(
        torch.zeros(2, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 8), np.zeros(2), np.zeros(2, int), 0.5, tmp_path / "v.png"
    )
    assert Image.open(vol).size[0] == 2 * (2 * 3 * 64 + 4 + 8)  # 3D: three planes per image
    with pytest.raises(ValueError, match="no synthetic samples"):
        nearest_pairs(synth[:0], train, scores[:0], np.zeros(0, int), 0.9, tmp_path / "e.png")


def test_histograms_and_side_by_side(tmp_path):
    out = score_histograms(
        {"pixel": np.array([0.5, 0.6]), "embedding": np.array([0.9])},
        {"pixel": np.array([0.95, 0.97]), "embedding": np.array([0.99, 1.0])},
        {"pixel": 0.96, "embedding": 0.995},
        tmp_path / "h.png",
    )
    assert Image.open(out).size == (480, 400)
    Image.new("L", (10, 20)).save(tmp_path / "a.png")
    Image.new("L", (30, 10)).save(tmp_path / "b.png")
    assert Image.open(side_by_side(tmp_path / "a.png", tmp_path / "b.png", tmp_path / "s.png")).size == (52, 36)


def test_report_lists_verdict_floors_and_utility(tmp_path):
    metrics = {
        "fidelity/fd": 12.0,
        "fidelity/fd_floor": 1.0,
        "fidelity/kid": 0.5,
        "fidelity/kid_std": 1e-17,
        "fidelity/kid_floor": float("nan"),
        "fidelity/fd/a": 3.0,
    }
    for name in ("real", "tstr", "augmented"):
        metrics |= {f"utility/{name}_{k}": 0.8 for k in ("acc", "acc_std", "auc", "auc_std")}
    metrics |= {f"utility/aug_gain_{k}": 0.0 for k in ("acc", "acc_std", "auc", "auc_std")}
    privacy = {"verdict": "warn", "checks": ["copy rate 0.0%"], "reasons": ["DCR ratio 0.5"]}
    text = write_report(
        tmp_path / "r.md", metrics, ["a"], ["my encoder"], privacy, {"pairs": "p.png"}, {"samples": "3"}
    ).read_text()
    assert "**WARN**" in text and "- DCR ratio 0.5" in text and "feature extractor: my encoder" in text
    assert "| `fidelity/fd` | 12 | 1 | lower |" in text and "| `fidelity/kid` | 0.5 ± 0 | n/a | lower |" in text
    assert "| a | 3 (n/a)" in text and "| synthetic only (TSTR) | 0.8 ± 0.8" in text and "![pairs](p.png)" in text


def test_report_warns_when_the_real_trained_classifier_learned_little(tmp_path):
    privacy = {"verdict": "pass", "checks": [], "reasons": []}
    weak = write_report(
        tmp_path / "w.md", {"fidelity/fd": 1.0, "fidelity/label_kappa_real": 0.06}, ["a"], ["e"], privacy, {}, {}
    ).read_text()
    assert "**Weak classifier.**" in weak and "kappa 0.06 < 0.2" in weak and "evaluate.classifier_steps" in weak
    for kappa in (0.9, float("nan")):
        ok = write_report(
            tmp_path / "o.md", {"fidelity/fd": 1.0, "fidelity/label_kappa_real": kappa}, ["a"], ["e"], privacy, {}, {}
        ).read_text()
        assert "Weak classifier" not in ok


def test_report_says_when_a_set_was_too_small_for_kid(tmp_path):
    privacy = {"verdict": "pass", "checks": [], "reasons": []}
    nan = float("nan")
    small = {
        "fidelity/fd": 1.0,
        "fidelity/kid": nan,
        "fidelity/kid_std": nan,
        "fidelity/kid_floor": nan,
        "fidelity/kid_too_small": 1.0,
        "fidelity/kid/a": nan,
        "fidelity/kid_too_small/a": 1.0,
        "fidelity/kid/b": 0.01,
        "fidelity/kid_too_small/b": 0.0,
    }
    text = write_report(tmp_path / "s.md", small, ["a", "b"], ["e"], privacy, {}, {}).read_text()
    note = [line for line in text.splitlines() if "KID left out" in line]
    assert len(note) == 1 and "`fidelity/kid`, `fidelity/kid/a`:" in note[0] and "fewer than 10 samples" in note[0]
    assert "fidelity/kid/b" not in note[0] and "| `fidelity/kid` | n/a | n/a | lower |" in text
    ok = dict(
        small,
        **{
            "fidelity/kid": 0.02,
            "fidelity/kid_std": 0.01,
            "fidelity/kid_too_small": 0.0,
            "fidelity/kid_too_small/a": 0.0,
        },
    )
    assert "KID left out" not in write_report(tmp_path / "o.md", ok, ["a"], ["e"], privacy, {}, {}).read_text()

"""Pictures and the one-page report of an evaluation, drawn with numpy and PIL only.

* ``side_by_side``: the synthetic grid beside the real grid (one row per class);
* ``nearest_pairs``: the most suspicious synthetic samples, each beside its nearest
  training image, with the correlation and whether it is above the copy threshold;
* ``score_histograms``: nearest-neighbour correlation to training, synthetic vs held-out
  real, with the threshold;
* ``write_report``: ``report.md`` with every number beside its real-vs-real reference, and a note
  naming the KIDs left out because a set was too small.

Example::

    nearest_pairs(synth_x, train_x, audit.scores.score, audit.scores.nn_index, audit.scores.threshold, "pairs.png")
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .metrics import KID_MIN_SAMPLES
from .pictures import save_grid, views

SYNTH_RGB, REAL_RGB, LINE_RGB = (214, 69, 65), (52, 120, 198), (30, 30, 30)


def _text(draw: ImageDraw.ImageDraw, xy, text: str, fill=(0, 0, 0)) -> None:
    draw.text(xy, text, fill=fill, font=ImageFont.load_default())


def _tile(image: torch.Tensor, scale: int) -> np.ndarray:
    t = np.concatenate(views(image), axis=1)
    return t.repeat(scale, 0).repeat(scale, 1)


def side_by_side(left: str | Path, right: str | Path, out: str | Path, titles=("synthetic", "real")) -> Path:
    """Two PNGs next to each other on white, each with a title above: ``out``."""
    a, b = Image.open(left).convert("RGB"), Image.open(right).convert("RGB")
    gap, top = 12, 16
    canvas = Image.new("RGB", (a.width + b.width + gap, max(a.height, b.height) + top), "white")
    canvas.paste(a, (0, top))
    canvas.paste(b, (a.width + gap, top))
    draw = ImageDraw.Draw(canvas)
    _text(draw, (2, 2), titles[0])
    _text(draw, (a.width + gap + 2, 2), titles[1])
    out = Path(out)
    canvas.save(out)
    return out


def nearest_pairs(
    synth: torch.Tensor,
    train: torch.Tensor,
    scores: np.ndarray,
    nn_index: np.ndarray,
    threshold: float,
    out: str | Path,
    top: int = 16,
    columns: int = 4,
    min_tile: int = 64,
) -> Path:
    """The ``top`` synthetic samples with the highest ``scores`` (N,), each as [synthetic | nearest training
    image ``train[nn_index[i]]``] with ``r=<score>`` and ``COPY`` when above ``threshold``; 3D volumes show
    their three mid-planes. Images ``(N, 1, *spatial)`` in [-1, 1]."""
    order = np.argsort(-np.asarray(scores))[:top]
    if len(order) == 0:
        raise ValueError("no synthetic samples to draw")
    scale = max(1, -(-min_tile // min(synth.shape[2:])))
    cells = []
    for i in order:
        pair = np.concatenate(
            [
                _tile(synth[i], scale),
                np.full((_tile(synth[i], scale).shape[0], 4), 255, np.uint8),
                _tile(train[int(nn_index[i])], scale),
            ],
            axis=1,
        )
        cell = Image.new("RGB", (pair.shape[1] + 8, pair.shape[0] + 18), "white")
        cell.paste(Image.fromarray(pair).convert("RGB"), (4, 0))
        copy = scores[i] > threshold
        _text(
            ImageDraw.Draw(cell),
            (4, pair.shape[0] + 3),
            f"#{i} r={scores[i]:.3f}{'  COPY' if copy else ''}",
            SYNTH_RGB if copy else (0, 0, 0),
        )
        cells.append(cell)
    w, h = cells[0].size
    rows = math.ceil(len(cells) / columns)
    head = 18
    canvas = Image.new("RGB", (w * min(columns, len(cells)), h * rows + head), "white")
    _text(ImageDraw.Draw(canvas), (4, 3), f"synthetic | nearest training image   (copy threshold r > {threshold:.3f})")
    for k, cell in enumerate(cells):
        canvas.paste(cell, ((k % columns) * w, head + (k // columns) * h))
    out = Path(out)
    canvas.save(out)
    return out


def _histogram_panel(
    synth: np.ndarray, heldout: np.ndarray, threshold: float, title: str, size=(480, 200), bins: int = 30
) -> Image.Image:
    w, h = size
    left, bottom, top = 40, 28, 20
    lo = float(min(synth.min(initial=1.0), heldout.min(initial=1.0)))
    hi = 1.0 if max(synth.max(initial=lo), heldout.max(initial=lo)) <= 1.0 else float(max(synth.max(), heldout.max()))
    lo = min(lo, threshold, hi - 1e-3)
    edges = np.linspace(lo, hi, bins + 1)
    hs = np.histogram(synth, edges)[0] / max(len(synth), 1)
    hh = np.histogram(heldout, edges)[0] / max(len(heldout), 1)
    peak = max(hs.max(initial=0), hh.max(initial=0), 1e-9)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    plot_w, plot_h = w - left - 10, h - bottom - top

    def x_of(v: float) -> float:
        return left + (v - lo) / (hi - lo) * plot_w

    for values, colour, inset in ((hh, REAL_RGB, 0), (hs, SYNTH_RGB, 2)):
        for k, v in enumerate(values):
            if v > 0:
                x0, x1 = x_of(edges[k]) + inset, x_of(edges[k + 1]) - inset
                d.rectangle([x0, h - bottom - v / peak * plot_h, max(x0, x1 - 1), h - bottom], outline=colour)
    d.line([left, h - bottom, w - 10, h - bottom], fill=LINE_RGB)
    xt = x_of(threshold)
    d.line([xt, top, xt, h - bottom], fill=LINE_RGB, width=2)
    label = f"threshold {threshold:.3f}"
    _text(d, (xt + 3 if xt < w - 110 else xt - 6 * len(label) - 3, top), label)
    _text(d, (left, h - bottom + 4), f"{lo:.3f}")
    _text(d, (w - 50, h - bottom + 4), f"{hi:.3f}")
    _text(d, (left, h - 12), "highest correlation to a training image", LINE_RGB)
    _text(d, (4, 4), title)
    _text(d, (w - 200, 4), f"synthetic (n={len(synth)})", SYNTH_RGB)
    _text(d, (w - 100, 4), f"held-out (n={len(heldout)})", REAL_RGB)
    return img


def score_histograms(
    synth: Mapping[str, np.ndarray], heldout: Mapping[str, np.ndarray], thresholds: Mapping[str, float], out: str | Path
) -> Path:
    """One panel per space (pixel, embedding): share of samples per bin of nearest-training correlation,
    synthetic (red) vs held-out real (blue), with the copy threshold."""
    panels = [
        _histogram_panel(np.asarray(synth[s]), np.asarray(heldout[s]), thresholds[s], f"{s} space") for s in synth
    ]
    canvas = Image.new("RGB", (panels[0].width, sum(p.height for p in panels)), "white")
    for k, p in enumerate(panels):
        canvas.paste(p, (0, k * p.height))
    out = Path(out)
    canvas.save(out)
    return out


def write_pictures(
    folder: str | Path,
    synth: torch.Tensor,
    synth_y: torch.Tensor,
    real: torch.Tensor,
    real_y: torch.Tensor,
    train: torch.Tensor,
    class_names: Sequence[str],
    scores,
    top: int = 16,
) -> dict[str, str]:
    """Every evaluation picture into ``folder``: class grids (synthetic, real, side by side), the ``top``
    nearest pairs and the score histograms of ``scores`` (``privacy.CopyScores``). Returns ``{caption: file}``."""
    folder = Path(folder)
    save_grid(real, real_y, class_names, folder / "real_grid.png")
    save_grid(synth, synth_y, class_names, folder / "synthetic_grid.png")
    side_by_side(folder / "synthetic_grid.png", folder / "real_grid.png", folder / "grids.png")
    nearest_pairs(synth, train, scores.score, scores.nn_index, scores.threshold, folder / "nearest_pairs.png", top=top)
    score_histograms(scores.corr, scores.heldout, scores.thresholds, folder / "nn_histograms.png")
    return {
        "synthetic (left) beside held-out real (right), one row per class": "grids.png",
        f"the {top} synthetic samples most like a training image": "nearest_pairs.png",
        "nearest-training correlation, synthetic vs held-out": "nn_histograms.png",
    }


WEAK_KAPPA = 0.2  # Cohen's kappa below this is "slight" agreement (Landis and Koch, 1977)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return "0" if abs(v) < 1e-9 else f"{v:.4g}"


def write_report(
    path: str | Path,
    metrics: Mapping[str, float],
    class_names: Sequence[str],
    extractors: Sequence[str],
    privacy: Mapping,
    images: Mapping[str, str],
    context: Mapping[str, str],
) -> Path:
    """The one-page ``report.md``: how the numbers were made, fidelity with floors, diversity, label
    fidelity, utility, the privacy verdict with its checks, and the pictures (``{caption: file}``)."""
    m = dict(metrics)
    lines = ["# Evaluation report", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    lines += [f"- feature extractor: {e}" for e in extractors]
    lines += ["", f"## Privacy verdict: **{privacy['verdict'].upper()}**", ""]
    lines += [f"- {c}" for c in privacy["checks"]]
    if privacy["reasons"]:
        lines += ["", "Flags raised:"] + [f"- {r}" for r in privacy["reasons"]]
    lines += ["", "## Fidelity (synthetic vs held-out real; floor = real half vs real half, same size)", ""]
    kappa = m.get("fidelity/label_kappa_real")
    if kappa is not None and math.isfinite(kappa) and kappa < WEAK_KAPPA:
        lines += [
            f"> **Weak classifier.** The classifier trained on the real train split barely tells the classes "
            f"apart on held-out real data (Cohen's kappa {_fmt(kappa)} < {WEAK_KAPPA}). Label fidelity says "
            "little then, and neither do the feature metrics below when that classifier is their encoder "
            "(the default). Raise `evaluate.classifier_steps` or set `evaluate.encoder.weights`, and look "
            "at the pictures.",
            "",
        ]
    lines += ["| metric | synthetic | real-vs-real floor | better |", "| --- | --- | --- | --- |"]
    better = dict(fd="lower", kid="lower", precision="higher", recall="higher", density="≈ 1", coverage="higher")
    for suffix in ("", "_25d"):
        for name, how in better.items():
            key = f"fidelity/{name}{suffix}"
            if key in m:
                value, floor = _fmt(m[key]), _fmt(m.get(key + "_floor"))
                if name == "kid":  # a spread beside a number only
                    value += f" ± {_fmt(m.get(f'fidelity/kid_std{suffix}'))}" if value != "n/a" else ""
                    floor += f" ± {_fmt(m.get(f'fidelity/kid_std{suffix}_floor'))}" if floor != "n/a" else ""
                lines.append(f"| `{key}` | {value} | {floor} | {how} |")
    small = [
        f"`{k.replace('kid_too_small', 'kid', 1)}`"
        for k, v in m.items()
        if k.startswith("fidelity/kid_too_small") and v == 1
    ]
    if small:
        lines += [
            "",
            f"> **KID left out** for {', '.join(small)}: a set there has fewer than {KID_MIN_SAMPLES} "
            "samples, too few for KID and its spread (NaN in `metrics.json`, `fidelity/kid_too_small...` = 1). "
            "Evaluate more samples or read FD and the pictures.",
        ]
    lines += [
        "",
        "## Per class",
        "",
        "| class | FD (floor) | label acc (real) | MS-SSIM diversity synthetic (real) | copy rate |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in class_names:
        lines.append(
            f"| {c} | {_fmt(m.get(f'fidelity/fd/{c}'))} ({_fmt(m.get(f'fidelity/fd_floor/{c}'))}) "
            f"| {_fmt(m.get(f'fidelity/label_acc/{c}'))} ({_fmt(m.get(f'fidelity/label_acc_real/{c}'))}) "
            f"| {_fmt(m.get(f'diversity/msssim/{c}'))} ({_fmt(m.get(f'diversity/msssim_real/{c}'))}) "
            f"| {_fmt(m.get(f'privacy/copy_rate/{c}'))} |"
        )
    lines += [
        "",
        f"Label fidelity overall: accuracy {_fmt(m.get('fidelity/label_acc'))} "
        f"(held-out real {_fmt(m.get('fidelity/label_acc_real'))}), Cohen's kappa "
        f"{_fmt(m.get('fidelity/label_kappa'))} (real {_fmt(m.get('fidelity/label_kappa_real'))}). "
        "MS-SSIM near 1 means a collapsed class.",
        "",
    ]
    if "utility/real_acc" in m:
        lines += [
            "## Utility (classifier tested on held-out real, mean ± std over seeds)",
            "",
            "| trained on | accuracy | macro AUC |",
            "| --- | --- | --- |",
        ]
        for name, label in (
            ("real", "real only"),
            ("tstr", "synthetic only (TSTR)"),
            ("augmented", "real + synthetic"),
        ):
            lines.append(
                f"| {label} | {_fmt(m[f'utility/{name}_acc'])} ± {_fmt(m[f'utility/{name}_acc_std'])} "
                f"| {_fmt(m[f'utility/{name}_auc'])} ± {_fmt(m[f'utility/{name}_auc_std'])} |"
            )
        lines += [
            "",
            f"Augmentation gain: accuracy {_fmt(m['utility/aug_gain_acc'])} ± "
            f"{_fmt(m['utility/aug_gain_acc_std'])}, AUC {_fmt(m['utility/aug_gain_auc'])} ± "
            f"{_fmt(m['utility/aug_gain_auc_std'])}.",
            "",
        ]
    lines += ["## Pictures", ""] + [f"- {caption}: ![{caption}]({file})" for caption, file in images.items()]
    lines += ["", "All numbers: `metrics.json` (the same as in MLflow); per-sample copy scores: `per_sample.csv`."]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def segmentation_section(metrics: Mapping[str, float], labels: Sequence[str], steps: int) -> str:
    """The report's segmentation section (Markdown): mask fidelity beside its real floor, segmentation utility per
    training set and label (Dice, HD95 in mm, mean ± std over seeds) and the generated masks' copy rate."""
    m = dict(metrics)
    lines = [
        "",
        f"## Segmentation (tiny MONAI UNet, {steps} steps, tested on held-out real)",
        "",
        f"Mask fidelity: a segmenter trained on the real train split reaches Dice "
        f"{_fmt(m.get('segmentation/fidelity_dice'))} on the synthetic images against the masks they were made "
        f"with, and {_fmt(m.get('segmentation/fidelity_dice_real'))} on held-out real images (the floor).",
        "",
    ]
    if "segmentation/dice/real" in m:
        lines += ["| trained on | label | Dice | HD95 (mm) |", "| --- | --- | --- | --- |"]
        for name, title in (("real", "real only"), ("synthetic", "synthetic only"), ("mixed", "real + synthetic")):
            for label in ["all", *labels]:
                at = "" if label == "all" else f"/{label}"
                dice, hd = f"segmentation/dice/{name}", f"segmentation/hd95/{name}"
                lines.append(
                    f"| {title} | {label} | {_fmt(m.get(dice + at))} ± {_fmt(m.get(dice + '_std' + at))} "
                    f"| {_fmt(m.get(hd + at))} ± {_fmt(m.get(hd + '_std' + at))} |"
                )
        lines += [
            "",
            f"Segmentation gain (Dice, real + synthetic minus real): {_fmt(m.get('segmentation/dice_gain'))} ± "
            f"{_fmt(m.get('segmentation/dice_gain_std'))}.",
            "",
        ]
    if "privacy/mask_copy_rate" in m:
        lines += [
            f"Generated masks: copy rate {_fmt(m['privacy/mask_copy_rate'])} (correlation to a training mask above "
            f"{_fmt(m.get('privacy/mask_threshold'))}, the held-out calibration); counted in the privacy verdict.",
            "",
        ]
    return "\n".join(lines)

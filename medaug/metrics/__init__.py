"""Realism, fidelity and utility metrics of a synthetic set against real data."""

from __future__ import annotations

from .classifier import (
    make_classifier,
    train_classifier,
    in_batches,
    device_of_model,
    predict,
    cohen_kappa,
    accuracy_per_class,
)
from .realism import MSSSIM_WEIGHTS, msssim_metric, pairwise_msssim, histogram_w1, realism_metrics
from .fidelity import (
    FeatureExtractor,
    PLANES,
    plane_slice,
    slices_for_training,
    PlaneFeatureExtractor,
    load_weights,
    frechet_distance,
    KID_MIN_SAMPLES,
    kernel_inception_distance,
    knn_radii,
    precision_recall,
    density_coverage,
    feature_metrics,
    fidelity_with_floor,
    fidelity_metrics,
)
from .utility import predict_proba, macro_auc, UtilityResult, utility_metrics

__all__ = [
    "make_classifier",
    "train_classifier",
    "in_batches",
    "device_of_model",
    "predict",
    "cohen_kappa",
    "accuracy_per_class",
    "MSSSIM_WEIGHTS",
    "msssim_metric",
    "pairwise_msssim",
    "histogram_w1",
    "realism_metrics",
    "FeatureExtractor",
    "PLANES",
    "plane_slice",
    "slices_for_training",
    "PlaneFeatureExtractor",
    "load_weights",
    "frechet_distance",
    "KID_MIN_SAMPLES",
    "kernel_inception_distance",
    "knn_radii",
    "precision_recall",
    "density_coverage",
    "feature_metrics",
    "fidelity_with_floor",
    "fidelity_metrics",
    "predict_proba",
    "macro_auc",
    "UtilityResult",
    "utility_metrics",
]

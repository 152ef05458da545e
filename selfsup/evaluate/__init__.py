"""Evaluation protocols (kNN, linear probe, fine-tuning on label fractions), collapse monitors."""

from selfsup.evaluate.collapse import (
    CollapseMonitor,
    Verdict,
    alignment,
    collapse_metrics,
    condition_number,
    effective_rank,
    eigenvalue_spectrum,
    feature_std,
    uniformity,
)
from selfsup.evaluate.features import extract_features
from selfsup.evaluate.finetune import finetune, supervised_baseline
from selfsup.evaluate.knn import knn_accuracy, knn_predict, topk_accuracy
from selfsup.evaluate.linear import (
    fold_batchnorm_head,
    fold_standardisation,
    linear_probe,
    linear_probe_features,
)
from selfsup.evaluate.subsets import balanced_subset, load_subset, save_subset

__all__ = [
    "CollapseMonitor",
    "Verdict",
    "alignment",
    "balanced_subset",
    "collapse_metrics",
    "condition_number",
    "effective_rank",
    "eigenvalue_spectrum",
    "extract_features",
    "feature_std",
    "finetune",
    "fold_batchnorm_head",
    "fold_standardisation",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "linear_probe_features",
    "load_subset",
    "save_subset",
    "supervised_baseline",
    "topk_accuracy",
    "uniformity",
]

"""Collapse statistics and the collapse monitor, on synthetic features with known answers."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from selfsup.errors import CollapseError, ConfigError
from selfsup.evaluate.collapse import (
    CollapseMonitor,
    alignment,
    collapse_metrics,
    condition_number,
    effective_rank,
    eigenvalue_spectrum,
    feature_std,
    uniformity,
)


def gaussian(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def constant(n: int = 64, d: int = 32) -> torch.Tensor:
    return gaussian(1, d).expand(n, d).clone()


def rank_k(n: int, d: int, k: int, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    """``[n, d]`` with exactly ``k`` equal singular values ``scale`` and centred columns."""
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(n, k, generator=g)
    left, _ = torch.linalg.qr(left - left.mean(dim=0))  # orthonormal, still centred
    right, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
    return scale * left @ right.T


# --- loop references of the papers' formulas ---


def feature_std_reference(z: torch.Tensor) -> float:
    rows = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in z.tolist()]
    n, d = len(rows), len(rows[0])
    stds = []
    for j in range(d):
        col = [rows[i][j] for i in range(n)]
        mean = sum(col) / n
        stds.append(math.sqrt(sum((v - mean) ** 2 for v in col) / (n - 1)))
    return sum(stds) / d


def uniformity_reference(z: torch.Tensor, t: float = 2.0) -> float:
    rows = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in z.tolist()]
    terms = [
        math.exp(-t * sum((a - b) ** 2 for a, b in zip(x, y, strict=True)))
        for x, y in itertools.combinations(rows, 2)
    ]
    return math.log(sum(terms) / len(terms))


def alignment_reference(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0) -> float:
    total = 0.0
    for x, y in zip(z1.tolist(), z2.tolist(), strict=True):
        nx, ny = math.sqrt(sum(v * v for v in x)), math.sqrt(sum(v * v for v in y))
        dist = math.sqrt(sum((a / nx - b / ny) ** 2 for a, b in zip(x, y, strict=True)))
        total += dist**alpha
    return total / len(z1)


def effective_rank_reference(z: torch.Tensor) -> float:
    centred = z.double() - z.double().mean(dim=0)
    sigma = torch.linalg.svdvals(centred).tolist()
    total = sum(sigma)
    entropy = 0.0
    for s in sigma:
        p = s / total + 1e-7
        entropy -= p * math.log(p)
    return math.exp(entropy)


def test_statistics_match_loop_references() -> None:
    z1, z2 = gaussian(12, 5, seed=1) + 0.3, gaussian(12, 5, seed=2)
    assert feature_std(z1) == pytest.approx(feature_std_reference(z1), rel=1e-5)
    assert uniformity(z1) == pytest.approx(uniformity_reference(z1), rel=1e-5)
    assert uniformity(z1, t=0.5) == pytest.approx(uniformity_reference(z1, t=0.5), rel=1e-5)
    assert alignment(z1, z2) == pytest.approx(alignment_reference(z1, z2), rel=1e-5)
    assert alignment(z1, z2, alpha=1) == pytest.approx(alignment_reference(z1, z2, 1), rel=1e-5)
    assert effective_rank(z1) == pytest.approx(effective_rank_reference(z1), rel=1e-6)


# --- constant (fully collapsed) representation ---


def test_constant_representation_is_fully_collapsed() -> None:
    z = constant()
    assert feature_std(z) == pytest.approx(0.0, abs=1e-6)
    assert effective_rank(z) == pytest.approx(1.0, abs=1e-3)
    assert uniformity(z) == pytest.approx(0.0, abs=1e-5)  # every pairwise distance is 0
    assert eigenvalue_spectrum(z).abs().max().item() < 1e-10


# --- rank-k representation ---


@pytest.mark.parametrize("k", [1, 3, 8])
def test_rank_k_representation(k: int) -> None:
    n, d, scale = 100, 32, 3.0
    z = rank_k(n, d, k, scale=scale)
    assert effective_rank(z) == pytest.approx(k, rel=1e-3)
    spectrum = eigenvalue_spectrum(z)
    assert spectrum.shape == (d,)
    assert torch.all(spectrum[:-1] >= spectrum[1:])  # descending
    # k non-zero eigenvalues, all equal to sigma^2 / (N - 1); the rest vanish.
    expected = torch.full((k,), scale**2 / (n - 1))
    torch.testing.assert_close(spectrum[:k], expected, rtol=1e-4, atol=0)
    assert spectrum[k:].max().item() < 1e-6
    assert condition_number(z) > 1e3  # rank deficient -> lambda_min clamped to eps


def test_condition_number_of_known_spectrum() -> None:
    # Columns with std 1 and 10 (independent, many samples): cov ~ diag(1, 100), ratio ~ 100.
    z = gaussian(20000, 2) * torch.tensor([1.0, 10.0])
    assert condition_number(z) == pytest.approx(100.0, rel=0.05)


# --- isotropic Gaussian (healthy) ---


def test_isotropic_gaussian_is_healthy() -> None:
    d = 64
    z = gaussian(4000, d)
    assert feature_std(z) == pytest.approx(1 / math.sqrt(d), rel=0.03)
    assert effective_rank(z) > 0.95 * d
    # Uniform on the sphere in high d: squared distances concentrate at 2, so log E e^{-2*2} ~ -4.
    assert uniformity(gaussian(600, 512, seed=3)) == pytest.approx(-4.0, abs=0.05)
    assert alignment(z, z.clone()) == pytest.approx(0.0, abs=1e-6)
    assert alignment(z, -z) == pytest.approx(4.0, rel=1e-5)  # antipodal views


def test_collapse_metrics_keys_and_values() -> None:
    z = gaussian(256, 16)
    h = gaussian(256, 32, seed=5)
    metrics = collapse_metrics(z, h=h, z2=z * 2.0)
    assert set(metrics) == {
        "z_std",
        "z_std_healthy",
        "z_std_ratio",
        "z_erank",
        "z_dim",
        "z_condition",
        "z_uniformity",
        "h_std",
        "h_std_ratio",
        "h_erank",
        "pair_cos",
        "alignment",
    }
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["z_std_healthy"] == pytest.approx(0.25)
    assert metrics["z_std_ratio"] == pytest.approx(metrics["z_std"] * 4)
    assert metrics["z_std_ratio"] > 0.9
    assert metrics["pair_cos"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["alignment"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["h_erank"] > 25
    assert set(collapse_metrics(z)) == {
        "z_std",
        "z_std_healthy",
        "z_std_ratio",
        "z_erank",
        "z_dim",
        "z_condition",
        "z_uniformity",
    }


def test_collapse_metrics_pair_and_backbone_statistics_use_their_own_inputs() -> None:
    """pair_cos compares z with z2, h_erank centres h, h_std_ratio scales by sqrt(D): each on
    inputs where the wrong variant gives a different number."""
    z = gaussian(256, 16)
    z2 = z + 1.5 * gaussian(256, 16, seed=3)  # an independent noisy view, not a multiple of z
    h = gaussian(256, 64, seed=5) + 5.0  # a large common mean
    metrics = collapse_metrics(z, h=h, z2=z2)
    expected_cos = torch.nn.functional.cosine_similarity(z, z2, dim=1).mean().item()
    assert expected_cos < 0.9
    assert metrics["pair_cos"] == pytest.approx(expected_cos, rel=1e-5)
    assert metrics["h_erank"] == pytest.approx(effective_rank(h), rel=1e-6)
    uncentred = effective_rank(h, center=False)
    assert abs(metrics["h_erank"] - uncentred) > 1.0
    assert metrics["h_std_ratio"] == pytest.approx(feature_std(h) * 8.0, rel=1e-6)


def test_collapse_metrics_work_under_autograd_and_bf16() -> None:
    z = gaussian(64, 8).requires_grad_(True)
    metrics = collapse_metrics(z.to(torch.bfloat16) * 1.0)
    assert math.isfinite(metrics["z_erank"])
    assert z.grad is None


# --- monitor ---

HEALTHY = collapse_metrics(gaussian(256, 32))
COLLAPSED = collapse_metrics(constant(256, 32))


def test_monitor_verdicts_from_metrics() -> None:
    monitor = CollapseMonitor("simsiam", mode="off")
    assert not monitor.check(HEALTHY).collapsed
    verdict = monitor.check(COLLAPSED)
    assert verdict.collapsed and verdict.consecutive == 1
    assert "std" in verdict.reason and "effective rank" in verdict.reason


def test_monitor_rank_criterion_alone() -> None:
    # Outputs on one line through the origin: the normalised spread is large (+-v), the rank is 1.
    signs = torch.where(gaussian(256, 1) > 0, 1.0, -1.0)
    z = signs * gaussian(1, 32, seed=9)
    metrics = collapse_metrics(z)
    assert metrics["z_std_ratio"] > 0.5
    verdict = CollapseMonitor(mode="off").check(metrics)
    assert verdict.collapsed and "effective rank" in verdict.reason and "std" not in verdict.reason


def axis_aligned(n: int, d: int, k: int, seed: int = 0) -> torch.Tensor:
    """``[n, d]`` Gaussian in the first ``k`` coordinates, zero in the others."""
    z = torch.zeros(n, d)
    z[:, :k] = gaussian(n, k, seed=seed)
    return z


def test_monitor_std_threshold_near_its_default() -> None:
    """k of d axis-aligned directions score sqrt(k/d): 2 of 64 (~0.18) is below the 0.2
    threshold, 16 of 64 (0.5) is well above it."""
    monitor = CollapseMonitor(mode="off")
    narrow = collapse_metrics(axis_aligned(512, 64, 2))
    assert narrow["z_std_ratio"] == pytest.approx(math.sqrt(2 / 64), rel=0.1)
    verdict = monitor.check(narrow)
    assert verdict.collapsed and "std" in verdict.reason
    wide = collapse_metrics(axis_aligned(512, 64, 16))
    assert wide["z_std_ratio"] == pytest.approx(0.5, rel=0.1) and wide["z_erank"] >= 3
    assert not monitor.check(wide).collapsed


def test_monitor_stop_mode_respects_patience_and_explains() -> None:
    monitor = CollapseMonitor("simsiam", mode="stop", patience=3)
    monitor.check(COLLAPSED, step=100)
    monitor.check(COLLAPSED, step=200)
    assert not monitor.check(HEALTHY, step=300).collapsed  # a healthy check resets the streak
    monitor.check(COLLAPSED, step=400)
    monitor.check(COLLAPSED, step=500)
    with pytest.raises(CollapseError) as info:
        monitor.check(COLLAPSED, step=600)
    message = str(info.value)
    assert "3 consecutive checks" in message
    assert "step 600" in message
    assert f"{COLLAPSED['z_erank']:.3g}" in message  # the numbers seen
    assert "stop-gradient" in message and "predictor" in message  # SimSiam's likely causes
    assert "train.collapse=warn" in message  # the setting that keeps training going


@pytest.mark.parametrize(
    ("method", "expected"),
    [("byol", "EMA"), ("byol", "tau"), ("simclr", "temperature"), ("moco", "temperature")],
)
def test_monitor_advice_is_method_specific(method: str, expected: str) -> None:
    monitor = CollapseMonitor(method, mode="stop", patience=1)
    with pytest.raises(CollapseError, match=expected):
        monitor.check(COLLAPSED)


def test_monitor_warn_mode_warns_once_per_episode() -> None:
    monitor = CollapseMonitor("byol", mode="warn", patience=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            monitor.check(COLLAPSED)
        assert len(caught) == 1
        assert "tau" in str(caught[0].message)
        monitor.check(HEALTHY)
        monitor.check(COLLAPSED)
        assert len(caught) == 1  # new episode, patience not reached yet
        monitor.check(COLLAPSED)
        assert len(caught) == 2


def test_monitor_off_mode_never_acts() -> None:
    monitor = CollapseMonitor("simsiam", mode="off", patience=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            assert monitor.check(COLLAPSED).collapsed
    assert monitor.consecutive == 4


def test_monitor_ignores_non_finite_metrics_and_validates_settings() -> None:
    monitor = CollapseMonitor(mode="stop", patience=1)
    assert not monitor.check({"z_std_ratio": float("nan"), "z_erank": float("nan")}).collapsed
    with pytest.raises(ConfigError, match="mode"):
        CollapseMonitor(mode="panic")
    with pytest.raises(ConfigError, match="patience"):
        CollapseMonitor(patience=0)


def test_collapse_metrics_tolerate_non_finite_outputs() -> None:
    z = gaussian(32, 8)
    z[3, 2] = float("nan")
    metrics = collapse_metrics(z, h=gaussian(32, 4), z2=gaussian(32, 8))
    assert math.isnan(metrics["z_erank"]) and math.isnan(metrics["pair_cos"])
    assert "h_erank" in metrics and metrics["z_dim"] == 8.0
    assert not CollapseMonitor(mode="stop", patience=1).check(metrics).collapsed


def test_condition_number_ignores_unavoidable_zero_tail() -> None:
    # N = 65 < d = 128: 64 eigenvalues can be non-zero, the rest are zero by construction.
    z = gaussian(65, 128)
    assert condition_number(z) < 1e3
    assert condition_number(rank_k(65, 128, 10)) > 1e6


def test_collapse_monitor_streak_survives_a_checkpoint():
    from selfsup.evaluate.collapse import CollapseMonitor

    collapsed = {"z_std_ratio": 0.01, "z_std": 0.001, "z_std_healthy": 0.1, "z_erank": 1.0,
                 "z_dim": 128}  # fmt: skip
    first = CollapseMonitor("simsiam", mode="stop", patience=3)
    first.check(collapsed)
    first.check(collapsed)
    resumed = CollapseMonitor("simsiam", mode="stop", patience=3)
    resumed.load_state_dict(first.state_dict())
    with pytest.raises(CollapseError):  # the third check in a row, across the resume
        resumed.check(collapsed)

"""Collapse monitors: cheap statistics of one batch of embeddings, and a monitor that acts on them.

Non-contrastive methods (BYOL, SimSiam) have a trivial solution, a constant output, that the loss
alone does not rule out; contrastive methods can still lose dimensions. These statistics,
computed on one batch every few hundred steps, catch both:

* complete collapse (every input mapped to the same vector): :func:`feature_std` -> 0
  (SimSiam, Chen & He 2021, Sec. 4.1 and Fig. 2);
* dimensional collapse (outputs confined to a low-dimensional subspace; Jing et al. 2022):
  :func:`effective_rank` (Roy & Vetterli 2007; RankMe, Garrido et al. 2023) and the covariance
  :func:`eigenvalue_spectrum` / :func:`condition_number`;
* the geometry of the embedding (Wang & Isola 2020): :func:`alignment` of positive pairs and
  :func:`uniformity` on the hypersphere.

:class:`CollapseMonitor` turns them into a verdict, warns or raises
:class:`selfsup.errors.CollapseError` with the numbers seen, the likely causes for the method and
what to change.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.errors import CollapseError, ConfigError

RANKME_EPS = 1e-7  # RankMe's epsilon added to the normalised singular values (Garrido et al. Eq. 1)


def _as_matrix(z: Tensor, name: str = "z") -> Tensor:
    if z.ndim != 2:
        raise ValueError(f"{name} must be [N, d], got {tuple(z.shape)}")
    return z.detach().float()


def feature_std(z: Tensor) -> float:
    """Mean over dimensions of the per-dimension std of the L2-normalised outputs.

    SimSiam (Chen & He 2021) Sec. 4.1: for ``z' = z / ||z||_2`` the channel-wise std averaged
    over the ``d`` channels is ``~ 1 / sqrt(d)`` when ``z'`` is spread over the sphere (e.g.
    isotropic Gaussian ``z``) and ``0`` when the outputs collapse to a constant vector.

    Args:
        z: ``[N, d]`` embeddings, ``N >= 2``.

    Returns:
        ``mean_j std_i(z'_ij)`` (unbiased std over the batch).
    """
    z = _as_matrix(z)
    if z.shape[0] < 2:
        raise ValueError("feature_std needs at least 2 samples")
    return F.normalize(z, dim=1).std(dim=0).mean().item()


def centred_singular_values(z: Tensor) -> Tensor:
    """Singular values of the batch-centred ``z``, descending, float64 on the CPU.

    ``[N, d]`` -> ``[min(N, d)]``. Computed in float64 on the CPU: for a monitoring batch
    (e.g. 256 x 2048) that is ~0.1 s, exact enough to tell a zero singular value from a small one,
    and independent of the training device.
    """
    z = _as_matrix(z).cpu().double()
    return torch.linalg.svdvals(z - z.mean(dim=0, keepdim=True))


def _effective_rank_from(sigma: Tensor) -> float:
    p = sigma / sigma.sum().clamp_min(torch.finfo(sigma.dtype).tiny) + RANKME_EPS
    return math.exp(-(p * p.log()).sum().item())


def _spectrum_from(sigma: Tensor, n: int, d: int) -> Tensor:
    eig = torch.zeros(d, dtype=torch.float64)
    eig[: sigma.numel()] = sigma.square() / (n - 1)
    return eig.float()


def effective_rank(z: Tensor, *, center: bool = True) -> float:
    """Effective rank: exp of the Shannon entropy of the normalised singular values.

    Roy & Vetterli 2007, Eq. (1)-(2), with RankMe's epsilon (Garrido et al. 2023, Eq. 1):
    ``p_k = sigma_k / sum_j sigma_j + eps``, ``erank = exp(-sum_k p_k log p_k)``. It equals ``k``
    for ``k`` equal non-zero singular values (up to the epsilon, which lifts it a little: 2,050.8
    for 2,048 equal ones) and lies in about ``[1, min(N, d)]``.

    The features are centred first (``center=True``): the rank then measures how many
    directions the batch *varies* in, i.e. the covariance spectrum of Jing et al. 2022. Without
    centring, a large common mean would count as one direction of its own and hide a collapse of
    the variation. An exactly constant batch centres to (numerically) zero and gets ``erank ~ 1``;
    a nearly constant one keeps the rank of its tiny residual noise (which may be full), and only
    :func:`feature_std` sees that it has collapsed.
    Centring makes the rank blind to the *scale* of the variation, which :func:`feature_std`
    covers; the monitor uses both.

    Args:
        z: ``[N, d]`` embeddings.
        center: subtract the batch mean first.

    Returns:
        effective rank (float).
    """
    if center:
        return _effective_rank_from(centred_singular_values(z))
    return _effective_rank_from(torch.linalg.svdvals(_as_matrix(z).cpu().double()))


def eigenvalue_spectrum(z: Tensor) -> Tensor:
    """Eigenvalues of the batch covariance of ``z``, descending (Jing et al. 2022, Fig. 1).

    Computed from the singular values of the centred batch (``lambda_k = sigma_k^2 / (N - 1)``),
    which costs ``O(N^2 d)`` instead of the ``O(d^3)`` of a ``d x d`` eigendecomposition.

    Args:
        z: ``[N, d]`` embeddings, ``N >= 2``.

    Returns:
        float32 ``[d]`` eigenvalues of ``cov(z) = (z - mean)^T (z - mean) / (N - 1)`` on the CPU.
        Only ``min(N - 1, d)`` can be non-zero, so a batch smaller than ``d`` has a zero tail.
    """
    n, d = _as_matrix(z).shape
    if n < 2:
        raise ValueError("eigenvalue_spectrum needs at least 2 samples")
    return _spectrum_from(centred_singular_values(z), n, d)


def _condition_from(eig: Tensor, n: int, eps: float) -> float:
    last = min(n - 1, eig.numel()) - 1  # the smallest eigenvalue this batch size can resolve
    return (eig[0] / eig[last].clamp_min(eps)).item()


def condition_number(z: Tensor, *, eps: float = 1e-12) -> float:
    """``lambda_1 / max(lambda_r, eps)`` of the covariance spectrum, ``r = min(N - 1, d)``.

    Large values (``> 1e3`` in the BYOL notes) mean a few directions dominate. Only the ``r``
    eigenvalues a batch of ``N`` can make non-zero enter the ratio, so a batch smaller than ``d``
    is not flagged for its unavoidable zero tail; a genuinely rank-deficient batch gets
    ``lambda_1 / eps``.
    """
    return _condition_from(eigenvalue_spectrum(z), _as_matrix(z).shape[0], eps)


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> float:
    """Alignment of positive pairs (Wang & Isola 2020, Eq. 4), on L2-normalised embeddings.

    ``E ||f(x) - f(y)||_2^alpha`` over the pairs ``(z1[i], z2[i])``: 0 for identical views, 4 for
    antipodal ones (alpha = 2).

    Args:
        z1, z2: ``[N, d]`` embeddings of two views of the same N inputs.
    """
    z1, z2 = F.normalize(_as_matrix(z1, "z1"), dim=1), F.normalize(_as_matrix(z2, "z2"), dim=1)
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {z1.shape} and {z2.shape}")
    return (z1 - z2).norm(dim=1).pow(alpha).mean().item()


def uniformity(z: Tensor, t: float = 2.0) -> float:
    """Uniformity (Wang & Isola 2020, Eq. 5), on L2-normalised embeddings.

    ``log E_{i<j} exp(-t ||z_i - z_j||_2^2)``: 0 for a collapsed batch (all distances 0), about
    ``-2t`` (-4 for t = 2) for points spread uniformly over a high-dimensional sphere, where every
    squared distance concentrates at 2.

    Args:
        z: ``[N, d]`` embeddings, ``N >= 2``.
    """
    z = F.normalize(_as_matrix(z), dim=1)
    if z.shape[0] < 2:
        raise ValueError("uniformity needs at least 2 samples")
    return torch.pdist(z, p=2).pow(2).mul(-t).exp().mean().log().item()


def collapse_metrics(
    z: Tensor, h: Tensor | None = None, z2: Tensor | None = None
) -> dict[str, float]:
    """All collapse statistics of one batch, as plain floats for logging.

    Args:
        z: ``[N, d]`` projector output of the online / query branch (``Method.forward()["z"]``).
        h: optional ``[N, D]`` backbone features of the same batch.
        z2: optional ``[N, d]`` embeddings of the other view of the same images (row i the
            positive of ``z[i]``: ``Method.forward()["z2"]``).

    Returns:
        ``z_std`` (:func:`feature_std`), ``z_std_healthy`` (``1/sqrt(d)``), ``z_std_ratio``
        (``z_std * sqrt(d)``: ~1 healthy, 0 collapsed), ``z_erank``, ``z_dim``,
        ``z_condition``, ``z_uniformity`` (all NaN but ``z_dim`` and ``z_std_healthy`` when ``z``
        holds NaN/Inf); with ``h``: ``h_std``, ``h_std_ratio``, ``h_erank``;
        with ``z2``: ``pair_cos`` (mean cosine similarity of the positive pairs) and
        ``alignment`` (Wang & Isola 2020).
    """
    with torch.no_grad():
        z = _as_matrix(z)
        n, d = z.shape
        for name, other in (("h", h), ("z2", z2)):
            if other is not None and other.shape[0] != n:
                raise ValueError(
                    f"collapse_metrics: {name} holds {other.shape[0]} rows, z {n}; both must "
                    "describe the same batch"
                )
        if not torch.isfinite(z).all():
            # NaN/Inf outputs are the NaN-loss guard's business; the SVD would fail on them.
            nan = float("nan")
            keys = ["z_std", "z_std_ratio", "z_erank", "z_condition", "z_uniformity"]
            keys += ["h_std", "h_std_ratio", "h_erank"] if h is not None else []
            keys += ["pair_cos", "alignment"] if z2 is not None else []
            return {k: nan for k in keys} | {"z_std_healthy": 1.0 / math.sqrt(d), "z_dim": float(d)}
        std = feature_std(z)
        sigma = centred_singular_values(z)  # one SVD serves the rank and the spectrum
        metrics = {
            "z_std": std,
            "z_std_healthy": 1.0 / math.sqrt(d),
            "z_std_ratio": std * math.sqrt(d),
            "z_erank": _effective_rank_from(sigma),
            "z_dim": float(d),
            "z_condition": _condition_from(_spectrum_from(sigma, n, d), n, 1e-12),
            "z_uniformity": uniformity(z),
        }
        if h is not None:
            h = _as_matrix(h, "h")
            if torch.isfinite(h).all():
                h_std = feature_std(h)
                h_ratio, h_erank = h_std * math.sqrt(h.shape[1]), effective_rank(h)
            else:
                h_std = h_ratio = h_erank = float("nan")
            metrics.update(h_std=h_std, h_std_ratio=h_ratio, h_erank=h_erank)
        if z2 is not None:
            z2 = _as_matrix(z2, "z2")
            metrics["pair_cos"] = F.cosine_similarity(z, z2, dim=1).mean().item()
            metrics["alignment"] = alignment(z, z2)
    return metrics


@dataclass(frozen=True)
class Verdict:
    """Outcome of one :meth:`CollapseMonitor.check`."""

    collapsed: bool  # this check's metrics look collapsed
    reason: str  # what was seen, with numbers ("" when healthy)
    consecutive: int = 0  # collapsed checks in a row, this one included


# Likely causes and fixes per method, for the error message. Keys are method names as in configs.
_ADVICE: dict[str, tuple[str, str]] = {
    "simsiam": (
        "a missing stop-gradient on the target branch, a missing or bypassed predictor, or a "
        "learning rate too high for the batch size (the predictor's lr is meant to stay fixed, "
        "not decay)",
        "keep method.stop_gradient=true and method.predictor=mlp (z detached in the loss, the "
        "predictor used); lower the base lr (SimSiam uses 0.05 x batch/256 with SGD) and keep "
        "the predictor at a fixed lr (method.fixed_predictor_lr=true); keep BN in "
        "the projector and predictor hidden layers",
    ),
    "byol": (
        "a target that is not an EMA of the online network (tau = 0 makes it a copy of the online "
        "network), a missing predictor, or a learning rate too high",
        "keep method.target=ema with tau around 0.99-0.996 (method.tau_base) and its cosine "
        "increase to 1, keep method.predictor=true (an MLP with BN) and lower the lr or use a "
        "longer warmup (optim.warmup_epochs)",
    ),
    "simclr": (
        "a temperature far from the usual range, a learning rate too high, or very small batches",
        "use temperature 0.1-0.5 (0.5 for CIFAR-sized data), lower the lr or add warmup, and "
        "increase the batch size if you can",
    ),
    "moco": (
        "a temperature far from the usual range, a key-encoder momentum far from 0.99-0.999, or a "
        "learning rate too high",
        "use temperature 0.2 (MoCo v2), key-encoder momentum 0.99-0.999 and a lower lr",
    ),
}
_GENERIC_ADVICE = (
    "a learning rate too high, missing augmentation diversity, or a method component "
    "(stop-gradient, predictor, EMA target, negatives) disabled",
    "lower the lr, add warmup, and check the method settings against the preset",
)

MONITOR_MODES = ("off", "warn", "stop")


class CollapseMonitor:
    """Decides from :func:`collapse_metrics` whether training has collapsed, and reacts.

    A check counts as collapsed when either

    * ``z_std_ratio = feature_std(z) * sqrt(d) < std_fraction`` (default 0.2): the normalised
      outputs spread less than a fifth of a healthy ``1/sqrt(d)`` (SimSiam Fig. 2 shows ~1 when
      healthy and ~0 after collapse; a batch spanning only ``k`` of ``d`` axis-aligned directions
      scores ``sqrt(k/d)``, so 0.2 also flags extreme dimensional collapse), or
    * ``z_erank < min_effective_rank`` (default 3.0): the batch varies along only one or two
      directions (measured: `selfsup pretrain --method simsiam model.backbone=resnet_tiny
      data.image_size=16 data.limit=512 train.batch_size=64 optim.lr=0.5 train.epochs=8
      train.collapse_every=8 method.stop_gradient=false` falls to 1.4-2.5 within ~50 steps, while
      the same run with stop-gradient stays above 10).

    After ``patience`` collapsed checks in a row: ``mode="stop"`` raises
    :class:`~selfsup.errors.CollapseError`; ``mode="warn"`` emits one ``warnings.warn`` per
    episode (a healthy check ends the episode); ``mode="off"`` only returns verdicts.

    Args:
        method: method name (``simclr``, ``moco``, ``byol``, ``simsiam``) for the advice.
        mode: ``"off"``, ``"warn"`` or ``"stop"``.
        patience: consecutive collapsed checks before acting (>= 1).
        std_fraction: threshold on ``z_std_ratio``.
        min_effective_rank: threshold on ``z_erank``.
    """

    def __init__(
        self,
        method: str | None = None,
        *,
        mode: str = "warn",
        patience: int = 3,
        std_fraction: float = 0.2,
        min_effective_rank: float = 3.0,
        on_warning: Callable[[str], None] | None = None,
    ) -> None:
        """``on_warning`` receives the warn-mode message (default: ``warnings.warn``)."""
        if mode not in MONITOR_MODES:
            raise ConfigError(
                f"collapse monitor mode must be one of {', '.join(MONITOR_MODES)}; got {mode!r}."
            )
        if patience < 1:
            raise ConfigError(f"collapse monitor patience must be >= 1, got {patience}.")
        self.method = method.lower() if method else None
        self.mode = mode
        self.patience = patience
        self.std_fraction = std_fraction
        self.min_effective_rank = min_effective_rank
        self.consecutive = 0
        self.on_warning = on_warning
        self._warned_this_episode = False

    def reset(self) -> None:
        """Forget the collapsed-check streak."""
        self.consecutive = 0
        self._warned_this_episode = False

    def _symptoms(self, metrics: dict[str, float]) -> list[str]:
        symptoms = []
        ratio = metrics.get("z_std_ratio")
        if ratio is None and "z_std" in metrics and "z_dim" in metrics:
            ratio = metrics["z_std"] * math.sqrt(metrics["z_dim"])
        if ratio is not None and math.isfinite(ratio) and ratio < self.std_fraction:
            std = metrics.get("z_std", float("nan"))
            healthy = metrics.get("z_std_healthy", float("nan"))
            symptoms.append(
                f"std of the normalised projector output {std:.3g} is {ratio:.3g} x the healthy "
                f"1/sqrt(d) = {healthy:.3g} (threshold {self.std_fraction:g} x)"
            )
        erank = metrics.get("z_erank")
        if erank is not None and math.isfinite(erank) and erank < self.min_effective_rank:
            dim = metrics.get("z_dim", float("nan"))
            symptoms.append(
                f"effective rank of the projector output {erank:.3g} of d = {dim:.0f} "
                f"(threshold {self.min_effective_rank:g})"
            )
        return symptoms

    def check(self, metrics: dict[str, float], step: int | None = None) -> Verdict:
        """Judge one batch's :func:`collapse_metrics`; warn or raise after ``patience`` in a row.

        Non-finite metrics (a NaN loss has its own error) are not counted as collapse.
        """
        symptoms = self._symptoms(metrics)
        if not symptoms:
            self.reset()
            return Verdict(collapsed=False, reason="", consecutive=0)
        self.consecutive += 1
        where = f" at step {step}" if step is not None else ""
        reason = "; ".join(symptoms) + where
        verdict = Verdict(collapsed=True, reason=reason, consecutive=self.consecutive)
        if self.consecutive < self.patience or self.mode == "off":
            return verdict
        message = self.explain(verdict)
        if self.mode == "stop":
            raise CollapseError(message)
        if not self._warned_this_episode:
            if self.on_warning is not None:
                self.on_warning(message)
            else:
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            self._warned_this_episode = True
        return verdict

    def state_dict(self) -> dict:
        """The streak of collapsed checks, for a checkpoint: a resumed run goes on counting."""
        return {"consecutive": self.consecutive, "warned": self._warned_this_episode}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state["consecutive"])
        self._warned_this_episode = bool(state["warned"])

    def explain(self, verdict: Verdict) -> str:
        """The user-facing message: what was seen, likely causes for the method, what to try."""
        causes, fixes = _ADVICE.get(self.method or "", _GENERIC_ADVICE)
        name = self.method or "this method"
        return (
            f"Representation collapse detected for {self.consecutive} consecutive checks: "
            f"{verdict.reason}. A collapsed encoder maps every image to (nearly) the same "
            f"embedding and is useless downstream. Likely causes for {name}: {causes}. "
            f"Try: {fixes}. "
            + (
                "To keep training anyway, set train.collapse=warn (or off)."
                if self.mode == "stop"
                else "Training goes on (train.collapse=warn); train.collapse=stop would end the "
                "run here, keeping its last checkpoint."
            )
        )

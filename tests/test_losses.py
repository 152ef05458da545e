"""The losses against direct loop implementations of the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.losses import byol_loss, info_nce_loss, negative_cosine_similarity, nt_xent_loss


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b) / (a.norm() * b.norm())


def nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR eq. 1 term by term: l(i,j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t)."""
    z = torch.cat([z1, z2])
    n2 = z.shape[0]
    losses = []
    for i in range(n2):
        j = (i + n2 // 2) % n2
        denominator = sum(torch.exp(_cos(z[i], z[k]) / t) for k in range(n2) if k != i)
        losses.append(-torch.log(torch.exp(_cos(z[i], z[j]) / t) / denominator))
    return torch.stack(losses).mean()


def info_nce_loop(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> torch.Tensor:
    """MoCo eq. 1 per query: -log exp(q.k+/t) / (exp(q.k+/t) + sum_queue exp(q.k-/t))."""
    losses = []
    for i in range(q.shape[0]):
        qi, ki = q[i] / q[i].norm(), k[i] / k[i].norm()
        positive = torch.exp(qi @ ki / t)
        negatives = sum(torch.exp(qi @ queue[j] / t) for j in range(queue.shape[0]))
        losses.append(-torch.log(positive / (positive + negatives)))
    return torch.stack(losses).mean()


def _pair(n: int, d: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("n,d,t", [(8, 16, 0.5), (5, 3, 0.1), (2, 7, 1.0)])
def test_nt_xent_matches_loop(n: int, d: int, t: float) -> None:
    z1, z2 = _pair(n, d, seed=n)
    torch.testing.assert_close(nt_xent_loss(z1, z2, t), nt_xent_loop(z1, z2, t))


def test_nt_xent_batch_of_8_has_1_positive_and_14_negatives_per_view() -> None:
    # All 16 views identical: each of the 15 other views contributes exp(1/t) to the denominator,
    # so the loss is log(1 + 14) exactly; counting the anchor itself would give log(16).
    z = torch.ones(8, 4)
    torch.testing.assert_close(nt_xent_loss(z, z, 0.5), torch.tensor(math.log(15.0)))
    # Positives aligned, negatives orthogonal: loss = log(1 + 14 exp(-1/t) ) for every view.
    z1 = torch.eye(8, 16)
    t = 0.5
    expected = math.log(1 + 14 * math.exp(-1 / t))
    torch.testing.assert_close(nt_xent_loss(z1, z1.clone(), t), torch.tensor(expected))


def test_nt_xent_temperature_effect() -> None:
    z1 = torch.eye(8, 16)  # perfect positives, orthogonal negatives
    losses = [nt_xent_loss(z1, z1, t).item() for t in (1.0, 0.5, 0.1)]
    assert losses[0] > losses[1] > losses[2]  # sharper softmax -> lower loss on separable data
    z1, z2 = _pair(8, 16, seed=3)
    for t in (0.05, 0.2, 2.0):
        torch.testing.assert_close(nt_xent_loss(z1, z2, t), nt_xent_loop(z1, z2, t))


def test_nt_xent_gradients_match_loop() -> None:
    z1, z2 = _pair(6, 5, seed=1, dtype=torch.float64)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    b1, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    nt_xent_loss(a1, a2, 0.3).backward()
    nt_xent_loop(b1, b2, 0.3).backward()
    torch.testing.assert_close(a1.grad, b1.grad)
    torch.testing.assert_close(a2.grad, b2.grad)


def test_nt_xent_is_scale_invariant() -> None:
    z1, z2 = _pair(8, 16, seed=4)
    torch.testing.assert_close(nt_xent_loss(7 * z1, 0.3 * z2), nt_xent_loss(z1, z2))


@pytest.mark.parametrize("n,k,t", [(4, 10, 0.2), (3, 1, 0.07)])
def test_info_nce_matches_loop(n: int, k: int, t: float) -> None:
    q, key = _pair(n, 8, seed=k)
    queue = torch.nn.functional.normalize(
        torch.randn(k, 8, generator=torch.Generator().manual_seed(9))
    )
    torch.testing.assert_close(info_nce_loss(q, key, queue, t), info_nce_loop(q, key, queue, t))
    torch.testing.assert_close(
        info_nce_loss(7 * q, 3 * key, queue, t), info_nce_loop(q, key, queue, t)
    )


def test_info_nce_gradients_match_loop_and_keys_get_none() -> None:
    q, k = _pair(4, 6, seed=2, dtype=torch.float64)
    queue = torch.nn.functional.normalize(torch.randn(5, 6, dtype=torch.float64))
    qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
    ka = k.clone().requires_grad_()
    info_nce_loss(qa, ka, queue, 0.2).backward()
    info_nce_loop(qb, k, queue, 0.2).backward()
    torch.testing.assert_close(qa.grad, qb.grad)
    assert ka.grad is None  # keys come from the momentum encoder: no gradient


def test_negative_cosine_similarity_matches_formula_and_stops_gradient() -> None:
    p, z = _pair(5, 8, seed=5, dtype=torch.float64)
    expected = torch.stack([-_cos(p[i], z[i]) for i in range(5)]).mean()
    torch.testing.assert_close(negative_cosine_similarity(p, z), expected)
    torch.testing.assert_close(
        negative_cosine_similarity(7 * p, z), negative_cosine_similarity(p, z)
    )
    pg, zg = p.clone().requires_grad_(), z.clone().requires_grad_()
    negative_cosine_similarity(pg, zg).backward()
    assert zg.grad is None and pg.grad is not None
    pg, zg = p.clone().requires_grad_(), z.clone().requires_grad_()
    negative_cosine_similarity(pg, zg, stop_gradient=False).backward()
    assert zg.grad is not None and zg.grad.abs().sum() > 0


def test_byol_loss_matches_formula_and_stops_gradient() -> None:
    p, z = _pair(5, 8, seed=6, dtype=torch.float64)
    # eq. 2: squared distance of the L2-normalised vectors.
    expected = torch.stack(
        [((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum() for i in range(5)]
    )
    torch.testing.assert_close(byol_loss(p, z), expected.mean())
    torch.testing.assert_close(byol_loss(7 * p, z), byol_loss(p, z))
    pg, zg = p.clone().requires_grad_(), z.clone().requires_grad_()
    byol_loss(pg, zg).backward()
    assert zg.grad is None and pg.grad.abs().sum() > 0
    # Identical directions give 0; opposite ones the maximum 4.
    torch.testing.assert_close(byol_loss(p, 3 * p), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(byol_loss(p, -p), torch.tensor(4.0, dtype=torch.float64))


def test_losses_pass_gradcheck_in_float64() -> None:
    z1, z2 = _pair(4, 3, seed=8, dtype=torch.float64)
    z1.requires_grad_()
    z2.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_loss(a, b, 0.5), (z1, z2))
    queue = torch.nn.functional.normalize(torch.randn(5, 3, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda q: info_nce_loss(q, z2, queue, 0.2), (z1,))
    assert torch.autograd.gradcheck(lambda p: byol_loss(p, z2), (z1,))
    assert torch.autograd.gradcheck(lambda p: negative_cosine_similarity(p, z2), (z1,))


def test_losses_compute_in_float32_under_autocast() -> None:
    z1, z2 = _pair(8, 16, seed=10)
    reference = nt_xent_loss(z1, z2, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nt_xent_loss(z1, z2, 0.1)
        half = nt_xent_loss(z1.bfloat16(), z2.bfloat16(), 0.1)
    assert loss.dtype == torch.float32 and half.dtype == torch.float32
    torch.testing.assert_close(loss, reference)


def test_info_nce_normalises_the_queue_it_is_given() -> None:
    q, key = _pair(4, 8, seed=3)
    queue = torch.nn.functional.normalize(
        torch.randn(6, 8, generator=torch.Generator().manual_seed(4))
    )
    torch.testing.assert_close(info_nce_loss(q, key, 10 * queue), info_nce_loop(q, key, queue, 0.2))


def test_losses_take_keyword_tensors() -> None:
    a, b = _pair(4, 8, seed=5)
    queue = torch.randn(6, 8)
    assert nt_xent_loss(z1=a, z2=b) == nt_xent_loss(a, b)
    assert info_nce_loss(q=a, k=b, queue=queue) == info_nce_loss(a, b, queue)
    assert byol_loss(p=a, z=b) == byol_loss(a, b)
    assert negative_cosine_similarity(p=a, z=b) == negative_cosine_similarity(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert byol_loss(p=a.bfloat16(), z=b.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda a, b: nt_xent_loss(a[:1], b[:1]), "N >= 2"),
        (lambda a, b: nt_xent_loss(a, b[:3]), "must both be [N, d]"),
        (lambda a, b: nt_xent_loss(a, b, temperature=0.0), "temperature must be > 0"),
        (lambda a, b: nt_xent_loss(a, b, temperature=-0.5), "temperature must be > 0"),
        (lambda a, b: info_nce_loss(a, b, torch.randn(5, 7)), "queue must be [K, d]"),
        (lambda a, b: info_nce_loss(a, b[:2], torch.randn(5, 8)), "must both be [N, d]"),
        (lambda a, b: info_nce_loss(a, b, torch.randn(5, 8), float("nan")), "temperature"),
        (lambda a, b: byol_loss(a, b[:1]), "must both be [N, d]"),  # would broadcast
        (lambda a, b: byol_loss(a[None], b[None]), "must both be [N, d]"),  # cos over the batch
        (lambda a, b: negative_cosine_similarity(a, b[0]), "must both be [N, d]"),
        (lambda a, b: byol_loss(a[:0], b[:0]), "N >= 1"),  # the mean of nothing is NaN
    ],
)
def test_losses_refuse_inputs_that_would_be_silently_wrong(call, message) -> None:
    a, b = _pair(4, 8, seed=6)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(a, b)


def test_losses_name_an_empty_queue_and_inputs_that_are_no_float_tensors() -> None:
    a, b = _pair(4, 8, seed=6)
    with pytest.raises(ValueError, match=r"K >= 1 negatives .* the loss would be 0"):
        info_nce_loss(a, b, torch.randn(0, 8))  # it gave 0.0: a single-class cross entropy
    with pytest.raises(TypeError, match="nt_xent_loss: z1 and z2 must be torch tensors"):
        nt_xent_loss(a, b.numpy())
    with pytest.raises(TypeError, match="must be float embeddings; got torch.int64"):
        byol_loss(a.long(), b.long())

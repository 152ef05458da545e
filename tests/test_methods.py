"""The four methods on a tiny ResNet: targets, EMA, queue, stop-gradient, losses, training."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.errors import ConfigError
from selfsup.losses import byol_loss, info_nce_loss, negative_cosine_similarity, nt_xent_loss
from selfsup.methods import METHODS, EmaTarget, build_method, cosine_tau, ema_update_
from selfsup.models import build_backbone

# Small heads so each step takes milliseconds on 2 CPU cores.
SMALL = {
    "simclr": {"proj_hidden": 64, "proj_dim": 32},
    "moco": {"proj_hidden": 64, "proj_dim": 32, "queue_size": 16},
    "byol": {"proj_hidden": 64, "proj_dim": 32, "pred_hidden": 64},
    "simsiam": {"proj_hidden": 64, "proj_dim": 64, "pred_hidden": 16},
}


def make(name: str, seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    backbone, feat_dim = build_backbone("resnet_tiny", small_stem=True)
    return build_method(name, backbone, feat_dim, **{**SMALL[name], **options})


def views(batch: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 16, 16, generator=g)
    return x, x + 0.1 * torch.randn(x.shape, generator=g)


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", METHODS)
def test_forward_contract(name: str) -> None:
    method = make(name)
    out = method(*views())
    assert out["loss"].shape == () and out["loss"].requires_grad
    assert out["z"].shape == (8, SMALL[name]["proj_dim"]) and not out["z"].requires_grad
    # for the collapse monitors: view 2's embedding and view 1's backbone features
    feat_dim = build_backbone("resnet_tiny", small_stem=True)[1]
    assert out["z2"].shape == out["z"].shape and out["h"].shape == (8, feat_dim)
    assert not torch.equal(out["z2"], out["z"])
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    groups = method.param_groups()
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})  # no parameter twice
    assert {id(p) for p in grouped} == {id(p) for p in method.parameters() if p.requires_grad}
    assert any(p is q for p in grouped for q in method.backbone.parameters())


@pytest.mark.parametrize("name,target_attrs", [("byol", "target_"), ("moco", "key_")])
def test_target_starts_equal_frozen_and_gets_no_gradient(name: str, target_attrs: str) -> None:
    method = make(name)
    target_backbone = getattr(method, target_attrs + "backbone")
    target_projector = getattr(method, target_attrs + "projector")
    for target, online in [
        (target_backbone, method.backbone),
        (target_projector, method.projector),
    ]:
        assert isinstance(target, EmaTarget)
        online_state = online.state_dict()
        for key, value in target.module.state_dict().items():
            assert torch.equal(value, online_state[key])
        assert all(not p.requires_grad for p in target.parameters())
    method(*views())["loss"].backward()
    assert all(p.grad is None for p in target_backbone.parameters())
    assert all(p.grad is None for p in target_projector.parameters())
    assert all(p.grad is not None for p in method.backbone.parameters())


def test_ema_update_equals_formula() -> None:
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    target = copy.deepcopy(online).requires_grad_(False)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online(torch.randn(5, 4))  # moves the running statistics
    tau = 0.9
    expected = [
        tau * xi + (1 - tau) * theta
        for xi, theta in zip(target.parameters(), online.parameters(), strict=True)
    ]
    ema_update_(target, online, tau)
    for got, want in zip(target.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    for got, want in zip(target.buffers(), online.buffers(), strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(target[0].weight, online[0].weight)


def test_cosine_tau_schedule() -> None:
    assert cosine_tau(0.996, 0.0) == pytest.approx(0.996)
    assert cosine_tau(0.99, 1.0) == pytest.approx(1.0)
    assert cosine_tau(0.99, 0.5) == pytest.approx(0.995)
    assert cosine_tau(0.99, 0.25) < cosine_tau(0.99, 0.75)
    assert cosine_tau(0.99, 1.5) == pytest.approx(1.0) and cosine_tau(0.99, -1) == pytest.approx(
        0.99
    )
    # BYOL Sec. 3.2: tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, away from 0, 1/2, 1 too
    for progress in (0.1, 0.25, 0.3, 0.75, 0.9):
        expected = 1 - (1 - 0.99) * (math.cos(math.pi * progress) + 1) / 2
        assert cosine_tau(0.99, progress) == pytest.approx(expected, abs=1e-12), progress


@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_byol_update_target_uses_cosine_tau(progress: float) -> None:
    method = make("byol", tau_base=0.9)
    pairs = ((method.target_backbone, method.backbone), (method.target_projector, method.projector))
    with torch.no_grad():
        for _, online in pairs:
            for p in online.parameters():
                p.add_(1.0)
    xi = [[p.clone() for p in target.parameters()] for target, _ in pairs]
    method.update_target(progress)
    tau = cosine_tau(0.9, progress)
    for (target, online), before in zip(pairs, xi, strict=True):  # the backbone and projector
        theta = list(online.parameters())
        for got, x, t in zip(target.parameters(), before, theta, strict=True):
            torch.testing.assert_close(got, tau * x + (1 - tau) * t, rtol=0, atol=1e-6)


def test_byol_random_fixed_target_never_moves() -> None:
    method = make("byol", target="random_fixed")
    before = copy.deepcopy(method.target_backbone.state_dict())
    with torch.no_grad():
        method.backbone.conv1.weight.add_(1.0)
    method.update_target(0.5)
    for key, value in method.target_backbone.state_dict().items():
        assert torch.equal(value, before[key])


def test_byol_loss_is_symmetric_online_vs_target() -> None:
    method = make("byol")
    x1, x2 = views()
    with torch.no_grad():  # online != target in both parts (BN would undo a rescale)
        method.projector[0].weight.add_(0.1)
        method.backbone.conv1.weight.add_(0.1)
    out = method(x1, x2)
    with torch.no_grad():
        h = method.backbone(torch.cat([x1, x2]))
        z1, z2 = method.projector(h).chunk(2)
        p1, p2 = method.predictor(method.projector(h)).chunk(2)
        zt1, zt2 = method.target_projector(method.target_backbone(torch.cat([x1, x2]))).chunk(2)
    torch.testing.assert_close(out["loss"].detach(), byol_loss(p1, zt2) + byol_loss(p2, zt1))
    # what the monitors read: view 1's features, both views' projections, the same-view cosine
    torch.testing.assert_close(out["h"], h[: x1.shape[0]])
    torch.testing.assert_close(out["z"], z1)
    torch.testing.assert_close(out["z2"], z2)
    expected_cos = F.cosine_similarity(z1, zt1, dim=1).mean()
    torch.testing.assert_close(out["online_target_cos"], expected_cos)
    assert 0.0 < out["online_target_cos"] < 1.0
    no_predictor = make("byol", predictor=False)
    assert no_predictor.predictor is None and no_predictor(x1, x2)["loss"].requires_grad


def test_moco_momentum_update_and_schedule() -> None:
    method = make("moco", momentum=0.9)
    pairs = ((method.key_backbone, method.backbone), (method.key_projector, method.projector))
    with torch.no_grad():
        for _, query in pairs:
            for p in query.parameters():
                p.add_(1.0)
    before = [[p.clone() for p in key.parameters()] for key, _ in pairs]
    method.update_target(1.0)  # constant momentum: progress is ignored
    for (key, query), xi in zip(pairs, before, strict=True):  # MoCo eq. 2, every parameter
        for got, x, t in zip(key.parameters(), xi, query.parameters(), strict=True):
            torch.testing.assert_close(got, 0.9 * x + 0.1 * t, rtol=0, atol=1e-6)
    scheduled = make("moco", momentum=0.9, momentum_cosine=True)
    with torch.no_grad():
        scheduled.projector[0].weight.add_(1.0)
    key_before = scheduled.key_projector.module[0].weight.clone()
    scheduled.update_target(1.0)  # m = 1 at the end of training
    assert torch.equal(scheduled.key_projector.module[0].weight, key_before)
    # what the trainer logs as train/target_momentum
    assert method.target_momentum(0.7) == 0.9
    halfway = 1 - 0.1 * (math.cos(math.pi / 2) + 1) / 2  # cosine from 0.9 to 1, at 0.5
    assert scheduled.target_momentum(0.5) == pytest.approx(halfway)


def test_moco_queue_is_fifo_with_wrap_around() -> None:
    method = make("moco", queue_size=10, proj_dim=2)
    batches = [torch.full((4, 2), float(i)) + torch.arange(4.0)[:, None] / 10 for i in range(1, 4)]
    for keys in batches:
        method._enqueue(keys)
    # Batches 1 and 2 fill slots 0-7; batch 3 fills 8, 9 then wraps to 0, 1 (oldest overwritten).
    expected = torch.cat([batches[2][2:], batches[0][2:], batches[1], batches[2][:2]])
    assert torch.equal(method.queue, expected)
    assert int(method.queue_ptr) == 2
    # A batch larger than the queue keeps only its newest 10 keys, still in ring order.
    big = torch.arange(24.0).view(12, 2)
    method._enqueue(big)
    assert int(method.queue_ptr) == (2 + 12) % 10
    slots = [(4 + i) % 10 for i in range(10)]  # the last 10 keys land from slot 4 on
    assert torch.equal(method.queue[slots], big[2:])


@pytest.mark.parametrize("shuffle_bn", [False, True])
def test_moco_split_bn_keys_are_normalised_in_shuffled_groups(shuffle_bn: bool) -> None:
    """One process, bn_splits=2: like 2 GPUs, BN statistics come from half the batch each, and
    with shuffle-BN the key encoder's halves are a random permutation's, not the query's."""
    method = make("moco", queue_size=32, bn_splits=2, shuffle_bn=shuffle_bn, proj_batch_norm=True)
    plain = make("moco", queue_size=32, bn_splits=1, proj_batch_norm=True)  # same init (seed 0)
    x1, x2 = views(batch=8)
    torch.manual_seed(5)
    perm = torch.randperm(8) if shuffle_bn else torch.arange(8)
    torch.manual_seed(5)  # the forward's only random draw is the key shuffle
    method(x1, x2)
    method.update_target(0.0)
    with torch.no_grad():
        keys = torch.empty(8, 32)
        for rows in perm.chunk(2):  # each group through plain-BN copies, as on its own GPU
            encoder = nn.Sequential(
                copy.deepcopy(plain.key_backbone.module), copy.deepcopy(plain.key_projector.module)
            )
            keys[rows] = F.normalize(encoder(x2[rows]), dim=1)
    torch.testing.assert_close(method.queue[:8], keys, atol=1e-5, rtol=1e-4)
    if shuffle_bn:  # the grouping matters: whole-batch BN gives other keys
        whole = F.normalize(plain.key_projector(plain.key_backbone(x2)), dim=1)
        assert not torch.allclose(method.queue[:8], whole, atol=1e-3)


def test_moco_shuffles_keys_only_where_batchnorm_could_leak_between_them() -> None:
    assert make("moco", shuffle_bn=True).shuffle_bn  # resnet_tiny's BatchNorm
    assert not make("moco", shuffle_bn=False).shuffle_bn
    torch.manual_seed(0)
    no_bn = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    method = build_method("moco", no_bn, 8, **{**SMALL["moco"], "shuffle_bn": True})
    assert not method.shuffle_bn  # GroupNorm and a head without BatchNorm: nothing to shuffle
    x1, x2 = views()
    torch.manual_seed(5)
    method(x1, x2)
    drawn = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), drawn)  # the forward drew no permutation
    with_bn_head = build_method(
        "moco", no_bn, 8, **{**SMALL["moco"], "shuffle_bn": True, "proj_batch_norm": True}
    )
    assert with_bn_head.shuffle_bn


def test_moco_enqueues_every_forwards_keys_and_warns_when_update_target_is_missing() -> None:
    method = make("moco", queue_size=16, shuffle_bn=False)
    (a1, a2), (b1, b2) = views(seed=1), views(seed=2)
    keys = [method(a1, a2)["z2"], method(b1, b2)["z2"]]  # two micro-batches, one step
    method.update_target(0.0)
    torch.testing.assert_close(method.queue, torch.cat(keys))  # both, oldest first
    assert int(method.queue_ptr) == 0  # 16 keys: wrapped round once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method(a1, a2)  # one forward per update_target: no warning
        method.update_target(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):  # 4 micro-batches of 8 accumulated: more keys than the queue, fine
            method(a1, a2)
        method.update_target(0.0)
    with pytest.warns(UserWarning, match="9 training forwards since the last update_target"):
        for _ in range(9):  # never updated: 72 keys waiting for a queue of 16
            method(a1, a2)
    assert method._pending_keys.shape == (16, 32)  # the newest K only: memory stays bounded


@pytest.mark.parametrize("symmetric", [False, True])
def test_moco_enqueues_normalised_detached_keys_after_the_loss(symmetric: bool) -> None:
    method = make("moco", queue_size=32, symmetric=symmetric)
    x1, x2 = views()
    queue_before = method.queue.clone()
    with torch.no_grad():
        k1 = F.normalize(method.key_projector(method.key_backbone(x1)), dim=1)
        k2 = F.normalize(method.key_projector(method.key_backbone(x2)), dim=1)
        q1 = method.projector(method.backbone(x1))
        q2 = method.projector(method.backbone(x2))
    out = method(x1, x2)
    assert torch.equal(method.queue, queue_before)  # the backward still needs it as it was
    out["loss"].backward()
    method.update_target(0.0)  # after the optimizer step: enqueue
    expected_loss = info_nce_loss(q1, k2, queue_before, 0.2)
    new_keys = k2
    if symmetric:
        expected_loss = expected_loss + info_nce_loss(q2, k1, queue_before, 0.2)
        new_keys = torch.cat([k2, k1])
    torch.testing.assert_close(out["loss"].detach(), expected_loss)
    n = new_keys.shape[0]
    torch.testing.assert_close(method.queue[:n], new_keys)
    assert torch.equal(method.queue[n:], queue_before[n:])
    # the monitors' inputs: q1, view 2's query (symmetric) or key, mean cos(q1, k2)
    torch.testing.assert_close(out["z"], q1)
    torch.testing.assert_close(out["z2"], q2 if symmetric else k2)
    torch.testing.assert_close(out["pos_cos"], (F.normalize(q1, dim=1) * k2).sum(dim=1).mean())
    # the monitors' query-key cosine on the same view, where the key of view 1 was computed
    if symmetric:
        expected_cos = (F.normalize(q1, dim=1) * k1).sum(dim=1).mean()
        torch.testing.assert_close(out["online_target_cos"], expected_cos)
    else:
        assert "online_target_cos" not in out
    assert int(method.queue_ptr) == n
    assert not method.queue.requires_grad and method.queue.grad_fn is None
    torch.testing.assert_close(method.queue.norm(dim=1), torch.ones(32))


def _simsiam_manual_grads(method: nn.Module, x1, x2, detach: bool) -> dict[str, torch.Tensor]:
    method.zero_grad()
    z = method.projector(method.backbone(torch.cat([x1, x2])))
    (z1, z2), (p1, p2) = z.chunk(2), method.predictor(z).chunk(2)
    t1, t2 = (z1.detach(), z2.detach()) if detach else (z1, z2)
    loss = -0.5 * (F.cosine_similarity(p1, t2).mean() + F.cosine_similarity(p2, t1).mean())
    loss.backward()
    return grads(method)


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_simsiam_stop_gradient(stop_gradient: bool) -> None:
    method = make("simsiam", stop_gradient=stop_gradient)
    x1, x2 = views()
    method.zero_grad()
    method(x1, x2)["loss"].backward()
    got = grads(method)
    with_stop = _simsiam_manual_grads(method, x1, x2, detach=True)
    without_stop = _simsiam_manual_grads(method, x1, x2, detach=False)
    expected, other = (with_stop, without_stop) if stop_gradient else (without_stop, with_stop)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)
    # The two manual versions differ in the encoder, so the check above can tell them apart.
    conv = "backbone.conv1.weight"
    assert not torch.allclose(with_stop[conv], without_stop[conv], rtol=1e-3, atol=1e-7)
    assert not torch.allclose(got[conv], other[conv], rtol=1e-3, atol=1e-7)


def test_simsiam_predictor_options_and_param_groups() -> None:
    method = make("simsiam")
    encoder, predictor = method.param_groups()
    assert predictor["fixed_lr"] is True and "fixed_lr" not in encoder
    assert {id(p) for p in predictor["params"]} == {id(p) for p in method.predictor.parameters()}
    assert make("simsiam", fixed_predictor_lr=False).param_groups()[1]["fixed_lr"] is False
    assert isinstance(make("simsiam", predictor="none").predictor, nn.Identity)
    frozen = make("simsiam", predictor="random_fixed")
    assert all(not p.requires_grad for p in frozen.predictor.parameters())
    assert [g["name"] for g in frozen.param_groups()] == ["encoder"]
    with pytest.raises(ConfigError, match="predictor"):
        make("simsiam", predictor="linear")
    with pytest.raises(ConfigError, match="target"):
        make("byol", target="mean_teacher")


def test_simclr_loss_is_nt_xent_of_the_projections() -> None:
    method = make("simclr", temperature=0.3)
    x1, x2 = views()
    out = method(x1, x2)
    with torch.no_grad():
        h = method.backbone(torch.cat([x1, x2]))
        z1, z2 = method.projector(h).chunk(2)
    torch.testing.assert_close(out["loss"].detach(), nt_xent_loss(z1, z2, 0.3))
    assert_monitor_outputs(out, h[: x1.shape[0]], z1, z2)


def assert_monitor_outputs(out: dict, h1, z1, z2) -> None:
    """What the collapse monitors read: view 1's features, both views' projections and the
    mean cosine of the positive pairs."""
    torch.testing.assert_close(out["h"], h1)
    torch.testing.assert_close(out["z"], z1)
    torch.testing.assert_close(out["z2"], z2)
    torch.testing.assert_close(out["pos_cos"], F.cosine_similarity(z1, z2, dim=1).mean())


def test_simsiam_loss_value() -> None:
    method = make("simsiam")
    x1, x2 = views()
    out = method(x1, x2)
    with torch.no_grad():
        h = method.backbone(torch.cat([x1, x2]))
        z = method.projector(h)
        (z1, z2), (p1, p2) = z.chunk(2), method.predictor(z).chunk(2)
    expected = 0.5 * negative_cosine_similarity(p1, z2) + 0.5 * negative_cosine_similarity(p2, z1)
    torch.testing.assert_close(out["loss"].detach(), expected)
    assert_monitor_outputs(out, h[: x1.shape[0]], z1, z2)


@pytest.mark.parametrize("name", METHODS)
def test_eval_mode_is_deterministic(name: str) -> None:
    method = make(name).eval()
    x1, x2 = views()
    with torch.no_grad():
        first, second = method(x1, x2), method(x1, x2)
        features = method.backbone(x1), method.backbone(x1)
    assert torch.equal(first["loss"], second["loss"]) and torch.equal(first["z"], second["z"])
    assert torch.equal(*features)


@pytest.mark.parametrize("name", METHODS)
def test_a_few_sgd_steps_lower_the_loss(name: str) -> None:
    # Two fixed batches, alternated, so MoCo's queue (size 16 = batch) always holds the other
    # batch's keys, never the positives. The loss on batch A must fall.
    method = make(name)
    batch_a, batch_b = views(16, seed=1), views(16, seed=2)
    optimizer = torch.optim.SGD(method.param_groups(), lr=0.05, momentum=0.9)
    with torch.no_grad():
        method(*batch_b)  # MoCo: keys to fill its queue with real ones
    if name == "moco":
        method._enqueue(method._pending_keys)
        method._pending_keys = None
    losses_a = []
    steps = 6
    for step in range(steps):
        out = method(*(batch_a if step % 2 == 0 else batch_b))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        method.update_target(step / steps)
        if step % 2 == 0:
            losses_a.append(out["loss"].item())
    assert losses_a[-1] < losses_a[0] - 0.05, losses_a


def test_build_method_errors_and_config_mapping() -> None:
    backbone, dim = build_backbone("resnet_tiny", small_stem=True)
    with pytest.raises(ConfigError, match="simclr, moco, byol, simsiam"):
        build_method("barlow", backbone, dim)
    with pytest.raises(ConfigError, match="queue_size"):
        build_method("simclr", backbone, dim, queue_size=10)
    with pytest.raises(ConfigError, match="tempreature.*did you mean 'temperature'"):
        build_method("simclr", backbone, dim, {"tempreature": 0.1})
    # A shared config section: other methods' options, `name` and None values are ignored.
    cfg = {"name": "moco", "temperature": 0.1, "queue_size": 8, "proj_dim": 16, "tau_base": None}
    moco = build_method("moco", backbone, dim, cfg, proj_hidden=32)
    assert moco.temperature == 0.1 and moco.queue.shape == (8, 16)
    simclr = build_method("simclr", backbone, dim, cfg)
    assert simclr.temperature == 0.1


@pytest.mark.parametrize("name", METHODS)
def test_step_never_reads_a_tensor_on_the_host(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU each of these would block until the device catches up.
    method = make(name, symmetric=True) if name == "moco" else make(name)
    x1, x2 = views()

    def host_read(*args, **kwargs):
        raise AssertionError("host sync in the training step")

    for attr in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, attr, host_read)
    out = method(x1, x2)
    out["loss"].backward()
    method.update_target(0.5)
    monkeypatch.undo()
    assert torch.isfinite(out["loss"]).item()


def test_compiled_step_matches_eager():
    """``train.compile`` is on by default on CUDA, so the compiled method must compute what the
    eager one does: the same loss and gradients (here with inductor on the CPU, BYOL: predictor,
    EMA-target branch under no_grad and the symmetric loss in one graph)."""
    from selfsup.train.trainer import resolve_compile

    assert resolve_compile("auto", torch.device("cuda")) is True
    assert resolve_compile("auto", torch.device("cpu")) is False
    assert resolve_compile("True", torch.device("cpu")) is True
    assert resolve_compile(False, torch.device("cuda")) is False

    eager, compiled = make("byol"), make("byol")
    x1, x2 = views()
    out = eager(x1, x2)
    out["loss"].backward()
    out_c = torch.compile(compiled)(x1, x2)
    out_c["loss"].backward()
    assert_same_step(eager, compiled, out, out_c)


def test_compiled_moco_split_bn_step_matches_eager():
    """MoCo in one process: SplitBatchNorm, the key shuffle and the keys kept for the queue,
    all inside the compiled graph. Traced by dynamo and AOT autograd (graph breaks, the
    ``is_compiling`` branch, functionalised BatchNorm buffers) without inductor's CPU code
    generation, which the BYOL test above covers: that took 120 s of a cold CI run here, and
    the GPU's code generator (Triton) by ``test_compiled_step_on_cuda_matches_eager[moco]``."""
    options = {"bn_splits": 2, "queue_size": 32, "symmetric": True}
    eager, compiled = make("moco", **options), make("moco", **options)
    x1, x2 = views()
    torch.manual_seed(3)
    out = eager(x1, x2)
    out["loss"].backward()
    torch.manual_seed(3)
    out_c = torch.compile(compiled, backend="aot_eager")(x1, x2)
    out_c["loss"].backward()
    assert_same_step(eager, compiled, out, out_c)
    eager.update_target(0.5)
    compiled.update_target(0.5)
    torch.testing.assert_close(compiled.queue, eager.queue, rtol=1e-4, atol=1e-5)
    assert int(compiled.queue_ptr) == int(eager.queue_ptr) == 16


def assert_same_step(
    eager: nn.Module, compiled: nn.Module, out: dict, out_c: dict, grad_scale_tol: float = 0.0
) -> None:
    """``grad_scale_tol``: an absolute tolerance of that fraction of each gradient's largest
    entry, for a channels-last step, whose convolutions sum in another order. (On the CPU,
    which trains without channels-last, torch 2.14's channels-last backward of this BYOL
    model is off by up to 6% of the largest entry against float64, the contiguous one by
    2e-6: so the CUDA test compares with contiguous eager, not channels-last eager.)"""
    torch.testing.assert_close(out_c["loss"], out["loss"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_c["z"], out["z"], rtol=1e-4, atol=1e-4)
    g, g_c = grads(eager), grads(compiled)
    assert g.keys() == g_c.keys() and g
    for name in g:
        atol = max(1e-5, grad_scale_tol * float(g[name].abs().max()))
        torch.testing.assert_close(g_c[name], g[name], rtol=1e-3, atol=atol, msg=name)


def _compiled_step_on(device: str, name: str, channels_last: bool = False) -> None:
    """One step of ``name`` on ``device``: compiled equals eager in fp32 (TF32 off), and a bf16
    autocast step of the compiled model is finite: the GPU path (``train.compile=auto``,
    ``train.precision=auto``, ``train.channels_last``) that CPU runs never take."""
    options = {"bn_splits": 2, "symmetric": True} if name == "moco" else {}
    eager, compiled = make(name, **options).to(device), make(name, **options).to(device)
    x1, x2 = (v.to(device) for v in views())
    c1, c2 = x1, x2
    if channels_last:  # the compiled step as the trainer runs it on CUDA, against plain eager
        compiled = compiled.to(memory_format=torch.channels_last)
        c1, c2 = (v.contiguous(memory_format=torch.channels_last) for v in (x1, x2))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(3)
        out = eager(x1, x2)
        out["loss"].backward()
        torch.manual_seed(3)
        step = torch.compile(compiled)
        out_c = step(c1, c2)
        out_c["loss"].backward()
        assert_same_step(eager, compiled, out, out_c, grad_scale_tol=1e-3 if channels_last else 0)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    compiled.update_target(0.5)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out_bf16 = step(c1, c2)
    out_bf16["loss"].backward()
    assert torch.isfinite(out_bf16["loss"])
    assert all(torch.isfinite(g).all() for g in grads(compiled).values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", METHODS)
def test_compiled_step_on_cuda_matches_eager(name: str) -> None:
    _compiled_step_on("cuda", name, channels_last=True)


@pytest.mark.parametrize("name", METHODS)
def test_views_of_two_shapes_are_refused_not_paired_with_the_wrong_images(name: str) -> None:
    """cat + chunk(2) of 16 and 8 views would pair image i of one view with another image."""
    method = make(name)
    x1, x2 = views(batch=8)
    with pytest.raises(ValueError, match=r"\(16, 3, 16, 16\) and \(8, 3, 16, 16\)"):
        method(torch.cat([x1, x1]), x2)
    with pytest.raises(ValueError, match="one shape"):
        method(x1[..., :8, :8], x2)  # another crop size
    assert method(x1, x2)["loss"].isfinite()  # the same shapes still train


@pytest.mark.parametrize("name", METHODS)
def test_update_target_refuses_a_step_count_for_progress(name: str) -> None:
    """progress is step / total in [0, 1]; 7 (a step) would have left tau at 1: a frozen target."""
    method = make(name)
    method(*views())
    before = copy.deepcopy(method.state_dict())
    for bad in (7, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\] \(step / total steps\)"):
            method.update_target(bad)
    for key, value in method.state_dict().items():  # nothing moved on the refused calls
        assert torch.equal(value, before[key]), key
    method.update_target(1.0)  # the end of training is fine


@pytest.mark.parametrize("name", METHODS)
def test_a_method_refuses_a_backbone_that_is_not_a_module_when_built(name: str) -> None:
    built = build_backbone("resnet_tiny", small_stem=True)
    with pytest.raises(ConfigError, match=r"unpack it, `backbone, feat_dim = build_backbone"):
        build_method(name, built, built[1])
    with pytest.raises(ConfigError, match="build_backbone first"):
        build_method(name, "resnet18", 512)
    with pytest.raises(ConfigError, match="feat_dim must be a positive integer"):
        build_method(name, built[0], "64")


def test_the_constructors_check_their_options_as_build_method_does() -> None:
    from selfsup.methods import BYOL, MoCo, SimCLR, SimSiam

    backbone, feat_dim = build_backbone("resnet_tiny", small_stem=True)
    with pytest.raises(ConfigError, match=r"method.temperature=-1 must be > 0"):
        SimCLR(backbone, feat_dim, temperature=-1)
    with pytest.raises(ConfigError, match=r"method.temperature='0.1' must be a number"):
        MoCo(backbone, feat_dim, temperature="0.1")
    with pytest.raises(ConfigError, match=r"method.tau_base=1.5 must be in \[0, 1\]"):
        BYOL(backbone, feat_dim, tau_base=1.5)
    with pytest.raises(ConfigError, match=r"method.pred_hidden=2.5 must be an integer"):
        SimSiam(backbone, feat_dim, pred_hidden=2.5)

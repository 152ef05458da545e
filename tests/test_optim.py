"""LARS against the update rule of You et al. 2017, and the warm-up + cosine schedule."""

import math

import pytest
import torch
from torch import nn

from selfsup.train.optim import LARS, build_optimizer, scaled_lr, set_lr, warmup_cosine


def lars_reference(w, g, v, lr, momentum, wd, eta, exclude):
    """One LARS step written from the paper's formula, in float64."""
    grad = g + wd * w
    if not exclude:
        wn, gn = w.norm(), grad.norm()
        local = eta * wn / gn if wn > 0 and gn > 0 else 1.0
        grad = grad * local
    v = grad.clone() if v is None else momentum * v + grad
    return w - lr * v, v


@pytest.mark.parametrize("exclude", [False, True])
def test_lars_matches_formula_over_steps(exclude):
    torch.manual_seed(0)
    w0 = torch.randn(7, 5, dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    opt = LARS(
        [{"params": [p], "lars_exclude": exclude}],
        lr=0.3,
        momentum=0.9,
        weight_decay=1e-4,
        trust_coefficient=0.001,
    )
    w_ref, v_ref = w0.clone(), None
    for _ in range(4):
        g = torch.randn(7, 5, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        w_ref, v_ref = lars_reference(w_ref, g, v_ref, 0.3, 0.9, 1e-4, 0.001, exclude)
        torch.testing.assert_close(p.detach(), w_ref, rtol=1e-12, atol=1e-12)


def test_lars_zero_weight_uses_plain_lr():
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = LARS([p], lr=0.5, momentum=0.0, weight_decay=0.0)
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), -0.5, dtype=torch.float64))


def test_bias_and_norm_excluded_from_decay_and_adaptation():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = build_optimizer(
        model, "lars", lr=0.1, momentum=0.9, weight_decay=1e-3, exclude_bias_norm=True
    )
    by_exclusion = {g["lars_exclude"]: g for g in opt.param_groups}
    excluded = {id(p) for p in by_exclusion[True]["params"]}
    assert by_exclusion[True]["weight_decay"] == 0.0
    assert by_exclusion[False]["weight_decay"] == 1e-3
    for name, p in model.named_parameters():
        assert (id(p) in excluded) == (p.ndim == 1), name


def test_sgd_without_exclusion_keeps_one_group():
    model = nn.Linear(3, 3)
    opt = build_optimizer(
        model, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, exclude_bias_norm=False
    )
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 1


def test_warmup_cosine_endpoints_and_shape():
    total, warm = 100, 10
    assert warmup_cosine(0, total, warm) == pytest.approx(0.1)
    assert warmup_cosine(9, total, warm) == pytest.approx(1.0)
    assert warmup_cosine(10, total, warm) == pytest.approx(1.0)
    mid = warm + (total - warm) // 2
    assert warmup_cosine(mid, total, warm) == pytest.approx(0.5)
    assert warmup_cosine(total, total, warm) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(total, total, warm, min_ratio=0.1) == pytest.approx(0.1)
    values = [warmup_cosine(s, total, warm) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_fixed_lr_groups_keep_base_lr():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD(
        [{"params": [a], "base_lr": 0.2}, {"params": [b], "base_lr": 0.2, "fixed_lr": True}], lr=0.2
    )
    set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.2)


def test_lr_scaling_rules():
    assert scaled_lr(0.06, 512, 128, "linear") == pytest.approx(0.24)
    assert scaled_lr(0.1, 1024, 256, "sqrt") == pytest.approx(0.2)
    assert scaled_lr(0.1, 1024, 256, "none") == 0.1
    assert math.isclose(scaled_lr(1.0, 256, 256, "linear"), 1.0)


def test_lars_excludes_bias_and_norm_by_default_and_sgd_does_not():
    from selfsup.train.config import resolve_config

    assert resolve_config(
        "byol", "quickstart", overrides=["optim.name=lars"]
    ).optim.exclude_bias_norm
    assert not resolve_config("byol", "quickstart").optim.exclude_bias_norm
    given = resolve_config(
        "byol", "quickstart", overrides=["optim.name=lars", "optim.exclude_bias_norm=false"]
    )
    assert given.optim.exclude_bias_norm is False


def test_set_lr_works_on_an_optimizer_built_by_hand():
    """The README's own loop builds torch.optim.SGD(method.param_groups()) without base_lr."""
    from selfsup.train import set_lr

    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [w]}], lr=0.2)
    assert set_lr(opt, 0.5) == pytest.approx(0.1)
    assert set_lr(opt, 1.0) == pytest.approx(0.2)  # the base is the lr it was built with


def test_optimizer_from_an_unresolved_config_excludes_bias_and_norm_for_lars():
    from omegaconf import OmegaConf

    from selfsup.train import optimizer_from_config
    from selfsup.train.config import RunConfig

    cfg = OmegaConf.structured(RunConfig)  # not through resolve_config: exclude_bias_norm None
    cfg.optim.name = "lars"
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    groups = optimizer_from_config(model, cfg.optim, 64).param_groups
    assert sorted(g["lars_exclude"] for g in groups) == [False, True]


@pytest.mark.parametrize("exclude", [False, True])
def test_sgd_applies_the_configured_weight_decay(exclude):
    """A zero-gradient SGD step (momentum 0) shrinks a weight by lr * wd exactly; with the
    exclusion on, biases and norm parameters are not decayed."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = build_optimizer(model, "sgd", lr=0.1, momentum=0.0, weight_decay=5e-4,
                          exclude_bias_norm=exclude)  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        decayed = not (exclude and p.ndim == 1)
        expected = before[name] * (1 - 0.1 * 5e-4) if decayed else before[name]
        # the decay moves a weight by ~5e-5 of itself; float32 rounding is ~1e-7 of it
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-8, msg=name)


def test_optimizer_from_config_passes_every_setting_on():
    from omegaconf import OmegaConf

    from selfsup.train import optimizer_from_config
    from selfsup.train.config import RunConfig

    cfg = OmegaConf.structured(RunConfig)
    cfg.optim.name, cfg.optim.trust_coefficient, cfg.optim.weight_decay = "lars", 0.02, 1e-5
    cfg.optim.momentum, cfg.optim.lr, cfg.optim.lr_reference_batch = 0.8, 0.3, 256
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = optimizer_from_config(model, cfg.optim, 512)
    assert {g["trust_coefficient"] for g in opt.param_groups} == {0.02}
    assert {g["momentum"] for g in opt.param_groups} == {0.8}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 1e-5}  # bias/norm excluded
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.3 * 512 / 256] * 2)


def test_warmup_cosine_with_a_floor_peaks_at_one_and_decays_to_it():
    """lr factor = min + (1 - min) (cos(pi t) + 1) / 2 after warm-up (never above 1)."""
    total, warm, floor = 100, 10, 0.1
    assert warmup_cosine(warm, total, warm, min_ratio=floor) == pytest.approx(1.0)
    mid = warm + (total - warm) // 2
    assert warmup_cosine(mid, total, warm, min_ratio=floor) == pytest.approx(0.55)
    for step in (20, 37, 80):
        t = (step - warm) / (total - warm)
        expected = floor + (1 - floor) * (math.cos(math.pi * t) + 1) / 2
        assert warmup_cosine(step, total, warm, min_ratio=floor) == pytest.approx(expected), step


def _filled_sgd(model: nn.Module, exclude: bool) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    opt = build_optimizer(model, "sgd", 0.1, 0.9, 1e-4, exclude_bias_norm=exclude)
    model(torch.randn(4, 3)).square().sum().backward()
    opt.step()
    return opt


@pytest.mark.parametrize("written_with", [False, True])
def test_a_saved_optimizer_is_regrouped_parameter_by_parameter(written_with):
    """A resume that turns exclude_bias_norm on or off numbers the parameters anew (one group,
    or weights then biases/norms): each momentum buffer must reach its own parameter."""
    from selfsup.train.optim import regroup_optimizer_state, same_group_layout

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    saved = _filled_sgd(model, written_with)
    buffers = {n: saved.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    now = build_optimizer(model, "lars", 0.1, 0.9, 1e-4, exclude_bias_norm=not written_with)
    assert not same_group_layout(saved.state_dict(), now)
    now.load_state_dict(regroup_optimizer_state(saved.state_dict(), model, written_with, now))
    for name, param in model.named_parameters():
        assert torch.equal(now.state[param]["momentum_buffer"], buffers[name]), name
    # the groups keep this run's settings: biases and norms out of weight decay and LARS
    assert [g["weight_decay"] for g in now.param_groups] == (
        [1e-4] if written_with else [1e-4, 0.0]
    )


def test_a_saved_optimizer_of_other_parameters_is_refused():
    from selfsup.errors import CheckpointError
    from selfsup.train.optim import regroup_optimizer_state

    saved = _filled_sgd(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), False)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    now = build_optimizer(model, "sgd", 0.1, 0.9, 1e-4, exclude_bias_norm=True)
    with pytest.raises(CheckpointError, match="trainable parameters changed"):
        regroup_optimizer_state(saved.state_dict(), model, False, now)

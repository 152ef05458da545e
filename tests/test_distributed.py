"""Data-parallel training: 2 CPU processes (gloo) against 1 process on the same samples.

All multi-process scenarios run in one ``torch.multiprocessing`` spawn (a module fixture) to pay
the interpreter start-up once; each test then checks its scenario's results against a
single-process reference computed here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from selfsup.data.batches import BatchStream
from selfsup.errors import ConfigError
from selfsup.evaluate.features import extract_features
from selfsup.evaluate.knn import knn_accuracy
from selfsup.losses import concat_all_gather, gather_with_grad, nt_xent_loss
from selfsup.methods import BYOL, MoCo, SimCLR
from selfsup.methods.moco import batch_shuffle_ddp, batch_unshuffle_ddp
from selfsup.train.distributed import (
    DistEnv,
    DistributedBatchStream,
    all_ranks_true,
    all_reduce_mean,
    all_reduce_sum,
    any_rank,
    cleanup,
    convert_sync_batchnorm,
    distributed_extract_features,
    distributed_knn,
    gather_rows,
    init_distributed,
    is_main,
    per_rank_batch_size,
    rank_seed,
    save_on_main,
    shard_indices,
    shard_range,
    strip_devices_flag,
    wrap_ddp,
)

WORLD = 2
B = 3  # per-rank batch; the single-process reference uses WORLD * B
TEMPERATURE = 0.5
SPAWN_TIMEOUT_S = 120


# ----------------------------------------------------------------------------- shared set-up
def views(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 2, 2, generator=g), torch.randn(n, 3, 2, 2, generator=g)


def rows(rank: int) -> slice:
    return slice(rank * B, (rank + 1) * B)


def tiny_backbone(batch_norm: bool = False) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(12, 8)]
    if batch_norm:
        layers += [nn.BatchNorm1d(8), nn.ReLU()]
    return nn.Sequential(*layers)


def tiny_simclr() -> SimCLR:
    torch.manual_seed(0)
    return SimCLR(tiny_backbone(), 8, proj_hidden=8, proj_dim=4, temperature=TEMPERATURE)


def tiny_moco(
    symmetric: bool, shuffle_bn: bool, *, bn_splits: int = 1, queue_size: int = 10
) -> MoCo:
    """bn_splits=1 (plain BatchNorm per process) unless a test compares BN groups; with more, the
    backbone gets a BatchNorm for them to split."""
    torch.manual_seed(0)
    return MoCo(
        tiny_backbone(batch_norm=bn_splits > 1),
        8,
        proj_hidden=8,
        proj_dim=4,
        queue_size=queue_size,
        momentum=0.9,
        symmetric=symmetric,
        shuffle_bn=shuffle_bn,
        bn_splits=bn_splits,  # per process: bn_splits // world
    )


def tiny_byol() -> BYOL:
    torch.manual_seed(0)
    return BYOL(
        tiny_backbone(batch_norm=True), 8, proj_hidden=8, proj_dim=4, pred_hidden=8, tau_base=0.9
    )


def trainable_grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters() if p.requires_grad]


def bn_backbone(running_mean: float) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12), nn.Linear(12, 5))
    net[1].running_mean.fill_(running_mean)
    return net


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


def eval_images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    bank = torch.randint(0, 256, (7, 3, 2, 2), dtype=torch.uint8, generator=g)
    query = torch.randint(0, 256, (5, 3, 2, 2), dtype=torch.uint8, generator=g)
    return (
        bank,
        torch.randint(0, 3, (7,), generator=g),
        query,
        torch.randint(0, 3, (5,), generator=g),
    )


MOCO_STEPS = 2
MOCO_VARIANTS = {"plain": (False, False), "symmetric_shuffle_bn": (True, True)}
# MoCo's BatchNorm groups: a global batch of 8 in 4 groups of 2, i.e. 2 per rank on 2 ranks
SPLIT_B, SPLIT_GROUPS = 4, 4


def tiny_moco_split_bn() -> MoCo:
    return tiny_moco(True, True, bn_splits=SPLIT_GROUPS, queue_size=16)


def run_moco(
    method: MoCo, model: nn.Module, data: list, progress_steps: int, grads: list | None = None
) -> list:
    """SGD steps of ``model`` (``method`` or its DDP wrapper) on ``data`` [(x1, x2), ...]; each
    step's gradients are appended to ``grads`` if given. The RNG is seeded before each step, so
    the key shuffle draws the same permutation of the global batch in one process and in two."""
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for step, (x1, x2) in enumerate(data):
        torch.manual_seed(100 + step)
        out = model(x1, x2)
        opt.zero_grad()
        out["loss"].backward()
        if grads is not None:
            grads.append(trainable_grads(method))
        opt.step()
        method.update_target((step + 1) / progress_steps)
        losses.append(out["loss"].detach())
    return losses


# ----------------------------------------------------------------------------- the workers
def scenario_simclr(env: DistEnv, out_dir: Path) -> dict:
    x1, x2 = views(WORLD * B, seed=1)
    torch.manual_seed(3)
    projector = nn.Linear(12, 5)
    ddp = wrap_ddp(projector, env)
    a, b = x1[rows(env.rank)].flatten(1), x2[rows(env.rank)].flatten(1)
    loss = nt_xent_loss(ddp(a), ddp(b), TEMPERATURE, gather_distributed=True)
    loss.backward()
    result = {
        "loss": loss.detach(),
        "loss_mean": all_reduce_mean(loss.detach()),
        "grads": trainable_grads(projector),
    }
    method = tiny_simclr()
    model = wrap_ddp(method, env)  # kept alive: its reducer all-reduces in the backward
    out = model(x1[rows(env.rank)], x2[rows(env.rank)])
    out["loss"].backward()
    result.update(
        method_loss_mean=all_reduce_mean(out["loss"].detach()), method_grads=trainable_grads(method)
    )
    return result


def scenario_moco(env: DistEnv, out_dir: Path) -> dict:
    result = {}
    for name, (symmetric, shuffle_bn) in MOCO_VARIANTS.items():
        method = tiny_moco(symmetric, shuffle_bn)
        # No buffer broadcast: the queues must agree by construction, not by DDP's copy.
        model = wrap_ddp(method, env, sync_buffers=False)
        data = [views(WORLD * B, seed=10 + s) for s in range(MOCO_STEPS)]
        local = [(x1[rows(env.rank)], x2[rows(env.rank)]) for x1, x2 in data]
        losses = run_moco(method, model, local, MOCO_STEPS)
        result[name] = {
            "queue": method.queue.clone(),
            "ptr": method.queue_ptr.clone(),
            "losses": [all_reduce_mean(v) for v in losses],
        }
    method = tiny_moco_split_bn()
    model = wrap_ddp(method, env, sync_buffers=False)
    data = [views(WORLD * SPLIT_B, seed=20 + s) for s in range(MOCO_STEPS)]
    own = slice(env.rank * SPLIT_B, (env.rank + 1) * SPLIT_B)
    grads: list = []
    losses = run_moco(method, model, [(x1[own], x2[own]) for x1, x2 in data], MOCO_STEPS, grads)
    result["split_bn"] = {
        "local_bn_splits": method.local_bn_splits,
        "queue": method.queue.clone(),
        "losses": [all_reduce_mean(v) for v in losses],
        "grads": grads,  # DDP's averages over the ranks
    }
    ids = torch.arange(B, dtype=torch.float32)[:, None] + env.rank * B  # global row ids [B, 1]
    torch.manual_seed(1 + env.rank)  # ranks' own streams: rank 0's draw must be everyone's
    shuffled, idx_unshuffle = batch_shuffle_ddp(ids)
    result["shuffle"] = {
        "shuffled": shuffled,
        "idx_unshuffle": idx_unshuffle,
        "restored": batch_unshuffle_ddp(shuffled, idx_unshuffle),
        "ids": ids,
    }
    return result


def scenario_ema(env: DistEnv, out_dir: Path) -> dict:
    method = tiny_byol()
    initial = [p.clone() for p in method.target_backbone.parameters()]
    model = wrap_ddp(method, env)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):  # DDP raises on step 2 if a registered parameter got no gradient
        x1, x2 = views(4, seed=100 * env.rank + step)  # different images on each rank
        out = model(x1, x2)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.update_target((step + 1) / 3)
    targets = list(method.target_backbone.parameters()) + list(method.target_projector.parameters())
    return {
        "target": [p.detach().clone() for p in targets],
        "target_grads": [p.grad for p in targets],
        "online": [p.detach().clone() for p in method.parameters() if p.requires_grad],
        "initial_target": initial,
    }


def scenario_collectives(env: DistEnv, out_dir: Path) -> dict:
    rank = env.rank
    t = (torch.arange(B * 2, dtype=torch.float32).view(B, 2) + 100 * rank).requires_grad_()
    weights = torch.randn(WORLD * B, 2, generator=torch.Generator().manual_seed(10 + rank))
    gathered = gather_with_grad(t)
    (gathered * weights).sum().backward()
    no_grad = concat_all_gather(t * 2)

    bank, bank_labels, query, query_labels = eval_images()
    backbone = bn_backbone(running_mean=float(rank))  # rank 1's BN stats differ until synced
    feats = distributed_extract_features(backbone, bank, to_float, batch_size=2)
    knn = distributed_knn(
        bn_backbone(float(rank)),
        bank,
        bank_labels,
        query,
        query_labels,
        to_float,
        batch_size=2,
        k=3,
        temperature=0.1,
    )

    def write_marker() -> int:
        (out_dir / f"written_by_{rank}").write_text("x")
        return rank

    saved = save_on_main(write_marker)
    marker_seen = (out_dir / "written_by_0").exists()  # after the barrier in save_on_main
    n = 5  # uneven shards: 3 rows and 2 rows
    own = torch.arange(n, dtype=torch.float32)[shard_range(n, rank, WORLD)]
    return {
        "t": t.detach(),
        "grad": t.grad,
        "weights": weights,
        "gathered": gathered.detach(),
        "no_grad": no_grad,
        "no_grad_requires_grad": no_grad.requires_grad,
        "mean": all_reduce_mean(torch.tensor(float(rank))),
        "sum": all_reduce_sum(torch.tensor(rank + 1)),
        "all_true": all_ranks_true(torch.tensor(rank == 0)),
        "any": any_rank(rank == 1),
        "none": any_rank(False),
        "is_main": is_main(),
        "saved": saved,
        "marker_seen": marker_seen,
        "rows": gather_rows(own[:, None].repeat(1, 2), n),
        "feats": feats,
        "knn": knn,
        "env": (env.rank, env.world_size, env.local_rank),
    }


def scenario_failed_write(env: DistEnv, out_dir: Path) -> dict:
    """Rank 0's write fails (a full disk): every rank raises, none waits at a barrier forever,
    and the group still works for the next write."""

    def full_disk() -> None:
        raise OSError(28, "No space left on device", str(out_dir / "last.pt"))

    raised = None
    try:
        save_on_main(full_disk)
    except Exception as exc:  # which error each rank sees
        raised = type(exc).__name__
    after = save_on_main(lambda: "written")
    return {"raised": raised, "after": after}


SCENARIOS = {
    "simclr": scenario_simclr,
    "moco": scenario_moco,
    "ema": scenario_ema,
    "collectives": scenario_collectives,
    "failed_write": scenario_failed_write,  # last: without the fix the ranks would stall here
}


def scenario_refusal(argv: list[str]) -> dict:
    """``selfsup eval --protocol finetune`` (``argv``) in this 2-process group, whose processes
    have what torchrun gives each (RANK, WORLD_SIZE, MASTER_ADDR/PORT): refused before any work.
    Run after the other scenarios: the command leaves the process group, as under torchrun."""
    import contextlib
    import io

    from selfsup.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(argv)
    return {"status": status, "stderr": err.getvalue()}


def _worker(rank: int, port: int, out_dir: str, refusal_argv: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    results: dict = {}
    scenarios = {
        **{name: lambda fn=fn: fn(env, Path(out_dir)) for name, fn in SCENARIOS.items()},
        "refusal": lambda: scenario_refusal(refusal_argv),
    }
    try:
        for name, run_scenario in scenarios.items():
            try:
                results[name] = run_scenario()
            except Exception:  # reported by the test that owns the scenario
                results[name] = {"error": traceback.format_exc()}
    finally:
        cleanup()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_options(cache: Path) -> list[str]:
    return ["--limit", "300", "--cache-dir", str(cache), "--no-progress", "--baselines"]


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny pretraining run (and its data cache) for the eval and embed commands."""
    from selfsup.cli import main

    root = tmp_path_factory.mktemp("eval")
    cache, run = root / "cache", root / "run"
    tiny = ["model.backbone=resnet_tiny", "data.image_size=16", "data.storage_size=16"]
    train = ["data.limit=256", "train.batch_size=64", "train.epochs=1", "train.knn_every=0"]
    argv = ["pretrain", "--out", str(run), "--no-progress", *tiny, *train]
    assert main([*argv, f"data.cache_dir={cache}"]) == 0
    return run, cache


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory, eval_run) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ddp")
    run, cache = eval_run
    refusal = ["eval", str(run), "--protocol", "finetune", *_eval_options(cache)]
    context = mp.start_processes(
        _worker,
        args=(_free_port(), str(out_dir), refusal),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} gloo workers did not finish in {SPAWN_TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def scenario(results: list[dict], name: str) -> list[dict]:
    for rank, result in enumerate(results):
        if "error" in result[name]:
            pytest.fail(f"rank {rank}, scenario {name}:\n{result[name]['error']}")
    return [result[name] for result in results]


def assert_close_lists(got: list, want: list, **tol) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


# ----------------------------------------------------------------------------- 2 processes
def nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR eq. 1 term by term over all 2N views."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = z.shape[0]
    terms = []
    for i in range(n2):
        j = (i + n2 // 2) % n2
        denominator = sum(torch.exp(z[i] @ z[k] / t) for k in range(n2) if k != i)
        terms.append(-torch.log(torch.exp(z[i] @ z[j] / t) / denominator))
    return torch.stack(terms).mean()


def test_simclr_two_processes_equal_one_process_of_double_batch(dist_results):
    results = scenario(dist_results, "simclr")
    x1, x2 = views(WORLD * B, seed=1)
    torch.manual_seed(3)
    projector = nn.Linear(12, 5)
    z1, z2 = projector(x1.flatten(1)), projector(x2.flatten(1))
    loss = nt_xent_loss(z1, z2, TEMPERATURE)
    torch.testing.assert_close(loss, nt_xent_loop(z1, z2, TEMPERATURE))
    loss.backward()
    per_rank = torch.stack([r["loss"] for r in results])
    # Each rank's loss covers its own anchors only, so the ranks differ; their mean is the loss.
    assert not torch.allclose(per_rank[0], per_rank[1])
    torch.testing.assert_close(per_rank.mean(), loss.detach())
    for r in results:
        torch.testing.assert_close(r["loss_mean"], loss.detach())
        # The gather's backward sums over ranks and DDP averages: the single-process gradient.
        assert_close_lists(r["grads"], trainable_grads(projector), atol=1e-6, rtol=1e-5)

    # The SimCLR module under DDP: BN in the projector normalises each rank's 2B views, so the
    # reference runs the network per half and contrasts the concatenated projections.
    method = tiny_simclr()
    halves = [
        method.projector(method.backbone(torch.cat([x1[rows(r)], x2[rows(r)]])))
        for r in range(WORLD)
    ]
    z1 = torch.cat([h.chunk(2)[0] for h in halves])
    z2 = torch.cat([h.chunk(2)[1] for h in halves])
    ref = nt_xent_loss(z1, z2, TEMPERATURE)
    ref.backward()
    for r in results:
        torch.testing.assert_close(r["method_loss_mean"], ref.detach())
        assert_close_lists(r["method_grads"], trainable_grads(method), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", list(MOCO_VARIANTS))
def test_moco_queue_on_every_rank_equals_single_process_queue(dist_results, variant):
    results = [r[variant] for r in scenario(dist_results, "moco")]
    method = tiny_moco(*MOCO_VARIANTS[variant])
    data = [views(WORLD * B, seed=10 + s) for s in range(MOCO_STEPS)]
    losses = run_moco(method, method, data, MOCO_STEPS)
    keys_per_step = WORLD * B * (2 if MOCO_VARIANTS[variant][0] else 1)
    assert keys_per_step * MOCO_STEPS > method.queue.shape[0]  # the ring buffer wrapped
    for r in results:
        torch.testing.assert_close(r["queue"], method.queue, atol=1e-6, rtol=1e-5)
        assert int(r["ptr"]) == int(method.queue_ptr)
        assert_close_lists(r["losses"], losses, atol=1e-6, rtol=1e-5)


def test_moco_bn_groups_on_two_processes_equal_one_process_of_the_global_batch(dist_results):
    """bn_splits=4 over a global batch of 8: 2 groups of 2 on each of 2 ranks, with the key batch
    shuffled across ranks, gives one process's 4 groups (keys shuffled among them): the same
    BatchNorm statistics, hence the same losses, gradients and queue."""
    results = [r["split_bn"] for r in scenario(dist_results, "moco")]
    method = tiny_moco_split_bn()
    assert method.local_bn_splits == SPLIT_GROUPS
    data = [views(WORLD * SPLIT_B, seed=20 + s) for s in range(MOCO_STEPS)]
    grads: list = []
    losses = run_moco(method, method, data, MOCO_STEPS, grads)
    for r in results:
        assert r["local_bn_splits"] == SPLIT_GROUPS // WORLD
        assert_close_lists(r["losses"], losses, atol=1e-6, rtol=1e-5)
        for got, want in zip(r["grads"], grads, strict=True):
            assert_close_lists(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["queue"], method.queue, atol=1e-6, rtol=1e-5)


def test_moco_shuffle_bn_permutes_the_global_batch_and_restores_it(dist_results):
    results = [r["shuffle"] for r in scenario(dist_results, "moco")]
    torch.testing.assert_close(results[0]["idx_unshuffle"], results[1]["idx_unshuffle"])
    shuffled = torch.cat([r["shuffled"] for r in results]).flatten()
    assert sorted(shuffled.tolist()) == list(range(WORLD * B))  # a permutation of all ranks' rows
    assert shuffled.tolist() != list(range(WORLD * B))
    # idx_unshuffle inverts the permutation: row i of the shuffled global batch goes back home.
    restored = shuffled[results[0]["idx_unshuffle"]]
    torch.testing.assert_close(restored, torch.arange(WORLD * B, dtype=torch.float32))
    for r in results:
        torch.testing.assert_close(r["restored"], r["ids"])


def test_ema_targets_stay_identical_across_ranks(dist_results):
    rank0, rank1 = scenario(dist_results, "ema")
    assert all(g is None for g in rank0["target_grads"])  # DDP left the frozen targets alone
    assert_close_lists(rank0["online"], rank1["online"], atol=0, rtol=0)
    assert_close_lists(rank0["target"], rank1["target"], atol=0, rtol=0)
    moved = [
        not torch.equal(a, b)
        for a, b in zip(rank0["target"], rank0["initial_target"], strict=False)
    ]
    assert any(moved)  # the EMA update ran


def test_gather_with_grad_forward_and_backward(dist_results):
    results = scenario(dist_results, "collectives")
    everything = torch.cat([r["t"] for r in results])  # rank 0's rows first
    for r in results:
        torch.testing.assert_close(r["gathered"], everything)
        torch.testing.assert_close(r["no_grad"], everything * 2)
        assert r["no_grad_requires_grad"] is False
    # loss_r = sum(gathered * w_r); d(sum_r loss_r) / d t_r = sum_s w_s[rows of r].
    total_weight = sum(r["weights"] for r in results)
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["grad"], total_weight[rows(rank)])


def test_metric_reductions_checkpoint_on_main_and_env(dist_results):
    results = scenario(dist_results, "collectives")
    for rank, r in enumerate(results):
        assert r["env"] == (rank, WORLD, rank)
        torch.testing.assert_close(r["mean"], torch.tensor(0.5))
        torch.testing.assert_close(r["sum"], torch.tensor(3))
        assert bool(r["all_true"]) is False
        assert r["any"] is True and r["none"] is False
        assert r["is_main"] is (rank == 0)
        assert r["marker_seen"]  # rank 1 waited for rank 0's write
        torch.testing.assert_close(r["rows"], torch.arange(5.0)[:, None].repeat(1, 2))
    assert results[0]["saved"] == 0 and results[1]["saved"] is None


def test_distributed_features_and_knn_match_one_process(dist_results):
    results = scenario(dist_results, "collectives")
    bank, bank_labels, query, query_labels = eval_images()
    reference = bn_backbone(running_mean=0.0)  # rank 0's statistics are broadcast
    feats = extract_features(reference, bank, to_float, batch_size=2)
    knn = knn_accuracy(
        feats,
        bank_labels,
        extract_features(reference, query, to_float, batch_size=2),
        query_labels,
        k=3,
        temperature=0.1,
    )
    for r in results:
        torch.testing.assert_close(r["feats"], feats)
        assert r["knn"] == knn


# ----------------------------------------------------------------------------- one process
def test_single_process_env_and_no_op_collectives(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed("cpu")
    assert env == DistEnv(0, 1, 0, torch.device("cpu")) and not env.distributed and env.is_main
    t = torch.randn(4, 3, requires_grad=True)
    assert gather_with_grad(t) is t and concat_all_gather(t) is t
    assert all_reduce_mean(t) is t and any_rank(True) and is_main()
    method = tiny_simclr()
    assert wrap_ddp(method, env) is method
    assert convert_sync_batchnorm(method, True, env) is method
    assert save_on_main(lambda: 5) == 5
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(
        nt_xent_loss(z1, z2, 0.5, gather_distributed=True), nt_xent_loop(z1, z2, 0.5)
    )


def test_init_distributed_rejects_a_fixed_gpu_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="train.device=cuda"):
        init_distributed("cuda:1")


def test_sync_batchnorm_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="train.sync_bn"):
        convert_sync_batchnorm(tiny_byol(), True, DistEnv(0, 2, 0, torch.device("cpu")))


def test_shard_indices_split_each_global_batch_into_rank_blocks():
    order = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    shards = [shard_indices(order, r, WORLD, B) for r in range(WORLD)]
    steps = 23 // (WORLD * B)
    for s in range(steps):
        global_batch = torch.cat([shard[s * B : (s + 1) * B] for shard in shards])
        torch.testing.assert_close(global_batch, order[s * WORLD * B : (s + 1) * WORLD * B])
    assert len(set(torch.cat(shards).tolist())) == steps * WORLD * B  # disjoint
    with pytest.raises(ValueError):
        shard_indices(order, WORLD, WORLD, B)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_distributed_batch_stream_matches_single_process_global_batches(world):
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 1, 1).clone()
    single = BatchStream(images, batch_size=world * 2, seed=4)
    streams = [
        DistributedBatchStream(images, 2, rank=r, world_size=world, seed=4) for r in range(world)
    ]
    for epoch, start in ((0, 0), (1, 1)):  # a resumed epoch skips the same global steps
        single.set_epoch(epoch, start)
        for stream in streams:
            stream.set_epoch(epoch, start)
            assert stream.steps_per_epoch == single.steps_per_epoch == 20 // (world * 2)
        per_rank = [list(stream) for stream in streams]
        for step, (indices, batch) in enumerate(single):
            torch.testing.assert_close(torch.cat([p[step][0] for p in per_rank]), indices)
            torch.testing.assert_close(torch.cat([p[step][1] for p in per_rank]), batch)


def test_global_batch_split_and_rank_seeds():
    assert per_rank_batch_size(64, 4) == 16
    with pytest.raises(ConfigError, match="train.batch_size=30"):
        per_rank_batch_size(30, 4)
    with pytest.raises(ConfigError, match="larger than the dataset"):
        DistributedBatchStream(torch.zeros(5, 3, 1, 1, dtype=torch.uint8), 3, rank=0, world_size=2)
    seeds = [rank_seed(0, r) for r in range(4)]
    assert seeds[0] == 0 and len(set(seeds)) == 4 and rank_seed(1, 1) != seeds[1]


def test_shard_range_covers_rows_in_order_and_gather_rows_is_identity_in_one_process():
    for n, world in ((5, 2), (2, 3), (9, 3)):
        parts = [range(n)[shard_range(n, r, world)] for r in range(world)]
        assert [i for part in parts for i in part] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    t = torch.randn(3, 2)
    assert gather_rows(t, 3) is t


def test_strip_devices_flag():
    argv = ["pretrain", "--devices", "4", "--out", "x", "--devices=2", "train.epochs=1"]
    assert strip_devices_flag(argv) == ["pretrain", "--out", "x", "train.epochs=1"]


# ----------------------------------------------------------------------------- end to end
def _checkpoint_epoch(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)[
        "epoch"
    ]


def _child_env() -> dict[str, str]:
    """The environment of a `python -m selfsup` child: one thread, this checkout first."""
    checkout = str(Path(__file__).resolve().parents[1])
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([checkout, os.environ.get("PYTHONPATH", "")]),
    }


def test_two_process_run_resumes(tmp_path):
    from selfsup.cli import main

    env = _child_env()
    overrides = [
        "data.source=mnist5k",
        "data.image_size=16",
        "model.backbone=resnet_tiny",
        "train.batch_size=32",
        "train.device=cpu",
        "train.progress=false",
        "train.knn_every=0",
        "method.queue_size=64",
        "data.limit=128",  # 4 steps an epoch: logged at each epoch's end
        f"data.cache_dir={tmp_path / 'cache'}",
    ]

    def argv(run: Path, *extra: str) -> list[str]:
        return ["pretrain", "--method", "moco", "--out", str(run), *extra, *overrides]

    def torchrun(run: Path, *extra: str) -> subprocess.Popen:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = [*launcher, "--nproc_per_node=2", "-m", "selfsup", *argv(run, *extra)]
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def finished(proc: subprocess.Popen, status: int = 0) -> str:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == status, err[-4000:]
        return err

    # a 3-epoch run stopped after 2 (a planned stop: torchrun reports its workers' status 3 as a
    # failure, 1), and the same run uninterrupted, at the same time (one thread per process)
    first, whole = tmp_path / "run", tmp_path / "whole"
    stopped = torchrun(first, "train.epochs=3", "train.stop_after_epochs=2")
    uninterrupted = torchrun(whole, "train.epochs=3")
    err = finished(stopped, status=1)
    finished(uninterrupted)
    assert "Resume with: torchrun <as before> -m selfsup pretrain --out" in err  # not plain
    assert _checkpoint_epoch(first) == 2 and not (first / "encoder.pt").exists()
    # rank 0 alone writes the logs: each logged step once, in order
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps and steps == sorted(set(steps)), steps
    runs = {nproc: tmp_path / f"resume{nproc}" for nproc in (1, 2)}
    for run in runs.values():
        shutil.copytree(first, run)
    # resumed on 2 processes (torchrun, in the background) and on 1 (`selfsup pretrain` in this
    # process, which has torch imported already) at the same time: the two copies share nothing
    two = torchrun(runs[2], "--resume")
    try:
        assert main(argv(runs[1], "--resume")) == 0
    finally:
        finished(two)
    for run in runs.values():
        assert _checkpoint_epoch(run) == 3
        assert (run / "results.json").exists() and (run / "encoder.pt").exists()
    results = {n: json.loads((run / "results.json").read_text()) for n, run in runs.items()}
    assert results[1]["processes"] == 1 and results[2]["processes"] == 2
    # every process's random streams were in the checkpoint: on 2 processes again, the run
    # ends with the uninterrupted run's weights (on 1, with other augmentations: other weights)
    expected = torch.load(whole / "encoder.pt", weights_only=True)
    resumed = torch.load(runs[2] / "encoder.pt", weights_only=True)
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


def test_a_resume_on_two_machines_that_see_different_run_directories_is_refused(tmp_path):
    """Two "machines" (torchrun --nnodes=2 on this host), each with its own --out: node 0 holds
    the run, node 1 nothing. Before, node 1 took the defaults, started at step 0 and the job
    died in a collective of mismatched sizes; now both stop at once, saying --out must be
    shared."""
    from omegaconf import OmegaConf

    from selfsup.train.config import resolve_config

    env = _child_env()
    port = _free_port()
    overrides = ["train.device=cpu", f"data.cache_dir={tmp_path / 'cache'}"]
    node_out = [tmp_path / "node0", tmp_path / "node1"]
    node_out[0].mkdir()
    OmegaConf.save(resolve_config("simclr", overrides=overrides), node_out[0] / "config.yaml")
    procs = []
    for node, out in enumerate(node_out):
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
        launch += [f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}"]
        cmd = [*launch, "-m", "selfsup", "pretrain", "--out", str(out), "--resume", *overrides]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    errs = [proc.communicate(timeout=300)[1] for proc in procs]
    assert all(proc.returncode != 0 for proc in procs), errs
    assert "--out must be a folder that every machine shares" in errs[0], errs[0][-3000:]
    assert "decoding" not in errs[0] + errs[1]  # refused before any data was read
    assert not (node_out[1] / "config.yaml").exists()


def test_torchrun_with_one_process_matches_the_plain_run(tmp_path):
    """The same run launched plainly and through torchrun (1 process, gloo, DDP-wrapped) ends with
    bit-identical weights: the distributed path adds no change of its own."""
    from selfsup.cli import main

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    settings = [
        "pretrain",
        "--method",
        "simclr",
        "data.source=mnist5k",
        "data.image_size=16",
        "data.storage_size=16",
        "data.limit=256",
        "model.backbone=resnet_tiny",
        "train.batch_size=32",
        "train.epochs=1",
        "train.device=cpu",
        "train.progress=false",
        "train.knn_every=0",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    # torchrun's run in the background while the plain one runs in this process (one thread
    # each; the cache is written atomically, whichever builds it first)
    proc = subprocess.Popen(
        [*torchrun, "-m", "selfsup", *settings, "--out", str(tmp_path / "torchrun")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert main([*settings, "--out", str(tmp_path / "plain")]) == 0
    finally:
        _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    plain = torch.load(tmp_path / "plain" / "encoder.pt", weights_only=True)
    launched = torch.load(tmp_path / "torchrun" / "encoder.pt", weights_only=True)
    assert plain.keys() == launched.keys()
    for key in plain:
        assert torch.equal(plain[key], launched[key]), key


def test_eval_embed_and_predict_under_torchrun_share_the_features_and_write_once(
    tmp_path, eval_run, dist_results
):
    """``selfsup eval`` (kNN, fast linear, random-init baseline, ``--save-classifiers``),
    ``selfsup embed`` and ``selfsup predict`` on 2 processes give one process's numbers,
    vectors and predictions, written once; protocols that train a network are refused in a
    2-process group before any work (``selfsup eval --protocol finetune`` ran in the module's
    spawned group: no torchrun start-up of its own)."""
    import csv

    import numpy as np

    from selfsup.cli import main

    run, cache = eval_run
    evaluation = _eval_options(cache)
    protocol = ["--protocol", "linear", "--linear-mode", "fast", "--lbfgs-iters", "20"]
    protocol += ["--save-classifiers"]
    embed = ["embed", str(run), "--data", "mnist5k", "--limit", "301", "--cache-dir", str(cache)]
    clf = run / "classifiers" / "mnist5k_limit300_linear_fast"
    predict = ["predict", str(tmp_path / "clf1.pt"), "--data", "mnist5k", "--split", "test"]
    predict += ["--limit", "150", "--cache-dir", str(cache)]

    assert (
        main(["eval", str(run), *protocol, *evaluation, "--results-csv", str(tmp_path / "one.csv")])
        == 0
    )
    one = json.loads((run / "eval_mnist5k_limit300_linear.json").read_text())
    assert main([*embed, "--out", str(tmp_path / "one.npz")]) == 0
    for suffix in (".pt", ".json"):  # the one-process classifier, for both predictions
        shutil.copy(clf.with_suffix(suffix), (tmp_path / "clf1").with_suffix(suffix))
    clf.with_suffix(".pt").unlink()  # the 2-process eval must write it again
    assert main([*predict, "--out", str(tmp_path / "one_pred.csv")]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    commands = {
        "eval": [
            "eval",
            str(run),
            *protocol,
            *evaluation,
            "--results-csv",
            str(tmp_path / "two.csv"),
        ],
        "embed": [*embed, "--out", str(tmp_path / "two.npz")],
        "predict": [*predict, "--out", str(tmp_path / "two_pred.csv")],
    }
    done = {
        name: subprocess.run(
            [*torchrun, "-m", "selfsup", *cmd],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        for name, cmd in commands.items()
    }
    for name in commands:
        assert done[name].returncode == 0, done[name].stderr[-4000:]
    two = json.loads((run / "eval_mnist5k_limit300_linear.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    for encoder in ("ssl", "random_init"):
        a, b = one["protocols"]["linear_fast"][encoder], two["protocols"]["linear_fast"][encoder]
        assert a["top1"] == pytest.approx(b["top1"], abs=1 / 300), encoder  # at most one image
    rows = [(tmp_path / name).read_text().splitlines() for name in ("one.csv", "two.csv")]
    assert len(rows[0]) == len(rows[1]) > 1  # rank 0 alone appended its rows
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert a["embeddings"].shape == b["embeddings"].shape == (301, 128)
    np.testing.assert_allclose(a["embeddings"], b["embeddings"], atol=1e-5, rtol=1e-5)
    assert list(a["paths"]) == list(b["paths"]) and (a["labels"] == b["labels"]).all()
    # the 2-process eval saved its classifier (rank 0, once), measured as one process's
    saved = json.loads(clf.with_suffix(".json").read_text())
    assert clf.with_suffix(".pt").exists()
    measured = one["protocols"]["linear_fast"]["ssl"]["top1"]
    assert saved["top1"] == pytest.approx(measured, abs=1 / 300)
    assert done["eval"].stdout.count("classifiers saved in") == 1
    # predict: every image once, in order, the same classes as one process gave
    pred = [list(csv.DictReader(open(tmp_path / n))) for n in ("one_pred.csv", "two_pred.csv")]
    assert len(pred[0]) == len(pred[1]) == 150
    assert [r["path"] for r in pred[0]] == [r["path"] for r in pred[1]]
    assert [r["class"] for r in pred[0]] == [r["class"] for r in pred[1]]
    conf = [[float(r["confidence"]) for r in rows] for rows in pred]
    np.testing.assert_allclose(conf[0], conf[1], atol=1e-4)
    assert done["predict"].stdout.count("classified into") == 1  # rank 0 alone says it
    refused = scenario(dist_results, "refusal")
    assert all(r["status"] != 0 for r in refused)
    stderr = "".join(r["stderr"] for r in refused)
    assert "--protocol finetune" in stderr and "without torchrun" in stderr
    assert not list(run.glob("subset_*"))  # refused before drawing the subsets


def test_devices_launcher_reports_rank_0s_status_and_forwards_sigterm(
    tmp_path, monkeypatch, capsys
):
    """`--devices 2`: a batch that does not split is one error before launching; a SIGTERM to
    the launcher reaches the workers, which checkpoint, and the launcher exits 3 as they do."""
    import signal
    import time

    from selfsup.cli import main

    env = _child_env()
    run = tmp_path / "run"
    base = ["pretrain", "--devices", "2", "--out", str(run)]
    settings = [
        "data.image_size=16", "model.backbone=resnet_tiny", "train.device=cpu",
        "train.progress=false", "train.knn_every=0", "data.limit=512", "train.epochs=50",
        "train.log_every=1", f"data.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    # The refusal before launching runs in this process (`python -m selfsup` is main(); torch
    # is imported here already). A launcher that launched anyway would relaunch sys.argv under
    # torchrun: this command, then.
    odd = [*base, *settings, "train.batch_size=33"]
    monkeypatch.setattr(sys, "argv", ["selfsup", *odd])
    assert main(odd) == 2
    err = capsys.readouterr().err
    assert err.count("must divide evenly over 2 processes") == 1
    assert "Traceback" not in err and not (run / "config.yaml").exists()

    proc = subprocess.Popen(
        [sys.executable, "-m", "selfsup", *base, *settings, "train.batch_size=32"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while (
        not (run / "metrics.jsonl").exists()
        or "train/loss" not in (run / "metrics.jsonl").read_text()
    ):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    assert (run / "checkpoints" / "last.pt").exists() and "selfsup: stopped" in err
    # rank 0 said why it stopped: torchrun's SignalException traceback would only repeat it
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]


def test_devices_launcher_prints_a_run_ending_error_once(tmp_path, monkeypatch, capfd):
    """`--devices 2`: a NaN loss (every rank sees the all-reduced loss) ends the run with one
    selfsup line, not one per rank and torchrun's ChildFailedError report after them."""
    from selfsup.cli import main

    run = tmp_path / "run"
    argv = [
        "pretrain", "--devices", "2", "--out", str(run),
        "data.image_size=16", "model.backbone=resnet_tiny", "train.device=cpu",
        "train.progress=false", "train.knn_every=0", "data.limit=256", "train.epochs=1",
        "train.batch_size=32", "train.log_every=1", "optim.lr=1e12", "optim.warmup_epochs=0",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    # The launcher is this process (`python -m selfsup` runs main; torch is imported here
    # already); launch_local relaunches sys.argv under torchrun, and capfd reads the stderr
    # that it and the workers write to file descriptor 2.
    monkeypatch.setattr(sys, "argv", ["selfsup", *argv])
    for name, value in _child_env().items():
        monkeypatch.setenv(name, value)
    capfd.readouterr()
    status = main(argv)
    stderr = capfd.readouterr().err
    assert status == 2, stderr[-3000:]
    assert stderr.count("selfsup: error: loss became NaN/Inf") == 1, stderr[-3000:]
    assert "ChildFailedError" not in stderr and "Traceback" not in stderr
    assert stderr.count("kNN monitoring off") <= 1


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs fewer than 2 GPUs")
def test_devices_that_the_machine_cannot_give_are_refused_before_launching(tmp_path, capsys):
    from selfsup.cli import main

    out = ["--out", str(tmp_path / "run")]
    assert main(["pretrain", "--devices", "2", "--device", "cuda", *out]) == 2
    assert "needs 2 GPUs; this machine shows" in capsys.readouterr().err
    assert main(["pretrain", "--devices", "0", *out]) == 2
    assert "--devices must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_torchrun_settings_that_cannot_work_are_refused_before_any_data_is_read(
    tmp_path, capsys, monkeypatch
):
    """Under torchrun (its environment, here faked): --devices other than the processes it
    started, and a global batch its processes cannot share (with the counts that can), are
    refused before the process group starts or a cache is built; the resume hint names the
    launch to repeat."""
    from selfsup.cli import main
    from selfsup.train.distributed import DEVICES_ENV, resume_command

    cache = tmp_path / "cache"
    argv = ["pretrain", "--out", str(tmp_path / "run"), f"data.cache_dir={cache}"]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert main([*argv, "--devices", "4"]) == 2
    assert "--devices 4 under torchrun, which started 2 process(es)" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main([*argv, "train.batch_size=64"]) == 2
    err = capsys.readouterr().err
    assert "over 3 processes; use a multiple of 3 (e.g. 66), or a number of processes that" in err
    assert "divides 64 (1, 2, 4, 8)" in err
    assert not cache.exists() and not (tmp_path / "run").exists()
    assert resume_command("r").startswith("torchrun <as before> -m selfsup pretrain --out r")
    monkeypatch.setenv(DEVICES_ENV, "3")
    assert resume_command("r") == "selfsup pretrain --devices 3 --out r --resume"
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv(DEVICES_ENV)
    assert resume_command("r") == "selfsup pretrain --out r --resume"


def test_a_failed_write_on_rank_0_stops_every_rank(dist_results):
    """Rank 0 raises its OSError (the checkpoint wrapper names the disk); the other rank raises
    OtherRankError, which the CLI leaves silent, instead of waiting at the barrier forever."""
    got = scenario(dist_results, "failed_write")
    assert [r["raised"] for r in got] == ["OSError", "OtherRankError"]
    assert [r["after"] for r in got] == ["written", None]


def test_a_command_leaves_the_process_group_also_when_it_fails(monkeypatch) -> None:
    """eval, embed and predict run their work through _on_every_process: a failing process
    must still leave torchrun's group, or its peers wait on it until the timeout."""
    from selfsup.commands.common import _on_every_process
    from selfsup.train import distributed

    left: list[bool] = []
    monkeypatch.setattr(distributed, "cleanup", lambda: left.append(True))
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    assert _on_every_process(lambda: 7) == (7, False)
    assert left == [True]

    def fail() -> None:
        raise ConfigError("bad --data")

    with pytest.raises(ConfigError, match="bad --data"):
        _on_every_process(fail)
    assert left == [True, True]

"""The trainer under 2 CPU processes (gloo), end to end, against one process on the same samples.

What tests/test_distributed.py checks piece by piece (losses, queues, shards) is checked here
through ``Trainer.fit``: the loss a 2-process run logs is the mean over the global batch, the
ranks see disjoint blocks of one epoch order, and a run resumed on another number of processes
continues the step counter, lr and EMA schedules and the MoCo queue.

All 2-process scenarios run in one ``torch.multiprocessing`` spawn (a module fixture); each
records, per training step, what ``optimizer_step`` was given (the lr set, the EMA progress, the
views, the weights before the step) and the indices each rank's batch stream yielded. The
references are computed in this process from those records.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import selfsup.train.trainer as trainer_module
from selfsup.data.batches import epoch_permutation
from selfsup.losses import byol_loss, nt_xent_loss
from selfsup.train.config import resolve_config
from selfsup.train.distributed import DistributedBatchStream
from selfsup.train.trainer import Trainer, build_model

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs the gloo backend"
)

WORLD = 2
LIMIT = 70  # images: 4 global batches of 16, 6 images dropped (an odd dataset size)
GLOBAL_BATCH = 16
STEPS_PER_EPOCH = LIMIT // GLOBAL_BATCH
SEED = 0
SPAWN_TIMEOUT_S = 150
QUEUE = 256  # MoCo: 16 keys a step, so the 3 steps after a resume leave most of the queue alone
STOP_AT = 5  # resume scenarios: the stop is asked for in step 5 (epoch 2, between log steps)


def settings(method: str, cache: Path, *extra: str):
    overrides = [
        "data.image_size=16",
        "data.storage_size=16",
        "model.backbone=resnet_tiny",
        "train.device=cpu",
        "train.progress=false",
        "train.knn_every=0",
        "train.collapse=off",
        f"train.seed={SEED}",
        f"data.limit={LIMIT}",
        f"train.batch_size={GLOBAL_BATCH}",
        f"data.cache_dir={cache}",
        *extra,
    ]
    return resolve_config(method, preset="quickstart", overrides=overrides)


SIMCLR = ("train.epochs=1", "train.log_every=3")  # windows: steps 1-3, then step 4 (epoch end)
BYOL = ("train.epochs=1", "train.log_every=3", "train.on_nan=skip")
MOCO = (
    "train.epochs=2",
    "train.log_every=2",
    f"method.queue_size={QUEUE}",
    "method.bn_splits=2",
    "method.momentum_cosine=true",
)
NAN_STEP = 2  # BYOL: rank 1's views of step 2 are NaN, so both ranks skip that step


# ----------------------------------------------------------------------------- recording
class Recorder:
    """Patches the trainer module (in this process or a worker) to record every step."""

    def __init__(self, *, states: bool = False, nan_step: int | None = None, stop_at=None):
        self.steps: list[dict] = []
        self.batches: list[tuple[int, torch.Tensor]] = []  # (epoch, indices) per step
        self.images_sha: str | None = None
        self.states, self.nan_step, self.stop_at = states, nan_step, stop_at
        self.trainer = None

    def install(self, setattr_) -> None:
        original_step = trainer_module.optimizer_step
        original_handlers = Trainer._install_signal_handlers
        recorder = self

        def optimizer_step(method, step_fn, optimizer, v1, v2, **kwargs):
            call = len(recorder.steps) + 1  # this invocation's step number
            rank = dist.get_rank() if dist.is_initialized() else 0
            if recorder.nan_step == call and rank == 1:
                v1 = v1 * float("nan")
            rec = {"lr": optimizer.param_groups[0]["lr"], "progress": kwargs["progress"]}
            if recorder.states:
                rec["state"] = {k: v.detach().clone() for k, v in method.state_dict().items()}
                rec["views"] = (v1.detach().clone(), v2.detach().clone())
            if recorder.stop_at == call:  # as a signal handler would
                recorder.trainer._stop_reason = "stop asked by the test"
            out, finite, applied = original_step(method, step_fn, optimizer, v1, v2, **kwargs)
            rec.update(loss=float(out["loss"].detach()), applied=applied)
            if hasattr(method, "queue"):
                rec["queue_ptr"] = int(method.queue_ptr)
                rec["queue"] = method.queue.detach().clone()
            recorder.steps.append(rec)
            return out, finite, applied

        def install_handlers(trainer_self):
            recorder.trainer = trainer_self
            return original_handlers(trainer_self)

        class RecordingStream(DistributedBatchStream):
            def __init__(self, images, *args, **kwargs):
                super().__init__(images, *args, **kwargs)
                recorder.images_sha = hashlib.sha1(images.numpy().tobytes()).hexdigest()

            def __iter__(self):
                for indices, batch in super().__iter__():
                    recorder.batches.append((self.epoch, indices.clone()))
                    yield indices, batch

        setattr_(trainer_module, "optimizer_step", optimizer_step)
        setattr_(Trainer, "_install_signal_handlers", install_handlers)
        setattr_(trainer_module, "DistributedBatchStream", RecordingStream)

    def result(self) -> dict:
        return {"steps": self.steps, "batches": self.batches, "images_sha": self.images_sha}


def fit(cfg, run: Path, recorder: Recorder, *, resume: bool = False):
    """``Trainer.fit`` with ``recorder`` installed (for the length of the call)."""
    saved = {}

    def setattr_(owner, name, value):
        saved[(owner, name)] = getattr(owner, name)
        setattr(owner, name, value)

    recorder.install(setattr_)
    run.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Trainer(cfg, run, resume=resume).fit()
    finally:
        torch.set_num_threads(threads)
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


# ----------------------------------------------------------------------------- 2-process jobs
def job_simclr(root: Path) -> dict:
    recorder = Recorder(states=True)
    fit(settings("simclr", root / "cache", *SIMCLR), root / "simclr", recorder)
    return recorder.result()


def job_byol(root: Path) -> dict:
    recorder = Recorder(states=True, nan_step=NAN_STEP)
    fit(settings("byol", root / "cache", *BYOL), root / "byol", recorder)
    return recorder.result()


def job_moco_stop(root: Path) -> dict:  # 2 processes, stopped in step 5; resumed on 1 later
    recorder = Recorder(stop_at=STOP_AT)
    result = fit(settings("moco", root / "cache", *MOCO), root / "moco_2to1", recorder)
    return {**recorder.result(), "finished": result.finished}


def job_moco_resume(root: Path) -> dict:  # 2 processes resume the 1-process run stopped in step 5
    recorder = Recorder()
    result = fit(settings("moco", root / "cache", *MOCO), root / "moco_1to2", recorder, resume=True)
    return {**recorder.result(), "finished": result.finished}


JOBS = {
    "simclr": job_simclr,
    "byol": job_byol,
    "moco_stop": job_moco_stop,
    "moco_resume": job_moco_resume,
}


def _worker(rank: int, port: int, root: str, jobs: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from selfsup.train.distributed import cleanup, init_distributed

    init_distributed("cpu")
    results: dict = {}
    try:
        for name in jobs:
            try:
                results[name] = JOBS[name](Path(root))
            except BaseException:  # reported by the test that owns the job
                results[name] = {"error": traceback.format_exc()}
                break  # the other rank may be stuck in a collective: do not start another
    finally:
        torch.save(results, Path(root) / f"{'-'.join(jobs)}.rank{rank}.pt")
        cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(root: Path, jobs: list[str]) -> list[dict]:
    context = mp.start_processes(
        _worker,
        args=(_free_port(), str(root), jobs),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} gloo workers did not finish {jobs} in {SPAWN_TIMEOUT_S} s")
    name = "-".join(jobs)
    return [torch.load(root / f"{name}.rank{r}.pt", weights_only=False) for r in range(WORLD)]


def job(results: list[dict], name: str) -> list[dict]:
    for rank, result in enumerate(results):
        if name not in result:
            pytest.fail(f"rank {rank} did not run {name} (an earlier job failed)")
        if "error" in result[name]:
            pytest.fail(f"rank {rank}, job {name}:\n{result[name]['error']}")
    return [result[name] for result in results]


def metrics(run: Path) -> dict[int, dict]:
    """metrics.jsonl's train/* records by step (each step must appear once)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)), steps
    return {r["step"]: r for r in train}


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddp_extra")


@pytest.fixture(scope="module")
def two_process_runs(root) -> dict:
    """Every 2-process job in one spawn (the interpreters start up once): SimCLR and BYOL's
    logged losses, and MoCo stopped in step 5 (resumed on 1 process later), then MoCo resuming
    the 1-process run stopped in step 5, which is run here first."""
    first_one = Recorder(stop_at=STOP_AT)
    stopped_one = fit(settings("moco", root / "cache", *MOCO), root / "moco_1to2", first_one)
    assert not stopped_one.finished
    ranks = spawn(root, ["simclr", "byol", "moco_stop", "moco_resume"])
    return {"first_one": first_one.result(), "ranks": ranks}


@pytest.fixture(scope="module")
def loss_runs(two_process_runs) -> list[dict]:
    return two_process_runs["ranks"]


@pytest.fixture(scope="module")
def moco_runs(root, two_process_runs) -> dict:
    """MoCo: an uninterrupted 1-process run of 2 epochs (8 steps); 2 -> 1 (2 processes stopped
    in step 5, 1 resumes); 1 -> 2 (1 process stopped in step 5, 2 resume)."""
    cfg = lambda: settings("moco", root / "cache", *MOCO)  # noqa: E731 - fit() changes cfg
    reference = Recorder()
    fit(cfg(), root / "moco_ref", reference)
    two = two_process_runs["ranks"]
    then_one = Recorder()
    fit(cfg(), root / "moco_2to1", then_one, resume=True)
    return {
        "reference": reference.result(),
        "1to2": (two_process_runs["first_one"], job(two, "moco_resume")),
        "2to1": (job(two, "moco_stop"), then_one.result()),
    }


# ----------------------------------------------------------------------------- references
def global_loss(method_name: str, cfg, per_rank: list[dict]) -> float:
    """One process's loss of one step on the 2 ranks' views together (W * B samples), with the
    weights the step started from; BatchNorm normalises each rank's half apart, as under DDP."""
    method = build_model(cfg)
    method.load_state_dict(per_rank[0]["state"])
    method.train()
    halves = [torch.cat(rec["views"]) for rec in per_rank]
    with torch.no_grad():
        if method_name == "simclr":
            z = [method.projector(method.backbone(x)).chunk(2) for x in halves]
            z1, z2 = torch.cat([a for a, _ in z]), torch.cat([b for _, b in z])
            return float(nt_xent_loss(z1, z2, method.temperature))
        p = [method.predictor(method.projector(method.backbone(x))).chunk(2) for x in halves]
        t = [method.target_projector(method.target_backbone(x)).chunk(2) for x in halves]
        p1, p2 = torch.cat([a for a, _ in p]), torch.cat([b for _, b in p])
        t1, t2 = torch.cat([a for a, _ in t]), torch.cat([b for _, b in t])
        return float(byol_loss(p1, t2) + byol_loss(p2, t1))


def assert_logged_losses_are_global_means(root: Path, name: str, runs, skipped: set[int]):
    rank0, rank1 = runs
    assert len(rank0["steps"]) == len(rank1["steps"]) == STEPS_PER_EPOCH
    cfg = settings(name, root / "cache", *(SIMCLR if name == "simclr" else BYOL))
    ref = {}
    for step, recs in enumerate(zip(rank0["steps"], rank1["steps"], strict=True), 1):
        assert all(r["applied"] is (step not in skipped) for r in recs)
        if step not in skipped:
            ref[step] = global_loss(name, cfg, list(recs))
            # the ranks' own losses differ: rank 0's alone is not the logged loss
            assert abs(recs[0]["loss"] - recs[1]["loss"]) > 1e-4
            assert ref[step] == pytest.approx((recs[0]["loss"] + recs[1]["loss"]) / 2, rel=1e-5)
    logged = metrics(root / name)
    assert sorted(logged) == [3, 4]
    for last, window in ((3, [1, 2, 3]), (4, [4])):
        kept = [ref[s] for s in window if s not in skipped]
        assert logged[last]["train/loss"] == pytest.approx(sum(kept) / len(kept), rel=1e-5)
    results = json.loads((root / name / "results.json").read_text())
    assert results["final_loss"] == pytest.approx(ref[4], rel=1e-5)
    return logged, results


# ----------------------------------------------------------------------------- 1: logged loss
def test_simclr_logged_loss_is_the_global_batch_mean(root, loss_runs):
    """SimCLR with all-gathered negatives on 2 processes logs (metrics.jsonl per window,
    results.json final_loss) the loss of one process on both ranks' views together."""
    assert_logged_losses_are_global_means(root, "simclr", job(loss_runs, "simclr"), skipped=set())


def test_byol_logged_loss_is_the_global_batch_mean_and_leaves_out_a_skipped_step(root, loss_runs):
    """BYOL, on_nan=skip: a NaN on rank 1 alone skips the step on both ranks; the window's
    logged loss is the global mean of its other steps."""
    assert_logged_losses_are_global_means(root, "byol", job(loss_runs, "byol"), skipped={NAN_STEP})


def test_a_step_skipped_on_every_rank_is_counted_once(root, loss_runs):
    job(loss_runs, "byol")
    logged = metrics(root / "byol")
    assert logged[3]["train/skipped_steps"] == 1 and logged[4]["train/skipped_steps"] == 0
    results = json.loads((root / "byol" / "results.json").read_text())
    assert results["skipped_steps"] == 1


# ----------------------------------------------------------------------------- 4: sharding
def test_ranks_see_disjoint_blocks_of_the_single_process_epoch_order(loss_runs):
    """In a real run over 70 images (not a multiple of the global batch of 16), each step's
    rank-0 then rank-1 blocks are the single-process batch; an epoch covers 64 distinct images,
    the 6 left out are the epoch order's last (drop_last), and both ranks hold the same data."""
    for name in ("simclr", "byol"):
        rank0, rank1 = job(loss_runs, name)
        assert rank0["images_sha"] == rank1["images_sha"]
        order = epoch_permutation(LIMIT, SEED, 0)
        assert len(rank0["batches"]) == len(rank1["batches"]) == STEPS_PER_EPOCH
        for step, ((e0, i0), (e1, i1)) in enumerate(
            zip(rank0["batches"], rank1["batches"], strict=True)
        ):
            assert e0 == e1 == 0 and len(i0) == len(i1) == GLOBAL_BATCH // WORLD
            want = order[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH]
            assert torch.cat([i0, i1]).tolist() == want.tolist()
        seen = torch.cat([i for _, i in rank0["batches"] + rank1["batches"]])
        assert len(set(seen.tolist())) == STEPS_PER_EPOCH * GLOBAL_BATCH


# ----------------------------------------------------------------------------- 3: resume
@pytest.mark.parametrize("direction", ["2to1", "1to2"])
def test_resume_on_another_process_count_continues_step_lr_ema_and_queue(moco_runs, direction):
    """A MoCo run stopped mid-epoch (epoch 2, step 5) on W processes and resumed on the other
    count runs the uninterrupted run's steps: the same step count, lr and EMA (momentum)
    progress at each step, the same queue pointer, and the queue it resumed with kept except
    where the new keys went; on 2 processes both ranks hold the same queue."""
    reference = moco_runs["reference"]["steps"]
    assert len(reference) == 2 * STEPS_PER_EPOCH
    first, second = moco_runs[direction]
    first = first if isinstance(first, dict) else first[0]  # rank 0 of a 2-process part
    seconds = second if isinstance(second, list) else [second]
    for rank, part in enumerate(seconds):
        steps = first["steps"] + part["steps"]  # the stopped, then the resumed invocation
        assert len(first["steps"]) == STOP_AT and len(steps) == len(reference)
        for got, want in zip(steps, reference, strict=True):
            assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
            assert got["progress"] == pytest.approx(want["progress"], rel=1e-12)
            assert got["queue_ptr"] == want["queue_ptr"]
        # the resumed invocation's first step saw the queue the stopped one left
        before, after = first["steps"][-1]["queue"], part["steps"][0]["queue"]
        ptr = first["steps"][-1]["queue_ptr"]
        untouched = torch.ones(QUEUE, dtype=torch.bool)
        untouched[torch.arange(ptr, ptr + GLOBAL_BATCH) % QUEUE] = False
        torch.testing.assert_close(after[untouched], before[untouched], rtol=0, atol=0)
        # the resumed stream continues epoch 2 at its step 2: the reference's batches
        order = epoch_permutation(LIMIT, SEED, 1)
        per_rank = GLOBAL_BATCH // len(seconds)
        for k, (epoch, indices) in enumerate(part["batches"]):
            s = 1 + k  # step in epoch 2
            start = s * GLOBAL_BATCH + rank * per_rank
            assert epoch == 1 and indices.tolist() == order[start : start + per_rank].tolist()
    if len(seconds) == 2:
        for a, b in zip(seconds[0]["steps"], seconds[1]["steps"], strict=True):
            torch.testing.assert_close(a["queue"], b["queue"], rtol=0, atol=0)


@pytest.mark.parametrize("direction", ["2to1", "1to2"])
def test_resumed_run_logs_each_step_once_and_ends_at_the_reference_step(root, moco_runs, direction):
    run = root / f"moco_{direction}"
    state = checkpoint(run)
    ref_state = checkpoint(root / "moco_ref")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (2, 0, 8)
    assert ref_state["global_step"] == 8
    assert int(state["model"]["queue_ptr"]) == int(ref_state["model"]["queue_ptr"])
    logged, ref_logged = metrics(run), metrics(root / "moco_ref")
    assert sorted(logged) == sorted(ref_logged) == [2, 4, 6, 8]
    for step in logged:
        for key in ("train/lr", "train/target_momentum", "train/epoch"):
            assert logged[step][key] == pytest.approx(ref_logged[step][key], rel=1e-12), key


@pytest.mark.parametrize("direction", ["2to1", "1to2"])
def test_log_window_across_a_resume_on_another_process_count(moco_runs, root, direction):
    """The stop in step 5 falls between log steps (every 2): the loss logged at step 6 must be
    the mean of steps 5 and 6's global-batch losses, whichever part ran them."""
    first, second = moco_runs[direction]
    firsts = first if isinstance(first, list) else [first]
    seconds = second if isinstance(second, list) else [second]
    step5 = sum(part["steps"][-1]["loss"] for part in firsts) / len(firsts)
    step6 = sum(part["steps"][0]["loss"] for part in seconds) / len(seconds)
    logged = metrics(root / f"moco_{direction}")
    assert logged[6]["train/loss"] == pytest.approx((step5 + step6) / 2, rel=1e-5)

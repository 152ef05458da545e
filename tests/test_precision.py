"""Mixed precision: which precision each device gets, fp16's loss scaling, and whole runs in bf16
and fp16 on the CPU (the autocast paths CUDA runs take by default, which fp32 CPU runs never
reach)."""

import json

import pytest
import torch
from tiny_runs import run
from torch import nn

import selfsup.train.trainer as trainer_module
from selfsup.cli import main
from selfsup.evaluate.knn import knn_predict
from selfsup.precision import autocast, grad_scaler, native_autocast_precision, resolve_precision
from selfsup.train.logging import read_metrics
from selfsup.train.trainer import optimizer_step

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 1), "fp16")],
)
def test_auto_precision_is_bf16_only_where_the_gpu_computes_in_it(
    monkeypatch, capability, expected
):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert native_autocast_precision(CUDA) == expected
    assert resolve_precision("auto", CUDA) == expected
    assert resolve_precision("fp32", CUDA) == "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_explicit_bf16_on_a_gpu_without_it_is_honoured_with_a_warning(monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert resolve_precision("bf16", CUDA) == "bf16"
    err = capsys.readouterr().err
    assert "Tesla T4" in err and "train.precision=fp16" in err
    with pytest.raises(ValueError, match="fp8"):
        resolve_precision("fp8", CUDA)


def test_explicit_autocast_on_the_cpu_is_honoured_with_a_warning(capsys):
    """bf16 autocast on a CPU without bf16 arithmetic: a resnet18 step took 24x fp32's time on
    the development machine; the run must say so rather than look hung."""
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and not capsys.readouterr().err
    for precision in ("bf16", "fp16"):
        assert resolve_precision(precision, cpu) == precision
        err = capsys.readouterr().err
        assert f"train.precision={precision} on the CPU" in err and "auto" in err


class LinearMethod(nn.Module):
    """A one-layer "method": loss = gain * sum(linear(x1) * x2); counts target updates."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(8, 8)
        self.gain = gain
        self.target_updates = 0

    def forward(self, x1, x2):
        out = self.linear(x1)
        assert out.dtype == torch.float16  # the step runs under fp16 autocast
        return {"loss": self.gain * (out.float() * x2).sum()}

    def update_target(self, progress: float) -> None:
        self.target_updates += 1


def fp16_step(gain: float, scaler) -> tuple[LinearMethod, dict[str, torch.Tensor]]:
    method = LinearMethod(gain)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    optimizer_step(
        method,
        method,
        optimizer,
        x1,
        x2,
        autocast=lambda: autocast("fp16", torch.device("cpu")),
        progress=0.5,
        scaler=scaler,
    )
    return method, before


def test_fp16_step_unscales_the_gradients_before_the_optimizer_step():
    scaler = grad_scaler("fp16", torch.device("cpu"))
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16
    method, before = fp16_step(1e-3, scaler)
    # the direct formula: d/dW sum(gain * (W x1 + b) * x2) = gain * x2^T x1, d/db = gain * sum x2
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    expected_w = before["linear.weight"] - 0.1 * 1e-3 * x2.T @ x1
    expected_b = before["linear.bias"] - 0.1 * 1e-3 * x2.sum(0)
    # fp16 gradients: about 3 significant digits of a step of ~1e-4
    torch.testing.assert_close(method.linear.weight.detach(), expected_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(method.linear.bias.detach(), expected_b, atol=1e-6, rtol=0)
    assert scaler.get_scale() == 2.0**16  # no overflow: the scale stays
    assert method.target_updates == 1


def test_fp16_step_whose_gradients_overflow_is_skipped_and_halves_the_scale():
    scaler = grad_scaler("fp16", torch.device("cpu"))
    # loss gradients of 10 x 2^16 overflow fp16 (max 65504) in the scaled backward pass
    method, before = fp16_step(10.0, scaler)
    for key, value in method.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert scaler.get_scale() == 2.0**15
    assert method.target_updates == 1  # the target update runs after every step, as in fp32


def test_bf16_and_fp32_scalers_pass_through():
    for precision in ("bf16", "fp32"):
        scaler = grad_scaler(precision, torch.device("cpu"))
        loss = torch.tensor(3.0)
        assert not scaler.is_enabled() and scaler.scale(loss) is loss
        assert scaler.state_dict() == {}


def test_knn_under_a_training_autocast_still_computes_in_float32():
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 5, (300,), generator=g)
    expected = knn_predict(query, bank, labels, 5, k=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer's step runs
        scores = knn_predict(query, bank, labels, 5, k=20)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=0, rtol=0)


PRECISION_RUN = (
    "train.epochs=2",
    "data.limit=32",  # 2 steps an epoch (fp16 is slow on a CPU; no check needs more steps)
    "train.batch_size=16",
    "train.log_every=1",
    "train.device=cpu",  # the same test on a machine with a GPU (CUDA: below)
)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_whole_run_in_reduced_precision_trains_evaluates_and_records_it(tmp_path, precision):
    # kNN monitoring on (random init and the end): it ran under the training autocast once
    assert run(tmp_path, "simclr", *PRECISION_RUN, f"train.precision={precision}") == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["precision"] == precision
    assert 0 <= results["knn_top1_random_init"] <= 1 and 0 <= results["knn_top1"] <= 1
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses and all(loss == loss for loss in losses)  # finite, not NaN
    scales = [r["train/loss_scale"] for r in records if "train/loss_scale" in r]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    if precision == "fp16":
        assert len(scales) == len(losses) and state["scaler"]["scale"] == scales[-1]
    else:
        assert scales == [] and state["scaler"] == {}


def test_fp16_resume_restores_the_loss_scale(tmp_path, monkeypatch):
    # a scaler that grows every step, and 1 step an epoch: a resume that forgot the scale would
    # restart at 2^10
    monkeypatch.setattr(
        trainer_module,
        "grad_scaler",
        lambda precision, device: torch.amp.GradScaler(
            device.type, init_scale=2.0**10, growth_interval=1, enabled=precision == "fp16"
        ),
    )
    common = ("train.epochs=3", *PRECISION_RUN[1:], "train.precision=fp16", "train.knn_every=0")
    common += ("data.limit=16",)  # one batch of 16: 1 step an epoch
    assert run(tmp_path, "byol", *common, out="full") == 0
    assert run(tmp_path, "byol", *common, "train.stop_after_epochs=1", out="split") == 3
    assert main(["pretrain", "--out", str(tmp_path / "split"), "--resume"]) == 0

    def scales(name):
        records = read_metrics(tmp_path / name / "metrics.jsonl")
        return {r["step"]: r["train/loss_scale"] for r in records if "train/loss_scale" in r}

    full, split = scales("full"), scales("split")
    assert full == split and max(full.values()) > 2.0**10  # it grew, and was carried over
    a = torch.load(tmp_path / "full" / "encoder.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "encoder.pt", weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_whole_run_on_cuda_in_its_native_precision(tmp_path):
    """What a GPU user's first ``selfsup pretrain`` does: auto precision (bf16, or fp16 on older
    GPUs), channels-last, fused SGD, kNN at the random init and the end (compile off: fast)."""
    extra = (
        "train.device=cuda",
        "train.compile=false",
        "train.epochs=2",
        "data.limit=256",
        "train.batch_size=64",
    )
    assert run(tmp_path, "byol", *extra) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["precision"] == native_autocast_precision(torch.device("cuda"))
    assert 0.0 <= results["knn_top1_random_init"] <= 1.0 and 0.0 <= results["knn_top1"] <= 1.0
    # a plain torch.load (no map_location) on a machine without a GPU must open encoder.pt
    encoder = torch.load(tmp_path / "run" / "encoder.pt", weights_only=True)
    assert {t.device.type for t in encoder.values()} == {"cpu"}

"""``selfsup ablate``: every variant runs with its own settings and lands in the table beside the
seeds' number; finished variants are not run again."""

import json

from selfsup.ablate import NAMES, ablation
from selfsup.cli import main

TINY = [
    "model.backbone=resnet_tiny",
    "data.image_size=16",
    "data.storage_size=16",
    "data.limit=256",
    "train.batch_size=64",
    "train.collapse_every=2",
    "train.progress=false",
]


def test_simsiam_stopgrad_ablation_writes_its_table(tmp_path, capsys):
    out = tmp_path / "abl"
    args = [
        "ablate",
        "simsiam-stopgrad",
        "--quick",
        "--epochs",
        "1",
        "--out",
        str(out),
        *TINY,
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    assert main(args) == 0
    table = (out / "simsiam-stopgrad" / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| with")]
    assert len(rows) == 2 and "67.7" in rows[0] and "0.1" in rows[1]
    assert all("| yes |" in row or "| no |" in row for row in rows)  # collapse was checked
    runs = sorted((out / "simsiam-stopgrad").glob("0*_simsiam"))
    stop_gradient = [
        json.loads((r / "results.json").read_text()) and (r / "config.yaml").read_text()
        for r in runs
    ]
    assert (
        "stop_gradient: false" in stop_gradient[1]
        and "stop_gradient: false" not in stop_gradient[0]
    )
    first_mtime = (runs[0] / "results.json").stat().st_mtime
    capsys.readouterr()
    assert main(args) == 0  # finished variants are reused, not retrained
    assert (runs[0] / "results.json").stat().st_mtime == first_mtime

    # other settings are other numbers: the variants run again, and say why
    assert main([*args, "optim.lr=0.01", "train.collapse_every=1000"]) == 0
    assert "was run with other settings; rerunning" in capsys.readouterr().out
    assert "lr: 0.01" in (runs[0] / "config.yaml").read_text()
    # 4 steps, no collapse check: the table says so instead of "no"
    table = (out / "simsiam-stopgrad" / "table.md").read_text()
    assert table.count("| not checked |") == 2 and "lower train.collapse_every" in table
    assert (runs[0] / "results.json").stat().st_mtime != first_mtime
    # the ablation's own variable cannot be overridden away, and nothing trains first
    before = (runs[0] / "results.json").stat().st_mtime
    assert main([*args, "method.stop_gradient=false"]) == 2
    assert "is what the simsiam-stopgrad ablation varies" in capsys.readouterr().err
    assert (runs[0] / "results.json").stat().st_mtime == before  # variant 0 was not rerun


def test_a_stopped_variant_says_how_to_go_on(tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["ablate", "simsiam-stopgrad", "--quick", "--epochs", "2", "--out", str(out), *TINY]
    args.append(f"data.cache_dir={tmp_path / 'cache'}")
    assert main([*args, "train.stop_after_epochs=1"]) == 3
    err = capsys.readouterr().err
    assert "run the same command again to resume it" in err
    # one instruction: not also the variant's own `selfsup pretrain --resume`
    assert "Resume with: the same `selfsup ablate simsiam-stopgrad ...` command" in err
    assert "--resume" not in err
    assert main(args) == 0  # resumes the stopped variant, runs the other
    assert len(list((out / "simsiam-stopgrad").glob("0*_simsiam/results.json"))) == 2


def test_every_named_ablation_resolves_its_variants():
    from selfsup.train.config import resolve_config

    for name in NAMES:
        for quick in (True, False):
            for v in ablation(name, quick).variants:
                resolve_config(v.method, "quickstart", overrides=list(v.overrides))


def test_out_of_memory_in_a_variant_says_how_to_go_on_in_the_ablation(
    tmp_path, capsys, monkeypatch
):
    """The trainer's advice (lower train.batch_size) with the ablate command to apply it to,
    not the variant's own `selfsup pretrain --resume` (ablate resumes its variants itself)."""
    import torch

    import selfsup.train.trainer as trainer

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "optimizer_step", out_of_memory)
    out = tmp_path / "abl"
    for name, varied in (("simsiam-stopgrad", False), ("batch-size", True)):
        args = ["ablate", name, "--quick", "--epochs", "1", "--out", str(out), *TINY]
        args.append(f"data.cache_dir={tmp_path / 'cache'}")
        assert main([a for a in args if not (varied and a.startswith("train.batch_size"))]) == 2
        err = capsys.readouterr().err
        assert "ran out of memory during epoch 1 of training" in err and "Traceback" not in err
        assert f"Add the change to the overrides of this `selfsup ablate {name}` command" in err
        assert "every variant then starts over with it, the finished ones too" in err
        assert "--resume" not in err and "--overwrite" not in err
        assert ("this ablation sets train.batch_size itself" in err) == varied

"""The README's Python example runs as written, and its encoder beats its random init."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_training_loop_runs_as_written(tmp_path, monkeypatch, capsys):
    (loop,) = [block for block in python_blocks() if "build_method(" in block]
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "cache"))
    namespace: dict = {}
    exec(compile(loop, str(README), "exec"), namespace)  # our own README's code
    assert namespace["step"] == namespace["total_steps"] == 5 * (4000 // 128)
    printed = capsys.readouterr().out
    before, after = (float(v) for v in re.findall(r"(\d\.\d{3}) (?:at|after)", printed))
    assert after > before + 0.05, printed  # measured: 0.722 -> 0.842 (2026-12-03)


def test_readme_plain_torchvision_loading_runs_as_written(tmp_path, monkeypatch):
    """The README's load-without-selfsup snippet, on an encoder.pt of the small-stem ResNet-18
    (the cifar10 presets' backbone): it loads strictly and gives selfsup's features."""
    import torch

    from selfsup.models import build_backbone

    (snippet,) = [block for block in python_blocks() if "torchvision.models.resnet18" in block]
    backbone, _ = build_backbone("resnet18", small_stem=True)
    (tmp_path / "runs" / "byol").mkdir(parents=True)
    torch.save(backbone.state_dict(), tmp_path / "runs" / "byol" / "encoder.pt")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    model = namespace["model"].eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(images), backbone.eval()(images), atol=1e-5)


def test_readme_python_pretrain_runs_as_written(tmp_path, monkeypatch):
    """The README's ``selfsup.pretrain`` example: it trains, writes its run directory, learns
    (measured 0.644 -> 0.773), and its encoder loads."""
    (block,) = [block for block in python_blocks() if "selfsup.pretrain(" in block]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "cache"))
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    result, r = namespace["result"], namespace["r"]
    assert result.finished and (tmp_path / "runs" / "simclr-python" / "encoder.pt").is_file()
    assert r["epochs"] == 2 and r["train_images"] == 2000
    assert r["knn_top1"] > r["knn_top1_random_init"] + 0.05, r
    assert namespace["encoder"].training is False


def test_troubleshooting_is_the_readmes_section_word_for_word():
    """docs/troubleshooting.md is README's "When things go wrong" for readers who land in docs/;
    two copies edited apart drifted once (one said --resume where the CLI says to rerun)."""
    text = README.read_text()
    section = text[text.index("## When things go wrong") : text.index("## Results")]
    copy = README.parent / "docs" / "troubleshooting.md"
    assert copy.read_text() == section.rstrip() + "\n", (
        "docs/troubleshooting.md differs from README.md's section: edit the README, then copy it"
    )

"""``selfsup`` starts fast: ``--help``, ``--version`` and argument errors import no torch, numpy,
torchvision or omegaconf; and a Ctrl-C while a command is still importing them exits with status
130 and one line, no traceback.

Each case runs in a fresh interpreter (this one has torch imported already, by conftest).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import selfsup.cli as cli
import selfsup.commands.export as export_command
import selfsup.export as export
import selfsup.train.distributed as distributed

HEAVY = ("torch", "numpy", "torchvision", "omegaconf")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["--help"], 0),
        (["pretrain", "--help"], 0),
        (["--version"], 0),
        (["pretrain", "--epocs", "3"], 2),  # a typo (--epoch is argparse's abbreviation)
        (["eval", "run", "--protocol", "knnn"], 2),  # not one of the choices
        (["export"], 2),  # the run is missing
    ],
)
def test_parsing_imports_nothing_heavy(argv, status):
    proc = _python(
        f"""
        import sys
        from selfsup.cli import main
        try:
            status = main({argv!r})
        except SystemExit as exc:
            status = exc.code
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {set(HEAVY)!r})
        print(status, heavy)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"{status} []", proc.stdout + proc.stderr


@pytest.mark.parametrize("command", ["pretrain", "eval", "embed", "neighbors", "predict", "ablate"])
def test_a_mistyped_data_source_is_reported_before_torch_is_imported(command, tmp_path):
    given = tmp_path / "run"  # exists: the command would go on to read --data
    given.mkdir()
    first = {
        "pretrain": [],
        "eval": [str(given)],
        "embed": [str(given), "--out", str(tmp_path / "e.npz")],
        "neighbors": [str(given), "--query", "q.jpg"],
        "predict": [str(given)],
        "ablate": ["augment"],
    }[command]
    argv = [command, *first, "--data", str(tmp_path / "no-such-folder")]
    proc = _python(
        f"""
        import sys
        from selfsup.cli import main
        status = main({argv!r})
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "torchvision"}})
        print(status, heavy)
        """
    )
    assert proc.stdout.splitlines()[-1] == "2 []", proc.stdout + proc.stderr
    named = "data.source: " if command in ("pretrain", "ablate") else ""
    assert f"selfsup: error: {named}data source '{tmp_path / 'no-such-folder'}' is not" in (
        proc.stderr
    )


def test_a_missing_encoder_is_named_before_a_missing_data_source(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "no-run"), "--data", str(tmp_path / "no-data")]) == 2
    err = capsys.readouterr().err
    assert "no-run does not exist" in err and "no-data" not in err


# `python -m selfsup eval ...`, with a KeyboardInterrupt (as from a Ctrl-C) raised when the module
# MODULE (or one of its submodules) is first imported
INTERRUPTED_IMPORT = """
import runpy, sys

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == MODULE or name.startswith(MODULE + "."):
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupt())
sys.argv = ["selfsup", "eval", "no-such-run", "--data", "no-such-data"]
runpy.run_module("selfsup", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    "module",
    [
        "torch",  # while the command imports torch
        "numpy",
        "selfsup.commands",  # while the subcommands are gathered, before the arguments are read
    ],
)
def test_ctrl_c_while_importing(module):
    proc = _python(f"MODULE = {module!r}" + INTERRUPTED_IMPORT)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "selfsup: interrupted", proc.stderr


def test_ctrl_c_while_importing_under_torchrun():
    """A torchrun worker other than rank 0 says nothing (rank 0 says it once), exit 130."""
    proc = _python(
        "MODULE = 'torch'" + INTERRUPTED_IMPORT, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2"
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "", proc.stderr


def test_constants_spelled_out_alike():
    """The constants that cli and commands spell out to stay free of torch are the originals."""
    assert export_command.EXPORT_FORMATS == export.EXPORT_FORMATS  # the --format choices
    assert cli.EXIT_STATUS_ENV == distributed.EXIT_STATUS_ENV


def test_selfsup_warnings_are_printed_as_selfsup_lines(capsys):
    """A library warning (warnings.warn, for Python users) reads on the command line as its
    other warnings do, not as "/path/selfsup/methods/moco.py:85: UserWarning: ..."."""
    import warnings

    import selfsup
    from selfsup.cli import _warnings_as_selfsup_lines

    ours = os.path.join(os.path.dirname(selfsup.__file__), "methods", "moco.py")
    others: list[str] = []
    with warnings.catch_warnings():  # restores showwarning
        warnings.showwarning = lambda message, *args, **kwargs: others.append(str(message))
        with _warnings_as_selfsup_lines():
            warnings.simplefilter("always")
            warnings.warn_explicit("bn_splits does not split", UserWarning, ours, 85)
            warnings.warn_explicit("not ours", UserWarning, __file__, 1)  # left to Python's
    err = capsys.readouterr().err
    assert "selfsup: warning: bn_splits does not split\n" in err and "moco.py:85" not in err
    assert others == ["not ours"] and "not ours" not in err

"""Test-wide settings: one BLAS/OpenMP thread. The tests' networks are tiny, and on a 2-core CI
machine one thread per process is faster and immune to contention (subprocesses inherit it)."""

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def cli(capsys):
    """``selfsup *argv`` in-process: (exit status, stdout, stderr)."""
    from selfsup.cli import main

    def call(*argv: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()  # what came before is not this command's
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return call

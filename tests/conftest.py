"""Test-wide settings: one BLAS/OpenMP thread. The tests' networks are tiny, and on a 2-core CI
machine one thread per process is faster and immune to contention (subprocesses inherit it)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

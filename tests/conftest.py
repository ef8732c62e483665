"""Shared test setup: small thread counts so the suite behaves on 2 cores."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

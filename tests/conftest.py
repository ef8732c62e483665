"""Shared test setup: small thread counts so the suite behaves on 2 cores, and the lock that lets it run in parallel."""

import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

# One lock per machine, not per run: PostgreSQL and Redis are the machine's, so a restart disturbs every test on it.
SHARED_SERVERS_LOCK = Path(tempfile.gettempdir()) / "scaletune-tests-shared-servers.lock"


@pytest.fixture(autouse=True)
def shared_servers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test holds the lock shared; a test marked ``alone`` holds it exclusively.

    `make test` runs the suite in two processes (pytest -n 2); a test that restarts PostgreSQL waits for the
    other process's current test to end, and that process's next test waits for the restart test to end.
    """
    alone = request.node.get_closest_marker("alone") is not None
    with SHARED_SERVERS_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        yield

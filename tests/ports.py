"""Loopback ports for servers the tests and benchmarks start, chosen where no outgoing connection can take them.

A port from ``bind(("127.0.0.1", 0))`` lies in the kernel's ephemeral range, the range it also gives the local end
of every outgoing connection. Between closing the probe and the server's bind, a connection to PostgreSQL or Redis
from any process on the machine may take that port, and the server then fails to start (uvicorn exits with 3).
Below the ephemeral range only deliberate binds compete; each pytest-xdist process draws from a slice of its own.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
from pathlib import Path

LOWEST_PORT = 10_000
MAX_TEST_PROCESSES = 8
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL_LOW = 32_768  # Linux's default; macOS starts at 49152, so this stays below it too
# A random start, so that two runs on one machine rarely try the same ports in the same order.
_draws = itertools.count(random.randrange(1 << 30))


def ephemeral_low() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_LOW


def free_port() -> int:
    """A loopback port nothing listens on, below the ephemeral range, in this test process's own slice."""
    share = (ephemeral_low() - LOWEST_PORT) // MAX_TEST_PROCESSES
    process = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % MAX_TEST_PROCESSES
    first = LOWEST_PORT + process * share
    for _ in range(share):
        port = first + next(_draws) % share
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {first}-{first + share - 1}")

"""Ports for servers a test must name before they start (a Prometheus scrape config, a --metrics-port).

A port found free by binding to port 0 comes from the kernel's ephemeral range, the same range every
outgoing connection on the host draws its local port from: between the check and the server's bind,
a client connection (this test's own load, another test's, Prometheus scraping) can take it, and the
server then fails with "Address already in use". Ports below that range are never handed out to
outgoing connections, so a port picked there stays free unless a server binds it on purpose. Under
pytest-xdist each worker picks from its own share of the ports, so two workers never hand out the same.
"""
from __future__ import annotations

import os
import random
import socket
from pathlib import Path

_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(part) for part in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _xdist_worker() -> tuple[int, int]:
    """(this process's index, the number of processes) under pytest-xdist (gw0, gw1, ...); else (0, 1)."""
    name, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if name.startswith("gw") and name[2:].isdigit() and count.isdigit() and int(count) > 0:
        return int(name[2:]) % int(count), int(count)
    return 0, 1


def unused_port(host: str = "127.0.0.1") -> int:
    """A port outside the ephemeral range that nothing listens on now and this session never handed out."""
    low, high = _ephemeral_range()
    candidates = range(20000, low) if low > 21000 else range(high + 1, 65536)
    worker, workers = _xdist_worker()
    candidates = candidates[(worker - candidates.start) % workers::workers]  # one residue per worker
    for port in random.sample(candidates, min(200, len(candidates))):
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no unused port found in {candidates.start}-{candidates.stop - 1}")

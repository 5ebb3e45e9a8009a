"""The open-file limit a run needs: each request in flight holds a socket, so a run of 10,000 in flight
under the common soft limit of 1,024 fails most of its requests with EMFILE ("Too many open files"),
counted as transport errors that are the generator's doing, not the server's.

`ensure_fd_limit(needed)` raises the soft limit towards the hard one (allowed without privileges) and,
when even the hard limit is short, says so in words the run prints and puts in its self-check.
`beyond_hard_limit(connections)` says when the hard limit cannot hold them at all: a closed loop's users
each hold a connection for the whole run, so such a run is refused before it starts.

Low level: imports nothing of loadgen.
"""

from __future__ import annotations

import resource

__all__ = ["FD_HEADROOM", "beyond_hard_limit", "ensure_fd_limit"]

FD_HEADROOM = 256
"""Descriptors beyond the connections: the interpreter, logs, the metrics listener, timers, pipes."""


def beyond_hard_limit(connections: int) -> str:
    """Why this process can never hold `connections` sockets (the hard limit is short), or ""."""
    needed = connections + FD_HEADROOM
    try:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    except (OSError, ValueError):
        return ""
    if hard == resource.RLIM_INFINITY or hard >= needed:
        return ""
    return (f"{connections} connections need {needed} open files, more than this host's hard limit of {hard} "
            "(ulimit -Hn; limits.conf raises it)")


def ensure_fd_limit(connections: int) -> str:
    """Raise RLIMIT_NOFILE's soft limit to hold `connections` sockets plus FD_HEADROOM; "" when it does,
    else why it cannot (the note to print and record)."""
    needed = connections + FD_HEADROOM
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError) as exc:
        return f"file-descriptor limit unknown ({exc}); {needed} needed for {connections} connections"
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return ""
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        return (f"file-descriptor limit {soft} is below the {needed} that {connections} connections need and "
                f"could not be raised ({exc}): requests past it fail as transport errors; raise it (ulimit -n)")
    if target < needed:
        return (f"file-descriptor limit {target} (the hard limit) is below the {needed} that {connections} "
                "connections need: requests past it fail as transport errors; raise the hard limit "
                "(ulimit -Hn, limits.conf) or lower --max-in-flight / --users")
    return ""

"""Child processes that end with the process that started them, however it ends.

A run starts children: local workers (`loadgen run --processes N`), the demo's reference server,
keep-awake spinners. A parent that ends normally, or on a signal it handles, stops them itself; one
that is SIGKILLed (the OOM killer, a CI runner's timeout, `kill -9`), or SIGTERMed before its
handlers are in place, cannot. Its children would go on: a local worker waits about a minute for
the master's heartbeats before it gives up, a demo server for ever, holding its port and its cores.

Linux's PR_SET_PDEATHSIG has the kernel send the child a signal the moment its parent ends, whatever
the cause. It is set in the child between fork and exec (`end_with_parent` as Popen's preexec_fn;
exec keeps it), and the child then checks that its parent is still the one that forked it: a
parent that ended before the prctl call would never signal it.

A preexec_fn runs Python between fork and exec, which is unsafe where another thread may hold a lock
the child then needs; this one takes none: prctl is looked up before the fork, and the child only
calls it, getppid and kill.

The signal is SIGKILL: a child whose run is gone has nobody to report to, and nothing of it is worth
saving. The kernel signals on the exit of the parent *thread* that forked, so children are started
from the main thread (gevent's greenlets all run there). Elsewhere than Linux this does nothing.

Low level: imports nothing of loadgen.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from functools import partial

__all__ = ["END_WITH_PARENT_ENV", "end_with_parent", "end_with_parent_from_env", "ending_with_this_process"]

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up here, in the parent: between fork and exec a child must not import or load anything.
_PRCTL = _load_prctl()


def end_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """In a child: be sent `sig` when the parent ends, and end now if `parent_pid` has already ended."""
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent ended between the fork and the prctl: no signal will come
        os.kill(os.getpid(), sig)


def ending_with_this_process(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A preexec_fn for subprocess.Popen: the child is sent `sig` when this process ends.

        subprocess.Popen([...], preexec_fn=ending_with_this_process())
    """
    return partial(end_with_parent, os.getpid(), sig)


END_WITH_PARENT_ENV = "LOADGEN_END_WITH_PARENT"
"""Set to the parent's pid in a child's environment: the child calls end_with_parent_from_env() first
thing, after exec. For parents that already run other threads (a master's ZeroMQ and resolver threads),
where code between fork and exec could wait for ever on a lock another thread held at the fork."""


def end_with_parent_from_env() -> None:
    """In a child started with END_WITH_PARENT_ENV set: end with that parent (see end_with_parent)."""
    value = os.environ.pop(END_WITH_PARENT_ENV, "")
    if value.isdigit():
        end_with_parent(int(value))

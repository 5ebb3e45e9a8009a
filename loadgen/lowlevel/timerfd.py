"""Precise one-shot wake-ups on Linux through timerfd, for event loops that poll file descriptors.

Event loops built on epoll (gevent's libev, asyncio's selectors) round their sleep timeouts to whole
milliseconds, so a request scheduled for t can start up to ~1 ms late. A timerfd armed for an
absolute CLOCK_MONOTONIC instant becomes readable at that instant (to within tens of microseconds);
the loop already polls file descriptors, so waiting on it costs one more fd, not a spin.

time.monotonic() reads CLOCK_MONOTONIC, so deadlines are plain time.monotonic() values, and they
mean the same instant in every process on the machine.
"""

from __future__ import annotations

import ctypes
import os
import struct

_CLOCK_MONOTONIC = 1
_TFD_TIMER_ABSTIME = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_PR_SET_TIMERSLACK = 29


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_settime.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(_Itimerspec),
    ctypes.POINTER(_Itimerspec),
]


def reduce_timer_slack() -> None:
    """Ask the kernel for 1 ns timer slack in this thread (the default adds up to 50 us)."""
    try:
        _libc.prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(1), 0, 0, 0)
    except (AttributeError, OSError):  # not Linux: keep the default slack
        pass


class TimerFD:
    """A non-blocking timerfd; `arm(deadline)` makes `fileno()` readable at that monotonic instant."""

    def __init__(self) -> None:
        fd = _libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self._fd = fd
        self._spec = _Itimerspec()

    def fileno(self) -> int:
        return self._fd

    def arm(self, deadline: float) -> None:
        """Fire once at `deadline` (time.monotonic() seconds); a deadline in the past fires at once."""
        sec = int(deadline)
        nsec = int((deadline - sec) * 1e9)
        if sec <= 0 and nsec <= 0:
            sec, nsec = 0, 1  # an all-zero value would disarm the timer
        value = self._spec.it_value
        value.tv_sec, value.tv_nsec = sec, nsec
        if _libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def disarm(self) -> None:
        value = self._spec.it_value
        value.tv_sec, value.tv_nsec = 0, 0
        _libc.timerfd_settime(self._fd, 0, ctypes.byref(self._spec), None)

    def consume(self) -> int:
        """Read the expiry count (0 when it has not fired since the last read)."""
        try:
            return struct.unpack("Q", os.read(self._fd, 8))[0]
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

"""Locust user classes: the open-loop dispatcher user and the closed-loop user.

Both read their run from `environment.loadgen` (a LoadContext), so they are the same classes in
a headless `loadgen run` and under `locust -f loadgen/driver/locustfile.py`.
"""

from __future__ import annotations

from locust import User, task
from locust.exception import StopUser

from loadgen.driver.context import context_of

__all__ = ["ClosedLoopUser", "OpenLoopUser"]


class OpenLoopUser(User):
    """Exactly one per process: runs the open-loop dispatcher over the whole schedule."""

    fixed_count = 1

    def wait_time(self) -> float:
        return 0.0

    @task
    def dispatch(self) -> None:
        ctx = context_of(self.environment)
        try:
            ctx.run_open_loop()
        finally:
            ctx.done.set()
        raise StopUser()


class ClosedLoopUser(User):
    """Sends a request, waits for its answer, thinks, and sends the next."""

    def wait_time(self) -> float:
        return context_of(self.environment).think()

    @task
    def infer(self) -> None:
        ctx = context_of(self.environment)
        if ctx.stopping or ctx.user_retires():
            raise StopUser()
        ctx.send_closed()

"""loadgen's users under Locust's own command line and web UI.

    locust -f loadgen/driver/locustfile.py --scenario scenarios/poisson-kserve.toml [--headless]

The scenario picks the user class (open loop: one dispatcher user; closed loop: `users` users;
in the web UI, start the closed loop with that many users). Locust's own statistics see every
request; loadgen's HDR outputs (summary.json, latency.hlog) are written to --lg-out at test stop.
"""

from __future__ import annotations

import time
from pathlib import Path

import gevent
from locust import events

from loadgen.driver.context import BACKSTOP_S, LoadContext
from loadgen.driver.mix import client_of
from loadgen.driver.users import ClosedLoopUser, OpenLoopUser
from loadgen.scenario import OpenLoop, load_scenario

__all__ = ["ClosedLoopUser", "OpenLoopUser"]


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument("--scenario", required=True, help="loadgen scenario TOML file")
    parser.add_argument("--lg-out", default="runs/locust", help="folder for summary.json and latency.hlog")


@events.init.add_listener
def _on_init(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is None or not getattr(options, "scenario", None):
        return
    overrides = {"target.url": options.host} if options.host else {}
    scenario = load_scenario(options.scenario, overrides)
    pattern = scenario.pattern
    is_open = isinstance(pattern, OpenLoop)
    client = client_of(scenario, pattern.seed)
    client.prepare()
    environment.loadgen = LoadContext(scenario, client, environment)
    chosen = OpenLoopUser if is_open else ClosedLoopUser
    environment.user_classes[:] = [chosen]


@events.test_start.add_listener
def _on_start(environment, **_kwargs) -> None:
    ctx = getattr(environment, "loadgen", None)
    if ctx is None:
        return
    ctx.begin()
    if environment.runner is not None:
        gevent.spawn(_quit_when_done, environment, ctx)


def _quit_when_done(environment, ctx: LoadContext) -> None:
    """End the test when the scenario's schedule (open loop) or duration (closed loop) is over."""
    from loadgen.driver.run import drain

    backstop = BACKSTOP_S if isinstance(ctx.pattern, OpenLoop) else 0.0
    ctx.done.wait(max(0.0, ctx.end_t - time.monotonic()) + backstop)
    ctx.stopping = True
    drain(ctx, ctx.scenario.target.timeout)
    environment.runner.quit()


@events.test_stop.add_listener
def _on_stop(environment, **_kwargs) -> None:
    ctx = getattr(environment, "loadgen", None)
    if ctx is None or ctx.recorder is None:
        return
    from loadgen._runcmd import write_outputs
    from loadgen.driver.run import drain, result_of

    ctx.stopping = True
    if ctx.dispatcher is not None:
        ctx.dispatcher.stop()
    drain(ctx, ctx.scenario.target.timeout)
    end_t = time.monotonic()
    ctx.finish(end_t)
    out = Path(environment.parsed_options.lg_out)
    write_outputs(result_of(ctx, end_t, interrupted=end_t < ctx.end_t), out)

"""`loadgen worker`: a Locust worker that sends its share of every distributed run its master starts.

    loadgen worker --master-host 10.0.0.5 [--master-port 5557]

The process is a Locust WorkerRunner (Locust's connection, heartbeats, worker index and `quit`); the
run itself arrives as custom messages (the protocol is in loadgen/driver/distributed.py). For each run
the worker checks the target and warms it up (SETUP -> READY), then at the start instant the master
gave (START, an epoch time converted once to this host's monotonic clock) sends its share exactly as a
single-process run does: the open-loop user with the same dispatcher over share (k, n) of the schedule,
or its closed-loop users, recording into its own Recorder. Each interval, once closed, is shipped to
the master encoded (HistogramSet.encode: exact), with the worker's health beside it; the worker never
computes a percentile that goes into the run's figures. After the run it sends its own generator
self-check (DONE) and waits for the next run, until the master says quit.

Mid-run, the master may hand it more: a lost worker's shares (TAKEOVER, a dispatcher each, beside its
own), or a reshuffle when a worker joined (RESHARE: every share it sends ends at the given instant and
the new one starts there). A worker that joins mid-run is started with a share from that instant; its
recorder and interval beat are the run's own, so its intervals merge with the others'.

`--debug-dir DIR` also appends every shipped interval, as sent, to DIR/worker-<pid>.jsonl: what the
master received can then be merged independently (tests/test_distributed.py does); and every loadgen
message received from the master to DIR/worker-<pid>-received.jsonl (what went over the wire to it).

Trust (loadgen/driver/trust.py): with `--cluster-key-env VAR` / `--cluster-key-file F` the worker
answers the master's challenge, checks the master's answer to its own, and takes no run before that;
the master may refuse it (REFUSED: exit 2 with the master's reason). The files a scenario names are read
only inside `--data-dir DIR` (or where they are, with `--shared-filesystem`: the --processes workers).
Secrets are never in the scenario: a bearer token (bearer_token_env) and secret headers (header_env)
are read from this process's own environment when its client is made. A bogus message from the master
is logged and ignored (loadgen/driver/channel.py).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import gevent
from gevent.event import Event
from locust.env import Environment
from locust.event import Events

from loadgen.driver.channel import guard_worker, guard_worker_channel
from loadgen.driver.context import BACKSTOP_S, LoadContext
from loadgen.driver.distributed import (
    MSG_DONE,
    MSG_FAILED,
    MSG_INTERVAL,
    MSG_READY,
    MSG_RESHARE,
    MSG_SETUP,
    MSG_START,
    MSG_STOP,
    MSG_TAKEOVER,
    Share,
    monotonic_of_epoch,
)
from loadgen.driver.mix import client_of
from loadgen.driver.run import drain, open_file_limits, self_check
from loadgen.driver.trust import (
    MSG_CHALLENGE,
    MSG_HELLO,
    MSG_PROOF,
    MSG_REFUSED,
    MSG_WELCOME,
    confine_paths,
    message_problem,
    new_nonce,
    prove,
    proves,
)
from loadgen.driver.users import ClosedLoopUser, OpenLoopUser
from loadgen.errors import LoadgenError
from loadgen.lowlevel.keepawake import KeepAwake
from loadgen.scenario import OpenLoop, validate_scenario

__all__ = ["WorkerAgent", "serve"]

_INTERRUPT_DRAIN_S = 2.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _WorkerRun:
    """One run on this worker: its context, the greenlet that runs it, and the intervals it shipped."""

    def __init__(self, agent: WorkerAgent, run_id: str, setup: dict[str, Any]) -> None:
        self.agent = agent
        self.run_id = run_id
        self.index = int(setup["index"])
        self.count = int(setup["count"])
        scenario = setup["scenario"]
        if not agent.shared_filesystem:
            scenario = confine_paths(scenario, agent.data_dir)
        self.scenario = validate_scenario(scenario, "scenario from the master")
        self.seed = int(setup["seed"])
        self.ctx: LoadContext | None = None
        self.stop = Event()
        self.started = False
        self._shipped = 0
        self._extra: list[gevent.Greenlet] = []
        self._last_cpu = (time.monotonic(), _cpu_seconds())

    # -- SETUP ----------------------------------------------------------------------------------
    def prepare(self) -> dict[str, Any]:
        """Check the target and warm it up (the client's prepare), as a single-process run does; first the
        open-file limit, as a single-process run does: this worker's share of the users must fit under the
        hard limit (else the run is refused, naming the key), and the soft limit is raised for its
        connections (up to the whole run's users or max_in_flight: it may take over another's share)."""
        pattern = self.scenario.pattern
        mine = 0 if isinstance(pattern, OpenLoop) else -(-pattern.users // max(1, self.count))
        fd_note = open_file_limits(pattern, mine, lambda short: (
            f"closed_loop.users: this worker's {mine} users: {short}: give fewer users or more workers"),
            "scenario from the master")
        if fd_note:
            print(f"worker: warning: {fd_note}", file=sys.stderr, flush=True)
        client = client_of(self.scenario, seed=self.seed)
        metadata = client.prepare()
        self.ctx = LoadContext(self.scenario, client, self.agent.environment, seed=self.seed)
        self.ctx.fd_note = fd_note
        self.agent.environment.loadgen = self.ctx
        return {
            "run": self.run_id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "warmup_requests": client.warmup_requests,
            "streams": self.ctx.streams,
            "metadata": metadata or {},
        }

    # -- START ----------------------------------------------------------------------------------
    def start(self, data: dict[str, Any]) -> None:
        ctx = self.ctx
        start_t = monotonic_of_epoch(float(data["start_epoch_s"]))
        share = Share.from_json(data["share"])
        ctx.share = (share.k, share.n)
        ctx.share_start_s = share.start_s  # > 0 for a worker that joined the run mid-way
        ctx.on_interval = self.ship
        self.started = True
        ctx.begin(start_t)
        gevent.spawn(self._run, int(data.get("users", 0)))

    def _run(self, users: int) -> None:
        """The run, then DONE: sent last, once this worker is ready for the master's next run."""
        ctx = self.ctx
        runner = self.agent.runner
        runner.worker_state = "running"
        keep = KeepAwake(os.sched_getaffinity(0)) if self.scenario.output.keep_awake and self.agent.keep_awake \
            else None
        done: dict[str, Any] = {"run": self.run_id}
        if keep is not None:
            keep.__enter__()
        try:
            done.update(self._send_load(users))
        except Exception as exc:  # noqa: BLE001 - the master must hear of it, not wait for it
            done["error"] = f"{type(exc).__name__}: {exc}"
            print(f"worker: the run failed: {done['error']}", file=sys.stderr, flush=True)
        finally:
            if keep is not None:
                keep.__exit__()
            ctx.client.close()
            gc.unfreeze()
            runner.worker_state = "ready"
            self.agent.finished(self)
        self.agent.send(MSG_DONE, done)

    def _send_load(self, users: int) -> dict[str, Any]:
        """Send this worker's load until the end (or STOP), drain, ship the last intervals."""
        ctx = self.ctx
        scenario = self.scenario
        runner = self.agent.runner
        gc.collect()
        gc.freeze()
        cpu0, wall0 = _cpu_seconds(), time.monotonic()
        if isinstance(ctx.pattern, OpenLoop):
            runner.spawn_users({OpenLoopUser.__name__: 1})
        else:
            gevent.sleep(max(0.0, ctx.start_t - time.monotonic()))
            if users:
                runner.spawn_users({ClosedLoopUser.__name__: users})
        backstop = BACKSTOP_S if isinstance(ctx.pattern, OpenLoop) else 0.0
        gevent.wait([self.stop, ctx.done], count=1, timeout=max(0.0, ctx.end_t - time.monotonic()) + backstop)
        deadline = ctx.end_t + backstop
        while not self.stop.is_set() and time.monotonic() < deadline:
            # Shares taken over or reshuffled in; one that arrives while waiting is waited for next turn.
            pending = [greenlet for greenlet in self._extra if not greenlet.dead]
            if not pending:
                break
            gevent.wait([*pending, self.stop], count=len(pending),
                        timeout=max(0.0, deadline - time.monotonic()))
        interrupted = self.stop.is_set() and time.monotonic() < ctx.end_t
        ctx.stopping = True
        stopped_t = time.monotonic()
        ctx.stop_dispatching(stopped_t)
        gevent.joinall(self._extra, timeout=1.0)  # stopped take-overs return, counting what they left unsent
        drain(ctx, _INTERRUPT_DRAIN_S if interrupted else scenario.target.timeout + 1.0)
        runner.user_greenlets.kill(block=True)
        end_t = time.monotonic()
        ctx.finish(max(end_t, ctx.start_t))
        cpu = (_cpu_seconds() - cpu0) / max(end_t - wall0, 1e-9)
        self.ship()
        return {
            "generator": self_check(ctx, scenario, cpu).as_json(),
            "in_flight_at_end": ctx.in_flight,
            "end_s": end_t - ctx.start_t,
            "stopped_s": stopped_t - ctx.start_t,
            "interrupted": interrupted,
        }

    # -- TAKEOVER / RESHARE / STOP ------------------------------------------------------------
    def take_over(self, data: dict[str, Any]) -> None:
        """A lost worker's shares (open loop) or users (closed loop), from the instant the master gave;
        or, when a worker joined a closed-loop run, users to let go at that instant."""
        ctx = self.ctx
        if ctx.stopping:
            return
        for item in data.get("shares", []):
            share = Share.from_json(item)
            self._extra.append(gevent.spawn(ctx.take_over((share.k, share.n), share.start_s, share.end_s)))
        if data.get("unsent"):  # a leaving worker's arrivals between its leaving and this takeover
            ctx.record_handover_unsent(int(data["unsent"]))
        users, retire = int(data.get("users", 0)), int(data.get("retire_users", 0))
        start = ctx.start_t + float(data.get("start_s", 0.0))
        if users:
            gevent.spawn_later(max(0.0, start - time.monotonic()), self._more_users, users)
        if retire:  # a worker joined a closed-loop run: it takes these users from `start`
            gevent.spawn_later(max(0.0, start - time.monotonic()), ctx.retire_users, retire)

    def reshare(self, data: dict[str, Any]) -> None:
        """A worker joined: leave every share sent now at `from_s` and send the new `shares` from there."""
        ctx = self.ctx
        if ctx.stopping:
            return
        ctx.end_dispatching_at(float(data["from_s"]))
        self.take_over(data)

    def _more_users(self, users: int) -> None:
        if not self.ctx.stopping:
            self.agent.runner.spawn_users({ClosedLoopUser.__name__: users})

    # -- shipping -------------------------------------------------------------------------------
    def ship(self) -> None:
        """Send every closed interval not yet sent, encoded, with this worker's health."""
        ctx = self.ctx
        intervals = ctx.recorder.intervals
        while self._shipped < len(intervals):
            interval = intervals[self._shipped]
            figures = interval.figures
            encoded = figures.encode()
            gevent.idle()
            now, cpu = time.monotonic(), _cpu_seconds()
            then, cpu_then = self._last_cpu
            self._last_cpu = (now, cpu)
            message = {
                "run": self.run_id,
                "index": self.index,
                "start_s": interval.start_t - ctx.start_t,
                "end_s": interval.end_t - ctx.start_t,
                "figures": encoded,
                "health": {
                    "lag_p99_ms": figures.percentiles_ms("lag")["p99"],
                    "dropped": ctx.recorder.cumulative.dropped,
                    "cpu_ratio": (cpu - cpu_then) / (now - then) if now > then else 0.0,
                    "in_flight": ctx.in_flight,
                },
            }
            self._shipped += 1
            self.agent.log_shipped(message)  # the copy first: it holds all that the master can have had
            self.agent.send(MSG_INTERVAL, message)
            gevent.idle()


class WorkerAgent:
    """loadgen's side of a Locust worker: answers the master's run messages (one run at a time)."""

    def __init__(self, runner: Any, environment: Environment, debug_dir: Path | None = None,
                 keep_awake: bool = True, *, key: bytes | None = None, data_dir: Path | None = None,
                 shared_filesystem: bool = False) -> None:
        self.runner = runner
        self.environment = environment
        self.keep_awake = keep_awake
        """Start CPU spinners for runs that ask (False: another process on this host keeps it awake)."""
        self.key = key
        self.data_dir = data_dir
        self.shared_filesystem = shared_filesystem
        self.current: _WorkerRun | None = None
        self.refused: str | None = None
        """Why this worker left (the master refused it, or could not prove the key)."""
        self._trusted = key is None
        self._nonce: str | None = None
        self._debug = self._received = None
        if debug_dir is not None:
            debug_dir.mkdir(parents=True, exist_ok=True)
            self._debug = (debug_dir / f"worker-{os.getpid()}.jsonl").open("a", encoding="utf-8")
            self._received = (debug_dir / f"worker-{os.getpid()}-received.jsonl").open("a", encoding="utf-8")
        runner.register_message(MSG_SETUP, self._on_setup, concurrent=True)
        runner.register_message(MSG_START, self._on_start)
        runner.register_message(MSG_TAKEOVER, self._on_takeover)
        runner.register_message(MSG_RESHARE, self._on_reshare)
        runner.register_message(MSG_STOP, self._on_stop)
        runner.register_message(MSG_CHALLENGE, self._on_challenge)
        runner.register_message(MSG_WELCOME, self._on_welcome)
        runner.register_message(MSG_REFUSED, self._on_refused)
        self.send(MSG_HELLO, {})  # the master's challenge now finds the handlers in place

    def send(self, kind: str, data: dict[str, Any]) -> None:
        self.runner.send_message(kind, data)

    def log_shipped(self, message: dict[str, Any]) -> None:
        if self._debug is not None:
            self._debug.write(json.dumps(message) + "\n")
            self._debug.flush()

    def _accept(self, msg: Any) -> bool:
        """Keep the debug copy of `msg`; whether its fields are what its type needs (else it is ignored)."""
        if self._received is not None:
            self._received.write(json.dumps({"type": msg.type, "data": msg.data}, default=repr) + "\n")
            self._received.flush()
        problem = message_problem(msg.type, msg.data)
        if problem is not None:
            print(f"worker: ignored a bogus {msg.type} message from the master: {problem}", file=sys.stderr,
                  flush=True)
        return problem is None

    def _leave(self, why: str) -> None:
        self.refused = why
        print(f"worker: {why}", file=sys.stderr, flush=True)
        gevent.spawn(self.runner.greenlet.kill, block=False)

    # -- the cluster key ------------------------------------------------------------------------
    def _on_challenge(self, environment: Environment, msg: Any) -> None:
        if not self._accept(msg):
            return
        if self.key is None:  # the master will refuse it, and say why
            self.send(MSG_PROOF, {})
            return
        self._trusted = False
        self._nonce = new_nonce()
        self.send(MSG_PROOF, {"proof": prove(self.key, "worker", msg.data["nonce"], self.runner.client_id),
                              "nonce": self._nonce})

    def _on_welcome(self, environment: Environment, msg: Any) -> None:
        if not self._accept(msg) or self.key is None or self._nonce is None:
            return
        nonce, self._nonce = self._nonce, None
        if proves(self.key, "master", nonce, self.runner.client_id, msg.data["proof"]):
            self._trusted = True
            print("worker: the master proved the cluster key", file=sys.stderr, flush=True)
        else:
            self._leave("the master's answer does not prove the cluster key: leaving (is it the master "
                        "you meant, with the same --cluster-key-env/--cluster-key-file?)")

    def _on_refused(self, environment: Environment, msg: Any) -> None:
        if self._accept(msg):
            self._leave(f"refused by the master: {msg.data['reason']}")

    def finished(self, run: _WorkerRun) -> None:
        if self.current is run:
            self.current = None
            self.environment.loadgen = None

    def _on_setup(self, environment: Environment, msg: Any) -> None:
        if not self._accept(msg):
            return
        data = msg.data
        run_id = data["run"]
        if not self._trusted:
            error = ("this worker has a cluster key and the master has not proven it: give the master the same "
                     "--cluster-key-env/--cluster-key-file")
            print(f"worker: refused a run: {error}", file=sys.stderr, flush=True)
            self.send(MSG_FAILED, {"run": run_id, "error": error, "kind": "usage"})
            return
        if self.current is not None and self.current.started:
            self.send(MSG_FAILED, {"run": run_id, "error": "this worker is still running the previous run"})
            return
        try:
            run = _WorkerRun(self, run_id, data)
            self.current = run
            self.send(MSG_READY, run.prepare())
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the master, which reports it
            self.current = None
            kind = "usage" if isinstance(exc, (LoadgenError, ValueError)) else type(exc).__name__
            self.send(MSG_FAILED, {"run": run_id, "error": str(exc), "kind": kind})

    def _run_of(self, msg: Any) -> _WorkerRun | None:
        if not self._accept(msg):
            return None
        run = self.current
        return run if run is not None and run.run_id == msg.data.get("run") else None

    def _on_start(self, environment: Environment, msg: Any) -> None:
        run = self._run_of(msg)
        if run is not None and not run.started:
            run.start(msg.data)

    def _on_takeover(self, environment: Environment, msg: Any) -> None:
        run = self._run_of(msg)
        if run is not None and run.started:
            run.take_over(msg.data)

    def _on_reshare(self, environment: Environment, msg: Any) -> None:
        run = self._run_of(msg)
        if run is not None and run.started:
            run.reshare(msg.data)

    def _on_stop(self, environment: Environment, msg: Any) -> None:
        run = self._run_of(msg)
        if run is None:
            return
        if run.started:
            run.stop.set()
        else:  # set up but never started: let the client go
            self.current = None
            if run.ctx is not None:
                run.ctx.client.close()


def serve(master_host: str, master_port: int, debug_dir: Path | None = None, keep_awake: bool = True, *,
          key: bytes | None = None, data_dir: Path | None = None, shared_filesystem: bool = False) -> int:
    """Connect to the master and serve its runs until it says quit (exit 0) or SIGINT/SIGTERM (130); a
    LoadgenError (exit 2) when the master refused this worker or did not prove the cluster key."""
    environment = Environment(user_classes=[OpenLoopUser, ClosedLoopUser], events=Events())
    environment.loadgen = None
    print(f"worker: connecting to the master at {master_host}:{master_port}", file=sys.stderr, flush=True)
    guard_worker_channel()
    try:
        runner = environment.create_worker_runner(master_host, master_port)
    except ConnectionError:
        raise LoadgenError(f"no loadgen master answered at {master_host}:{master_port}; start "
                           "`loadgen run ... --master` there first, or check --master-host/--master-port") from None
    guard_worker(runner)
    agent = WorkerAgent(runner, environment, debug_dir, keep_awake, key=key, data_dir=data_dir,
                        shared_filesystem=shared_filesystem)
    print(f"worker: connected as worker {runner.worker_index} (pid {os.getpid()})", file=sys.stderr, flush=True)
    signalled = Event()

    def leave() -> None:
        """Ctrl-C or SIGTERM: finish the current run's part here (drain, last intervals, DONE), say quit."""
        if signalled.is_set():
            return
        signalled.set()
        gevent.spawn(_leave)

    def _leave() -> None:
        run = agent.current
        if run is not None and run.started:
            run.stop.set()
            deadline = time.monotonic() + _INTERRUPT_DRAIN_S + 3.0
            while agent.current is run and time.monotonic() < deadline:
                gevent.sleep(0.05)
        runner.send_message("quit")
        gevent.sleep(0.2)
        runner.greenlet.kill(block=False)

    handlers = [gevent.signal_handler(sig, leave) for sig in (signal.SIGINT, signal.SIGTERM)]
    try:
        runner.greenlet.join()
    finally:
        for handler in handlers:
            handler.cancel()
    if agent.refused is not None:
        raise LoadgenError(agent.refused)
    print("worker: the master said quit" if not signalled.is_set() else "worker: stopped", file=sys.stderr)
    return 130 if signalled.is_set() else 0

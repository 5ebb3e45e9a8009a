"""The master of a distributed run: Locust's MasterRunner, the workers' shares, and the merged figures.

    loadgen run x.toml --processes 4                      # this process is the master of 4 local workers
    loadgen run x.toml --master --expect-workers 8        # workers: `loadgen worker --master-host HOST`

A Cluster is one Locust MasterRunner (Environment.create_master_runner) and the workers connected to
it; it outlives a run, so a sweep's steps run on the same workers. `Cluster.run(scenario)` is one run
(`_DistributedRun`), in the order of the protocol in loadgen/driver/distributed.py: set every connected
worker up, give each its share (open loop: share (i, n) of the schedule; closed loop: its part of the
users), start them all at one epoch instant a little ahead, merge their intervals as they arrive, and
end when every worker is done or lost.

Lost workers: Locust marks a worker missing when its heartbeats stop (about 4 s after it dies: Locust's
1 s heartbeat, 3 missed), and removes it when it says quit. The master then reports it (stderr now,
summary.json "distributed.lost" at the end: which worker, when, the last interval it had sent, and how
many of its arrivals fall after that report), keeps every interval it had received, and either stops
the run (--stop-on-worker-loss) or has the others take over its load from a moment later: its open-loop
shares split among them (each a finer share of the same schedule, from that instant), or its
closed-loop users spread over them. A worker that left cleanly says when it stopped dispatching; its
arrivals from then to the takeover instant are counted as unsent by the takers (each for its pieces), so
sent + dropped + unsent is still the whole schedule. A worker that died leaves no such account: its
arrivals after its last report are only estimated (`arrivals_after_last_report`).

Joining workers: a worker that connects while an open-loop run goes is set up beside it (SETUP, READY:
its target check and warm-up), and once it is ready the rest of the schedule is reshuffled, the lost
worker's handover in reverse: from an instant RESHARE_LEAD_S ahead, every worker still sending (the joiner
included) sends share (j, m) of the schedule, and its earlier shares end there (RESHARE to the others,
START with the run's own start epoch to the joiner, whose intervals then join the merge). The rate asked
for is unchanged across the join; it is only spread over one more worker. In a closed-loop run the users
are spread again the same way: from that instant each worker with more than its new part lets the
surplus go (each user once its request in flight is answered: none is cut off) and the joiner starts as
many. A worker ready too late in the run takes part from the next run (the next sweep step).

The master computes every percentile of the run, from the merged recorder: summary.json, latency.hlog,
the table and --metrics-port (the merged figures, plus per-worker health gauges labelled by worker).
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

import gevent
from gevent.event import Event
from locust.env import Environment
from locust.event import Events
from locust.runners import STATE_MISSING

from loadgen.driver.channel import guard_master
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
    DistributedOptions,
    IntervalMerger,
    Share,
    combined_generator,
    monotonic_of_epoch,
    split_users,
)
from loadgen.driver.exporter import MetricsExporter
from loadgen.driver.run import RunResult, _offered_rps
from loadgen.driver.selfcheck import SelfCheck
from loadgen.driver.trust import (
    KEY_ENV_OF_LOCAL_WORKERS,
    MSG_CHALLENGE,
    MSG_HELLO,
    MSG_PROOF,
    MSG_REFUSED,
    MSG_WELCOME,
    message_problem,
    new_cluster_key,
    new_nonce,
    prove,
    proves,
)
from loadgen.driver.users import ClosedLoopUser, OpenLoopUser
from loadgen.errors import LoadgenError, TargetError
from loadgen.lowlevel.children import END_WITH_PARENT_ENV
from loadgen.patterns.schedule import count_in, profile_of
from loadgen.recorder import HistogramSet, Recorder
from loadgen.scenario import OpenLoop, Scenario
from loadgen.sinks.prometheus import WorkerHealth

if TYPE_CHECKING:
    from loadgen.driver.consolestate import ConsoleState

__all__ = ["Cluster", "open_cluster"]

START_LEAD_S = 0.5
"""The run starts this long after START is sent, so every worker has it and is waiting at t = 0."""
TAKEOVER_LEAD_S = 0.25
"""A lost worker's load is taken over from this long after the loss is seen."""
RESHARE_LEAD_S = 0.5
"""A joining worker's reshuffle takes effect this long after it is ready, so every worker has it by then."""
_SETUP_GRACE_S = 30.0  # beyond the connect timeout, for the warm-up requests
_DONE_GRACE_S = 10.0  # beyond the end of the run and the request timeout, for the last intervals
_POLL_S = 0.2
_ABANDON_WAIT_S = 5.0  # how long local workers sent SIGTERM before any run get to exit before SIGKILL
CHALLENGE_TIMEOUT_S = 10.0
"""A connected worker that has not proved the cluster key by then is refused."""
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class _Worker:
    """The master's record of one worker in one run."""

    client_id: str
    index: int
    ready: dict[str, Any] | None = None
    shares: list[Share] = field(default_factory=list)
    users: int = 0
    taken_over: list[str] = field(default_factory=list)
    figures: HistogramSet = field(default_factory=HistogramSet)
    intervals: int = 0
    last_report_s: float = 0.0
    health: dict[str, Any] = field(default_factory=dict)
    done: dict[str, Any] | None = None
    lost_at_s: float | None = None

    @property
    def label(self) -> str:
        return str(self.index)

    @property
    def sending(self) -> bool:
        return self.done is None and self.lost_at_s is None

    def as_json(self, open_loop: bool) -> dict[str, Any]:
        ready = self.ready or {}
        entry: dict[str, Any] = {
            "worker": self.label,
            "id": self.client_id,
            "host": ready.get("host"),
            "pid": ready.get("pid"),
        }
        if open_loop:
            entry["share"] = [str(share) for share in self.shares]
        else:
            entry["users"] = self.users
        figures = self.figures
        entry.update({
            "taken_over": self.taken_over,
            "intervals": self.intervals,
            "requests": figures.requests,
            "ok": figures.ok,
            "errors": dict(sorted(figures.errors.items())),
            "dropped": figures.dropped,
            "unsent": figures.unsent,
            "sent": figures.sent,
            "completed_in_window": figures.completed_in_window,
            "latency_ms": figures.percentiles_ms("latency"),
            "warmup_requests": ready.get("warmup_requests", 0),
            "generator": (self.done or {}).get("generator"),
            "error": (self.done or {}).get("error"),
            "lost_at_s": self.lost_at_s,
            "last_report_s": round(self.last_report_s, 6),
        })
        return entry


class Cluster:
    """A Locust master and its workers, for one run or a sweep's runs (a context manager)."""

    def __init__(self, options: DistributedOptions) -> None:
        self.options = options
        self.environment = Environment(user_classes=[OpenLoopUser, ClosedLoopUser], events=Events())
        try:
            self.runner = self.environment.create_master_runner(options.bind_host, options.bind_port)
        except SystemExit:  # Locust exits when the port is taken (it has logged why)
            raise LoadgenError(f"cannot listen for workers on {options.bind_host}:{options.bind_port} "
                               "(in use?); choose another --master-bind-port") from None
        self.port: int = self.runner.server.port
        guard_master(self.runner)
        self._procs: list[subprocess.Popen] = []
        self._logs: list[Any] = []
        self._run: _DistributedRun | None = None
        self.key = options.cluster_key or (new_cluster_key().encode() if options.processes else None)
        self._connected_at: dict[str, float] = {}  # client id -> when it connected, until it proved the key
        self._challenges: dict[str, str] = {}  # client id -> the nonce it was sent
        self._trusted: set[str] = set()
        self.refused: dict[str, str] = {}  # client id -> why
        for kind in (MSG_READY, MSG_FAILED, MSG_INTERVAL, MSG_DONE):
            self.runner.register_message(kind, self._route)
        self.runner.register_message(MSG_HELLO, self._on_hello)
        self.runner.register_message(MSG_PROOF, self._on_proof)
        self.environment.events.worker_connect.add_listener(self._on_connect)

    # -- the cluster key ------------------------------------------------------------------------
    def _on_connect(self, client_id: str, **_: Any) -> None:
        """A worker said client_ready (first time, or again after a reconnect): it proves the key anew."""
        self._trusted.discard(client_id)
        if self.key is not None:
            self._connected_at[client_id] = time.monotonic()

    def _on_hello(self, environment: Environment, msg: Any) -> None:
        """A connected worker asks for its challenge (its handlers are in place)."""
        client_id = msg.node_id
        if self.key is None or client_id not in self._connected_at:
            return  # no key to prove, or not connected (or refused already)
        nonce = self._challenges[client_id] = new_nonce()
        self.send(MSG_CHALLENGE, {"nonce": nonce}, client_id)

    def _on_proof(self, environment: Environment, msg: Any) -> None:
        client_id, data = msg.node_id, msg.data
        challenge = self._challenges.pop(client_id, None)
        if self.key is None or challenge is None or client_id not in self._connected_at:
            print(f"master: ignored a cluster-key proof from {client_id!r} that no challenge asked for",
                  file=sys.stderr, flush=True)
            return
        problem = message_problem(MSG_PROOF, data)
        if problem is None and data.get("proof") is None:
            problem = "it has no cluster key (give it --cluster-key-env or --cluster-key-file)"
        elif problem is None and not proves(self.key, "worker", challenge, client_id, data["proof"]):
            problem = "its answer does not prove the cluster key (a wrong key)"
        if problem is None and not data.get("nonce"):
            problem = "it sent no challenge of its own for the master to answer"
        if problem is not None:
            self._refuse(client_id, problem)
            return
        del self._connected_at[client_id]
        self._trusted.add(client_id)
        self.send(MSG_WELCOME, {"proof": prove(self.key, "master", data["nonce"], client_id)}, client_id)

    def _refuse(self, client_id: str, why: str) -> None:
        """Log and refuse a worker: it is told why, and is never counted nor sent a scenario."""
        self.refused[client_id] = why
        self._trusted.discard(client_id)
        self._connected_at.pop(client_id, None)
        self._challenges.pop(client_id, None)
        print(f"master: refused worker {client_id!r}: {why}", file=sys.stderr, flush=True)
        self.send(MSG_REFUSED, {"reason": why}, client_id)

    def _expire_challenges(self) -> None:
        now = time.monotonic()
        for client_id, connected_t in list(self._connected_at.items()):
            if client_id not in self.runner.clients:  # it quit
                del self._connected_at[client_id]
            elif now - connected_t > CHALLENGE_TIMEOUT_S:
                self._refuse(client_id, f"it did not prove the cluster key within "
                                        f"{CHALLENGE_TIMEOUT_S:g} s (not a loadgen worker of this version?)")

    def trusted(self, client_id: str) -> bool:
        """Whether the worker may be sent a run: it proved the key (or the master has none)."""
        return self.key is None or client_id in self._trusted

    # -- workers --------------------------------------------------------------------------------
    def spawn_local(self, count: int) -> None:
        """Start `count` `loadgen worker` processes on this host, connected to this master."""
        for _ in range(count):
            # A file, not a pipe: a worker never blocks on what it writes. Closed in close().
            log = tempfile.TemporaryFile()  # noqa: SIM115
            self._logs.append(log)
            env = {**os.environ, KEY_ENV_OF_LOCAL_WORKERS: self.key.decode(),  # never on the command line
                   END_WITH_PARENT_ENV: str(os.getpid())}  # killed with the master, even by SIGKILL
            self._procs.append(subprocess.Popen(
                # One set of CPU spinners for the host: the master's (run.execute). A spinner is idle
                # priority only within its scheduling group (one group a session, with the kernel's
                # autogroups): each worker spinning beside the other processes' groups took CPU from
                # them, tens of ms of schedule lag. So the workers stay in the master's session (its
                # group) and start none of their own.
                [sys.executable, "-m", "loadgen", "worker", "--master-host", "127.0.0.1",
                 "--master-port", str(self.port), "--no-keep-awake", "--cluster-key-env", KEY_ENV_OF_LOCAL_WORKERS,
                 "--shared-filesystem"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                process_group=0,  # not the terminal's foreground group: Ctrl-C reaches the master only
            ))

    @property
    def local_pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def connected(self) -> list[str]:
        """Client ids of the connected workers (not missing; with a cluster key, those that proved it), by
        Locust's worker index."""
        self._expire_challenges()
        clients = self.runner.clients
        ids = [cid for cid in clients if clients[cid].state != STATE_MISSING and self.trusted(cid)]
        return sorted(ids, key=self.runner.get_worker_index)

    def wait_for_workers(self, count: int, max_wait_s: float | None = None) -> None:
        """Block until `count` workers are connected; LoadgenError when a local one died or time ran out."""
        deadline = None if max_wait_s is None else time.monotonic() + max_wait_s
        shown = -1
        while (have := len(self.connected())) < count:
            if have != shown:
                print(f"master: waiting for workers: {have} of {count} connected (port {self.port})",
                      file=sys.stderr, flush=True)
                shown = have
            for proc, log in zip(self._procs, self._logs, strict=True):
                if proc.poll() is not None:
                    log.seek(0)
                    said = log.read().decode(errors="replace").strip()[-2000:]
                    raise LoadgenError(f"a local worker exited ({proc.returncode}) before the run: {said}")
            if deadline is not None and time.monotonic() > deadline:
                raise LoadgenError(f"only {have} of {count} workers connected within {max_wait_s:g} s")
            gevent.sleep(_POLL_S)
        print(f"master: {have} workers connected", file=sys.stderr, flush=True)

    # -- runs -----------------------------------------------------------------------------------
    def run(self, scenario: Scenario, console: ConsoleState | None = None) -> RunResult:
        """One run of `scenario` on the connected workers (shown and stopped from `console`, when given)."""
        self._run = _DistributedRun(self, scenario, console)
        try:
            return self._run.execute()
        finally:
            self._run = None

    def _route(self, environment: Environment, msg: Any) -> None:
        if not self.trusted(msg.node_id):
            print(f"master: ignored a {msg.type} message from {msg.node_id!r}, which has not proved the cluster "
                  "key", file=sys.stderr, flush=True)
            return
        problem = message_problem(msg.type, msg.data)
        if problem is not None:
            print(f"master: ignored a bogus {msg.type} message from {msg.node_id!r}: {problem}", file=sys.stderr,
                  flush=True)
            return
        run = self._run
        if run is not None and msg.data["run"] == run.run_id:
            try:
                run.receive(msg.type, msg.node_id, msg.data)
            except Exception as exc:  # noqa: BLE001 - content that does not decode: the message is ignored
                print(f"master: ignored a bogus {msg.type} message from {msg.node_id!r}: {type(exc).__name__}: "
                      f"{exc}", file=sys.stderr, flush=True)

    def send(self, kind: str, data: dict[str, Any], client_id: str) -> None:
        self.runner.send_message(kind, data, client_id=client_id)

    def close(self, *, abandon: bool = False) -> None:
        """Tell every worker to quit (Locust's quit) and wait for the local ones to exit.

        `abandon`: the cluster never ran (set-up failed or was stopped): the local workers are also sent
        SIGTERM at once, since one still starting never hears the quit and would wait out its 10 s."""
        self.runner.quit()
        if abandon:
            for proc in self._procs:
                if proc.poll() is None:
                    proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(_ABANDON_WAIT_S if abandon else 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()
        self.runner.server.close(linger=0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_cluster(options: DistributedOptions) -> Cluster:
    """The master of `options`, its local workers started and every expected worker connected."""
    cluster = Cluster(options)
    try:
        where = socket.gethostname() if options.bind_host in ("*", "0.0.0.0") else options.bind_host
        if options.processes:
            cluster.spawn_local(options.processes)
        else:
            if cluster.key is None and options.bind_host not in _LOOPBACK:
                print(f"master: warning: no cluster key (--cluster-key-env VAR or --cluster-key-file F, the same "
                      f"on every worker): any host that reaches port {cluster.port} can join this run and be sent "
                      "its scenario", file=sys.stderr, flush=True)
            print(f"master: listening for workers on {options.bind_host}:{cluster.port} "
                  f"(loadgen worker --master-host {where} --master-port {cluster.port})",
                  file=sys.stderr, flush=True)
        stop = Event()
        handlers = [gevent.signal_handler(sig, stop.set) for sig in (signal.SIGINT, signal.SIGTERM)]
        try:
            waiter = gevent.spawn(cluster.wait_for_workers, options.wanted,
                                  options.max_wait_s if options.max_wait_s is not None
                                  else (60.0 if options.processes else None))
            gevent.wait([stop, waiter], count=1)
            if stop.is_set():
                waiter.kill()
                raise LoadgenError("stopped while waiting for workers")
            waiter.get()
        finally:
            for handler in handlers:
                handler.cancel()
    except BaseException:
        cluster.close(abandon=True)
        raise
    return cluster


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _DistributedRun:
    """One run on a cluster; also the RunView the master's /metrics reads (merged recorder), and the run a
    live console shows (its `stopping`, `done`, `generator_so_far`; no rate change)."""

    def __init__(self, cluster: Cluster, scenario: Scenario, console: ConsoleState | None = None) -> None:
        self.cluster = cluster
        self.console = console
        self.scenario = scenario
        self.pattern = scenario.pattern
        self.open_loop = isinstance(self.pattern, OpenLoop)
        self.run_id = uuid.uuid4().hex
        self.recorder: Recorder | None = None
        self.workers: dict[str, _Worker] = {}
        self.lost: list[dict[str, Any]] = []
        self.start_t = 0.0
        self._merger: IntervalMerger | None = None
        self._changed = Event()
        self._failures: list[str] = []
        self._target_failed = False
        self._profile = profile_of(self.pattern) if self.open_loop else None
        self._stopped_on_loss = False
        self._stopping = False  # STOP was sent: a worker's early DONE is then no departure
        self._joining: dict[str, _Worker] = {}  # connected mid-run, set up, not started yet
        self._seen: set[str] = set()  # every client id this run has dealt with
        self._epoch = 0.0  # the run's start instant, as an epoch time (START)
        self._next_index = 0  # the index (label) the next worker to join gets
        self.stopping = False
        """STOP was sent, or every worker is done: the console shows the run stopping."""
        self.done = Event()
        """Set once the run has ended (the console's state)."""
        self.rate_changes: list[dict[str, float]] = []  # none: the console cannot change a distributed rate
        self.share = None  # the whole schedule is the workers', in their shares

    # -- the live console -------------------------------------------------------------------------
    def change_rate(self, rate: float, at_s: float | None = None) -> float:
        raise ValueError("a distributed run's rate cannot be changed from the console yet: its workers send "
                         "their shares of the command line's schedule")

    def generator_so_far(self, master_cpu: float) -> SelfCheck:
        """The run's generator self-check as summary.json's will judge it, from what has arrived so far: the
        merged figures, each finished worker's own check, and the lost ones."""
        return combined_generator(
            [w.as_json(self.open_loop) for w in self.workers.values()],
            self.recorder.cumulative if self.recorder is not None else HistogramSet(),
            open_loop=self.open_loop,
            max_in_flight=self.pattern.max_in_flight if self.open_loop else None,
            max_lag_ms=self.scenario.output.max_lag_ms,
            master_cpu=master_cpu,
        )

    # -- RunView (the exporter) -------------------------------------------------------------------
    @property
    def metrics_host(self) -> str:
        return self.scenario.output.metrics_host

    @property
    def in_flight(self) -> int:
        return sum(int(w.health.get("in_flight", 0)) for w in self.workers.values() if w.sending)

    def offered_rps_now(self) -> float:
        if self._profile is None or self.recorder is None:
            return 0.0
        t = time.monotonic() - self.start_t
        return self._profile.rate_at(t) if 0.0 <= t < self.pattern.total_duration else 0.0

    def worker_health(self) -> list[WorkerHealth]:
        return [
            WorkerHealth(
                worker=w.label,
                host=str((w.ready or {}).get("host", "")),
                up=w.lost_at_s is None,
                lag_p99_s=float(w.health.get("lag_p99_ms", 0.0)) / 1000.0,
                dropped=int(w.health.get("dropped", 0)),
                cpu_ratio=float(w.health.get("cpu_ratio", 0.0)),
                in_flight=int(w.health.get("in_flight", 0)) if w.sending else 0,
            )
            for w in self.workers.values()
        ]

    # -- messages ---------------------------------------------------------------------------------
    def receive(self, kind: str, client_id: str, data: dict[str, Any]) -> None:
        worker = self.workers.get(client_id)
        if worker is None:
            joiner = self._joining.get(client_id)
            if joiner is not None and kind == MSG_READY:
                joiner.ready = data
            elif joiner is not None and kind == MSG_FAILED:
                del self._joining[client_id]
                print(f"master: worker {joiner.label} connected mid-run but cannot take part: "
                      f"{data.get('error')}", file=sys.stderr, flush=True)
            self._changed.set()
            return
        if kind == MSG_READY:
            worker.ready = data
        elif kind == MSG_FAILED:
            self._failures.append(f"worker {worker.label}: {data.get('error')}")
            self._target_failed = self._target_failed or data.get("kind") == "usage"
        elif kind == MSG_INTERVAL:
            self._interval(worker, data)
        elif kind == MSG_DONE and worker.done is None:
            if data.get("generator"):
                SelfCheck.from_json(data["generator"])  # one that does not decode: the message is ignored
            worker.done = data
            if data.get("error"):
                print(f"master: worker {worker.label} failed: {data['error']}", file=sys.stderr, flush=True)
            if self._merger is not None:
                self._merger.close(client_id)
                if data.get("interrupted") and not self._stopping:  # stopped on its own host mid-run
                    self._lose(worker, time.monotonic(), "it left (stopped on its host)", data.get("stopped_s"))
        self._changed.set()

    def _interval(self, worker: _Worker, data: dict[str, Any]) -> None:
        if self._merger is None or worker.lost_at_s is not None:
            return
        figures = HistogramSet.decode(data["figures"])
        start_s, end_s = float(data["start_s"]), float(data["end_s"])
        worker.figures.add(figures)
        worker.intervals += 1
        worker.last_report_s = max(worker.last_report_s, end_s)
        worker.health = {name: value for name, value in (data.get("health") or {}).items()
                         if isinstance(value, (int, float)) and not isinstance(value, bool)}
        self._merger.add(worker.client_id, start_s, end_s, figures)

    # -- the run ----------------------------------------------------------------------------------
    def execute(self) -> RunResult:
        cluster = self.cluster
        ids = cluster.connected()
        if not ids:
            raise LoadgenError("no worker is connected to the master")
        self.workers = {cid: _Worker(cid, i) for i, cid in enumerate(ids)}
        self._seen = set(ids)
        self._next_index = len(ids)
        stop = Event()  # from the set-up on: a SIGTERM while the workers warm up ends them too (Cluster.close)
        console = self.console

        def on_signal() -> None:
            stop.set()
            if console is not None:
                console.quit()  # as a single-process run under a console: the command ends once written

        handlers = [gevent.signal_handler(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)]
        if console is not None:
            console.attach(self, stop)  # its stop and quit set `stop`, as a signal does
        exporter = None
        try:
            self._setup(stop)
            exporter = self._start_exporter()
            cpu0, wall0 = _cpu_seconds(), time.monotonic()
            epoch = self._start()
            self._wait(stop)
            interrupted = (stop.is_set() or self._stopped_on_loss) and time.monotonic() < self.start_t + \
                self.pattern.total_duration
            end_t = time.monotonic()
        finally:
            self.stopping = True
            self.done.set()
            for handler in handlers:
                handler.cancel()
            if exporter is not None:
                exporter.stop()
        self._merger.flush()
        cpu = (_cpu_seconds() - cpu0) / max(end_t - wall0, 1e-9)
        return self._result(epoch, end_t, interrupted, cpu, exporter)

    def _setup(self, stop: Event) -> None:
        """SETUP every worker; wait until all are READY. A failure of any is the run's failure, and so is
        `stop` (a signal) set meanwhile."""
        scenario = self.scenario.model_dump(mode="json")
        n = len(self.workers)
        for worker in self.workers.values():
            seed = self.pattern.seed + worker.index
            self.cluster.send(MSG_SETUP, {"run": self.run_id, "scenario": scenario, "index": worker.index,
                                          "count": n, "seed": seed}, worker.client_id)
        deadline = time.monotonic() + self.scenario.target.connect_timeout + _SETUP_GRACE_S
        while True:
            self._drop_lost_before_start()
            pending = [w for w in self.workers.values() if w.ready is None]
            if self._failures or not pending or not self.workers:
                break
            if stop.is_set():
                self._failures.append("stopped while the workers were set up")
                break
            if time.monotonic() > deadline:
                self._failures.append(f"worker(s) {', '.join(w.label for w in pending)} not ready in time")
                break
            self._changed.clear()
            gevent.wait([self._changed, stop], count=1, timeout=_POLL_S)
        if self._failures or not self.workers:
            for worker in self.workers.values():
                self.cluster.send(MSG_STOP, {"run": self.run_id}, worker.client_id)
            message = "; ".join(self._failures) or "every worker was lost before the run started"
            raise (TargetError if self._target_failed else LoadgenError)(message)

    def _drop_lost_before_start(self) -> None:
        connected = set(self.cluster.connected())
        for cid in [cid for cid in self.workers if cid not in connected]:
            print(f"master: worker {self.workers[cid].label} left before the run started; "
                  "the run goes on without it", file=sys.stderr, flush=True)
            del self.workers[cid]

    def _start(self) -> float:
        """Give each worker its share and the start epoch; returns the epoch."""
        workers = list(self.workers.values())
        n = len(workers)
        users = split_users(self.pattern.users, n) if not self.open_loop else [0] * n
        for i, worker in enumerate(workers):
            worker.index = i
            worker.shares = [Share(i, n)] if self.open_loop else []
            worker.users = users[i]
        epoch = self._epoch = time.time() + START_LEAD_S
        self.start_t = monotonic_of_epoch(epoch)
        self.recorder = Recorder(self.start_t, self.scenario.output.interval,
                                 window_end_t=self.start_t + self.pattern.total_duration,
                                 streams=any((w.ready or {}).get("streams", False) for w in workers),
                                 goodput=self.scenario.goodput_rule, models=self.scenario.mix_names)
        self._merger = IntervalMerger(self.recorder, [w.client_id for w in workers])
        for worker in workers:
            share = worker.shares[0] if worker.shares else Share(0, 1)
            self.cluster.send(MSG_START, {"run": self.run_id, "start_epoch_s": epoch, "share": share.as_json(),
                                          "users": worker.users}, worker.client_id)
        described = ", ".join(f"{w.label}: {w.shares[0] if self.open_loop else f'{w.users} users'}"
                              for w in workers)
        print(f"master: run on {n} worker(s) ({described}) from epoch {epoch:.6f}", file=sys.stderr, flush=True)
        return epoch

    def _wait(self, stop: Event) -> None:
        """Until every worker is done or lost; STOP them all on a signal or a loss that stops the run."""
        end_t = self.start_t + self.pattern.total_duration
        deadline = end_t + self.scenario.target.timeout + _DONE_GRACE_S
        stop_sent_t: float | None = None
        while any(w.sending for w in self.workers.values()):
            self._check_losses()
            if stop_sent_t is None:
                self._check_joins()
            now = time.monotonic()
            if (stop.is_set() or self._stopped_on_loss) and stop_sent_t is None:
                stop_sent_t = now
                self._stopping = self.stopping = True
                for worker in self.workers.values():
                    if worker.sending:
                        self.cluster.send(MSG_STOP, {"run": self.run_id}, worker.client_id)
                deadline = min(deadline, now + _DONE_GRACE_S)
            if now > deadline:
                for worker in self.workers.values():
                    if worker.sending:
                        self._lose(worker, now, "did not finish in time")
                break
            self._changed.clear()
            gevent.wait([self._changed, stop], count=1, timeout=_POLL_S)
        for joiner in self._joining.values():  # set up, never started: let it go
            self.cluster.send(MSG_STOP, {"run": self.run_id}, joiner.client_id)
        self._joining.clear()

    def _check_joins(self) -> None:
        """Set up workers that connected mid-run; reshuffle the schedule over them once they are ready."""
        for cid in self.cluster.connected():
            if cid in self._seen:
                continue
            self._seen.add(cid)
            index, self._next_index = self._next_index, self._next_index + 1
            joiner = self._joining[cid] = _Worker(cid, index)
            print(f"master: worker {joiner.label} connected during the run; setting it up to take a share",
                  file=sys.stderr, flush=True)
            self.cluster.send(MSG_SETUP, {"run": self.run_id, "scenario": self.scenario.model_dump(mode="json"),
                                          "index": index, "count": index + 1,
                                          "seed": self.pattern.seed + index}, cid)
        connected = set(self.cluster.connected())
        for cid, joiner in list(self._joining.items()):
            if cid not in connected:
                del self._joining[cid]
            elif joiner.ready is not None:
                del self._joining[cid]
                self._join(joiner)

    def _join(self, joiner: _Worker) -> None:
        """Reshuffle the rest of the schedule (or the users) over the workers still sending and `joiner`,
        from a moment later; too late in the run, the joiner is let go until the next run."""
        from_s = time.monotonic() - self.start_t + RESHARE_LEAD_S
        if from_s >= self.pattern.total_duration:
            self.cluster.send(MSG_STOP, {"run": self.run_id}, joiner.client_id)
            print(f"master: worker {joiner.label} is ready too late in the run; it takes part from the next run",
                  file=sys.stderr, flush=True)
            return
        senders = [w for w in self.workers.values() if w.sending]
        if not self.open_loop:
            self._join_users(joiner, senders, from_s)
            return
        shares = Share.reshuffle(len(senders) + 1, from_s)
        for worker, share in zip(senders, shares, strict=False):
            worker.shares = [s.ended(from_s) for s in worker.shares if s.start_s < from_s] + [share]
            self.cluster.send(MSG_RESHARE, {"run": self.run_id, "from_s": from_s, "shares": [share.as_json()]},
                              worker.client_id)
        joiner.shares = [shares[-1]]
        self.workers[joiner.client_id] = joiner
        self._merger.join(joiner.client_id)
        self.cluster.send(MSG_START, {"run": self.run_id, "start_epoch_s": self._epoch,
                                      "share": shares[-1].as_json(), "users": 0}, joiner.client_id)
        described = ", ".join(f"{w.label}: {w.shares[-1]}" for w in (*senders, joiner))
        print(f"master: worker {joiner.label} joined; the schedule from {from_s:.2f} s is reshuffled ({described})",
              file=sys.stderr, flush=True)
        self._changed.set()

    def _join_users(self, joiner: _Worker, senders: list[_Worker], from_s: float) -> None:
        """Closed loop: the users spread over one more worker, as split_users would at the start. From
        `from_s` each sender lets its surplus go, each user once its request in flight is answered, and
        the joiner starts as many: the user count is kept (within one request per moved user)."""
        counts = split_users(sum(w.users for w in senders), len(senders) + 1)
        for worker, count in zip(senders, counts, strict=False):
            if count != worker.users:
                change = {"retire_users": worker.users - count} if count < worker.users \
                    else {"users": count - worker.users}
                self.cluster.send(MSG_TAKEOVER, {"run": self.run_id, "start_s": from_s, **change},
                                  worker.client_id)
                worker.users = count
        joiner.users = counts[-1]
        self.workers[joiner.client_id] = joiner
        self._merger.join(joiner.client_id)
        self.cluster.send(MSG_START, {"run": self.run_id, "start_epoch_s": self._epoch,
                                      "share": Share(0, 1).as_json(), "users": 0}, joiner.client_id)
        if joiner.users:
            self.cluster.send(MSG_TAKEOVER, {"run": self.run_id, "start_s": from_s, "users": joiner.users},
                              joiner.client_id)
        described = ", ".join(f"{w.label}: {w.users} users" for w in (*senders, joiner))
        print(f"master: worker {joiner.label} joined; from {from_s:.2f} s the users are spread again "
              f"({described})", file=sys.stderr, flush=True)
        self._changed.set()

    def _check_losses(self) -> None:
        clients = self.cluster.runner.clients
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if not worker.sending:
                continue
            node = clients.get(worker.client_id)
            if node is None:
                self._lose(worker, now, "it quit")
            elif node.state == STATE_MISSING:
                self._lose(worker, now, "its heartbeats stopped")

    def _lose(self, worker: _Worker, now: float, why: str, stopped_s: float | None = None) -> None:
        """Report `worker` lost; keep what it sent; stop the run or hand its load to the others.

        `stopped_s`: when a worker that left cleanly stopped dispatching; its arrivals from then to the
        takeover are nobody's, and the takers count them as unsent."""
        at_s = now - self.start_t
        worker.lost_at_s = round(at_s, 3)
        self._merger.close(worker.client_id)
        takers = [w for w in self.workers.values() if w.sending]
        record: dict[str, Any] = {
            "worker": worker.label,
            "host": (worker.ready or {}).get("host"),
            "pid": (worker.ready or {}).get("pid"),
            "lost_at_s": worker.lost_at_s,
            "why": why,
            "last_report_s": round(worker.last_report_s, 6),
            "requests_received": worker.figures.requests,
        }
        from_s = at_s + TAKEOVER_LEAD_S
        if self.open_loop:
            total = self.pattern.total_duration
            record["arrivals_after_last_report"] = sum(
                count_in(self.pattern, (s.k, s.n), max(s.start_s, worker.last_report_s),
                         min(from_s, total, total if s.end_s is None else s.end_s))
                for s in worker.shares)
        print(f"master: worker {worker.label} (host {record['host']}, pid {record['pid']}) lost {at_s:.1f} s "
              f"into the run ({why}); its {worker.figures.requests} requests reported up to "
              f"{worker.last_report_s:.1f} s are kept", file=sys.stderr, flush=True)
        if self.cluster.options.stop_on_worker_loss:
            self._stopped_on_loss = True
            record["then"] = "run stopped (--stop-on-worker-loss)"
        elif not takers or from_s >= self.pattern.total_duration:
            record["then"] = "nothing left to take over" if takers else "no worker left"
        else:
            record["then"] = self._take_over(worker, takers, from_s, stopped_s)
        self.lost.append(record)
        self._changed.set()

    def _take_over(self, lost: _Worker, takers: list[_Worker], from_s: float, stopped_s: float | None) -> str:
        if self.open_loop:
            parts = [share.split(len(takers), from_s) for share in lost.shares if share.sends_after(from_s)]
            gaps = [0] * len(takers)
            if stopped_s is not None:  # [stopped_s, from_s) of each share: counted unsent by its takers
                for share in lost.shares:
                    begin = max(share.start_s, stopped_s)
                    end = min(from_s, self.pattern.total_duration, from_s if share.end_s is None else share.end_s)
                    for j, piece in enumerate(share.split(len(takers), 0.0)):
                        gaps[j] += count_in(self.pattern, (piece.k, piece.n), begin, end) if begin < end else 0
            for j, taker in enumerate(takers):
                mine = [pieces[j] for pieces in parts]
                taker.shares += mine
                taker.taken_over += [f"{share} (from worker {lost.label})" for share in mine]
                self.cluster.send(MSG_TAKEOVER, {"run": self.run_id, "shares": [s.as_json() for s in mine],
                                                 "unsent": gaps[j]}, taker.client_id)
        else:
            for taker, users in zip(takers, split_users(lost.users, len(takers)), strict=True):
                if users:
                    taker.users += users
                    taker.taken_over.append(f"{users} users (from worker {lost.label})")
                    self.cluster.send(MSG_TAKEOVER, {"run": self.run_id, "users": users, "start_s": from_s},
                                      taker.client_id)
        who = ", ".join(t.label for t in takers)
        print(f"master: worker(s) {who} take over its load from {from_s:.2f} s", file=sys.stderr, flush=True)
        return f"taken over by worker(s) {who} from {from_s:.3f} s"

    def _start_exporter(self) -> MetricsExporter | None:
        port = self.scenario.output.metrics_port
        if port is None:
            return None
        exporter = MetricsExporter(self, port).start()
        exporter.announce()
        return exporter

    def _result(self, epoch: float, end_t: float, interrupted: bool, cpu: float,
                exporter: MetricsExporter | None) -> RunResult:
        pattern = self.pattern
        duration = min(end_t, self.start_t + pattern.total_duration) - self.start_t if interrupted \
            else pattern.total_duration
        workers = list(self.workers.values())
        entries = [w.as_json(self.open_loop) for w in workers]
        generator = combined_generator(
            entries,
            self.recorder.cumulative,
            open_loop=self.open_loop,
            max_in_flight=pattern.max_in_flight if self.open_loop else None,
            max_lag_ms=self.scenario.output.max_lag_ms,
            master_cpu=cpu,
        )
        ready = [w.ready or {} for w in workers]
        result = RunResult(
            scenario=self.scenario,
            recorder=self.recorder,
            duration_s=max(duration, 1e-9),
            offered_rps=_offered_rps(pattern, duration),
            generator=generator,
            interrupted=interrupted,
            in_flight_at_end=sum(int((w.done or {}).get("in_flight_at_end", 0)) for w in workers),
            start_epoch_s=epoch,
            warmup_requests=sum(int(r.get("warmup_requests", 0)) for r in ready),
            metadata=(ready[0].get("metadata") or {}) if ready else {},
            distributed={
                "workers": entries,
                "lost": self.lost,
                "stopped_on_worker_loss": self._stopped_on_loss,
                "master_port": self.cluster.port,
            },
        )
        result.metrics_port = exporter.port if exporter is not None else None
        return result


"""LoadContext: what the Locust user classes need for one run, passed through the Environment.

The context is attached as `environment.loadgen` (no module-level state), so the same user
classes serve a headless `loadgen run` and `locust -f loadgen/driver/locustfile.py` with its web
UI. It owns the protocol client and the recorder, forwards each Outcome to the recorder and to
Locust's `request` event (Locust's own stats and UI), and keeps the interval clock.

A client whose protocol streams (its ProtocolSpec's `streams`: openai) returns StreamOutcomes: `on_outcome` is
then `record_stream`, chosen once here, so other protocols pay nothing per request for it.

In a distributed run (loadgen/driver/worker.py) a worker's context sends one `share` of the open-loop
schedule, may take over more shares mid-run (`take_over`, a dispatcher each), may be told to leave its
shares from an instant on (`end_dispatching_at`, when the master reshuffles the schedule for a worker
that joined), and hands each closed interval to `on_interval`, which ships it to the master.

The open-loop rate can be changed mid-run (`change_rate`, the live console's control): the schedule is
re-planned from an instant T on (loadgen/patterns/schedule.py's replan), the dispatcher sending now ends
at T (the arrivals before it stay its own) and `run_open_loop` goes on with a new dispatcher over the new
schedule from T, so each arrival is sent, dropped or unsent exactly once. The ended dispatcher's
requests still in flight are counted in `in_flight` until they are answered.

A mix (a scenario's [[mix]]; its client a MixClient, loadgen/driver/mix.py) sends each request with the
client of the entry its arrival drew (loadgen/patterns/mix.py: an open-loop arrival by its index in the
schedule, or its trace row, and the scenario's seed; a closed-loop request by this process's request
count and seed) and records it into that entry's part of the recorder. A run without a mix goes
through none of this.

Every request goes through its client's send wrapped by `guarded_send` (loadgen/protocols/base.py): a
send that raises still yields the request's Outcome (kind client_error:<type>), so the dispatcher, a
closed-loop user and a mix entry each count every request they started, whatever the client does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import numpy as np
from gevent.event import Event

from loadgen.driver.dispatcher import Dispatcher
from loadgen.driver.mix import MixClient
from loadgen.outcome import CANCELLED, Outcome, StreamOutcome
from loadgen.patterns.mix import EntryChooser
from loadgen.patterns.schedule import arrivals, profile_of, replan, schedule
from loadgen.protocols import spec_of
from loadgen.protocols.base import Client, guarded_send
from loadgen.recorder import Recorder
from loadgen.scenario import ClosedLoop, OpenLoop, Scenario

__all__ = ["BACKSTOP_S", "LoadContext", "context_of"]

BACKSTOP_S = 1.0
"""An open-loop run ends with its schedule; this long after the window's end it ends regardless, and the
arrivals not started by then (a host stalled past it) are unsent."""


def _record(self: LoadContext | _Entry, outcome: Outcome) -> None:
    """Record one Outcome into `self.recorder` and Locust's stats (a context's, or a mix entry's)."""
    self.recorder.record(outcome.intended_t, outcome.sent_t, outcome.done_t, outcome.error)
    if outcome.scored:
        self.recorder.record_score(outcome.scored, outcome.correct, outcome.similarity_ppm)
    if self._fire is not None:
        self._fire(
            request_type="POST",
            name=self._name,
            response_time=(outcome.done_t - outcome.sent_t) * 1000.0,
            response_length=outcome.response_bytes,
            exception=_LocustError(outcome) if outcome.error else None,
            context=None,
        )


def _record_stream(self: LoadContext | _Entry, outcome: StreamOutcome) -> None:
    """_record for a streamed response: its token chunk instants and token count go along. A stream the
    client cancelled is no failure in Locust's stats either."""
    self.recorder.record_stream(
        outcome.intended_t, outcome.sent_t, outcome.done_t, outcome.error, outcome.token_times,
        outcome.output_tokens,
    )
    if self._fire is not None:
        self._fire(
            request_type="POST",
            name=self._name,
            response_time=(outcome.done_t - outcome.sent_t) * 1000.0,
            response_length=outcome.response_bytes,
            exception=_LocustError(outcome) if outcome.error and outcome.error != CANCELLED else None,
            context=None,
        )


class LoadContext:
    """One run's client, recorder, schedule and clocks."""

    def __init__(
        self,
        scenario: Scenario,
        client: Client | MixClient,
        environment: Any = None,
        *,
        share: tuple[int, int] = (0, 1),
        seed: int | None = None,
    ) -> None:
        self.scenario = scenario
        self.client = client
        self.environment = environment
        self.pattern: OpenLoop | ClosedLoop = scenario.pattern
        self.start_t = 0.0
        self.end_t = 0.0
        self.recorder: Recorder | None = None
        self.dispatcher: Dispatcher | None = None
        self.share = share
        """The arrivals of the open-loop schedule this process sends: (k, n) keeps every n-th from k."""
        self.share_start_s = 0.0
        """Seconds into the run from which `share` is sent (a worker that joined a run mid-way)."""
        self.handover_unsent = 0
        """Of the unsent arrivals, those a leaving worker left before the takeover (distributed runs)."""
        self.takeovers: list[Dispatcher] = []
        """Dispatchers of shares taken over mid-run from a lost worker (distributed runs)."""
        self.replaced: list[Dispatcher] = []
        """Dispatchers this process's share was sent by before a rate change (`change_rate`), oldest first."""
        self.rate_changes: list[dict[str, float]] = []
        """Each rate change of the run: {"at_s": seconds into the run, "rate": req/s}, in the order made."""
        self._replan_from: float | None = None  # the earliest instant re-planned, not yet dispatched from
        self.on_interval: Callable[[], None] | None = None
        """Called in the interval clock's greenlet after each interval is closed (a worker ships it)."""
        self.done = Event()  # dispatching is over (open loop) or the run was stopped
        self._finished = Event()
        self.stopping = False  # closed-loop users send nothing more once set
        self._retiring = 0  # closed-loop users to stop at their next request (a worker joined)
        self._user_requests = 0
        self._closed_sent = 0  # closed-loop requests of a mix so far: the index of the next one's draw
        self._ticker: gevent.Greenlet | None = None
        self.peak_in_flight = 0
        self.fd_note = ""
        """Why the open-file limit could not be raised to what the run needs ("": it was); see lowlevel/fdlimit.py."""
        self._rng = np.random.default_rng(self.pattern.seed if seed is None else seed)
        self._fire = environment.events.request.fire if environment is not None else None
        self._name = client.request_name
        self.streams = spec_of(scenario.target.protocol).streams
        """Outcomes carry token timings (StreamOutcome) and the recorder keeps TTFT, ITL and TPOT."""
        self.on_outcome = self.record_stream if self.streams else self.record
        """Where each Outcome of the run goes."""
        self._profile = profile_of(self.pattern) if isinstance(self.pattern, OpenLoop) else None
        self._sized = scenario.trace is not None and spec_of(scenario.target.protocol).sized
        """Each arrival is sent with its trace row (the client built a request per row)."""
        self.mix = client if isinstance(client, MixClient) else None
        """The entries' clients of a mix, None without one."""
        self._send = guarded_send(client.send, self.streams) if self.mix is None else None
        """The client's send, never raising (every request counted)."""
        self._mix_sends = [guarded_send(c.send, self.streams) for c in self.mix.clients] if self.mix else []
        self._entries: list[_Entry] = []
        if self.mix is not None:
            self._open_chooser = EntryChooser(self.mix.weights, self.pattern.seed, scenario.trace,
                                              scenario.mix_by_model)
            self._closed_chooser = EntryChooser(self.mix.weights, self.pattern.seed if seed is None else seed)

    # -- clocks ---------------------------------------------------------------------------------
    def begin(self, start_t: float | None = None) -> None:
        """Fix the run start (time.monotonic()) and create the recorder for the run window."""
        self.start_t = time.monotonic() if start_t is None else start_t
        self.end_t = self.start_t + self.pattern.total_duration
        self.recorder = Recorder(
            self.start_t, self.scenario.output.interval, window_end_t=self.end_t, streams=self.streams,
            goodput=self.scenario.goodput_rule, models=self.mix.names if self.mix is not None else (),
        )
        if self.mix is not None:
            self._entries = [_Entry(part, self._fire, client.request_name, self.streams)
                             for part, client in zip(self.recorder.parts, self.mix.clients, strict=True)]
        self._ticker = gevent.spawn(self._tick)

    def _tick(self) -> None:
        """Close an interval every `interval` seconds of run time until the run is finished.

        Closing takes about a millisecond; it is done in slices, and between two slices the loop
        polls for I/O (gevent.idle; gevent.sleep(0) would run ready greenlets only), so responses
        that arrive meanwhile are read on time.
        """
        step = self.scenario.output.interval
        k = 1
        while not self._finished.is_set():
            boundary = self.start_t + k * step
            self._finished.wait(max(0.0, boundary - time.monotonic()))
            if self._finished.is_set():
                return
            for _ in self.recorder.close_interval_steps(boundary):
                gevent.idle()
            if self.on_interval is not None:
                self.on_interval()
            k += 1

    def finish(self, end_t: float) -> None:
        """Stop the interval clock and close the last interval at `end_t`."""
        self._finished.set()
        if self._ticker is not None:
            self._ticker.join()  # an interval being closed is completed first
        self.recorder.finish(end_t)

    @property
    def offered_rps(self) -> float:
        if isinstance(self.pattern, OpenLoop):
            return profile_of(self.pattern).mean_rate
        return 0.0

    @property
    def metrics_host(self) -> str:
        return self.scenario.output.metrics_host

    def worker_health(self) -> None:
        """A single process: no workers (RunView)."""
        return

    def offered_rps_now(self) -> float:
        """The rate the open-loop schedule asks for at this instant; 0 outside the run or in closed loop."""
        if self._profile is None or self.recorder is None:
            return 0.0
        t = time.monotonic() - self.start_t
        return self._profile.rate_at(t) if 0.0 <= t < self.pattern.total_duration else 0.0

    # -- what the user classes call --------------------------------------------------------------
    record = _record  # the module's functions themselves (shared with mix entries): no call more per request
    record_stream = _record_stream

    def record_dropped(self, intended_t: float) -> None:
        self.recorder.record_dropped(intended_t)

    def record_unsent(self, count: int) -> None:
        self.recorder.record_unsent(count)

    def record_handover_unsent(self, count: int) -> None:
        """Arrivals of a worker that left, between its leaving and this process's takeover: unsent."""
        self.handover_unsent += count
        self.recorder.record_unsent(count)

    def _dispatcher(self) -> Dispatcher:
        pattern = self.pattern
        assert isinstance(pattern, OpenLoop)
        deadline = self.end_t + BACKSTOP_S
        if self.mix is not None:  # the mixed send records each outcome under its entry itself
            return Dispatcher(self._send_mixed, _recorded, self.record_dropped, pattern.max_in_flight,
                              on_unsent=self.record_unsent, deadline=deadline)
        return Dispatcher(self._send, self.on_outcome, self.record_dropped, pattern.max_in_flight,
                          on_unsent=self.record_unsent, deadline=deadline)

    def _send_mixed(self, intended_t: float, row: int) -> Outcome:
        """One open-loop request of a mix: to the entry its row (index or trace row) drew; recorded there."""
        i = self._open_chooser.entry_of(row)
        send = self._mix_sends[i]
        outcome = send(intended_t, row) if self._sized else send(intended_t)
        self._entries[i].on_outcome(outcome)
        return outcome

    def run_open_loop(self) -> None:
        """Dispatch the whole open-loop schedule (blocks until it ends or is stopped); after a rate change,
        the rest of it from the change's instant with a new dispatcher."""
        start_s = self.share_start_s
        while True:
            self.dispatcher = self._dispatcher()
            self.dispatcher.run(self.start_t, self._arrivals(self.share, start_s))
            if self._replan_from is None or self.dispatcher.stopped or self.stopping:
                return
            start_s, self._replan_from = self._replan_from, None
            self.replaced.append(self.dispatcher)

    def change_rate(self, rate: float, at_s: float | None = None) -> float:
        """Hold the open-loop rate at `rate` from `at_s` seconds into the run (None: now; not before now) to
        its end: arrivals before `at_s` stay as planned and are sent by the dispatcher sending now, those
        from it on by the next one (run_open_loop); returns `at_s`. Raises ValueError when the run cannot
        take it (closed loop, a trace, a distributed share, an instant past or outside the run, a rate <= 0)."""
        if not isinstance(self.pattern, OpenLoop) or self.dispatcher is None:
            raise ValueError("only an open-loop run that is dispatching can change its rate")
        if self.share != (0, 1) or self.takeovers:
            raise ValueError("a distributed run's rate cannot be changed yet")
        if self.stopping or self.dispatcher.stopped:
            raise ValueError("the run is stopping")
        now_s = time.monotonic() - self.start_t
        if at_s is None:
            at_s = now_s
        elif at_s < now_s:
            raise ValueError(f"the change's instant {at_s:.3f} s is past (the run is at {now_s:.3f} s)")
        pattern = replan(self.pattern, at_s, rate)
        self.dispatcher.end_at(self.start_t + at_s)
        self.pattern, self._profile = pattern, profile_of(pattern)
        self.scenario = self.scenario.model_copy(update={"pattern": pattern})
        self._replan_from = at_s if self._replan_from is None else min(self._replan_from, at_s)
        self.rate_changes.append({"at_s": at_s, "rate": rate})
        return at_s

    def take_over(self, share: tuple[int, int], start_s: float, end_s: float | None = None) -> Callable[[], None]:
        """A dispatcher for `share` of the schedule from `start_s` on (until `end_s`), beside this process's
        own share; its arrivals have their own in-flight cap of max_in_flight. It is registered at once, so
        a stop or an end_dispatching_at that comes before it runs reaches it; returns the call that
        dispatches (blocks until it ends or is stopped), to run in a greenlet of its own."""
        dispatcher = self._dispatcher()
        if end_s is not None:
            dispatcher.end_at(self.start_t + end_s)
        self.takeovers.append(dispatcher)
        arrivals = self._arrivals(share, start_s)
        return lambda: dispatcher.run(self.start_t, arrivals)

    def _arrivals(self, share: tuple[int, int], start_s: float) -> Iterator[Any]:
        """The share's chunks of the schedule: with each arrival's trace row when the client takes rows."""
        assert isinstance(self.pattern, OpenLoop)
        if self._sized or self.mix is not None:
            return arrivals(self.pattern, share=share, start_s=start_s)
        return schedule(self.pattern, share=share, start_s=start_s)

    def end_dispatching_at(self, end_s: float) -> None:
        """Leave every arrival from `end_s` seconds into the run on to other dispatchers: each share this
        process sends now stops there (a distributed run reshuffles its shares from that instant)."""
        for dispatcher in (self.dispatcher, *self.takeovers):
            if dispatcher is not None:
                dispatcher.end_at(self.start_t + end_s)

    def retire_users(self, count: int) -> None:
        """Let `count` closed-loop users go, each once its request in flight is answered (a worker that
        joined takes them): none is cut off mid-request, so every request sent is recorded."""
        self._retiring += count

    def user_retires(self) -> bool:
        """Called by a closed-loop user before each request: whether it is one of those to let go."""
        if self._retiring <= 0:
            return False
        self._retiring -= 1
        return True

    def stop_dispatching(self, at_t: float | None = None) -> None:
        """Start no further open-loop arrivals, of any share (in-flight requests go on); those due by
        `at_t` (default now) and not started are unsent."""
        at_t = time.monotonic() if at_t is None else at_t
        for dispatcher in (self.dispatcher, *self.takeovers):
            if dispatcher is not None:
                dispatcher.stop(at_t)

    @property
    def in_flight(self) -> int:
        if self.dispatcher is None:
            return self._user_requests
        return sum(d.in_flight for d in (self.dispatcher, *self.replaced, *self.takeovers))

    @property
    def peak_dispatched(self) -> int:
        """Open loop: the peak of requests in flight, from the dispatchers' own peaks: of those that replaced
        each other after rate changes the largest (an ended one's last requests may overlap the next one's
        first: then the true peak is a little higher), plus those of shares taken over, which run beside."""
        if self.dispatcher is None:
            return 0
        own = max(d.peak_in_flight for d in (self.dispatcher, *self.replaced))
        return own + sum(d.peak_in_flight for d in self.takeovers)

    def send_closed(self) -> None:
        """One closed-loop request: intended = now, since a closed loop has no schedule to keep."""
        self._user_requests += 1
        self.peak_in_flight = max(self.peak_in_flight, self._user_requests)
        try:
            if self.mix is None:
                self.on_outcome(self._send(time.monotonic()))
            else:
                self._send_closed_mixed()
        finally:
            self._user_requests -= 1

    def _send_closed_mixed(self) -> None:
        i = self._closed_chooser.entry_of(self._closed_sent)
        self._closed_sent += 1
        self._entries[i].on_outcome(self._mix_sends[i](time.monotonic()))

    def think(self) -> float:
        """Seconds a closed-loop user waits before its next request."""
        pattern = self.pattern
        assert isinstance(pattern, ClosedLoop)
        kind = pattern.think_kind
        if kind == "none":
            return 0.0
        if kind == "exponential":
            return float(self._rng.exponential(pattern.think_time))
        return pattern.think_time


def _recorded(outcome: Outcome) -> None:
    """The dispatcher's on_outcome in a mix: the mixed send has recorded the outcome under its entry."""


class _Entry:
    """Where a mix entry's outcomes go: its part of the recorder, and Locust's stats under its client's name."""

    record = _record
    record_stream = _record_stream

    def __init__(self, recorder: Recorder, fire: Callable[..., None] | None, name: str, streams: bool) -> None:
        self.recorder = recorder
        self._fire = fire
        self._name = name
        self.on_outcome = self.record_stream if streams else self.record


class _LocustError(Exception):
    """How a failed Outcome appears in Locust's failure table."""

    def __init__(self, outcome: Outcome | StreamOutcome) -> None:
        super().__init__(f"{outcome.error}: {outcome.message}"[:200])


def context_of(environment: Any) -> LoadContext:
    ctx = getattr(environment, "loadgen", None)
    if ctx is None:
        raise RuntimeError("no loadgen context on this Locust environment (run through `loadgen run`)")
    return ctx

"""The simulator's connections: the mock's (servers/openai_mock/_server.py), whose tokens go out when the
engine's steps end instead of at fixed delays.

`EngineClock` drives the clock-free Engine (engine.py) on time.monotonic(): a completion enters it at its
arrival, the step's end is called at `engine.step_end` by the PreciseScheduler, and each sequence that
emitted a token gets its chunk written there. The next step's end is scheduled from the engine's own
figure (start + duration), so a late wake-up delays the writes of that instant, never the steps after it.
"""

from __future__ import annotations

from collections.abc import Callable

from loadgen.lowlevel.precise_timer import PreciseScheduler
from servers.llm_sim.engine import Engine, Sequence
from servers.openai_mock._server import Answer, Job, MockProtocol, ServerContext


class EngineClock:
    """Runs an Engine on the real clock and hands each emitted token to its request's writer."""

    def __init__(self, engine: Engine, scheduler: PreciseScheduler) -> None:
        self.engine = engine
        self._scheduler = scheduler
        self._emitters: dict[int, Callable[[int], bool]] = {}

    def submit(self, seq: Sequence, emit: Callable[[int], bool]) -> None:
        """Queue `seq` at seq.arrival; `emit(k)` is called as its token k is generated, until it returns
        False (nothing more to write) or the last token."""
        self._emitters[seq.id] = emit
        if self.engine.arrive(seq):
            self._scheduler.call_at(self.engine.step_end, self._step_end)

    def _step_end(self) -> None:
        engine = self.engine
        emitted = engine.end_step()
        if engine.step_end is not None:  # before the writes, which may bring new arrivals
            self._scheduler.call_at(engine.step_end, self._step_end)
        emitters = self._emitters
        for seq in emitted:
            emit = emitters.pop(seq.id, None) if seq.done else emitters.get(seq.id)
            if emit is not None and not emit(seq.emitted - 1) and not seq.done:
                del emitters[seq.id]  # the client went away: the sequence runs on, unwritten


class SimProtocol(MockProtocol):
    """One HTTP/1.1 connection of the simulator: a completion's tokens are written as the engine emits them."""

    def __init__(self, context: ServerContext, clock: EngineClock) -> None:
        super().__init__(context)
        self._clock = clock

    def start_answer(self, job: Job, start_t: float) -> None:
        answer = Answer(self, job)
        answer.open()
        completion = answer.completion
        self._clock.submit(Sequence(completion.serial, start_t, completion.prompt_tokens, completion.tokens),
                           answer.emit)

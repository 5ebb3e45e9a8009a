"""The simulated LLM engine, without a clock: the rules of servers/llm_sim (see its docstring for them
and their formulas), fed arrival instants and asked for step ends.

The server (servers/llm_sim/_server.py) drives one Engine on the real clock: it calls `arrive` with
each request's arrival instant (time.monotonic()) and `end_step` at each `step_end`. Tests and
`simulate` drive it on made-up instants: the same rules give the same instants, so the timing a
server promises can be computed without running one.

Each request's record (`Sequence`) gets its admission, first-token and last-token instants as the
engine reaches them; finished ones stay in `finished` (the last `log_size`) for GET /sim/log.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["LOG_SIZE", "Engine", "EngineConfig", "Sequence", "batch_size", "saturation_rps", "simulate"]

LOG_SIZE = 1_000_000
"""Finished requests kept for GET /sim/log (about 150 bytes each)."""


@dataclass(frozen=True)
class EngineConfig:
    """The engine's capacity and timing: every instant the server promises follows from these."""

    max_batch: int = 32
    """Most sequences in one step."""
    prefill_ms_per_token: float = 0.1
    """A step's time per prompt token of the sequences it admits."""
    decode_ms: float = 12.0
    """A step's fixed time."""
    decode_ms_per_seq: float = 0.2
    """A step's time per sequence in it."""
    kv_tokens: int = 65536
    """KV budget: a running sequence holds prompt_tokens + max_tokens of it."""

    def problems(self) -> list[str]:
        """Every reason this config is invalid (named by field), empty when it is valid."""
        found = [f"{name} must be >= 1, got {getattr(self, name)}" for name in ("max_batch", "kv_tokens")
                 if getattr(self, name) < 1]
        for name in ("prefill_ms_per_token", "decode_ms", "decode_ms_per_seq"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                found.append(f"{name} must be a finite number >= 0, got {value}")
        if not found and self.step_s(1, 0) <= 0:
            found.append("decode_ms + decode_ms_per_seq must be > 0 (a step must take time)")
        return found

    def step_s(self, sequences: int, prefill_tokens: int) -> float:
        """Duration (s) of a step of `sequences` sequences that admits `prefill_tokens` prompt tokens."""
        return (self.decode_ms + self.decode_ms_per_seq * sequences
                + self.prefill_ms_per_token * prefill_tokens) / 1000.0


@dataclass(slots=True)
class Sequence:
    """One request in the engine, and its log record."""

    id: int
    arrival: float
    prompt_tokens: int
    max_tokens: int
    admitted: float | None = None
    """Start of the step that admitted (prefilled) it."""
    first_token: float | None = None
    last_token: float | None = None
    emitted: int = 0
    """Tokens generated so far; token k (0-based) is emitted when this becomes k + 1."""

    @property
    def kv_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens

    @property
    def done(self) -> bool:
        return self.emitted >= self.max_tokens

    def record(self) -> dict[str, Any]:
        """The GET /sim/log entry (instants in time.monotonic() seconds)."""
        return {"id": self.id, "arrival": self.arrival, "admitted": self.admitted,
                "first_token": self.first_token, "last_token": self.last_token,
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.emitted}


class Engine:
    """Iteration-level scheduling (vLLM's continuous batching) on instants given from outside.

    Example (clock-free):
        engine = Engine(EngineConfig(max_batch=4, decode_ms=10))
        engine.arrive(Sequence(1, 0.0, prompt_tokens=20, max_tokens=8))  # True: it started a step
        while engine.step_end is not None:
            emitted = engine.end_step()  # each sequence that got a token at the step's end
    """

    def __init__(self, config: EngineConfig, log_size: int = LOG_SIZE) -> None:
        problems = config.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kv_used = 0
        self.step_start: float | None = None
        self.step_end: float | None = None
        """End instant of the step under way; None while the engine is idle."""
        self.finished: deque[Sequence] = deque(maxlen=log_size)
        self.steps = 0
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.finished_total = 0
        self._clock = -math.inf  # the latest arrival or step boundary

    def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether a request fits the whole KV budget (else it could never run: refused at arrival)."""
        return prompt_tokens + max_tokens <= self.config.kv_tokens

    def arrive(self, seq: Sequence) -> bool:
        """Queue `seq` at seq.arrival; True when the engine was idle and this arrival started a step.

        Arrivals come in time order, none before a step boundary already reached. A request arriving
        while a step runs (even one begun at that very instant) waits for the next step.
        """
        if not self.fits(seq.prompt_tokens, seq.max_tokens):
            raise ValueError(f"request {seq.id}: {seq.kv_tokens} KV tokens exceed the budget of "
                             f"{self.config.kv_tokens}")
        if seq.arrival < self._clock:
            raise ValueError(f"request {seq.id} arrives at {seq.arrival}, before {self._clock}: "
                             "arrivals must come in time order")
        self._clock = seq.arrival
        self.waiting.append(seq)
        if self.step_end is not None:
            return False
        self._begin(seq.arrival)
        return True

    def end_step(self) -> list[Sequence]:
        """Reach the end of the step under way: every running sequence emits one token at step_end, the
        finished ones leave (their KV is freed), and the next step begins at once if anything runs or
        waits. Returns the sequences that emitted, in admission order."""
        end = self.step_end
        if end is None:
            raise RuntimeError("end_step while idle: no step is under way")
        emitted = self.running
        for seq in emitted:
            if seq.emitted == 0:
                seq.first_token = end
            seq.emitted += 1
            seq.last_token = end
        self.generated_tokens_total += len(emitted)
        self.running = [seq for seq in emitted if not seq.done]
        for seq in emitted:
            if seq.done:
                self.kv_used -= seq.kv_tokens
                self.finished.append(seq)
                self.finished_total += 1
        self._clock = max(self._clock, end)
        self._begin(end)
        return emitted

    def _begin(self, start: float) -> None:
        """Admit, in FIFO order, the waiting sequences that arrived by `start` while the batch and the KV
        budget hold them, and start a step at `start`; idle when nothing runs, or (nothing running,
        later arrivals waiting) start at the first of those arrivals instead."""
        config, waiting, running = self.config, self.waiting, self.running
        prefill = 0
        while (waiting and waiting[0].arrival <= start and len(running) < config.max_batch
               and self.kv_used + waiting[0].kv_tokens <= config.kv_tokens):
            seq = waiting.popleft()
            seq.admitted = start
            running.append(seq)
            self.kv_used += seq.kv_tokens
            prefill += seq.prompt_tokens
        if not running:
            self.step_start = self.step_end = None
            if waiting:  # arrived after `start` (read before a late step-end call): the first starts it
                self._begin(waiting[0].arrival)
            return
        self.steps += 1
        self.prompt_tokens_total += prefill
        self.step_start = start
        self.step_end = start + config.step_s(len(running), prefill)


def simulate(config: EngineConfig, arrivals: Iterable[tuple[float, int, int]]) -> list[Sequence]:
    """Run the engine over (arrival instant, prompt_tokens, max_tokens) in time order, to the end;
    returns every request's record, in arrival order (ids 0, 1, ...). A request arriving at the very
    instant a step ends is admitted by the next step."""
    engine = Engine(config, log_size=0)
    sequences = []
    for index, (t, prompt, tokens) in enumerate(arrivals):
        while engine.step_end is not None and engine.step_end < t:
            engine.end_step()
        seq = Sequence(index, t, prompt, tokens)
        sequences.append(seq)
        engine.arrive(seq)
    while engine.step_end is not None:
        engine.end_step()
    return sequences


def batch_size(config: EngineConfig, prompt_tokens: int, output_tokens: int) -> int:
    """Sequences of P + L tokens that run at once when the queue never empties:
    B = min(max_batch, floor(kv_tokens / (P + L)))."""
    return min(config.max_batch, config.kv_tokens // (prompt_tokens + output_tokens))


def saturation_rps(config: EngineConfig, prompt_tokens: int, output_tokens: int) -> float:
    """Requests/s the engine completes with a queue that never empties, every request P = prompt_tokens
    and L = output_tokens tokens.

    The batch stays full at B = min(max_batch, floor(kv_tokens / (P + L))) sequences; each request
    takes L steps, so on average B / L are admitted a step, and the mean step lasts
    decode_ms + decode_ms_per_seq * B + (B / L) * P * prefill_ms_per_token; B requests finish every L
    steps: B / (L * step) requests/s. 0 when one request does not fit the KV budget.
    """
    if prompt_tokens < 0 or output_tokens < 1:
        raise ValueError(f"need prompt_tokens >= 0 and output_tokens >= 1, got {prompt_tokens}, {output_tokens}")
    batch = batch_size(config, prompt_tokens, output_tokens)
    if batch == 0:
        return 0.0
    step_ms = (config.decode_ms + config.decode_ms_per_seq * batch
               + batch / output_tokens * prompt_tokens * config.prefill_ms_per_token)
    return batch / (output_tokens * step_ms / 1000.0)

"""Which [[mix]] entry each arrival goes to: fixed by the arrival's index and the seed, like its instant.

An entry is drawn for every arrival from its index in the whole schedule (an open loop's global index,
a closed loop's request count) and the seed: the draws come in blocks of BLOCK uniform numbers, block b
from a generator seeded with (seed, b), each mapped onto the entries' cumulative weights. So the draw of
an arrival depends on nothing else: n generators that each send one share of a schedule pick the same
entries as one generator sending it all, and a rerun with the same seed picks the same entries again.

A trace replay draws by row instead, except for the rows that name a model: a row whose model is an
entry's name (or the model of exactly one entry, Scenario.mix_by_model) goes to that entry.

Cost: a block is 4,096 draws made with numpy at once (~40 us); an arrival then costs a division and two
list indexings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from loadgen.patterns.trace import Trace

__all__ = ["BLOCK", "EntryChooser"]

BLOCK = 4096
"""Draws per block."""
_STREAM = 0x6D6978  # "mix": keeps these draws apart from the arrival process's, which uses the same seed
_KEPT = 4
"""Blocks kept: each dispatcher of a process (its share, shares taken over) walks its own indices."""


class EntryChooser:
    """The entry of each arrival, by index: `entry_of(i)`.

    >>> chooser = EntryChooser([3.0, 1.0], seed=1)
    >>> picks = [chooser.entry_of(i) for i in range(10_000)]
    >>> 0.73 < picks.count(0) / len(picks) < 0.77, picks[:100] == [EntryChooser([3.0, 1.0], 1).entry_of(i)
    ...                                                            for i in range(100)]
    (True, True)
    """

    def __init__(self, weights: Sequence[float], seed: int, trace: Trace | None = None,
                 by_model: dict[str, int] | None = None) -> None:
        cumulative = np.cumsum(np.asarray(weights, dtype=np.float64))
        self._bounds = cumulative / cumulative[-1]
        self._seed = seed
        self._blocks: dict[int, list[int]] = {}
        self._rows: list[int] | None = None
        if trace is not None:
            self._rows = self._trace_entries(trace, by_model or {})

    def entry_of(self, index: int) -> int:
        """The entry of the arrival at `index` (a trace replay: of the trace's row `index`)."""
        if self._rows is not None:
            return self._rows[index]
        block, at = divmod(index, BLOCK)
        draws = self._blocks.get(block)
        if draws is None:
            draws = self._block(block)
        return draws[at]

    def entries_of(self, indices: np.ndarray) -> np.ndarray:
        """entry_of for many indices at once (tests, counts)."""
        return np.array([self.entry_of(int(i)) for i in indices], dtype=np.int64)

    def _block(self, block: int) -> list[int]:
        uniform = np.random.default_rng([self._seed & 0xFFFFFFFFFFFFFFFF, _STREAM, block]).random(BLOCK)
        draws = np.minimum(np.searchsorted(self._bounds, uniform, side="right"), len(self._bounds) - 1).tolist()
        if len(self._blocks) >= _KEPT:
            del self._blocks[min(self._blocks)]
        self._blocks[block] = draws
        return draws

    def _trace_entries(self, trace: Trace, by_model: dict[str, int]) -> list[int]:
        rows = [self.entry_of_draw(i) for i in range(len(trace))]
        if trace.models is not None:
            for i, model in enumerate(trace.models):
                if model in by_model:
                    rows[i] = by_model[model]
        return rows

    def entry_of_draw(self, index: int) -> int:
        """The drawn entry of `index` (what entry_of gives without a trace)."""
        block, at = divmod(index, BLOCK)
        draws = self._blocks.get(block)
        return (draws if draws is not None else self._block(block))[at]

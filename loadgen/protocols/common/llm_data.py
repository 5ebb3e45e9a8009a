"""What an LLM load test sends: prompt datasets (ShareGPT, JSONL), token counting, and the rows of a pool.

The openai protocol builds its request bodies before the run from rows (`Row`): a prompt (text or chat
messages) or a size (`input_tokens`: a synthetic prompt of that many tokens is made for it), the
max_tokens asked for, and per-row body extras. Rows come from synthetic sizes (--input-tokens,
--max-tokens, or a trace's per-row sizes) or from a dataset file read here.

Datasets (`read_dataset`):
- ShareGPT JSON: a list of {"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}. The
  first human turn is the prompt; the gpt turn after it is the reference answer, whose token count
  is the row's output length (used as max_tokens when the caller asks, as vLLM's benchmark does). An
  entry whose conversation holds no human turn (the public ShareGPT dump has empty ones) is skipped
  and counted, as vLLM filters them; an entry that is not such an object is an error.
- JSONL: one {"prompt": "..."} or {"messages": [...]} a line, with an optional own "max_tokens"
  (or "output_tokens"); blank lines are skipped.
The format is told by content when not given: a file whose first non-blank character is `[` is
ShareGPT, any other is JSONL. Every bad entry is reported with the file and its line (a ScenarioError,
exit 2) before anything is sent.

Token counts (`TokenCounter`): with a Hugging Face tokenizer.json (the `tokenizers` package, extra
`llm`), the tokens of a text without special tokens or chat template, exactly as the tokenizer
encodes it (its own padding and truncation, which model exports often set, are turned off); without one, whitespace-separated words (an approximation: about one token per common
English word).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from loadgen.errors import ScenarioError

__all__ = ["MOONCAKE_BLOCK_TOKENS", "WORDS", "Dataset", "Row", "TokenCounter", "block_prompt", "exact_prompt",
           "read_dataset", "sample_rows", "synthetic_prompt"]

Prompt = str | list[Any]
"""A prompt text, or chat messages [{"role", "content"}, ...]."""

_MAX_PROBLEMS = 20
# Short common English words: real tokenizers give about one token for each (with its leading space).
WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "are", "with", "as", "at", "be", "this",
    "have", "from", "or", "one", "had", "by", "word", "but", "not", "what", "all", "were", "we", "when",
    "your", "can", "said", "there", "use", "an", "each", "which", "she", "do", "how", "their", "if", "will",
    "up", "other", "about", "out", "many", "then", "them", "these", "so", "some", "her", "would", "make",
    "like", "him", "into", "time", "has", "look", "two", "more", "write", "go", "see", "number", "no",
    "way", "could", "people", "my", "than", "first", "water", "been", "call", "who", "oil", "its", "now",
    "find", "long", "down", "day", "did", "get", "come", "made", "may", "part", "over", "new", "sound",
    "take", "only", "little", "work", "know", "place", "year", "live", "me", "back", "give", "most", "very",
    "after", "thing", "our", "just", "name", "good", "sentence", "man", "think", "say", "great", "where",
    "help", "through", "much", "before", "line", "right", "too", "mean", "old", "any", "same", "tell",
    "boy", "follow", "came",
)


class Row(NamedTuple):
    """One request of the pool, before it is made bytes.

    `prompt` is the text or messages sent; None asks for a synthetic prompt of `input_tokens` tokens.
    `max_tokens` None leaves the output length to the server. `extras` are added to the body as they
    are (a trace row's own fields).
    """

    prompt: Prompt | None
    input_tokens: int | None = None
    max_tokens: int | None = None
    extras: Mapping[str, Any] = {}


class TokenCounter:
    """Counts the tokens of a text: with a tokenizer.json when given (exact), else words (approximate).

    >>> TokenCounter().count("a few short words"), TokenCounter().exact
    (4, False)
    """

    def __init__(self, tokenizer: Any = None, path: str | None = None) -> None:
        self._tokenizer = tokenizer
        self.path = path
        self.exact = tokenizer is not None
        """True when counts come from a real tokenizer."""

    @classmethod
    def load(cls, path: str | None, where: str = "target.tokenizer") -> TokenCounter:
        """The counter of a tokenizer.json (None: words); ScenarioError (exit 2) when it does not load."""
        if path is None:
            return cls()
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ScenarioError([(f"{where}: reading {path} needs the `tokenizers` package "
                                 "(pip install 'loadgen[llm]')")], path) from None
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any reason it does not load is the same problem
            raise ScenarioError([(f"{where}: {path} is not a Hugging Face tokenizer.json that loads: "
                                 f"{str(exc)[:200] or type(exc).__name__}")], path) from None
        # A tokenizer.json saved for a model often pads and truncates to its context (MiniLM's: 128):
        # a count must be of the text itself.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return cls(tokenizer, str(path))

    def count(self, text: str) -> int:
        if self._tokenizer is None:
            return len(text.split())
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def count_prompt(self, prompt: Prompt) -> int:
        """Tokens of a prompt's text; of messages, the sum over their text contents (no chat template)."""
        if isinstance(prompt, str):
            return self.count(prompt)
        return sum(self.count(text) for text in _message_texts(prompt))

    @property
    def source(self) -> str:
        """How counts are made, as summary.json's token_counts says it."""
        return "tokenizer" if self.exact else "approximate (words)"


def _message_texts(messages: list[Any]) -> list[str]:
    texts = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]
    return texts


def synthetic_prompt(words: int, rng: np.random.Generator) -> str:
    """`words` common English words drawn at random: about one token each for real tokenizers."""
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), words))


MOONCAKE_BLOCK_TOKENS = 512
"""Tokens of one prefix block of a Mooncake trace (its hash_ids count blocks of this size)."""


def block_prompt(hash_ids: Sequence[int], tokens: int, seed: int, blocks: dict[int, list[str]]) -> str:
    """A prompt of `tokens` words made of one block of MOONCAKE_BLOCK_TOKENS words per hash id, in order,
    each block's words drawn from (seed, its id): rows sharing leading ids share that prefix word for word,
    as the requests of a Mooncake trace share cached KV blocks. Cut at `tokens`; filled past the last
    block with words of the last id's continuation. `blocks` caches the words of each id."""
    words: list[str] = []
    for block_id in hash_ids:
        if len(words) >= tokens:
            break
        if block_id not in blocks:
            rng = np.random.default_rng([seed, 7, block_id & 0xFFFFFFFF, (block_id >> 32) & 0xFFFFFFFF])
            blocks[block_id] = [WORDS[i] for i in rng.integers(0, len(WORDS), MOONCAKE_BLOCK_TOKENS)]
        words += blocks[block_id]
    if len(words) < tokens:
        rng = np.random.default_rng([seed, 8, len(hash_ids), tokens] + [i & 0xFFFFFFFF for i in hash_ids[-1:]])
        words += [WORDS[i] for i in rng.integers(0, len(WORDS), tokens - len(words))]
    return " ".join(words[:tokens])


def exact_prompt(counter: TokenCounter, tokens: int, rng: np.random.Generator) -> str:
    """A prompt of random common words that `counter` counts as exactly `tokens` tokens.

    Words are added or dropped at the end until the count is right; a tokenizer that cannot reach
    it with whole words (a word of several tokens straddling the target) gets its encoding cut at
    `tokens` and decoded. ScenarioError when even that does not count exactly.
    """
    if not counter.exact:
        return synthetic_prompt(tokens, rng)
    chosen = [WORDS[i] for i in rng.integers(0, len(WORDS), tokens)]
    for _ in range(16):
        count = counter.count(" ".join(chosen))
        if count == tokens:
            return " ".join(chosen)
        if count > tokens:
            del chosen[max(1, len(chosen) - (count - tokens)):]
        else:
            chosen += [WORDS[i] for i in rng.integers(0, len(WORDS), max(1, tokens - count))]
    tokenizer = counter._tokenizer
    ids = tokenizer.encode(" ".join(chosen * 2), add_special_tokens=False).ids[:tokens]
    text = tokenizer.decode(ids)
    if counter.count(text) != tokens:
        raise ScenarioError([(f"target.tokenizer: cannot build a prompt of exactly {tokens} tokens with "
                             f"{counter.path}")], str(counter.path))
    return text


# -- datasets -----------------------------------------------------------------------------------


@dataclass
class Dataset:
    """The prompts of a dataset file, in file order, with each one's own output length (or None)."""

    path: str
    format: str
    prompts: list[Prompt] = field(default_factory=list)
    output_tokens: list[int | None] = field(default_factory=list)
    """ShareGPT: the reference answer's tokens; JSONL: the line's own max_tokens/output_tokens."""
    skipped: int = 0
    """ShareGPT entries without a human turn, left out."""

    def describe(self) -> dict[str, Any]:
        return {"file": self.path, "format": self.format, "entries": len(self.prompts), "skipped": self.skipped}


def read_dataset(path: Path, fmt: str | None, endpoint: str, counter: TokenCounter,
                 where: str = "target.dataset") -> Dataset:
    """Every prompt of a ShareGPT or JSONL file (`fmt` None: told by content); ScenarioError (exit 2)
    listing each bad entry with its line. `endpoint` "chat" takes messages; the others need text."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError([f"{where}: cannot read {path}: {exc}"], str(path)) from None
    if fmt is None:
        fmt = "sharegpt" if text.lstrip()[:1] == "[" else "jsonl"
    dataset = Dataset(str(path), fmt)
    problems: list[str] = []
    entries = _sharegpt_entries(text) if fmt == "sharegpt" else _jsonl_entries(text)
    for line, entry in entries:
        if isinstance(entry, _BadJson):
            problems.append(f"{where}: {path} line {line}: {entry}")
            continue
        try:
            if fmt == "sharegpt":
                _add_sharegpt(dataset, entry, counter)
            else:
                prompt, own = _prompt_line(entry, endpoint)
                dataset.prompts.append(prompt)
                dataset.output_tokens.append(own)
        except (ValueError, TypeError) as exc:
            problems.append(f"{where}: {path} line {line}: {exc}")
            if len(problems) >= _MAX_PROBLEMS:
                break
    if not dataset.prompts and not problems:
        problems.append(f"{where}: {path} holds no prompts" + (
            f" ({dataset.skipped} conversations without a human turn)" if dataset.skipped else ""))
    if problems:
        raise ScenarioError(problems, str(path))
    return dataset


class _BadJson(str):
    """An entry that did not parse (its message)."""


def _jsonl_entries(text: str) -> list[tuple[int, Any]]:
    entries: list[tuple[int, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append((number, json.loads(line)))
        except ValueError as exc:
            entries.append((number, _BadJson(f"not JSON ({exc.msg} at column {exc.colno})")))
    return entries


def _sharegpt_entries(text: str) -> list[tuple[int, Any]]:
    """(line where each element starts, element) of a top-level JSON array, read element by element
    so that a bad one is named by its line."""
    decoder = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] != "[":
        return [(text.count("\n", 0, start) + 1, _BadJson("a ShareGPT file is a JSON list of conversations"))]
    entries: list[tuple[int, Any]] = []
    index = _skip_space(text, start + 1)
    if text[index:index + 1] == "]":
        return entries
    while True:
        line = text.count("\n", 0, index) + 1
        try:
            value, index = decoder.raw_decode(text, index)
        except ValueError as exc:
            return [*entries, (getattr(exc, "lineno", line), _BadJson(f"not JSON ({getattr(exc, 'msg', exc)})"))]
        entries.append((line, value))
        index = _skip_space(text, index)
        if text[index:index + 1] == ",":
            index = _skip_space(text, index + 1)
        elif text[index:index + 1] == "]":
            return entries
        else:
            where = text.count("\n", 0, index) + 1
            return [*entries, (where, _BadJson("expected ',' or ']' after a conversation"))]


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _add_sharegpt(dataset: Dataset, entry: Any, counter: TokenCounter) -> None:
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list):
        raise TypeError('expected an object with "conversations": [{"from", "value"}, ...]')
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise TypeError(f'conversations[{index}]: expected {{"from": ..., "value": "..."}}')
    human = next((i for i, turn in enumerate(turns) if turn.get("from") in ("human", "user")), None)
    if human is None:
        dataset.skipped += 1
        return
    prompt = turns[human]["value"]
    if not prompt.strip():
        raise ValueError(f"conversations[{human}]: the human turn is empty")
    answer = next((turn["value"] for turn in turns[human + 1:] if turn.get("from") in ("gpt", "assistant")), None)
    dataset.prompts.append(prompt)
    dataset.output_tokens.append(max(1, counter.count(answer)) if answer is not None else None)


def _prompt_line(entry: Any, endpoint: str) -> tuple[Prompt, int | None]:
    if not isinstance(entry, dict):
        raise TypeError('expected a JSON object with "prompt" or "messages"')
    own = None
    for name in ("max_tokens", "output_tokens"):
        value = entry.get(name)
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        own = value if own is None else own
    if isinstance(entry.get("prompt"), str):
        return entry["prompt"], own
    messages = entry.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) and "role" in m for m in messages):
        if endpoint != "chat":
            raise ValueError(f'"messages" needs the chat endpoint; the {endpoint} endpoint takes "prompt"')
        return messages, own
    raise ValueError('expected "prompt" (a string) or "messages" (a list of {"role", "content"} objects)')


def sample_rows(count: int, limit: int | None, rng: np.random.Generator) -> Sequence[int]:
    """Indices of the entries kept, in the order sent: a seeded shuffle of all of them, cut at `limit`."""
    order = rng.permutation(count)
    return order[:limit].tolist() if limit is not None else order.tolist()

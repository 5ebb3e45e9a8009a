"""The OpenAI-compatible mock: a streaming LLM endpoint whose TTFT and inter-token latency are declared.

It is the ground truth `loadgen run --protocol openai` is tested against (DESIGN.md, "Numbers must be
true"). Run it with `python -m servers.openai_mock --port 0 --ttft-ms 30 --itl-ms 10`; GET /mock
reports the declared timing and what it answered.
"""

from servers.openai_mock._app import MockConfig

__all__ = ["MockConfig"]

"""Routes and bodies of the LLM engine simulator: the mock's (servers/openai_mock/_app.py), with the
KV budget's refusal, GET/DELETE /sim/log and GET /metrics instead of GET /mock."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from servers.core.connection import max_connections_problems
from servers.core.http1 import json_body
from servers.llm_sim.engine import Engine, EngineConfig
from servers.openai_mock._app import Completion, MockApp, MockConfig, OpenAIError, Reply, wrong_method

DEFAULT_MODEL = "sim-llm"


@dataclass(frozen=True)
class SimConfig:
    """The simulated engine and what the server serves."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    max_tokens: int = 16
    """Tokens generated when the request gives no max_tokens."""
    max_connections: int | None = None
    """The most HTTP connections open at once (None: no cap); beyond it 503 in OpenAI's error shape."""

    def problems(self) -> list[str]:
        """Every reason this config is invalid, empty when it is valid."""
        found = self.engine.problems() + max_connections_problems(self.max_connections, "max_connections")
        if self.max_tokens < 1:
            found.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        elif self.max_tokens > self.engine.kv_tokens:
            found.append(f"max_tokens ({self.max_tokens}) must not exceed kv_tokens ({self.engine.kv_tokens})")
        if not self.models or not all(self.models):
            found.append("at least one non-empty model name is needed")
        return found

    def mock_config(self) -> MockConfig:
        """The mock's config for what the two share: models, default and largest max_tokens."""
        return MockConfig(max_tokens=self.max_tokens, max_tokens_limit=self.engine.kv_tokens, models=self.models)


class SimApp(MockApp):
    """The mock's routes and request checks, with the engine's KV refusal, its log and its metrics."""

    def __init__(self, config: SimConfig, engine: Engine, t0: float, pid: int) -> None:
        super().__init__(config.mock_config(), t0, pid)
        self.sim = config
        self.engine = engine
        listed = json.loads(self._models.body)
        for model in listed["data"]:
            model["max_model_len"] = engine.config.kv_tokens  # as vLLM lists it: the longest prompt + output
        self._models = Reply(200, json_body(listed))

    def get_routes(self) -> dict[str, Callable[[], Reply]]:
        routes = super().get_routes()
        del routes["/mock"]
        routes["/metrics"] = lambda: Reply(200, self.metrics().encode(), "text/plain; version=0.0.4")
        return routes

    def check_fits(self, prompt_tokens: int, tokens: int) -> None:
        if not self.engine.fits(prompt_tokens, tokens):
            kv = self.engine.config.kv_tokens
            raise OpenAIError(400, f"This model's maximum context length is {kv} tokens. However, you "
                              f"requested {prompt_tokens + tokens} tokens ({prompt_tokens} in the messages, "
                              f"{tokens} in the completion). Please reduce the length of the messages or "
                              "completion.", "messages", "context_length_exceeded")

    def _route(self, method: str, path: str, query: str, body: bytes) -> Reply | Completion:
        if path != "/sim/log":
            return super()._route(method, path, query, body)
        if method == "DELETE":
            return Reply(200, json_body({"cleared": self._clear_log()}))
        if method != "GET":
            return wrong_method(method, path, "GET or DELETE")
        reply = Reply(200, json_body(self.log()))
        if "clear=1" in query.split("&"):
            self._clear_log()
        return reply

    def _clear_log(self) -> int:
        cleared = len(self.engine.finished)
        self.engine.finished.clear()
        return cleared

    def log(self) -> dict[str, Any]:
        """GET /sim/log: the parameters, the clock, and every finished request still kept."""
        engine = self.engine
        return {"clock": "CLOCK_MONOTONIC", "t0": self.t0, "epoch_minus_monotonic_s": time.time() - time.monotonic(),
                "pid": self.pid, "params": {**asdict(self.sim.engine), "max_tokens": self.sim.max_tokens,
                                            "models": list(self.sim.models)},
                "finished_total": engine.finished_total, "running": len(engine.running),
                "waiting": len(engine.waiting), "log_size": engine.finished.maxlen,
                "requests": [seq.record() for seq in engine.finished]}

    def metrics(self) -> str:
        """GET /metrics: vLLM's names for the engine's state (Prometheus text format)."""
        engine = self.engine
        usage = engine.kv_used / engine.config.kv_tokens
        name = self.sim.models[0].replace("\\", "\\\\").replace('"', '\\"')
        label = f'{{model_name="{name}"}}'
        rows = (
            ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
             len(engine.running)),
            ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
             len(engine.waiting)),
            ("vllm:gpu_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", usage),
            ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", usage),
            ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
             engine.prompt_tokens_total),
            ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
             engine.generated_tokens_total),
            ("vllm:request_success_total", "counter", "Count of successfully processed requests.",
             engine.finished_total),
        )
        lines = []
        for name, kind, text, value in rows:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name}{label} {value}"]
        return "\n".join(lines) + "\n"

"""The LLM engine simulator: an OpenAI-compatible server whose capacity and timing follow exactly from
its parameters, as a continuous-batching engine (vLLM's iteration-level scheduling) would serve.

The OpenAI mock (servers/openai_mock) keeps one fixed TTFT and ITL whatever the load; real engines do
not: requests queue, share a batch, and a step slows with the sequences in it and the prompts it
prefills. This server is the known truth for what loadgen measures of that (TTFT, ITL, TPOT, goodput,
a sweep's saturation throughput). Run it with

    python -m servers.llm_sim --port 8000 --max-batch 32 --prefill-ms-per-token 0.1 --decode-ms 12 \\
        --decode-ms-per-seq 0.2 --kv-tokens 65536        # or: loadgen serve llm-sim ...

Engine model
------------
- Requests wait in one FIFO queue. A request of P prompt tokens (whitespace-separated words, as the
  mock counts them) and L = max_tokens (max_completion_tokens for chat; --max-tokens when absent)
  holds P + L KV tokens while it runs: reserved on admission, released when it finishes. A request
  with P + L > kv_tokens could never run: it is refused at arrival with OpenAI's 400 error
  (code "context_length_exceeded").
- Before each step, waiting requests are admitted in order (the first that does not fit blocks the
  ones behind it) while the batch has fewer than max_batch sequences and the KV budget holds them.
  Only requests that have arrived by the step's start are admitted.
- A step with n sequences, of which the newly admitted have p prompt tokens in all, lasts
      step = decode_ms + decode_ms_per_seq * n + prefill_ms_per_token * p
  At its end every running sequence emits one token; a newly admitted one emits its first token at
  the end of its admission step, so TTFT = queueing + that step. A sequence finishes after exactly
  L tokens (as with ignore_eos), releasing its KV; the next step starts at once.
- The engine is idle when nothing runs or waits; an arrival then starts a step at its arrival.
- One request alone on an idle engine: TTFT = decode_ms + decode_ms_per_seq + P * prefill_ms_per_token,
  then every ITL = decode_ms + decode_ms_per_seq.
- Saturation (a queue that never empties, every request P and L tokens): the batch stays full at
  B = min(max_batch, floor(kv_tokens / (P + L))); each request needs L steps, so on average B / L
  are admitted a step and a step lasts decode_ms + decode_ms_per_seq * B + (B / L) * P *
  prefill_ms_per_token; the engine completes B / (L * step) requests/s (`saturation_rps`).

Timing
------
The engine (servers/llm_sim/engine.py) knows no clock: it is fed arrival instants and gives step ends.
The server feeds it each request's arrival (time.monotonic() right after the request was parsed, or
when the one before it on the same connection ended) and calls its step end at that instant with a
precise timer (loadgen/lowlevel/precise_timer.py). A step's end is its start plus its duration on this
virtual clock, never pushed later by a late wake-up, so the instants are exactly what `simulate` gives
for the same arrivals. Each sequence's token chunk is written at its step's end. A request whose client
went away still runs to its end: the engine's timing never depends on the clients.

Routes: those of the mock (POST /v1/chat/completions and /v1/completions, streamed or not, GET
/v1/models, GET /health; malformed requests get OpenAI's error body and the connection keeps serving),
plus GET /sim/log (every finished request: id, arrival, admitted, first_token, last_token in
time.monotonic() seconds, the clock loadgen's own timestamps use on the same host, prompt_tokens,
output_tokens; and the parameters; `?clear=1` or DELETE empties it; the last 1,000,000 are kept) and
GET /metrics (vLLM's gauge names: vllm:num_requests_running, vllm:num_requests_waiting,
vllm:gpu_cache_usage_perc and vllm:kv_cache_usage_perc as a fraction of the KV budget in use).
"""

from servers.llm_sim._app import SimConfig
from servers.llm_sim.engine import Engine, EngineConfig, Sequence, saturation_rps, simulate

__all__ = ["Engine", "EngineConfig", "Sequence", "SimConfig", "saturation_rps", "simulate"]

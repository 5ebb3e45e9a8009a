"""The closed-loop peer of bench/generator_capacity.py: bare Locust FastHttpUser, no think time.

Each user posts one KServe v2 infer body and sends the next as soon as the answer arrives; only
Locust's own statistics record it. The body and model come from the environment, so that both
sides of the comparison send the same bytes:

    BENCH_MODEL=identity BENCH_BODY='{"inputs":[...]}' locust -f bench/locust_fasthttp.py \
        --headless -u 32 -r 32 -t 10s --host http://127.0.0.1:8000 --only-summary --csv out/peer
"""

from __future__ import annotations

import os

from locust import FastHttpUser, constant, task

_PATH = f"/v2/models/{os.environ.get('BENCH_MODEL', 'identity')}/infer"
_BODY = os.environ.get("BENCH_BODY", "").encode()
_HEADERS = {"Content-Type": "application/json"}


class InferUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def infer(self) -> None:
        self.client.post(_PATH, data=_BODY, headers=_HEADERS)

// The open-loop peer of bench/generator_capacity.py: k6's constant-arrival-rate executor posting
// one KServe v2 infer body at a fixed rate.
//
//   k6 run -e URL=http://127.0.0.1:8000/v2/models/identity/infer -e BODY='{"inputs":[...]}' \
//          -e RATE=5000 -e DURATION=10s -e PRE_VUS=200 -e MAX_VUS=1000 -e SUMMARY=out.json \
//          bench/k6_open_loop.js
//
// An arrival that finds no free VU is counted in dropped_iterations (k6's own health figure).
// k6 does not report how late an iteration started. With -e SCHEDULE_LAG=1 this script records it
// as schedule_lag_ms: Date.now() at the start of the iteration minus its instant on the schedule
// (scenario start plus index / rate). Date.now() counts whole milliseconds, so the figure is good
// to about 1 ms: it shows a k6 that fell behind its schedule, not sub-millisecond lag. It is off by
// default because the extra metric sample costs k6 capacity (measured on one core at 6,000/s:
// dropped_iterations went from 1,412 to 4,130).

import http from 'k6/http';
import exec from 'k6/execution';
import { Trend } from 'k6/metrics';

const RATE = Number(__ENV.RATE);
const URL = __ENV.URL;
const BODY = __ENV.BODY;
const PARAMS = { headers: { 'Content-Type': 'application/json' } };
const LAG = __ENV.SCHEDULE_LAG === '1';
const scheduleLag = new Trend('schedule_lag_ms');

export const options = {
  summaryTrendStats: ['p(50)', 'p(99)', 'max'],
  scenarios: {
    open_loop: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: __ENV.DURATION,
      preAllocatedVUs: Number(__ENV.PRE_VUS),
      maxVUs: Number(__ENV.MAX_VUS),
      gracefulStop: '2s',
    },
  },
};

export default function () {
  if (LAG) {
    const intended = exec.scenario.startTime + (exec.scenario.iterationInTest * 1000) / RATE;
    scheduleLag.add(Date.now() - intended);
  }
  http.post(URL, BODY, PARAMS);
}

export function handleSummary(data) {
  return { [__ENV.SUMMARY]: JSON.stringify(data) };
}

"""Helpers the test modules share; test modules import from here, never from one another.

- ports: ports outside the ephemeral range for servers a test must name before they start;
- processes: the repository ROOT, real server processes (start_server, stop_process, pin, finish) and `loadgen`
  run as a child process (run_loadgen, loadgen_cmd);
- timing: the ground truth's percentiles, and the host's own timer noise (cyclictest-like), by which the
  timing tests widen their tolerances up to a cap;
- fake_clock: a Clock for the open-loop dispatcher whose time moves only when it waits;
- triton, torchserve, distributed, perf_analyzer, tls: what the tests of one area share (sample inputs,
  a server started a particular way, the peer tool found or installed, a private CA).

Fixtures used by more than one module are defined in tests/conftest.py on top of these.
"""

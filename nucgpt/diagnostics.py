"""Where a run spends its time and where it hangs: device profiles of a few steps, stack traces.

`config.diagnostics.profile_steps` > 0 traces that many training steps (after `profile_skip_steps`
steps of this run: compilation and warm-up) with `jax.profiler` into `DIR/tensorboard`, process 0
only; TensorBoard's profile tab (the `tensorboard-plugin-profile` / xprof package) or xprof reads it.

`config.diagnostics.stack_traces` (cloud-tpu-diagnostics): `auto` collects on TPU only, `on`
everywhere, `off` never. While on, a fatal signal (SIGSEGV, SIGABRT, ...) prints every frame of the
main thread, and a snapshot goes to stderr every `stack_trace_interval_s` seconds, so a hung
collective shows in the log.
"""

import contextlib
import os
import signal
import threading
import time
from typing import Any, Iterator

import jax
from ml_collections import ConfigDict

from nucgpt.errors import UserError

MODES = ("auto", "on", "off")


def _enabled(diagnostics_cfg: ConfigDict) -> bool:
    mode = diagnostics_cfg.stack_traces
    if mode not in MODES:
        raise UserError(f"diagnostics.stack_traces must be one of {', '.join(MODES)}, got {mode!r}")
    interval_s = diagnostics_cfg.stack_trace_interval_s
    if not isinstance(interval_s, int) or interval_s < 1:
        raise UserError(f"diagnostics.stack_trace_interval_s must be a positive integer, got {interval_s!r}")
    return mode == "on" or (mode == "auto" and jax.default_backend() == "tpu")


@contextlib.contextmanager
def stack_traces(diagnostics_cfg: ConfigDict) -> Iterator[None]:
    """Collects stack traces inside the block when `diagnostics_cfg` enables it; else does nothing.

    The dumping itself is cloud-tpu-diagnostics'. Its `diagnose()` wrapper is not used: on exit it
    joins a thread that sleeps a whole interval (10 minutes by default), which would hold a
    finished or preempted run that long; the timer thread here stops at once.
    """
    if not _enabled(diagnostics_cfg):
        yield
        return
    try:
        from cloud_tpu_diagnostics import configuration
        from cloud_tpu_diagnostics.src import stack_trace
    except ImportError:
        raise UserError("diagnostics.stack_traces needs the cloud-tpu-diagnostics package") from None
    interval_s = diagnostics_cfg.stack_trace_interval_s
    trace_cfg = configuration.stack_trace_configuration.StackTraceConfig(
        collect_stack_trace=True, stack_trace_to_cloud=False, stack_trace_interval_seconds=interval_s
    )
    previous_handler = signal.getsignal(signal.SIGUSR1)
    stack_trace.enable_stack_trace_dumping(trace_cfg)
    stop = threading.Event()
    main_thread_id = threading.main_thread().ident

    def request_snapshots() -> None:
        while not stop.wait(interval_s):
            signal.pthread_kill(main_thread_id, signal.SIGUSR1)

    timer = threading.Thread(target=request_snapshots, name="stack-trace-snapshots", daemon=True)
    timer.start()
    try:
        yield
    finally:
        stop.set()
        timer.join()
        stack_trace.disable_stack_trace_dumping(trace_cfg)
        signal.signal(signal.SIGUSR1, previous_handler)


class StepProfiler:
    """Traces steps `skip + 1 … skip + count` of this run (counted from its first step, resumed or not).

    The loop calls `before_step(n)` before dispatching its n-th step and `after_step(n, outputs)`
    after; the trace stops once the last traced step's outputs are ready, so it holds whole steps.
    """

    def __init__(self, diagnostics_cfg: ConfigDict, trace_dir: str, enabled: bool = True):
        self.count = diagnostics_cfg.profile_steps
        self.first = diagnostics_cfg.profile_skip_steps + 1
        self.trace_dir = trace_dir
        self.enabled = enabled and self.count > 0
        self.active = False

    def before_step(self, run_step: int) -> None:
        if self.enabled and run_step == self.first:
            jax.profiler.start_trace(self.trace_dir)
            self.active, self.started = True, time.time()

    def after_step(self, run_step: int, outputs: Any) -> None:
        if self.active and run_step == self.first + self.count - 1:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        """Ends the trace (also when the run stops early); says where it went."""
        if not self.active:
            return
        jax.profiler.stop_trace()
        self.active = False
        if "://" in self.trace_dir:
            print(f"profile of {self.count} step(s) written under {self.trace_dir}/plugins/profile", flush=True)
            return
        written = sorted(
            (os.path.join(root, f) for root, _, files in os.walk(self.trace_dir) for f in files if f.endswith(".xplane.pb")),
            key=os.path.getmtime,
        )
        where = written[-1] if written and os.path.getmtime(written[-1]) >= self.started else self.trace_dir
        print(f"profile of {self.count} step(s) written: {where} (TensorBoard's profile tab, or xprof)", flush=True)

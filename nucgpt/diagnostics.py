"""Stack-trace collection (cloud-tpu-diagnostics): where each process was when a pod run hangs or dies.

`config.diagnostics.stack_traces`: `auto` collects on TPU only, `on` everywhere, `off` never. While
on, a fatal signal (SIGSEGV, SIGABRT, ...) prints every frame of the main thread, and a snapshot
goes to stderr every `stack_trace_interval_s` seconds, so a hung collective shows in the log.
"""

import contextlib
import signal
import threading
from typing import Iterator

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

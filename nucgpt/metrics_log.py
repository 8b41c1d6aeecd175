"""Where metrics go: TensorBoard event files (no TensorFlow), metrics.jsonl, and a console line.

Only process 0 writes; every other process gets a logger that does nothing. Non-finite values
become JSON null (and are skipped in TensorBoard) so the files stay valid.
"""

import json
import math
import os
import time
from typing import Mapping

from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

CONSOLE_KEYS = (
    ("loss", "loss {:.4f}"),
    ("bits_per_base", "{:.3f} bits/base"),
    ("accuracy", "acc {:.3f}"),
    ("eval_loss", "eval_loss {:.4f}"),
    ("eval_bits_per_base", "{:.3f} bits/base"),
    ("eval_loss_repeat", "repeat {:.4f}"),
    ("eval_loss_unique", "unique {:.4f}"),
    ("grad_norm", "|g| {:.3f}"),
    ("learning_rate", "lr {:.2e}"),
    ("tokens_per_sec", "{:,.0f} tok/s"),
    ("mfu", "mfu {:.1%}"),
)


def _step_of(line: str) -> int:
    """A metrics.jsonl line's step; a line cut short by a crash counts as after every step (dropped)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 2**63


def _is_eval(line: str) -> bool:
    return any(key.startswith("eval_") for key in json.loads(line))


def _finite(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsLogger:
    """`log(step, metrics)` → one TensorBoard scalar per key, one metrics.jsonl line, one console line."""

    def __init__(self, workdir: str, enabled: bool = True, start_step: int | None = None, evaluates_start: bool = False):
        """`start_step`: the step the run restarts from (its checkpoint's). What an earlier run logged
        after it was lost with that run: metrics.jsonl drops those lines, and TensorBoard is told
        to (a SessionLog.START event), so a resumed run does not log steps twice. `evaluates_start`:
        this run evaluates at start_step again (eval_only, or a finished run rerun), so an earlier
        eval line at that step goes too."""
        self.enabled = enabled
        self._eval_steps: set[int] = set()
        if not enabled:
            return
        self.jsonl_path = epath.Path(workdir) / "metrics.jsonl"
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = EventFileWriter(os.path.join(workdir, "tensorboard"))
        if start_step is not None:
            self._forget_after(start_step, evaluates_start)

    def _forget_after(self, step: int, evaluates_start: bool) -> None:
        kept = []
        if self.jsonl_path.exists():
            lines = self.jsonl_path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if (logged := _step_of(line)) < step
                    or logged == step and not (evaluates_start and _is_eval(line))]
            if len(kept) < len(lines):
                partial = self.jsonl_path.with_name(self.jsonl_path.name + ".tmp")
                partial.write_text("".join(kept))
                partial.replace(self.jsonl_path)
        # TensorBoard drops every point at or after a START event's step. Evaluating `step` again, the
        # purge starts at `step` (its old eval point goes) and the train line kept there is written back.
        purge_from = step if evaluates_start else step + 1
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=purge_from, session_log=start))
        for line in kept:
            if _step_of(line) >= purge_from:
                self._write_event(json.loads(line))
        self._eval_steps = {_step_of(line) for line in kept if _is_eval(line)}

    def has_eval_at(self, step: int) -> bool:
        """Whether metrics.jsonl (as kept at start-up) holds an eval line for `step`."""
        return step in self._eval_steps

    def _write_event(self, line: Mapping) -> None:
        values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in line.items() if k != "step" and v is not None]
        self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(line["step"]), summary=summary_pb2.Summary(value=values)))

    def log(self, step: int, metrics: Mapping[str, float | None], console: bool = True) -> None:
        if not self.enabled:
            return
        line = {"step": int(step), **{k: _finite(v) for k, v in metrics.items()}}
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        self._write_event(line)
        self._tb.flush()
        if console:
            parts = [fmt.format(line[k]) for k, fmt in CONSOLE_KEYS if line.get(k) is not None]
            print(f"step {step:>7d} | " + " | ".join(parts), flush=True)

    def close(self) -> None:
        if self.enabled:
            self._tb.close()

"""TensorBoard files hold the scalars; metrics.jsonl holds the same values, null where unknown."""
import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nucgpt.metrics_log import MetricsLogger


def test_scalars_reach_tensorboard_and_jsonl(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path))
    logger.log(10, {"loss": 1.25, "tokens_per_sec": 1000.0, "mfu": None})
    logger.log(20, {"eval_loss": 1.0, "eval_loss_repeat": 1.1, "eval_loss_unique": float("nan")})
    logger.close()

    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 10, "loss": 1.25, "tokens_per_sec": 1000.0, "mfu": None}
    assert lines[1]["eval_loss_unique"] is None and lines[1]["step"] == 20

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "tokens_per_sec", "eval_loss", "eval_loss_repeat"}
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(10, 1.25)]
    assert "step      10 | loss 1.2500" in capsys.readouterr().out


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(str(tmp_path / "w"), enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "w").exists()

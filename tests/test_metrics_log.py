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


def test_a_restarted_run_forgets_what_came_after_its_checkpoint(tmp_path, capsys):
    first = MetricsLogger(str(tmp_path))
    for step in (10, 20, 30):
        first.log(step, {"loss": float(step)})
    first.log(20, {"eval_loss": 2.0})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "lo')  # cut short by the crash
    resumed = MetricsLogger(str(tmp_path), start_step=20)  # resumed from checkpoint 20: steps 30, 40 are redone
    resumed.log(30, {"loss": 3.5})
    resumed.close()
    steps = [(l["step"], sorted(l)) for l in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert steps == [(10, ["loss", "step"]), (20, ["loss", "step"]), (20, ["eval_loss", "step"]), (30, ["loss", "step"])]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(10, 10.0), (20, 20.0), (30, 3.5)]  # 30.0 purged

    final = MetricsLogger(str(tmp_path))  # the finished run's final eval
    final.log(30, {"eval_loss": 9.9})
    final.close()
    again = MetricsLogger(str(tmp_path), start_step=30, evaluates_start=True)  # a finished run, rerun: evaluates 30 again
    again.log(30, {"eval_loss": 1.5})
    again.close()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l for l in lines if l["step"] == 30] == [{"step": 30, "loss": 3.5}, {"step": 30, "eval_loss": 1.5}]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()  # the step's earlier eval point is purged in TensorBoard too; its train point stays
    assert [(e.step, e.value) for e in events.Scalars("eval_loss")] == [(20, 2.0), (30, 1.5)]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(10, 10.0), (20, 20.0), (30, 3.5)]


def test_the_logger_knows_which_steps_were_evaluated(tmp_path):
    first = MetricsLogger(str(tmp_path))
    first.log(10, {"loss": 1.0})
    first.log(10, {"eval_loss": 1.0})
    first.log(20, {"loss": 1.0})
    first.close()
    resumed = MetricsLogger(str(tmp_path), start_step=20)
    assert resumed.has_eval_at(10) and not resumed.has_eval_at(20)
    resumed.close()

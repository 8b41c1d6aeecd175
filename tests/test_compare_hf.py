"""benchmarks.compare_hf on CPU: the peer's record has the fields benchmarks.mfu prints, its MFU uses
our FLOPs per token over an explicit peak, and its LLaMA has our matmul parameter count.

Run in subprocesses: the tool defines absl flags that benchmarks.mfu (another test file, maybe the
same worker) defines too."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report

pytest.importorskip("torch", reason="torch is an optional test dependency (.ci/run installs it)")
pytest.importorskip("transformers", reason="transformers is an optional test dependency")

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO))
TINY = ["--config.model.num_layers=1", "--config.model.d_model=64", "--config.model.mlp_dim=384",
        "--config.train.seq_len=32", "--config.train.global_batch_size=4"]


def test_eager_peer_on_cpu_prints_the_mfu_tools_fields(tmp_path):
    json_out = tmp_path / "hf.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare_hf", "--config", "configs/pretrain.py:demo", *TINY,
         "--mode", "eager", "--steps", "2", "--warmup", "1", "--peak_tflops=0.5", "--json_out", str(json_out)],
        cwd=REPO, capture_output=True, text=True, timeout=240, env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record,) = [json.loads(line) for line in json_out.read_text().splitlines()]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == record
    for key in report.RECORD_KEYS:
        assert key in record, key
    assert (record["tool"], record["variant"], record["device_kind"]) == ("compare_hf", "hf_eager", "cpu")
    assert (record["global_batch"], record["seq_len"], record["num_devices"]) == (4, 32, 1)
    assert record["intermediate_size"] == 256  # 2/3 of the GeLU MLP's 384: the same matmul parameters
    assert record["matmul_params"] == record["nucgpt_matmul_params"]
    assert record["tokens_per_sec"] == pytest.approx(4 * 32 / record["step_time_s"]["median"])
    assert record["tflops_per_device"] == pytest.approx(record["tokens_per_sec"] * record["flops_per_token"] / 1e12)
    assert record["mfu"] == pytest.approx(record["tflops_per_device"] / 0.5)


def test_the_peer_of_each_500m_preset_has_its_matmul_parameters():
    """Built on torch's meta device (no memory): exact for llama_500m, within 1% for the GeLU preset."""
    script = """
import json, torch
from configs import pretrain
from benchmarks import compare_hf
from nucgpt import flops
for preset in ("llama_500m", "nucleotide_gpt_500m"):
    cfg = pretrain.get_config(preset)
    with torch.device("meta"):
        model = compare_hf.build_llama(cfg.model, cfg.train.seq_len)
    print(json.dumps([preset, compare_hf.matmul_params(model), flops.matmul_params(cfg.model)]))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = {preset: (hf, ours) for preset, hf, ours in map(json.loads, proc.stdout.splitlines())}
    hf, ours = counts["llama_500m"]
    assert hf == ours
    hf, ours = counts["nucleotide_gpt_500m"]
    assert ours == pytest.approx(503.3e6, rel=1e-3)
    assert hf == pytest.approx(ours, rel=0.01)

"""The fine-tuning protocol of the closing note, through the real trainer CLI; one JSON line per run.

For each Genomic Benchmarks table (a seeded 80/20 stratified split of one file):
  (a) the Genomic Benchmarks CNN baseline,
  (b) a small nucgpt from scratch,
  (c) the same small nucgpt pretrained first on the shared genomes, then fine-tuned.
The pretraining (prepare → pretrain) runs once and is reused. Every run is the command a user
would type; the printed line carries it, its wall time and the test metrics from results.json.

    python benchmarks/finetune_gb.py --out /tmp/gb
"""

import json
import math
import pathlib
import shlex
import subprocess
import sys
import time

from absl import app, flags

from nucgpt.errors import parse_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"
GENOMES = ("hg38_chr1_telomeric_90kb.fa", "hg19_chr10_1-110000.fa", "human_peaks_pseudo_genome_1.6mb.fa")
DATASETS = ("human_nontata_promoters", "human_ensembl_regulatory_subsample")
VARIANTS = ("cnn", "scratch", "pretrained")

_OUT = flags.DEFINE_string("out", "/tmp/nucgpt_finetune_gb", "Folder for the prepared genome and every workdir.")
_DATASETS = flags.DEFINE_list("datasets", list(DATASETS), "Tables under shared/data/genomic_benchmarks (no .tsv).")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Which of cnn, scratch, pretrained to run.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 300, "Pretraining steps of the small nucgpt.", lower_bound=1)
_PRETRAIN_SEQ_LEN = flags.DEFINE_integer("pretrain_seq_len", 1024, "Pretraining window (covers every fine-tuning length).", lower_bound=1)
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 200, "Fine-tuning steps of every run.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch size of every fine-tuning run.", lower_bound=1)
_MODEL = flags.DEFINE_string(
    "model", "d_model=64,num_layers=2,num_heads=4,num_kv_heads=4,head_dim=16,mlp_dim=256",
    "The small nucgpt, as model.<field>=<value> overrides shared by pretraining and fine-tuning.",
)


def model_overrides() -> list[str]:
    return [f"--config.model.{kv}" for kv in _MODEL.value.split(",")]


def run(command: list[str], log: pathlib.Path) -> float:
    """Runs one CLI command with its output in `log`; fails loudly with the log's tail."""
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"command failed ({code}): {shlex.join(command)}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def pretrain(out: pathlib.Path) -> pathlib.Path:
    prepared, workdir = out / f"genomes_{_PRETRAIN_SEQ_LEN.value}", out / "pretrain"
    python = sys.executable
    if not (prepared / "manifest.json").exists():
        run([python, "-m", "nucgpt.data.prepare", "--fasta", ",".join(str(SHARED / "genomes" / g) for g in GENOMES),
             "--out", str(prepared), f"--window={_PRETRAIN_SEQ_LEN.value}", "--valid_chroms=chr10", "--progress=false"],
            out / "prepare.log")
    command = [
        python, "-m", "nucgpt.train", "--config", "configs/pretrain.py:demo", "--workdir", str(workdir),
        f"--config.data.path={prepared}", "--config.data.synthetic_bp=0", f"--config.train.steps={_PRETRAIN_STEPS.value}",
        f"--config.train.seq_len={_PRETRAIN_SEQ_LEN.value}", "--config.train.global_batch_size=8",
        f"--config.train.eval_every={_PRETRAIN_STEPS.value}", "--config.train.eval_steps=4",
        f"--config.checkpoint.every={_PRETRAIN_STEPS.value}", *model_overrides(),
    ]
    seconds = run(command, out / "pretrain.log")
    last = json.loads((workdir / "metrics.jsonl").read_text().strip().splitlines()[-1])
    print(json.dumps({"run": "pretrain", "seconds": round(seconds, 1), "eval_loss": last.get("eval_loss"),
                      "eval_bits_per_base": last.get("eval_bits_per_base"), "command": shlex.join(command)}), flush=True)
    return workdir


def seq_len_for(table: pathlib.Path) -> int:
    longest = max(len(line.split("\t", 1)[0]) for line in table.read_text().splitlines()[1:] if line)
    return max(64, 2 ** math.ceil(math.log2(longest)))


def finetune(out: pathlib.Path, dataset: str, variant: str, pretrained: pathlib.Path | None) -> None:
    table = SHARED / "genomic_benchmarks" / f"{dataset}.tsv"
    workdir = out / dataset / variant
    preset = "cnn_demo" if variant == "cnn" else "demo"
    command = [
        sys.executable, "-m", "nucgpt.train", "--config", f"configs/finetune.py:{preset}", "--workdir", str(workdir),
        f"--config.data.path={table}", "--config.classify.test_fraction=0.2", "--config.classify.split_seed=0",
        f"--config.train.steps={_FINETUNE_STEPS.value}", f"--config.train.global_batch_size={_BATCH.value}",
        f"--config.train.seq_len={seq_len_for(table)}", f"--config.train.eval_every={_FINETUNE_STEPS.value}",
        f"--config.checkpoint.every={_FINETUNE_STEPS.value}",
    ]
    if variant != "cnn":
        command += model_overrides()
    if variant == "pretrained":
        command.append(f"--config.init_from={pretrained}")
    seconds = run(command, out / f"{dataset}_{variant}.log")
    results = json.loads((workdir / "results.json").read_text())
    print(json.dumps({
        "dataset": dataset, "variant": variant, "seconds": round(seconds, 1),
        **{k: results[k] for k in ("accuracy", "mcc", "f1_macro", "f1_weighted", "num_test", "num_train", "split_seed", "confusion_matrix")},
        "command": shlex.join(command),
    }), flush=True)


def main(argv) -> None:
    del argv
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    pretrained = pretrain(out) if "pretrained" in _VARIANTS.value else None
    for dataset in _DATASETS.value:
        for variant in _VARIANTS.value:
            finetune(out, dataset, variant, pretrained)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

"""End-to-end speed and peak memory of `nucgpt.data.prepare` on a gzip FASTA: one JSON line.

    python -m benchmarks.data_prepare                      # 200 Mbp synthetic genome, 3 runs
    python -m benchmarks.data_prepare --fasta hg38.fa.gz --runs 1

Each run is a fresh `python -m nucgpt.data.prepare` process (start-up, reading, gunzip, windowing,
ArrayRecord writing, manifest, rename: what a user waits for); Mbp/s = input bases ÷ wall time.
Peak RSS and CPU seconds are the child's own (`wait4`); Mbp per CPU-second is the figure to
compare on a shared, loaded machine, where wall time depends on the neighbours. Without --fasta a
synthetic genome of --bp bases is generated once into the temp folder (not timed) and reused.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from absl import app, flags

from nucgpt.data import synthetic
from nucgpt.errors import parse_flags

flags.DEFINE_string("fasta", "", "input FASTA (default: a generated synthetic genome of --bp bases)")
flags.DEFINE_integer("bp", 200_000_000, "size of the generated genome", lower_bound=1)
flags.DEFINE_integer("runs", 3, "timed runs; the median is reported", lower_bound=1)
flags.DEFINE_integer("window", 8192, "prepare --window", lower_bound=1)
FLAGS = flags.FLAGS


def _run_prepare(fasta: str, out: str) -> tuple[float, float, float, int]:
    """(wall seconds, CPU seconds, peak RSS MiB, input bp) of one prepare process."""
    command = [sys.executable, "-m", "nucgpt.data.prepare", f"--fasta={fasta}", f"--out={out}",
               f"--window={FLAGS.window}", "--overwrite", "--noprogress"]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": os.getcwd()})
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"prepare failed with exit code {child.returncode}")
    with open(os.path.join(out, "manifest.json")) as f:
        bp = sum(c["bp"] for c in json.load(f)["chromosomes"].values())
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, bp


def main(argv: Sequence[str]) -> None:
    del argv
    fasta = FLAGS.fasta or os.path.join(tempfile.gettempdir(), f"nucgpt_bench_{FLAGS.bp}.fa.gz")
    if not os.path.exists(fasta):
        partial = fasta.replace(".fa.gz", ".part.fa.gz")  # renamed when complete; keeps the .gz suffix
        synthetic.write_genome(partial, bp=FLAGS.bp, seed=0, num_chroms=8, overwrite=True)
        os.rename(partial, fasta)
    out = tempfile.mkdtemp(prefix="nucgpt_bench_prepare_")
    try:
        results = [_run_prepare(fasta, os.path.join(out, "ds")) for _ in range(FLAGS.runs)]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    bp = results[0][3]
    rates = [bp / 1e6 / seconds for seconds, _, _, _ in results]
    cpu_rates = [bp / 1e6 / cpu for _, cpu, _, _ in results]
    print(json.dumps(dict(
        benchmark="data_prepare", fasta=fasta, fasta_bytes=os.path.getsize(fasta), bp=bp, window=FLAGS.window,
        mbp_per_s=round(statistics.median(rates), 1), mbp_per_s_runs=[round(r, 1) for r in rates],
        mbp_per_cpu_s=round(statistics.median(cpu_rates), 1), peak_rss_mib=round(max(r[2] for r in results), 1),
        cpus=os.cpu_count(), load_average_1min=os.getloadavg()[0],
    )))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

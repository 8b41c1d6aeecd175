import gzip
import json
import os
import bz2
import random
import re
import shutil
import subprocess
import sys

import pytest

from nucgpt.data import records, synthetic
from nucgpt.data.inspect import iter_records
from nucgpt.data.prepare import prepare
from nucgpt.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IUPAC = str.maketrans("RYKMSWBDHVrykmswbdhv", "NNNNNNNNNNnnnnnnnnnn")


def reference_fasta(path) -> dict[str, str]:
    """A deliberately simple whole-file FASTA parse, the reference for the streaming reader."""
    opener = gzip.open if open(path, "rb").read(2) == b"\x1f\x8b" else open
    with opener(path, "rt", newline="") as f:
        text = f.read()
    genome = {}
    for entry in re.split(r"^>", text, flags=re.M)[1:]:
        header, _, body = entry.partition("\n")
        genome[header.split()[0]] = "".join(body.split()).translate(IUPAC)
    return genome


def all_records(out) -> dict[str, list[tuple[str, int, str]]]:
    return {s: [(c, p, q.decode()) for c, p, q in iter_records(out, s)] for s in ("train", "valid", "test")}


def assert_round_trip(out, genome: dict[str, str], window: int) -> None:
    """Every record is exactly the FASTA slice at chrom:start (case kept), and the manifest counts match."""
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    for split, recs in all_records(out).items():
        info = manifest["splits"][split]
        assert info["records"] == len(recs)
        assert info["bp"] == sum(len(q) for _, _, q in recs)
        chroms = {}
        for chrom, start, seq in recs:
            assert seq == genome[chrom][start : start + len(seq)]
            assert len(seq) == window or start + len(seq) == len(genome[chrom])
            chroms[chrom] = chroms.get(chrom, 0) + 1
        assert info["chroms"] == chroms
        if recs:
            text = "".join(q for _, _, q in recs)
            assert info["lowercase_fraction"] == pytest.approx(sum(b.islower() for b in text) / len(text))
            assert info["n_fraction"] == pytest.approx(text.upper().count("N") / len(text))


@pytest.fixture(scope="module")
def genome_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("genome")
    synthetic.write_genome(d / "g.fa.gz", bp=300_000, seed=3, num_chroms=4)
    synthetic.write_genome(d / "g.fa", bp=300_000, seed=3, num_chroms=4)
    return d / "g.fa.gz", d / "g.fa"


def test_round_trip_splits_and_gzip_equals_plain(genome_files, tmp_path):
    gz, plain = genome_files
    kwargs = dict(window=1000, valid_chroms=["chr3"], test_chroms=["chr4"], records_per_shard=40, progress=False)
    manifest = prepare([gz], tmp_path / "gz", **kwargs)
    prepare([plain], tmp_path / "plain", **kwargs)
    genome = reference_fasta(plain)
    assert_round_trip(tmp_path / "gz", genome, 1000)
    assert all_records(tmp_path / "gz") == all_records(tmp_path / "plain")
    assert {c for c, _, _ in all_records(tmp_path / "gz")["valid"]} == {"chr3"}
    assert set(manifest["splits"]["train"]["chroms"]) == {"chr1", "chr2"}
    assert len(manifest["splits"]["train"]["shards"]) > 1
    assert manifest["sources"][0]["size"] == os.path.getsize(gz) and len(manifest["sources"][0]["sha256"]) == 64
    assert manifest["options"]["window"] == 1000 and manifest["options"]["stride"] == 1000


def test_n_filter_tail_and_stride(tmp_path):
    fasta = tmp_path / "t.fa"
    # chr1: 24 bp in 3 lines of 8 with CRLF; the middle window has 4 N (two from IUPAC R/y).
    fasta.write_bytes(b">chr1 description here\r\nACGTACGT\r\nNNacgtRy\r\nacgtACGT\r\nAC\r\n>chr2\nAAAA\n")
    manifest = prepare([fasta], tmp_path / "a", window=8, max_n=3, progress=False)
    assert [(c, s) for c, s, _ in all_records(tmp_path / "a")["train"]] == [("chr1", 0), ("chr1", 16)]
    assert manifest["splits"]["train"]["dropped_windows"] == 1
    assert manifest["sources"][0]["iupac_bases"] == 2

    prepare([fasta], tmp_path / "b", window=8, max_n=4, keep_tail=True, progress=False)
    recs = all_records(tmp_path / "b")["train"]
    assert recs == [("chr1", 0, "ACGTACGT"), ("chr1", 8, "NNacgtNn"), ("chr1", 16, "acgtACGT"),
                    ("chr1", 24, "AC"), ("chr2", 0, "AAAA")]

    prepare([fasta], tmp_path / "c", window=8, stride=6, max_n=8, progress=False)
    assert [s for _, s, _ in all_records(tmp_path / "c")["train"]] == [0, 6, 12, 18]  # chr1 is 26 bp
    assert_round_trip(tmp_path / "c", reference_fasta(fasta), 8)

    prepare([fasta], tmp_path / "d", window=5, stride=11, max_n=8, progress=False)
    assert [s for _, s, _ in all_records(tmp_path / "d")["train"]] == [0, 11]
    assert_round_trip(tmp_path / "d", reference_fasta(fasta), 5)


def test_multi_member_gzip_like_bgzip(genome_files, tmp_path):
    text = genome_files[1].read_bytes()
    cut = len(text) // 3 + 7  # members split mid-line, as bgzip does
    (tmp_path / "multi.fa.gz").write_bytes(gzip.compress(text[:cut]) + gzip.compress(text[cut:]))
    prepare([tmp_path / "multi.fa.gz"], tmp_path / "multi", window=3000, progress=False)
    prepare([genome_files[1]], tmp_path / "plain", window=3000, progress=False)
    assert all_records(tmp_path / "multi") == all_records(tmp_path / "plain")
    (tmp_path / "padded.fa.gz").write_bytes(gzip.compress(text) + bytes(5000))  # zero padding, as gzip tolerates
    prepare([tmp_path / "padded.fa.gz"], tmp_path / "padded", window=3000, progress=False)
    assert all_records(tmp_path / "padded") == all_records(tmp_path / "plain")


def test_include_exclude_default_drops_alt_random_un_and_chrM(tmp_path):
    fasta = tmp_path / "t.fa"
    names = ["chr1", "chr1_KI270706v1_random", "chrUn_GL000195v1", "chr19_KI270938v1_alt", "chrM", "chrX"]
    fasta.write_text("".join(f">{n}\nACGTACGT\n" for n in names))
    manifest = prepare([fasta], tmp_path / "o", window=4, progress=False)
    assert set(manifest["splits"]["train"]["chroms"]) == {"chr1", "chrX"}
    manifest = prepare([fasta], tmp_path / "p", window=4, include="chr1.*", exclude="", progress=False)
    assert set(manifest["splits"]["train"]["chroms"]) == {"chr1", "chr1_KI270706v1_random", "chr19_KI270938v1_alt"}


def test_csv_bins_input_plain_and_gzip(tmp_path):
    text = b"Chrom,Start,End,Sequence\nchr1,0,8,ACGTacgt\nchr1,8,16,NNNNNNNN\nchr2,100,108,ggggCCCC\n"
    (tmp_path / "bins.csv").write_bytes(text)
    (tmp_path / "bins.csv.gz").write_bytes(gzip.compress(text))
    for name in ("bins.csv", "bins.csv.gz"):
        prepare([], tmp_path / f"o_{name}", csv_paths=[tmp_path / name], max_n=2,
                valid_chroms=["chr2"], progress=False)
        recs = all_records(tmp_path / f"o_{name}")
        assert recs["train"] == [("chr1", 0, "ACGTacgt")] and recs["valid"] == [("chr2", 100, "ggggCCCC")]
    (tmp_path / "bad.csv").write_bytes(text + "chr3,0,4,AC\xe9T\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"bad\.csv:5: invalid character 'é'"):
        prepare([], tmp_path / "x", csv_paths=[tmp_path / "bad.csv"], progress=False)
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbf" + text + b"chr3,0,200000," + b"A" * 200_000 + b"\n")
    prepare([], tmp_path / "excel", csv_paths=[tmp_path / "excel.csv"], progress=False)
    recs = all_records(tmp_path / "excel")
    assert [(c, s, len(q)) for c, s, q in recs["train"]][-1] == ("chr3", 0, 200_000)  # byte-order mark, a long field
    for row, message in [("chr3,-5,4,ACGT", r"bad\.csv:5: Start -5 is outside 0\.\.2\^64-1"),
                         ("chr3,0,4,", r"bad\.csv:5: empty Sequence")]:
        (tmp_path / "bad.csv").write_bytes(text + row.encode() + b"\n")
        with pytest.raises(UserError, match=message):
            prepare([], tmp_path / "x", csv_paths=[tmp_path / "bad.csv"], progress=False)


def _leftovers(parent) -> list[str]:
    return sorted(os.listdir(parent))


@pytest.mark.parametrize(
    "content,kwargs,message",
    [
        (b"", {}, "empty file"),
        (b"ACGT\nACGT\n", {}, r"bad\.fa:1: text before the first '>' header \(not a FASTA file\?\)"),
        (b"\n\nChrom,Start\n>chr1\nACGT\n", {}, r"bad\.fa:3: text before the first '>' header"),
        (bz2.compress(b">chr1\nACGT\n"), {}, r"bad\.fa: bzip2-compressed; only gzip \(or bgzip\) is read"),
        (b">chr1\nACGT\nAC-T\n", {}, r"bad\.fa:3: invalid character '-'"),
        (b">chr1\nAC>T\n", {}, r"bad\.fa:2: invalid character '>'"),
        (gzip.compress(b">chr1\n" + b"ACGT\n" * 100_000 + b"ACxT\n"), {}, r"bad\.fa:100002: invalid character 'x'"),
        (b">chr1\nACGT\n", {"window": 0}, "--window must be positive, got 0"),
        (b">chr1\nACGT\n", {"valid_chroms": ["chr7"]}, "--valid_chroms: chromosome 'chr7' is not in the input"),
        (b">chr1\nACGT\n>chr1\nACGT\n", {}, "appears twice"),
        (gzip.compress(b">chr1\n" + bytes(random.Random(0).choices(b"ACGT", k=20000)))[:-100], {}, "truncated gzip"),
    ],
)
def test_bad_input_is_one_user_error_and_leaves_nothing(tmp_path, content, kwargs, message):
    bad = tmp_path / "bad.fa"
    bad.write_bytes(content)
    with pytest.raises(UserError, match=message):
        prepare([bad], tmp_path / "new" / "deeper" / "out", **{"window": 4, "progress": False, **kwargs})
    assert _leftovers(tmp_path) == ["bad.fa"]  # not even the folders made for --out


def test_interrupted_run_leaves_nothing(genome_files, tmp_path, monkeypatch):
    calls = []

    def interrupt_on_fifth(self, record):
        calls.append(record)
        if len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(records.ShardedWriter, "write", interrupt_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        prepare([genome_files[0]], tmp_path / "out", window=1000, progress=False)
    assert _leftovers(tmp_path) == []


def test_existing_out_refused_unless_overwrite(genome_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        prepare([genome_files[1]], out, window=5000, progress=False)
    with pytest.raises(UserError, match="not a prepared dataset"):  # --overwrite never deletes a user's folder
        prepare([genome_files[1]], out, window=5000, overwrite=True, progress=False)
    assert _leftovers(out) == ["keep.txt"]
    (out / "keep.txt").unlink()
    prepare([genome_files[1]], out, window=5000, overwrite=True, progress=False)  # empty: replaced
    (out / "extra.txt").write_text("stale")
    prepare([genome_files[1]], out, window=5000, overwrite=True, progress=False)  # a dataset: replaced
    assert "manifest.json" in _leftovers(out) and "extra.txt" not in _leftovers(out)
    assert _leftovers(tmp_path) == ["out"]
    inside = out / "genome.fa"
    shutil.copy(genome_files[1], inside)
    with pytest.raises(UserError, match="inside --out"):
        prepare([inside], out, window=5000, overwrite=True, progress=False)
    assert inside.exists()


def test_cli_prepare_inspect_and_clean_error(genome_files, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = tmp_path / "o"
    ok = subprocess.run([sys.executable, "-m", "nucgpt.data.prepare", f"--fasta={genome_files[0]}", f"--out={out}",
                         "--window=2000", "--test_chroms=chr4", "--noprogress"],
                        env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "lowercase" in ok.stdout and "test" in ok.stdout
    dump = subprocess.run([sys.executable, "-m", "nucgpt.data.inspect", str(out), "--dump=3", "--split=test"],
                          env=env, capture_output=True, text=True)
    lines = dump.stdout.splitlines()
    assert len(lines) == 3
    genome = reference_fasta(genome_files[1])
    for line in lines:
        chrom, start, seq = line.split("\t")
        assert chrom == "chr4" and seq == genome[chrom][int(start) : int(start) + 2000]
    bad = subprocess.run([sys.executable, "-m", "nucgpt.data.prepare", f"--fasta={genome_files[0]}",
                          f"--out={tmp_path / 'x'}", "--window=-5"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: --window must be positive, got -5"
    assert not (tmp_path / "x").exists()
    # piped into a reader that stops early (`| head -1`): a quiet exit 141, no BrokenPipeError traceback
    piped = subprocess.Popen([sys.executable, "-m", "nucgpt.data.inspect", str(out), "--dump=100000"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    piped.stdout.readline()
    piped.stdout.close()
    assert piped.wait() == 141 and piped.stderr.read() == b""


def test_damaged_dataset_is_one_line(genome_files, tmp_path):
    prepare([genome_files[1]], tmp_path / "d", window=5000, progress=False)
    manifest = (tmp_path / "d" / "manifest.json").read_text()
    (tmp_path / "d" / "manifest.json").write_text(manifest[:-40])
    with pytest.raises(UserError, match=r"manifest.json: damaged manifest, not JSON"):
        records.read_manifest(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text('{"format_version": 1, "splits": {}}')
    with pytest.raises(UserError, match=r"damaged manifest, no sources, options, chromosomes"):
        records.read_manifest(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text(manifest)
    (tmp_path / "d" / "train" / "train-00000.array_record").unlink()
    with pytest.raises(UserError, match=r"shard train/train-00000.array_record listed in manifest.json is missing"):
        records.read_manifest(tmp_path / "d")


def test_real_genomes_round_trip(shared_data, tmp_path):
    paths = sorted((shared_data / "genomes").glob("*.fa"))
    manifest = prepare(paths, tmp_path / "real", window=8192, max_n=100, keep_tail=True,
                       valid_chroms=["chr10"], test_chroms=["pseudo2"], progress=False)
    genome = {}
    for path in paths:
        genome.update(reference_fasta(path))
    assert_round_trip(tmp_path / "real", genome, 8192)
    # hg19 chr10 starts with 60,000 N: its first 7 windows are dropped, the 8th (57,344-65,535) too.
    assert min(s for c, s, _ in all_records(tmp_path / "real")["valid"]) == 65536
    assert manifest["splits"]["train"]["chroms"].keys() == {"chr1", "pseudo1"}

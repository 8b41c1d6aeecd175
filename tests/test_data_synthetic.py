import gzip

import numpy as np
import pytest

from nucgpt.data import synthetic
from nucgpt.errors import UserError
from tests.test_data_prepare import reference_fasta

CONTEXT = 10


@pytest.fixture(scope="module")
def genome(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / "g.fa"
    synthetic.write_genome(path, bp=1_200_000, seed=0, num_chroms=4)
    return path


def test_deterministic_and_gzip_holds_the_same_text(genome, tmp_path):
    synthetic.write_genome(tmp_path / "a.fa.gz", bp=1_200_000, seed=0, num_chroms=4)
    synthetic.write_genome(tmp_path / "b.fa.gz", bp=1_200_000, seed=0, num_chroms=4)
    synthetic.write_genome(tmp_path / "c.fa", bp=1_200_000, seed=1, num_chroms=4)
    assert (tmp_path / "a.fa.gz").read_bytes() == (tmp_path / "b.fa.gz").read_bytes()
    assert gzip.decompress((tmp_path / "a.fa.gz").read_bytes()) == genome.read_bytes()
    assert (tmp_path / "c.fa").read_bytes() != genome.read_bytes()


def test_looks_like_a_softmasked_assembly(genome):
    chroms = reference_fasta(genome)
    assert list(chroms) == ["chr1", "chr2", "chr3", "chr4"]
    assert sum(map(len, chroms.values())) == 1_200_000
    assert all(len(chroms[f"chr{i}"]) > len(chroms[f"chr{i + 1}"]) for i in range(1, 4))
    text = "".join(chroms.values())
    lower = sum(text.count(b) for b in "acgt") / len(text)
    n = text.count("N") / len(text)
    upper = text.translate(str.maketrans("", "", "acgtN"))
    gc = (upper.count("G") + upper.count("C")) / len(upper)
    assert 0.35 < lower < 0.6 and 0.001 < n < 0.1 and 0.38 < gc < 0.52
    assert all(seq.startswith("N" * 100) for seq in chroms.values())  # telomere-like gaps


def _context_and_next(seq: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every position's preceding 10-mer (as an int), its base (0..3), and whether it is lowercase."""
    text_u8 = np.frombuffer(seq.encode(), np.uint8)
    code_u8 = np.full(256, 4, np.uint8)
    for i, base in enumerate(b"ACGT"):
        code_u8[base] = code_u8[base + 32] = i
    code = code_u8[text_u8].astype(np.int64)
    num = len(code) - CONTEXT
    context, ok = np.zeros(num, np.int64), code[CONTEXT:] < 4
    for j in range(CONTEXT):
        context = context * 4 + np.minimum(code[j : j + num], 3)
        ok &= code[j : j + num] < 4
    return context[ok], code[CONTEXT:][ok], (text_u8[CONTEXT:] >= ord("a"))[ok]


def test_repeats_are_learnable(genome):
    """A 10-mer context model fit on chr1-3 predicts chr4's repeat bases far better than its unique ones."""
    chroms = reference_fasta(genome)
    fits = [_context_and_next(chroms[c]) for c in ("chr1", "chr2", "chr3")]
    context = np.concatenate([f[0] for f in fits])
    following = np.concatenate([f[1] for f in fits])
    counts_Cx4 = np.bincount(context * 4 + following, minlength=4**CONTEXT * 4).reshape(-1, 4)
    context, following, repeat = _context_and_next(chroms["chr4"])
    correct = counts_Cx4[context].argmax(1) == following
    assert correct[repeat].mean() > correct[~repeat].mean() + 0.2
    assert correct[~repeat].mean() < 0.35  # unique sequence stays close to chance


def test_bad_size_is_user_error(tmp_path):
    with pytest.raises(UserError, match="bp >= num_chroms"):
        synthetic.write_genome(tmp_path / "g.fa", bp=2, seed=0, num_chroms=4)


def test_existing_file_kept_unless_overwrite(tmp_path):
    path = tmp_path / "hg38.fa"
    path.write_text(">chr1\nACGT\n")
    with pytest.raises(UserError, match=r"already exists; choose a new file or pass --overwrite"):
        synthetic.write_genome(path, bp=1000, seed=0)
    assert path.read_text() == ">chr1\nACGT\n"
    synthetic.write_genome(path, bp=1000, seed=0, overwrite=True)
    assert path.read_text().startswith(">chr1 synthetic")


def test_every_chromosome_has_bases():
    for bp, num_chroms in [(4, 4), (5, 4), (30, 25), (1_000_000, 4)]:
        sizes = synthetic.chromosome_sizes(bp, num_chroms)
        assert sum(sizes) == bp and min(sizes) >= 1

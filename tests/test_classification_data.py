"""Readers for both layouts, the seeded stratified split and length-bucketed batches."""

import gzip

import numpy as np
import pytest

from nucgpt.data import classification as cd
from nucgpt.errors import UserError


def _write_benchmark_folder(root, per_class=3):
    for split in ("train", "test"):
        for class_name, base in (("positive", "A"), ("negative", "C")):
            folder = root / split / class_name
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{i}.txt").write_text(base * (10 + i) + "\n")


def test_benchmark_folder_sorts_class_names_into_label_ids(tmp_path):
    _write_benchmark_folder(tmp_path / "demo_ds")
    data = cd.load(str(tmp_path / "demo_ds"), test_fraction=0.2, split_seed=0)
    assert data.class_names == ("negative", "positive")
    assert len(data.train) == len(data.test) == 6
    assert data.split == {"kind": "given"}
    for sequence, label in zip(data.train.sequences, data.train.labels_N):
        assert sequence[0] == ("C" if label == 0 else "A")


def test_benchmark_folder_with_different_test_classes_is_a_user_error(tmp_path):
    _write_benchmark_folder(tmp_path)
    (tmp_path / "test" / "negative" / "0.txt").unlink()
    (tmp_path / "test" / "other").mkdir()
    with pytest.raises(UserError, match="differ from test classes"):
        cd.load(str(tmp_path), 0.2, 0)


@pytest.mark.parametrize(
    "name, text",
    [
        ("original.csv", "sequence,label\nACGTAC,1\nGGGTTT,0\nACGTTT,1\nGGGAAA,0\n"),
        ("shared.tsv", "seq\tlabel\nACGTAC\t1\nGGGTTT\t0\nACGTTT\t1\nGGGAAA\t0\n"),
        ("reversed.csv", "label,sequence\n1,ACGTAC\n0,GGGTTT\n1,ACGTTT\n0,GGGAAA\n"),
        ("no_header.tsv", "ACGTAC\t1\nGGGTTT\t0\nACGTTT\t1\nGGGAAA\t0\n"),
        ("no_header_label_first.csv", "1,ACGTAC\n0,GGGTTT\n1,ACGTTT\n0,GGGAAA\n"),
    ],
)
def test_tables_with_and_without_header_read_the_same_rows(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    sequences, labels = cd.read_table(tmp_path / name)
    assert sequences == ["ACGTAC", "GGGTTT", "ACGTTT", "GGGAAA"]
    assert labels == ["1", "0", "1", "0"]


def test_string_labels_sort_and_integer_labels_keep_their_order(tmp_path):
    (tmp_path / "names.csv").write_text("sequence,label\n" + "".join(f"ACGT,{c}\n" for c in ["ocr", "enhancer", "promoter"] * 4))
    assert cd.load(str(tmp_path / "names.csv"), 0.25, 0).class_names == ("enhancer", "ocr", "promoter")
    (tmp_path / "ints.csv").write_text("sequence,label\n" + "".join(f"ACGT,{c}\n" for c in [10, 2, 1] * 4))
    assert cd.load(str(tmp_path / "ints.csv"), 0.25, 0).class_names == ("1", "2", "10")


def test_bad_rows_are_user_errors_naming_the_line(tmp_path):
    (tmp_path / "bad.csv").write_text("sequence,label\nACGT,0\nAC-GT,1\n")
    with pytest.raises(UserError, match=r"bad.csv:3"):
        cd.load(str(tmp_path / "bad.csv"), 0.5, 0)
    (tmp_path / "cols.csv").write_text("dna_string,y_value\nACGT,0\n")
    with pytest.raises(UserError, match="needs a sequence column"):
        cd.load(str(tmp_path / "cols.csv"), 0.5, 0)
    with pytest.raises(UserError, match="does not exist"):
        cd.load(str(tmp_path / "missing.tsv"), 0.5, 0)


def test_stratified_split_is_seeded_disjoint_and_keeps_class_proportions():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    train, test = cd.stratified_split(labels, 0.2, seed=7)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 100
    np.testing.assert_array_equal(np.bincount(labels[test]), [10, 6, 4])
    again_train, again_test = cd.stratified_split(labels, 0.2, seed=7)
    np.testing.assert_array_equal(test, again_test)
    assert not np.array_equal(test, cd.stratified_split(labels, 0.2, seed=8)[1])


def _split(lengths):
    tokens = tuple(np.arange(1, n + 1, dtype=np.int32) % 4 + 1 for n in lengths)
    return cd.TokenizedSplit(tokens, np.arange(len(lengths), dtype=np.int32) % 2)


def test_training_batches_come_from_one_bucket_and_cover_every_example():
    buckets = cd.bucket_lengths(256, smallest=64)
    assert buckets == (64, 128, 256)
    split = _split([30] * 10 + [100] * 7 + [250] * 3)
    batches = cd.epoch_batches(split, buckets, batch_size=4, seed=0, epoch=0)
    seen = np.concatenate(batches)
    assert set(seen) == set(range(20))
    for batch in batches:
        padded = cd.pad_batch(split, batch, buckets, pad_id=0)
        assert padded["tokens"].shape[1] == buckets[cd.assign_buckets(np.array([len(split.tokens[batch[0]])]), buckets)[0]]
    assert [b.tolist() for b in batches] == [b.tolist() for b in cd.epoch_batches(split, buckets, 4, seed=0, epoch=0)]
    assert [b.tolist() for b in batches] != [b.tolist() for b in cd.epoch_batches(split, buckets, 4, seed=0, epoch=1)]


def test_eval_batches_hold_each_example_once_with_zero_weight_fillers():
    buckets = cd.bucket_lengths(128, smallest=64)
    split = _split([30] * 5 + [100] * 2)
    batches = cd.eval_batches(split, buckets, batch_size=4)
    padded = [cd.pad_batch(split, b, buckets, pad_id=0) for b in batches]
    assert sorted(i for b in batches for i in b if i >= 0) == list(range(7))
    assert sum(p["weights"].sum() for p in padded) == 7
    at = next(i for i, b in enumerate(batches) if 5 in b)  # the 100-token bucket: two rows and two fillers
    long = padded[at]
    assert long["tokens"].shape == (4, 128)
    np.testing.assert_array_equal(np.sort(long["segment_ids"].sum(axis=1)), [0, 0, 100, 100])
    row = int(np.flatnonzero(batches[at] == 5)[0])
    np.testing.assert_array_equal(long["tokens"][row, :100], split.tokens[5])
    assert (long["tokens"][row, 100:] == 0).all()


def test_a_prefix_of_eval_batches_samples_every_class():
    """train.eval_steps > 0 reads the first batches: on a label-sorted table they must not be one class."""
    split = _split([30] * 64)
    labels_N = np.repeat([0, 1], 32)  # sorted by label, as Genomic Benchmarks tables are
    first = cd.eval_batches(split, cd.bucket_lengths(64), batch_size=8)[:2]
    assert len(set(labels_N[np.concatenate(first)])) == 2


def test_a_sequence_longer_than_seq_len_is_a_user_error():
    with pytest.raises(UserError, match="longer than train.seq_len=128"):
        cd.assign_buckets(np.array([50, 200]), cd.bucket_lengths(128))


def test_a_table_too_small_for_a_test_split_is_refused_before_training(tmp_path):
    """One row per class leaves nothing to hold out: said up front, not after training finds no test batches."""
    (tmp_path / "tiny.csv").write_text("sequence,label\nACGT,0\nACGA,abc\n")
    with pytest.raises(UserError, match=r"tiny.csv: too few rows to hold out a test split .*'0': 1, 'abc': 1"):
        cd.load(str(tmp_path / "tiny.csv"), 0.2, 0)


def test_table_forms_users_have_and_their_errors(tmp_path):
    rows = "ACGTAC\t1\nGGGTTT\t0\nACGTTT\t1\nGGGAAA\t0\n"
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfsequence,label\n" + rows.replace("\t", ",").encode())  # Excel
    (tmp_path / "t.tsv.gz").write_bytes(gzip.compress(("seq\tlabel\n" + rows).encode()))
    for name in ("bom.csv", "t.tsv.gz"):
        assert cd.read_table(tmp_path / name) == (["ACGTAC", "GGGTTT", "ACGTTT", "GGGAAA"], ["1", "0", "1", "0"])
    (tmp_path / "latin.csv").write_bytes(b"sequence,label\nACGT,\xe9\n")
    (tmp_path / "blank_lines.csv").write_text("sequence,label\n\nACGT,0\n\nACXC,1\n")
    (tmp_path / "empty_label.csv").write_text("sequence,label\nACGT,0\nACGA,\n")
    for name, message in [("latin.csv", "not UTF-8 text"), ("blank_lines.csv", r"blank_lines.csv:5: sequence has"),
                          ("empty_label.csv", r"empty_label.csv:3: empty label")]:
        with pytest.raises(UserError, match=message):
            cd.read_table(tmp_path / name)


def test_hidden_folders_are_not_classes(tmp_path):
    for split in ("train", "test"):
        for label in ("negative", "positive", ".ipynb_checkpoints"):
            (tmp_path / split / label).mkdir(parents=True)
            (tmp_path / split / label / "0.txt").write_text("ACGT")
    assert cd.load(str(tmp_path), 0.2, 0).class_names == ("negative", "positive")


def test_iupac_codes_read_as_n_keeping_case_as_prepare_does(tmp_path):
    """A table or folder holding ambiguity codes (R, y, ...) trains on them as N, as a prepared genome does."""
    (tmp_path / "codes.csv").write_text("dna,y\nACRYa,1\nKMSWc,0\nBDHVg,1\nrykmt,0\n")  # header in IUPAC letters
    assert cd.read_table(tmp_path / "codes.csv") == (["ACNNa", "NNNNc", "NNNNg", "nnnnt"], ["1", "0", "1", "0"])
    (tmp_path / "extra.csv").write_text("chr,start,strand,sequence,label\nchr1,5,+,ACGTR,1\nchr1,9,-,ACGTT,0\n")
    assert cd.read_table(tmp_path / "extra.csv") == (["ACGTN", "ACGTT"], ["1", "0"])  # `strand`, `start`: IUPAC letters too
    for split in ("train", "test"):
        for label in ("negative", "positive"):
            (tmp_path / "folder" / split / label).mkdir(parents=True)
            (tmp_path / "folder" / split / label / "0.txt").write_text("ACGTwsN\n")
    assert cd.load(str(tmp_path / "folder"), 0.2, 0).train.sequences == ("ACGTnnN", "ACGTnnN")


def test_every_sequence_keeps_where_it_was_read_through_the_split(tmp_path):
    """Origins (`file:line`, or the .txt file) let a later check name the row, as the readers' own errors do."""
    (tmp_path / "t.tsv").write_text("seq\tlabel\n" + "".join(f"{'AC' * (3 + i)}\t{i % 2}\n" for i in range(10)))
    data = cd.load(str(tmp_path / "t.tsv"), 0.2, 0)
    for split in (data.train, data.test):
        assert len(split.origins) == len(split)
        for sequence, origin in zip(split.sequences, split.origins):  # line n holds the sequence of length 2·(3 + n - 2)
            line = int(origin.removeprefix(f"{tmp_path / 't.tsv'}:"))
            assert len(sequence) == 2 * (3 + line - 2)
    _write_benchmark_folder(tmp_path / "folder")
    folder = cd.load(str(tmp_path / "folder"), 0.2, 0)
    assert folder.train.origins[0] == str(tmp_path / "folder" / "train" / "negative" / "0.txt")


def test_a_sequence_shorter_than_one_token_is_named_by_file_and_line(tmp_path):
    (tmp_path / "t.tsv").write_text("seq\tlabel\nACGTACGT\t0\nACGTA\t1\nACGTACGT\t1\nACG\t0\n")
    sequences, labels, origins = cd._read_table_rows(tmp_path / "t.tsv")
    data = cd.LabelledSequences(tuple(sequences), np.zeros(len(sequences), np.int32), tuple(origins))
    with pytest.raises(UserError, match=r"^\S*t.tsv:3: a 5 bp sequence is shorter than one kmer6_overlap token "
                                        r"\(6 bp\), .*at least 6 bp \(1 more in the train split\)$"):
        cd.check_min_length(data, 6, "kmer6_overlap", "train")
    cd.check_min_length(data, 1, "nucleotide", "train")
    with pytest.raises(UserError, match=r"^test sequence 2: a 5 bp"):  # without origins: its place in the split
        cd.check_min_length(cd.LabelledSequences(data.sequences, data.labels_N), 6, "kmer6_overlap", "test")

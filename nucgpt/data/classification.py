"""Labelled sequences for fine-tuning: the two layouts users have, a seeded split, length buckets.

Layouts: the Genomic Benchmarks folder `<dataset>/{train,test}/<class>/<id>.txt` (class names
sorted → label ids), and a CSV/TSV table with a sequence and a label column (with or without a
header; the original project's `sequence,label` CSV and the shared `seq<TAB>label` TSV are both
this). A single table is split into train/test by a seeded stratified split.

Batches are a pure function of (seed, step), so a resumed fine-tune sees exactly the batches it
would have seen, and every process can cut its own rows out of the same global batch.
"""

import csv
import dataclasses
import gzip
import pathlib
import re
import zlib

import numpy as np

from nucgpt.data.fasta import IUPAC_CODES
from nucgpt.errors import UserError

SEQUENCE_COLUMN_NAMES = ("sequence", "seq", "sequences", "dna", "text")
LABEL_COLUMN_NAMES = ("label", "labels", "class", "target", "y")
# ACGTN and the IUPAC ambiguity codes, either case; the codes read as N (prepare's policy, README).
_IUPAC = IUPAC_CODES.decode() + IUPAC_CODES.decode().lower()
_ALPHABET = "ACGTNacgtn" + _IUPAC
_DNA = re.compile(rf"^[{_ALPHABET}]+$")
_IUPAC_AS_N = str.maketrans(_IUPAC, "N" * len(IUPAC_CODES) + "n" * len(IUPAC_CODES))
_INTEGER = re.compile(r"^-?\d+$")


@dataclasses.dataclass(frozen=True)
class LabelledSequences:
    sequences: tuple[str, ...]
    labels_N: np.ndarray  # int32 label ids into class_names
    origins: tuple[str, ...] = ()  # per sequence, where it was read (`file:line` or the .txt file), for errors

    def __len__(self) -> int:
        return len(self.sequences)


@dataclasses.dataclass(frozen=True)
class ClassificationData:
    train: LabelledSequences
    test: LabelledSequences
    class_names: tuple[str, ...]
    split: dict  # how test was obtained; recorded in results.json

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load(path: str, test_fraction: float, split_seed: int) -> ClassificationData:
    """Reads a Genomic Benchmarks folder (its own train/test) or one table (split here)."""
    root = pathlib.Path(path)
    if not path or not root.exists():
        raise UserError(f"data.path {path!r} does not exist: give a Genomic Benchmarks dataset folder or a CSV/TSV file")
    if root.is_dir():
        return _read_benchmark_folder(root)
    sequences, label_texts, origins = _read_table_rows(root)
    class_names, labels_N = _label_ids(label_texts, root)
    everything = LabelledSequences(tuple(sequences), labels_N, tuple(origins))
    train_N, test_N = stratified_split(labels_N, test_fraction, split_seed)
    if len(test_N) == 0:
        counts = {name: int(np.sum(labels_N == i)) for i, name in enumerate(class_names)}
        raise UserError(f"{path}: too few rows to hold out a test split (rows per class: {counts}); a class needs at least 2")
    return ClassificationData(
        train=_subset(everything, train_N),
        test=_subset(everything, test_N),
        class_names=class_names,
        split={"kind": "stratified", "test_fraction": test_fraction, "split_seed": split_seed},
    )


def _read_benchmark_folder(root: pathlib.Path) -> ClassificationData:
    splits = {name: root / name for name in ("train", "test")}
    if not all(p.is_dir() for p in splits.values()):
        raise UserError(f"{root} is not a Genomic Benchmarks dataset folder: it needs train/ and test/ subfolders")
    class_names, test_classes = (_class_folders(splits[name]) for name in ("train", "test"))
    if not class_names:
        raise UserError(f"{splits['train']} has no class subfolders")
    if test_classes != class_names:
        raise UserError(f"{root}: train classes {list(class_names)} differ from test classes {list(test_classes)}")
    read = {}
    for name, folder in splits.items():
        sequences, labels, origins = [], [], []
        for label, class_name in enumerate(class_names):
            for file in sorted((folder / class_name).glob("*.txt")):
                sequences.append(_checked_sequence(file.read_text().strip(), str(file)))
                labels.append(label)
                origins.append(str(file))
        if not sequences:
            raise UserError(f"{folder} holds no <class>/<id>.txt sequence files")
        read[name] = LabelledSequences(tuple(sequences), np.asarray(labels, np.int32), tuple(origins))
    return ClassificationData(read["train"], read["test"], class_names, {"kind": "given"})


def _class_folders(split: pathlib.Path) -> tuple[str, ...]:
    """Subfolder names, sorted; hidden ones (.ipynb_checkpoints, .DS_Store folders) are not classes."""
    return tuple(sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith(".")))


def read_table(path: pathlib.Path) -> tuple[list[str], list[str]]:
    """Sequence and label columns of a CSV/TSV (plain or gzip, UTF-8 with or without a byte-order
    mark); the header, if any, names them. Errors name the file's own line numbers."""
    sequences, labels, _ = _read_table_rows(path)
    return sequences, labels


def _read_table_rows(path: pathlib.Path) -> tuple[list[str], list[str], list[str]]:
    """`read_table` plus each row's `file:line`, so later checks (a sequence too short to tokenize)
    can name the line too."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path}: corrupt gzip data ({e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); expected a CSV/TSV table") from None
    first_line = text.split("\n", 1)[0]
    is_tsv = path.name.lower().removesuffix(".gz").endswith(".tsv")
    delimiter = "\t" if is_tsv or "\t" in first_line else ","
    numbered = [(n, row) for n, row in enumerate(csv.reader(text.splitlines(), delimiter=delimiter), start=1) if row]
    if not numbered:
        raise UserError(f"{path} is empty")
    sequence_column, label_column, has_header = _columns([row for _, row in numbered[:1]], path)
    body = numbered[1:] if has_header else numbered
    if not body:
        raise UserError(f"{path} has a header but no rows")
    sequences, labels, origins = [], [], []
    for line_number, row in body:
        if len(row) <= max(sequence_column, label_column):
            raise UserError(f"{path}:{line_number}: expected at least {max(sequence_column, label_column) + 1} columns, got {len(row)}")
        sequences.append(_checked_sequence(row[sequence_column].strip(), f"{path}:{line_number}"))
        labels.append(row[label_column].strip())
        if not labels[-1]:
            raise UserError(f"{path}:{line_number}: empty label")
        origins.append(f"{path}:{line_number}")
    return sequences, labels, origins


def _columns(rows: list[list[str]], path: pathlib.Path) -> tuple[int, int, bool]:
    """(sequence column, label column, has header): by header names, else by content."""
    names = [cell.strip().lower() for cell in rows[0]]
    names_a_column = any(cell.strip().lower() in SEQUENCE_COLUMN_NAMES + LABEL_COLUMN_NAMES for cell in rows[0])
    has_header = names_a_column or not any(_is_dna(cell) for cell in rows[0])
    if has_header:
        sequence_column = next((i for i, n in enumerate(names) if n in SEQUENCE_COLUMN_NAMES), None)
        label_column = next((i for i, n in enumerate(names) if n in LABEL_COLUMN_NAMES), None)
        if sequence_column is None or label_column is None:
            raise UserError(
                f"{path}: header {rows[0]} needs a sequence column ({'/'.join(SEQUENCE_COLUMN_NAMES)}) "
                f"and a label column ({'/'.join(LABEL_COLUMN_NAMES)})"
            )
        return sequence_column, label_column, True
    dna_columns = [i for i, cell in enumerate(rows[0]) if _is_dna(cell)]
    other_columns = [i for i in range(len(rows[0])) if i not in dna_columns]
    if len(dna_columns) != 1 or not other_columns:
        raise UserError(f"{path}: without a header the first row must hold one DNA column and a label column")
    return dna_columns[0], other_columns[0], False


_PLAIN_DNA = re.compile(r"^[ACGTNacgtn]+$")


def _is_dna(cell: str) -> bool:
    """A first-row cell that is a sequence, not a column name. Only plain ACGTN counts here: column
    names such as `strand`, `start`, `gc`, `dna` or `y` are spelt in IUPAC letters too."""
    cell = cell.strip()
    return bool(_PLAIN_DNA.match(cell)) and cell.lower() not in SEQUENCE_COLUMN_NAMES + LABEL_COLUMN_NAMES


def _checked_sequence(sequence: str, where: str) -> str:
    """The sequence with IUPAC ambiguity codes as N (case kept), or one error naming the bad characters."""
    if not _DNA.match(sequence):
        bad = sorted(set(sequence) - set(_ALPHABET)) or ["(empty)"]
        raise UserError(f"{where}: sequence has characters other than ACGTN and the IUPAC codes RYKMSWBDHV: {''.join(bad)[:20]}")
    return sequence.translate(_IUPAC_AS_N)


def _label_ids(label_texts: list[str], path: pathlib.Path) -> tuple[tuple[str, ...], np.ndarray]:
    """Sorted class names → ids; integer labels sort numerically so 0/1/2 keep their ids."""
    unique = set(label_texts)
    integer_labels = all(_INTEGER.match(t) for t in unique)
    class_names = tuple(sorted(unique, key=int if integer_labels else str))
    if len(class_names) < 2:
        raise UserError(f"{path}: classification needs at least two classes; found {list(class_names)}")
    index = {name: i for i, name in enumerate(class_names)}
    return class_names, np.asarray([index[t] for t in label_texts], np.int32)


def stratified_split(labels_N: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), each sorted: every class gives round(n_c × fraction) rows to test."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"classify.test_fraction must lie in (0, 1); got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels_N):
        members = rng.permutation(np.flatnonzero(labels_N == label))
        num_test = int(round(len(members) * test_fraction))
        num_test = min(max(num_test, 1), len(members) - 1) if len(members) > 1 else 0
        test.append(members[:num_test])
        train.append(members[num_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _subset(data: LabelledSequences, indices_N: np.ndarray) -> LabelledSequences:
    origins = tuple(data.origins[i] for i in indices_N) if data.origins else ()
    return LabelledSequences(tuple(data.sequences[i] for i in indices_N), data.labels_N[indices_N], origins)


def check_min_length(data: LabelledSequences, min_bp: int, token: str, split: str) -> None:
    """One error naming the first sequence shorter than `min_bp` (one `token`) by its file and line:
    the tokenizer gives it no token with content (none, or a lone UNK), so its row would train and
    be scored as padding alone."""
    short = [i for i, sequence in enumerate(data.sequences) if len(sequence) < min_bp]
    if short:
        first = short[0]
        where = data.origins[first] if data.origins else f"{split} sequence {first + 1}"
        others = f" ({len(short) - 1} more in the {split} split)" if len(short) > 1 else ""
        raise UserError(f"{where}: a {len(data.sequences[first])} bp sequence is shorter than one {token} token "
                        f"({min_bp} bp), so the model would read none of its bases; give sequences of at least "
                        f"{min_bp} bp{others}")


def bucket_lengths(max_len: int, smallest: int = 64) -> tuple[int, ...]:
    """Padded lengths batches may take: powers of two from `smallest` up to max_len (always included).

    Few distinct shapes keep compilation bounded; each example pays at most 2× its own length.
    """
    lengths = []
    length = smallest
    while length < max_len:
        lengths.append(length)
        length *= 2
    return tuple(lengths) + (max_len,)


@dataclasses.dataclass(frozen=True)
class TokenizedSplit:
    """Token ids of every example, ready to be cut into padded batches."""

    tokens: tuple[np.ndarray, ...]
    labels_N: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def assign_buckets(token_lengths_N: np.ndarray, buckets: tuple[int, ...]) -> np.ndarray:
    """Index of the smallest bucket that holds each example."""
    too_long = token_lengths_N > buckets[-1]
    if too_long.any():
        raise UserError(
            f"{int(too_long.sum())} sequences are longer than train.seq_len={buckets[-1]} tokens "
            f"(longest {int(token_lengths_N.max())}); raise train.seq_len up to the model's context"
        )
    return np.searchsorted(np.asarray(buckets), token_lengths_N, side="left")


def epoch_batches(split: TokenizedSplit, buckets: tuple[int, ...], batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One training epoch as batches of example indices, each from one bucket, in a seeded order.

    A bucket's last partial batch is filled with randomly repeated members of that bucket, so
    every batch is full-size and no example is dropped for a whole run.
    """
    rng = np.random.default_rng([seed, epoch])
    bucket_N = assign_buckets(np.asarray([len(t) for t in split.tokens]), buckets)
    batches = []
    for bucket in np.unique(bucket_N):
        members = rng.permutation(np.flatnonzero(bucket_N == bucket))
        shortfall = -len(members) % batch_size
        members = np.concatenate([members, rng.choice(members, shortfall)])
        batches += list(members.reshape(-1, batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(split: TokenizedSplit, buckets: tuple[int, ...], batch_size: int, seed: int = 0) -> list[np.ndarray]:
    """Every example exactly once, grouped by bucket; -1 marks filler rows of a bucket's last batch.

    The order is a fixed shuffle, so the first `train.eval_steps` batches are a sample of the split,
    not its first class (tables are often sorted by label)."""
    rng = np.random.default_rng(seed)
    bucket_N = assign_buckets(np.asarray([len(t) for t in split.tokens]), buckets)
    batches = []
    for bucket in np.unique(bucket_N):
        members = rng.permutation(np.flatnonzero(bucket_N == bucket))
        members = np.concatenate([members, np.full(-len(members) % batch_size, -1)])
        batches += list(members.reshape(-1, batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def pad_batch(split: TokenizedSplit, indices_B: np.ndarray, buckets: tuple[int, ...], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded tokens with segment ids (1 = sequence, 0 = padding), labels and example weights.

    Filler rows (index -1) are all padding with weight 0, so they count in no loss or metric.
    """
    lengths_B = np.asarray([len(split.tokens[i]) if i >= 0 else 0 for i in indices_B])
    padded_len = buckets[int(np.searchsorted(np.asarray(buckets), max(lengths_B.max(), 1)))]
    tokens_BxL = np.full((len(indices_B), padded_len), pad_id, np.int32)
    segment_ids_BxL = np.zeros((len(indices_B), padded_len), np.int32)
    for row, (i, length) in enumerate(zip(indices_B, lengths_B)):
        if i >= 0:
            tokens_BxL[row, :length] = split.tokens[i]
            segment_ids_BxL[row, :length] = 1
    valid_B = indices_B >= 0
    return {
        "tokens": tokens_BxL,
        "segment_ids": segment_ids_BxL,
        "labels": np.where(valid_B, split.labels_N[np.maximum(indices_B, 0)], 0).astype(np.int32),
        "weights": valid_B.astype(np.float32),
    }

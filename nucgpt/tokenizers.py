"""DNA tokenizers over softmasked text: vectorised numpy lookup tables, no per-base Python loops.

Every tokenizer returns ids, a repeat mask (the token comes from lowercase, RepeatMasker-masked
bases) and a valid mask (the token counts in the loss: not PAD, not N / UNK). PAD is id 0 for all,
so one padding convention serves every model.

- `nucleotide`: P,A,C,G,T,N = 0..5, case-insensitive; repeat = lowercase base. IUPAC codes were
  mapped to N by prepare; any other byte is N here too.
- `kmer6_overlap`: PAD=0, UNK=1, the 4,096 6-mers = 2..4097 (A<C<G<T, first base most
  significant); one token per position, so L bp → L-5 tokens; a 6-mer with an N is UNK; repeat =
  more than 3 of its 6 bases lowercase.
- `kmer6_nonoverlap`: the same vocabulary over consecutive 6-mers, L bp → ceil(L/6) tokens (a short
  last k-mer is UNK).
Both k-mer tokenizers pad their token count to a multiple of `pad_multiple` (8,192 bp → 8,187 →
8,192 overlapping; → 1,366 → 1,536 non-overlapping with the default 512).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nucgpt.errors import UserError

PAD_ID = 0
K = 6
KMER_UNK_ID = 1
KMER_VOCAB_SIZE = 2 + 4**K

_NUCLEOTIDE_ID_U8 = np.full(256, 5, np.uint8)  # anything that is not A/C/G/T (either case) is N
for _i, _base in enumerate(b"ACGT"):
    _NUCLEOTIDE_ID_U8[_base] = _NUCLEOTIDE_ID_U8[_base + 32] = _i + 1
_IS_LOWER_U8 = np.zeros(256, bool)
_IS_LOWER_U8[ord("a") : ord("z") + 1] = True
# Base code for k-mers: A,C,G,T = 0..3; 4 marks N (or anything else) so that the k-mer becomes UNK.
_BASE_CODE_U8 = np.where(_NUCLEOTIDE_ID_U8 <= 4, _NUCLEOTIDE_ID_U8.astype(np.int32) - 1, 4).astype(np.uint8)
BASES = "ACGT"  # base code order, and the k-mer digit order (first base most significant)
_CODE_BASE_U8 = np.frombuffer(b"ACGTN", np.uint8)  # base code → uppercase base
_NUCLEOTIDE_BASE_U8 = np.frombuffer(b"NACGTN", np.uint8)  # nucleotide id → base; PAD reads as N


def base_codes(seq: bytes | str | np.ndarray) -> np.ndarray:
    """Per base: A,C,G,T (either case) = 0..3 (the index into BASES), anything else (N) = 4."""
    return _BASE_CODE_U8[_as_u8(seq)]


def _as_u8(seq: bytes | str | np.ndarray) -> np.ndarray:
    if isinstance(seq, np.ndarray):
        return seq.astype(np.uint8, copy=False)
    if isinstance(seq, str):
        seq = seq.encode("ascii")
    return np.frombuffer(seq, np.uint8)


def _pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if n > 0 else 0


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """One tokenizer: `encode` maps softmasked bytes to (ids, repeat, valid) arrays of equal length."""

    name: str
    vocab_size: int
    k: int  # bases per token (1 for nucleotide)
    overlap: bool  # k-mers at every position (True) or consecutive (False)
    pad_multiple: int  # token count padded to a multiple of this (1 = no padding)
    pad_id: int = PAD_ID

    def num_tokens(self, num_bp: int) -> int:
        """Tokens for `num_bp` bases, after padding rules."""
        if self.k == 1:
            raw = num_bp
        elif self.overlap:
            raw = max(num_bp - self.k + 1, 0)
        else:
            raw = -(-num_bp // self.k)
        return _pad_to(raw, self.pad_multiple)

    def encode(self, seq: bytes | str | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids int32 [T], repeat bool [T], valid bool [T] with T = num_tokens(len(seq))."""
        seq_u8 = _as_u8(seq)
        if self.k == 1:
            ids = _NUCLEOTIDE_ID_U8[seq_u8].astype(np.int32)
            repeat = _IS_LOWER_U8[seq_u8]
            valid = ids < 5
        else:
            ids, repeat, valid = self._encode_kmers(seq_u8)
        total = self.num_tokens(len(seq_u8))
        pad = total - len(ids)
        if pad:
            ids = np.concatenate([ids, np.full(pad, PAD_ID, np.int32)])
            repeat = np.concatenate([repeat, np.zeros(pad, bool)])
            valid = np.concatenate([valid, np.zeros(pad, bool)])
        return ids, repeat, valid

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [..., T] → uppercase bases, uint8 [..., bases]: the inverse of `encode` up to case
        for unpadded ids whose k-mers hold no N.

        PAD and UNK read as N (k N's per consecutive k-mer). Consecutive k-mers give T·k bases;
        overlapping ones the first base of each k-mer then the rest of the last, T + k - 1 (so a PAD
        or UNK last token turns the last k - 1 bases to N too).
        """
        ids = np.asarray(ids)
        if self.k == 1:
            return _NUCLEOTIDE_BASE_U8[ids]
        shifts_K = 2 * np.arange(self.k - 1, -1, -1)
        codes_TxK = np.where(ids[..., None] >= 2, ((ids[..., None] - 2) >> shifts_K) & 3, 4)
        if self.overlap:
            codes_TxK = np.concatenate([codes_TxK[..., :, 0], codes_TxK[..., -1, 1:]], axis=-1) if ids.shape[-1] else codes_TxK[..., 0]
        return _CODE_BASE_U8[codes_TxK].reshape(ids.shape[:-1] + (-1,))

    def _encode_kmers(self, seq_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = self.k
        if not self.overlap and len(seq_u8) % k:
            # The short last k-mer gets an N fill, which makes it UNK.
            seq_u8 = np.concatenate([seq_u8, np.full(k - len(seq_u8) % k, ord("N"), np.uint8)])
        code = _BASE_CODE_U8[seq_u8].astype(np.int32)
        lower = _IS_LOWER_U8[seq_u8].astype(np.int32)
        num = len(seq_u8) - k + 1 if self.overlap else len(seq_u8) // k
        if num <= 0:
            return np.zeros(0, np.int32), np.zeros(0, bool), np.zeros(0, bool)
        step = 1 if self.overlap else k
        index = np.zeros(num, np.int32)
        num_n = np.zeros(num, np.int32)
        num_lower = np.zeros(num, np.int32)
        for j in range(k):  # k shifted views: a loop over the 6 positions of a k-mer, not over bases
            code_j = code[j : j + step * num : step]
            index = index * 4 + np.minimum(code_j, 3)
            num_n += code_j == 4
            num_lower += lower[j : j + step * num : step]
        valid = num_n == 0
        ids = np.where(valid, index + 2, KMER_UNK_ID).astype(np.int32)
        return ids, num_lower > k // 2, valid


def get_tokenizer(name: str, *, pad_multiple: int = 512) -> Tokenizer:
    """The tokenizer called `name`: nucleotide | kmer6_overlap | kmer6_nonoverlap."""
    if name == "nucleotide":
        return Tokenizer(name, vocab_size=6, k=1, overlap=False, pad_multiple=1)
    if name in ("kmer6_overlap", "kmer6_nonoverlap"):
        if pad_multiple <= 0:
            raise UserError(f"kmer_pad_multiple must be positive, got {pad_multiple}")
        return Tokenizer(
            name, vocab_size=KMER_VOCAB_SIZE, k=K, overlap=name == "kmer6_overlap", pad_multiple=pad_multiple
        )
    raise UserError(f"unknown tokenizer {name!r}; choose nucleotide, kmer6_overlap or kmer6_nonoverlap")

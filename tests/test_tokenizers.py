import numpy as np
import pytest

from nucgpt.errors import UserError
from nucgpt.tokenizers import KMER_UNK_ID, KMER_VOCAB_SIZE, PAD_ID, get_tokenizer


def _kmer_reference(seq: str, overlap: bool) -> tuple[list[int], list[bool], list[bool]]:
    """A per-k-mer Python reference for the vectorised tokenizer."""
    step = 1 if overlap else 6
    ids, repeat, valid = [], [], []
    for i in range(0, len(seq) - 5 if overlap else len(seq), step):
        kmer = seq[i : i + 6]
        is_valid = len(kmer) == 6 and all(b in "ACGT" for b in kmer.upper())
        ids.append(2 + int(kmer.upper().translate(str.maketrans("ACGT", "0123")), 4) if is_valid else KMER_UNK_ID)
        repeat.append(sum(b.islower() for b in kmer) > 3)
        valid.append(is_valid)
    return ids, repeat, valid


def test_nucleotide_ids_case_insensitive_repeat_is_lowercase():
    tok = get_tokenizer("nucleotide")
    ids, repeat, valid = tok.encode("ACGTNacgtnR")
    assert ids.tolist() == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 5]
    assert repeat.tolist() == [False] * 5 + [True] * 5 + [False]
    assert valid.tolist() == [True] * 4 + [False] + [True] * 4 + [False, False]
    assert (tok.vocab_size, tok.pad_id, tok.num_tokens(8192)) == (6, PAD_ID, 8192)


def test_kmer6_overlap_hand_checked():
    tok = get_tokenizer("kmer6_overlap", pad_multiple=4)
    ids, repeat, valid = tok.encode("aaaaAACG")
    # AAAAAA = 0, AAAAAC = 1, AAAACG = 0b000000000110 = 6; +2 for PAD and UNK; padded 3 → 4.
    assert ids.tolist() == [2, 3, 8, PAD_ID]
    assert repeat.tolist() == [True, False, False, False]  # 4, 3 and 2 lowercase bases of 6
    assert valid.tolist() == [True, True, True, False]
    assert get_tokenizer("kmer6_overlap").encode("TTTTTT")[0][0] == KMER_VOCAB_SIZE - 1 == 4097


def test_kmer_with_n_is_unk_and_invalid():
    ids, _, valid = get_tokenizer("kmer6_overlap", pad_multiple=1).encode("AAAAANAC")
    assert ids.tolist() == [KMER_UNK_ID] * 3
    assert not valid.any()


def test_kmer6_nonoverlap_short_last_kmer_is_unk():
    tok = get_tokenizer("kmer6_nonoverlap", pad_multiple=4)
    ids, repeat, valid = tok.encode("ACGTACgtac")
    assert ids.tolist() == [2 + int("012301", 4), KMER_UNK_ID, PAD_ID, PAD_ID]
    assert valid.tolist() == [True, False, False, False]
    assert repeat.tolist() == [False, True, False, False]  # gtac + 2 fill bases: 4 lowercase of 6


@pytest.mark.parametrize("name,tokens", [("nucleotide", 8192), ("kmer6_overlap", 8192), ("kmer6_nonoverlap", 1536)])
def test_8192_bp_token_counts(name, tokens):
    tok = get_tokenizer(name)
    seq = np.random.default_rng(0).choice(list(b"ACGTacgt"), 8192).astype(np.uint8)
    ids, repeat, valid = tok.encode(seq)
    assert tok.num_tokens(8192) == len(ids) == len(repeat) == len(valid) == tokens
    real = {"nucleotide": 8192, "kmer6_overlap": 8187, "kmer6_nonoverlap": 1366}[name]
    assert (ids != PAD_ID).sum() == real


@pytest.mark.parametrize("name", ["kmer6_overlap", "kmer6_nonoverlap"])
def test_kmer_matches_python_reference(name):
    rng = np.random.default_rng(1)
    seq = "".join(rng.choice(list("ACGTNacgtn"), 301, p=[0.12] * 4 + [0.02] * 2 + [0.12] * 4))
    ids, repeat, valid = get_tokenizer(name, pad_multiple=1).encode(seq)
    ref_ids, ref_repeat, ref_valid = _kmer_reference(seq, overlap=name == "kmer6_overlap")
    assert ids.tolist() == ref_ids and repeat.tolist() == ref_repeat and valid.tolist() == ref_valid


def test_unknown_tokenizer_is_user_error():
    with pytest.raises(UserError, match="unknown tokenizer 'bpe'"):
        get_tokenizer("bpe")


@pytest.mark.parametrize("name", ["nucleotide", "kmer6_overlap", "kmer6_nonoverlap"])
def test_decode_inverts_encode_up_to_case(name):
    tokenizer = get_tokenizer(name, pad_multiple=1)
    bases = "ACGTTGCAAGCttttttTACGGACGA"[: 24 if name == "kmer6_nonoverlap" else 26]
    ids, _, _ = tokenizer.encode(bases)
    assert tokenizer.decode(ids).tobytes().decode() == bases.upper()
    assert tokenizer.decode(np.stack([ids, ids])).shape == (2, len(bases))  # any leading batch shape
    k = 1 if name == "nucleotide" else 6
    assert tokenizer.decode(tokenizer.encode("N" if k == 1 else "ACNGTA")[0]).tobytes() == b"N" * k  # N / UNK
    assert tokenizer.decode(np.array([PAD_ID])).tobytes() == b"N" * k


@pytest.mark.parametrize("name", ["kmer6_overlap", "kmer6_nonoverlap"])
def test_kmer_pad_multiple_never_reaches_a_training_row(name):
    """Why data.kmer_pad_multiple is no architecture field: the pipeline crops/pads each record to
    train.seq_len with the same PAD, so the tokenizer's own padding leaves every row unchanged."""
    from nucgpt.data.pipeline import LmExample
    from nucgpt.data.records import encode_record

    rng = np.random.default_rng(2)
    for bp in (40, 100, 8192):  # shorter and longer than a row of 20 tokens
        record = encode_record("chr1", 0, rng.choice(list(b"ACGTNacgt"), bp).astype(np.uint8).tobytes())
        rows = [LmExample(get_tokenizer(name, pad_multiple=m), 20, 0.0).random_map(record, None) for m in (1, 8, 512)]
        for row in rows[1:]:
            assert row.keys() == rows[0].keys()
            for key in row:
                np.testing.assert_array_equal(row[key], rows[0][key], err_msg=f"{name} {bp} bp {key}")

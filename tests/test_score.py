"""Scoring: each record's log-likelihood is the model's own loss on it, however records are batched."""

import math
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from nucgpt import loss as lm_loss
from nucgpt import score
from nucgpt.tokenizers import get_tokenizer
from test_generate import checkpoint_config, init_model, write_checkpoint

SEQ_LEN = 64  # checkpoint_config's train.seq_len; buckets of 64 only (bucket_lengths starts at 64)


@pytest.fixture(scope="module")
def model():
    config = checkpoint_config()
    return config, init_model(config.model)


def reference_log_likelihood(model_, sequence: bytes) -> tuple[float, int]:
    """Σ log p over valid targets from one unpadded forward pass of the whole record."""
    ids, _, valid = get_tokenizer("nucleotide").encode(sequence)
    logits = model_(ids[None, :-1])
    log_p = -np.asarray(lm_loss.cross_entropy(logits, ids[None, 1:]))[0]
    return float(np.sum(log_p * valid[1:])), int(valid[1:].sum())


def test_scores_match_the_unpadded_forward_pass_in_any_batching(model, monkeypatch):
    """On 8 devices (each its rows of a batch) and on one, batched any way: the one-pass reference."""
    config, model_ = model
    devices_per_batch = []
    row_sums = score._row_sums

    def spy(graphdef, params, inputs_BxL, *rest):
        devices_per_batch.append(len(inputs_BxL.sharding.device_set))
        return row_sums(graphdef, params, inputs_BxL, *rest)

    monkeypatch.setattr(score, "_row_sums", spy)
    rng = np.random.default_rng(0)
    context = 128  # padded lengths 64 and 128: records of up to 65 tokens go to the first, the rest to the second
    lengths = [129, 2, 30, 65, 66, 17]  # 129 bases = context + 1 tokens: the longest that fits
    records = [score.Record(f"r{i}", rng.choice(list(b"ACGTacgt"), n).astype(np.uint8).tobytes()) for i, n in enumerate(lengths)]
    records.append(score.Record("with_n", b"ACGTNNacgtAC"))
    tokenizer = get_tokenizer("nucleotide")
    tokenized = [score.tokenize(r, tokenizer) for r in records]
    graphdef, state = nnx.split(model_)
    rules = config.mesh.logical_axis_rules
    rows = score.score_records(records, tokenized, graphdef, nnx.to_pure_dict(state), context, 1, batch_size=4,
                               rules=rules)
    assert devices_per_batch == [8, 8] and jax.device_count() == 8  # batch 4 rounds up to 8 rows: one per bucket
    assert [row["name"] for row in rows] == [r.name for r in records]
    for record, row in zip(records, rows):
        expected, scored = reference_log_likelihood(model_, record.sequence)
        assert row["scored_tokens"] == scored and row["bases"] == len(record.sequence)
        np.testing.assert_allclose(row["log_likelihood"], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(row["bits_per_base"], -expected / scored / math.log(2), rtol=1e-5)
        assert row["repeat_tokens"] + row["unique_tokens"] == scored
        repeat_nats = row["bits_per_base_repeat"] * math.log(2) * row["repeat_tokens"] if row["repeat_tokens"] else 0.0
        unique_nats = row["bits_per_base_unique"] * math.log(2) * row["unique_tokens"] if row["unique_tokens"] else 0.0
        np.testing.assert_allclose(repeat_nats + unique_nats, -expected, rtol=1e-5, atol=1e-5)
    assert rows[-1]["scored_tokens"] == 9  # 11 targets; the two N are not scored (as in the training loss)
    again = score.score_records(records[::-1], tokenized[::-1], graphdef, nnx.to_pure_dict(state), context, 1, batch_size=1,
                                rules=rules, devices=jax.devices()[:1])
    assert devices_per_batch[2:] == [1] * 7
    for a, b in zip(rows, again[::-1]):
        np.testing.assert_allclose(a["log_likelihood"], b["log_likelihood"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "tokenizer, refused, accepted",
    [
        ("nucleotide", [b"A", b"AN", b"NNNN"], [b"AC", b"NAC"]),
        ("kmer6_overlap", [b"ACGTA", b"ACGTAC", b"ACGTACN"], [b"ACGTACG"]),
        # a short last k-mer is UNK: 7 and 10 bp are one k-mer to read and none to predict
        ("kmer6_nonoverlap", [b"ACGTA", b"ACGTAC", b"ACGTACG", b"ACGTACGTAC", b"ACGTACNNNNNN"], [b"ACGTACGTACGT", b"ACGTACGTACGTA"]),
    ],
)
def test_a_record_without_a_target_to_score_is_refused_by_every_tokenizer(tokenizer, refused, accepted):
    """One rule for all: a valid target (after the first token, not N/UNK/padding), else a row of nan."""
    tok = get_tokenizer(tokenizer, pad_multiple=1)
    for sequence in refused:
        tokens = len(tok.encode(sequence)[0])
        with pytest.raises(score.UserError, match=rf"^record 'r': {len(sequence)} bp is {tokens} token\(s\) of {tokenizer} "
                                                  r"with none to score .*scoring needs at least one$"):
            score.tokenize(score.Record("r", sequence), tok)
    for sequence in accepted:
        assert score.tokenize(score.Record("r", sequence), tok)[2][1:].sum() >= 1


def test_the_unscored_end_of_consecutive_kmer_records_is_noted():
    records = [score.Record("whole", b"ACGTAC" * 2), score.Record("ref", b"ACGTAC" * 2 + b"A"),
               score.Record("alt", b"ACGTAC" * 2 + b"CGTAC")]
    note = score.tail_note(records, get_tokenizer("kmer6_nonoverlap", pad_multiple=1))
    assert note == ("kmer6_nonoverlap reads a short last 6-mer as UNK, so the last `bases` % 6 bases of 2 of 3 record(s) "
                    "(6 bp in all; first 'ref', 1 bp) are not scored: records that differ only there score the same")
    for name in ("nucleotide", "kmer6_overlap"):  # every base is in a scored token
        assert score.tail_note(records, get_tokenizer(name, pad_multiple=1)) is None
    assert score.tail_note(records[:1], get_tokenizer("kmer6_nonoverlap", pad_multiple=1)) is None


def test_windows_score_every_target_once_with_the_promised_context():
    ids = np.arange(1, 21)  # 20 tokens: targets 1..19
    valid = np.ones(20, bool)
    valid[7] = False  # an N: never scored
    pieces = score.windows(0, ids, np.zeros(20, bool), valid, max_tokens=8, stride=3)
    assert [int(w.ids[0]) for w in pieces] == [1, 4, 7, 10, 13]  # starts 0, 3, 6, 9 and the last, 12 = 20 - 8
    scored_targets = np.concatenate([w.ids[1:][w.scored] for w in pieces])
    np.testing.assert_array_equal(np.sort(scored_targets), [t + 1 for t in range(1, 20) if t != 7])
    assert len(set(scored_targets.tolist())) == len(scored_targets)
    for w in pieces[1:]:  # past the record's start, a scored target has >= max_tokens - stride = 5 tokens before it
        assert np.flatnonzero(w.scored).min() + 1 >= 5
    assert len(score.windows(0, ids, np.zeros(20, bool), valid, max_tokens=20, stride=3)) == 1


def test_a_long_record_is_the_sum_of_its_windows(model):
    """Batching and adding windows back into their record: the record's score is Σ over its windows of
    each window's own forward pass, restricted to the targets it scores."""
    config, model_ = model
    rng = np.random.default_rng(1)
    records = [score.Record("long", rng.choice(list(b"ACGTacgt"), 300).astype(np.uint8).tobytes()),
               score.Record("short", b"ACGTacgtAC")]
    tokenizer = get_tokenizer("nucleotide")
    tokenized = [score.tokenize(r, tokenizer) for r in records]
    graphdef, state = nnx.split(model_)
    rows = score.score_records(records, tokenized, graphdef, nnx.to_pure_dict(state), 64, 1, batch_size=4, stride=40,
                               rules=config.mesh.logical_axis_rules)
    expected = 0.0
    for w in score.windows(0, *tokenized[0], max_tokens=65, stride=40):
        log_p = -np.asarray(lm_loss.cross_entropy(model_(w.ids[None, :-1]), w.ids[None, 1:]))[0]
        expected += float(np.sum(log_p * w.scored))
    assert rows[0]["scored_tokens"] == 299 and not np.isnan(rows[0]["target_log_p"]).any()  # every target, once
    np.testing.assert_allclose(np.sum(rows[0]["target_log_p"]), rows[0]["log_likelihood"], rtol=1e-5)
    np.testing.assert_allclose(rows[0]["log_likelihood"], expected, rtol=1e-5)
    np.testing.assert_allclose(rows[1]["log_likelihood"], reference_log_likelihood(model_, records[1].sequence)[0], rtol=1e-5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    config, model_ = model
    return write_checkpoint(tmp_path_factory.mktemp("pretrain"), config, nnx.to_pure_dict(nnx.state(model_)))


def test_writes_one_row_per_record(tmp_path, capsys, checkpoint, model):
    fasta = tmp_path / "in.fa"
    fasta.write_text(">ref chr1:100-130\nACGTACGTTTGACCAGGTacgtacgtacgtaa\n>alt\nACGTACGTTTGACCAGGTacgtacgtacgtac\n")
    output, per_token = tmp_path / "out" / "scores.tsv", tmp_path / "out" / "per_token.tsv"
    score.score_fasta(str(checkpoint), str(fasta), str(output), per_token=str(per_token))
    out = capsys.readouterr().out
    header, *lines = output.read_text().splitlines()
    assert header.split("\t") == list(score.COLUMNS)
    assert [line.split("\t")[0] for line in lines] == ["ref", "alt"]
    ref = dict(zip(score.COLUMNS, lines[0].split("\t")))
    expected, scored = reference_log_likelihood(model[1], b"ACGTACGTTTGACCAGGTacgtacgtacgtaa")
    assert int(ref["scored_tokens"]) == scored == 31 and int(ref["repeat_tokens"]) == 14
    np.testing.assert_allclose(float(ref["log_likelihood"]), expected, atol=2e-6)
    assert sorted(p.name for p in output.parent.iterdir()) == ["per_token.tsv", "scores.tsv"]
    assert "scored 2 record(s), 64 bp" in out
    token_header, *token_lines = per_token.read_text().splitlines()
    assert token_header == "name\tposition\tbases\tlog_p"
    ref_tokens = [line.split("\t") for line in token_lines if line.startswith("ref\t")]
    sequence = "ACGTACGTTTGACCAGGTacgtacgtacgtaa"
    assert [(int(p), b) for _, p, b, _ in ref_tokens] == [(i, sequence[i]) for i in range(1, 32)]
    np.testing.assert_allclose(sum(float(lp) for *_, lp in ref_tokens), float(ref["log_likelihood"]), atol=1e-4)


@pytest.mark.parametrize(
    "fasta_text, message",
    [
        (">a\n>b\nACGT\n", r"--fasta .*in.fa: record 'a': no bases"),
        ("", r".*in.fa: empty file"),
        (">a\nACGTXA\n", r".*in.fa:2: invalid character 'X'"),
    ],
)
def test_bad_input_is_refused_before_the_model_loads_and_writes_nothing(tmp_path, checkpoint, fasta_text, message, monkeypatch):
    fasta = tmp_path / "in.fa"
    fasta.write_text(fasta_text)
    monkeypatch.setattr(score.pretrained, "load_for_inference", lambda *_: pytest.fail("the model was loaded"))
    with pytest.raises(score.UserError, match=message):
        score.score_fasta(str(checkpoint), str(fasta), str(tmp_path / "out.tsv"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fa"]


def test_cli_error_is_one_line_exit_2(tmp_path):
    """The command itself: a user error is one `error:` line on stderr and exit status 2."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "nucgpt.score", "--checkpoint", str(tmp_path / "none"), "--fasta", "x.fa",
                             "--output", str(tmp_path / "o.tsv")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: --checkpoint: no checkpoint found"), result.stderr
    assert result.stderr.count("\n") == 1 and not list(tmp_path.iterdir())


def test_per_token_output_must_be_another_file(tmp_path, checkpoint):
    fasta = tmp_path / "in.fa"
    fasta.write_text(">a\nACGTACGT\n")
    with pytest.raises(score.UserError, match=r"--per_token .*same.tsv is also --output; give two files"):
        score.score_fasta(str(checkpoint), str(fasta), str(tmp_path / "same.tsv"), per_token=str(tmp_path / "same.tsv"))
    with pytest.raises(score.UserError, match=r"--fasta .*: is a folder"):
        score.score_fasta(str(checkpoint), str(tmp_path), str(tmp_path / "o.tsv"))


def test_a_damaged_checkpoint_is_one_user_error(tmp_path, checkpoint):
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    for params in damaged.glob("**/params"):  # a partial copy: the arrays are gone, the metadata is not
        for path in params.iterdir():
            if path.name not in ("_METADATA", "commit_success.txt"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    (tmp_path / "in.fa").write_text(">a\nACGTACGT\n")
    with pytest.raises(score.UserError, match=r"--checkpoint .*: unreadable parameters"):
        score.score_fasta(str(damaged), str(tmp_path / "in.fa"), str(tmp_path / "o.tsv"))
    assert not (tmp_path / "o.tsv").exists()


def test_an_existing_output_is_replaced(tmp_path, checkpoint):
    fasta, output = tmp_path / "in.fa", tmp_path / "scores.tsv"
    fasta.write_text(">a\nACGTACGT\n")
    output.write_text("old\n")
    score.score_fasta(str(checkpoint), str(fasta), str(output))
    assert output.read_text().startswith("name\tbases")


def test_per_token_positions_of_kmer_tokens(tmp_path):
    """A consecutive 6-mer target's position is its first base's; an unscored (NaN) target is left out."""
    records = [score.Record("r", b"ACGTACggttccAAAAAAC")]  # tokens ACGTAC | ggttcc | AAAAAA | C (short: UNK)
    rows = [{"target_log_p": np.array([-1.5, -2.25, np.nan])}]
    path = tmp_path / "t.tsv"
    score.write_per_token(str(path), records, rows, get_tokenizer("kmer6_nonoverlap", pad_multiple=1))
    assert path.read_text().splitlines()[1:] == ["r\t6\tggttcc\t-1.500000", "r\t12\tAAAAAA\t-2.250000"]


def test_a_kmer6_nonoverlap_checkpoint_says_which_bases_it_did_not_score(tmp_path, capsys, monkeypatch):
    """End to end: records that differ only in a short last 6-mer score the same, and stdout says so;
    a record of 10 bp (one 6-mer and an UNK) is refused before the model loads."""
    config = checkpoint_config(data__tokenizer="kmer6_nonoverlap", model__vocab_size=4098)
    workdir = write_checkpoint(tmp_path / "pretrain", config, nnx.to_pure_dict(nnx.state(init_model(config.model))))
    fasta, output = tmp_path / "in.fa", tmp_path / "scores.tsv"
    flank = "ACGTTGCAAGCTTTTTTACGGACGA"[:24]
    fasta.write_text(f">whole\n{flank}\n>ref\n{flank}A\n>alt\n{flank}G\n")
    rows = score.score_fasta(str(workdir), str(fasta), str(output))
    out = capsys.readouterr().out
    assert (f"note: --fasta {fasta}: kmer6_nonoverlap reads a short last 6-mer as UNK, so the last `bases` % 6 bases of "
            "2 of 3 record(s) (2 bp in all; first 'ref', 1 bp) are not scored") in out
    assert [row["scored_tokens"] for row in rows] == [3, 3, 3]
    assert rows[0]["log_likelihood"] == rows[1]["log_likelihood"] == rows[2]["log_likelihood"]
    fasta.write_text(f">ok\n{flank}\n>short\nACGTACGTAC\n")
    monkeypatch.setattr(score.pretrained, "load_for_inference", lambda *_: pytest.fail("the model was loaded"))
    with pytest.raises(score.UserError, match=r"record 'short': 10 bp is 2 token\(s\) of kmer6_nonoverlap with none to score"):
        score.score_fasta(str(workdir), str(fasta), str(tmp_path / "o2.tsv"))

"""Generation: cached decoding is the full forward pass; sampling obeys its flags; the CLI end to end."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from flax import nnx

from configs.pretrain import get_config
from nucgpt import generate
from nucgpt.errors import UserError
from nucgpt.model import Transformer
from nucgpt.tokenizers import get_tokenizer
from test_model import tiny_cfg

NUCLEOTIDE = get_tokenizer("nucleotide")
KMER = get_tokenizer("kmer6_nonoverlap", pad_multiple=1)


def init_model(cfg) -> Transformer:
    """Random parameters drawn by numpy (norm scales around 1): compiling jax's init takes ~10 s here.
    On device 0, as `pretrained.load_for_inference` restores them, so both share compiled functions."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (("norm" in jax.tree_util.keystr(path)) + 0.3 * rng.standard_normal(x.shape)).astype(x.dtype),
        nnx.to_pure_dict(state),
    )
    params = jax.device_put(params, jax.devices()[0])
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# One set of shapes for every sampling test and the CLI run: they share one compiled sampling loop.
SAMPLES, PROMPT_LEN, NUM_TOKENS = 3, 4, 8


@functools.cache
def tiny_model(**overrides) -> Transformer:
    """`tiny_cfg` with attention `auto` (xla on CPU), as generation loads every checkpoint."""
    return init_model(tiny_cfg(attention="auto", **overrides))


@functools.partial(jax.jit, static_argnames=("graphdef", "prefix", "max_len"))
def teacher_forced_logits(graphdef, state, tokens_BxL, *, prefix: int, max_len: int):
    """Logits for positions prefix-1..L-1: prefill the first `prefix` tokens, then decode the rest one by one."""
    model = nnx.merge(graphdef, state)
    batch, length = tokens_BxL.shape
    logits_BxV, cache = model.prefill(tokens_BxL[:, :prefix], model.init_cache(batch, max_len))

    def step(cache, position):
        token_Bx1 = jax.lax.dynamic_slice_in_dim(tokens_BxL, position, 1, axis=1)
        logits_BxV, cache = model.decode_step(token_Bx1, position, cache)
        return cache, logits_BxV

    _, rest_LxBxV = jax.lax.scan(step, cache, jnp.arange(prefix, length))
    return jnp.concatenate([logits_BxV[:, None], rest_LxBxV.transpose(1, 0, 2)], axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def full_logits(graphdef, state, tokens_BxL):
    return nnx.merge(graphdef, state)(tokens_BxL)


@pytest.mark.parametrize(
    "overrides",
    # Scanned and unrolled layers run the same block code, so two models cover both norms and MLPs.
    [
        dict(scan_layers=True, norm_placement="sandwich", mlp_activation="gelu"),
        dict(scan_layers=False, norm_placement="pre", mlp_activation="swiglu"),
    ],
    ids=["scan-sandwich-gelu", "unrolled-pre-swiglu"],
)
def test_cached_decoding_reproduces_the_full_forward_pass(overrides):
    graphdef, state = nnx.split(tiny_model(**overrides))
    tokens_BxL = jax.random.randint(jax.random.key(1), (SAMPLES, PROMPT_LEN + NUM_TOKENS), 0, 6)
    # A cache longer than the sequence: its unwritten (zero) slots must stay invisible.
    cached = teacher_forced_logits(graphdef, state, tokens_BxL, prefix=5, max_len=PROMPT_LEN + NUM_TOKENS + 4)
    full = full_logits(graphdef, state, tokens_BxL)
    assert cached.shape == (SAMPLES, PROMPT_LEN + NUM_TOKENS - 4, 6)
    np.testing.assert_allclose(cached, full[:, 4:], atol=1e-5, rtol=0)


PROMPT = [2, 2, 3, 1]


def draw(*, allow_n=False, **settings) -> np.ndarray:
    allowed_V = generate.allowed_tokens(NUCLEOTIDE, 6, allow_n=allow_n)
    return generate.sample(tiny_model(), np.array(PROMPT, np.int32), NUM_TOKENS, num_samples=SAMPLES, allowed_V=allowed_V, **settings)


def ranks(generated_SxT: np.ndarray) -> np.ndarray:
    """Each generated token's rank among the allowed tokens (0: the most likely), by the full forward pass."""
    graphdef, state = nnx.split(tiny_model())
    sequence_SxL = np.concatenate([np.tile(PROMPT, (SAMPLES, 1)), generated_SxT], axis=1)
    logits_SxTxV = np.asarray(full_logits(graphdef, state, jnp.asarray(sequence_SxL, jnp.int32)))[:, PROMPT_LEN - 1 : -1]
    logits_SxTxV = np.where(generate.allowed_tokens(NUCLEOTIDE, 6, allow_n=False), logits_SxTxV, -np.inf)
    chosen_SxTx1 = np.take_along_axis(logits_SxTxV, generated_SxT[..., None], axis=-1)
    return (logits_SxTxV > chosen_SxTx1).sum(axis=-1)


def test_greedy_generation_equals_rerunning_the_whole_model():
    graphdef, state = nnx.split(tiny_model())
    greedy = draw(temperature=0.0)
    # The naive loop: the whole model over the sequence so far (a causal model ignores the unused tail).
    sequence_SxL = np.zeros((SAMPLES, PROMPT_LEN + NUM_TOKENS), np.int32)
    sequence_SxL[:, :PROMPT_LEN] = PROMPT
    allowed_V = generate.allowed_tokens(NUCLEOTIDE, 6, allow_n=False)
    for position in range(PROMPT_LEN, PROMPT_LEN + NUM_TOKENS):
        logits_SxV = np.asarray(full_logits(graphdef, state, jnp.asarray(sequence_SxL)))[:, position - 1]
        sequence_SxL[:, position] = np.argmax(np.where(allowed_V, logits_SxV, -np.inf), axis=-1)
    np.testing.assert_array_equal(greedy, sequence_SxL[:, PROMPT_LEN:])
    assert len(np.unique(greedy)) > 1  # a model that always says one base would prove little


def test_sampling_is_reproducible_and_never_picks_pad_or_n():
    first, again, other = draw(temperature=5.0, seed=3), draw(temperature=5.0, seed=3), draw(temperature=5.0, seed=4)
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()
    assert set(np.unique(np.concatenate([first, other]))) == {1, 2, 3, 4}
    # At this temperature N does come up once allowed: the mask is what kept it out.
    with_n = draw(temperature=5.0, seed=3, allow_n=True)
    assert 5 in with_n and 0 not in with_n


def test_samples_are_split_over_devices_and_equal_on_one(monkeypatch):
    """Samples go to as many of the 8 devices as divide their number; the draws are those of one device."""
    devices_per_call = []
    sample_loop = generate._sample

    def spy(graphdef, state, prompt_SxP, *rest, **kwargs):
        devices_per_call.append(len(prompt_SxP.sharding.device_set))
        return sample_loop(graphdef, state, prompt_SxP, *rest, **kwargs)

    monkeypatch.setattr(generate, "_sample", spy)
    allowed_V = generate.allowed_tokens(NUCLEOTIDE, 6, allow_n=False)
    on_one = generate.sample(tiny_model(), np.array(PROMPT, np.int32), NUM_TOKENS, num_samples=SAMPLES,
                             allowed_V=allowed_V, temperature=5.0, seed=3, devices=jax.devices()[:1])
    spread = draw(temperature=5.0, seed=3)
    assert devices_per_call == [1, SAMPLES] and jax.device_count() == 8
    np.testing.assert_array_equal(spread, on_one)
    assert (spread[0] != spread[1]).any()


def test_top_k_keeps_the_k_most_likely_tokens_and_top_1_is_greedy():
    np.testing.assert_array_equal(draw(temperature=1.0, top_k=1, seed=7), draw(temperature=0.0))
    assert (ranks(draw(temperature=5.0, top_k=2, seed=3)) < 2).all()
    assert (ranks(draw(temperature=5.0, seed=3)) >= 2).any()  # untruncated, less likely tokens do come up


def test_kmer_tokens_decode_to_their_bases_and_pad_unk_are_never_allowed():
    bases = "ACGTTGCAAGCTTTTTTTACGGAC"
    ids, _, _ = KMER.encode(bases)
    np.testing.assert_array_equal(KMER.decode(ids[None])[0], np.frombuffer(bases.encode(), np.uint8))
    allowed_V = generate.allowed_tokens(KMER, 4100, allow_n=False)
    assert not allowed_V[[0, 1, 4098, 4099]].any() and allowed_V[2:4098].all()


def test_fasta_records_wrap_at_80_bases_and_replace_the_file(tmp_path):
    path = tmp_path / "out.fa"
    path.write_text("old\n")
    generate.write_fasta(str(path), [("a x=1", "A" * 170), ("b", "C" * 80)])
    assert path.read_text() == ">a x=1\n" + "A" * 80 + "\n" + "A" * 80 + "\nAAAAAAAAAA\n>b\n" + "C" * 80 + "\n"
    assert list(tmp_path.iterdir()) == [path]


# The CLI, in process.


def write_checkpoint(workdir, config, params=None):
    """A pretraining workdir as the trainer lays out a checkpoint: params (orbax; an empty folder
    without `params`) and the config JSON."""
    step_dir = workdir / "checkpoints" / "20"
    if params is None:
        (step_dir / "params").mkdir(parents=True)
    else:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(step_dir / "params", params)
        checkpointer.wait_until_finished()
    (step_dir / "config").mkdir()
    (step_dir / "config" / "metadata").write_text(json.dumps(config.to_dict()))
    return workdir


def checkpoint_config(task="pretrain", **changes):
    config = get_config("demo")
    config.task = task
    config.model.update(tiny_cfg().to_dict())
    config.train.seq_len = 64
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    config = checkpoint_config()
    return write_checkpoint(tmp_path_factory.mktemp("pretrain"), config, nnx.to_pure_dict(nnx.state(init_model(config.model))))


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `main` with these flags; the flags are reset afterwards."""
    argv = flags.FLAGS(["nucgpt-generate", *args])
    try:
        generate.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        flags.FLAGS.unparse_flags()
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_one_record_per_sample(tmp_path, capsys, checkpoint_dir):
    output = tmp_path / "out.fa"
    code, out, err = run_cli(
        capsys, f"--checkpoint={checkpoint_dir}", "--prompt=acNt", f"--num_bases={NUM_TOKENS}", f"--num_samples={SAMPLES}",
        "--temperature=0.8", "--top_k=3", "--seed=5", f"--output={output}",
    )
    assert code == 0, err
    lines = output.read_text().splitlines()
    assert lines[::2] == [f">sample_{i} prompt_bp=4 generated_bp=8 temperature=0.8 top_k=3 seed=5" for i in range(SAMPLES)]
    for sequence in lines[1::2]:
        assert len(sequence) == 12 and sequence.startswith("ACNT") and set(sequence[4:]) <= set("ACGT")
    assert len(set(lines[1::2])) == SAMPLES
    assert list(tmp_path.iterdir()) == [output]
    assert out.count("\n") == 1 and "generated 3 sample(s) × 8 bp = 24 bases" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt=ACGTxA"], r"error: prompt: invalid character 'x' at position 5 "),
        (["--prompt="], r"error: the prompt is empty"),
        (["--prompt=ACGT", "--temperature=inf"], r"error: --temperature must be 0 \(greedy\) or a positive number, got inf"),
        (["--prompt=ACGT", "--temperature=nan"], r"error: --temperature must be 0 \(greedy\) or a positive number, got nan"),
        (["--prompt=ACGT", f"--seed={2**64}"], r"error: --seed must fit in 64 bits"),
        (["--prompt=ACGT", "--num_bases=61"], r"error: prompt \(4 bp\) \+ --num_bases \(61\) = 65 bp exceeds the model's trained context of 64 bp"),
    ],
)
def test_cli_bad_input_is_one_error_line_and_no_output(tmp_path, capsys, checkpoint_dir, args, message):
    output = tmp_path / "out.fa"
    code, out, err = run_cli(capsys, f"--checkpoint={checkpoint_dir}", "--num_bases=10", *args, f"--output={output}")
    assert code == 2 and not out and err.count("\n") == 1
    assert re.match(message, err), err
    assert not list(tmp_path.iterdir())


def test_cli_generates_with_a_nonoverlapping_kmer_model(tmp_path, capsys):
    config = checkpoint_config(data__tokenizer="kmer6_nonoverlap", model__vocab_size=4098)
    workdir = write_checkpoint(tmp_path / "kmer", config, nnx.to_pure_dict(nnx.state(init_model(config.model))))
    output = tmp_path / "out.fa"
    code, out, err = run_cli(capsys, f"--checkpoint={workdir}", "--prompt=ACGTAC", "--num_bases=10", "--seed=1", f"--output={output}")
    assert code == 0, err
    header, sequence = output.read_text().splitlines()
    assert header == ">sample_0 prompt_bp=6 generated_bp=10 temperature=1.0 top_k=0 seed=1"
    assert len(sequence) == 16 and sequence.startswith("ACGTAC") and set(sequence) <= set("ACGT")


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"data__tokenizer": "kmer6_overlap", "model__vocab_size": 4098}, "tokenizer is kmer6_overlap, which cannot generate"),
        ({"data__tokenizer": "kmer6_nonoverlap", "model__vocab_size": 4098}, "prompt: 8 bp is not a multiple of 6"),
        ({"task": "classify"}, "a 'classify' checkpoint; generation needs a pretraining (language-model) one"),
        (None, "no checkpoint found"),
    ],
)
def test_checkpoints_that_cannot_generate_are_user_errors(tmp_path, capsys, changes, message):
    path = tmp_path / "nowhere" if changes is None else write_checkpoint(tmp_path, checkpoint_config(**changes))
    code, out, err = run_cli(capsys, f"--checkpoint={path}", "--prompt=ACGTACGT", "--num_bases=6", f"--output={tmp_path / 'out.fa'}")
    assert code == 2 and not out and err.startswith("error: ") and err.count("\n") == 1
    assert message in err, err


def test_a_prompt_fasta_holds_one_record(tmp_path):
    path = tmp_path / "prompt.fa"
    path.write_text(">chr1 some description\nACGTac\ngtNN\n")
    assert generate.read_prompt_fasta(str(path)) == "ACGTacgtNN"
    path.write_text(">a\nACGT\n>a\nACGT\n")
    with pytest.raises(UserError, match="holds 2 records; give a file with one"):
        generate.read_prompt_fasta(str(path))
    with pytest.raises(UserError, match="no such file"):
        generate.read_prompt_fasta(str(tmp_path / "missing.fa"))
    with pytest.raises(UserError, match="is a folder"):
        generate.read_prompt_fasta(str(tmp_path))
    path.write_text(">empty\n")
    with pytest.raises(UserError, match=r"prompt.fa: record 'empty' has no bases"):
        generate.read_prompt_fasta(str(path))


def test_generation_benchmark_times_whole_sampling_calls():
    from benchmarks import generation

    config = get_config("demo")
    config.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64)
    result = generation.measure(config, samples=2, prompt_tokens=3, tokens=5, runs=2)
    assert (result["preset"], result["scan_layers"], result["samples"], result["new_tokens"]) == ("demo", True, 2, 5)
    seconds = result["seconds"]
    assert 0 < seconds["min"] <= seconds["median"] <= seconds["max"] and result["first_call_s"] > 0
    assert result["tokens_per_sec"] == pytest.approx(2 * 5 / seconds["median"], rel=1e-3)
    json.dumps(result)  # the JSON line

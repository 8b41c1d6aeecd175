"""The TopK SAE recovers a known sparse dictionary; the CLI trains one on a tiny pretrained model and
reports features against the genome's softmask; bad input is one error line and leaves no output."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs.pretrain import get_config
from nucgpt import sae, sae_train
from nucgpt.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
SEQ_LEN = 64


def _sparse_batches(rng, dictionary_TxD, n, active):
    """Each row: `active` atoms of the dictionary with weights in [0.5, 2], plus a constant offset."""
    atoms = dictionary_TxD.shape[0]
    chosen_NxA = np.argsort(rng.random((n, atoms)), axis=1)[:, :active]
    codes_NxT = np.zeros((n, atoms))
    np.put_along_axis(codes_NxT, chosen_NxA, rng.uniform(0.5, 2.0, (n, active)), axis=1)
    return (codes_NxT @ dictionary_TxD + 0.3).astype(np.float32)


# One SAE shape for the two small tests below, so they share one compiled step.
CFG = sae.SaeConfig(latents=96, k=3, aux_k=32, dead_tokens=2048, learning_rate=3e-3)
STEP = jax.jit(sae.train_step, static_argnums=0)


@jax.jit
def _held_out_fvu(params, x_NxD):
    x_hat_NxD = sae.reconstruct(params, x_NxD, CFG.k)
    return sae.fvu(sae.variance_sums(params, x_NxD, x_hat_NxD, np.ones(len(x_NxD), np.float32)))


def test_recovers_a_known_sparse_dictionary():
    rng = np.random.default_rng(0)
    dictionary_TxD = rng.normal(size=(48, 32))
    dictionary_TxD /= np.linalg.norm(dictionary_TxD, axis=1, keepdims=True)
    mask_N = np.ones(512, np.float32)
    state = sae.init_state(CFG, jax.random.key(0), _sparse_batches(rng, dictionary_TxD, 512, 3), mask_N)
    for _ in range(250):
        state, metrics = STEP(CFG, state, _sparse_batches(rng, dictionary_TxD, 512, 3), mask_N)

    assert float(_held_out_fvu(state["params"], _sparse_batches(rng, dictionary_TxD, 4096, 3) * state["scale"])) < 0.1
    cosine_FxT = np.asarray(state["params"]["W_dec"]) @ dictionary_TxD.T
    assert np.mean(cosine_FxT.max(axis=0) > 0.9) > 0.9  # most true atoms have a latent along them
    assert 0 < float(metrics["dead_fraction"]) < 0.75  # twice the atoms: some latents are spare, not all


def test_decoder_rows_stay_unit_norm_and_masked_tokens_do_not_count():
    rng = np.random.default_rng(1)
    x_NxD = (rng.normal(size=(512, 32)) * 5 + 2).astype(np.float32)
    mask_N = (rng.random(512) < 0.7).astype(np.float32)
    state = sae.init_state(CFG, jax.random.key(0), x_NxD, mask_N)
    assert float(state["scale"]) ** 2 * np.mean(np.sum(x_NxD[mask_N > 0] ** 2, axis=1)) == pytest.approx(32, rel=1e-4)
    w_before = np.asarray(state["params"]["W_dec"])
    for _ in range(5):
        state, _ = STEP(CFG, state, x_NxD, mask_N)
    w_after = np.asarray(state["params"]["W_dec"])
    np.testing.assert_allclose(np.linalg.norm(w_after, axis=1), 1.0, atol=1e-5)
    assert np.abs(w_after - w_before).max() > 1e-3  # the rows did move

    garbage = x_NxD.copy()
    garbage[mask_N == 0] = 1e6  # what masked (padding / N) positions hold must not matter
    a, metrics_a = STEP(CFG, state, x_NxD, mask_N)
    b, metrics_b = STEP(CFG, state, garbage, mask_N)
    np.testing.assert_allclose(np.asarray(a["params"]["W_dec"]), np.asarray(b["params"]["W_dec"]), rtol=1e-5, atol=1e-6)
    assert float(metrics_a["fvu"]) == pytest.approx(float(metrics_b["fvu"]), rel=1e-5)


def test_auxk_trains_dead_latents_only_when_on():
    """Dead latents outside every token's top k get no gradient from the MSE; AuxK gives them one."""
    rng = np.random.default_rng(2)
    x_NxD = rng.normal(size=(512, 32)).astype(np.float32)
    mask_N = (np.arange(512) < 8).astype(np.float32)  # 8 tokens: most latents are in no token's top k
    state = sae.init_state(CFG, jax.random.key(1), x_NxD, mask_N)
    state["tokens_since_fired_F"] = np.full(CFG.latents, CFG.dead_tokens, np.int32)  # all dead
    _, indices_NxK = sae.encode(state["params"], x_NxD[:8] * state["scale"], CFG.k)
    silent_F = ~np.isin(np.arange(CFG.latents), np.asarray(indices_NxK))
    assert silent_F.sum() > 10
    moved = {}
    for cfg in (CFG, dataclasses.replace(CFG, aux_k=0)):
        new, _ = STEP(cfg, state, x_NxD, mask_N)
        moved[cfg.aux_k] = np.abs(np.asarray(new["params"]["W_enc"]) - np.asarray(state["params"]["W_enc"])).max(axis=0)
    assert np.all(moved[0][silent_F] == 0) and np.all(moved[0][~silent_F] > 0)
    assert np.mean(moved[CFG.aux_k][silent_F] > 0) > 0.5


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A prepared synthetic genome and an untrained tiny LM checkpointed in the trainer's layout.

    Untrained, so nothing is compiled here (a backward pass takes ~20 s to compile on 2 cores); its
    weights are large (init_std 0.3) so that its logits depend on the residual stream: clean CE is
    far from the zero-ablated ln 6, which is what the spliced-in loss needs to be measured.
    """
    from flax import nnx

    from nucgpt.checkpoint import Checkpoints
    from nucgpt.data import prepare, synthetic
    from nucgpt.model import Transformer
    from nucgpt.tasks import get_task

    root = tmp_path_factory.mktemp("sae")
    synthetic.write_genome(root / "g.fa", bp=100_000, seed=3)
    prepare.prepare([str(root / "g.fa")], root / "data", window=SEQ_LEN + 1, valid_chroms=("chr4",), progress=False)
    config = get_config("demo")
    config.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64, attention="xla",
                        init_std=0.3)
    config.data.update(path=str(root / "data"), synthetic_bp=0)
    config.train.update(seq_len=SEQ_LEN, global_batch_size=8)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0)))))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: np.ones(x.shape, np.float32) if str(path[-1].key).endswith("norm")
        else rng.normal(0, config.model.init_std, x.shape).astype(np.float32),
        abstract,
    )
    checkpoints = Checkpoints(str(root / "lm"), keep=1)
    state = {"step": np.int32(20), "params": params, "opt_state": {"count": np.int32(0)}}
    checkpoints.save(state, get_task("pretrain").train_iterator(config, 0, 1), config)
    checkpoints.close()
    return root


def _genome(path) -> dict[str, str]:
    chroms, name = {}, None
    for line in pathlib.Path(path).read_text().splitlines():
        if line.startswith(">"):
            name = line[1:].split()[0]
            chroms[name] = []
        else:
            chroms[name].append(line)
    return {k: "".join(v) for k, v in chroms.items()}


def test_trains_and_reports_features_against_the_softmask(pretrained, capsys):
    """The whole run in-process (the CLI's `main` only maps flags onto Options: see the error test below)."""
    out = pretrained / "sae_out"
    options = sae_train.Options(
        checkpoint=str(pretrained / "lm"), layer=1, output=str(out), latents=64, k=4, steps=120, learning_rate=3e-3,
        eval_windows=24, top_contexts=8, log_every=40, dead_tokens=2000,
    )
    returned = sae_train.run_sae(options)
    console = capsys.readouterr().out
    assert [l.split("|")[0].strip() for l in console.splitlines() if l.startswith("step ")] == [
        "step      40", "step      80", "step     120"]
    assert "loss recovered" in console and "most repeat-enriched" in console
    assert sorted(os.listdir(out)) == ["features.jsonl", "params.npz", "sae.json", "summary.txt"]
    assert [p for p in os.listdir(pretrained) if p.startswith(".")] == []  # no temporary folder left

    params, meta = sae_train.load_sae(str(out))
    assert params["W_enc"].shape == (32, 64) and params["W_dec"].shape == (64, 32)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(params["W_dec"]), axis=1), 1.0, atol=1e-5)
    assert meta == returned
    assert (meta["layer"], meta["latents"], meta["k"], meta["steps"], meta["checkpoint_step"]) == (1, 64, 4, 120, 20)
    assert meta["scale"] > 0 and meta["train_tokens"] > 120 * 8 * 50
    e = meta["eval"]
    assert e["windows"] == 24 and 0 < e["l0"] <= 4
    assert 0 < e["fvu"] < meta["train_log"][0]["fvu"] < 1  # better than the mean, and than at step 40
    # A zeroed stream gives zero logits (uniform over 6 tokens); the model's own logits are far from that;
    # the SAE's reconstruction, spliced in, gives nearly the model's loss, but not exactly.
    assert e["nats_per_base_zero"] == pytest.approx(np.log(6), abs=1e-4)
    assert abs(e["nats_per_base_clean"] - e["nats_per_base_zero"]) > 0.2
    assert e["nats_per_base_sae"] != e["nats_per_base_clean"]
    expected = (e["nats_per_base_zero"] - e["nats_per_base_sae"]) / (e["nats_per_base_zero"] - e["nats_per_base_clean"])
    assert e["loss_recovered"] == pytest.approx(expected) and abs(e["loss_recovered"] - 1) < 0.5

    features = [json.loads(l) for l in (out / "features.jsonl").read_text().splitlines()]
    assert sorted(f["latent"] for f in features) == list(range(64))
    assert [f["firings"] for f in features] == sorted((f["firings"] for f in features), reverse=True)
    assert sum(f["firings"] for f in features) == pytest.approx(e["l0"] * e["tokens"])
    genome = _genome(pretrained / "g.fa")
    base_rate = e["repeat_base_rate"]
    assert 0.1 < base_rate < 0.9
    live = [f for f in features if f["firings"]]
    assert live
    for f in live:
        assert 0 <= f["repeat_fraction"] <= 1 and f["mean_activation"] > 0
        assert f["repeat_enrichment"] == pytest.approx(f["repeat_fraction"] / base_rate)
        assert sum(f["bases"].values()) == pytest.approx(1.0)
        activations = [c["activation"] for c in f["top_contexts"]]
        assert len(activations) == min(f["firings"], 8) and activations == sorted(activations, reverse=True)
        for c in f["top_contexts"]:
            left, rest = c["context"].split("[")
            middle, right = rest.split("]")
            assert c["chrom"] == "chr4"  # the eval split
            chrom, pos = genome[c["chrom"]], c["position"]
            assert chrom[pos - len(left) : pos + 1 + len(right)] == left + middle + right  # case kept
            assert middle.upper() in "ACGT" and len(middle) == 1
        if f["firings"] <= 8:  # every firing is listed: its repeat flags and bases are the contexts' own
            middles = [c["context"].split("[")[1][0] for c in f["top_contexts"]]
            assert f["repeat_fraction"] == pytest.approx(np.mean([m.islower() for m in middles]))
            assert f["bases"] == pytest.approx({b: middles.count(b) / len(middles) + middles.count(b.lower()) / len(middles)
                                                for b in "ACGT"})
    assert any(f["firings"] <= 8 for f in live)  # the check above ran
    summary = (out / "summary.txt").read_text()
    assert "most repeat-enriched" in summary and "most repeat-depleted" in summary and "loss recovered" in summary


def test_an_interrupted_run_continues_to_the_result_of_an_uninterrupted_one(pretrained, tmp_path, monkeypatch, capsys):
    """SIGTERM saves at the next step; a crash after a periodic save loses only the steps since; each
    rerun of the same command continues (with more --steps too) and a finished run deletes its progress.
    The interrupted runs split each batch over 8 devices, the uninterrupted one runs on one: same SAE."""
    base = dict(checkpoint=str(pretrained / "lm"), layer=1, latents=32, k=4, learning_rate=3e-3, eval_windows=4,
                top_contexts=2, log_every=2, save_every=4, dead_tokens=2000)
    straight = sae_train.run_sae(sae_train.Options(output=str(tmp_path / "straight"), steps=6, devices=1, **base))
    out, progress = tmp_path / "resumed", tmp_path / "resumed.resume"
    options = sae_train.Options(output=str(out), steps=6, **base)

    stop = sae_train.StopRequest()
    stop.training, stop.requested = True, False
    stop(15, None)  # SIGTERM during training: only a request
    assert stop.requested
    with pytest.raises(sae_train.Stopped, match="at step 1; progress saved in .*resumed.resume"):
        sae_train.run_sae(options, stop)
    assert not out.exists() and progress.is_dir() and not stop.training

    def crash(*args, **kwargs):
        raise RuntimeError("lost the machine")

    monkeypatch.setattr(sae_train, "evaluate", crash)
    with pytest.raises(RuntimeError):
        sae_train.run_sae(dataclasses.replace(options, steps=4))  # saved at step 4, then lost
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"resumed.resume holds an unfinished run with --latents=32, not 64"):
        sae_train.run_sae(dataclasses.replace(options, latents=64))
    with pytest.raises(UserError, match=r"--steps=3: the unfinished run .* is already at step 4"):
        sae_train.run_sae(dataclasses.replace(options, steps=3))

    capsys.readouterr()
    resumed = sae_train.run_sae(options)
    console = capsys.readouterr().out
    assert "resumed from step 4" in console and "; 8 device(s);" in console
    assert [l.split("|")[0].split() for l in console.splitlines() if l.startswith("step ")] == [["step", "6"]]
    assert not progress.exists() and sorted(os.listdir(tmp_path)) == ["resumed", "straight"]
    assert [e["step"] for e in resumed["train_log"]] == [e["step"] for e in straight["train_log"]] == [2, 4, 6]
    assert resumed["train_tokens"] == straight["train_tokens"]
    assert resumed["eval"]["fvu"] == pytest.approx(straight["eval"]["fvu"], rel=1e-5)
    for name, value in sae_train.load_sae(str(tmp_path / "straight"))[0].items():
        np.testing.assert_allclose(sae_train.load_sae(str(out))[0][name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_sigterm_outside_training_exits_at_once():
    with pytest.raises(SystemExit) as exit_info:
        sae_train.StopRequest()(15, None)
    assert exit_info.value.code == 128 + 15


def test_eval_batch_flags_each_input_token_by_its_own_base():
    """The report's per-token repeat flag and base are the input token's, aligned with the model's inputs."""
    from nucgpt.data import records

    config = get_config("demo")
    config.train.seq_len = 8
    sequence = b"ACgtNNaCT"  # 8 inputs + the last target
    window = sae_train.Window("chrX", 100, sequence)
    batch = sae_train._eval_batch(config, [records.encode_record("chrX", 100, sequence)], [window], rows=2)
    np.testing.assert_array_equal(batch["inputs"][0], [1, 2, 3, 4, 5, 5, 1, 2])
    np.testing.assert_array_equal(batch["mask"], [[1, 1, 1, 1, 0, 0, 1, 1], [0] * 8])  # N and padding rows off
    np.testing.assert_array_equal(batch["repeat"][0], [0, 0, 1, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(batch["base"][0][batch["mask"][0]], [0, 1, 2, 3, 0, 1])


def test_cli_bad_layer_is_one_error_line_and_no_output(pretrained):
    out = pretrained / "never"
    result = subprocess.run([sys.executable, "-m", "nucgpt.sae_train", "--checkpoint", str(pretrained / "lm"), "--layer=3",
                             "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --layer=3: choose 0 (the embeddings) to 2 (after the last block)"]
    assert not out.exists()


def _classify_checkpoint(tmp_path):
    step_dir = tmp_path / "ft" / "checkpoints" / "7"
    (step_dir / "params").mkdir(parents=True)
    (step_dir / "config").mkdir()
    config = get_config("demo")
    config.task = "classify"
    (step_dir / "config" / "metadata").write_text(config.to_json())
    return tmp_path / "ft"


@pytest.mark.parametrize("change, message", [
    (dict(k=64), r"--k=64 must be smaller than --latents=64"),
    (dict(layer=-1), r"--layer=-1: choose 0 .* to 2"),
    (dict(data="/nonexistent/genome"), r"/nonexistent/genome: no manifest.json"),
    (dict(checkpoint="/nonexistent/run"), r"--checkpoint: no checkpoint found in /nonexistent/run"),
    (dict(checkpoint="CLASSIFY"), r"a 'classify' checkpoint; a sparse autoencoder needs a pretraining"),
    (dict(output="EXISTING"), r"already exists; choose a new folder or pass --overwrite"),
    (dict(output="EXISTING", overwrite=True), r"not an SAE output folder \(no sae.json\); --overwrite replaces only"),
    (dict(devices=9), r"--devices=9: choose 1 to 8 \(the local devices\), or 0 for all"),
    (dict(learning_rate=float("inf")), r"--learning_rate=inf must be a positive number"),
    (dict(dead_tokens=3_000_000_000), r"--dead_tokens=3000000000 must be at most 2,147,483,647"),
    (dict(devices=3), r"--batch_windows=8 must be a multiple of the 3 devices each batch is split over"),
])
def test_bad_options_are_user_errors(pretrained, tmp_path, change, message):
    change = dict(change)
    if change.get("checkpoint") == "CLASSIFY":
        change["checkpoint"] = str(_classify_checkpoint(tmp_path))
    if change.get("output") == "EXISTING":
        change["output"] = str(tmp_path)
        (tmp_path / "notes.txt").write_text("not ours")
    options = sae_train.Options(checkpoint=str(pretrained / "lm"), layer=1, output=str(tmp_path / "o"), latents=64)
    with pytest.raises(UserError, match=message):
        sae_train.check(sae_train.Options(**{**options.__dict__, **change}))


def test_output_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    params = {"W_dec": np.ones((2, 3), np.float32)}
    out = tmp_path / "sae"
    sae_train.write_output(str(out), params, {"v": 1}, [{"latent": 0}], "old\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sae_train.json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sae_train.write_output(str(out), params, {"v": 2}, [{"latent": 0}], "new\n")
    assert os.listdir(tmp_path) == ["sae"] and (out / "summary.txt").read_text() == "old\n"  # untouched, no temp left
    monkeypatch.undo()
    sae_train.write_output(str(out), params, {"v": 2}, [{"latent": 0}], "new\n")
    assert os.listdir(tmp_path) == ["sae"] and json.loads((out / "sae.json").read_text()) == {"v": 2}
    sae_train.write_output(str(out), params, {"fvu": float("nan"), "curve": [1.0, np.float32("inf")]}, [{"mean": float("nan")}], "")
    assert json.loads((out / "sae.json").read_text()) == {"fvu": None, "curve": [1.0, None]}  # strict JSON: null
    assert json.loads((out / "features.jsonl").read_text()) == {"mean": None}
    umask = os.umask(0o022)
    try:
        sae_train.write_output(str(tmp_path / "shared"), params, {"v": 3}, [], "\n")
    finally:
        os.umask(umask)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755  # readable by others, as every other output


@pytest.mark.parametrize("tokenizer", ["kmer6_nonoverlap", "kmer6_overlap"])
def test_eval_batch_flags_each_kmer_token_by_its_first_base(tokenizer):
    """k-mer models: one flag per input token (a repeat = most of its 6 bases lowercase), its first base,
    and UNK k-mers (any N) masked out like padding."""
    from nucgpt.data import records
    from nucgpt.tokenizers import get_tokenizer

    config = get_config("demo")
    config.data.update(tokenizer=tokenizer, kmer_pad_multiple=8)
    config.train.seq_len = 3
    if tokenizer == "kmer6_nonoverlap":  # tokens CCGTAC | gcgtac | NNNNNN, then the target k-mer
        sequence, first_bases, repeat, mask = b"CCGTAC" b"gcgtac" b"NNNNNN" b"GGGGGG", [1, 2], [0, 1, 0], [1, 1, 0]
    else:  # tokens at offsets 0, 1, 2: CCgtac, CgtacN (UNK), gtacNT (UNK); 4 of 6 bases lowercase in each
        sequence, first_bases, repeat, mask = b"CCgtacNTG", [1], [1, 1, 1], [1, 0, 0]
    window = sae_train.Window("chrX", 0, sequence)
    batch = sae_train._eval_batch(config, [records.encode_record("chrX", 0, sequence)], [window], rows=1)
    ids = get_tokenizer(tokenizer, pad_multiple=8).encode(sequence)[0][:3]
    np.testing.assert_array_equal(batch["inputs"][0], ids)
    np.testing.assert_array_equal(batch["mask"][0], mask)
    np.testing.assert_array_equal(batch["repeat"][0], repeat)
    np.testing.assert_array_equal(batch["base"][0][batch["mask"][0]], first_bases)

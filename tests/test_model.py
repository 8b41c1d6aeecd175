"""The Transformer: published parameter count, interface, scan vs unrolled, remat, config errors."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs.pretrain import get_config
from nucgpt.errors import UserError
from nucgpt.flops import count_params
from nucgpt.model import Transformer


def tiny_cfg(**overrides) -> ml_collections.ConfigDict:
    """A float32 model small enough to compile in seconds: GQA (4 query, 2 KV heads), 2 layers."""
    cfg = get_config("demo").model
    cfg.update(
        d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
        compute_dtype="float32", attention="xla", init_std=0.1,
    )
    cfg.update(overrides)
    return cfg


def make_batch(batch=8, length=16, vocab=6, seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (batch, length + 1), 0, vocab)
    return tokens[:, :-1], tokens[:, 1:]


def cross_entropy(logits_BxLxV, targets_BxL):
    logp = jax.nn.log_softmax(logits_BxLxV, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1))


def loss_and_grads(graphdef, state, tokens, targets):
    def loss_fn(state):
        return cross_entropy(nnx.merge(graphdef, state)(tokens), targets)

    return jax.device_get(jax.jit(jax.value_and_grad(loss_fn))(state))


@functools.cache
def reference():
    """(graphdef, state, loss, grads) of `tiny_cfg()` on `make_batch()`: one compile shared by tests."""
    graphdef, state = nnx.split(Transformer(tiny_cfg(), rngs=nnx.Rngs(0)))
    return graphdef, state, *loss_and_grads(graphdef, state, *make_batch())


def max_relative_error(a, b) -> float:
    """Largest |a-b| over the largest |b|, across all leaves of two matching trees."""
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30)) for x, y in zip(a, b))


def test_published_parameter_count_from_eval_shape():
    """503.4M: the count the paper reports needs every RMSNorm scale and the untied output.

    per layer: q,k,v,o 4·2048·(8·128) = 8,388,608; MLP 2·2048·8192 = 33,554,432; 4 sandwich norm
    scales 4·2048 = 8,192 → 41,951,232 × 12 = 503,414,784; + embedding 6·2048 + output 2048·6
    + final norm 2048 = 26,624 → 503,441,408. Without the norms it would be 503.34M.
    """
    cfg = get_config("nucleotide_gpt_500m").model
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
    assert count_params(state) == 503_441_408
    assert not cfg.scan_layers  # the preset unrolls its 12 blocks (fastest measured on an H100)
    assert len(state["blocks"]) == 12 and state["blocks"][0]["wq"].shape == (2048, 8, 128)
    assert state["blocks"][0]["wq"].get_metadata()["logical_axes"] == ("embed", "heads", "head_dim")
    cfg.scan_layers = True
    stacked = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    assert count_params(stacked) == 503_441_408
    assert stacked["blocks"]["wq"].shape == (12, 2048, 8, 128)
    assert stacked["blocks"]["wq"].get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")


def test_interface_shapes_and_dtypes():
    cfg = tiny_cfg(compute_dtype="bfloat16")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens, _ = make_batch()
    hidden, logits, called = nnx.jit(lambda m, t: (m.trunk(t), m.unembed(m.trunk(t)), m(t)))(model, tokens)
    assert hidden.shape == (8, 16, 64) and hidden.dtype == jnp.bfloat16
    assert logits.shape == (8, 16, 6) and logits.dtype == jnp.float32
    assert nnx.state(model)["blocks"]["wq"].dtype == jnp.float32
    np.testing.assert_array_equal(called, logits)


def test_trailing_padding_does_not_change_real_tokens():
    model = Transformer(tiny_cfg(), rngs=nnx.Rngs(0))
    tokens, _ = make_batch()
    other_padding = tokens.at[:, 10:].set((tokens[:, 10:] + 1) % 6)
    both = jnp.concatenate([tokens, other_padding])
    segment_ids = jnp.ones_like(both).at[:, 10:].set(0)
    a, b = nnx.jit(lambda m, t: m(t, segment_ids))(model, both).reshape(2, 8, 16, 6)
    np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_tied_embeddings_share_the_table():
    model = Transformer(tiny_cfg(tie_embeddings=True), rngs=nnx.Rngs(0))
    assert not hasattr(model, "unembedding")
    hidden = model.trunk(make_batch()[0])
    np.testing.assert_allclose(model.unembed(hidden), hidden @ model.embedding[...].T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scan", [True, False])
def test_residual_stream_read_at_any_block_and_continued_gives_the_logits(scan):
    model = Transformer(tiny_cfg(scan_layers=scan, num_layers=3), rngs=nnx.Rngs(0))
    tokens, _ = make_batch(batch=2)
    segment_ids = jnp.ones_like(tokens).at[:, 12:].set(0)

    @nnx.jit
    def streams_and_continued_logits(model):
        streams = [model.residual_stream(tokens, segment_ids, after_block=k) for k in (0, 2)]
        continued = [model.logits_from_residual(x, segment_ids, after_block=k) for x, k in zip(streams, (0, 2))]
        return model(tokens, segment_ids), streams, continued

    logits, (embeddings, _), continued = streams_and_continued_logits(model)
    np.testing.assert_array_equal(embeddings, model.embedding[...][tokens])
    for logits_from_block in continued:
        np.testing.assert_allclose(logits_from_block, logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="after_block=4: choose 0 .* to 3"):
        model.residual_stream(tokens, after_block=4)


def _unstack_into(unrolled: Transformer, scanned_state: nnx.State) -> None:
    """Copies a scanned model's stacked block weights into an unrolled model, layer by layer."""
    pure = nnx.to_pure_dict(scanned_state)
    stacked = pure.pop("blocks")
    pure["blocks"] = {i: jax.tree.map(lambda x: x[i], stacked) for i in range(len(unrolled.blocks))}
    state = nnx.state(unrolled)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(unrolled, state)


def _restacked(unrolled_grads) -> dict:
    """An unrolled model's gradients as a pure dict with the blocks stacked, as the scanned model holds them."""
    grads = nnx.to_pure_dict(unrolled_grads)
    per_layer = grads.pop("blocks")
    grads["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *[per_layer[i] for i in range(len(per_layer))])
    return grads


def test_unrolled_with_full_remat_matches_scanned():
    graphdef, state, loss, grads = reference()
    unrolled = Transformer(tiny_cfg(scan_layers=False, remat_policy="full"), rngs=nnx.Rngs(1))
    _unstack_into(unrolled, state)
    loss_u, grads_u = loss_and_grads(*nnx.split(unrolled), *make_batch())
    assert abs(float(loss_u - loss)) <= 1e-6 * abs(float(loss))
    assert max_relative_error(_restacked(grads_u), nnx.to_pure_dict(grads)) < 1e-5


@pytest.mark.parametrize("policy", ["full", "save_matmuls"])
def test_remat_policies_keep_loss_and_grads(policy):
    _, _, loss, grads = reference()
    remat = Transformer(tiny_cfg(remat_policy=policy), rngs=nnx.Rngs(0))
    loss_r, grads_r = loss_and_grads(*nnx.split(remat), *make_batch())
    assert abs(float(loss_r - loss)) <= 1e-6 * abs(float(loss))
    assert max_relative_error(grads_r, grads) < 1e-5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_heads=6, num_kv_heads=4), "multiple of model.num_kv_heads"),
        (dict(head_dim=15), "even"),
        (dict(mlp_activation="relu"), "mlp_activation"),
        (dict(norm_placement="post"), "norm_placement"),
        (dict(remat_policy="everything"), "remat_policy"),
        (dict(embedding_lookup="hash"), "model.embedding_lookup"),
        (dict(norm_backward="fused"), "model.norm_backward"),
        (dict(fused_qkv=True), "fused_qkv=True stacks the q, k and v weights"),  # GQA: 4 query, 2 KV heads
        (dict(attention="flash"), "model.attention"),
        (dict(d_model=0), "model.d_model"),
    ],
)
def test_bad_model_config_is_a_user_error(overrides, message):
    with pytest.raises(UserError, match=message):
        Transformer(tiny_cfg(**overrides), rngs=nnx.Rngs(0))


def test_splash_sequence_not_divisible_by_block_is_a_user_error():
    model = Transformer(tiny_cfg(attention="splash", splash_block_q=128, splash_block_kv=128), rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match="splash_block_q 128 must be a multiple of 128 that divides the sequence length 192"):
        model(jnp.zeros((1, 192), jnp.int32))


@pytest.mark.parametrize("vocab", [6, 4098])
def test_one_hot_embedding_equals_gather_in_values_and_gradients(vocab):
    """The one-hot matmul (no scatter-add in the backward pass) gives the gather's rows and gradient exactly."""
    from nucgpt.model.transformer import embed

    table = jax.random.normal(jax.random.key(1), (vocab, 32))
    tokens = jax.random.randint(jax.random.key(2), (4, 24), 0, vocab)
    probe = jax.random.normal(jax.random.key(3), (4, 24, 32))

    def loss(table, lookup):
        return jnp.sum(embed(table, tokens, lookup, jnp.bfloat16).astype(jnp.float32) * probe)

    rows = {lookup: embed(table, tokens, lookup, jnp.bfloat16) for lookup in ("gather", "one_hot", "auto")}
    grads = {lookup: jax.grad(loss)(table, lookup) for lookup in ("gather", "one_hot")}
    assert rows["one_hot"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(rows["one_hot"], rows["gather"])
    np.testing.assert_array_equal(grads["one_hot"], grads["gather"])
    # auto: one-hot for the nucleotide vocabulary (no scatter in the backward), gather for 6-mers.
    backward = jax.jit(jax.grad(loss), static_argnums=1).lower(table, "auto").as_text()
    assert ("scatter" in backward) == (vocab == 4098)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_saved_rsqrt_norm_has_the_recomputed_norms_values_and_gradients(dtype, tolerance):
    """The hand-written RMSNorm backward agrees with autodiff through the recomputed forward."""
    from nucgpt.model.transformer import rms_norm

    x = (3.0 * jax.random.normal(jax.random.key(1), (2, 8, 64))).astype(dtype)
    scale = 1.0 + 0.1 * jax.random.normal(jax.random.key(2), (64,))
    probe = jax.random.normal(jax.random.key(3), (2, 8, 64))

    def loss(x, scale, backward):
        return jnp.sum(rms_norm(x, scale, 1e-6, backward).astype(jnp.float32) * probe)

    values = {b: rms_norm(x, scale, 1e-6, b) for b in ("recompute", "saved_rsqrt")}
    grads = {b: jax.grad(loss, argnums=(0, 1))(x, scale, b) for b in ("recompute", "saved_rsqrt")}
    np.testing.assert_array_equal(values["saved_rsqrt"], values["recompute"])
    assert grads["saved_rsqrt"][0].dtype == dtype and grads["saved_rsqrt"][1].dtype == jnp.float32
    assert max_relative_error(grads["saved_rsqrt"], grads["recompute"]) < tolerance


@pytest.mark.parametrize("scan, policy", [(True, "none"), (False, "save_matmuls")])
def test_saved_rsqrt_norm_keeps_the_models_loss_and_gradients(scan, policy):
    _, _, loss, grads = reference()
    model = Transformer(tiny_cfg(norm_backward="saved_rsqrt", scan_layers=scan, remat_policy=policy), rngs=nnx.Rngs(0))
    if not scan:
        _unstack_into(model, reference()[1])
    loss_n, grads_n = loss_and_grads(*nnx.split(model), *make_batch())
    assert abs(float(loss_n - loss)) <= 1e-6 * abs(float(loss))
    grads_n = nnx.to_pure_dict(grads_n) if scan else _restacked(grads_n)
    assert max_relative_error(grads_n, nnx.to_pure_dict(grads)) < 1e-5


@pytest.mark.parametrize("scan, policy", [(True, "none"), (False, "save_matmuls")])
def test_fused_qkv_keeps_the_models_loss_and_gradients(scan, policy):
    """One matmul over the stacked q/k/v weights: same parameters, same loss and gradients."""
    heads = dict(num_heads=4, num_kv_heads=4, scan_layers=scan, remat_policy=policy)
    separate, fused = (Transformer(tiny_cfg(**heads, fused_qkv=f), rngs=nnx.Rngs(0)) for f in (False, True))
    assert jax.tree.map(jnp.shape, nnx.state(fused)) == jax.tree.map(jnp.shape, nnx.state(separate))
    tokens = make_batch()[0]
    matmuls = lambda model: str(jax.make_jaxpr(lambda t: model(t))(tokens)).count("dot_general")
    layers_in_jaxpr = 1 if scan else 2  # a scan holds its body once
    assert matmuls(separate) - matmuls(fused) == 2 * layers_in_jaxpr  # q, k, v: one matmul instead of three
    loss, grads = loss_and_grads(*nnx.split(separate), *make_batch())
    loss_f, grads_f = loss_and_grads(*nnx.split(fused), *make_batch())
    assert abs(float(loss_f - loss)) <= 1e-6 * abs(float(loss))
    assert max_relative_error(grads_f, grads) < 1e-5

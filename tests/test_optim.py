"""AdamW schedule, decay mask and clipping."""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nucgpt import optim
from nucgpt.model import Transformer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
import pretrain  # noqa: E402


def test_warmup_then_cosine_to_final():
    c = pretrain.get_config("nucleotide_gpt_500m")
    schedule = optim.learning_rate_schedule(c.optim, c.train.steps)
    assert float(schedule(0)) == 0.0
    assert float(schedule(50)) == pytest.approx(3e-4)
    assert float(schedule(25)) == pytest.approx(1.5e-4)
    assert float(schedule(20_000)) == pytest.approx(1e-5)
    assert 1e-5 < float(schedule(10_000)) < 3e-4


def _abstract_params():
    c = pretrain.get_config("demo")
    c.model.update(d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32)
    model = nnx.eval_shape(lambda: Transformer(c.model, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model))


def test_no_decay_on_norms_and_embedding():
    mask = optim.decay_mask(_abstract_params(), decay_norms_and_embeddings=False)
    assert mask["embedding"] is False and mask["final_norm"] is False
    assert mask["blocks"]["attn_in_norm"] is False  # [layers, d] when scanned: excluded by name
    assert mask["blocks"]["wq"] is True and mask["blocks"]["w_up"] is True and mask["unembedding"] is True
    everything = optim.decay_mask(_abstract_params(), decay_norms_and_embeddings=True)
    assert all(jax.tree.leaves(everything))


def test_weight_decay_skips_masked_params_and_clipping_bounds_the_update():
    c = pretrain.get_config("demo")
    c.optim.update(learning_rate=0.1, warmup_steps=0, final_learning_rate=0.1, weight_decay=0.5, clip_norm=1.0)
    params = {"final_norm": jnp.ones((4,)), "dense": {"kernel": jnp.ones((4, 4))}}
    tx = optim.make_optimizer(c.optim, steps=10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_array_equal(updates["final_norm"], 0.0)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5, rtol=1e-6)
    # A huge gradient is clipped to norm 1 before Adam normalises it: the update stays ~lr per entry.
    huge = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)
    updates, _ = tx.update(huge, tx.init(params), params)
    assert float(jnp.max(jnp.abs(updates["final_norm"]))) <= 0.1 + 1e-6

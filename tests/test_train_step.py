"""The jitted step in process: gradient accumulation is exact; dry-run pieces work without data."""
import pathlib
import sys

import jax
import numpy as np
import pytest

from nucgpt.step import build_trainer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
import pretrain  # noqa: E402


def tiny_config(**train):
    c = pretrain.get_config("demo")
    c.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64, attention="xla")
    c.train.update(seq_len=16, global_batch_size=8, **train)
    c.optim.update(warmup_steps=0)
    return c


@pytest.fixture(scope="module")
def trainer():
    return build_trainer(tiny_config())


def test_gradient_accumulation_matches_one_big_batch(trainer):
    one, four = trainer, build_trainer(tiny_config(grad_accum_steps=2))
    batch = one.dummy_global_batch()
    state_one, metrics_one = one.train_step(one.init_state(), batch)
    state_four, metrics_four = four.train_step(four.init_state(), batch)
    np.testing.assert_allclose(float(metrics_one["weighted_ce"]), float(metrics_four["weighted_ce"]), rtol=1e-5)
    np.testing.assert_allclose(float(metrics_one["grad_norm"]), float(metrics_four["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(state_one["params"]), jax.tree.leaves(state_four["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_abstract_state_lowers_without_allocating_params(trainer):
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(trainer.abstract_state))
    compiled = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch()).compile()
    assert compiled.memory_analysis() is not None
    wq = trainer.abstract_state["params"]["blocks"]["wq"]
    assert "fsdp" in str(wq.sharding.spec)  # [layers, embed, heads, head_dim]: embed over fsdp
    mu = trainer.abstract_state["opt_state"]
    assert any("fsdp" in str(getattr(x, "sharding", "")) for x in jax.tree.leaves(mu))  # moments follow params

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


def _batch_with_invalid_and_repeats(trainer):
    """The dummy batch with some targets invalid (weight 0) and the rest half repeats (weight 0.5)."""
    batch = trainer.task.dummy_batch(trainer.config, trainer.local_batch_size())
    batch["target_valid"][:, :5] = False
    return trainer.global_batch(batch)


def test_loss_is_normalised_before_the_gradient():
    """The step differentiates Σ w·CE / Σ w with Σ w from `task.loss_weight`: same as ∇(Σ w·CE) / Σ w."""
    from flax import nnx

    trainer = build_trainer(tiny_config(repeat_weight=0.5))
    batch = _batch_with_invalid_and_repeats(trainer)
    state = trainer.init_state()
    params = jax.tree.map(np.asarray, state["params"])

    def summed_loss(p):
        return trainer.task.loss(nnx.merge(trainer.graphdef, p), batch, trainer.config)

    grads_sum, stats = jax.jit(jax.grad(summed_loss, has_aux=True))(params)
    weight = float(trainer.task.loss_weight(batch, trainer.config))
    assert weight == float(stats["weight"]) and 0 < weight < batch["targets"].size
    expected_norm = np.sqrt(sum(np.sum((np.asarray(g) / weight) ** 2) for g in jax.tree.leaves(grads_sum)))
    _, metrics = trainer.train_step(state, batch)
    np.testing.assert_allclose(float(metrics["grad_norm"]), expected_norm, rtol=1e-5)
    assert float(metrics["weight"]) == weight

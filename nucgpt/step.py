"""The training state and the jitted train / eval steps, with explicit shardings.

`build_trainer(config)` is the one place that turns a config into a mesh, a model (via its task),
an optimizer, shardings for every array of the state and batch, and compiled-on-first-call step
functions. The training loop, `--dry_run` and benchmarks/mfu.py all use it, so what is timed is
what trains.

The state is a plain dict pytree — `{"step": int32[], "params": <nested dict of arrays>,
"opt_state": <optax state>}` — so orbax saves it as is and it restores onto any mesh.
"""

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from nucgpt import optim, sharding
from nucgpt.tasks import Task, get_task

TrainState = dict[str, Any]


class MeshBound:
    """A jitted function that always traces, lowers and runs with its mesh set (for `constrain`)."""

    def __init__(self, jitted: Callable, mesh: Mesh, rules: sharding.Rules):
        self.jitted = jitted
        self.mesh = mesh
        self.rules = rules

    def __call__(self, *args):
        with sharding.use_mesh(self.mesh, self.rules):
            return self.jitted(*args)

    def lower(self, *args):
        with sharding.use_mesh(self.mesh, self.rules):
            return self.jitted.lower(*args)


@dataclasses.dataclass
class Trainer:
    """Mesh, model structure, shardings and the jitted steps for one config.

    train_step(state, batch) -> (state, metrics): donates `state`; `metrics` are device scalars
      (the task's summed stats plus `grad_norm` and `learning_rate`) — read them a step late.
    eval_step(state, batch) -> stats: the task's summed stats for one batch.
    """

    config: ConfigDict
    task: Task
    mesh: Mesh
    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    state_shardings: TrainState
    abstract_state: TrainState
    batch_shardings: dict[str, NamedSharding]
    init_state: "MeshBound"
    train_step: MeshBound
    eval_step: MeshBound

    @property
    def global_batch_size(self) -> int:
        return self.config.train.global_batch_size

    def local_batch_size(self) -> int:
        return self.global_batch_size // jax.process_count()

    def global_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows → global arrays laid out on the mesh (each process reads only its slice)."""
        return {
            k: jax.make_array_from_process_local_data(self.batch_shardings[k], np.asarray(v))
            for k, v in local_batch.items()
            if k in self.batch_shardings
        }

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Global shapes, dtypes and shardings of a batch: for AOT lowering without data."""
        local = self.task.dummy_batch(self.config, self.local_batch_size())
        return {
            k: jax.ShapeDtypeStruct((self.global_batch_size,) + v.shape[1:], v.dtype, sharding=self.batch_shardings[k])
            for k, v in local.items()
        }

    def dummy_global_batch(self) -> dict[str, jax.Array]:
        return self.global_batch(self.task.dummy_batch(self.config, self.local_batch_size()))


def _param_shardings(task: Task, config: ConfigDict, mesh: Mesh):
    """(graphdef, abstract params as a pure dict, their NamedShardings) without allocating params."""
    factory = lambda rngs: task.build_model(config, rngs)
    graphdef, abstract, shardings = sharding.abstract_state_and_shardings(factory, mesh, config.mesh.logical_axis_rules)
    return graphdef, nnx.to_pure_dict(abstract), nnx.to_pure_dict(shardings)


def _opt_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings, replicated):
    """Each parameter-shaped optimizer leaf (Adam moments) sharded as its parameter; the rest replicated.

    Frozen parameters (a task's `trainable`) hold `optax.MaskedNode`s instead of moments: kept as is.
    """
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    masked = lambda x: isinstance(x, optax.MaskedNode)
    return optax.tree_map_params(
        tx, lambda leaf, s: leaf if masked(leaf) else s, abstract_opt, param_shardings,
        transform_non_params=lambda _: replicated, is_leaf=masked,
    )


def _split_microbatches(batch: Mapping[str, jax.Array], accum: int) -> dict[str, jax.Array]:
    """[B, ...] → [accum, B/accum, ...] taking rows i::accum, so each device keeps its own rows."""
    return {k: jnp.swapaxes(v.reshape((v.shape[0] // accum, accum) + v.shape[1:]), 0, 1) for k, v in batch.items()}


def build_trainer(config: ConfigDict, mesh: Mesh | None = None) -> Trainer:
    task = get_task(config.task)
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    replicated = NamedSharding(mesh, P())
    tx = optim.make_optimizer(config.optim, config.train.steps, trainable=task.trainable(config))
    schedule = optim.learning_rate_schedule(config.optim, config.train.steps)

    rules = config.mesh.logical_axis_rules
    with sharding.use_mesh(mesh, rules):
        graphdef, abstract_params, param_shardings = _param_shardings(task, config, mesh)
    # Off the mesh: optax builds placeholder state eagerly, which a compile-only (AOT) TPU mesh cannot run.
    opt_shardings = _opt_shardings(tx, abstract_params, param_shardings, replicated)
    state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings}
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params, "opt_state": jax.eval_shape(tx.init, abstract_params)},
        state_shardings,
    )
    batch_shardings = {
        k: NamedSharding(mesh, sharding.logical_to_mesh_spec(axes, rules))
        for k, axes in task.batch_axes(config).items()
    }
    accum = config.train.grad_accum_steps

    def loss_sums(params, batch):
        return task.loss(nnx.merge(graphdef, params), batch, config)

    def grads_and_stats(params, batch, loss_scale):
        """∇(Σ total · loss_scale) and the summed stats; micro-batches all scale by the whole batch's 1/Σ w."""

        def scaled_loss(params, micro):
            total, stats = loss_sums(params, micro)
            return total * loss_scale, stats

        grad_fn = jax.grad(scaled_loss, has_aux=True)
        if accum == 1:
            return grad_fn(params, batch)

        def add_micro(carry, micro):
            grads, stats = grad_fn(params, micro)
            return jax.tree.map(jnp.add, carry, (grads, stats)), None

        micro = _split_microbatches(batch, accum)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, jax.tree.map(lambda v: v[0], micro)))
        return jax.lax.scan(add_micro, zeros, micro)[0]

    def train_step(state: TrainState, batch):
        # Normalising the loss (not the gradients) saves a read and a write of every gradient leaf.
        weight = task.loss_weight(batch, config)
        loss_scale = 1.0 / jnp.where(weight > 0, weight, 1.0)
        grads, stats = grads_and_stats(state["params"], batch, loss_scale)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(stats, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state["step"]))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    def eval_step(state: TrainState, batch):
        return loss_sums(state["params"], batch)[1]

    def init_state() -> TrainState:
        _, params = sharding.init_sharded(
            lambda rngs: task.build_model(config, rngs), mesh, rules, config.train.seed
        )
        params = task.initial_params(config, nnx.to_pure_dict(params), param_shardings)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
        return {"step": step, "params": params, "opt_state": opt_state}

    jit_train = jax.jit(
        train_step, in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, replicated), donate_argnums=0
    )
    jit_eval = jax.jit(eval_step, in_shardings=(state_shardings, batch_shardings), out_shardings=replicated)
    return Trainer(
        config=config,
        task=task,
        mesh=mesh,
        graphdef=graphdef,
        optimizer=tx,
        state_shardings=state_shardings,
        abstract_state=abstract_state,
        batch_shardings=batch_shardings,
        init_state=MeshBound(init_state, mesh, rules),
        train_step=MeshBound(jit_train, mesh, rules),
        eval_step=MeshBound(jit_eval, mesh, rules),
    )

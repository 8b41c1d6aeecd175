"""The device mesh, logical-axis rules, and parameter shardings: sharding is decided by config alone.

Mesh axes are `AXES = ("data", "fsdp", "tensor")`, sized from `config.mesh` (`ici_*` within a slice
or host, `dcn_*` across slices or processes). Every parameter carries its logical axes as Variable
metadata (`logical_axes=("embed", "mlp")`); `config.mesh.logical_axis_rules` maps logical names to
mesh axes. A mesh axis is used at most once per array: the first dimension that claims it gets it,
and a mesh axis that does not divide a dimension is skipped (vocab 6 over tensor 4 stays replicated).

How the active mesh and rules reach the model: enter `use_mesh(mesh, rules)` around tracing (the
jitted step, `jax.eval_shape`, init). It enters `jax.set_mesh(mesh)` and makes `rules` the table
`constrain` and the splash backend read. Outside it, `constrain` is a no-op, so the model also runs
unsharded on one device. The rules are read when a function is traced, not when it runs.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from nucgpt.errors import UserError

AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, Any]]

_active_rules: tuple[tuple[str, Any], ...] | None = None


def _fill_group(values: Sequence[int], total: int, prefix: str, unit: str) -> tuple[int, ...]:
    """Replaces the one allowed -1 so the group's product is `total`."""
    named = ", ".join(f"{prefix}_{a}_parallelism={v}" for a, v in zip(AXES, values))
    if any(v == 0 or v < -1 for v in values):
        raise UserError(f"mesh: parallelism must be a positive integer or -1, got {named}")
    if list(values).count(-1) > 1:
        raise UserError(f"mesh: at most one -1 per group, got {named}")
    known = math.prod(v for v in values if v != -1)
    if -1 in values:
        if total % known:
            raise UserError(f"mesh: {named} cannot fill {total} {unit} ({total} is not a multiple of {known})")
        return tuple(total // known if v == -1 else v for v in values)
    if known != total:
        raise UserError(f"mesh: {named} multiply to {known}, but there are {total} {unit}")
    return tuple(values)


def _num_granules(devices: Sequence[jax.Device], dcn: Sequence[int]) -> tuple[int, bool]:
    """How many DCN-connected groups: (count, process_is_granule).

    TPU: the slices (one multi-host slice is one ICI domain). Elsewhere: the processes (hosts), unless
    every dcn_* is 1, which asks for one domain across processes (e.g. one process per GPU of a node).
    """
    if devices[0].platform == "tpu":
        return len({getattr(d, "slice_index", 0) for d in devices}), False
    if all(v == 1 for v in dcn):
        return 1, True
    return len({d.process_index for d in devices}), True


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh: ici axes within a slice/process, dcn axes across them."""
    devices = list(jax.devices() if devices is None else devices)
    ici = [mesh_cfg[f"ici_{a}_parallelism"] for a in AXES]
    dcn = [mesh_cfg[f"dcn_{a}_parallelism"] for a in AXES]
    granules, process_is_granule = _num_granules(devices, dcn)
    if len(devices) % granules:
        raise UserError(f"mesh: {len(devices)} devices do not split evenly over {granules} slices/processes")
    dcn_shape = _fill_group(dcn, granules, "dcn", "slices/processes")
    ici_shape = _fill_group(ici, len(devices) // granules, "ici", "devices per slice/process")
    if granules == 1:
        device_array = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
    else:
        device_array = mesh_utils.create_hybrid_device_mesh(
            ici_shape, dcn_shape, devices, process_is_granule=process_is_granule, allow_split_physical_axes=True
        )
    return Mesh(device_array, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def data_parallel_mesh(devices: Sequence[jax.Device]) -> Mesh:
    """Every device on the `data` axis (fsdp and tensor of size 1): for inference, where each device
    runs its own rows of a batch and the weights are replicated."""
    return Mesh(np.asarray(devices).reshape(-1, 1, 1), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None],
    rules: Rules,
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | jax.sharding.AbstractMesh | None = None,
) -> PartitionSpec:
    """Maps logical dimension names to mesh axes; with `shape` and `mesh`, skips non-dividing axes."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise UserError(f"logical axis {name!r} has no entry in mesh.logical_axis_rules ({', '.join(table)})")
        target = table[name]
        candidates = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        claimed, size = [], 1
        for axis in candidates:
            if axis in used:
                continue
            if shape is not None and mesh is not None:
                if shape[dim] % (size * mesh.shape[axis]):
                    continue
                size *= mesh.shape[axis]
            claimed.append(axis)
        used.update(claimed)
        spec.append(None if not claimed else claimed[0] if len(claimed) == 1 else tuple(claimed))
    return PartitionSpec(*spec)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[Mesh]:
    """Makes `mesh` the JAX context mesh and `rules` the table `constrain` uses (see module doc)."""
    global _active_rules
    previous = _active_rules
    _active_rules = tuple((name, target) for name, target in rules)
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _active_rules = previous


def active_rules() -> tuple[tuple[str, Any], ...] | None:
    """The rules of the innermost `use_mesh`, or None outside it."""
    return _active_rules


def active_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh set by `use_mesh` (abstract inside a trace), or None when no rules/mesh are active."""
    mesh = jax.sharding.get_abstract_mesh()
    if _active_rules is None or mesh.empty:
        return None
    return mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by the active rules; a no-op outside `use_mesh`."""
    mesh = active_mesh()
    if mesh is None:
        return x
    spec = logical_to_mesh_spec(logical_axes, _active_rules, shape=x.shape, mesh=mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
    """A Variable's `logical_axes` metadata; replicated (all None) where it has none."""
    axes = variable.get_metadata().get("logical_axes")
    return tuple(axes) if axes is not None else (None,) * np.ndim(variable.get_value())


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings in the same tree structure: Variables by their logical axes, bare arrays replicated.

    Works for parameter State and for optimizer state built from it (optax keeps the Variables).
    """

    def sharding_of(leaf):
        if _is_variable(leaf):
            value = leaf.get_value()
            spec = logical_to_mesh_spec(logical_axes_of(leaf), rules, shape=value.shape, mesh=mesh)
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(sharding_of, abstract_state, is_leaf=_is_variable)


def abstract_state_and_shardings(
    model_factory: Callable[[nnx.Rngs], nnx.Module], mesh: Mesh, rules: Rules
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Shapes and shardings of the model state from `jax.eval_shape`: nothing is allocated."""
    with use_mesh(mesh, rules):
        abstract_model = nnx.eval_shape(lambda: model_factory(nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    return graphdef, abstract_state, state_shardings(abstract_state, mesh, rules)


def init_sharded(
    model_factory: Callable[[nnx.Rngs], nnx.Module], mesh: Mesh, rules: Rules, seed: int
) -> tuple[nnx.GraphDef, nnx.State]:
    """Initialises parameters directly into their shards: init is jitted with the target out_shardings.

    The values do not depend on the mesh (partitionable threefry), so every mesh starts identically.
    """
    graphdef, _, shardings = abstract_state_and_shardings(model_factory, mesh, rules)

    def init() -> nnx.State:
        return nnx.state(model_factory(nnx.Rngs(seed)))

    with use_mesh(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state

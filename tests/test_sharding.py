"""Mesh construction, logical-axis rules, sharded init, and equal loss/grads on every mesh."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.pretrain import FSDP_RULES, get_config
from nucgpt import sharding
from nucgpt.errors import UserError
from nucgpt.model import Transformer
from test_model import cross_entropy, make_batch, max_relative_error, reference, tiny_cfg


def mesh_cfg(data=1, fsdp=-1, tensor=1, dcn_data=-1):
    cfg = get_config("demo").mesh
    cfg.update(ici_data_parallelism=data, ici_fsdp_parallelism=fsdp, ici_tensor_parallelism=tensor,
               dcn_data_parallelism=dcn_data)
    return cfg


def test_mesh_shapes_from_config():
    assert dict(sharding.make_mesh(mesh_cfg()).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(sharding.make_mesh(mesh_cfg(2, 2, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh(mesh_cfg(-1, 1, 4)).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert sharding.make_mesh(mesh_cfg(), jax.devices()[:4]).devices.shape == (1, 4, 1)
    assert sharding.make_mesh(mesh_cfg()).axis_names == sharding.AXES


@pytest.mark.parametrize(
    "cfg, message",
    [
        (mesh_cfg(2, 2, 1), r"ici_data_parallelism=2, ici_fsdp_parallelism=2, ici_tensor_parallelism=1 multiply to 4, but there are 8 devices per slice/process"),
        (mesh_cfg(-1, -1, 1), "at most one -1"),
        (mesh_cfg(1, -1, 3), "cannot fill 8 devices"),
        (mesh_cfg(0, -1, 1), "positive integer or -1"),
        (mesh_cfg(dcn_data=2), "dcn_data_parallelism=2.* multiply to 2, but there are 1 slices/processes"),
    ],
)
def test_bad_mesh_is_a_user_error(cfg, message):
    with pytest.raises(UserError, match=message):
        sharding.make_mesh(cfg)


def test_logical_to_mesh_spec_first_claim_wins():
    assert sharding.logical_to_mesh_spec(("batch", "length", "embed"), FSDP_RULES) == P(("data", "fsdp"), None, None)
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), FSDP_RULES) == P("fsdp", "tensor")
    assert sharding.logical_to_mesh_spec(("layers", "heads", None), FSDP_RULES) == P(None, "tensor", None)
    mesh = sharding.make_mesh(mesh_cfg(1, 2, 4))
    # vocab 6 is not divisible by tensor 4: that dimension stays whole rather than failing.
    assert sharding.logical_to_mesh_spec(("vocab", "embed"), FSDP_RULES, shape=(6, 64), mesh=mesh) == P(None, "fsdp")
    with pytest.raises(UserError, match="logical axis 'widths' has no entry"):
        sharding.logical_to_mesh_spec(("widths",), FSDP_RULES)


def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.ones((4, 8))
    assert sharding.constrain(x, ("batch", "embed")) is x


def test_parameters_are_initialised_into_the_shards_the_rules_name():
    """Specs follow FSDP_RULES, and values equal an unsharded init: the mesh does not change the weights."""
    mesh = sharding.make_mesh(mesh_cfg(2, 2, 2))
    _, state = sharding.init_sharded(lambda rngs: Transformer(tiny_cfg(), rngs=rngs), mesh, FSDP_RULES, seed=0)
    blocks = state["blocks"]
    assert blocks["wq"][...].sharding.spec == P(None, "fsdp", "tensor", None)
    assert blocks["wo"][...].sharding.spec == P(None, "tensor", None, "fsdp")
    assert blocks["w_down"][...].sharding.spec == P(None, "tensor", "fsdp")
    assert blocks["attn_out_norm"][...].sharding.spec == P(None, "fsdp")
    assert state["embedding"][...].sharding.spec == P("tensor", "fsdp")
    assert state["unembedding"][...].sharding.spec == P("fsdp", "tensor")
    # Each device holds a quarter of wq: [layers, 64/2, 4/2, 16].
    assert {s.data.shape for s in blocks["wq"][...].addressable_shards} == {(2, 32, 2, 16)}
    assert max_relative_error(jax.device_get(state), reference()[1]) < 1e-6  # jit vs eager rounding


@pytest.mark.parametrize("norm_backward, meshes", [
    ("recompute", ((8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2))),
    ("saved_rsqrt", ((2, 2, 2),)),  # the hand-written RMSNorm backward's row and column sums, sharded
])
def test_loss_and_grads_match_one_device_on_every_mesh(norm_backward, meshes):
    """One training-step gradient per mesh, jitted with explicit in/out shardings as the trainer runs it."""
    _, state, reference_loss, reference_grads = reference()
    graphdef, _ = nnx.split(Transformer(tiny_cfg(norm_backward=norm_backward), rngs=nnx.Rngs(0)))
    tokens, targets = make_batch()

    def loss_fn(state, tokens, targets):
        return cross_entropy(nnx.merge(graphdef, state)(tokens), targets)

    for shape in meshes:
        mesh = sharding.make_mesh(mesh_cfg(*shape))
        shardings = sharding.state_shardings(state, mesh, FSDP_RULES)
        batch = NamedSharding(mesh, sharding.logical_to_mesh_spec(("batch", "length"), FSDP_RULES))
        step = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(shardings, batch, batch),
                       out_shardings=(NamedSharding(mesh, P()), shardings))
        with sharding.use_mesh(mesh, FSDP_RULES):
            loss, grads = jax.device_get(step(jax.device_put(state, shardings), tokens, targets))
        assert abs(float(loss - reference_loss)) <= 1e-5 * abs(float(reference_loss)), shape
        assert max_relative_error(grads, reference_grads) <= 1e-5, shape

"""A pretraining checkpoint as a model on one device: what generation and interpretability start from."""

import jax
from etils import epath
from flax import nnx
from ml_collections import ConfigDict

from nucgpt import checkpoint
from nucgpt.errors import UserError
from nucgpt.model import Transformer


def pretraining_checkpoint(path: str, flag: str, purpose: str) -> tuple[epath.Path, ConfigDict]:
    """(step folder, its config) of the pretraining checkpoint `path` names — a workdir, its
    checkpoints/ or a step folder — reading no arrays. `flag` and `purpose` word the errors."""
    step_dir = checkpoint.resolve_step_dir(path, flag)
    try:
        config = checkpoint.load_pretrained_config(str(step_dir))
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {step_dir}: no readable config ({type(e).__name__})") from None
    if config.get("task") != "pretrain":
        raise UserError(f"{flag} {step_dir}: a {config.get('task')!r} checkpoint; {purpose} needs a pretraining (language-model) one")
    return step_dir, config


def load_transformer(step_dir: epath.Path, model_config: ConfigDict) -> Transformer:
    """The checkpoint's Transformer with its parameters restored onto one device, whatever mesh
    wrote them (orbax needs the target's shardings for that); no random init runs."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.to_pure_dict(state))
    try:
        params = checkpoint.restore_params(step_dir, target)
    except (OSError, ValueError) as e:  # a damaged or partly copied params/ folder
        raise UserError(f"--checkpoint {step_dir}: unreadable parameters ({type(e).__name__}: {str(e)[:200]})") from None
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def load_for_inference(step_dir: epath.Path, config: ConfigDict) -> Transformer:
    """`load_transformer` with the attention backend left to the platform (`auto`): inference
    lengths are not the training shape, and a named kernel (splash) may not take them."""
    model_config = config.model.copy_and_resolve_references()
    model_config.attention = "auto"
    return load_transformer(step_dir, model_config)

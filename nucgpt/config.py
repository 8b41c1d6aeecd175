"""Config validation: every bad field is named, all of them at once, before anything starts.

`validate(config, mesh_shape=...)` raises one `UserError` whose message lists each problem as
`section.key: what is wrong`. The mesh shape (axis → size) comes from the mesh the run will use,
so divisibility is checked against the real device count.
"""

import json
import math
from typing import Mapping

from ml_collections import ConfigDict

from nucgpt import sharding
from nucgpt.errors import UserError
from nucgpt.model import attention
from nucgpt.tokenizers import get_tokenizer

CHOICES = {
    "model.attention": ("auto", "xla", "cudnn", "splash"),
    "model.mlp_activation": ("gelu", "swiglu"),
    "model.norm_placement": ("sandwich", "pre"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16", "float16"),
    "data.tokenizer": ("nucleotide", "kmer6_overlap", "kmer6_nonoverlap"),
    "diagnostics.stack_traces": ("auto", "on", "off"),
}
POSITIVE = (
    "train.steps", "train.global_batch_size", "train.seq_len", "train.grad_accum_steps", "train.log_every",
    "train.eval_every", "checkpoint.every", "checkpoint.keep", "model.d_model", "model.num_layers",
    "model.num_heads", "model.num_kv_heads", "model.head_dim", "model.mlp_dim", "model.vocab_size",
    "classify.min_bucket_len", "optim.eps",
)
# What a set of parameters means beyond its shapes: a checkpoint (resume) or a pretrained trunk
# (fine-tuning) only makes sense under the same values. Fields absent from an older config are skipped.
# Not data.kmer_pad_multiple: the tokenizer's own padding never reaches the model (a pretraining row is
# cropped/padded to train.seq_len with the same PAD; fine-tuning, score and generate tokenize unpadded).
ARCHITECTURE_FIELDS = {
    "model": (
        "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
        "mlp_activation", "norm_placement", "norm_eps", "rope_base", "tie_embeddings", "scan_layers",
    ),
    "data": ("tokenizer",),
    "classify": ("pooling", "freeze_trunk"),  # a fine-tune's head reads the trunk this way; compared on resume only
}


def architecture_differences(config: Mapping, other: Mapping, sections: tuple[str, ...] = ("data", "model")) -> list[str]:
    """`section.key=<config's> but <other's>` for each architecture field the two set differently."""
    return [
        f"{section}.{key}={config[section][key]!r} but the checkpoint has {other[section][key]!r}"
        for section in sections
        for key in ARCHITECTURE_FIELDS[section]
        if key in other.get(section, {}) and key in config.get(section, {}) and config[section][key] != other[section][key]
    ]


NON_NEGATIVE = (
    "train.repeat_weight", "optim.warmup_steps", "optim.weight_decay", "optim.clip_norm", "train.eval_steps",
    "diagnostics.profile_steps", "diagnostics.profile_skip_steps", "data.num_workers", "data.prefetch",
    "optim.final_learning_rate", "classify.synthetic_examples",
)
FRACTIONS = ("optim.b1", "optim.b2")  # in [0, 1)
PROBABILITIES = ("data.reverse_complement_prob",)  # in [0, 1]


def get(config: ConfigDict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _has(config: ConfigDict, dotted: str) -> bool:
    try:
        get(config, dotted)
        return True
    except (KeyError, AttributeError):
        return False


def problems(
    config: ConfigDict, mesh_shape: Mapping[str, int] | None = None, process_count: int = 1, platform: str | None = None
) -> list[str]:
    """Every problem with `config`, one `field: reason` string each (empty when the config is good).

    `platform` is the one the step is compiled for (the mesh's: TPU when compiling ahead of time on
    a CPU host); it decides which kernel `model.attention=auto` means. Default: the host's.
    """
    nonfinite = {key: value for key, value in _leaves(config.to_dict()) if isinstance(value, float) and not math.isfinite(value)}
    out: list[str] = [f"{key}: must be a finite number, got {value}" for key, value in nonfinite.items()]
    for key, choices in CHOICES.items():
        if _has(config, key) and get(config, key) not in choices:
            out.append(f"{key}: {get(config, key)!r} is not one of {', '.join(choices)}")
    for key in POSITIVE:
        if _has(config, key) and key not in nonfinite and not get(config, key) > 0:
            out.append(f"{key}: must be positive, got {get(config, key)}")
    for key in NON_NEGATIVE:
        if _has(config, key) and key not in nonfinite and not get(config, key) >= 0:
            out.append(f"{key}: must be >= 0, got {get(config, key)}")
    for key in FRACTIONS:
        if _has(config, key) and key not in nonfinite and not 0 <= get(config, key) < 1:
            out.append(f"{key}: must lie in [0, 1), got {get(config, key)}")
    for key in PROBABILITIES:
        if _has(config, key) and key not in nonfinite and not 0 <= get(config, key) <= 1:
            out.append(f"{key}: must lie in [0, 1], got {get(config, key)}")
    if _has(config, "classify.test_fraction") and "classify.test_fraction" not in nonfinite:
        if not 0 < config.classify.test_fraction < 1:
            out.append(f"classify.test_fraction: must lie in (0, 1), got {config.classify.test_fraction}")
    if _has(config, "mesh.logical_axis_rules"):
        out.extend(_rule_problems(config.mesh.logical_axis_rules))
    if out:
        return out  # the checks below divide by these values

    m, t = config.model, config.train
    if m.kind == "transformer":
        if m.num_heads % m.num_kv_heads:
            out.append(f"model.num_heads: {m.num_heads} is not a multiple of model.num_kv_heads ({m.num_kv_heads})")
        if m.head_dim % 2:
            out.append(f"model.head_dim: {m.head_dim} must be even for rotary embeddings")
        try:  # the attention module's own rule for the backend `auto` resolves to on this platform
            attention.check_shapes(attention.resolve_backend(m.attention, platform), t.seq_len, m.head_dim, m.splash_block_q, m.splash_block_kv)
        except UserError as e:
            out.append(f"train.seq_len: {t.seq_len} with model.attention={m.attention!r}: {e}")
    if _has(config, "data.tokenizer"):
        tokenizer = get_tokenizer(config.data.tokenizer, pad_multiple=config.data.kmer_pad_multiple)
        if m.vocab_size < tokenizer.vocab_size:
            out.append(f"model.vocab_size: {m.vocab_size} is smaller than the {tokenizer.name} tokenizer's vocabulary ({tokenizer.vocab_size})")
    if not config.optim.learning_rate > 0:
        out.append(f"optim.learning_rate: must be positive, got {config.optim.learning_rate}")
    if config.optim.final_learning_rate > config.optim.learning_rate:
        out.append(f"optim.final_learning_rate: {config.optim.final_learning_rate} exceeds optim.learning_rate")
    if t.global_batch_size % t.grad_accum_steps:
        out.append(f"train.global_batch_size: {t.global_batch_size} is not a multiple of train.grad_accum_steps ({t.grad_accum_steps})")
    if t.global_batch_size % process_count:
        out.append(f"train.global_batch_size: {t.global_batch_size} is not a multiple of the process count ({process_count})")
    if mesh_shape is not None:
        batch_parallel = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
        micro = t.global_batch_size // t.grad_accum_steps
        if micro % batch_parallel:
            out.append(
                f"train.global_batch_size: {t.global_batch_size} (÷ {t.grad_accum_steps} accumulation steps = {micro}) "
                f"is not a multiple of the data-parallel size data×fsdp = {batch_parallel}"
            )
        tensor = mesh_shape.get("tensor", 1)
        if m.kind == "transformer":
            for key in ("num_heads", "mlp_dim"):
                if m[key] % tensor:
                    out.append(f"model.{key}: {m[key]} is not divisible by the tensor-parallel size ({tensor})")
            if m.d_model % mesh_shape.get("fsdp", 1):
                out.append(f"model.d_model: {m.d_model} is not divisible by the fsdp size ({mesh_shape.get('fsdp', 1)})")
    return out


def _leaves(tree: Mapping, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _rule_problems(rules) -> list[str]:
    """Each rule is (logical name, None | a mesh axis | a sequence of mesh axes)."""
    where = "mesh.logical_axis_rules"
    if isinstance(rules, str) or not isinstance(rules, (list, tuple)):
        return [f"{where}: must be a sequence of (logical name, mesh axes) pairs, got {rules!r}"]
    out = []
    for rule in rules:
        if isinstance(rule, str) or not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
            out.append(f"{where}: {rule!r} is not a (logical name, mesh axes) pair")
            continue
        target = rule[1]
        axes = () if target is None else (target,) if isinstance(target, str) else target
        if not isinstance(axes, (list, tuple)) or any(axis not in sharding.AXES for axis in axes):
            out.append(f"{where}: {rule[0]!r} maps to {target!r}; use None, one of {', '.join(sharding.AXES)}, "
                       "or a tuple of them")
    return out


def validate(
    config: ConfigDict, mesh_shape: Mapping[str, int] | None = None, process_count: int = 1, platform: str | None = None
) -> None:
    found = problems(config, mesh_shape, process_count, platform)
    if found:
        raise UserError("; ".join(found) if len(found) > 1 else found[0])


def notes(config: ConfigDict) -> list[str]:
    """Settings that are valid but probably not what was meant: said once at start-up, never refused."""
    out = []
    warmup, steps = config.optim.warmup_steps, config.train.steps
    if not config.get("eval_only") and warmup >= steps:
        out.append(
            f"optim.warmup_steps {warmup} >= train.steps {steps}: the learning rate rises for the whole run and "
            f"never reaches optim.learning_rate {config.optim.learning_rate:g}"
        )
    return out


def changed_settings(config: Mapping, stored: Mapping, ignore: tuple[str, ...] = ("eval_only",)) -> list[str]:
    """`key old → new` for each setting `config` gives differently from `stored` (a checkpoint's config)."""
    before = dict(_leaves(stored))
    return [
        f"{key} {before[key]!r} → {value!r}"
        for key, value in _leaves(config)
        if key in before and key not in ignore and _comparable(before[key]) != _comparable(value)
    ]


def _comparable(value):
    """JSON turns tuples into lists: compare the two alike."""
    return json.loads(json.dumps(value)) if isinstance(value, (list, tuple)) else value

"""Independent numerics: HF `LlamaForCausalLM` for the LLaMA-shaped variant, plain numpy for the published one.

Both load the same float32 weights as our model. head_dim (32) differs from d_model / heads (16)
so the test also shows head_dim is independent of d_model. Norm scales are randomised so a norm
applied in the wrong place cannot hide behind scales of one.
"""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from nucgpt.model import Transformer
from test_model import max_relative_error, tiny_cfg

SEQ_LEN = 24


def numerics_cfg(**overrides):
    return tiny_cfg(num_heads=4, num_kv_heads=2, head_dim=32, rope_base=500.0, init_std=0.2, **overrides)


def model_and_params(cfg):
    """Our model with norm scales around 1 and its weights as float64 numpy arrays."""
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    key = jax.random.key(1)
    for path, variable in nnx.to_flat_state(state):
        if path[-1].endswith("norm"):
            key, sub = jax.random.split(key)
            variable.set_value(1.0 + 0.2 * jax.random.normal(sub, variable.get_value().shape))
    nnx.update(model, state)
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model)))
    return model, params


def ours(model, tokens):
    return np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens), np.float64)


def test_llama_variant_matches_hugging_face():
    torch = pytest.importorskip("torch", reason="torch is an optional test dependency (.ci/run installs it)")
    transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency")
    cfg = numerics_cfg(norm_placement="pre", mlp_activation="swiglu")
    model, p = model_and_params(cfg)
    d, f = cfg.d_model, cfg.mlp_dim
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=d, intermediate_size=f, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
        max_position_embeddings=SEQ_LEN, tie_word_embeddings=False, hidden_act="silu",
    )
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).to(torch.float32).eval()
    b = p["blocks"]
    weights = {"model.embed_tokens.weight": p["embedding"], "model.norm.weight": p["final_norm"],
               "lm_head.weight": p["unembedding"].T}
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}."
        weights.update({
            prefix + "input_layernorm.weight": b["attn_in_norm"][i],
            prefix + "self_attn.q_proj.weight": b["wq"][i].reshape(d, -1).T,
            prefix + "self_attn.k_proj.weight": b["wk"][i].reshape(d, -1).T,
            prefix + "self_attn.v_proj.weight": b["wv"][i].reshape(d, -1).T,
            prefix + "self_attn.o_proj.weight": b["wo"][i].reshape(-1, d).T,
            prefix + "post_attention_layernorm.weight": b["mlp_in_norm"][i],
            prefix + "mlp.gate_proj.weight": b["w_gate"][i].T,
            prefix + "mlp.up_proj.weight": b["w_up"][i].T,
            prefix + "mlp.down_proj.weight": b["w_down"][i].T,
        })
    missing, unexpected = hf.load_state_dict(
        {k: torch.tensor(np.ascontiguousarray(v), dtype=torch.float32) for k, v in weights.items()}, strict=False
    )
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, SEQ_LEN))
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.double().numpy()
    assert max_relative_error(ours(model, tokens), expected) <= 1e-4


def _rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _rope(x_BxLxHxK, base):
    half = x_BxLxHxK.shape[-1] // 2
    angles_LxK = np.arange(x_BxLxHxK.shape[1])[:, None] * base ** (-np.arange(half) / half)[None]
    sin, cos = np.sin(angles_LxK)[None, :, None], np.cos(angles_LxK)[None, :, None]
    x1, x2 = x_BxLxHxK[..., :half], x_BxLxHxK[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def numpy_sandwich_forward(p, tokens, cfg):
    """The published architecture written out loop by loop in float64."""
    eps, group = cfg.norm_eps, cfg.num_heads // cfg.num_kv_heads
    length = tokens.shape[1]
    causal = np.tril(np.ones((length, length), bool))
    x = p["embedding"][tokens]
    for i in range(cfg.num_layers):
        layer = {name: value[i] for name, value in p["blocks"].items()}
        h = _rms_norm(x, layer["attn_in_norm"], eps)
        q = _rope(np.einsum("bld,dhk->blhk", h, layer["wq"]), cfg.rope_base)
        k = np.repeat(_rope(np.einsum("bld,dgk->blgk", h, layer["wk"]), cfg.rope_base), group, axis=2)
        v = np.repeat(np.einsum("bld,dgk->blgk", h, layer["wv"]), group, axis=2)
        scores = np.einsum("blhk,bmhk->bhlm", q, k) / math.sqrt(cfg.head_dim)
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("blhk,hkd->bld", np.einsum("bhlm,bmhk->blhk", probs, v), layer["wo"])
        x = x + _rms_norm(attn, layer["attn_out_norm"], eps)
        mlp = _gelu_tanh(_rms_norm(x, layer["mlp_in_norm"], eps) @ layer["w_up"]) @ layer["w_down"]
        x = x + _rms_norm(mlp, layer["mlp_out_norm"], eps)
    return _rms_norm(x, p["final_norm"], eps) @ p["unembedding"]


def test_published_variant_matches_numpy_forward():
    cfg = numerics_cfg(norm_placement="sandwich", mlp_activation="gelu")
    model, params = model_and_params(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, SEQ_LEN))
    assert max_relative_error(ours(model, tokens), numpy_sandwich_forward(params, tokens, cfg)) <= 1e-4

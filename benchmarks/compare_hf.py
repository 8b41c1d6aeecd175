"""The peer, timed like ours: Hugging Face `LlamaForCausalLM` of the preset's shape in PyTorch.

    python -m benchmarks.compare_hf --config configs/pretrain.py:nucleotide_gpt_500m \
        --config.train.global_batch_size=4 --mode compile --steps 10

SDPA attention, float32 parameters under bfloat16 autocast (when the preset computes in bf16),
fused AdamW with the preset's betas/eps/decay, global-norm clipping as our trainer does, one process
on one device. Prints benchmarks.report's table and JSON line (same keys as benchmarks.mfu).

Same *size*, not the same architecture: LLaMA's MLP is SwiGLU (three matrices), so for a GeLU preset
the intermediate size is 2/3 of `mlp_dim` (rounded to 128) to match the matmul parameter count; norm
placement stays LLaMA's pre-norm. MFU uses our model's FLOPs per token (`nucgpt.flops`) so both tools
divide the same work by the same peak; the record carries both matmul parameter counts.
"""

import importlib.util
import time

from absl import app, flags
from ml_collections import config_flags

from benchmarks import report
from nucgpt import flops
from nucgpt.errors import UserError, exits_cleanly_on_user_error, parse_flags

config_flags.DEFINE_config_file("config", None, "configs/pretrain.py:<preset>", lock_config=True)
flags.DEFINE_enum("mode", "eager", ["eager", "compile"], "eager PyTorch or torch.compile (inductor)")
flags.DEFINE_integer("steps", 10, "timed steps")
flags.DEFINE_integer("warmup", 3, "untimed steps first (compile, allocator, cuBLAS/cuDNN heuristics)")
flags.DEFINE_enum("timing", "pipelined", ["pipelined", "synchronous"],
                  "as benchmarks.mfu: the next step queued before the host waits (a CUDA event per step), "
                  "or a full synchronize after each")
flags.DEFINE_float("peak_tflops", None, "device peak in dense bf16 TFLOP/s; default from nucgpt.flops")
flags.DEFINE_string("json_out", "", "append the JSON line to this file")
FLAGS = flags.FLAGS


def llama_intermediate_size(model_cfg) -> int:
    """SwiGLU width whose three matrices hold as many parameters as the preset's MLP."""
    if model_cfg.mlp_activation == "swiglu":
        return model_cfg.mlp_dim
    return max(128, round(2 * model_cfg.mlp_dim / 3 / 128) * 128)


def build_llama(model_cfg, seq_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.d_model,
        intermediate_size=llama_intermediate_size(model_cfg),
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_kv_heads,
        head_dim=model_cfg.head_dim,
        max_position_embeddings=seq_len,
        rms_norm_eps=model_cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": model_cfg.rope_base},
        tie_word_embeddings=model_cfg.tie_embeddings,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(hf_config)


def matmul_params(model) -> int:
    """Weights of the per-layer projections, as `nucgpt.flops.matmul_params` counts ours (no head)."""
    import torch

    return sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))


@exits_cleanly_on_user_error
def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    if config is None:
        raise UserError("--config is required, e.g. --config configs/pretrain.py:nucleotide_gpt_500m")
    report.check_timing_flags(FLAGS.steps, FLAGS.warmup, FLAGS.peak_tflops)
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"compare_hf needs {' and '.join(missing)}, which are not installed (pip install torch transformers)")
    import torch

    if config.get("task", "pretrain") != "pretrain":
        raise UserError("compare_hf times language-model pretraining only (config.task=pretrain)")
    model_cfg, train_cfg, optim_cfg = config.model, config.train, config.optim
    batch, seq_len = train_cfg.global_batch_size, train_cfg.seq_len
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(train_cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True

    with device:  # initialise on the device: 0.5B parameters initialise slowly on the host
        model = build_llama(model_cfg, seq_len).train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=optim_cfg.learning_rate, betas=(optim_cfg.b1, optim_cfg.b2),
        eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay, fused=True,
    )
    forward = torch.compile(model) if FLAGS.mode == "compile" else model
    autocast_dtype = torch.bfloat16 if model_cfg.compute_dtype == "bfloat16" else torch.float32
    tokens_BxL = torch.randint(0, model_cfg.vocab_size, (batch, seq_len + 1), device=device)
    inputs_BxL, targets_BxL = tokens_BxL[:, :-1].contiguous(), tokens_BxL[:, 1:].contiguous()

    def train_step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            logits_BxLxV = forward(input_ids=inputs_BxL).logits
        loss = torch.nn.functional.cross_entropy(
            logits_BxLxV.float().reshape(-1, model_cfg.vocab_size), targets_BxL.reshape(-1)
        )
        loss.backward()
        if optim_cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.clip_norm, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type != "cuda":
            return loss
        done = torch.cuda.Event()  # waiting on it waits for this step only, not for the one queued after
        done.record()
        return done

    def wait(step_result):
        if device.type != "cuda":
            step_result.item()
        elif FLAGS.timing == "synchronous":
            torch.cuda.synchronize()
        else:
            step_result.synchronize()

    warmup_start = time.perf_counter()
    report.time_steps(train_step, wait, max(1, FLAGS.warmup), FLAGS.timing)
    warmup_s = time.perf_counter() - warmup_start
    step_times_s = report.time_steps(train_step, wait, FLAGS.steps, FLAGS.timing)

    device_kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = report.device_peak(FLAGS.peak_tflops, flops.peak_flops_per_device, device_kind)
    report.emit(
        report.make_record(
            device_kind=device_kind,
            num_devices=1,
            mesh=None,
            global_batch=batch,
            seq_len=seq_len,
            step_times_s=step_times_s,
            flops_per_token=flops.train_flops_per_token(model_cfg, seq_len),
            peak_flops_per_device=peak,
            peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            compile_time_s=warmup_s if FLAGS.mode == "compile" else None,
            params=params,
            tool="compare_hf",
            variant=f"hf_{FLAGS.mode}",
            matmul_params=matmul_params(model),
            nucgpt_matmul_params=flops.matmul_params(model_cfg),
            intermediate_size=llama_intermediate_size(model_cfg),
            framework=f"torch {torch.__version__}",
            timing=FLAGS.timing,
        ),
        FLAGS.json_out,
    )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

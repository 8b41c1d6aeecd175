"""Pretraining presets: `--config configs/pretrain.py:<preset>`.

Every field any preset may set lives in `base_config()`, so an unknown `--config.x=y` key is an
error and a preset only states what differs from the base. Presets: demo, nucleotide_gpt_500m,
llama_500m, kmer6_overlap, kmer6_nonoverlap.
"""

from ml_collections import ConfigDict

# Default FSDP: parameters sharded over `fsdp` on their embed dimension, batch over data × fsdp,
# heads/mlp/vocab over `tensor`. A mesh axis is used at most once per array: the first logical
# dimension (in array order) that claims it gets it, so activations [batch, length, embed] shard
# only on batch.
FSDP_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("classes", None),
)


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.task = "pretrain"  # pretrain | classify
    c.init_from = ""  # a pretraining workdir or checkpoint step folder (fine-tuning)
    c.eval_only = False

    c.model = ConfigDict(
        dict(
            kind="transformer",  # transformer | cnn (classification baseline)
            vocab_size=6,
            d_model=2048,
            num_layers=12,
            num_heads=8,
            num_kv_heads=8,
            head_dim=128,
            mlp_dim=8192,
            mlp_activation="gelu",  # gelu | swiglu
            norm_placement="sandwich",  # sandwich (published) | pre (LLaMA)
            norm_eps=1e-6,
            rope_base=10000.0,
            tie_embeddings=False,
            init_std=0.02,
            param_dtype="float32",
            compute_dtype="bfloat16",
            # none | full | dots | save_attention_out | save_qkv_attention_out | save_projections |
            # save_projections_and_mlp | save_matmuls (nucgpt/model/transformer.py: REMAT_POLICIES)
            remat_policy="none",
            scan_layers=True,
            attention="auto",  # auto | xla | cudnn | splash
            splash_block_q=512,
            splash_block_kv=512,
            embedding_lookup="auto",  # auto (one-hot matmul for vocab <= 512) | gather | one_hot
            norm_backward="recompute",  # recompute (jax.checkpoint) | saved_rsqrt (custom VJP) | pallas (one pass)
            norm_kernel_layout="auto",  # pallas on GPUs: auto | TILE_ROWSxTILESxWARPS[p] (benchmarks.norm_check)
            join_norms=False,  # sandwich: each out-norm + residual add + next norm as one kernel each way
            join_kernel_layout="auto",  # join_norms on GPUs: auto | TILE_ROWSxTILESxWARPS[p]
            fused_qkv=False,  # one matmul for q, k and v (their weights stacked per step)
        )
    )

    c.data = ConfigDict(
        dict(
            path="",  # a prepared folder (manifest.json); empty + synthetic_bp > 0 → generated demo genome
            tokenizer="nucleotide",  # nucleotide | kmer6_overlap | kmer6_nonoverlap
            kmer_pad_multiple=512,  # k-mer tokenizers pad their own output; no row sees it (rows are train.seq_len)
            reverse_complement_prob=0.0,
            num_workers=0,  # Grain worker processes (0 = in the main process)
            prefetch=2,
            synthetic_bp=0,
            synthetic_seed=0,
            synthetic_window=0,  # record length of the generated genome; 0 → train.seq_len
            eval_split="valid",
        )
    )

    c.train = ConfigDict(
        dict(
            steps=20_000,
            global_batch_size=16,
            seq_len=8192,
            repeat_weight=0.5,
            grad_accum_steps=1,
            log_every=50,
            eval_every=1000,
            eval_steps=20,
            seed=0,
        )
    )

    c.optim = ConfigDict(
        dict(
            learning_rate=3e-4,
            warmup_steps=50,
            final_learning_rate=1e-5,
            weight_decay=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            clip_norm=1.0,
            decay_norms_and_embeddings=False,
        )
    )

    c.checkpoint = ConfigDict(dict(every=1000, keep=3, async_save=True))

    c.mesh = ConfigDict(
        dict(
            ici_data_parallelism=1,
            ici_fsdp_parallelism=-1,
            ici_tensor_parallelism=1,
            dcn_data_parallelism=-1,
            dcn_fsdp_parallelism=1,
            dcn_tensor_parallelism=1,
            logical_axis_rules=FSDP_RULES,
            # Virtual CPU devices on a CPU-only host (XLA runs one thread per device): 0 = JAX's
            # default of one; -1 = one per core, a power of two dividing the global batch. Ignored
            # where XLA_FLAGS already sets a host device count, and by GPU and TPU platforms.
            cpu_devices=0,
        )
    )

    c.diagnostics = ConfigDict(
        dict(
            stack_traces="auto",  # auto (on for TPU) | on | off: cloud-tpu-diagnostics collection
            stack_trace_interval_s=600,
            profile_steps=0,  # > 0: trace this many steps with jax.profiler into DIR/tensorboard (process 0)
            profile_skip_steps=5,  # steps of the run before the trace starts (compilation, warm-up)
        )
    )
    return c


def demo(c: ConfigDict) -> None:
    """A small model on a generated genome: trains on a 2-core CPU in a few minutes.

    Wide and shallow with short sequences: most of what can be learned from the synthetic genome is
    memorising the repeat families (an 11-mer lookup reaches ~0.87 nats on repeats), and width
    memorises per token faster than depth. Repeat weight 1 so `eval_loss` is the plain
    cross-entropy that the unigram entropy (~1.37 nats) bounds.
    """
    c.model.update(
        vocab_size=6, d_model=256, num_layers=2, num_heads=16, num_kv_heads=16, head_dim=16,
        mlp_dim=1024, compute_dtype="float32", scan_layers=True,
    )
    c.data.update(synthetic_bp=3_000_000, synthetic_seed=0)
    c.train.update(
        steps=480, global_batch_size=32, seq_len=128, repeat_weight=1.0, log_every=40, eval_every=240,
        eval_steps=16,
    )
    c.optim.update(learning_rate=3e-3, warmup_steps=30, final_learning_rate=1e-4)
    c.checkpoint.update(every=240, keep=2)
    c.mesh.cpu_devices = -1


def nucleotide_gpt_500m(c: ConfigDict) -> None:
    """The published run: 503.4M parameters, 8,192 bp, batch 16, 20k steps, repeat weight 0.5.

    Unrolled layers without remat: the fastest measured on an H100 (benchmarks/NOTES.md); an 80 GB
    GPU holds 8 sequences (56 GiB), so one GPU runs it with `--config.train.grad_accum_steps=2`.
    Compiled offline for a TPU v3-8 (benchmarks/NOTES.md), batch 16 plans 12.8 GiB of a core's 16 with
    no remat and 9.7 GiB with `--config.model.remat_policy=save_matmuls` (the safer margin).
    """
    c.model.update(scan_layers=False, remat_policy="none")


def llama_500m(c: ConfigDict) -> None:
    """The LLaMA-shaped variant of the published model: pre-norm and SwiGLU."""
    nucleotide_gpt_500m(c)
    c.model.update(norm_placement="pre", mlp_activation="swiglu")


def kmer6_overlap(c: ConfigDict) -> None:
    """Overlapping 6-mers: 8,192 bp → 8,187 tokens in a row of train.seq_len 8,192 (+1 target), the rest padding."""
    nucleotide_gpt_500m(c)
    c.model.vocab_size = 4098
    c.data.tokenizer = "kmer6_overlap"


def kmer6_nonoverlap(c: ConfigDict) -> None:
    """Non-overlapping 6-mers: 8,192 bp → 1,366 tokens in a row of train.seq_len 1,536 (3 × 512), the rest padding."""
    nucleotide_gpt_500m(c)
    c.model.vocab_size = 4098
    c.data.tokenizer = "kmer6_nonoverlap"
    c.train.seq_len = 1536


PRESETS = {f.__name__: f for f in (demo, nucleotide_gpt_500m, llama_500m, kmer6_overlap, kmer6_nonoverlap)}


def build_config(base: ConfigDict, presets: dict, preset: str) -> ConfigDict:
    """`base` with one preset applied; shared by every config file's `get_config`."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    presets[preset](base)
    base.preset = preset
    return base


def get_config(preset: str = "demo") -> ConfigDict:
    return build_config(base_config(), PRESETS, preset)

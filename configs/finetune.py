"""Fine-tuning presets: `--config configs/finetune.py:<preset>` (task=classify).

Built on configs/pretrain.py's `base_config()` so every field keeps its one name; classification
adds only `config.classify`. Presets: demo, cnn_demo, nucleotide_gpt_500m.
"""

import importlib.util
import pathlib

from ml_collections import ConfigDict


def _pretrain_module():
    """configs/ is not a package: load pretrain.py from beside this file."""
    path = pathlib.Path(__file__).with_name("pretrain.py")
    spec = importlib.util.spec_from_file_location("nucgpt_configs_pretrain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pretrain = _pretrain_module()


def base_config() -> ConfigDict:
    c = pretrain.base_config()
    c.task = "classify"
    c.data.path = ""  # a Genomic Benchmarks dataset folder or a CSV/TSV; empty → a generated demo table
    c.classify = ConfigDict(
        dict(
            pooling="last",  # last (published: last non-pad token) | mean (over non-pad positions)
            freeze_trunk=False,
            test_fraction=0.2,  # used when data.path is one table
            split_seed=0,
            num_classes=0,  # 0 → from the data
            min_bucket_len=64,  # batches are padded to powers of two from here up to train.seq_len
            synthetic_examples=0,  # > 0 with an empty data.path: a generated motif task of this many rows
        )
    )
    c.train.update(repeat_weight=1.0, eval_steps=0)  # eval_steps 0: the whole test split
    c.optim.update(learning_rate=1e-4, warmup_steps=50, final_learning_rate=1e-6, weight_decay=0.01)
    return c


def demo(c: ConfigDict) -> None:
    """The pretraining demo's model with a classifier: fine-tunes on a 2-core CPU in a few minutes."""
    pretrain.demo(c)
    c.data.update(path="", synthetic_bp=0)
    c.classify.synthetic_examples = 1000
    c.train.update(steps=150, global_batch_size=16, seq_len=256, log_every=25, eval_every=75, eval_steps=0)
    c.optim.update(learning_rate=1e-3, warmup_steps=30, final_learning_rate=1e-5, weight_decay=0.01)
    c.checkpoint.update(every=75, keep=2)


def cnn_demo(c: ConfigDict) -> None:
    """The Genomic Benchmarks CNN baseline under the demo's protocol."""
    demo(c)
    c.model.kind = "cnn"
    c.optim.update(learning_rate=1e-3, weight_decay=0.0)


def nucleotide_gpt_500m(c: ConfigDict) -> None:
    """Fine-tunes the published 503.4M model: sequences up to its 8,192-token context, batch 16 as in
    pretraining (a full-length batch needs what a pretraining step needs; bucketing makes most smaller)."""
    pretrain.nucleotide_gpt_500m(c)
    c.train.update(steps=3000, global_batch_size=16, seq_len=8192, log_every=50, eval_every=500, eval_steps=0)
    c.classify.min_bucket_len = 128  # splash attention needs multiples of 128
    c.optim.update(learning_rate=3e-5, warmup_steps=100, final_learning_rate=1e-6, weight_decay=0.01)
    c.checkpoint.update(every=500, keep=2)


PRESETS = {f.__name__: f for f in (demo, cnn_demo, nucleotide_gpt_500m)}


def get_config(preset: str = "demo") -> ConfigDict:
    return pretrain.build_config(base_config(), PRESETS, preset)

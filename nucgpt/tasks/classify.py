"""Sequence classification (`--config.task=classify`): Genomic Benchmarks-style fine-tuning.

The model is a transformer trunk (fresh, or pretrained from `init_from`) with a pooled head, or
the Genomic Benchmarks CNN baseline (`model.kind=cnn`). Batches are length-bucketed and right-
padded; segment id 0 marks padding, which attention, pooling, the loss and the metrics ignore.
The loss sums include a confusion matrix, so the exact test metrics come out of the trainer's
ordinary eval loop and land in TensorBoard, metrics.jsonl and `<workdir>/results.json`.
"""

import functools
import json
import os
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from nucgpt import classification_metrics
from nucgpt import config as config_checks
from nucgpt.data import classification as cd
from nucgpt.errors import UserError
from nucgpt.tasks import Task
from nucgpt.tokenizers import PAD_ID, get_tokenizer

# Architecture fields that must equal the pretrained model's for its parameters to mean anything.
PRETRAINED_MODEL_FIELDS = config_checks.ARCHITECTURE_FIELDS["model"]
PRETRAINED_DATA_FIELDS = config_checks.ARCHITECTURE_FIELDS["data"]
SYNTHETIC_GC = (0.4, 0.6)  # GC fraction of class 0 and class 1 in the generated demo task
CONFUSION_PREFIX = "confusion_true"


@functools.lru_cache(maxsize=4)
def _load(path: str, test_fraction: float, split_seed: int) -> cd.ClassificationData:
    return cd.load(path, test_fraction, split_seed)


def dataset(config: ConfigDict) -> cd.ClassificationData:
    return _load(config.data.path, config.classify.test_fraction, config.classify.split_seed)


@functools.lru_cache(maxsize=8)
def _tokenized(path: str, test_fraction: float, split_seed: int, tokenizer_name: str, split: str) -> cd.TokenizedSplit:
    """The split's token ids; a sequence shorter than one token is refused (validate calls this before training)."""
    sequences = getattr(_load(path, test_fraction, split_seed), split)
    tokenizer = get_tokenizer(tokenizer_name, pad_multiple=1)  # bucketing pads; no tokenizer padding
    cd.check_min_length(sequences, tokenizer.k, tokenizer.name, split)
    return cd.TokenizedSplit(tuple(tokenizer.encode(s)[0] for s in sequences.sequences), sequences.labels_N)


def tokenized(config: ConfigDict, split: str) -> cd.TokenizedSplit:
    return _tokenized(config.data.path, config.classify.test_fraction, config.classify.split_seed, config.data.tokenizer, split)


def buckets(config: ConfigDict) -> tuple[int, ...]:
    if config.model.kind == "cnn":
        return (config.train.seq_len,)  # the CNN reads one fixed length whatever the batch holds
    return cd.bucket_lengths(config.train.seq_len, min(config.classify.min_bucket_len, config.train.seq_len))


def write_synthetic_table(path: str, num_examples: int, seed: int) -> None:
    """A seeded two-class task of 60–120 bp: class 0 is 40% GC, class 1 60% GC (for the demo)."""
    rng = np.random.default_rng(seed)
    rows = ["sequence\tlabel"]
    for i in range(num_examples):
        label = i % 2
        gc = SYNTHETIC_GC[label]
        probabilities = [(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2]  # A C G T
        sequence = "".join(rng.choice(list("ACGT"), size=int(rng.integers(60, 121)), p=probabilities))
        rows.append(f"{sequence}\t{label}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(rows) + "\n")
    os.replace(tmp, path)


def read_pretrained_config(init_from: str) -> ConfigDict:
    """The config stored in the checkpoint `init_from` names (a workdir or a step folder), without its params."""
    from nucgpt import checkpoint

    return checkpoint.load_pretrained_config(init_from)


def check_matches_pretrained(config: ConfigDict, pretrained: Mapping) -> None:
    """Tokenizer and architecture must be the checkpoint's: a mismatch names every differing field."""
    differences = config_checks.architecture_differences(config, pretrained)
    if differences:
        raise UserError(f"init_from {config.init_from}: settings differ from the pretrained model: {'; '.join(differences)}")


class ClassifyTask(Task):
    def resolve_config(self, config: ConfigDict, workdir: str) -> ConfigDict:
        """An empty data.path with synthetic_examples > 0 means the generated table; a given path, never."""
        with config.unlocked():
            if config.data.path:
                config.classify.synthetic_examples = 0
            elif config.classify.synthetic_examples > 0:
                config.data.path = os.path.join(workdir, "data", f"synthetic_{config.classify.synthetic_examples}.tsv")
        return config

    def prepare_data(self, config: ConfigDict) -> None:
        if config.classify.synthetic_examples > 0 and not os.path.exists(config.data.path):
            write_synthetic_table(config.data.path, config.classify.synthetic_examples, config.classify.split_seed)

    def validate(self, config: ConfigDict) -> None:
        if config.model.kind not in ("transformer", "cnn"):
            raise UserError(f"model.kind: {config.model.kind!r} is not one of transformer, cnn")
        if config.classify.pooling not in ("last", "mean"):
            raise UserError(f"classify.pooling: {config.classify.pooling!r} is not one of last, mean")
        tokenizer = get_tokenizer(config.data.tokenizer, pad_multiple=config.data.kmer_pad_multiple)
        if config.model.vocab_size < tokenizer.vocab_size:
            raise UserError(f"model.vocab_size: {config.model.vocab_size} is smaller than the {tokenizer.name} vocabulary ({tokenizer.vocab_size})")
        if config.classify.freeze_trunk and config.model.kind != "transformer":
            raise UserError("classify.freeze_trunk: only a transformer has a trunk to freeze")
        if config.init_from:
            if config.model.kind != "transformer":
                raise UserError("init_from: only a transformer can start from a pretrained checkpoint")
            try:
                pretrained = read_pretrained_config(config.init_from)
            except OSError as e:
                raise UserError(f"init_from {config.init_from}: {e.strerror or e} (want a pretraining workdir or "
                                "checkpoint step folder)") from None
            if pretrained.get("task", "pretrain") != "pretrain":
                raise UserError(f"init_from {config.init_from}: a {pretrained.get('task')!r} checkpoint; fine-tuning "
                                "starts from a pretraining one (to continue a fine-tune, rerun it in its own workdir)")
            check_matches_pretrained(config, pretrained)
        data = dataset(config)
        if config.classify.num_classes and config.classify.num_classes != data.num_classes:
            raise UserError(f"classify.num_classes: {config.classify.num_classes}, but {config.data.path} has {data.num_classes} classes")
        for split in ("train", "test"):
            cd.assign_buckets(np.asarray([len(t) for t in tokenized(config, split).tokens]), buckets(config))

    def build_model(self, config: ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
        num_classes = dataset(config).num_classes
        if config.model.kind == "cnn":
            from nucgpt.model.cnn import GenomicBenchmarksCNN

            return GenomicBenchmarksCNN(config.model.vocab_size, num_classes, config.train.seq_len, PAD_ID, rngs=rngs)
        from nucgpt.model import Transformer
        from nucgpt.model.heads import TransformerClassifier

        return TransformerClassifier(
            Transformer(config.model, rngs=rngs), config.model.d_model, num_classes,
            pooling=config.classify.pooling, freeze_trunk=config.classify.freeze_trunk,
            init_std=config.model.init_std, rngs=rngs,
        )

    def trainable(self, config: ConfigDict):
        """With classify.freeze_trunk only the head is updated: the trunk stays exactly as loaded."""
        if not config.classify.freeze_trunk:
            return None
        return lambda names: names[:1] != ("trunk",)

    def initial_params(self, config: ConfigDict, params, shardings):
        """A fresh fine-tune takes its trunk from `init_from`; the head stays freshly initialised."""
        if not config.init_from:
            return params
        from nucgpt import checkpoint

        abstract_trunk = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params["trunk"], shardings["trunk"]
        )
        _, trunk = checkpoint.load_pretrained(config.init_from, abstract_trunk)
        return dict(params, trunk=trunk)

    def loss(self, model, batch, config):
        if config.model.kind == "cnn":
            logits_BxC = model(batch["tokens"], batch["segment_ids"], batch["norm_rows"])
        else:
            logits_BxC = model(batch["tokens"], batch["segment_ids"])
        logits_BxC = logits_BxC.astype(jnp.float32)
        labels_B, weights_B = batch["labels"], batch["weights"]
        ce_B = jax.nn.logsumexp(logits_BxC, axis=-1) - jnp.take_along_axis(logits_BxC, labels_B[:, None], axis=-1)[:, 0]
        total = jnp.sum(jnp.where(weights_B > 0, weights_B * ce_B, 0.0))
        num_classes = logits_BxC.shape[-1]
        true_BxC = jax.nn.one_hot(labels_B, num_classes) * weights_B[:, None]
        predicted_BxC = jax.nn.one_hot(jnp.argmax(logits_BxC, axis=-1), num_classes)
        return total, {"ce": total, "weight": jnp.sum(weights_B), "confusion": true_BxC.T @ predicted_BxC}

    def loss_weight(self, batch, config):
        return jnp.sum(batch["weights"])

    def finalize_metrics(self, stats: Mapping[str, np.ndarray], config: ConfigDict) -> dict[str, float]:
        counts_CxC = np.rint(np.asarray(stats["confusion"])).astype(np.int64)
        metrics = {
            "loss": float(stats["ce"]) / float(stats["weight"]) if stats["weight"] > 0 else float("nan"),
            "accuracy": classification_metrics.accuracy(counts_CxC),
            "mcc": classification_metrics.matthews_corrcoef(counts_CxC),
            "f1_macro": classification_metrics.f1_macro(counts_CxC),
            "f1_weighted": classification_metrics.f1_weighted(counts_CxC),
            "examples": float(counts_CxC.sum()),
        }
        # Cells as scalars: the only way a matrix travels through dict[str, float] to summarize().
        for (true, predicted), count in np.ndenumerate(counts_CxC):
            metrics[f"{CONFUSION_PREFIX}{true}_pred{predicted}"] = float(count)
        return metrics

    def batch_axes(self, config: ConfigDict) -> dict[str, tuple[str, ...]]:
        rows = ("batch",)
        return {"tokens": ("batch", "length"), "segment_ids": ("batch", "length"), "labels": rows, "weights": rows, "norm_rows": rows}

    def dummy_batch(self, config: ConfigDict, local_batch_size: int) -> dict[str, np.ndarray]:
        shape = (local_batch_size, config.train.seq_len)
        return {
            "tokens": np.random.default_rng(0).integers(1, 5, size=shape, dtype=np.int32),
            "segment_ids": np.ones(shape, np.int32),
            "labels": np.zeros(local_batch_size, np.int32),
            "weights": np.ones(local_batch_size, np.float32),
            "norm_rows": np.ones(local_batch_size, np.float32),
        }

    def train_iterator(self, config, process_index, process_count):
        return BucketedIterator(config, tokenized(config, "train"), process_index, process_count)

    def eval_iterator(self, config, process_index, process_count) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the test split; for the CNN each batch also carries its batch-norm reference rows."""
        split = tokenized(config, "test")
        reference = _norm_reference_rows(config) if config.model.kind == "cnn" else None
        for indices_B in cd.eval_batches(split, buckets(config), config.train.global_batch_size):
            batch = _with_norm_rows(cd.pad_batch(split, indices_B, buckets(config), PAD_ID), reference is None)
            if reference is not None:
                batch = {k: np.concatenate([v, reference[k]]) for k, v in batch.items()}
            yield _local_rows(batch, process_index, process_count)

    def summarize(self, workdir: str, config: ConfigDict, step: int, eval_metrics: Mapping[str, float]) -> None:
        """`<workdir>/results.json`: the test metrics, the confusion matrix and how the split was made."""
        data = dataset(config)
        num_classes = data.num_classes
        counts = [[int(eval_metrics[f"{CONFUSION_PREFIX}{t}_pred{p}"]) for p in range(num_classes)] for t in range(num_classes)]
        results = {
            **{k: float(eval_metrics[k]) for k in ("accuracy", "mcc", "f1_macro", "f1_weighted")},
            "confusion_matrix": counts,
            "num_test": int(sum(map(sum, counts))),
            "num_test_in_split": len(data.test),  # num_test is less when train.eval_steps > 0 (a seeded sample)
            "num_train": len(data.train),
            "split_seed": config.classify.split_seed if data.split["kind"] == "stratified" else None,
            "split": data.split,
            "class_names": list(data.class_names),
            "step": int(step),
            "data_path": config.data.path,
            "model_kind": config.model.kind,
            "pooling": config.classify.pooling if config.model.kind == "transformer" else None,
            "freeze_trunk": bool(config.classify.freeze_trunk),
            "init_from": _trained_from(workdir, config),
            "test_loss": float(eval_metrics["loss"]),
        }
        path = os.path.join(workdir, "results.json")
        with open(f"{path}.tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(f"{path}.tmp", path)


def _trained_from(workdir: str, config: ConfigDict) -> str | None:
    """The pretrained checkpoint the evaluated model was fine-tuned from: an `eval_only` run restores the
    whole fine-tuned state and needs no `init_from`, so the training run's config.json says it."""
    if config.init_from or not config.eval_only:
        return config.init_from or None
    from nucgpt import checkpoint

    return (checkpoint.saved_config(workdir) or {}).get("init_from") or None


def _with_norm_rows(batch: dict[str, np.ndarray], rows_normalise: bool) -> dict[str, np.ndarray]:
    """`norm_rows`: the rows whose statistics the CNN's batch norm uses (the real rows, or none)."""
    return dict(batch, norm_rows=batch["weights"] if rows_normalise else np.zeros_like(batch["weights"]))


def _norm_reference_rows(config: ConfigDict) -> dict[str, np.ndarray]:
    """A fixed, seeded sample of training rows (weight 0, norm_rows 1): the CNN's batch-norm statistics at eval."""
    split = tokenized(config, "train")
    size = config.train.global_batch_size
    indices_B = np.random.default_rng(config.train.seed).permutation(len(split))[:size]
    indices_B = np.resize(indices_B, size)  # a training split smaller than a batch repeats rows
    batch = cd.pad_batch(split, indices_B, buckets(config), PAD_ID)
    return dict(batch, weights=np.zeros_like(batch["weights"]), norm_rows=np.ones_like(batch["weights"]))


def _local_rows(batch: Mapping[str, np.ndarray], process_index: int, process_count: int) -> dict[str, np.ndarray]:
    """This process's contiguous slice of a global batch (every process pads to the same length)."""
    rows = len(batch["labels"]) // process_count
    return {k: v[process_index * rows : (process_index + 1) * rows] for k, v in batch.items()}


class BucketedIterator:
    """Endless seeded epochs of bucketed training batches; its state is two integers.

    Batches are a pure function of (seed, epoch, position), so restoring the state resumes the
    exact sequence, on any number of processes.
    """

    def __init__(self, config: ConfigDict, split: cd.TokenizedSplit, process_index: int, process_count: int):
        self._split = split
        self._buckets = buckets(config)
        self._batch_size = config.train.global_batch_size
        self._seed = config.train.seed
        self._process = (process_index, process_count)
        self._epoch, self._position = 0, 0
        self._batches = self._epoch_batches()

    def _epoch_batches(self) -> list[np.ndarray]:
        return cd.epoch_batches(self._split, self._buckets, self._batch_size, self._seed, self._epoch)

    def __iter__(self) -> "BucketedIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._position == len(self._batches):
            self._epoch, self._position = self._epoch + 1, 0
            self._batches = self._epoch_batches()
        indices_B = self._batches[self._position]
        self._position += 1
        return _local_rows(_with_norm_rows(cd.pad_batch(self._split, indices_B, self._buckets, PAD_ID), True), *self._process)

    def get_state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position}

    def set_state(self, state: Mapping[str, int]) -> None:
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._batches = self._epoch_batches()


TASK = ClassifyTask()

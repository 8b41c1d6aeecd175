"""The Nucleotide GPT model: `Transformer` (trunk + unembed) and its attention backends."""

from nucgpt.model.transformer import REMAT_POLICIES, Block, Transformer, validate

__all__ = ["Block", "REMAT_POLICIES", "Transformer", "validate"]

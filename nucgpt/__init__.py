"""Nucleotide GPT: a JAX trainer for decoder-only transformers over DNA."""

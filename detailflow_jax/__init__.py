"""DetailFlow in JAX/Flax Linen: 1D coarse-to-fine tokenizer and group-parallel class-conditional
GPT."""

__version__ = "0.1.0"

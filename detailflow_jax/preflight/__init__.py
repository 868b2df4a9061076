"""Ahead-of-time compile of a trainer's own step for a TPU topology (or N simulated CPU devices):
memory, cost, collectives and a roofline estimate before any accelerator is rented.
Run ``python -m detailflow_jax.preflight``."""

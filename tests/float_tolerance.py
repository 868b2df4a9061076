"""Tolerances for comparing two float32 computations that differ only in summation order.

A sharded step, a multi-process step or gradient accumulation adds the same terms in another order.
For a sum of n terms, each order is within gamma_n = n * eps (eps = float32's 2**-23) of the exact
sum, relative to the sum of the terms' magnitudes (Higham, *Accuracy and Stability of Numerical
Algorithms*, 4.2). So two orders agree within 2 * n * eps * scale, whatever CPU runs them; a real
sharding or accumulation bug (a missing all-reduce, a mean over the wrong count) is off by a
fraction of the value itself, far above that.

Adam must not be used for such comparisons: it divides by the root of the second moment, so a
gradient that is pure rounding noise (true value 0) becomes an update of about the learning rate
with a sign set by the summation order. ``plain_sgd`` keeps the update linear in the gradient, so
the parameters inherit the gradient's rounding error.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

F32_EPS = float(np.finfo(np.float32).eps)


def reorder_tolerance(num_terms: int, scale: float) -> float:
    """Largest difference between two summation orders of ``num_terms`` terms whose magnitudes sum
    to ``scale``."""
    return 2.0 * num_terms * F32_EPS * scale


def dot_product_tolerance(length: int) -> float:
    """Relative difference expected between two float32 implementations of the same network, whose
    longest dot product has ``length`` terms: rounding errors of independent roundings grow like
    sqrt(n) * eps (the probabilistic bound of Higham & Mary, SIAM J. Sci. Comput. 2019), twice for
    the two sides. Comparisons with another framework (other kernels, other orders throughout) use
    this, not the worst case n * eps."""
    return 2.0 * float(np.sqrt(length)) * F32_EPS


def plain_sgd(learning_rate: float = 0.01):
    """Stands in for the trainers' Adam (``optim.adam`` / ``optim.adamw`` take a schedule and more;
    ignored)."""
    return lambda *args, **kwargs: optax.sgd(learning_rate)


def assert_same_updates(start, a, b, num_terms: int) -> None:
    """Parameters ``a`` and ``b`` reached from ``start`` by the same SGD steps in two summation
    orders.

    Compares the updates (a - start, b - start), not the parameters: those are what the gradients
    set. The scale is the largest update of the whole tree, because a gradient that is only rounding
    noise (a key bias, which softmax ignores) is noise of the size of the terms it sums, which are
    those of its layer, not its own near-zero value.
    """
    ups_a = jax.tree.map(
        lambda x, s: np.asarray(x, np.float64) - np.asarray(s, np.float64), a, start
    )
    ups_b = jax.tree.map(
        lambda x, s: np.asarray(x, np.float64) - np.asarray(s, np.float64), b, start
    )
    scale = max(float(np.abs(u).max()) for u in jax.tree.leaves(ups_a))
    assert scale > 0, "no parameter moved: the comparison would check nothing"
    atol = reorder_tolerance(num_terms, scale)
    for (path, ua), ub in zip(jax.tree_util.tree_leaves_with_path(ups_a), jax.tree.leaves(ups_b)):
        np.testing.assert_allclose(ua, ub, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))

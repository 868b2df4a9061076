"""The AR group-causal attention mask (official `create_group_causal_mask`;
docs/model.md#attention-masks)."""

from __future__ import annotations

import numpy as np


def group_causal_mask(seq_len: int, group_size: int, causal_num: int) -> np.ndarray:
    """Boolean (seq_len, seq_len), True = may attend.

    Query i < causal_num is token-causal (j <= i); any later query is block-causal over blocks of
    `group_size` sequence positions (j // g <= i // g), i.e. bidirectional inside its block.
    """
    i = np.arange(seq_len)[:, None]
    j = np.arange(seq_len)[None, :]
    return np.where(i < causal_num, j <= i, j // group_size <= i // group_size)

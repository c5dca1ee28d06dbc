"""The static options of a softmax attention call, and the mask they define (shared by every backend).

Masks come from positions, never from materialised [T, S] arrays handed in by the caller:

    allowed(i, j) = (not causal or q_pos[i] >= kv_pos[j])
                    and (window is None or q_pos[i] - left <= kv_pos[j] <= q_pos[i] + right)
                    and (no segments or q_seg[i] == kv_seg[j])
"""

import dataclasses

import jax.numpy as jnp

# Masked logits are replaced by this finite value (never -inf, so that max/exp never see inf - inf);
# masked probabilities are then selected to exactly 0 with `where`.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Static, hashable: goes to custom_vjp / jit as a static argument.

    scale: multiplies q . k. causal: q_pos >= kv_pos. window: (left, right) inclusive, None = unlimited.
    soft_cap: c * tanh(logits / c) before bias and mask, None = off. dropout_rate: on the probabilities.
    """

    scale: float
    causal: bool = False
    window: tuple[int, int] | None = None  # (left, right) inclusive; None = unlimited
    soft_cap: float | None = None
    dropout_rate: float = 0.0


def allowed(q_positions, kv_positions, q_segment_ids, kv_segment_ids, options: AttentionOptions):
    """Boolean mask [..., T, S] from q_positions [..., T], kv_positions [..., S] (and segment ids, same).

    The leading dims broadcast (e.g. [B] against [B]); works on blocks as well as on whole sequences.
    All True when nothing masks.
    """
    # Compared as the offset kv_pos - q_pos, so that a window as wide as int32 allows cannot overflow.
    offset = kv_positions[..., None, :] - q_positions[..., :, None]
    mask = jnp.ones(offset.shape, bool)
    if options.causal:
        mask &= offset <= 0
    if options.window is not None:
        left, right = options.window
        mask &= (offset >= -left) & (offset <= right)
    if q_segment_ids is not None:
        mask &= q_segment_ids[..., :, None] == kv_segment_ids[..., None, :]
    return mask

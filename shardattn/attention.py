"""Single-device softmax attention: argument checks, derived values, backend choice, and the merge of
partial results.

The maths lives in shardattn.kernels.attention (reference.py is the contract).
"""

import jax
import jax.numpy as jnp


def merge_attention(o1, lse1, o2, lse2):
    """Exact merge of two attention results over disjoint key sets of the same queries.

    o1, o2: [B, T, H, Dv]; lse1, lse2: [B, H, T] float32 (log-sum-exp of each row, as returned with
    return_residuals=True). Returns (o [B, T, H, Dv] in o1's dtype, lse [B, H, T] float32) equal to the
    attention over the union of the two key sets. Rows where one lse is -inf (no allowed key on that side)
    take the other side; rows where both are -inf give o = 0, lse = -inf; no NaN in values or gradients.

    >>> o, lse = merge_attention(o_left, lse_left, o_right, lse_right)
    """
    lse1 = lse1.astype(jnp.float32)
    lse2 = lse2.astype(jnp.float32)
    m = jax.lax.stop_gradient(jnp.maximum(lse1, lse2))  # the weights are invariant to the shift
    empty = m == -jnp.inf  # both sides empty
    m = jnp.where(empty, 0.0, m)
    w1 = jnp.exp(lse1 - m)  # exp(-inf) = 0 with zero gradient
    w2 = jnp.exp(lse2 - m)
    total = jnp.where(empty, 1.0, w1 + w2)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(total))

    def weight(w):  # [B, H, T] -> [B, T, H, 1]
        return jnp.swapaxes(w / total, 1, 2)[..., None]

    o = weight(w1) * o1.astype(jnp.float32) + weight(w2) * o2.astype(jnp.float32)
    return o.astype(o1.dtype), lse

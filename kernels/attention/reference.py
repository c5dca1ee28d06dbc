"""Softmax attention in float32 with the [T, S] logits materialised: the contract every backend meets.

Per batch b, query head h (key/value head g = h // (H // Hkv)), query i and key j:

    s_ij = scale * q_i . k_j                               (float32)
    s_ij = c * tanh(s_ij / c)                              if soft_cap c
    s_ij = s_ij + bias[b, h, i, j]                         if bias (broadcast over size-1 dims)
    allowed_ij = options.allowed(q_pos_i, kv_pos_j, q_seg_i, kv_seg_j)   (causal, window, segments)
    lse_i = log(sum_{allowed j} exp(s_ij) + sum_n exp(sinks[h, n]))
    P_ij  = exp(s_ij - lse_i) if allowed_ij else 0
    o_i   = sum_j Z_ij P_ij v_j                            Z_ij = keep_ij / (1 - rate) with dropout, else 1

- A row with nothing allowed and no sinks: o_i = 0, lse_i = -inf, and zero gradients (never NaN).
- A key that no query of its batch row may see is replaced by zeros before any product, so NaN or inf
  stored there (padding, an unused cache slot) reaches no output and no gradient.
- keep_ij comes from dropout.keep_mask(seed_words(dropout_rng), b + batch_offset, h + head_offset,
  i + q_offset, j + kv_offset, rate) with dropout_offsets = (q_offset, kv_offset) or (q_offset, kv_offset,
  batch_offset, head_offset) (int32 scalars; absent ones 0; read through dropout.offsets): global batch,
  query head and token indices, so a shard of the batch, the heads or the sequence draws its part of the
  same mask. lse is the un-dropped log-sum-exp.

Every backend in this folder has this module's signature:

    attention(q, k, v, *, bias=None, sinks=None, q_segment_ids=None, kv_segment_ids=None,
              q_positions, kv_positions, dropout_rng=None, dropout_offsets=None, options) -> (o, lse)
        q: [B, T, H, Dk]   k: [B, S, Hkv, Dk]   v: [B, S, Hkv, Dv]   H % Hkv == 0
        bias: [Bb, Hb, T, S] float, Bb in {1, B}, Hb in {1, H}     sinks: [H, n] float32 logits
        q_segment_ids: [B, T] int32, kv_segment_ids: [B, S] int32 (both or neither)
        q_positions: [B, T] int32, kv_positions: [B, S] int32 (always given; the API layer derives defaults)
        dropout_rng: PRNG key (when options.dropout_rate > 0)
        dropout_offsets: None, (q_offset, kv_offset) or (q_offset, kv_offset, batch_offset, head_offset)
        options: AttentionOptions (static)
        returns (o [B, T, H, Dv] in q.dtype, lse [B, H, T] float32), differentiable in q, k, v, bias and
        sinks, with lse's cotangent honoured.
Arguments arrive checked by the API layer (shardattn.attention); backends do not re-validate them, but a
backend that cannot serve a call raises NotImplementedError saying why.

Backends that own their kernels also expose the two halves, which a ring over sequence shards calls with
the GLOBAL (merged) o and lse:

    forward(q, k, v, **same keywords) -> (o, lse)                                  values only
    backward(q, k, v, o, lse, do, dlse=None, **same keywords) -> (dq, dk, dv, dbias, dsinks)
        for the keys given: P = exp(s - lse) (lse passed in, not recomputed), dP_ij = Z_ij do_i . v_j,
        D_i = do_i . o_i (o passed in), dS = P * (dP - D) + P * dlse, then through bias (dbias summed
        over its broadcast dims) and soft cap to dq, dk; dv_j = sum_i Z_ij P_ij do_i;
        dsinks[h, n] = -sum_{b, i} exp(sinks[h, n] - lse_i) * (D_i - dlse_i);
        dbias None without bias, dsinks None without sinks; dk, dv in k's and v's heads (GQA summed).

This module has no forward/backward: its gradients are JAX's autodiff of the formulas above.
"""

import jax
import jax.numpy as jnp

from shardattn.kernels.attention import dropout
from shardattn.kernels.attention.options import MASK_VALUE, AttentionOptions, allowed

_HIGHEST = jax.lax.Precision.HIGHEST


def attention(
    q,  # [B, T, H, Dk]
    k,  # [B, S, Hkv, Dk]
    v,  # [B, S, Hkv, Dv]
    *,
    bias=None,  # [Bb, Hb, T, S]
    sinks=None,  # [H, n]
    q_segment_ids=None,  # [B, T]
    kv_segment_ids=None,  # [B, S]
    q_positions,  # [B, T]
    kv_positions,  # [B, S]
    dropout_rng=None,
    dropout_offsets=None,
    options: AttentionOptions,
):
    B, T, H, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    group = H // Hkv
    f32 = jnp.float32

    q_seg = None if q_segment_ids is None else q_segment_ids[:, None]
    kv_seg = None if kv_segment_ids is None else kv_segment_ids[:, None]
    mask = allowed(q_positions[:, None], kv_positions[:, None], q_seg, kv_seg, options)  # [B, 1, T, S]
    seen = jnp.any(mask, axis=(1, 2))[:, :, None, None]  # [B, S, 1, 1]: some query may see key j

    qf = q.astype(f32)
    kf = jnp.where(seen, jnp.repeat(k.astype(f32), group, axis=2), 0.0)  # [B, S, H, Dk]
    vf = jnp.where(seen, jnp.repeat(v.astype(f32), group, axis=2), 0.0)  # [B, S, H, Dv]

    s = options.scale * jnp.einsum("bthd,bshd->bhts", qf, kf, precision=_HIGHEST)  # [B, H, T, S]
    if options.soft_cap is not None:
        s = options.soft_cap * jnp.tanh(s / options.soft_cap)
    if bias is not None:
        s = s + bias.astype(f32)
    s = jnp.where(mask, s, MASK_VALUE)

    # Row maximum (sinks included) for a stable exp; softmax is invariant to it, so no gradient flows.
    m = jnp.max(s, axis=-1)  # [B, H, T]; MASK_VALUE for a fully masked row
    if sinks is not None:
        sinks = sinks.astype(f32)
        m = jnp.maximum(m, jnp.max(sinks, axis=-1)[None, :, None])
    m = jax.lax.stop_gradient(m)
    p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)  # [B, H, T, S], unnormalised
    denom = jnp.sum(p, axis=-1)  # [B, H, T]
    if sinks is not None:
        denom = denom + jnp.sum(jnp.exp(sinks[None, :, None, :] - m[..., None]), axis=-1)
    nonempty = denom > 0
    denom = jnp.where(nonempty, denom, 1.0)
    lse = jnp.where(nonempty, m + jnp.log(denom), -jnp.inf)

    if options.dropout_rate > 0:
        q_off, kv_off, b_off, h_off = dropout.offsets(dropout_offsets)
        keep = dropout.keep_mask(
            dropout.seed_words(dropout_rng),
            (jnp.arange(B) + b_off)[:, None, None, None],
            (jnp.arange(H) + h_off)[None, :, None, None],
            (jnp.arange(T) + q_off)[None, None, :, None],
            (jnp.arange(S) + kv_off)[None, None, None, :],
            options.dropout_rate,
        )
        p = jnp.where(keep, p / (1.0 - options.dropout_rate), 0.0)

    o = jnp.einsum("bhts,bshd->bthd", p / denom[..., None], vf, precision=_HIGHEST)
    return o.astype(q.dtype), lse

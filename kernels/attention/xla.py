"""Softmax attention in plain JAX, blockwise over keys with an online softmax (flash-style).

Portable (any XLA backend). Queries are cut into blocks of `block_q` rows, processed one after the other
(lax.scan); for each query block a loop runs over the key blocks its positions can reach, keeping the
running row maximum m, the running denominator den and the unnormalised output acc (Milakov & Gimelshein
2018; Dao et al. 2022, FlashAttention):

    m' = max(m, rowmax(s))   p = exp(s - m')   den' = e^(m - m') den + rowsum(p)   acc' = e^(m - m') acc + p v

Key-block skipping: a key block is visited only when its position (and segment id) range can meet the
query block's under the causal / window / segment rule; the loop runs over the contiguous range from the
first to the last such block, and the mask inside each block does the rest. With sorted positions (the
defaults, cu_seqlens) that range is exact; with arbitrary positions it is a correct superset.

GQA reads k and v once per key/value head: q is viewed as [B, T, Hkv, G, Dk], never repeated.

The backward pass (a custom_vjp built from `forward` and `backward`) recomputes each block's logits from
q, k and the saved lse, so the memory kept for it is O(T * D): q, k, v, o and lse. It walks the same
(query block, key range) pairs, accumulating dq in the inner loop and dk, dv (and dbias) in full-size
float32 accumulators carried through both loops.
"""

import dataclasses

import jax
import jax.numpy as jnp

from shardattn.kernels.attention import dropout, halves
from shardattn.kernels.attention.options import MASK_VALUE, AttentionOptions, allowed

_INT_MAX = jnp.iinfo(jnp.int32).max
_INT_MIN = jnp.iinfo(jnp.int32).min


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows of q and of k per block. Shorter sequences use one block rounded up to a multiple of 8."""

    block_q: int = 512
    block_k: int = 512

    def __post_init__(self):
        if self.block_q < 1 or self.block_k < 1:
            raise ValueError(f"block sizes must be positive, got {self}")


# Used when a call passes block_sizes=None (every call through flash_attention). Not tuned on a GPU yet:
# benchmarks/attention.py --xla-blocks times alternatives by replacing it.
DEFAULT_BLOCK_SIZES = BlockSizes()


def _precision(dtype):
    # float32 inputs get full float32 matmuls (GPUs would otherwise use TF32).
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def _block(n: int, block: int) -> int:
    return min(block, -(-n // 8) * 8)


def _pad_axis(x, axis, size, value=0):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Static shapes of one call."""

    B: int
    T: int
    S: int
    Hkv: int
    G: int
    bq: int
    bk: int
    nq: int
    nk: int


def _layout(q, k, block_sizes: BlockSizes | None) -> _Layout:
    block_sizes = DEFAULT_BLOCK_SIZES if block_sizes is None else block_sizes
    B, T, H, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    bq, bk = _block(T, block_sizes.block_q), _block(S, block_sizes.block_k)
    return _Layout(B, T, S, Hkv, H // Hkv, bq, bk, -(-T // bq), -(-S // bk))


def _row_blocks(x, L: _Layout, axis: int = 1):
    """[..., T, ...] on `axis` -> [nq, ..., bq, ...] (padding zeros): the scan's per-query-block inputs."""
    x = _pad_axis(x, axis, L.nq * L.bq)
    x = x.reshape(x.shape[:axis] + (L.nq, L.bq) + x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _rows_back(x, L: _Layout, axis: int = 1):
    """Inverse of _row_blocks: [nq, ..., bq, ...] -> [..., T, ...] with the padding dropped."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (L.nq * L.bq,) + x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(x, 0, L.T, axis=axis)


def _ranges(q_pos, q_valid, kv_pos, kv_valid, q_seg, kv_seg, options, L: _Layout):
    """Per query block, the key-block range [lo, hi) that can hold an allowed pair.

    From the min/max of positions (and segment ids) of the valid entries of each block, over the batch.
    """

    def extent(x, valid, n, b):  # [B, n * b] -> min, max per block [n]
        x = x.reshape(L.B, n, b)
        valid = valid.reshape(L.B, n, b)
        lo = jnp.min(jnp.where(valid, x, _INT_MAX), axis=(0, 2))
        hi = jnp.max(jnp.where(valid, x, _INT_MIN), axis=(0, 2))
        return lo, hi

    qmin, qmax = extent(q_pos, q_valid, L.nq, L.bq)
    kmin, kmax = extent(kv_pos, kv_valid, L.nk, L.bk)
    qmin, qmax, kmin, kmax = qmin[:, None], qmax[:, None], kmin[None, :], kmax[None, :]
    # The offsets kv_pos - q_pos of a block pair span [kmin - qmax, kmax - qmin].
    lowest, highest = kmin - qmax, kmax - qmin
    need = jnp.ones((L.nq, L.nk), bool)
    if options.causal:
        need &= lowest <= 0
    if options.window is not None:
        left, right = options.window
        need &= (highest >= -left) & (lowest <= right)
    if q_seg is not None:
        smin, smax = extent(q_seg, q_valid, L.nq, L.bq)
        tmin, tmax = extent(kv_seg, kv_valid, L.nk, L.bk)
        need &= (tmin[None, :] <= smax[:, None]) & (tmax[None, :] >= smin[:, None])
    any_need = jnp.any(need, axis=1)
    lo = jnp.argmax(need, axis=1)
    hi = L.nk - jnp.argmax(need[:, ::-1], axis=1)
    return jnp.where(any_need, lo, 0).astype(jnp.int32), jnp.where(any_need, hi, 0).astype(jnp.int32)


def _prepare(q, k, v, bias, q_seg, kv_seg, q_pos, kv_pos, options, L: _Layout):
    """Padded, blocked views shared by the forward and the backward pass."""
    Tp, Sp = L.nq * L.bq, L.nk * L.bk
    q_valid = jnp.broadcast_to(jnp.arange(Tp) < L.T, (L.B, Tp))
    kv_valid = jnp.broadcast_to(jnp.arange(Sp) < L.S, (L.B, Sp))
    q_pos = _pad_axis(q_pos.astype(jnp.int32), 1, Tp)
    kv_pos = _pad_axis(kv_pos.astype(jnp.int32), 1, Sp)
    if q_seg is not None:
        q_seg = _pad_axis(q_seg.astype(jnp.int32), 1, Tp)
        kv_seg = _pad_axis(kv_seg.astype(jnp.int32), 1, Sp)
    lo, hi = _ranges(q_pos, q_valid, kv_pos, kv_valid, q_seg, kv_seg, options, L)
    if bias is not None:  # [Bb, Hb, T, S] -> [Bb, Hkv or 1, G or 1, Tp, Sp]
        bias = _pad_axis(_pad_axis(bias, 2, Tp), 3, Sp)
        hb = bias.shape[1]
        bias = bias.reshape(bias.shape[0], L.Hkv if hb > 1 else 1, L.G if hb > 1 else 1, Tp, Sp)
    blocks = dict(
        i=jnp.arange(L.nq, dtype=jnp.int32),
        lo=lo,
        hi=hi,
        q=_row_blocks(q.reshape(L.B, L.T, L.Hkv, L.G, q.shape[-1]), L),  # [nq, B, bq, Hkv, G, Dk]
        q_pos=_row_blocks(q_pos, L),  # [nq, B, bq]
        q_valid=_row_blocks(q_valid, L),
        q_seg=None if q_seg is None else _row_blocks(q_seg, L),
    )
    keys = dict(
        k=_pad_axis(k, 1, Sp),  # [B, Sp, Hkv, Dk]
        v=_pad_axis(v, 1, Sp),  # [B, Sp, Hkv, Dv]
        kv_pos=kv_pos,
        kv_valid=kv_valid,
        kv_seg=kv_seg,
        bias=bias,
    )
    return blocks, keys


def _key_block(keys, j, L: _Layout):
    """The j-th key block of every per-key array (bias excepted)."""
    start = j * L.bk

    def cut(x):
        return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, L.bk, axis=1)

    return {name: cut(keys[name]) for name in ("k", "v", "kv_pos", "kv_valid", "kv_seg")}


def _bias_block(bias, i, j, L: _Layout):
    if bias is None:
        return None
    start = (0, 0, 0, i * L.bq, j * L.bk)
    return jax.lax.dynamic_slice(bias, start, bias.shape[:3] + (L.bq, L.bk)).astype(jnp.float32)


def _block_mask(blk, kb, options, L: _Layout):
    """[B, 1, 1, bq, bk] allowed pairs of one (query block, key block), padding excluded."""
    mask = allowed(blk["q_pos"], kb["kv_pos"], blk["q_seg"], kb["kv_seg"], options)
    mask &= blk["q_valid"][:, :, None] & kb["kv_valid"][:, None, :]
    return mask[:, None, None]


def _block_logits(qb, kb, bias_blk, mask, options):
    """Masked float32 logits [B, Hkv, G, bq, bk] and tanh(s / cap) (for the soft cap's gradient)."""
    s = jnp.einsum(
        "bqhgd,bkhd->bhgqk", qb, kb, preferred_element_type=jnp.float32, precision=_precision(qb.dtype)
    )
    s = s * options.scale
    t = None
    if options.soft_cap is not None:
        t = jnp.tanh(s / options.soft_cap)
        s = options.soft_cap * t
        t = jnp.where(mask, t, 0.0)  # NaN there (from a NaN key) must not reach dS * (1 - t^2)
    if bias_blk is not None:
        s = s + bias_blk
    return jnp.where(mask, s, MASK_VALUE), t


def _keep(drop, i, j, options, L: _Layout):
    """Dropout keep mask [B, Hkv, G, bq, bk] of block pair (i, j), from global batch, head and token
    indices. drop: _dropout_setup's (seed, q_off, kv_off, b_off, h_off)."""
    seed, q_off, kv_off, b_off, h_off = drop
    return dropout.keep_mask(
        seed,
        (jnp.arange(L.B) + b_off)[:, None, None, None, None],
        (jnp.arange(L.Hkv * L.G) + h_off).reshape(1, L.Hkv, L.G, 1, 1),
        (i * L.bq + jnp.arange(L.bq) + q_off)[:, None],
        j * L.bk + jnp.arange(L.bk) + kv_off,
        options.dropout_rate,
    )


def _unseen_to_zero(x, mask):
    """Zero the keys of x [B, bk, Hkv, D] that no row of this block may see (NaN there reaches nothing)."""
    seen = jnp.any(mask, axis=(1, 2, 3))  # [B, bk]
    return jnp.where(seen[:, :, None, None], x, jnp.zeros((), x.dtype))


def _dropout_setup(dropout_rng, dropout_offsets, options):
    """None without dropout, else (seed words, q_off, kv_off, b_off, h_off) (int32 offsets)."""
    if options.dropout_rate == 0:
        return None
    return (dropout.seed_words(dropout_rng), *dropout.offsets(dropout_offsets))


def _drop_arrays(drop):
    """The arrays of _dropout_setup's result (one seed word and the offsets), for _zero_like_inputs."""
    return () if drop is None else (drop[0][0], *drop[1:])


def _zero_like_inputs(*arrays):
    """A float32 zero that, under shard_map with varying-axes checking, varies like every given array.

    Loop carries start from it (jnp.zeros alone would be typed as not varying and fail the loop's type
    check inside a ring over sequence shards); zeros_like carries no NaN from its argument.
    """
    zero = jnp.zeros((), jnp.float32)
    for x in arrays:
        if x is not None:
            zero = zero + jnp.zeros_like(x.reshape(-1)[0], dtype=jnp.float32)
    return zero


# ------------------------------------------------------------------------------------------ forward


def forward(
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
    block_sizes: BlockSizes | None = None,
):
    """Values only: (o [B, T, H, Dv] in q.dtype, lse [B, H, T] float32). See reference.py."""
    L = _layout(q, k, block_sizes)
    Dv = v.shape[-1]
    blocks, keys = _prepare(
        q, k, v, bias, q_segment_ids, kv_segment_ids, q_positions, kv_positions, options, L
    )
    drop = _dropout_setup(dropout_rng, dropout_offsets, options)
    f32 = jnp.float32
    zero = _zero_like_inputs(q, k, v, bias, sinks, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                             *_drop_arrays(drop))  # fmt: skip

    def query_block(_, blk):
        i = blk["i"]

        def key_step(j, state):
            m, den, acc = state  # [B, Hkv, G, bq], same, [B, Hkv, G, bq, Dv]
            kb = _key_block(keys, j, L)
            mask = _block_mask(blk, kb, options, L)
            s, _ = _block_logits(blk["q"], kb["k"], _bias_block(keys["bias"], i, j, L), mask, options)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            den = alpha * den + jnp.sum(p, axis=-1)
            if drop is not None:
                keep = _keep(drop, i, j, options, L)
                p = jnp.where(keep, p * (1.0 / (1.0 - options.dropout_rate)), 0.0)
            vb = _unseen_to_zero(kb["v"], mask)
            pv = jnp.einsum(
                "bhgqk,bkhd->bhgqd",
                p.astype(v.dtype),
                vb,
                preferred_element_type=f32,
                precision=_precision(v.dtype),
            )
            return m_new, den, alpha[..., None] * acc + pv

        shape = (L.B, L.Hkv, L.G, L.bq)
        state = (jnp.full(shape, MASK_VALUE, f32) + zero, jnp.zeros(shape, f32) + zero,
                 jnp.zeros(shape + (Dv,), f32) + zero)  # fmt: skip
        m, den, acc = jax.lax.fori_loop(blk["lo"], blk["hi"], key_step, state)
        if sinks is not None:  # sinks join the denominator with no value
            sk = sinks.astype(f32).reshape(1, L.Hkv, L.G, 1, -1)
            m_new = jnp.maximum(m, jnp.max(sk, axis=-1))
            alpha = jnp.exp(m - m_new)
            den = alpha * den + jnp.sum(jnp.exp(sk - m_new[..., None]), axis=-1)
            acc = alpha[..., None] * acc
            m = m_new
        nonempty = den > 0
        den = jnp.where(nonempty, den, 1.0)
        lse = jnp.where(nonempty, m + jnp.log(den), -jnp.inf)
        o = jnp.moveaxis(acc / den[..., None], 3, 1).astype(q.dtype)  # [B, bq, Hkv, G, Dv]
        return None, (o, lse)

    _, (o, lse) = jax.lax.scan(query_block, None, blocks)
    o = _rows_back(o, L).reshape(L.B, L.T, L.Hkv * L.G, Dv)
    lse = _rows_back(lse, L, axis=3).reshape(L.B, L.Hkv * L.G, L.T)
    return o, lse


# ----------------------------------------------------------------------------------------- backward


def backward(
    q,  # [B, T, H, Dk]
    k,  # [B, S, Hkv, Dk]
    v,  # [B, S, Hkv, Dv]
    o,  # [B, T, H, Dv]
    lse,  # [B, H, T]
    do,  # [B, T, H, Dv]
    dlse=None,  # [B, H, T]
    *,
    bias=None,
    sinks=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_positions,
    kv_positions,
    dropout_rng=None,
    dropout_offsets=None,
    options: AttentionOptions,
    block_sizes: BlockSizes | None = None,
    grad_dtype=None,
):
    """(dq, dk, dv, dbias, dsinks) for the keys given, from the (global) o and lse. See reference.py.

    grad_dtype: None gives each gradient in its input's dtype; jnp.float32 keeps the float32
    accumulators (for a caller that sums partial gradients, e.g. over the steps of a ring).
    """
    L = _layout(q, k, block_sizes)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    f32 = jnp.float32
    blocks, keys = _prepare(
        q, k, v, bias, q_segment_ids, kv_segment_ids, q_positions, kv_positions, options, L
    )
    drop = _dropout_setup(dropout_rng, dropout_offsets, options)

    lse = lse.astype(f32)
    delta = jnp.swapaxes(jnp.sum(do.astype(f32) * o.astype(f32), axis=-1), 1, 2)  # D_i: [B, H, T]
    row_term = delta if dlse is None else delta - dlse.astype(f32)  # dS = P * (dP - (D - dlse))
    # A row with lse = -inf has nothing allowed: exp(s - inf) = 0 keeps its P at 0.
    lse_safe = jnp.where(lse == -jnp.inf, jnp.inf, lse)

    def head_rows(x):  # [B, H, T] -> [nq, B, Hkv, G, bq]
        return _row_blocks(x.reshape(B, L.Hkv, L.G, T), L, axis=3)

    blocks["lse"] = head_rows(lse_safe)
    blocks["row_term"] = head_rows(row_term)
    blocks["do"] = _row_blocks(do.reshape(B, T, L.Hkv, L.G, Dv), L)  # [nq, B, bq, Hkv, G, Dv]
    precision = _precision(q.dtype)

    def query_block(carry, blk):
        i = blk["i"]
        qb, dob = blk["q"], blk["do"]

        def key_step(j, state):
            dq, dk_acc, dv_acc, dbias_acc = state
            kb = _key_block(keys, j, L)
            mask = _block_mask(blk, kb, options, L)
            s, t = _block_logits(qb, kb["k"], _bias_block(keys["bias"], i, j, L), mask, options)
            p = jnp.where(mask, jnp.exp(s - blk["lse"][..., None]), 0.0)  # [B, Hkv, G, bq, bk]
            vb = _unseen_to_zero(kb["v"], mask)
            kc = _unseen_to_zero(kb["k"], mask)
            dp = jnp.einsum("bqhgd,bkhd->bhgqk", dob, vb, preferred_element_type=f32, precision=precision)
            pz = p
            if drop is not None:
                keep = _keep(drop, i, j, options, L)
                inv = 1.0 / (1.0 - options.dropout_rate)
                pz = jnp.where(keep, p * inv, 0.0)
                dp = jnp.where(keep, dp * inv, 0.0)
            dv_blk = jnp.einsum(
                "bhgqk,bqhgd->bkhd", pz.astype(do.dtype), dob, preferred_element_type=f32, precision=precision
            )
            ds = p * (dp - blk["row_term"][..., None])  # d(logits after cap and bias)
            if dbias_acc is not None:
                # From the bias as given [Bb, Hb, T, S]: its blocked view [Bb, Hkv, G, ...] has a size-1
                # head dim for MQA (Hkv = 1) even when Hb = H.
                db = ds if bias.shape[1] > 1 else jnp.sum(ds, axis=(1, 2), keepdims=True)
                db = db if bias.shape[0] > 1 else jnp.sum(db, axis=0, keepdims=True)
                dbias_acc = jax.lax.dynamic_update_slice(dbias_acc, db, (0, 0, 0, i * L.bq, j * L.bk))
            if t is not None:
                ds = ds * (1.0 - t * t)
            ds = (ds * options.scale).astype(q.dtype)
            dq = dq + jnp.einsum("bhgqk,bkhd->bqhgd", ds, kc, preferred_element_type=f32, precision=precision)
            dk_blk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, qb, preferred_element_type=f32, precision=precision)

            def add(acc, x):
                start = j * L.bk
                cur = jax.lax.dynamic_slice_in_dim(acc, start, L.bk, axis=1)
                return jax.lax.dynamic_update_slice_in_dim(acc, cur + x, start, axis=1)

            return dq, add(dk_acc, dk_blk), add(dv_acc, dv_blk), dbias_acc

        dq0 = jnp.zeros(qb.shape, f32) + zero
        dq, *carry = jax.lax.fori_loop(blk["lo"], blk["hi"], key_step, (dq0, *carry))
        return tuple(carry), dq

    Sp = L.nk * L.bk
    zero = _zero_like_inputs(q, k, v, o, lse, do, dlse, bias, sinks, q_segment_ids, kv_segment_ids,
                             q_positions, kv_positions, *_drop_arrays(drop))  # fmt: skip
    dbias0 = None if bias is None else jnp.zeros(keys["bias"].shape, f32) + zero
    carry = (jnp.zeros((B, Sp, L.Hkv, Dk), f32) + zero, jnp.zeros((B, Sp, L.Hkv, Dv), f32) + zero, dbias0)
    (dk, dv, dbias), dq = jax.lax.scan(query_block, carry, blocks)

    def out(x, like):
        return x.astype(like.dtype if grad_dtype is None else grad_dtype)

    dq = out(_rows_back(dq, L).reshape(B, T, H, Dk), q)
    dk = out(dk[:, : L.S], k)
    dv = out(dv[:, : L.S], v)
    if bias is not None:
        dbias = dbias.reshape(dbias.shape[0], -1, dbias.shape[3], dbias.shape[4])[:, :, :T, : L.S]
        dbias = out(dbias, bias)
    dsinks = None
    if sinks is not None:  # d lse_i / d sink = exp(sink - lse_i); d o_i / d sink = -exp(sink - lse_i) o_i
        w = jnp.where(
            lse[..., None] == -jnp.inf, 0.0, jnp.exp(sinks.astype(f32)[None, :, None] - lse[..., None])
        )
        dsinks = out(-jnp.sum(w * row_term[..., None], axis=(0, 2)), sinks)
    return dq, dk, dv, dbias, dsinks


# --------------------------------------------------------------------------------------- custom_vjp

_attention = halves.differentiable(forward, backward)


def attention(
    q,
    k,
    v,
    *,
    bias=None,
    sinks=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_positions,
    kv_positions,
    dropout_rng=None,
    dropout_offsets=None,
    options: AttentionOptions,
    block_sizes: BlockSizes | None = None,
):
    """Differentiable (o, lse): the custom_vjp of `forward` and `backward` (halves.py). See reference.py."""
    return _attention(
        q, k, v, bias=bias, sinks=sinks, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        q_positions=q_positions, kv_positions=kv_positions, dropout_rng=dropout_rng,
        dropout_offsets=dropout_offsets, options=options, block_sizes=block_sizes,
    )  # fmt: skip

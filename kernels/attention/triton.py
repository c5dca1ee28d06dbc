"""Softmax flash attention in Triton, called from JAX through jax-triton (NVIDIA GPUs).

The kernel bodies are in triton_kernels.py (FlashAttention-2 structure, base-2 online softmax); this
module checks what it can serve, computes the block ranges, launches, and builds the custom_vjp.

Forward: one program per (query block, batch, head), on one grid axis (flat_grid); each program walks the
key blocks its queries can reach, keeping the running max, denominator and output in registers, and
writes o and lse [B, H, T].

Backward, from the GIVEN o and lse (a ring passes merged ones): delta = rowsum(do * o) - dlse in JAX,
then two kernels without atomics:
  * dkdv_kernel, one program per (key block, batch, kv head): each walks the G query heads of its kv
    head and their query blocks, so dk and dv are summed over the GQA group in registers;
  * dq_kernel, one program per (query block, batch, head), which also writes dS per (b, h) pair block
    when there is a bias: dbias is then dS summed over the bias's broadcast dims (a [B, H, T, S] float32
    buffer: bias users already hold an O(T S) array);
and dsinks = -sum_{b, i} exp(sink - lse_i) * delta_i in JAX.

Block skipping from positions: a tiny JAX pre-pass takes the min/max of q and kv positions (and segment
ids) per block and per batch row, marks block pairs that may hold an allowed pair (`need`) and pairs
where every pair is allowed and nothing is padding (`full`), and gives every program its range
(lo, flo, fhi, hi): blocks [lo, hi) are visited, [flo, fhi) (a run of full blocks) without any mask work.
With monotone positions (the defaults, cu_seqlens, a ring chunk) the visited range is exact, so a
window of W over T keys costs about W / T of full attention; arbitrary positions get a correct superset.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from shardattn.kernels.attention import dropout, halves
from shardattn.kernels.attention.options import AttentionOptions
from shardattn.kernels.lightning.varying import match_varying
from shardattn.kernels.triton_grid import flat_grid

MAX_HEAD_DIM = 256
_INT_MAX = np.iinfo(np.int32).max
_INT_MIN = np.iinfo(np.int32).min
_DTYPES = tuple(map(jnp.dtype, (jnp.float32, jnp.bfloat16, jnp.float16)))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles (rows of q x rows of k), warps and pipeline stages of the three kernels.

    fwd_*: forward (query block x key block); dkdv_*: the dk/dv kernel (query block walked x key block
    owned); dq_*: the dq kernel (query block owned x key block walked). Sequences shorter than a block
    use one block of the next power of two (>= 16). fast_tanh: the soft cap's tanh as one approximate
    instruction (relative error ~2^-11) for bf16/fp16 inputs.
    """

    fwd_q: int = 128
    fwd_k: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 3
    dkdv_q: int = 32
    dkdv_k: int = 128
    dkdv_warps: int = 8
    dkdv_stages: int = 3
    dq_q: int = 128
    dq_k: int = 32
    dq_warps: int = 8
    dq_stages: int = 3
    fast_tanh: bool = True  # soft cap: tanh.approx.f32 for bf16/fp16 inputs (float32 always exact)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_q", "_k")) and (value < 16 or value & (value - 1)):
                raise ValueError(f"{f.name}={value} must be a power of two >= 16 (tl.dot tiles)")
            if f.name.endswith("_warps") and value not in (1, 2, 4, 8, 16):
                raise ValueError(f"{f.name}={value} must be one of 1, 2, 4, 8, 16")
            if f.name.endswith("_stages") and value < 1:
                raise ValueError(f"{f.name}={value} must be >= 1")

    @staticmethod
    def get_default(dk: int, dv: int, dtype) -> "BlockSizes":
        """Per head dim and dtype: FlashAttention-2's Triton tiles, with warps and stages chosen so that
        ptxas (sm_90a) reports no register spills for causal attention (not yet timed on a GPU)."""
        d = max(_pow2(dk), _pow2(dv))
        if jnp.dtype(dtype) == jnp.float32:
            # ieee float32 dots run on FMA units; pipelining (stages > 1) or larger tiles spill heavily.
            return BlockSizes(64, 32, 8, 1, 32, 32, 8, 1, 32, 32, 8, 1)
        if d <= 64:
            return BlockSizes(128, 64, 8, 3, 32, 128, 8, 3, 128, 32, 4, 3)
        if d <= 128:
            return BlockSizes(128, 64, 8, 3, 32, 128, 8, 3, 128, 32, 8, 3)
        return BlockSizes(64, 32, 8, 2, 32, 64, 8, 2, 64, 32, 8, 2)


def _pow2(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _fit(block: int, n: int) -> int:
    """The block size used for a sequence of n: `block`, or less for a short sequence."""
    return min(block, _pow2(n))


# ---------------------------------------------------------------------------------------- block ranges


def _blocked(x, block: int):
    """x [B, L] -> ([B, n, block] zero-padded, [n, block] numpy mask of the real entries)."""
    B, L = x.shape
    n = -(-L // block)
    valid = (np.arange(n * block) < L).reshape(n, block)
    return jnp.pad(jnp.asarray(x, jnp.int32), ((0, 0), (0, n * block - L))).reshape(B, n, block), valid


def _extent(x, block: int):
    """x [B, L] int32 -> per block of `block` entries: min [B, n], max [B, n], no padding [n]."""
    x, valid = _blocked(x, block)
    lo = jnp.min(jnp.where(valid, x, _INT_MAX), axis=2)
    hi = jnp.max(jnp.where(valid, x, _INT_MIN), axis=2)
    return lo, hi, valid.all(axis=1)


def _position_at(pos, seg, seg_bound, block: int, largest: bool):
    """Per block: the largest (or smallest) position among the entries whose segment id is seg_bound
    [B, n]: with it, (seg_bound, that position) is the block's lexicographic max (or min)."""
    pos, valid = _blocked(pos, block)
    seg, _ = _blocked(seg, block)
    at = valid & (seg == seg_bound[..., None])
    if largest:
        return jnp.max(jnp.where(at, pos, _INT_MIN), axis=2)
    return jnp.min(jnp.where(at, pos, _INT_MAX), axis=2)


def block_pairs(q_positions, kv_positions, q_segment_ids, kv_segment_ids, options, bq: int, bk: int):
    """(need, full): [B, nq, nk] bool per (batch row, query block, key block).

    need: the block pair may hold an allowed pair (from the blocks' position and segment-id ranges);
    full: every pair is allowed and neither block has padding (no mask needed). full implies need.
    With segments and causal, the blocks' lexicographic (segment, position) max / min are compared too:
    packed sequences restart their positions, and only that order makes the ranges exact for them.
    Positions must span less than 2^31 (differences are int32), as in the kernels.
    """
    qmin, qmax, qfull = _extent(q_positions, bq)
    kmin, kmax, kfull = _extent(kv_positions, bk)
    qmin, qmax = qmin[:, :, None], qmax[:, :, None]
    kmin, kmax = kmin[:, None, :], kmax[:, None, :]
    need = jnp.ones(jnp.broadcast_shapes(qmin.shape, kmin.shape), bool)
    full = need & jnp.asarray(qfull[:, None] & kfull[None, :])[None]
    if options.causal:  # q_pos - kv_pos >= 0
        need &= qmax - kmin >= 0
        full &= qmin - kmax >= 0
    if options.window is not None:  # -right <= q_pos - kv_pos <= left
        left, right = options.window
        need &= (qmin - kmax <= left) & (qmax - kmin >= -right)
        full &= (qmax - kmin <= left) & (qmin - kmax >= -right)
    if q_segment_ids is not None:
        smin, smax, _ = _extent(q_segment_ids, bq)
        tmin, tmax, _ = _extent(kv_segment_ids, bk)
        if options.causal:  # an allowed pair (s, p_q) >= (s, p_k) bounds lexmax(q block) >= lexmin(k block)
            q_top = _position_at(q_positions, q_segment_ids, smax, bq, largest=True)[:, :, None]
            k_bottom = _position_at(kv_positions, kv_segment_ids, tmin, bk, largest=False)[:, None, :]
            s_hi, t_lo = smax[:, :, None], tmin[:, None, :]
            need &= (s_hi > t_lo) | ((s_hi == t_lo) & (q_top >= k_bottom))
        smin, smax, tmin, tmax = smin[:, :, None], smax[:, :, None], tmin[:, None, :], tmax[:, None, :]
        need &= (tmin <= smax) & (tmax >= smin)
        full &= (smin == smax) & (tmin == tmax) & (smin == tmin)
    return need, full & need


def block_ranges(need, full):
    """[B, n, m] need / full -> [B, n, 4] int32 (lo, flo, fhi, hi) over the last axis.

    [lo, hi): from the first to the last needed block (0, 0 when none); [flo, fhi) the run of full blocks
    starting at the first full one (flo = fhi = hi when none), so lo <= flo <= fhi <= hi.
    """
    m = need.shape[-1]
    idx = jnp.arange(m, dtype=jnp.int32)
    any_need = jnp.any(need, axis=-1)
    lo = jnp.where(any_need, jnp.argmax(need, axis=-1), 0)
    hi = jnp.where(any_need, m - jnp.argmax(need[..., ::-1], axis=-1), 0)
    any_full = jnp.any(full, axis=-1)
    flo = jnp.argmax(full, axis=-1)
    after = (idx >= flo[..., None]) & ~full  # the first block after flo that is not full ends the run
    fhi = jnp.where(jnp.any(after, axis=-1), jnp.argmax(after, axis=-1), m)
    flo = jnp.where(any_full, flo, hi)
    fhi = jnp.where(any_full, fhi, hi)
    return jnp.stack([lo, flo, fhi, hi], axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------- launch


def _launch(name, grid, inputs, out_shapes, *, num_warps, num_stages, zeroed_outputs=(), **constexprs):
    """One launch of triton_kernels.<name> through jax-triton; outputs follow the inputs in its signature.

    (tests/test_attention_triton_interpret.py replaces this function to run the same kernels in Triton's
    interpreter on CPU.)
    """
    import jax_triton as jt

    from shardattn.kernels.attention import triton_kernels

    outputs = jt.triton_call(
        *inputs, kernel=getattr(triton_kernels, name), out_shape=out_shapes, grid=grid,
        name=f"attention_{name}", num_warps=num_warps, num_stages=num_stages,
        zeroed_outputs=zeroed_outputs, **constexprs,
    )  # fmt: skip
    # Inside shard_map, triton_call's outputs are typed as varying over no mesh axis; they vary like the
    # data they come from. (This runs inside the custom_vjp rules: the cast is never differentiated.)
    return tuple(match_varying(o, *inputs) for o in outputs)


def _check_platform():
    if jax.default_backend() != "gpu":
        raise NotImplementedError(
            f"the triton backend needs a GPU; jax.default_backend() is {jax.default_backend()!r}"
        )
    try:
        import jax_triton  # noqa: F401
        import triton  # noqa: F401
    except Exception as err:  # jax-triton raises ImportError/RuntimeError without a CUDA jax
        raise NotImplementedError(f"the triton backend needs jax-triton and triton: {err}") from err


def _check_call(q, k, v, bias):
    """NotImplementedError for what the kernels cannot serve (the API layer then tries the next backend)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype) not in _DTYPES:
            raise NotImplementedError(
                f"the triton backend takes float32/bfloat16/float16, got {name}.dtype={x.dtype}"
            )
    if not q.dtype == k.dtype == v.dtype:
        raise NotImplementedError(
            f"the triton backend needs one dtype for q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    Dk, Dv = q.shape[3], v.shape[3]
    if max(Dk, Dv) > MAX_HEAD_DIM:
        raise NotImplementedError(
            f"the triton backend takes head dims up to {MAX_HEAD_DIM}, got {Dk=}, {Dv=}"
        )
    if bias is not None and jnp.dtype(bias.dtype) not in _DTYPES:
        raise NotImplementedError(
            f"the triton backend takes a float32/bfloat16/float16 bias, got {bias.dtype}"
        )


# ---------------------------------------------------------------------------------- shared arguments


def _constexprs(q, k, v, bias, sinks, q_segment_ids, options: AttentionOptions, blocks: BlockSizes):
    """Static kernel parameters shared by the three kernels."""
    B, T, H, Dk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    left, right = options.window if options.window is not None else (0, 0)
    bias_sb = bias_sh = 0
    if bias is not None:  # [Bb, Hb, T, S]: a size-1 dim is broadcast (stride 0)
        bias_sh = T * S if bias.shape[1] > 1 else 0
        bias_sb = bias.shape[1] * T * S if bias.shape[0] > 1 else 0
    rate = options.dropout_rate
    # The soft cap's tanh: one approximate instruction for bf16/fp16 inputs, the exact form for float32.
    fast_tanh = bool(blocks.fast_tanh) and jnp.dtype(q.dtype) != jnp.float32
    return dict(
        T=T, S=S, H=H, HKV=Hkv, DK=Dk, DV=Dv, BD=_pow2(Dk), BDV=_pow2(Dv), SCALE=float(options.scale),
        SOFT_CAP=float(options.soft_cap or 0.0), FAST_TANH=fast_tanh, CAUSAL=bool(options.causal),
        WINDOW=options.window is not None, LEFT=int(left), RIGHT=int(right),
        HAS_SEG=q_segment_ids is not None, HAS_BIAS=bias is not None, BIAS_SB=bias_sb, BIAS_SH=bias_sh,
        DROPOUT=rate > 0, DROP_SCALE=float(1.0 / (1.0 - rate)), IEEE=jnp.dtype(q.dtype) == jnp.float32,
    )  # fmt: skip


def _side_inputs(q_segment_ids, kv_segment_ids, q_positions, kv_positions, bias, dropout_rng,
                 dropout_offsets, options: AttentionOptions):  # fmt: skip
    """Integer and optional inputs as arrays (dummies [1] for absent features)."""
    dummy_i = jnp.zeros((1,), jnp.int32)
    qpos = jnp.asarray(q_positions, jnp.int32)
    kvpos = jnp.asarray(kv_positions, jnp.int32)
    qseg = dummy_i if q_segment_ids is None else jnp.asarray(q_segment_ids, jnp.int32)
    kvseg = dummy_i if kv_segment_ids is None else jnp.asarray(kv_segment_ids, jnp.int32)
    bias_arg = jnp.zeros((1,), jnp.float32) if bias is None else bias
    if options.dropout_rate > 0:
        # [7] uint32: the two seed words, the keep threshold, the global offsets (q, kv, batch, head;
        # int32 bits, added modulo 2^32 in the kernels as dropout.keep_mask's uint32 casts do).
        s0, s1 = dropout.seed_words(dropout_rng)
        offs = jax.lax.bitcast_convert_type(jnp.stack(dropout.offsets(dropout_offsets)), jnp.uint32)
        drop = jnp.concatenate([jnp.stack([s0, s1, jnp.uint32(dropout.threshold(options.dropout_rate))]),
                                offs])  # fmt: skip
    else:
        drop = jnp.zeros((7,), jnp.uint32)
    return qpos, kvpos, qseg, kvseg, bias_arg, drop


def _resolve(q, v, block_sizes):
    return BlockSizes.get_default(q.shape[3], v.shape[3], q.dtype) if block_sizes is None else block_sizes


# ------------------------------------------------------------------------------------------ forward


def _forward(q, k, v, bias, sinks, q_segment_ids, kv_segment_ids, q_positions, kv_positions, dropout_rng,
             dropout_offsets, options: AttentionOptions, blocks: BlockSizes):  # fmt: skip
    B, T, H, _ = q.shape
    S, Dv = k.shape[1], v.shape[3]
    bq, bk = _fit(blocks.fwd_q, T), _fit(blocks.fwd_k, S)
    nq = -(-T // bq)
    qpos, kvpos, qseg, kvseg, bias_arg, drop = _side_inputs(
        q_segment_ids, kv_segment_ids, q_positions, kv_positions, bias, dropout_rng, dropout_offsets, options
    )
    ranges = block_ranges(*block_pairs(qpos, kvpos, q_segment_ids, kv_segment_ids, options, bq, bk))
    nsink = 0 if sinks is None else sinks.shape[1]
    sinks_arg = jnp.zeros((1,), jnp.float32) if sinks is None else sinks.astype(jnp.float32)
    o, lse = _launch(
        "fwd_kernel", flat_grid(nq, B * H),
        (q, k, v, qpos, kvpos, qseg, kvseg, bias_arg, sinks_arg, drop, ranges),
        (jax.ShapeDtypeStruct((B, T, H, Dv), q.dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32)),
        num_warps=blocks.fwd_warps, num_stages=blocks.fwd_stages, BQ=bq, BK=bk, NQ=nq, NSINK=nsink,
        BSINK=_pow2(max(nsink, 1)), **_constexprs(q, k, v, bias, sinks, q_segment_ids, options, blocks),
    )  # fmt: skip
    return o, lse


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
    """Values only: (o [B, T, H, Dv] in q.dtype, lse [B, H, T] float32). See reference.py.

    Raises NotImplementedError off-GPU, without jax-triton, for other dtypes or head dims > 256.
    """
    _check_platform()
    _check_call(q, k, v, bias)
    return _forward(q, k, v, bias, sinks, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                    dropout_rng, dropout_offsets, options, _resolve(q, v, block_sizes))  # fmt: skip


# ----------------------------------------------------------------------------------------- backward


def _backward(q, k, v, o, lse, do, dlse, bias, sinks, q_segment_ids, kv_segment_ids, q_positions,
              kv_positions, dropout_rng, dropout_offsets, options: AttentionOptions,
              blocks: BlockSizes, grad_dtype=None):  # fmt: skip
    B, T, H, Dk = q.shape
    S = k.shape[1]
    Hkv = k.shape[2]
    f32 = jnp.float32
    lse = lse.astype(f32)
    delta = jnp.swapaxes(jnp.sum(do.astype(f32) * o.astype(f32), axis=-1), 1, 2)  # D_i: [B, H, T]
    row_term = delta if dlse is None else delta - dlse.astype(f32)  # dS = P (dP - (D - dlse))
    qpos, kvpos, qseg, kvseg, bias_arg, drop = _side_inputs(
        q_segment_ids, kv_segment_ids, q_positions, kv_positions, bias, dropout_rng, dropout_offsets, options
    )
    meta = _constexprs(q, k, v, bias, sinks, q_segment_ids, options, blocks)

    def out(like):  # the dtype of a gradient: its input's, or grad_dtype
        return like.dtype if grad_dtype is None else grad_dtype

    common = (q, k, v, do, lse, row_term, qpos, kvpos, qseg, kvseg, bias_arg, drop)

    # dk, dv: one program per key block; ranges are query blocks per key block.
    bq, bk = _fit(blocks.dkdv_q, T), _fit(blocks.dkdv_k, S)
    nk = -(-S // bk)
    need, full = block_pairs(qpos, kvpos, q_segment_ids, kv_segment_ids, options, bq, bk)
    ranges = block_ranges(jnp.swapaxes(need, 1, 2), jnp.swapaxes(full, 1, 2))
    dk, dv = _launch(
        "dkdv_kernel", flat_grid(nk, B * Hkv), common + (ranges,),
        (jax.ShapeDtypeStruct(k.shape, out(k)), jax.ShapeDtypeStruct(v.shape, out(v))),
        num_warps=blocks.dkdv_warps, num_stages=blocks.dkdv_stages, BQ=bq, BK=bk, NK=nk, **meta,
    )  # fmt: skip

    # dq (and dS for dbias): one program per query block.
    bq, bk = _fit(blocks.dq_q, T), _fit(blocks.dq_k, S)
    nq = -(-T // bq)
    ranges = block_ranges(*block_pairs(qpos, kvpos, q_segment_ids, kv_segment_ids, options, bq, bk))
    ds_shape = (B, H, T, S) if bias is not None else (1,)
    dq, ds = _launch(
        "dq_kernel", flat_grid(nq, B * H), common + (ranges,),
        (jax.ShapeDtypeStruct(q.shape, out(q)), jax.ShapeDtypeStruct(ds_shape, f32)),
        num_warps=blocks.dq_warps, num_stages=blocks.dq_stages,
        zeroed_outputs=(1,) if bias is not None else (), BQ=bq, BK=bk, NQ=nq, **meta,
    )  # fmt: skip

    dbias = None
    if bias is not None:  # sum dS over the bias's broadcast dims
        if bias.shape[0] == 1:
            ds = jnp.sum(ds, axis=0, keepdims=True)
        if bias.shape[1] == 1:
            ds = jnp.sum(ds, axis=1, keepdims=True)
        dbias = ds.astype(out(bias))
    dsinks = None
    if sinks is not None:  # d lse_i / d sink = exp(sink - lse_i); d o_i / d sink = -exp(sink - lse_i) o_i
        w = jnp.where(
            lse[..., None] == -jnp.inf, 0.0, jnp.exp(sinks.astype(f32)[None, :, None] - lse[..., None])
        )
        dsinks = -jnp.sum(w * row_term[..., None], axis=(0, 2)).astype(out(sinks))
    return dq, dk, dv, dbias, dsinks


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

    grad_dtype: None gives each gradient in its input's dtype; jnp.float32 keeps the kernels' float32
    sums (for a caller that adds partial gradients, e.g. over the steps of a ring).
    """
    _check_platform()
    _check_call(q, k, v, bias)
    return _backward(q, k, v, o, lse, do.astype(q.dtype), dlse, bias, sinks, q_segment_ids, kv_segment_ids,
                     q_positions, kv_positions, dropout_rng, dropout_offsets, options,
                     _resolve(q, v, block_sizes), grad_dtype)  # fmt: skip


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
    """Differentiable (o, lse): the custom_vjp of `forward` and `backward` (halves.py). See reference.py.

    q: [B, T, H, Dk], k: [B, S, Hkv, Dk], v: [B, S, Hkv, Dv]; keywords as reference.py.

    >>> o, lse = attention(q, k, v, q_positions=qp, kv_positions=kp, options=AttentionOptions(scale=0.125))
    """
    _check_platform()  # here, so that an unservable call raises before any tracing of the custom_vjp
    _check_call(q, k, v, bias)
    return _attention(
        q, k, v, bias=bias, sinks=None if sinks is None else sinks.astype(jnp.float32),
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        q_positions=jnp.asarray(q_positions, jnp.int32), kv_positions=jnp.asarray(kv_positions, jnp.int32),
        dropout_rng=dropout_rng, dropout_offsets=dropout_offsets, options=options,
        block_sizes=_resolve(q, v, block_sizes),
    )  # fmt: skip

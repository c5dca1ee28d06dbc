"""Softmax flash attention as Pallas TPU (Mosaic) kernels: a forward with online softmax and a two-kernel
backward, every feature of reference.py.

Layout: the wrapper lays q, k, v, o out as [B, heads, tokens, D] with tokens padded to whole blocks and
head dims padded to the 128-lane width. Per-query values (positions, segment ids, lse, D_i) travel as
rows [B, (H,) 1, Tp], read as [1, bq] blocks and turned into [bq, 1] columns by a 1-D relayout (so query
blocks are multiples of 128); per-key values as [B, 8, Sp] (broadcast along the sublanes, read as a
[1, bk] slice). The forward's lse leaves the kernel lane-broadcast, [B, H, Tp, 128] (a column cannot be
stored as a row without a transpose), and is sliced to [B, H, T] at once. No transposes in the kernels.

Forward: grid (B, H, query block, key step). The key step walks the key blocks [lo, hi) that the block
pair's positions (and segment ids) can reach; the running max, denominator and output stay in VMEM
scratch (Milakov & Gimelshein 2018; Dao et al. 2022):

    m' = max(m, rowmax(s))   p = exp(s - m')   l' = e^(m - m') l + rowsum(p)   acc' = e^(m - m') acc + p v

GQA reads k and v from kv head h // G through the index maps: they are never repeated.

Block skipping: a JAX pre-pass (block_pairs / block_ranges, shared with the triton backend) gives every
query block the range of key blocks it needs, (lo, flo, fhi, hi): [lo, hi) is visited, [flo, fhi) is a
run of blocks where every pair is allowed and nothing is padding, computed without any mask work. The
ranges reach the kernels as scalar prefetch (SMEM); the key-step index map clamps to the range, so a
step past its row's range fetches nothing new (the block index does not change) and computes nothing.
When the positions are known at trace time (the API layer passes its default positions as numpy arrays,
also under jit; any positions in an eager call), the key-step axis is only as long as the longest range:
a causal or windowed call then has about half (or W / S) of the grid steps of a full one. With traced
positions (given under jit, cu_seqlens under jit, a ring step) it spans every key block, and each step
past a range costs one grid step's overhead (no DMA, no compute).

Backward, from the GIVEN o and lse (a ring passes merged ones), D_i = do_i . o_i - dlse_i in JAX, then
two kernels, because Pallas TPU has no atomics and an output block can only accumulate over
consecutive grid steps: dq sums over key blocks, dk and dv over query blocks and the GQA group, so
each needs its own grid order (the price is computing P twice):
  * dq kernel, grid (B, H, query block, key step): dq in VMEM scratch; with a bias it also writes dS
    per block, a float32 [B, H, Tp, Sp] buffer that the wrapper sums over the bias's broadcast dims;
  * dkdv kernel, grid (B, Hkv, key block, query head of the group, query step): dk and dv of one kv
    head in VMEM scratch, summed over the G query heads that read it.
dsinks = -sum_{b, i} exp(sink - lse_i) (D_i - dlse_i) comes from lse in JAX.

Non-finite keys: in a masked block the keys that no row of the block may see are zeroed before the
products (their count per key is a small MXU product of the mask with ones), so NaN stored at an unseen
key (padding, an unused cache slot) reaches nothing; probabilities and dS are selected by the mask.

Dropout: the keep mask is dropout.keep_mask itself, evaluated inside the kernels on uint32 vectors of the
block's global indices (row hash per row, key hash per key, one combining hash per pair).

Why not JAX's splash attention: it runs in the TPU interpreter here (jax 0.10.2, causal 256 x 256, both
interpreters), but its masks are static numpy structures preprocessed per shape, while our masks come
from traced positions (a ring step, zigzag chunks, cu_seqlens); its lse output is not differentiable
("Higher-order AD not supported" with save_residuals); it has no halves that take a given o and lse (the
ring's backward), no bias, no dropout, one sink per head and kv heads only as MHA or MQA. A delegate
would serve only plain calls and give two numerics for one API; this kernel serves every call.

This file: the plan (checks, block ranges, VMEM estimate), the layout, the two halves and the custom_vjp;
the kernel bodies and their pallas_call builders are in pallas_tpu_kernels.py.

On TPU the kernels compile with Mosaic; on CPU they run in the TPU interpreter (pltpu.InterpretParams),
which simulates VMEM/SMEM and the block pipeline (unwritten memory reads as NaN). Not yet run on a TPU.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from shardattn.kernels.attention import dropout
from shardattn.kernels.attention.options import AttentionOptions
from shardattn.kernels.attention.pallas_tpu_kernels import (
    LANES,
    SUBLANES,
    Static,
    backward_call,
    forward_call,
)
from shardattn.kernels.attention.triton import block_pairs, block_ranges
from shardattn.kernels.lightning.varying import match_varying
from shardattn.kernels.pallas_interpret import interpret_mode

ROWS = 16  # query blocks are multiples of 16 rows (a packed bfloat16 vreg tile)
VMEM_BUDGET = 48 * 2**20  # per kernel; v7x has 64 MiB of VMEM per core, v5e/v6e 128 MiB
_DTYPES = tuple(map(jnp.dtype, (jnp.float32, jnp.bfloat16, jnp.float16)))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows of q (block_q) and of k (block_k) per block, for the forward and both backward kernels.

    Multiples of 128; shorter sequences use one block, rounded up to 16 query rows / 128 keys.
    """

    block_q: int = 512
    block_k: int = 512

    def __post_init__(self):
        # Per-query vectors travel as rows [1, bq] (lane-dense), so several query blocks need bq % 128 == 0.
        if self.block_q < LANES or self.block_q % LANES:
            raise ValueError(f"block_q={self.block_q} must be a positive multiple of {LANES}")
        if self.block_k < LANES or self.block_k % LANES:
            raise ValueError(f"block_k={self.block_k} must be a positive multiple of {LANES}")

    @classmethod
    def get_default(cls):
        # 512 x 512 (splash attention's default size): the [bq, bk] float32 scores take 1 MiB, and each
        # grid step (~0.35 us of overhead) does 2 * 512 * 512 * D multiply-adds. Not measured on a TPU.
        return cls(block_q=512, block_k=512)


def _round_up(x, m):
    return -(-x // m) * m


def _interpret_mode():  # one name per backend, so that a test can patch this backend's mode
    return interpret_mode(on_gpu="triton or cudnn")


# ---------------------------------------------------------------------------------------- the plan


def _check_call(q, k, v, bias):
    """NotImplementedError for what the kernels cannot serve (the API layer then tries the next one)."""
    for name, x in (("q", q), ("k", k), ("v", v)) + ((("bias", bias),) if bias is not None else ()):
        if jnp.dtype(x.dtype) not in _DTYPES:
            raise NotImplementedError(
                f"the pallas backend takes float32/bfloat16/float16, got {name}.dtype={x.dtype}"
            )
    if not q.dtype == k.dtype == v.dtype:
        raise NotImplementedError(
            f"the pallas backend needs one dtype for q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}"
        )


def _vmem_bytes(bq, bk, dk, dv, itemsize, has_bias):
    """Upper estimate of one grid step's VMEM (the dkdv kernel, the largest): double-buffered blocks,
    float32 scratch and a few [bq, bk] float32 temporaries."""
    blocks = 2 * (bq * (dk + dv) * itemsize + bk * (dk + dv) * itemsize + 2 * bq * LANES * 4)
    blocks += 2 * (bq * LANES * 4 + SUBLANES * bk * 4) * 2 + (2 * bq * bk * 4 if has_bias else 0)
    scratch = bk * (dk + dv) * 4
    return blocks + scratch + 8 * bq * bk * 4


def _concrete_or_none(x):
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _plan(q, k, v, bias, sinks, q_seg, kv_seg, q_pos, kv_pos, options, block_sizes):
    """(static config, (query-block ranges [B * nq * 4], key-block ranges [B * nk * 4]) int32)."""
    _check_call(q, k, v, bias)
    interpret = _interpret_mode()
    B, T, H, Dk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    blocks = BlockSizes.get_default() if block_sizes is None else block_sizes
    bq = min(blocks.block_q, _round_up(T, ROWS))
    bk = min(blocks.block_k, _round_up(S, LANES))
    nq, nk = -(-T // bq), -(-S // bk)
    # With positions known at trace time (numpy defaults), the ranges are concrete and the grid's step
    # axis can be cut to the longest range.
    with jax.ensure_compile_time_eval():
        need, full = block_pairs(q_pos, kv_pos, q_seg, kv_seg, options, bq, bk)
        q_ranges = block_ranges(need, full)  # [B, nq, 4]: key blocks per query block
        k_ranges = block_ranges(jnp.swapaxes(need, 1, 2), jnp.swapaxes(full, 1, 2))  # [B, nk, 4]
    span_k, span_q = nk, nq
    cq, ck = _concrete_or_none(q_ranges), _concrete_or_none(k_ranges)
    if cq is not None and ck is not None:
        span_k = max(1, int(np.max(cq[..., 3] - cq[..., 0])))
        span_q = max(1, int(np.max(ck[..., 3] - ck[..., 0])))
    itemsize = 4 if jnp.dtype(q.dtype) != jnp.bfloat16 else 2
    Dkp, Dvp = _round_up(Dk, LANES), _round_up(Dv, LANES)
    vmem = _vmem_bytes(bq, bk, Dkp, Dvp, itemsize, bias is not None)
    if vmem > VMEM_BUDGET:
        raise NotImplementedError(
            f"pallas attention blocks would need ~{vmem / 2**20:.0f} MiB of VMEM, more than "
            f"{VMEM_BUDGET / 2**20:.0f} MiB (head dims {Dk}x{Dv} padded to {Dkp}x{Dvp}, blocks {bq}x{bk})"
        )
    cfg = Static(
        options=options, T=T, S=S, bq=bq, bk=bk, nq=nq, nk=nk, group=H // Hkv, span_k=span_k,
        span_q=span_q, has_seg=q_seg is not None, bias_b=0 if bias is None else bias.shape[0],
        bias_h=0 if bias is None else bias.shape[1], num_sinks=0 if sinks is None else sinks.shape[1],
        vmem_limit_bytes=int(min(max(2 * vmem, 32 * 2**20), 64 * 2**20)), interpret=interpret,
    )  # fmt: skip
    return cfg, (q_ranges.reshape(-1), k_ranges.reshape(-1))


def _dropout_words(dropout_rng, dropout_offsets, options):
    """[6] int32 scalar-prefetch words: seed words (uint32 bits), q/kv/batch/head offsets.

    dropout_offsets: as dropout.offsets reads them (2 or 4 entries; missing ones are 0).
    """
    if options.dropout_rate == 0:
        return jnp.zeros((6,), jnp.int32)
    offsets = dropout.offsets(dropout_offsets)
    s0, s1 = dropout.seed_words(dropout_rng)
    seeds = jax.lax.bitcast_convert_type(jnp.stack([s0, s1]), jnp.int32)
    return jnp.concatenate([seeds, jnp.stack(offsets)])


# ------------------------------------------------------------------------------------------ layout


def _heads_major(x, rows, lanes):
    """[B, L, h, D] -> [B, h, rows, lanes]: tokens padded to whole blocks, head dim to the lanes."""
    x = jnp.pad(x, [(0, 0), (0, rows - x.shape[1]), (0, 0), (0, lanes - x.shape[3])])
    return jnp.transpose(x, (0, 2, 1, 3))


def _query_rows(x, rows, value=0):
    """[B, (H,) T] -> [B, (H,) 1, rows]: a per-query value as one row (padded with `value`)."""
    pad = [(0, 0)] * (x.ndim - 1) + [(0, rows - x.shape[-1])]
    return jnp.expand_dims(jnp.pad(x, pad, constant_values=value), -2)


def _key_cols(x, cols):
    """[B, S] -> [B, 8, cols]: a per-key value broadcast along the sublanes."""
    x = jnp.pad(x, [(0, 0), (0, cols - x.shape[1])])
    return jnp.broadcast_to(x[:, None, :], (x.shape[0], SUBLANES, cols))


def _compute_dtype(dtype):
    # The MXU takes bfloat16 and float32; float16 computes in float32 (TPUs have no float16 matmul).
    return jnp.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else jnp.float32


def _kernel_inputs(cfg: Static, q, k, v, bias, q_seg, kv_seg, q_pos, kv_pos):
    dt = _compute_dtype(q.dtype)
    Tp, Sp = cfg.nq * cfg.bq, cfg.nk * cfg.bk
    Dkp, Dvp = _round_up(q.shape[3], LANES), _round_up(v.shape[3], LANES)
    qk = _heads_major(q.astype(dt), Tp, Dkp)
    kk = _heads_major(k.astype(dt), Sp, Dkp)
    vk = _heads_major(v.astype(dt), Sp, Dvp)
    ints = [_query_rows(jnp.asarray(q_pos, jnp.int32), Tp), _key_cols(jnp.asarray(kv_pos, jnp.int32), Sp)]
    if cfg.has_seg:
        ints += [_query_rows(q_seg.astype(jnp.int32), Tp), _key_cols(kv_seg.astype(jnp.int32), Sp)]
    else:
        ints += [None, None]
    if bias is not None:
        bt = jnp.float32 if jnp.dtype(bias.dtype) == jnp.float16 else bias.dtype
        bias = jnp.pad(bias.astype(bt), [(0, 0), (0, 0), (0, Tp - cfg.T), (0, Sp - cfg.S)])
    return qk, kk, vk, *ints, bias


# ------------------------------------------------------------------------------------ the two halves


def _forward(cfg: Static, ranges, q, k, v, bias, sinks, q_seg, kv_seg, q_pos, kv_pos, drop):
    B, T, H, _ = q.shape
    Dv = v.shape[3]
    qk, kk, vk, qpos, kpos, qseg, kseg, bias_k = _kernel_inputs(
        cfg, q, k, v, bias, q_seg, kv_seg, q_pos, kv_pos
    )
    sinks_k = jnp.zeros((1,), jnp.float32) if sinks is None else sinks.astype(jnp.float32).reshape(-1)
    # Side inputs vary like the data inside shard_map (the TPU interpreter checks the kernel's inputs).
    side = [match_varying(x, qk, kk, vk) for x in (qpos, kpos, qseg, kseg, bias_k, sinks_k, drop, *ranges)
            if x is not None]  # fmt: skip
    qpos, kpos, *side = side
    if cfg.has_seg:
        qseg, kseg, *side = side
    if bias_k is not None:
        bias_k, *side = side
    sinks_k, drop, q_ranges, k_ranges = side
    o, lse = forward_call(
        cfg, qk, kk, vk, qpos, kpos, qseg, kseg, bias_k, sinks_k, drop, (q_ranges, k_ranges)
    )
    o = jnp.transpose(o[:, :, :T, :Dv], (0, 2, 1, 3)).astype(q.dtype)
    return o, lse[:, :, :T, 0]


def _backward(cfg: Static, ranges, q, k, v, o, lse, do, dlse, bias, sinks, q_seg, kv_seg, q_pos, kv_pos,
              drop, grad_dtype):  # fmt: skip
    B, T, H, Dk = q.shape
    S, Dv = k.shape[1], v.shape[3]
    f32 = jnp.float32
    lse = lse.astype(f32)
    delta = jnp.swapaxes(jnp.sum(do.astype(f32) * o.astype(f32), axis=-1), 1, 2)  # D_i: [B, H, T]
    row_term = delta if dlse is None else delta - dlse.astype(f32)  # dS = P (dP - (D - dlse))
    Tp = cfg.nq * cfg.bq
    # An empty row (lse = -inf) and the padding rows get lse = +inf: exp(s - inf) = 0 keeps P at 0.
    lse_k = _query_rows(jnp.where(lse == -jnp.inf, jnp.inf, lse), Tp, value=jnp.inf)
    row_k = _query_rows(row_term, Tp)
    qk, kk, vk, qpos, kpos, qseg, kseg, bias_k = _kernel_inputs(
        cfg, q, k, v, bias, q_seg, kv_seg, q_pos, kv_pos
    )
    dok = _heads_major(do.astype(qk.dtype), Tp, _round_up(Dv, LANES))
    data = (qk, kk, vk, dok, lse_k, row_k)
    qk, kk, vk, dok, lse_k, row_k = (match_varying(x, *data) for x in data)
    side = [match_varying(x, *data) for x in (qpos, kpos, qseg, kseg, bias_k, drop, *ranges) if x is not None]
    qpos, kpos, *side = side
    if cfg.has_seg:
        qseg, kseg, *side = side
    if bias_k is not None:
        bias_k, *side = side
    drop, q_ranges, k_ranges = side

    def out(like):  # the dtype of a gradient: its input's, or grad_dtype
        return like.dtype if grad_dtype is None else grad_dtype

    dq_dtype = f32 if grad_dtype is not None or qk.dtype != q.dtype else q.dtype
    dq, dk, dv, ds = backward_call(cfg, qk, kk, vk, dok, lse_k, row_k, qpos, kpos, qseg, kseg, bias_k, drop,
                               (q_ranges, k_ranges), dq_dtype, f32)  # fmt: skip
    dq = jnp.transpose(dq[:, :, :T, :Dk], (0, 2, 1, 3)).astype(out(q))
    dk = jnp.transpose(dk[:, :, :S, :Dk], (0, 2, 1, 3)).astype(out(k))
    dv = jnp.transpose(dv[:, :, :S, :Dv], (0, 2, 1, 3)).astype(out(v))
    dbias = None
    if bias is not None:
        # Blocks outside every visited range were never written: their dS is 0.
        visited = _visited(q_ranges.reshape(B, cfg.nq, 4), cfg)  # [B, 1, Tp, Sp]
        ds = jnp.where(visited, ds, 0.0)[:, :, :T, :S]
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


def _visited(q_ranges, cfg: Static):
    """[B, 1, Tp, Sp] bool: the pair's block lies in its query block's visited range [lo, hi)."""
    blk = jnp.arange(cfg.nk)
    inside = (blk >= q_ranges[..., :1]) & (blk < q_ranges[..., 3:])  # [B, nq, nk]
    inside = jnp.broadcast_to(inside[:, :, None, :, None], (inside.shape[0], cfg.nq, cfg.bq, cfg.nk, cfg.bk))
    return inside.reshape(inside.shape[0], 1, cfg.nq * cfg.bq, cfg.nk * cfg.bk)


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

    Raises NotImplementedError off TPU (except on CPU, where the TPU interpreter runs the kernels).
    """
    cfg, ranges = _plan(q, k, v, bias, sinks, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                        options, block_sizes)  # fmt: skip
    drop = _dropout_words(dropout_rng, dropout_offsets, options)
    return _forward(cfg, ranges, q, k, v, bias, sinks, q_segment_ids, kv_segment_ids, q_positions,
                    kv_positions, drop)  # fmt: skip


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

    grad_dtype: None gives each gradient in its input's dtype; jnp.float32 keeps the float32 sums (for a
    caller that adds partial gradients, e.g. over the steps of a ring).
    """
    cfg, ranges = _plan(q, k, v, bias, sinks, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                        options, block_sizes)  # fmt: skip
    drop = _dropout_words(dropout_rng, dropout_offsets, options)
    return _backward(cfg, ranges, q, k, v, o, lse, do, dlse, bias, sinks, q_segment_ids, kv_segment_ids,
                     q_positions, kv_positions, drop, grad_dtype)  # fmt: skip


# --------------------------------------------------------------------------------------- custom_vjp


# Not halves.differentiable (the xla and triton glue): the plan is made outside the custom_vjp, where
# positions given as numpy arrays are still concrete and shrink the key axis of the grid; inside, they
# would be tracers. The plan (static config, block ranges) then serves both halves.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, bias, sinks, ints):
    q_seg, kv_seg, q_pos, kv_pos, drop, ranges = ints
    return _forward(cfg, ranges, q, k, v, bias, sinks, q_seg, kv_seg, q_pos, kv_pos, drop)


def _attention_fwd(cfg, q, k, v, bias, sinks, ints):
    o, lse = _attention(cfg, q, k, v, bias, sinks, ints)
    return (o, lse), (q, k, v, bias, sinks, ints, o, lse)


def _attention_bwd(cfg, residuals, cotangents):
    q, k, v, bias, sinks, ints, o, lse = residuals
    do, dlse = cotangents
    q_seg, kv_seg, q_pos, kv_pos, drop, ranges = ints
    dq, dk, dv, dbias, dsinks = _backward(cfg, ranges, q, k, v, o, lse, do.astype(q.dtype), dlse, bias,
                                          sinks, q_seg, kv_seg, q_pos, kv_pos, drop, None)  # fmt: skip
    no_grad = jax.tree.map(lambda _: None, ints)  # integer inputs have no cotangent
    return dq, dk, dv, dbias, dsinks, no_grad


_attention.defvjp(_attention_fwd, _attention_bwd)


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
    """Differentiable (o, lse): the custom_vjp of `forward` and `backward`. See reference.py.

    q: [B, T, H, Dk], k: [B, S, Hkv, Dk], v: [B, S, Hkv, Dv]; keywords as reference.py.

    >>> o, lse = attention(q, k, v, q_positions=qp, kv_positions=kp, options=AttentionOptions(scale=0.125))
    """
    cfg, ranges = _plan(q, k, v, bias, sinks, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                        options, block_sizes)  # fmt: skip
    drop = _dropout_words(dropout_rng, dropout_offsets, options)
    # Inside shard_map, a replicated input (sinks, a shared bias) gets a per-shard cotangent from the
    # backward: cast it to vary like the rest, so that autodiff of the cast sums those (a psum).
    diff = [x for x in (q, k, v, bias, sinks) if x is not None]
    q, k, v = (match_varying(x, *diff) for x in (q, k, v))
    bias = None if bias is None else match_varying(bias, *diff)
    sinks = None if sinks is None else match_varying(sinks.astype(jnp.float32), *diff)
    ints = (q_segment_ids, kv_segment_ids, jnp.asarray(q_positions, jnp.int32),
            jnp.asarray(kv_positions, jnp.int32), drop, ranges)  # fmt: skip
    return _attention(cfg, q, k, v, bias, sinks, ints)

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

On TPU the kernels compile with Mosaic; on CPU they run in the TPU interpreter (pltpu.InterpretParams),
which simulates VMEM/SMEM and the block pipeline (unwritten memory reads as NaN). Not yet run on a TPU.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from shardattn.kernels.attention import dropout
from shardattn.kernels.attention.options import MASK_VALUE, AttentionOptions
from shardattn.kernels.attention.triton import block_pairs, block_ranges
from shardattn.kernels.lightning.varying import match_varying

LANES = 128  # TPU vreg lane width: key blocks and head dims are multiples of it
SUBLANES = 8
ROWS = 16  # query blocks are multiples of 16 rows (a packed bfloat16 vreg tile)
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
TN_DIMS = (((0,), (0,)), ((), ()))  # a.T @ b
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


@dataclasses.dataclass(frozen=True)
class _Static:
    """Static, hashable configuration of one call (the custom_vjp's nondiff argument)."""

    options: AttentionOptions
    T: int
    S: int
    bq: int
    bk: int
    nq: int
    nk: int
    group: int  # query heads per kv head
    span_k: int  # key steps per query block (the longest range, or nk)
    span_q: int  # query steps per key block
    has_seg: bool
    bias_b: int  # 0 without a bias, else the bias's batch size (1 or B)
    bias_h: int  # its head size (1 or H)
    num_sinks: int
    vmem_limit_bytes: int
    interpret: object  # False (compile with Mosaic) or pltpu.InterpretParams() (CPU)


def _round_up(x, m):
    return -(-x // m) * m


def _interpret_mode():
    platform = jax.default_backend()
    if platform == "tpu":
        return False
    if platform == "cpu":
        # The TPU interpreter checks TPU semantics (VMEM/SMEM, block pipeline, out-of-bounds reads;
        # unwritten memory reads as NaN), so CPU tests catch what a TPU would get wrong.
        return pltpu.InterpretParams()
    raise NotImplementedError("the pallas backend targets TPU (Mosaic); use triton or cudnn on GPU")


def _compiler_params(cfg: _Static, semantics):
    if cfg.interpret:
        # As in the lightning backend: under jax.vmap pallas_call prepends grid axes, and jax 0.10.2's
        # TPU interpreter zips the semantics with the grid and fails; it walks every axis in order anyway.
        semantics = None
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=cfg.vmem_limit_bytes)


def _dot(a, b, dims=None):
    """dot_general accumulated in float32; float32 operands get full-precision passes (the MXU would
    otherwise round them to bfloat16)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = dims or (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------- shared block math


def _range(ranges_ref, row, step):
    """(lo, flo, fhi, hi) of range `row` and the block visited at `step` (clamped into [lo, hi))."""
    base = row * 4
    lo, flo, fhi, hi = (ranges_ref[base + n] for n in range(4))
    return lo, flo, fhi, hi, jnp.minimum(lo + step, jnp.maximum(hi - 1, lo))


def _column(ref):
    """A per-query row block [1, bq] as a column [bq, 1] (a 1-D relayout, no transpose)."""
    return jnp.expand_dims(ref[0], -1)


def _mask(cfg: _Static, i, j, qpos_ref, kpos_ref, qseg_ref, kseg_ref):
    """[bq, bk] allowed pairs of query block i and key block j, padding excluded."""
    shape = (cfg.bq, cfg.bk)
    opts = cfg.options
    qp = jnp.broadcast_to(_column(qpos_ref), shape)
    kp = jnp.broadcast_to(kpos_ref[:1, :], shape)
    offset = kp - qp  # kv_pos - q_pos, as options.allowed compares them (no overflow for wide windows)
    rows = i * cfg.bq + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = j * cfg.bk + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    mask = (rows < cfg.T) & (cols < cfg.S)
    if opts.causal:
        mask &= offset <= 0
    if opts.window is not None:
        left, right = opts.window
        mask &= (offset >= -left) & (offset <= right)
    if cfg.has_seg:
        mask &= jnp.broadcast_to(_column(qseg_ref), shape) == jnp.broadcast_to(kseg_ref[:1, :], shape)
    return mask


def _seen(mask):
    """[bk, 1] bool: some row of the block may see key j (a TN product of the mask with ones, exact
    counts in float32; it turns the mask's columns into a column vector without a transpose)."""
    ones = jnp.ones((mask.shape[0], LANES), jnp.bfloat16)
    count = _dot(jnp.where(mask, 1.0, 0.0).astype(jnp.bfloat16), ones, TN_DIMS)  # [bk, 128]
    return count[:, :1] > 0


def _logits(cfg: _Static, q, k, bias_ref, mask):
    """float32 logits [bq, bk] (scaled, capped, biased, masked) and tanh(s / cap) for the cap's gradient."""
    opts = cfg.options
    s = opts.scale * _dot(q, k, NT_DIMS)
    t = None
    if opts.soft_cap is not None:
        t = jnp.tanh(s / opts.soft_cap)
        s = opts.soft_cap * t
        if mask is not None:
            t = jnp.where(mask, t, 0.0)  # NaN there (from a NaN key) must not reach dS * (1 - t^2)
    if bias_ref is not None:
        s = s + bias_ref[...].astype(jnp.float32)
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    return s, t


def _keep(cfg: _Static, drop_ref, b, h, i, j):
    """[bq, bk] dropout keep mask of block pair (i, j) from global indices: dropout.keep_mask itself."""
    s0, s1, q_off, kv_off, b_off, h_off = (drop_ref[n] for n in range(6))
    col = (cfg.bq, 1)

    def u32(x, shape):  # an int32 scalar as a uint32 vector (the same bits)
        return jnp.full(shape, x, jnp.int32).astype(jnp.uint32)

    seed = (u32(s0, col), u32(s1, (1, cfg.bk)))
    rows = i * cfg.bq + q_off + jax.lax.broadcasted_iota(jnp.int32, col, 0)
    keys = j * cfg.bk + kv_off + jax.lax.broadcasted_iota(jnp.int32, (1, cfg.bk), 1)
    return dropout.keep_mask(seed, u32(b + b_off, col), u32(h + h_off, col), rows.astype(jnp.uint32),
                             keys.astype(jnp.uint32), cfg.options.dropout_rate)  # fmt: skip


def _split_refs(cfg: _Static, refs, leading: int):
    """Kernel refs after the `leading` fixed ones: (q_seg, kv_seg, bias, rest) by the static features."""
    refs = list(refs[leading:])
    qseg = kseg = bias = None
    if cfg.has_seg:
        qseg, kseg = refs.pop(0), refs.pop(0)
    if cfg.bias_b:
        bias = refs.pop(0)
    return qseg, kseg, bias, refs


# ----------------------------------------------------------------------------------------- forward


def _fwd_kernel(ranges_ref, drop_ref, sinks_ref, *refs, cfg: _Static):
    # refs: q [bq, Dk], k [bk, Dk], v [bk, Dv], q_pos [1, bq], kv_pos [8, bk], (q_seg, kv_seg),
    # (bias [bq, bk]), o [bq, Dv], lse [bq, 128], scratch m, l [bq, 128] and acc [bq, Dv] float32.
    q_ref, k_ref, v_ref, qpos_ref, kpos_ref = refs[:5]
    qseg_ref, kseg_ref, bias_ref, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = _split_refs(cfg, refs, 5)
    opts = cfg.options
    b, h, i, step = (pl.program_id(n) for n in range(4))
    lo, flo, fhi, hi, j = _range(ranges_ref, b * cfg.nq + i, step)

    @pl.when(step == 0)
    def _():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def block(masked: bool):
        mask = _mask(cfg, i, j, qpos_ref, kpos_ref, qseg_ref, kseg_ref) if masked else None
        v = v_ref[...]
        s, _ = _logits(cfg, q_ref[...], k_ref[...], bias_ref, mask)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 128]
        p = jnp.exp(s - m_new[:, :1])
        if masked:
            p = jnp.where(mask, p, 0.0)
            v = jnp.where(_seen(mask), v, jnp.zeros((), v.dtype))  # NaN at an unseen key reaches nothing
        alpha = jnp.exp(m_prev - m_new)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_new
        if opts.dropout_rate > 0:
            keep = _keep(cfg, drop_ref, b, h, i, j)
            p = jnp.where(keep, p * (1.0 / (1.0 - opts.dropout_rate)), 0.0)
        acc_scr[...] = alpha[:, :1] * acc_scr[...] + _dot(p.astype(v.dtype), v)

    full = (j >= flo) & (j < fhi)
    pl.when((lo + step < hi) & full)(lambda: block(masked=False))
    pl.when((lo + step < hi) & ~full)(lambda: block(masked=True))

    @pl.when(step == cfg.span_k - 1)
    def _():
        m, den, acc = m_scr[...], l_scr[...], acc_scr[...]
        if cfg.num_sinks:  # sinks join the denominator with no value
            sinks = [sinks_ref[h * cfg.num_sinks + n] for n in range(cfg.num_sinks)]
            m_new = m
            for x in sinks:
                m_new = jnp.maximum(m_new, x)
            alpha = jnp.exp(m - m_new)
            den = alpha * den
            for x in sinks:
                den = den + jnp.exp(x - m_new)
            acc = alpha[:, :1] * acc
            m = m_new
        nonempty = den > 0
        den = jnp.where(nonempty, den, 1.0)
        o_ref[...] = (acc / den[:, :1]).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(nonempty, m + jnp.log(den), -jnp.inf)


def _fwd_call(cfg: _Static, q, k, v, qpos, kpos, qseg, kseg, bias, sinks, drop, ranges):
    """q [B, H, Tp, Dk], k/v [B, Hkv, Sp, D] -> o [B, H, Tp, Dv] in q.dtype, lse [B, H, Tp, 128] f32."""
    B, H, Tp, Dk = q.shape
    Dv = v.shape[-1]
    G, bq, bk, nq = cfg.group, cfg.bq, cfg.bk, cfg.nq

    def kv_block(b, i, t, ranges):
        return _range(ranges, b * nq + i, t)[4]

    def q_map(b, h, i, t, *_):
        return b, h, i, 0

    def kv_map(b, h, i, t, ranges, *_):
        return b, jax.lax.div(h, G), kv_block(b, i, t, ranges), 0

    def qrow_map(b, h, i, t, *_):
        return b, 0, i

    def krow_map(b, h, i, t, ranges, *_):
        return b, 0, kv_block(b, i, t, ranges)

    def bias_map(b, h, i, t, ranges, *_):
        bb = b if cfg.bias_b > 1 else 0
        hb = h if cfg.bias_h > 1 else 0
        return bb, hb, i, kv_block(b, i, t, ranges)

    in_specs = [
        pl.BlockSpec((None, None, bq, Dk), q_map),
        pl.BlockSpec((None, None, bk, Dk), kv_map),
        pl.BlockSpec((None, None, bk, Dv), kv_map),
        pl.BlockSpec((None, 1, bq), qrow_map),
        pl.BlockSpec((None, SUBLANES, bk), krow_map),
    ]
    args = [q, k, v, qpos, kpos]
    if cfg.has_seg:
        in_specs += [pl.BlockSpec((None, 1, bq), qrow_map), pl.BlockSpec((None, SUBLANES, bk), krow_map)]
        args += [qseg, kseg]
    if cfg.bias_b:
        in_specs.append(pl.BlockSpec((None, None, bq, bk), bias_map))
        args.append(bias)
    mat = jax.typeof(q).mat  # outputs vary over the shard_map axes of the inputs (check_vma=True)
    out_shape = [
        jax.ShapeDtypeStruct((B, H, Tp, Dv), q.dtype, manual_axis_type=mat),
        jax.ShapeDtypeStruct((B, H, Tp, LANES), jnp.float32, manual_axis_type=mat),
    ]
    out_specs = [pl.BlockSpec((None, None, bq, Dv), q_map), pl.BlockSpec((None, None, bq, LANES), q_map)]
    scratch = [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
               pltpu.VMEM((bq, Dv), jnp.float32)]  # fmt: skip
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(B, H, nq, cfg.span_k),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),  # fmt: skip
        out_shape=out_shape,
        compiler_params=_compiler_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name=_name("attention_fwd", cfg),
    )(ranges[0], drop, sinks, *args)


def _name(kind, cfg: _Static):
    opts = cfg.options
    parts = [kind, f"q{cfg.bq}", f"k{cfg.bk}", f"G{cfg.group}"]
    parts += [n for n, on in (("causal", opts.causal), ("window", opts.window is not None),
                              ("softcap", opts.soft_cap is not None), ("seg", cfg.has_seg),
                              ("bias", cfg.bias_b), ("sinks", cfg.num_sinks),
                              ("dropout", opts.dropout_rate > 0)) if on]  # fmt: skip
    return "_".join(parts)


# ----------------------------------------------------------------------------------------- backward


def _dq_kernel(ranges_ref, drop_ref, *refs, cfg: _Static):
    # refs: q, k, v, do, lse [1, bq], row_term [1, bq], q_pos, kv_pos, (q_seg, kv_seg), (bias),
    # dq [bq, Dk], (ds [bq, bk] f32 with a bias), scratch dq_acc [bq, Dk] f32.
    q_ref, k_ref, v_ref, do_ref, lse_ref, row_ref, qpos_ref, kpos_ref = refs[:8]
    qseg_ref, kseg_ref, bias_ref, rest = _split_refs(cfg, refs, 8)
    dq_ref, ds_ref, acc_scr = rest if cfg.bias_b else (rest[0], None, rest[1])
    opts = cfg.options
    b, h, i, step = (pl.program_id(n) for n in range(4))
    lo, flo, fhi, hi, j = _range(ranges_ref, b * cfg.nq + i, step)

    @pl.when(step == 0)
    def _():
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def block(masked: bool):
        mask = _mask(cfg, i, j, qpos_ref, kpos_ref, qseg_ref, kseg_ref) if masked else None
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s, t = _logits(cfg, q, k, bias_ref, mask)
        p = jnp.exp(s - _column(lse_ref))  # lse = +inf on an empty row: P = 0
        dp = _dot(do, v, NT_DIMS)
        if opts.dropout_rate > 0:
            keep = _keep(cfg, drop_ref, b, h, i, j)
            dp = jnp.where(keep, dp * (1.0 / (1.0 - opts.dropout_rate)), 0.0)
        ds = p * (dp - _column(row_ref))
        if masked:
            ds = jnp.where(mask, ds, 0.0)  # dp is NaN at a NaN key: select, do not multiply
            k = jnp.where(_seen(mask), k, jnp.zeros((), k.dtype))
        if ds_ref is not None:
            ds_ref[...] = ds
        if t is not None:
            ds = ds * (1.0 - t * t)
        acc_scr[...] += opts.scale * _dot(ds.astype(k.dtype), k)

    full = (j >= flo) & (j < fhi)
    pl.when((lo + step < hi) & full)(lambda: block(masked=False))
    pl.when((lo + step < hi) & ~full)(lambda: block(masked=True))

    @pl.when(step == cfg.span_k - 1)
    def _():
        dq_ref[...] = acc_scr[...].astype(dq_ref.dtype)


def _dkdv_kernel(ranges_ref, drop_ref, *refs, cfg: _Static):
    # refs as _dq_kernel's; outputs dk [bk, Dk], dv [bk, Dv] f32, scratch dk_acc, dv_acc f32.
    q_ref, k_ref, v_ref, do_ref, lse_ref, row_ref, qpos_ref, kpos_ref = refs[:8]
    qseg_ref, kseg_ref, bias_ref, (dk_ref, dv_ref, dk_scr, dv_scr) = _split_refs(cfg, refs, 8)
    opts = cfg.options
    b, kh, j, g, step = (pl.program_id(n) for n in range(5))
    h = kh * cfg.group + g
    lo, flo, fhi, hi, i = _range(ranges_ref, b * cfg.nk + j, step)

    @pl.when((g == 0) & (step == 0))
    def _():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def block(masked: bool):
        mask = _mask(cfg, i, j, qpos_ref, kpos_ref, qseg_ref, kseg_ref) if masked else None
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s, t = _logits(cfg, q, k, bias_ref, mask)
        p = jnp.exp(s - _column(lse_ref))
        if masked:
            p = jnp.where(mask, p, 0.0)
        dp = _dot(do, v, NT_DIMS)
        pz = p
        if opts.dropout_rate > 0:
            keep = _keep(cfg, drop_ref, b, h, i, j)
            inv = 1.0 / (1.0 - opts.dropout_rate)
            pz = jnp.where(keep, p * inv, 0.0)
            dp = jnp.where(keep, dp * inv, 0.0)
        dv_scr[...] += _dot(pz.astype(do.dtype), do, TN_DIMS)
        ds = p * (dp - _column(row_ref))
        if masked:
            ds = jnp.where(mask, ds, 0.0)
        if t is not None:
            ds = ds * (1.0 - t * t)
        dk_scr[...] += opts.scale * _dot(ds.astype(q.dtype), q, TN_DIMS)

    full = (i >= flo) & (i < fhi)
    pl.when((lo + step < hi) & full)(lambda: block(masked=False))
    pl.when((lo + step < hi) & ~full)(lambda: block(masked=True))

    @pl.when((g == cfg.group - 1) & (step == cfg.span_q - 1))
    def _():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _bwd_call(cfg: _Static, q, k, v, do, lse, row, qpos, kpos, qseg, kseg, bias, drop, ranges, dq_dtype,
              dkv_dtype):  # fmt: skip
    """dq [B, H, Tp, Dk], dk, dv [B, Hkv, Sp, D] and (with a bias) dS [B, H, Tp, Sp] float32."""
    B, H, Tp, Dk = q.shape
    Hkv, Sp, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, bq, bk, nq, nk = cfg.group, cfg.bq, cfg.bk, cfg.nq, cfg.nk
    mat = jax.typeof(q).mat
    q_ranges, k_ranges = ranges

    # dq kernel: grid (b, h, query block i, key step t) -> key block kb(b, i, t)
    def kb(b, i, t, r):
        return _range(r, b * nq + i, t)[4]

    def own_q(b, h, i, t, *_):
        return b, h, i, 0

    def walk_kv(b, h, i, t, r, *_):
        return b, jax.lax.div(h, G), kb(b, i, t, r), 0

    def own_qrow(b, h, i, t, *_):
        return b, 0, i

    def walk_krow(b, h, i, t, r, *_):
        return b, 0, kb(b, i, t, r)

    def dq_bias(b, h, i, t, r, *_):
        return (b if cfg.bias_b > 1 else 0), (h if cfg.bias_h > 1 else 0), i, kb(b, i, t, r)

    def dq_ds(b, h, i, t, r, *_):
        return b, h, i, kb(b, i, t, r)

    specs, args = _bwd_inputs(cfg, (q, k, v, do, lse, row, qpos, kpos, qseg, kseg, bias),
                              own_q, walk_kv, own_qrow, walk_krow, dq_bias)  # fmt: skip
    out_shape = [jax.ShapeDtypeStruct((B, H, Tp, Dk), dq_dtype, manual_axis_type=mat)]
    out_specs = [pl.BlockSpec((None, None, bq, Dk), own_q)]
    if cfg.bias_b:
        out_shape.append(jax.ShapeDtypeStruct((B, H, Tp, Sp), jnp.float32, manual_axis_type=mat))
        out_specs.append(pl.BlockSpec((None, None, bq, bk), dq_ds))
    dq_out = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, H, nq, cfg.span_k),
            in_specs=specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((bq, Dk), jnp.float32)],
        ),  # fmt: skip
        out_shape=out_shape,
        compiler_params=_compiler_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name=_name("attention_bwd_dq", cfg),
    )(q_ranges, drop, *args)

    # dkdv kernel: grid (b, kv head kh, key block j, query head g of the group, query step t)
    def qb(b, j, t, r):
        return _range(r, b * nk + j, t)[4]

    def walk_q(b, kh, j, g, t, r, *_):
        return b, kh * G + g, qb(b, j, t, r), 0

    def own_kv(b, kh, j, g, t, *_):
        return b, kh, j, 0

    def walk_qrow(b, kh, j, g, t, r, *_):
        return b, 0, qb(b, j, t, r)

    def own_krow(b, kh, j, g, t, *_):
        return b, 0, j

    def kv_bias(b, kh, j, g, t, r, *_):
        bb = b if cfg.bias_b > 1 else 0
        hb = kh * G + g if cfg.bias_h > 1 else 0
        return bb, hb, qb(b, j, t, r), j

    specs, args = _bwd_inputs(cfg, (q, k, v, do, lse, row, qpos, kpos, qseg, kseg, bias),
                              walk_q, own_kv, walk_qrow, own_krow, kv_bias)  # fmt: skip
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, Hkv, nk, G, cfg.span_q),
            in_specs=specs,
            out_specs=[
                pl.BlockSpec((None, None, bk, Dk), own_kv),
                pl.BlockSpec((None, None, bk, Dv), own_kv),
            ],
            scratch_shapes=[pltpu.VMEM((bk, Dk), jnp.float32), pltpu.VMEM((bk, Dv), jnp.float32)],
        ),  # fmt: skip
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, dkv_dtype, manual_axis_type=mat),
            jax.ShapeDtypeStruct(v.shape, dkv_dtype, manual_axis_type=mat),
        ],  # fmt: skip
        compiler_params=_compiler_params(cfg, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=cfg.interpret,
        name=_name("attention_bwd_dkdv", cfg),
    )(k_ranges, drop, *args)
    return dq_out[0], dk, dv, (dq_out[1] if cfg.bias_b else None)


def _bwd_inputs(cfg: _Static, arrays, q_map, kv_map, qrow_map, krow_map, bias_map):
    """BlockSpecs and arrays shared by the two backward kernels (their index maps differ)."""
    q, k, v, do, lse, row, qpos, kpos, qseg, kseg, bias = arrays
    bq, bk = cfg.bq, cfg.bk

    def row_map(*idx):  # lse, row_term [B, H, 1, Tp]: the query block of q_map, as a row
        b, h, i, _ = q_map(*idx)
        return b, h, 0, i

    specs = [
        pl.BlockSpec((None, None, bq, q.shape[-1]), q_map),
        pl.BlockSpec((None, None, bk, k.shape[-1]), kv_map),
        pl.BlockSpec((None, None, bk, v.shape[-1]), kv_map),
        pl.BlockSpec((None, None, bq, do.shape[-1]), q_map),
        pl.BlockSpec((None, None, 1, bq), row_map),
        pl.BlockSpec((None, None, 1, bq), row_map),
        pl.BlockSpec((None, 1, bq), qrow_map),
        pl.BlockSpec((None, SUBLANES, bk), krow_map),
    ]
    args = [q, k, v, do, lse, row, qpos, kpos]
    if cfg.has_seg:
        specs += [pl.BlockSpec((None, 1, bq), qrow_map), pl.BlockSpec((None, SUBLANES, bk), krow_map)]
        args += [qseg, kseg]
    if cfg.bias_b:
        specs.append(pl.BlockSpec((None, None, bq, bk), bias_map))
        args.append(bias)
    return specs, args


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
    cfg = _Static(
        options=options, T=T, S=S, bq=bq, bk=bk, nq=nq, nk=nk, group=H // Hkv, span_k=span_k,
        span_q=span_q, has_seg=q_seg is not None, bias_b=0 if bias is None else bias.shape[0],
        bias_h=0 if bias is None else bias.shape[1], num_sinks=0 if sinks is None else sinks.shape[1],
        vmem_limit_bytes=int(min(max(2 * vmem, 32 * 2**20), 64 * 2**20)), interpret=interpret,
    )  # fmt: skip
    return cfg, (q_ranges.reshape(-1), k_ranges.reshape(-1))


def _dropout_words(dropout_rng, dropout_offsets, options):
    """[6] int32 scalar-prefetch words: seed words (uint32 bits), q/kv/batch/head offsets.

    dropout_offsets: (q_offset, kv_offset) or (q_offset, kv_offset, batch_offset, head_offset); missing
    ones are 0 (global batch index = local + batch_offset, global query head = local + head_offset).
    """
    if options.dropout_rate == 0:
        return jnp.zeros((6,), jnp.int32)
    offsets = tuple(dropout_offsets or ())
    if len(offsets) not in (0, 2, 4):
        raise ValueError(f"dropout_offsets must have 2 or 4 entries, got {len(offsets)}")
    offsets = offsets + (0,) * (4 - len(offsets))
    s0, s1 = dropout.seed_words(dropout_rng)
    seeds = jax.lax.bitcast_convert_type(jnp.stack([s0, s1]), jnp.int32)
    return jnp.concatenate([seeds, jnp.stack([jnp.asarray(x, jnp.int32) for x in offsets])])


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


def _kernel_inputs(cfg: _Static, q, k, v, bias, q_seg, kv_seg, q_pos, kv_pos):
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


def _forward(cfg: _Static, ranges, q, k, v, bias, sinks, q_seg, kv_seg, q_pos, kv_pos, drop):
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
    o, lse = _fwd_call(cfg, qk, kk, vk, qpos, kpos, qseg, kseg, bias_k, sinks_k, drop, (q_ranges, k_ranges))
    o = jnp.transpose(o[:, :, :T, :Dv], (0, 2, 1, 3)).astype(q.dtype)
    return o, lse[:, :, :T, 0]


def _backward(cfg: _Static, ranges, q, k, v, o, lse, do, dlse, bias, sinks, q_seg, kv_seg, q_pos, kv_pos,
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
    dq, dk, dv, ds = _bwd_call(cfg, qk, kk, vk, dok, lse_k, row_k, qpos, kpos, qseg, kseg, bias_k, drop,
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


def _visited(q_ranges, cfg: _Static):
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

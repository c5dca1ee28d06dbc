"""The Pallas TPU (Mosaic) kernel bodies and pallas_call builders of softmax attention.

pallas_tpu.py holds the design (its docstring), the plan (block ranges, checks), the layout and the
custom_vjp; this file the three kernels, top to bottom: shared block maths, the forward, the dq and dkdv
backward kernels, each followed by the wrapper that builds its grid and BlockSpecs.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from shardattn.kernels.attention import dropout
from shardattn.kernels.attention.options import MASK_VALUE, AttentionOptions

LANES = 128  # TPU vreg lane width: key blocks and head dims are multiples of it
SUBLANES = 8
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
TN_DIMS = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class Static:
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


def _compiler_params(cfg: Static, semantics):
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


def _mask(cfg: Static, i, j, qpos_ref, kpos_ref, qseg_ref, kseg_ref):
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


def _logits(cfg: Static, q, k, bias_ref, mask):
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


def _keep(cfg: Static, drop_ref, b, h, i, j):
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


def _split_refs(cfg: Static, refs, leading: int):
    """Kernel refs after the `leading` fixed ones: (q_seg, kv_seg, bias, rest) by the static features."""
    refs = list(refs[leading:])
    qseg = kseg = bias = None
    if cfg.has_seg:
        qseg, kseg = refs.pop(0), refs.pop(0)
    if cfg.bias_b:
        bias = refs.pop(0)
    return qseg, kseg, bias, refs


# ----------------------------------------------------------------------------------------- forward


def _fwd_kernel(ranges_ref, drop_ref, sinks_ref, *refs, cfg: Static):
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


def _query_grid_maps(cfg: Static):
    """Index maps of a grid (b, h, query block i, key step t) with the key-block ranges as the first scalar
    prefetch (the forward and the dq kernel): step t of query block i visits key block kb(b, i, t).
    Returns maps for q-like blocks, k/v blocks, query rows, key rows, the bias and a [bq, bk] pair block."""
    G, nq = cfg.group, cfg.nq

    def kb(b, i, t, ranges):
        return _range(ranges, b * nq + i, t)[4]

    def q_map(b, h, i, t, *_):
        return b, h, i, 0

    def kv_map(b, h, i, t, ranges, *_):
        return b, jax.lax.div(h, G), kb(b, i, t, ranges), 0

    def qrow_map(b, h, i, t, *_):
        return b, 0, i

    def krow_map(b, h, i, t, ranges, *_):
        return b, 0, kb(b, i, t, ranges)

    def bias_map(b, h, i, t, ranges, *_):
        return (b if cfg.bias_b > 1 else 0), (h if cfg.bias_h > 1 else 0), i, kb(b, i, t, ranges)

    def pair_map(b, h, i, t, ranges, *_):
        return b, h, i, kb(b, i, t, ranges)

    return q_map, kv_map, qrow_map, krow_map, bias_map, pair_map


def forward_call(cfg: Static, q, k, v, qpos, kpos, qseg, kseg, bias, sinks, drop, ranges):
    """q [B, H, Tp, Dk], k/v [B, Hkv, Sp, D] -> o [B, H, Tp, Dv] in q.dtype, lse [B, H, Tp, 128] f32."""
    B, H, Tp, Dk = q.shape
    Dv = v.shape[-1]
    bq, bk, nq = cfg.bq, cfg.bk, cfg.nq

    q_map, kv_map, qrow_map, krow_map, bias_map, _ = _query_grid_maps(cfg)

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


def _name(kind, cfg: Static):
    opts = cfg.options
    parts = [kind, f"q{cfg.bq}", f"k{cfg.bk}", f"G{cfg.group}"]
    parts += [n for n, on in (("causal", opts.causal), ("window", opts.window is not None),
                              ("softcap", opts.soft_cap is not None), ("seg", cfg.has_seg),
                              ("bias", cfg.bias_b), ("sinks", cfg.num_sinks),
                              ("dropout", opts.dropout_rate > 0)) if on]  # fmt: skip
    return "_".join(parts)


# ----------------------------------------------------------------------------------------- backward


def _dq_kernel(ranges_ref, drop_ref, *refs, cfg: Static):
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


def _dkdv_kernel(ranges_ref, drop_ref, *refs, cfg: Static):
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


def backward_call(cfg: Static, q, k, v, do, lse, row, qpos, kpos, qseg, kseg, bias, drop, ranges, dq_dtype,
              dkv_dtype):  # fmt: skip
    """dq [B, H, Tp, Dk], dk, dv [B, Hkv, Sp, D] and (with a bias) dS [B, H, Tp, Sp] float32."""
    B, H, Tp, Dk = q.shape
    Hkv, Sp, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, bq, bk, nq, nk = cfg.group, cfg.bq, cfg.bk, cfg.nq, cfg.nk
    mat = jax.typeof(q).mat
    q_ranges, k_ranges = ranges

    # dq kernel: the forward's grid (b, h, query block i, key step t) and index maps
    own_q, walk_kv, own_qrow, walk_krow, dq_bias, dq_ds = _query_grid_maps(cfg)

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


def _bwd_inputs(cfg: Static, arrays, q_map, kv_map, qrow_map, krow_map, bias_map):
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

"""Lightning attention as Pallas TPU (Mosaic) kernels: a chunked forward and an exact backward.

Signature and meaning: reference.py. Within a chunk of C tokens (position i, valid length l, docs/design.md):

    o_i   = scale * (sum_{j<=i} lam^(i-j) (q_i . k_j) v_j  +  lam^(i+1) q_i S_in)
    S_out = lam^l S_in + sum_{j<l} lam^(l-1-j) k_j^T v_j

One grid step handles one chunk of one query head; the state S lives in float32 VMEM scratch and the
chunk axis is a sequential ("arbitrary") grid dimension, so the chain of chunk states never leaves
VMEM. The grid is (batch, kv head, chunk, query head of the group): the G query heads that share a
key/value head (GQA) run back to back on the same k/v block, so k and v are fetched once per chunk and
the backward pass can sum dk and dv over the group in the output block without a repeat.

The backward pass walks the chunks in reverse with dS (the gradient of the outgoing state) in VMEM
scratch; it reads the incoming state of every chunk, saved by the forward pass ([T/C, Dk, Dv] per head,
O(T * D) for C ~ D), and computes dq, dk, dv, d(initial_state) and the exact d(slopes).

The wrapper lays tokens out as [B, H, T', D]: reversed (reverse=True), padded to whole chunks, head dims
padded to the 128-lane width, and with cu_seqlens re-laid so that every sequence starts at a chunk
boundary (zero k/v in the padding). Per chunk it passes, as scalar-prefetch tables in SMEM, the valid
length, whether the chunk starts a sequence, whether it ends one and the sequence's index. The layout
is plain JAX outside the custom_vjp, so autodiff maps gradients back through it.

On TPU the kernels compile with Mosaic; on CPU they run in the TPU interpreter
(pltpu.InterpretParams), which simulates VMEM/SMEM, the block pipeline and the grid semantics.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from shardattn.kernels.lightning.packing import slot_maps
from shardattn.kernels.lightning.varying import match_varying
from shardattn.kernels.pallas_interpret import interpret_mode

LANES = 128  # TPU vreg lane width: the last dim of every VMEM block is padded to a multiple of it
SUBLANE_ROWS = 16  # rows per packed bf16 vreg tile (8 for float32): chunk sizes are multiples of 16
NT_DIMS = (((1,), (1,)), ((), ()))  # dot_general numbers for a @ b.T (native on the MXU)
VMEM_BUDGET = 48 * 2**20  # per kernel; v7x has 64 MiB of VMEM per core, v5e/v6e 128 MiB


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """chunk: tokens per grid step (rows of the q/k/v/o blocks and side of the C x C score matrix)."""

    chunk: int = 128

    def __post_init__(self):
        if self.chunk < SUBLANE_ROWS or self.chunk % SUBLANE_ROWS:
            raise ValueError(f"chunk={self.chunk} must be a positive multiple of {SUBLANE_ROWS}")

    @classmethod
    def get_default(cls):
        # 128 matches the 128-wide MXU of v4/v5e/v5p (v6e's 256-wide MXU may prefer 256: not measured,
        # no TPU was available) and keeps the C x C scores in 16 float32 vregs. Larger chunks waste
        # more padding per packed sequence; smaller ones leave lanes of the scores empty and save and
        # reload the [Dk, Dv] state more often per token.
        return cls(chunk=128)


@dataclasses.dataclass(frozen=True)
class _Options:
    """Static, hashable configuration of one call: the custom_vjp's nondiff argument."""

    scale: float
    chunk: int
    group: int  # query heads per key/value head
    varlen: bool  # states are indexed per packed sequence (cu_seqlens)
    vmem_limit_bytes: int
    interpret: object  # False (compile with Mosaic) or pltpu.InterpretParams() (CPU)


def _round_up(x, m):
    return -(-x // m) * m


def _vmem_bytes(group, chunk, dk, dv, itemsize):
    """Upper estimate of the VMEM one grid step holds (the backward pass, the larger of the two).

    Per kv head the G query heads keep float32 [Dk, Dv] states resident: the dS scratch and the
    double-buffered d(final) input and d(initial) output blocks, plus the saved state; then the
    double-buffered [C, D] blocks (f32 for dk, dv) and a few [C, C] float32 temporaries.
    """
    state = 4 * dk * dv
    blocks = 2 * chunk * (2 * dk * itemsize + 2 * dv * itemsize + 4 * (2 * dk + dv))
    return 5 * group * state + 2 * state + blocks + 8 * chunk * chunk * 4


def _compiler_params(options):
    # Batch and kv heads are independent (megacore may split them); the chunk axis carries the state
    # and the query-head axis accumulates dk/dv, so both run in order.
    semantics = ("parallel", "parallel", "arbitrary", "arbitrary")
    if options.interpret:
        # Under jax.vmap, pallas_call prepends grid axes; Mosaic's lowering then extends the semantics,
        # but jax 0.10.2's TPU interpreter zips them with the grid and fails. The interpreter walks
        # every axis in order anyway, so leaving the semantics unset there changes nothing else.
        semantics = None
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=options.vmem_limit_bytes)


def _dot(a, b, dims=None):
    """a @ b (or dot_general with `dims`) accumulated in float32.

    float32 operands get full-precision passes: the MXU would otherwise round them to bfloat16 and
    float32 callers expect float32 accuracy (~1e-6 relative).
    """
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = dims or (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _dot_state(x, state, dims=None):
    """x @ state (or dot_general with `dims`) for a float32 state and x in the input dtype.

    With narrow inputs the state goes to the MXU as two halves in that dtype, hi + lo (about 16
    mantissa bits for bfloat16), at twice the MXU work of one. One rounded copy costs 2^-9 relative
    error in every term it touches, and the d(slopes) sums, full of cancelling terms, amplify it:
    B2-T63-H4/2-D80-bfloat16 measured d(slopes) 2.8e-2 off with one copy, 5.9e-5 with two (against
    the reference given the same bfloat16 cotangent of o).
    """
    if x.dtype == jnp.float32:
        return _dot(x, state, dims)
    hi = state.astype(x.dtype)
    lo = (state - hi.astype(jnp.float32)).astype(x.dtype)
    return _dot(x, hi, dims) + _dot(x, lo, dims)


def _decays(slope, length, chunk):
    """Decay factors of one chunk, for lam = exp(-slope).

    Returns (diff [C, C] int, intra [C, C], query [C, 1], key_exp [C, 1] int, key [C, 1], whole [1, 1],
    l [1, 1] float32):
    intra[i, j] = lam^(i-j) for j <= i else 0, query[i] = lam^(i+1), key[j] = lam^(l-1-j) for j < l else
    0, whole = lam^l. Exponents are masked to -inf before exp: exp of the positive exponents that the
    masked entries would have overflows for large slopes.
    """
    row = jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
    diff = row - col
    intra = jnp.exp(jnp.where(diff >= 0, -slope * diff.astype(jnp.float32), -jnp.inf))
    query = jnp.exp(-slope * (row + 1).astype(jnp.float32))
    key_exp = length - 1 - row
    key = jnp.exp(jnp.where(key_exp >= 0, -slope * key_exp.astype(jnp.float32), -jnp.inf))
    length_f = jnp.full((1, 1), length, jnp.int32).astype(jnp.float32)
    whole = jnp.exp(-slope * length_f)
    return diff, intra, query, key_exp, key, whole, length_f


def _isfinite(x):
    return jnp.isfinite(x.astype(jnp.float32))  # Mosaic's is_finite takes float32 only


def _finite(x):
    return jnp.where(_isfinite(x), x, jnp.zeros_like(x))


def _reached(k, v, diff):
    """[C, 1] bool: some token j <= i of the chunk has a non-finite entry in k_j or v_j.

    The intra-chunk matmuls run on k and v with non-finite entries zeroed (a masked 0 * NaN term would
    be NaN and reach earlier tokens); these rows are then set back to NaN. The per-token flags become a
    row [1, C] through a tiny NT dot with a row of ones (a [C, 1] -> [1, C] relayout without a
    transpose); 0/1 values are exact in bfloat16.
    """
    def row(x):  # [C, D] -> [8, C]: the count of non-finite entries of each token, in every row
        flags = jnp.where(_isfinite(x), 0.0, 1.0).astype(jnp.bfloat16)
        ones = jnp.ones((8, x.shape[1]), jnp.bfloat16)
        return jax.lax.dot_general(ones, flags, NT_DIMS, preferred_element_type=jnp.float32)

    bad = (row(k) + row(v))[:1] > 0  # [1, C]
    return jnp.max(jnp.where((diff >= 0) & bad, 1.0, 0.0), axis=1, keepdims=True) > 0


# ----------------------------------------------------------------------------------------- forward


def _fwd_kernel(
    lens_ref, starts_ref, ends_ref, seqs_ref, slopes_ref,  # scalar prefetch (SMEM): [nC] x4, [H]
    q_ref, k_ref, v_ref, s0_ref,  # [C, Dk], [C, Dk], [C, Dv], [G, Dk, Dv] f32
    o_ref, final_ref, *rest,  # [C, Dv], [G, Dk, Dv] f32, then ([Dk, Dv] f32 saved state,) scratch
    scale, chunk, group, save_states,
):
    del ends_ref, seqs_ref  # used by the index maps only
    states_ref, state_scr = rest if save_states else (None, *rest)
    g = pl.program_id(3)
    c = pl.program_id(2)
    slope = slopes_ref[pl.program_id(1) * group + g]
    length = lens_ref[c]

    # A sequence starts from its own initial state (the s0 block follows the chunk's sequence).
    @pl.when(starts_ref[c] != 0)
    def _():
        state_scr[g] = s0_ref[g]

    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    dt = q.dtype
    diff, intra, query, _, key, whole, _ = _decays(slope, length, chunk)
    state_in = state_scr[g]
    if save_states:
        states_ref[...] = state_in

    # Non-finite values reach only later outputs: masks are selected (`where`), the intra-chunk matmuls
    # use zeroed copies, rows from a bad k_j or v_j on are set to NaN, and the state update below uses
    # the raw k, v so that later chunks get the NaN through the state (a bad q_i reaches o_i through
    # the raw q of `inter`). Finite inputs give the same values as plain masking.
    causal = diff >= 0
    scores = jnp.where(causal, (scale * _dot(_finite(q), _finite(k), NT_DIMS)) * intra, 0.0)  # [C, C]
    inter = query * _dot_state(q, state_in)  # rows scaled after the matmul: q stays exact in its dtype
    o_intra = jnp.where(_reached(k, v, diff), jnp.nan, _dot(scores.astype(dt), _finite(v)))
    o_ref[...] = (o_intra + scale * inter).astype(o_ref.dtype)

    # Transpose in float32 (32-bit transposes are Mosaic's longest-supported case), then feed the MXU
    # in the input dtype.
    weighted_kt = (k.astype(jnp.float32) * key).T.astype(dt)  # [Dk, C]
    state_out = whole * state_in + _dot(weighted_kt, v)
    state_scr[g] = state_out
    # Every chunk writes its sequence's final-state block; the last write (the sequence's last chunk)
    # is what reaches HBM, because the block index only changes when the sequence does.
    final_ref[g] = state_out


def _fwd_call(options, q, k, v, slopes, s0, tables, *, save_states):
    """q: [B, H, T', Dk], k: [B, Hkv, T', Dk], v: [B, Hkv, T', Dv], s0: [N, H, Dk, Dv] f32 (T', D padded).

    Returns o [B, H, T', Dv], final [N, H, Dk, Dv] f32 and, with save_states, each chunk's incoming state
    [B, H, nC, Dk, Dv] f32.
    """
    B, H, Tp, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    N = s0.shape[0]
    C, G = options.chunk, options.group
    nC = Tp // C

    # Index maps get the grid indices, then the scalar-prefetch refs.
    def q_map(b, kh, c, g, lens, starts, ends, seqs, slopes):
        return b, kh * G + g, c, 0

    def kv_map(b, kh, c, g, lens, starts, ends, seqs, slopes):
        return b, kh, c, 0

    def state_map(b, kh, c, g, lens, starts, ends, seqs, slopes):
        # Block of G heads of the chunk's sequence: b for batch rows, the packed sequence with cu_seqlens.
        return b + seqs[c], kh, 0, 0

    def saved_map(b, kh, c, g, lens, starts, ends, seqs, slopes):
        return b, kh * G + g, c, 0, 0

    in_specs = [
        pl.BlockSpec((None, None, C, Dk), q_map),
        pl.BlockSpec((None, None, C, Dk), kv_map),
        pl.BlockSpec((None, None, C, Dv), kv_map),
        pl.BlockSpec((None, G, Dk, Dv), state_map),
    ]
    # Outputs vary over the same shard_map axes as the inputs (check_vma=True needs it said).
    mat = jax.typeof(q).mat
    out_shape = [
        jax.ShapeDtypeStruct((B, H, Tp, Dv), q.dtype, manual_axis_type=mat),
        jax.ShapeDtypeStruct((N, H, Dk, Dv), jnp.float32, manual_axis_type=mat),
    ]
    out_specs = [pl.BlockSpec((None, None, C, Dv), q_map), pl.BlockSpec((None, G, Dk, Dv), state_map)]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((B, H, nC, Dk, Dv), jnp.float32, manual_axis_type=mat))
        out_specs.append(pl.BlockSpec((None, None, None, Dk, Dv), saved_map))

    kernel = functools.partial(_fwd_kernel, scale=options.scale, chunk=C, group=G, save_states=save_states)
    outs = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(B, Hkv, nC, G),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((G, Dk, Dv), jnp.float32)],
        ),
        out_shape=out_shape,
        compiler_params=_compiler_params(options),
        interpret=options.interpret,
        name=f"lightning_fwd_C{C}_G{G}" + ("_varlen" if options.varlen else ""),
    )(*tables, slopes, q, k, v, s0)
    return outs


# ---------------------------------------------------------------------------------------- backward


def _bwd_kernel(
    lens_ref, starts_ref, ends_ref, seqs_ref, slopes_ref,  # scalar prefetch (SMEM)
    q_ref, k_ref, v_ref, state_ref, do_ref, dfinal_ref,  # [C,Dk] [C,Dk] [C,Dv] [Dk,Dv] [C,Dv] [G,Dk,Dv]
    dq_ref, dk_ref, dv_ref, ds0_ref, dslope_ref,  # [C,Dk] [C,Dk] f32 [C,Dv] f32 [G,Dk,Dv] [G8,128]
    ds_scr,  # [G, Dk, Dv] f32: gradient of each head's outgoing state
    *, scale, chunk, group, num_chunks,
):
    del seqs_ref
    g = pl.program_id(3)
    c = num_chunks - 1 - pl.program_id(2)  # chunks run last to first
    slope = slopes_ref[pl.program_id(1) * group + g]
    length = lens_ref[c]

    # The last chunk of a sequence receives the cotangent of that sequence's final state.
    @pl.when(ends_ref[c] != 0)
    def _():
        ds_scr[g] = dfinal_ref[g]

    @pl.when((pl.program_id(2) == 0) & (g == 0))
    def _():
        dslope_ref[...] = jnp.zeros_like(dslope_ref)

    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    dt = q.dtype
    f32 = jnp.float32
    diff, intra, query, key_exp, key, whole, length_f = _decays(slope, length, chunk)
    state_in = state_ref[...]
    ds = ds_scr[g]

    # As in the forward: the intra-chunk products use zeroed copies of non-finite entries and selected
    # masks, so that a NaN in q_i reaches no dk_j, dv_j of a later token j (and the state products keep
    # the raw values, which carry it to earlier chunks, the right direction).
    causal = diff >= 0
    q_f, k_f, v_f = _finite(q), _finite(k), _finite(v)
    qk = _dot(q_f, k_f, NT_DIMS)  # [C, C]
    p = jnp.where(causal, (scale * qk) * intra, 0.0)
    da = jnp.where(causal, (scale * _dot(do, v_f, NT_DIMS)) * intra, 0.0)  # d(score) through the mask
    do_st = _dot_state(do, state_in, NT_DIMS)  # dO S_in^T: [C, Dk]
    dq = _dot(da.astype(dt), k_f) + (scale * query) * do_st
    k_ds = _dot_state(k, ds)  # [C, Dv]
    dk = _dot(da.T.astype(dt), q_f) + key * _dot_state(v, ds, NT_DIMS)
    dv = _dot(p.T.astype(dt), do) + key * k_ds
    q_decayed_t = (q.astype(f32) * query).T.astype(dt)  # [Dk, C]
    ds_in = scale * _dot(q_decayed_t, do) + whole * ds

    dq_ref[...] = dq.astype(dq_ref.dtype)

    # The G query heads of this kv head run back to back on the same dk/dv block: sum their shares.
    @pl.when(g == 0)
    def _():
        dk_ref[...] = dk
        dv_ref[...] = dv

    @pl.when(g != 0)
    def _():
        dk_ref[...] += dk
        dv_ref[...] += dv

    ds_scr[g] = ds_in

    @pl.when(starts_ref[c] != 0)
    def _():
        ds0_ref[g] = ds_in

    position_plus_one = (jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0) + 1).astype(f32)
    # Exact d(slope): each decay factor lam^e has d/d(slope) = -e lam^e; sum every factor's share.
    def total(x):
        return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)  # [1, 1]

    d_slope = -(
        total(diff.astype(f32) * da * qk)  # intra-chunk lam^(i-j); da is 0 where j > i
        + total((position_plus_one * scale * query) * (q.astype(f32) * do_st))  # lam^(i+1)
        + total((key_exp.astype(f32) * key) * (v.astype(f32) * k_ds))  # lam^(l-1-j); key is 0 for j >= l
        + length_f * whole * total(state_in * ds)  # lam^l
    )
    rows = jax.lax.broadcasted_iota(jnp.int32, dslope_ref.shape, 0)
    dslope_ref[...] += jnp.where(rows == g, d_slope, 0.0)


def _bwd_call(options, q, k, v, slopes, states, do, dfinal, tables):
    """Returns dq [B, H, T', Dk] (q.dtype), dk, dv [B, Hkv, T', D] f32, d_s0 [N, H, Dk, Dv] f32 and
    d_slopes [B, Hkv, G8, 128] f32 (head g of the group in row g, the same value along the lanes)."""
    B, H, Tp, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    N = dfinal.shape[0]
    C, G = options.chunk, options.group
    nC = Tp // C
    G8 = _round_up(G, 8)

    def q_map(b, kh, c, g, *_):
        return b, kh * G + g, nC - 1 - c, 0

    def kv_map(b, kh, c, g, *_):
        return b, kh, nC - 1 - c, 0

    def state_map(b, kh, c, g, lens, starts, ends, seqs, slopes):
        return b + seqs[nC - 1 - c], kh, 0, 0

    def saved_map(b, kh, c, g, *_):
        return b, kh * G + g, nC - 1 - c, 0, 0

    def dslope_map(b, kh, c, g, *_):
        return b, kh, 0, 0

    mat = jax.typeof(q).mat
    kernel = functools.partial(_bwd_kernel, scale=options.scale, chunk=C, group=G, num_chunks=nC)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(B, Hkv, nC, G),
            in_specs=[
                pl.BlockSpec((None, None, C, Dk), q_map),
                pl.BlockSpec((None, None, C, Dk), kv_map),
                pl.BlockSpec((None, None, C, Dv), kv_map),
                pl.BlockSpec((None, None, None, Dk, Dv), saved_map),
                pl.BlockSpec((None, None, C, Dv), q_map),
                pl.BlockSpec((None, G, Dk, Dv), state_map),
            ],
            out_specs=[
                pl.BlockSpec((None, None, C, Dk), q_map),
                pl.BlockSpec((None, None, C, Dk), kv_map),
                pl.BlockSpec((None, None, C, Dv), kv_map),
                pl.BlockSpec((None, G, Dk, Dv), state_map),
                pl.BlockSpec((None, None, G8, LANES), dslope_map),
            ],
            scratch_shapes=[pltpu.VMEM((G, Dk, Dv), jnp.float32)],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype, manual_axis_type=mat),
            jax.ShapeDtypeStruct(k.shape, jnp.float32, manual_axis_type=mat),
            jax.ShapeDtypeStruct(v.shape, jnp.float32, manual_axis_type=mat),
            jax.ShapeDtypeStruct((N, H, Dk, Dv), jnp.float32, manual_axis_type=mat),
            jax.ShapeDtypeStruct((B, Hkv, G8, LANES), jnp.float32, manual_axis_type=mat),
        ],
        compiler_params=_compiler_params(options),
        interpret=options.interpret,
        name=f"lightning_bwd_C{C}_G{G}" + ("_varlen" if options.varlen else ""),
    )(*tables, slopes, q, k, v, states, do, dfinal)


# ------------------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lightning(options, q, k, v, slopes, s0, tables):
    o, final = _fwd_call(options, q, k, v, slopes, s0, tables, save_states=False)
    return o, final


def _lightning_fwd(options, q, k, v, slopes, s0, tables):
    o, final, states = _fwd_call(options, q, k, v, slopes, s0, tables, save_states=True)
    return (o, final), (q, k, v, slopes, states, tables)


def _lightning_bwd(options, residuals, cotangents):
    q, k, v, slopes, states, tables = residuals
    do, dfinal = cotangents
    dq, dk, dv, ds0, dslope = _bwd_call(options, q, k, v, slopes, states, do, dfinal, tables)
    if options.varlen:
        # An empty sequence owns no chunk, so the kernel never writes its d(initial_state) block; its
        # final state is its initial state, and the wrapper routes that gradient around the kernel.
        _, starts, _, seqs = tables
        has_chunk = jnp.zeros(ds0.shape[:1], jnp.int32).at[seqs].max(starts) > 0
        ds0 = jnp.where(has_chunk[:, None, None, None], ds0, 0.0)
    d_slopes = jnp.sum(dslope[..., : options.group, 0], axis=0).reshape(-1)  # [Hkv, G] -> [H]
    int_zeros = tuple(None for _ in tables)  # integer tables have no cotangent
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), d_slopes, ds0, int_zeros


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


# ---------------------------------------------------------------------------------------- wrapper


def _varlen_tables(cu_seqlens, T, num_chunks, chunk, reverse):
    """Chunk-aligned layout of packed sequences.

    Returns (slot_token [S], slot_valid [S], token_slot [T], lens, starts, ends, seqs [nC] int32),
    S = num_chunks * chunk slots. Sequence n fills ceil(len_n / C) whole chunks from a chunk boundary,
    last token first with reverse=True (so the kernel's forward recurrence is the reverse one). Chunks
    after the last sequence are empty (length 0, state passes through) and belong to the last non-empty
    sequence, so that its final-state block is written last by them.
    """
    C = chunk
    seq_len = (cu_seqlens[1:] - cu_seqlens[:-1]).astype(jnp.int32)
    first_chunk = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum((seq_len + C - 1) // C)])
    used = first_chunk[-1]

    chunk_idx = jnp.arange(num_chunks, dtype=jnp.int32)
    # side="right" skips empty sequences (they share their first_chunk with the next one).
    owner = jnp.searchsorted(first_chunk, jnp.minimum(chunk_idx, used - 1), side="right") - 1
    seqs = owner.astype(jnp.int32)
    pos0 = (chunk_idx - first_chunk[seqs]) * C  # position in its sequence of the chunk's first slot
    in_use = chunk_idx < used
    lens = jnp.where(in_use, jnp.clip(seq_len[seqs] - pos0, 0, C), 0).astype(jnp.int32)
    starts = (in_use & (pos0 == 0)).astype(jnp.int32)
    ends = jnp.concatenate([starts[1:], jnp.ones((1,), jnp.int32)])

    slot_token, slot_valid, token_slot = slot_maps(cu_seqlens, T, C, first_chunk, seqs, pos0, lens, reverse)
    return slot_token, slot_valid, token_slot, (lens, starts, ends, seqs)


def _interpret_mode():  # one name per backend, so that a test can patch this backend's mode
    return interpret_mode(on_gpu="triton")


def lightning_attention(
    q, k, v, slopes, initial_state=None, cu_seqlens=None, *, scale, reverse=False,
    block_sizes: BlockSizes | None = None,
):
    """Lightning attention (reference.py's contract) with Pallas TPU kernels.

    q: [B, T, H, Dk], k: [B, T, Hkv, Dk], v: [B, T, Hkv, Dv], slopes: [H] f32, initial_state:
    [N, H, Dk, Dv] f32 or None, cu_seqlens: [N + 1] int32 or None. Returns (o [B, T, H, Dv] in q.dtype,
    final_state [N, H, Dk, Dv] f32). block_sizes: BlockSizes.get_default() unless given.
    """
    interpret = _interpret_mode()
    B, T, H, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    G = H // Hkv
    out_dtype = q.dtype
    # The MXU takes bfloat16 and float32. float16 (and anything else) computes in float32: its range
    # could not hold the state split of _dot_state, and TPUs have no float16 matmul path.
    dt = q.dtype if q.dtype in (jnp.bfloat16, jnp.float32) else jnp.float32
    q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
    block_sizes = block_sizes or BlockSizes.get_default()
    # A sequence shorter than one chunk gets a smaller chunk (a multiple of 16 rows), not padding.
    C = min(block_sizes.chunk, _round_up(T, SUBLANE_ROWS))
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is None:
        # zeros_like keeps q's varying shard_map axes (a plain zeros would not vary; docs/design.md).
        initial_state = jnp.zeros_like(q, jnp.float32, shape=(N, H, Dk, Dv))
    s0 = initial_state.astype(jnp.float32)

    if cu_seqlens is None:
        if reverse:
            q, k, v = (jnp.flip(x, axis=1) for x in (q, k, v))
        nC = -(-T // C)
        chunk_idx = jnp.arange(nC, dtype=jnp.int32)
        lens = jnp.clip(T - chunk_idx * C, 0, C).astype(jnp.int32)
        starts = (chunk_idx == 0).astype(jnp.int32)
        ends = (chunk_idx == nC - 1).astype(jnp.int32)
        tables = (lens, starts, ends, jnp.zeros_like(lens))
        pad_t = nC * C - T
    else:
        nC = -(-T // C) + N  # each sequence wastes less than one chunk
        slot_token, slot_valid, token_slot, tables = _varlen_tables(cu_seqlens, T, nC, C, reverse)

        def lay(x):  # [1, T, h, d] -> [1, nC * C, h, d], zero in padding slots
            return jnp.where(slot_valid[:, None, None], x[0, slot_token], 0)[None]

        q, k, v = lay(q), lay(k), lay(v)
        pad_t = 0

    # [B, T, h, d] -> [B, h, T', d'], chunk and lane padding in the same copy as the transpose.
    Dkp, Dvp = _round_up(Dk, LANES), _round_up(Dv, LANES)

    def to_kernel(x, d_pad):
        x = jnp.pad(x, [(0, 0), (0, pad_t), (0, 0), (0, d_pad - x.shape[-1])])
        return jnp.transpose(x, (0, 2, 1, 3))

    vmem = _vmem_bytes(G, C, Dkp, Dvp, jnp.dtype(dt).itemsize)
    if vmem > VMEM_BUDGET:
        raise NotImplementedError(
            f"pallas lightning kernel would need ~{vmem / 2**20:.0f} MiB of VMEM, more than "
            f"{VMEM_BUDGET / 2**20:.0f} MiB (query heads per kv head={G}, head dims {Dk}x{Dv} padded to "
            f"{Dkp}x{Dvp}, chunk={C})"
        )
    q_k, k_k, v_k = to_kernel(q, Dkp), to_kernel(k, Dkp), to_kernel(v, Dvp)
    s0_k = jnp.pad(s0, [(0, 0), (0, 0), (0, Dkp - Dk), (0, Dvp - Dv)])
    slopes_k = slopes.astype(jnp.float32)
    s0_k, slopes_k = match_varying(s0_k, q_k), match_varying(slopes_k, q_k)
    tables = tuple(match_varying(t, q_k) for t in tables)
    # Mosaic's default scoped VMEM limit is 16 MiB on v5e: ask for what the blocks need, with headroom.
    vmem_limit = int(min(max(2 * vmem, 32 * 2**20), 64 * 2**20))
    options = _Options(scale=float(scale), chunk=C, group=G, varlen=cu_seqlens is not None,
                       vmem_limit_bytes=vmem_limit, interpret=interpret)
    o, final = _lightning(options, q_k, k_k, v_k, slopes_k, s0_k, tables)

    o = jnp.transpose(o[..., :Dv], (0, 2, 1, 3))  # [B, T', H, Dv]
    final = final[..., :Dk, :Dv]
    if cu_seqlens is None:
        o = o[:, :T]
        if reverse:
            o = jnp.flip(o, axis=1)
    else:
        o = o[:, token_slot]
        # An empty sequence owns no chunk: its final state is its initial state.
        seq_len = cu_seqlens[1:] - cu_seqlens[:-1]
        final = jnp.where((seq_len > 0)[:, None, None, None], final, s0)
    return o.astype(out_dtype), final

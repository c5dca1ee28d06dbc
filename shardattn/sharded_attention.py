"""Softmax attention on a device mesh: ring (contiguous or zigzag), all-gather, Ulysses; batch and heads.

Global arrays in and out, like `sharded_lightning`. The API layer checks and derives everything once on the
global arrays (scale, window, global q/kv positions, segment ids from cu_seqlens), shards the positions
and segment ids like q and k, and every device then calls a per-device backend (contract:
kernels/attention/reference.py) with global positions, so causal, window and segment masks are exact
whatever block of keys a device holds.

Strategies over the sequence axis (P shards, n = T / P queries and m = S / P keys per device):
- "ring": K/V blocks (with their positions and segment ids) travel round the ring by ppermute; each round
  the backend's `forward` attends the local queries to the held block and partials merge by log-sum-exp.
  The next block's ppermute is issued before the current block's compute, so the two can overlap. The
  backward (custom_vjp) rotates the blocks again with dK/dV accumulators travelling along, calling the
  backend's `backward` with the GLOBAL o and lse; dq accumulates locally and dK/dV arrive home after the
  last round. Sinks join once, after the merge. With a window the ring runs only the rounds it can reach.
- layout="zigzag" (causal load balance): 2P chunks of c = n / 2 tokens, device r holding chunks r and
  2P-1-r; the data arrive already in that order (`shardattn.meshes.to_zigzag`). Per round only the
  chunk pairs the causal mask leaves non-empty are computed: round 0 (own block) 3 pairs, every later
  round 2 (both local query chunks against the held block's early chunk when it comes from a lower rank,
  the late query chunk against the whole block otherwise): 2P + 1 chunk pairs on every device.
- "allgather": K/V (and positions, segment ids) all-gathered over the sequence axis, one local call; the
  gradient by autodiff, whose transpose of all_gather is a reduce-scatter of dK/dV.
- "ulysses": all_to_all from sequence- to head-sharded, a full-sequence call on H/P heads, and back.
Batch and head axes need no communication.

Kv heads that do not divide over the head axis (Hkv % heads-axis size != 0) are served when every
device's H / heads query heads read one kv head (G = H / Hkv divisible by them): k, v stay replicated
over the head axis and each device takes kv head (head rank * H / heads) // G with lax.axis_index
(Megatron's GQA rule); only that head enters the strategy (the ring rotates it alone; allgather and
ulysses all-gather it), and shard_map's transpose of the replicated k, v sums dK/dV over the head axis.

Dropout draws the unsharded call's mask under every sharding: each call gets dropout_offsets (q, kv,
batch, head) = the global indices of its first query, key, batch row and query head (axis_index of the
batch, head and sequence axes; ulysses adds its head group). Zigzag chunks are not one contiguous range
of token indices, so with dropout the ring splits each call at the chunk boundaries (up to 4 calls over
the same pairs), and allgather / ulysses put the gathered sequence back in the original order around
their call (a local permutation of the gathered k, v (and q, o for ulysses), positions, segment ids and
bias columns; allgather calls its two query chunks apart).
"""

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardattn.attention import _concrete, check_and_derive, flash_attention, merge_attention, run_backends
from shardattn.kernels.attention import get_backend
from shardattn.kernels.attention.options import AttentionOptions
from shardattn.meshes.specs import axis_size, resolve_axes
from shardattn.meshes.specs import place as place_on
from shardattn.meshes.zigzag import LAYOUTS, zigzag_order

STRATEGIES = ("auto", "ring", "allgather", "ulysses")

# strategy="auto" (a model, not a measurement; GPU numbers will move it):
# - "ulysses" when H and Hkv divide by P and there is no bias: per device it moves (P-1)/P of its q, k, v
#   and o once, a volume that does not grow with P, in 4 collectives, and the kernel then runs at full
#   sequence length (the best arithmetic intensity).
# - else "allgather" when the gathered K/V is small: at most AUTO_ALLGATHER_KV_TO_Q times the local q and
#   at most AUTO_ALLGATHER_MAX_BYTES (GQA/MQA with few kv heads, short S). One collective, exposed (not
#   overlapped), and P-fold K/V memory per device.
# - else "ring": the same bytes as the all-gather in P-1 steps, each hidden behind a block's compute, with
#   only two K/V blocks resident.
AUTO_ALLGATHER_KV_TO_Q = 2.0
AUTO_ALLGATHER_MAX_BYTES = 256 * 2**20


def choose_strategy(strategy, *, num_seq, H, Hkv, has_bias, q_bytes, kv_bytes):
    """The strategy that strategy="auto" runs. q_bytes / kv_bytes: local q and local k + v per device."""
    if strategy != "auto" or num_seq == 1:
        return strategy
    if H % num_seq == 0 and Hkv % num_seq == 0 and not has_bias:
        return "ulysses"
    gathered = num_seq * kv_bytes
    if gathered <= AUTO_ALLGATHER_KV_TO_Q * q_bytes and gathered <= AUTO_ALLGATHER_MAX_BYTES:
        return "allgather"
    return "ring"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static options of the per-device function (hashable: jit, shard_map and custom_vjp close over it)."""

    batch_axes: tuple[str, ...]
    seq_axis: str | None
    head_axis: str | None
    num_seq: int  # P
    strategy: str  # "local" (no sequence axis), "ring", "allgather", "ulysses"
    layout: str
    options: AttentionOptions
    implementations: tuple[str, ...]
    # Ring rounds and the initial shift: round t holds the block of rank (r + shift - t) mod P.
    rounds: int
    shift: int
    # The positions are the token indices (derived, T == S, same packing for q and kv), so that which
    # blocks the causal/window mask empties is known from the ranks alone (static skipping is exact).
    index_positions: bool
    dropout: bool
    static_positions: bool  # derived default positions, no cu_seqlens: rebuilt per device as numpy
    return_lse: bool  # return_residuals
    local_batch: int  # B per batch shard and H per head shard (the dropout mask's global indices)
    local_heads: int
    # k, v replicated over the head axis (Hkv does not divide by it): each device takes kv head
    # head_rank * local_heads // group, group = H // Hkv (divisible by local_heads).
    kv_replicated: bool
    group: int

    @property
    def zigzag_pairs(self) -> bool:
        """Zigzag layout, causal, index positions: compute only the non-empty chunk pairs."""
        return self.layout == "zigzag" and self.index_positions and self.options.causal

    @property
    def skip_blocks(self) -> bool:
        """Contiguous layout, index positions, causal or window: skip the blocks the mask empties."""
        masked = self.options.causal or self.options.window is not None
        return self.layout == "contiguous" and self.index_positions and masked


def _run(plan, function, *args, **kwargs):
    """The ring's halves, `function` = "forward" | "backward", of the first backend in
    plan.implementations that serves the call (run_backends does the same for "attention"). A backend
    without its own halves (reference, cudnn) serves through its differentiable `attention`."""
    reasons = []
    for name in plan.implementations:
        try:
            try:
                fn = get_backend(name, function)
            except NotImplementedError:
                fn = _HALVES_FROM_ATTENTION[function](get_backend(name, "attention"))
            return fn(*args, options=plan.options, **kwargs)
        except NotImplementedError as err:
            reasons.append(f"{name}: {err}")
    raise NotImplementedError(
        f"no softmax attention backend could serve {function!r} for strategy {plan.strategy!r}:\n  "
        + "\n  ".join(reasons)
    )


def _forward_from_attention(attention):
    return attention


def _backward_from_attention(attention):
    """backward(q, k, v, o, lse, do, dlse, **kw) of the contract from a differentiable `attention`.

    The block's own (o_b, lse_b) enter the global result as o = sum_b w_b o_b, lse = log sum_b exp(lse_b),
    w_b = exp(lse_b - lse); so the block's cotangents are do_b = w_b do and
    dlse_b = w_b (do . (o_b - o) + dlse), and its vjp gives dq, dk, dv, dbias (the block is recomputed,
    as a flash backward recomputes it anyway).
    """

    def backward(q, k, v, o, lse, do, dlse=None, *, bias=None, **kw):
        def block(q, k, v, bias):
            return attention(q, k, v, bias=bias, **kw)

        (o_b, lse_b), vjp = jax.vjp(block, q, k, v, bias)
        seen = jnp.isfinite(lse) & jnp.isfinite(lse_b)
        w = jnp.where(seen, jnp.exp(lse_b - jnp.where(seen, lse, 0.0)), 0.0)  # [b, h, n]
        do = do.astype(jnp.float32)
        row = jnp.einsum("bthd,bthd->bht", do, o_b.astype(jnp.float32) - o.astype(jnp.float32))
        dlse_b = w * (row + (0.0 if dlse is None else jnp.where(seen, dlse, 0.0)))
        do_b = (jnp.swapaxes(w, 1, 2)[..., None] * do).astype(o_b.dtype)
        dq, dk, dv, dbias = vjp((do_b, dlse_b))
        return dq, dk, dv, dbias, None

    return backward


_HALVES_FROM_ATTENTION = {"forward": _forward_from_attention, "backward": _backward_from_attention}


def _empty(q, v):
    """(o, lse) of a block with nothing allowed: o = 0 [b, n, h, Dv] float32, lse = -inf [b, h, n].
    zeros_like(q, ...) keeps q's varying mesh axes (check_vma), as lax.cond branches must agree."""
    b, n, h, _ = q.shape
    o = jnp.zeros_like(q, shape=(b, n, h, v.shape[-1]), dtype=jnp.float32)
    lse = jnp.full_like(q, -jnp.inf, shape=(b, h, n), dtype=jnp.float32)
    return o, lse


# ----------------------------------------------------------------------------------------------------
# The ring. Local shapes: q [b, n, h, Dk], k [b, m, hkv, Dk], v [b, m, hkv, Dv], q_pos [b, n],
# kv_pos [b, m], segment ids like the positions or None, bias [Bb, Hb, n, S] or None (rows sharded like
# q, all S columns: each round slices the columns of the block it holds).


def _rotate(plan, x, shift=1):
    """ppermute over the sequence axis: rank j sends x to rank j + shift (mod P)."""
    num = plan.num_seq
    perm = [(j, (j + shift) % num) for j in range(num)]
    return jax.tree.map(lambda a: jax.lax.ppermute(a, plan.seq_axis, perm), x)


def _block_nonempty(plan, rank, src, n):
    """Whether the contiguous block pair (query rank, key rank src) has an allowed entry (index positions).

    j - i over the block takes every integer in [(src - rank) n - (n - 1), (src - rank) n + n - 1]; the
    mask allows j - i in [-left, right] (right = 0 under causal)."""
    opts = plan.options
    left, right = (None, None) if opts.window is None else opts.window
    if opts.causal:
        right = 0 if right is None else min(right, 0)
    d = (src - rank) * n
    ok = jnp.bool_(True)
    if left is not None:
        ok &= d + n - 1 >= -left
    if right is not None:
        ok &= d - (n - 1) <= right
    return ok


def _bias_cols(bias, start, size):
    return None if bias is None else jax.lax.dynamic_slice_in_dim(bias, start, size, axis=3)


def _dropout_base(plan):
    """(batch offset, head offset) int32 of this device's first local batch row and query head: the
    dropout mask hashes global batch and head indices (ulysses adds its own split of the heads)."""
    b_off = h_off = jnp.int32(0)
    if plan.batch_axes:
        b_off = jax.lax.axis_index(plan.batch_axes) * plan.local_batch
    if plan.head_axis is not None:
        h_off = jax.lax.axis_index(plan.head_axis) * plan.local_heads
    return b_off, h_off


def _offsets(plan, q_start, kv_start, head_start=0):
    """dropout_offsets (q, kv, batch, head) of a call whose first query / key has global token index
    q_start / kv_start; None without dropout."""
    if not plan.dropout:
        return None
    b_off, h_off = _dropout_base(plan)
    return jnp.int32(q_start), jnp.int32(kv_start), b_off, h_off + head_start


def _pieces(plan, rows, cols, n, m, rank, src):
    """The calls serving local query rows [r0, r1) against columns [c0, c1) of the block of rank src:
    [((r0, r1), (c0, c1), dropout_offsets)]. One call, except with dropout in the zigzag layout: there
    the rows (chunks rank and 2P-1-rank) and the columns (chunks src and 2P-1-src) are not one
    contiguous range of global token indices, which dropout_offsets describe, so the call is split at
    the chunk boundaries (up to 4 calls over the same pairs)."""
    if not plan.dropout:
        return [(rows, cols, None)]
    if plan.layout == "contiguous":
        return [(rows, cols, _offsets(plan, rank * n + rows[0], src * m + cols[0]))]

    def split(span, size, owner):  # [(start, stop, global index of start)] per chunk within span
        half, last = size // 2, 2 * plan.num_seq - 1
        out = []
        for a, b, first in ((0, half, owner * half), (half, size, (last - owner) * half)):
            lo, hi = max(a, span[0]), min(b, span[1])
            if lo < hi:
                out.append((lo, hi, first + lo - a))
        return out

    return [
        ((r0, r1), (c0, c1), _offsets(plan, gq, gk))
        for r0, r1, gq in split(rows, n, rank)
        for c0, c1, gk in split(cols, m, src)
    ]


def _ring_rounds(plan, blk0):
    """Yields (t, src, block) for each round; issues the next block's ppermute before yielding the
    current one, so that the transfer is in flight during the round's compute."""
    rank = jax.lax.axis_index(plan.seq_axis)
    blk = _rotate(plan, blk0, -plan.shift) if plan.shift % plan.num_seq else blk0
    for t in range(plan.rounds):
        nxt = _rotate(plan, blk) if t + 1 < plan.rounds else None
        yield t, (rank + plan.shift - t) % plan.num_seq, blk
        blk = nxt


def _pad(x, before, after, axis, value=0.0):
    """x with `before` / `after` entries of `value` added along `axis` (a partial as full rows)."""
    if not before and not after:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (before, after)
    return jnp.pad(x, pad, constant_values=value)


def _block_forward(plan, q, blk, bias, q_pos, q_seg, rng, rows, cols, rank, src):
    """(o [b, n, h, Dv] float32, lse [b, h, n]) of local query rows [rows) against columns [cols) of the
    held block (of rank src) as full rows: the other rows get the empty partial (0, -inf).
    bias: [Bb, Hb, n, m], the block's columns."""
    bk, bv, bpos, bseg = blk
    n, m = q.shape[1], bk.shape[1]
    o = lse = None
    for (r0, r1), (c0, c1), offsets in _pieces(plan, rows, cols, n, m, rank, src):
        o_t, lse_t = _run(
            plan, "forward", q[:, r0:r1], bk[:, c0:c1], bv[:, c0:c1],
            bias=None if bias is None else bias[:, :, r0:r1, c0:c1],
            q_positions=q_pos[:, r0:r1], kv_positions=bpos[:, c0:c1],
            q_segment_ids=None if q_seg is None else q_seg[:, r0:r1],
            kv_segment_ids=None if bseg is None else bseg[:, c0:c1], dropout_rng=rng,
            dropout_offsets=offsets,
        )  # fmt: skip
        o_t = _pad(o_t.astype(jnp.float32), r0, n - r1, 1)
        lse_t = _pad(lse_t, r0, n - r1, 2, -jnp.inf)
        o, lse = (o_t, lse_t) if o is None else merge_attention(o, lse, o_t, lse_t)
    return o, lse


def _ring_forward(plan, q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, rng):
    """o [b, n, h, Dv] float32, lse [b, h, n] (no sinks) and the number of key blocks computed (int32;
    zigzag: chunk pairs)."""
    if plan.zigzag_pairs:
        return _zigzag_forward(plan, q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, rng)
    n, m = q.shape[1], k.shape[1]
    rank = jax.lax.axis_index(plan.seq_axis)
    o, lse = _empty(q, v)
    count = jnp.int32(0)
    for _, src, blk in _ring_rounds(plan, (k, v, kv_pos, kv_seg)):

        def compute(blk=blk, src=src):
            return _block_forward(plan, q, blk, _bias_cols(bias, src * m, m), q_pos, q_seg, rng, (0, n),
                                  (0, m), rank, src)  # fmt: skip

        if plan.skip_blocks:
            # A block the mask empties (causal: a later rank; window: out of reach) is skipped.
            nonempty = _block_nonempty(plan, rank, src, n)
            o_t, lse_t = jax.lax.cond(nonempty, compute, lambda: _empty(q, v))
            count += nonempty.astype(jnp.int32)
        else:
            o_t, lse_t = compute()
            count += 1
        o, lse = merge_attention(o, lse, o_t, lse_t)
    return o, lse, count


def _zigzag_forward(plan, q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, rng):
    # Local rows: chunk r (first c) then chunk 2P-1-r; a held block of rank s: chunk s, chunk 2P-1-s.
    n, m = q.shape[1], k.shape[1]
    c = n // 2
    rank = jax.lax.axis_index(plan.seq_axis)
    rows_all, rows_late = (0, n), (c, n)
    cols_all, cols_early, cols_late = (0, m), (0, m // 2), (m // 2, m)

    def fwd(rows, cols, blk, src):
        return _block_forward(plan, q, blk, _bias_cols(bias, src * m, m), q_pos, q_seg, rng, rows, cols,
                              rank, src)  # fmt: skip

    o, lse = _empty(q, v)
    count = jnp.int32(0)
    for t, src, blk in _ring_rounds(plan, (k, v, kv_pos, kv_seg)):
        if t == 0:  # own block: (r, r) and (2P-1-r, r) in one call, (2P-1-r, 2P-1-r) in another
            parts = [fwd(rows_all, cols_early, blk, src), fwd(rows_late, cols_late, blk, src)]
            count += 3
        else:  # lower rank: both query chunks x its early chunk; higher rank: late chunk x whole block
            parts = [
                jax.lax.cond(
                    src < rank,
                    lambda blk=blk, src=src: fwd(rows_all, cols_early, blk, src),
                    lambda blk=blk, src=src: fwd(rows_late, cols_all, blk, src),
                )
            ]
            count += 2
        for o_t, lse_t in parts:
            o, lse = merge_attention(o, lse, o_t, lse_t)
    return o, lse, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(plan, q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, rng):
    o, lse, _ = _ring_forward(plan, q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, rng)
    return o, lse


def _ring_fwd(plan, q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, rng):
    o, lse, _ = _ring_forward(plan, q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, rng)
    # o is kept in q's dtype, like the single-device backends keep it for their backward.
    return (o, lse), (q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, rng, o.astype(q.dtype), lse)


def _ring_bwd(plan, residuals, cotangents):
    q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, rng, o, lse = residuals
    do, dlse = cotangents
    do = do.astype(q.dtype)
    # The barrier (tied to the cotangent) makes the backward's rotations new values: without it XLA
    # merges them with the forward's identical ppermutes (CSE) and keeps all P rotated K/V blocks alive
    # from the forward to the backward, the memory of an all-gather, which the ring exists to avoid.
    k, v, kv_pos, kv_seg, do = jax.lax.optimization_barrier((k, v, kv_pos, kv_seg, do))
    n, m = q.shape[1], k.shape[1]
    rank = jax.lax.axis_index(plan.seq_axis)

    def bwd(rows, cols, blk, src):
        """dq [b, n], dk, dv [b, m] and dbias [Bb, Hb, n, m] of (query rows) x (block columns), as
        zero-padded full-size float32 arrays so that every branch returns the same shapes."""
        bk, bv, bpos, bseg = blk
        bias_b = _bias_cols(bias, src * m, m)
        total = None
        for (r0, r1), (c0, c1), offsets in _pieces(plan, rows, cols, n, m, rank, src):
            dq, dk, dv, dbias, _ = _run(
                plan, "backward", q[:, r0:r1], bk[:, c0:c1], bv[:, c0:c1], o[:, r0:r1], lse[:, :, r0:r1],
                do[:, r0:r1], dlse[:, :, r0:r1],
                bias=None if bias is None else bias_b[:, :, r0:r1, c0:c1],
                q_positions=q_pos[:, r0:r1], kv_positions=bpos[:, c0:c1],
                q_segment_ids=None if q_seg is None else q_seg[:, r0:r1],
                kv_segment_ids=None if bseg is None else bseg[:, c0:c1], dropout_rng=rng,
                dropout_offsets=offsets,
            )  # fmt: skip
            f32 = jnp.float32
            part = (
                _pad(dq.astype(f32), r0, n - r1, 1),
                _pad(dk.astype(f32), c0, m - c1, 1),
                _pad(dv.astype(f32), c0, m - c1, 1),
                None if dbias is None else _pad(_pad(dbias.astype(f32), r0, n - r1, 2), c0, m - c1, 3),
            )
            total = part if total is None else jax.tree.map(jnp.add, total, part)
        return total

    def no_work(blk):
        bk, bv = blk[0], blk[1]
        zb = None if bias is None else jnp.zeros_like(bias, shape=bias.shape[:3] + (m,), dtype=jnp.float32)
        return (
            jnp.zeros_like(q, dtype=jnp.float32),
            jnp.zeros_like(bk, dtype=jnp.float32),
            jnp.zeros_like(bv, dtype=jnp.float32),
            zb,
        )

    dq = jnp.zeros_like(q, dtype=jnp.float32)
    dbias = None if bias is None else jnp.zeros_like(bias, dtype=jnp.float32)
    acc = None  # (dk, dv) of the held block, travelling with it
    rows_all, rows_late = (0, n), (n // 2, n)
    cols_all, cols_early, cols_late = (0, m), (0, m // 2), (m // 2, m)
    for t, src, blk in _ring_rounds(plan, (k, v, kv_pos, kv_seg)):
        if acc is not None:  # the previous block's accumulators follow it to this round's holder
            acc = _rotate(plan, acc)
        if plan.zigzag_pairs:
            if t == 0:
                parts = [bwd(rows_all, cols_early, blk, src), bwd(rows_late, cols_late, blk, src)]
            else:
                parts = [
                    jax.lax.cond(
                        src < rank,
                        lambda blk=blk, src=src: bwd(rows_all, cols_early, blk, src),
                        lambda blk=blk, src=src: bwd(rows_late, cols_all, blk, src),
                    )
                ]
        elif plan.skip_blocks:
            parts = [
                jax.lax.cond(
                    _block_nonempty(plan, rank, src, n),
                    lambda blk=blk, src=src: bwd(rows_all, cols_all, blk, src),
                    lambda blk=blk: no_work(blk),
                )
            ]
        else:
            parts = [bwd(rows_all, cols_all, blk, src)]
        dk_t = sum(p[1] for p in parts)
        dv_t = sum(p[2] for p in parts)
        dq = dq + sum(p[0] for p in parts)
        if bias is not None:
            cols = jax.lax.dynamic_slice_in_dim(dbias, src * m, m, axis=3) + sum(p[3] for p in parts)
            dbias = jax.lax.dynamic_update_slice_in_dim(dbias, cols, src * m, axis=3)
        acc = (dk_t, dv_t) if acc is None else (acc[0] + dk_t, acc[1] + dv_t)
    # Home: after round R-1 the accumulators of rank s's block sit on rank s - shift + R - 1.
    home = -(plan.rounds - 1 - plan.shift) % plan.num_seq
    if home:
        acc = _rotate(plan, acc, home)
    dk, dv = acc
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, None, None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _add_sinks(o, lse, sinks):
    """Sinks [h, n] join the denominator once, after the ring's merge: a partial with no value."""
    if sinks is None:
        return o, lse
    lse_s = jax.nn.logsumexp(sinks.astype(jnp.float32), axis=-1)  # [h]
    lse_s = jnp.broadcast_to(lse_s[None, :, None], lse.shape)
    return merge_attention(o, lse, jnp.zeros_like(o), lse_s)


# ----------------------------------------------------------------------------------------------------
# Per-device function (inside shard_map).


def _static_positions(plan, b, T, S, layout=None):
    """The default positions of a whole [b, T] / [b, S] sequence in the layout's order (or `layout`'s), as
    numpy: a backend then sees at trace time that they are the defaults (cudnn serves causal only then),
    as it does under flash_attention. Only where a device holds every query or key (local, ulysses, the
    gathered keys of allgather) and the positions were derived without cu_seqlens."""
    q_pos = np.arange(S - T, S, dtype=np.int32)
    kv_pos = np.arange(S, dtype=np.int32)
    if (layout or plan.layout) == "zigzag":
        order = zigzag_order(plan.num_seq)
        q_pos, kv_pos = (x.reshape(2 * plan.num_seq, -1)[order].reshape(-1) for x in (q_pos, kv_pos))
    return np.broadcast_to(q_pos, (b, T)), np.broadcast_to(kv_pos, (b, S))


def _chunks_reordered(x, num_seq, axis, *, to_original):
    """x's whole-sequence `axis` (2P chunks) from the zigzag order to the original one (to_original), or
    back: a local permutation, no communication."""
    if x is None:
        return None
    order = zigzag_order(num_seq)
    if to_original:
        order = np.argsort(order)
    L = x.shape[axis]
    chunks = x.reshape(*x.shape[:axis], 2 * num_seq, L // (2 * num_seq), *x.shape[axis + 1 :])
    return jnp.take(chunks, jnp.asarray(order), axis=axis).reshape(x.shape)


def _per_device(plan, q, k, v, q_pos, kv_pos, q_seg, kv_seg, bias, sinks, rng):
    """(o, lse) with plan.return_lse, else o (lse is then not asked of the backend: cudnn serves
    o alone)."""
    if plan.kv_replicated:
        # k, v arrive with every kv head (replicated over the head axis) and this device's query heads all
        # read one of them (Megatron's GQA rule): take it. Only that head enters the strategies below (the
        # ring rotates it alone); its gradient, zero for the other heads, is summed over the head axis by
        # shard_map's transpose of the replicated input.
        g = jax.lax.axis_index(plan.head_axis) * plan.local_heads // plan.group
        k, v = (jax.lax.dynamic_slice_in_dim(x, g, 1, axis=2) for x in (k, v))

    def attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bias=bias, q_offset=0, head_offset=0):
        return run_backends(
            plan.implementations, q, k, v, return_lse=plan.return_lse, options=plan.options, bias=bias,
            sinks=sinks,
            q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
            dropout_rng=rng, dropout_offsets=_offsets(plan, q_offset, 0, head_offset),
        )  # fmt: skip

    if plan.strategy == "local":
        if plan.static_positions:
            q_pos, kv_pos = _static_positions(plan, q.shape[0], q.shape[1], k.shape[1])
        return _outputs(plan, *attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg))
    axis = plan.seq_axis

    def gather(x):  # [b, n, ...] -> [b, T, ...], in mesh order (the layout's order)
        return None if x is None else jax.lax.all_gather(x, axis, axis=1, tiled=True)

    num = plan.num_seq
    rank = jax.lax.axis_index(axis)
    b, n, m = q.shape[0], q.shape[1], k.shape[1]
    # Dropout in the zigzag layout: the mask takes each call's token indices as one contiguous range
    # (dropout_offsets), so whole sequences are put back in the original order around the call.
    unzigzag = plan.dropout and plan.layout == "zigzag"

    def original(x, axis=1):
        return _chunks_reordered(x, num, axis, to_original=True) if unzigzag else x

    def gathered_positions(q_too):
        if plan.static_positions:
            return _static_positions(plan, b, num * n, num * m, "contiguous" if unzigzag else None)
        return (original(gather(q_pos)) if q_too else None), original(gather(kv_pos))

    if plan.strategy == "allgather":
        kv_all = gathered_positions(q_too=False)[1]
        k_all, v_all, kv_seg_all = (original(gather(x)) for x in (k, v, kv_seg))
        if not unzigzag:
            o, lse = attend(q, k_all, v_all, q_pos, kv_all, q_seg, kv_seg_all, q_offset=rank * n)
            return _outputs(plan, o, lse)
        # Keys in the original order; the two local query chunks (r and 2P-1-r) called apart.
        bias = original(bias, 3)
        c = n // 2
        parts = [
            attend(q[:, lo:hi], k_all, v_all, q_pos[:, lo:hi], kv_all,
                   None if q_seg is None else q_seg[:, lo:hi], kv_seg_all,
                   bias=None if bias is None else bias[:, :, lo:hi], q_offset=first)
            for lo, hi, first in ((0, c, rank * c), (c, n, (2 * num - 1 - rank) * c))
        ]  # fmt: skip
        o = jnp.concatenate([p[0] for p in parts], axis=1)
        lse = None if parts[0][1] is None else jnp.concatenate([p[1] for p in parts], axis=2)
        return _outputs(plan, o, lse)
    if plan.strategy == "ulysses":
        # [b, n, h, D] -> [b, T, h/P, D]: heads split over the sequence axis, the sequence gathered; the
        # gathered positions say where each token really is (zigzag or not). Rank s of the sequence axis
        # takes the s-th of P head groups (tiled all_to_all), hence its dropout head offset.
        def to_heads(x):
            return jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)

        # A replicated kv head is the one kv head of every query head here: gathered, not split.
        kv_heads = gather if plan.kv_replicated else to_heads
        q_all, kv_all = gathered_positions(q_too=True)
        qh, kh, vh = original(to_heads(q)), original(kv_heads(k)), original(kv_heads(v))
        if unzigzag and bias is not None:
            bias = original(original(bias, 2), 3)
        o, lse = attend(qh, kh, vh, q_all, kv_all, original(gather(q_seg)), original(gather(kv_seg)),
                        bias=bias, head_offset=rank * (q.shape[2] // num))  # fmt: skip
        if unzigzag:  # back to the layout's order
            o = _chunks_reordered(o, num, 1, to_original=False)
            lse = None if lse is None else _chunks_reordered(lse, num, 2, to_original=False)
        o = jax.lax.all_to_all(o, axis, split_axis=1, concat_axis=2, tiled=True)  # [b, n, h, Dv]
        if plan.return_lse:
            lse = jax.lax.all_to_all(lse, axis, split_axis=2, concat_axis=1, tiled=True)  # [b, h, n]
        return _outputs(plan, o, lse)
    # ring
    o, lse = _ring(plan, q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, rng)
    o, lse = _add_sinks(o, lse, sinks)
    return _outputs(plan, o.astype(q.dtype), lse)


def _outputs(plan, o, lse):
    return (o, lse) if plan.return_lse else o


@functools.lru_cache(maxsize=256)
def _build(mesh, plan, in_specs, out_specs, present):
    """The jitted shard_map of one configuration, cached (eager calls would otherwise retrace).
    present: which of the optional inputs (q_seg, kv_seg, bias, sinks, rng) are given."""

    def per_device(q, k, v, q_pos, kv_pos, *rest):
        rest = iter(rest)
        optional = [next(rest) if given else None for given in present]
        return _per_device(plan, q, k, v, q_pos, kv_pos, *optional)

    # Manual over the axes that split data only (every output is sharded over all of them, so each
    # replicated input's cotangent is the psum of distinct per-device parts); other axes stay Auto.
    used = {*plan.batch_axes, plan.seq_axis, plan.head_axis} - {None}
    manual = frozenset(used or mesh.axis_names)
    # check_vma=False: the xla backend's loop carries start from jnp.zeros / jnp.full, which
    # varying-axes checking refuses inside shard_map ("manual axis types do not match"). With the
    # checker off, the psums of replicated inputs' cotangents (bias, sinks) come from shard_map's
    # transpose, over the manual axes above (tested: every gradient against the reference). Turning it
    # on needs those carries built with zeros_like(q, ...), and the bias pcast to q's varying axes before
    # the ring's custom_vjp (whose cotangents must vary like its inputs).
    return jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=in_specs,
            out_specs=out_specs,
            axis_names=manual,
            check_vma=False,
        )  # fmt: skip
    )


def _entry(names):
    names = tuple(n for n in names if n is not None)
    return None if not names else names[0] if len(names) == 1 else names


def _ring_schedule(options, layout, *, num_seq, T, index_positions):
    """(rounds, shift) of the ring: every rank's block once, or with a window only the ranks it reaches
    (contiguous layout, index positions): d = src - rank in [-a, b], a = ceil(left / n), b = ceil(right /
    n) (0 under causal), run from d = b down to d = -a after an initial shift of b."""
    if not index_positions or layout != "contiguous" or options.window is None:
        return num_seq, 0
    n = T // num_seq
    left, right = options.window
    a = -(-left // n)
    b = 0 if options.causal else -(-right // n)
    if a + b + 1 >= num_seq:
        return num_seq, 0
    return a + b + 1, b


def sharded_attention(
    q,
    k,
    v,
    *,
    mesh: Mesh,
    batch_axis=None,
    seq_axis=None,
    head_axis=None,
    strategy: str = "auto",
    layout: str = "contiguous",
    **kwargs,
):
    """Softmax attention on `mesh`: batch-, head- and sequence-parallel, on global arrays.

    q: [B, T, H, Dk], k: [B, S, Hkv, Dk], v: [B, S, Hkv, Dv]; every keyword of `shardattn.flash_attention`
    (same meaning; positions and segment ids are global). Returns o [B, T, H, Dv] sharded like q (and
    with return_residuals=True also lse [B, H, T] float32). Eager, under jax.jit and jax.grad, with Auto
    or Explicit meshes. Axis names as in `sharded_lightning`.

    strategy: "ring" | "allgather" | "ulysses" | "auto" (see the module docstring; with no sequence axis
    every strategy is the plain per-device call). layout: "contiguous" | "zigzag" (the data are already
    in zigzag order, see `shardattn.meshes.to_zigzag`; default positions are then the zigzag-permuted
    global positions, and user-given positions / segment ids / bias must be reordered the same way).
    bias [Bb, Hb, T, S]: rows (T) sharded like q, all S columns on every device (ulysses: whole, heads
    split); its gradient is exact. num_kv_heads must divide by the head axis, or each device's query
    heads must share one kv head (then k, v stay replicated over the head axis; see the module
    docstring). Dropout works under every strategy, layout and sharding (the unsharded call's mask).

    >>> mesh = shardattn.meshes.make_mesh(seq=8)
    >>> o = sharded_attention(q, k, v, mesh=mesh, causal=True, strategy="ring")
    """
    d = _check_and_derive(q, k, v, **kwargs)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    if d.packed and batch_axis is None:
        batch_axis = ()  # cu_seqlens: batch 1, and the default "data" axis would not divide it
    axes = resolve_axes(mesh, batch_axis, seq_axis, head_axis)
    # Size-1 axes shard nothing; dropping them keeps the specs and the varying axes to real splits.
    axes = axes._replace(
        batch=tuple(n for n in axes.batch if mesh.shape[n] > 1),
        seq=axes.seq if axes.seq and mesh.shape[axes.seq] > 1 else None,
        heads=axes.heads if axes.heads and mesh.shape[axes.heads] > 1 else None,
    )
    B, T, H, Dk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    num_batch, num_seq, num_heads = (axis_size(mesh, x) for x in axes)
    chunks = 2 * num_seq if layout == "zigzag" else num_seq
    for what, size, shards, name in (
        ("batch (q, k, v)", B, num_batch, _entry(axes.batch)),
        ("seq (q)", T, chunks, axes.seq),
        ("seq (k, v)", S, chunks, axes.seq),
        ("num_heads (q)", H, num_heads, axes.heads),
    ):
        if size % shards:
            times = "2 x " if layout == "zigzag" and what.startswith("seq") else ""
            raise ValueError(
                f"{what}={size} must be divisible by {times}the size of mesh axis {name!r}, {shards} "
                "(pass that role's axis argument as () to leave it unsharded)"
            )
    hl = H // num_heads
    # kv heads that do not divide over the head axis: served when each device's hl query heads all read
    # one kv head (group G = H / Hkv divisible by hl); k, v then stay replicated over the head axis.
    kv_replicated = Hkv % num_heads != 0
    if kv_replicated and (H // Hkv) % hl:
        raise ValueError(
            f"num_kv_heads (k, v)={Hkv} must be divisible by the size of mesh axis {axes.heads!r}, "
            f"{num_heads}, or each device's num_heads / {num_heads} = {hl} query heads must share one kv "
            f"head (num_heads / num_kv_heads = {H // Hkv} divisible by {hl})"
        )
    hkvl = 1 if kv_replicated else Hkv // num_heads
    itemsize = jnp.dtype(q.dtype).itemsize
    local_q = (B // num_batch) * (T // num_seq) * hl * Dk * itemsize
    local_kv = (B // num_batch) * (S // num_seq) * hkvl * (Dk + Dv) * itemsize
    strategy = choose_strategy(
        strategy, num_seq=num_seq, H=hl, Hkv=hkvl, has_bias=d.bias is not None, q_bytes=local_q,
        kv_bytes=local_kv,
    )  # fmt: skip
    if num_seq == 1:
        strategy = "local"
    if strategy == "ulysses":
        # A replicated kv head is gathered over the sequence axis (every query head of the device reads
        # it), not split: only the query heads need to divide then.
        if hl % num_seq or (not kv_replicated and hkvl % num_seq):
            kv = " (k, v replicated over the head axis: query heads only)" if kv_replicated else ""
            raise ValueError(
                f"strategy='ulysses' needs the heads per device, num_heads={hl} and num_kv_heads={hkvl}, "
                f"divisible by the size of the sequence axis {axes.seq!r}, {num_seq}{kv}"
            )

    q_pos, kv_pos = d.q_positions, d.kv_positions
    if layout == "zigzag" and d.derived_positions:
        # The data arrive in zigzag order: their positions are the zigzag-permuted global positions.
        q_pos, kv_pos = (_zigzag(x, num_seq) for x in (q_pos, kv_pos))
    q_seg, kv_seg = d.q_segment_ids, d.kv_segment_ids
    if layout == "zigzag" and d.packed:  # segment ids derived from cu_seqlens (original order)
        q_seg, kv_seg = (_zigzag(x, num_seq) for x in (q_seg, kv_seg))

    index_positions = d.derived_positions and T == S and d.same_packing
    rounds, shift = _ring_schedule(d.options, layout, num_seq=num_seq, T=T, index_positions=index_positions)
    plan = _Plan(
        batch_axes=axes.batch, seq_axis=axes.seq, head_axis=axes.heads, num_seq=num_seq, strategy=strategy,
        layout=layout, options=d.options, implementations=d.implementations, rounds=rounds, shift=shift,
        index_positions=index_positions, dropout=d.options.dropout_rate > 0,
        static_positions=d.derived_positions and not d.packed, return_lse=d.return_residuals,
        local_batch=B // num_batch, local_heads=hl, kv_replicated=kv_replicated, group=H // Hkv,
    )  # fmt: skip

    bt = _entry(axes.batch)
    spec_q = P(bt, axes.seq, axes.heads, None)
    spec_pos = P(bt, axes.seq)
    heads_entry = _entry((axes.heads, axes.seq)) if strategy == "ulysses" else axes.heads
    spec_kv = P(bt, axes.seq, None, None) if kv_replicated else spec_q
    specs = [spec_q, spec_kv, spec_kv, spec_pos, spec_pos]
    args = [q, k, v, q_pos, kv_pos]
    present = []
    optional = [(q_seg, spec_pos), (kv_seg, spec_pos)]
    if d.bias is not None:
        Bb, Hb = d.bias.shape[:2]
        bias_b = bt if Bb == B and Bb > 1 else None
        bias_h = heads_entry if Hb == H and Hb > 1 else None
        optional.append(
            (
                d.bias,
                P(bias_b, bias_h, None, None) if strategy == "ulysses" else P(bias_b, bias_h, axes.seq, None),
            )
        )
    else:
        optional.append((None, None))
    optional.append((d.sinks, P(heads_entry, None)))
    optional.append((d.dropout_rng, P()))
    for x, spec in optional:
        present.append(x is not None)
        if x is not None:
            args.append(x)
            specs.append(spec)

    def place(x, spec):
        return place_on(x, NamedSharding(mesh, spec))

    args = [place(x, spec) for x, spec in zip(args, specs, strict=True)]
    spec_o, spec_lse = P(bt, axes.seq, axes.heads, None), P(bt, axes.heads, axes.seq)
    out_specs = (spec_o, spec_lse) if plan.return_lse else spec_o
    return _build(mesh, plan, tuple(specs), out_specs, tuple(present))(*args)


def _zigzag(x, num_seq):
    """[B, T] in zigzag order (see meshes/zigzag.py)."""
    B, T = x.shape
    order = jnp.asarray(zigzag_order(num_seq))
    return jnp.take(x.reshape(B, 2 * num_seq, T // (2 * num_seq)), order, axis=1).reshape(B, T)


# ----------------------------------------------------------------------------------------------------
# Argument checks and derived values: flash_attention's own (shardattn.attention.check_and_derive), on the
# global arrays, plus what the sharding needs to know about them.

_FLASH_KEYWORDS = {
    name: p.default
    for name, p in inspect.signature(flash_attention).parameters.items()
    if p.kind == inspect.Parameter.KEYWORD_ONLY
}


@dataclasses.dataclass(frozen=True)
class _Derived:
    options: AttentionOptions
    implementations: tuple[str, ...]
    q_positions: jax.Array  # [B, T] int32, global
    kv_positions: jax.Array  # [B, S] int32
    q_segment_ids: jax.Array | None  # [B, T] int32
    kv_segment_ids: jax.Array | None  # [B, S] int32
    bias: jax.Array | None  # [Bb, Hb, T, S]
    sinks: jax.Array | None  # [H, n] float32
    dropout_rng: object
    return_residuals: bool
    derived_positions: bool  # positions not given: derived from the token indices (and cu_seqlens)
    packed: bool  # cu_seqlens given
    same_packing: bool  # q and kv packed alike (no cu_seqlens, or equal concrete cu_seqlens)


def _check_and_derive(q, k, v, **kwargs) -> _Derived:
    unknown = sorted(set(kwargs) - set(_FLASH_KEYWORDS))
    if unknown:
        raise TypeError(f"sharded_attention got unexpected keyword arguments {unknown}")
    kw = {**_FLASH_KEYWORDS, **kwargs}
    return_residuals = kw.pop("return_residuals")
    if not isinstance(return_residuals, bool):
        raise TypeError(f"return_residuals must be a bool, got {return_residuals!r}")
    keywords, implementations = check_and_derive(q, k, v, **kw)
    packed = kw["cu_seqlens_q"] is not None
    same_packing = True
    if packed:
        cq, ck = (_concrete(kw[n]) for n in ("cu_seqlens_q", "cu_seqlens_k"))
        same_packing = cq is not None and ck is not None and np.array_equal(cq, ck)
    return _Derived(
        options=keywords["options"],
        implementations=implementations,
        q_positions=jnp.asarray(keywords["q_positions"], jnp.int32),
        kv_positions=jnp.asarray(keywords["kv_positions"], jnp.int32),
        q_segment_ids=keywords["q_segment_ids"],
        kv_segment_ids=keywords["kv_segment_ids"],
        bias=keywords["bias"],
        sinks=keywords["sinks"],
        dropout_rng=keywords["dropout_rng"],
        return_residuals=return_residuals,
        derived_positions=kw["q_positions"] is None and kw["kv_positions"] is None,
        packed=packed,
        same_packing=same_packing,
    )

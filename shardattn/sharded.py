"""Lightning attention on a device mesh: batch-, head- and sequence-parallel, one global-view function.

Batch and head shards need no communication. Sequence shards (docs/design.md, "Sequence
parallelism: the state scan") need the state S_in(r) entering shard r: an exclusive scan across the
sequence axis of the pairs (a_r, S_loc(r)), a_r = lam^n (n tokens per shard) and S_loc(r) the shard's
own final state from zero, under

    (a1, S1) o (a2, S2) = (a1 a2, a2 S1 + S2).

Without packed sequences the work is ordered states first (`sequence_shard`): S_loc from k and v alone
(the backend's `local_state`), the scan, then the backend once from S_in, so the kernel itself adds
scale * lam^(i+1) q_i S_in and no pass over q and o is added. The backward pass is the mirror image:
the state gradient from q and dO (`state_gradient`), the scan in the opposite direction, one backend
backward. With packed sequences a shard runs the backend from zero and adds that term to the tokens
before its first sequence start afterwards.

Only the [b, h, Dk, Dv] states (and, with packed sequences, [h] decays) move between devices; q, k, v
and o never do. Every gradient (q, k, v, initial_state, slopes) is exact.

Three scans, all exact:
- "ring": P-1 rounds of ppermute of the state to the next shard (LASP).
- "tree": ceil(log2 P) rounds of ppermute of (a, S) pairs, Hillis-Steele, carrying an exclusive and an
  inclusive prefix so that no extra shift round is needed.
- "allgather": one all_gather of (a, S) and a decay-weighted prefix sum on every shard (LASP-2 with decay).

Non-finite values travel only forward: every masked term of the scans and corrections is selected away
(`where`), never multiplied by 0. A length T that the sequence axis does not divide is padded with zero
tokens processed last (`_pad_sequence`), and the final state is then computed over the real tokens.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardattn.kernels.lightning.xla import weighted_state
from shardattn.lightning import check_and_derive, forward_mode_error, is_forward_mode_refusal, run_backends
from shardattn.meshes.specs import axis_size, check_axes_used, resolve_axes
from shardattn.meshes.specs import place as place_on
from shardattn.meshes.zigzag import LAYOUTS

SCANS = ("auto", "ring", "tree", "allgather")

# scan="auto" picks "allgather" up to this many sequence shards, "tree" above. Why: allgather is one
# collective (one latency, bandwidth-optimal on NVLink/ICI) and its local prefix sum over P states is
# negligible next to the attention itself, but it holds and receives P states per device; tree needs
# ceil(log2 P) dependent rounds yet moves only log2(P) states per device. Up to one NVLink node (8
# GPUs) or a small ICI ring, one collective wins; beyond that the P-fold memory/volume starts to
# matter and latency grows only logarithmically with tree. Ring (P-1 dependent rounds) is never
# chosen automatically: it is the LASP baseline, kept for comparison. GPU/TPU measurements will move
# this threshold (and may make it depend on the state size).
AUTO_ALLGATHER_MAX_SHARDS = 8
# ... and allgather only while the gathered states stay small per device (bytes).
AUTO_ALLGATHER_MAX_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static options of the per-device function (hashable, so jit/shard_map can close over it)."""

    batch_axes: tuple[str, ...]
    seq_axis: str | None
    head_axis: str | None
    num_seq: int  # P: shards along the sequence
    scan: str
    scale: float
    reverse: bool
    implementations: tuple[str, ...]
    packed: bool  # cu_seqlens given
    kv_replicated: bool  # k, v replicated over the head axis, each head shard slices its one kv head
    return_state: bool
    real_len: int | None = None  # tokens before padding, when T was padded to a multiple of num_seq
    zigzag: bool = False  # the sequence in the zigzag layout: 2P chunks, shard r holding r and 2P-1-r


def choose_scan(scan: str, num_seq: int, state_bytes: int) -> str:
    """The scan that scan="auto" runs for `num_seq` sequence shards of `state_bytes` of state each."""
    if scan != "auto":
        return scan
    if num_seq <= AUTO_ALLGATHER_MAX_SHARDS and num_seq * state_bytes <= AUTO_ALLGATHER_MAX_BYTES:
        return "allgather"
    return "tree"


def _precision(dtype):
    # Same rule as the XLA backend: float32 inputs get float32 matmuls (no TF32 on GPUs).
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


# ----------------------------------------------------------------------------------------------------
# Scans across the sequence axis. Each takes this shard's transition a: [1, h] (broadcast over batch) and
# local state s: [b, h, Dk, Dv], `step` = this shard's position in processing order (traced), and returns
# S_in, the state entering this shard. `phys(i)` maps processing position i to the index along the mesh
# axis (reversed for reverse=True), so the scans only ever shift "forward".
# `a_pow`: without packed sequences every shard has the same transition A = lam^n, so the decay of any
# run of c shards is A^c = a_pow(c), known locally; then only states travel (one collective per round
# instead of two). With packed sequences a is 0 at shards holding a start, a_pow is None, and the
# decays travel with the states.


# Non-finite values may only travel forward: a NaN in an earlier shard's state must reach later shards
# (it does, through the products below) but nothing masked may pick it up. So every masked term is
# selected away with `where`, never multiplied by 0 (0 * NaN = NaN), and with packed sequences a
# transition a == 0 (a shard holding a sequence start) passes nothing older on, NaN included. (A decay
# lam^n that underflows to 0 in float32 is then read as a start too: it drops older non-finite values
# that the token-by-token recurrence would keep; finite values are unchanged, 0 * S = 0.)


def _carry(a, s, resets):
    """a S for a transition a [..., h] and state S [..., h, Dk, Dv]; 0 where a == 0 when `resets`."""
    carried = a[..., None, None] * s
    return jnp.where(a[..., None, None] == 0, 0.0, carried) if resets else carried


def _combine(first, second, resets):
    """(a1, S1) o (a2, S2) = (a1 a2, a2 S1 + S2): run shard 1 then shard 2."""
    (a1, s1), (a2, s2) = first, second
    return a1 * a2, _carry(a2, s1, resets) + s2


def _scan_ring(a, s, *, axis, num, step, phys, a_pow):
    # After round t, shards 0..t hold their exact S_in (shard 0 receives nothing, i.e. zeros: the initial
    # state enters through shard 0's backend call, and is in the S it sends on). P-1 dependent rounds;
    # a Python loop so that XLA sees every round (P is small).
    perm = [(phys(i), phys(i + 1)) for i in range(num - 1)]
    s_in = jnp.zeros_like(s)  # zeros_like keeps s's varying axes (check_vma)
    for _ in range(num - 1):
        s_in = jax.lax.ppermute(_carry(a, s_in, a_pow is None) + s, axis, perm)
    return s_in


def _select(cond, new, old):
    return jax.tree.map(lambda n, o: jnp.where(cond, n, o), new, old)


def _scan_tree(a, s, *, axis, num, step, phys, a_pow):
    # Hillis-Steele over shards. After the round with shift d, `inc` covers shards (step-2d, step] and
    # `exc` covers (step-2d, step): each round ships only `inc` (from step-d), and both absorb it. After
    # ceil(log2 P) rounds exc covers [0, step), the exclusive prefix, with no final shift round.
    inc = (a, s)
    exc = (jnp.ones_like(a), jnp.zeros_like(s))  # the identity of the combine
    d = 1
    while d < num:
        perm = [(phys(i), phys(i + d)) for i in range(num - d)]
        if a_pow is None:
            received = jax.lax.ppermute(inc, axis, perm)
        else:  # the sender, step - d, has covered min(d, step - d + 1) shards (clipped: masked below)
            covered = jnp.clip(jnp.minimum(d, step - d + 1), 0, None)
            received = (a_pow(covered), jax.lax.ppermute(inc[1], axis, perm))
        # Shards with step < d receive zeros, which are not the identity (1, 0): mask them out.
        has = step >= d
        exc = _select(has, _combine(received, exc, a_pow is None), exc)
        inc = _select(has, _combine(received, inc, a_pow is None), inc)
        d *= 2
    return exc[1]


def _scan_allgather(a, s, *, axis, num, step, phys, a_pow):
    # One all_gather of every shard's S (and a), then S_in(step) = sum_{j<step} (prod_{j<m<step} a_m) S_j.
    all_s = jax.lax.all_gather(s, axis)  # [P, b, h, Dk, Dv], mesh order
    reverse = phys(0) != 0  # then put the gathered values in processing order (a local flip)
    all_s = jnp.flip(all_s, 0) if reverse else all_s
    j = jnp.arange(num)
    if a_pow is not None:  # prod_{j<m<step} a_m = A^(step-1-j); exponent clipped, masked below
        weight = a_pow(jnp.maximum(step - 1 - j, 0))  # [P, 1, h]
    else:  # the product over a [P, P] mask (no division by a, which is 0 at sequence starts)
        all_a = jax.lax.all_gather(a, axis)  # [P, 1, h]
        all_a = jnp.flip(all_a, 0) if reverse else all_a
        between = (j[None, :] > j[:, None]) & (j[None, :] < step)  # [P (source j), P (factor m)]
        weight = jnp.prod(jnp.where(between[:, :, None, None], all_a[None], 1.0), axis=1)  # [P, 1, h]
    # Shards at or after `step` (and, packed, before a sequence start) are selected away, not weighted
    # by 0: their states may hold NaN that must not flow back.
    keep = (j[:, None, None] < step) & ((weight != 0) if a_pow is None else True)  # [P, 1, h]
    return jnp.sum(jnp.where(keep[..., None, None], weight[..., None, None] * all_s, 0.0), axis=0)


_SCAN_FNS = {"ring": _scan_ring, "tree": _scan_tree, "allgather": _scan_allgather}


def _add_incoming_state(o_loc, q, slopes, s_in, proc_pos, first_start, scale):
    """o_i = o_loc_i + scale * lam^(i+1) q_i S_in for the tokens before the shard's first sequence start.

    o_loc, q: [b, n, h, D]; s_in [b, h, Dk, Dv]; proc_pos [n]: each token's position in processing order.
    Used with packed sequences; without them the incoming state goes into the backend (sequence_shard).
    """
    before = proc_pos < first_start  # [n]
    reach = jnp.exp(-slopes[None, :] * (proc_pos[:, None] + 1.0))  # [n, h]
    q_decayed = q.astype(jnp.float32) * reach[None, :, :, None]
    correction = jnp.einsum("bnhk,bhkv->bnhv", q_decayed, s_in, precision=_precision(q.dtype))
    # Selected, not multiplied by 0: S_in may hold a NaN of an earlier sequence, which must not reach
    # the sequences that start here.
    correction = jnp.where(before[None, :, None, None], correction, 0.0)
    return (o_loc.astype(jnp.float32) + scale * correction).astype(o_loc.dtype)


# ----------------------------------------------------------------------------------------------------
# Per-device function (inside shard_map). Local shapes: q [b, n, h, Dk], k [b, n, hkv, Dk],
# v [b, n, hkv, Dv], slopes [h], initial_state [b or N, h, Dk, Dv] or None, cu_seqlens [N + 1] or None.


def _per_device(plan: _Plan, q, k, v, slopes, initial_state, cu_seqlens):
    b, n, h, Dk = q.shape
    Dv = v.shape[-1]
    num_states = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    # The initial state does not vary over the sequence axis (nor over batch axes when packed), but the
    # backends' state carries vary like q: give it q's varying axes (check_vma; a type cast, no data moves).
    missing = ((plan.seq_axis,) if plan.seq_axis else ()) + (plan.batch_axes if plan.packed else ())
    given_state = initial_state  # as it came in, invariant over the sequence axis
    if initial_state is not None:
        initial_state = jax.lax.pcast(initial_state.astype(jnp.float32), missing, to="varying")
    else:
        # zeros_like(q, ...) varies like q; a plain jnp.zeros would not (docs/design.md), and the reference
        # backend's scan carry would then fail check_vma.
        initial_state = jnp.zeros_like(q, shape=(num_states, h, Dk, Dv), dtype=jnp.float32)
    # Same for the slopes (they vary over heads only). Without this cast JAX inserts it inside the
    # backend, on whatever slope-derived value first meets q (e.g. the XLA backend's [h, C, C] decay
    # matrix), and the backward pass then all-reduces that whole matrix; cast here, the backward psum is
    # of the [h] slope gradient alone.
    seq_and_batch = ((plan.seq_axis,) if plan.seq_axis else ()) + plan.batch_axes
    slopes = jax.lax.pcast(slopes.astype(jnp.float32), seq_and_batch, to="varying")

    if plan.kv_replicated:  # the one kv head of this shard's query heads: global head j*h // group
        group = q.shape[2] * jax.lax.axis_size(plan.head_axis) // k.shape[2]
        kv_head = jax.lax.axis_index(plan.head_axis) * h // group
        k, v = (jax.lax.dynamic_slice_in_dim(x, kv_head, 1, axis=2) for x in (k, v))

    def backend(init, cu):
        return run_backends(
            plan.implementations, q, k, v, slopes, init, cu, scale=plan.scale, reverse=plan.reverse
        )

    if plan.num_seq == 1:  # batch/head sharding only: exactly the single-device call, per shard
        o, final = backend(initial_state, cu_seqlens)
        return (o, final) if plan.return_state else o

    num = plan.num_seq
    axis = plan.seq_axis
    rank = jax.lax.axis_index(axis)
    # Processing order: with reverse=True the recurrence runs from the last shard to the first, so shard
    # r is position P-1-r of the scan; all local work stays in place (the backend runs reverse itself).
    step = num - 1 - rank if plan.reverse else rank

    if plan.zigzag:
        return _zigzag_shard(plan, q, k, v, slopes, initial_state, rank)
    if cu_seqlens is None:
        o, s_out = sequence_shard(plan, q, k, v, slopes, initial_state, step)
        if not plan.return_state:
            return o
        if plan.real_len is not None:  # padded: the last outgoing state has decayed over the pad tokens
            return o, _real_final_state(plan, k, v, slopes, initial_state, step)
        # Final state: the last shard's outgoing state, shared with every sequence shard (the output is
        # replicated over the sequence axis) by a psum of the masked value.
        return o, jax.lax.psum(jnp.where(step == num - 1, s_out, 0.0), axis)

    phys = (lambda i: num - 1 - i) if plan.reverse else (lambda i: i)
    pos = jnp.arange(n)
    proc_pos = n - 1 - pos if plan.reverse else pos  # processing position of each local token
    lam_n = jnp.exp(-slopes * n)[None]  # [1, h]: decay across a whole shard
    o_loc, fin_loc, a, s_loc, first_start, finish = _packed_local(
        plan, backend, q, slopes, initial_state, given_state, cu_seqlens, step, rank, lam_n
    )
    # Work order: the local state above, then the scan, then the correction.
    s_in = _SCAN_FNS[plan.scan](a, s_loc, axis=axis, num=num, step=step, phys=phys, a_pow=None)
    o = _add_incoming_state(o_loc, q, slopes, s_in, proc_pos, first_start, plan.scale)
    return (o, finish(s_in)) if plan.return_state else o


def _zigzag_shard(plan, q, k, v, slopes, initial_state, rank):
    """A shard of the zigzag layout: its two chunks (global chunks r and 2P-1-r, each n/2 tokens) are two
    virtual shards of a 2P-way sequence shard, stacked along the batch for one backend call."""
    b, n = q.shape[:2]
    c = n // 2
    stack = lambda x: jnp.concatenate([x[:, :c], x[:, c:]], axis=0)  # [2b, c, ...]: chunk r, then 2P-1-r
    virtual = 2 * plan.num_seq
    chunks = jnp.stack([rank, virtual - 1 - rank])  # global chunk index of each half
    positions = virtual - 1 - chunks if plan.reverse else chunks  # processing position of each half
    step = jnp.repeat(positions, b)[:, None, None, None]  # [2b, 1, 1, 1]
    init = jnp.concatenate([initial_state, initial_state], axis=0)  # used only where step == 0
    o, s_out = sequence_shard(plan, stack(q), stack(k), stack(v), slopes, init, step)
    o = jnp.concatenate([o[:b], o[b:]], axis=1)
    if not plan.return_state:
        return o
    last = jnp.where(step == virtual - 1, s_out, 0.0)
    return o, jax.lax.psum(last[:b] + last[b:], plan.seq_axis)


def _scan_zigzag(plan, s, a_pow, *, backward):
    """The exclusive state scan of the zigzag layout over 2P chunks, two per shard, by one all-gather.

    s [2b, h, Dk, Dv]: the states of this shard's chunks r (first b rows) and 2P-1-r. As _scan_allgather,
    with every masked term selected away (never weighted by 0: it may hold NaN)."""
    virtual = 2 * plan.num_seq
    b = s.shape[0] // 2
    gathered = jax.lax.all_gather(s.reshape(2, b, *s.shape[1:]), plan.seq_axis)  # [P, 2, b, h, Dk, Dv]
    by_chunk = jnp.concatenate([gathered[:, 0], jnp.flip(gathered[:, 1], 0)], axis=0)  # [2P, b, ...]
    mirrored = plan.reverse != backward  # then the scan runs from chunk 2P-1 down to chunk 0
    by_position = jnp.flip(by_chunk, 0) if mirrored else by_chunk
    rank = jax.lax.axis_index(plan.seq_axis)
    mine = jnp.stack([rank, virtual - 1 - rank])
    mine = virtual - 1 - mine if mirrored else mine  # [2]: scan position of each half
    j = jnp.arange(virtual)
    weight = a_pow(jnp.maximum(mine[:, None] - 1 - j[None, :], 0))  # [2, 2P, 1, h]
    keep = (j[None, :] < mine[:, None])[:, :, None, None, None, None]  # [2, 2P, 1, 1, 1, 1]
    terms = jnp.where(keep, weight[..., None, None] * by_position[None], 0.0)  # [2, 2P, b, h, Dk, Dv]
    return jnp.sum(terms, axis=1).reshape(s.shape)


def _real_final_state(plan, k, v, slopes, initial_state, step):
    """The final state over the real tokens of a padded sequence, [b, h, Dk, Dv] on every shard.

    The pad tokens are zeros processed last, so every real output is exact, but the last shard's
    outgoing state is lam^pad times the true one (and lam^pad may underflow, so no division undoes it).
    Instead, exactly: S = lam^T S0 + sum over real tokens j of lam^(T-1-p_j) k_j^T v_j (p_j: global
    processing position, T: real length), each shard its own tokens (one contraction), then a psum.
    Plain JAX, so autodiff gives its gradients; the kernel's outgoing state is then unused.
    """
    n = k.shape[1]
    T = plan.real_len
    pos = jnp.arange(n)
    p = step * n + (n - 1 - pos if plan.reverse else pos)  # [n]
    # Pad tokens get weight 0, their exponent masked before exp (it would be positive: overflow).
    distance = (T - 1 - p[:, None]).astype(jnp.float32)  # [n, 1]: tokens after j, up to the last real one
    exponent = jnp.where(p[:, None] < T, -slopes[None, :] * distance, -jnp.inf)
    mine = weighted_state(k, v, jnp.exp(exponent))
    initial = jnp.exp(-slopes * T)[None, :, None, None] * initial_state
    mine = mine + jnp.where(step == 0, initial, 0.0)
    return jax.lax.psum(mine, plan.seq_axis)


# ----------------------------------------------------------------------------------------------------
# A sequence shard without packed sequences, states first. Forward: the shard's local state from k and v
# alone (one contraction over its tokens, no kernel), the scan gives S_in, and the backend runs once,
# from S_in: o and the outgoing state come out of the kernel with no correction pass over q and o.
# Backward, mirrored: G_loc = dL/dS_in from this shard's own outputs (one contraction over q and dO), the
# scan in the opposite direction gives D = dL/dS_out, the gradient of the outgoing state through every
# later shard, and one backward of the backend with that D gives exact dq, dk, dv, d(slopes) and
# d(initial_state). Why that is exact: S_in(r + 1) = S_out(r), so everything later shards do with this
# shard's inputs goes through S_out(r), whose gradient D(r) = sum_{r' > r} A^(r'-r-1) G_loc(r') (+ the
# cotangent of the final state at the last shard) is known before any backend backward runs.


def _shard_decay(slopes, n):
    """Decay across a whole shard of n tokens, A [1, h], and A^c for c shards."""

    def a_pow(c):  # A^c for c whole shards: [*c.shape, 1, h]
        return jnp.exp(-(slopes * n) * jnp.asarray(c, jnp.float32)[..., None, None])

    return jnp.exp(-slopes * n)[None], a_pow


def _scan(plan, a, s, step, a_pow, *, backward):
    """Exclusive scan over the sequence shards in processing order, or in the opposite order."""
    if plan.zigzag:
        return _scan_zigzag(plan, s, a_pow, backward=backward)
    num = plan.num_seq
    mirrored = plan.reverse != backward  # processing position i lives on mesh index num - 1 - i
    phys = (lambda i: num - 1 - i) if mirrored else (lambda i: i)
    position = num - 1 - step if backward else step
    return _SCAN_FNS[plan.scan](a, s, axis=plan.seq_axis, num=num, step=position, phys=phys, a_pow=a_pow)


def _state_function(plan, function, *args, **kwargs):
    # The backend's own local_state / state_gradient when it has them, else xla.py's (pure JAX).
    names = plan.implementations + (() if "xla" in plan.implementations else ("xla",))
    return run_backends(names, *args, function=function, **kwargs)


def _backend(plan, q, k, v, slopes, init):
    return run_backends(
        plan.implementations, q, k, v, slopes, init, None, scale=plan.scale, reverse=plan.reverse
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def sequence_shard(plan, q, k, v, slopes, initial_state, step):
    """(o, outgoing state) of the sequence shard at processing position `step` (see the comment above).

    Inside shard_map over plan.seq_axis; `initial_state` enters at step 0. (Public to the benchmarks,
    which run it on one device with a stand-in scan.)
    """
    return _backend(plan, q, k, v, slopes, _incoming_state(plan, k, v, slopes, initial_state, step))


def _incoming_state(plan, k, v, slopes, initial_state, step, differentiated=False):
    """The state this shard's backend call starts from: the initial state at step 0, else S_in.
    differentiated: the backend call is the forward of a differentiated shard (local_state's)."""
    a, a_pow = _shard_decay(slopes, k.shape[1])
    # S_loc = sum_j lam^(n-1-p_j) k_j^T v_j from zero; shard 0 also carries the initial state through.
    s_loc = _state_function(plan, "local_state", k, v, slopes, reverse=plan.reverse,
                            differentiated=differentiated)  # fmt: skip
    s_loc = s_loc + jnp.where(step == 0, a[..., None, None] * initial_state, 0.0)
    s_in = _scan(plan, a, s_loc, step, a_pow, backward=False)
    return jnp.where(step == 0, initial_state, s_in)


def _sequence_shard_fwd(plan, q, k, v, slopes, initial_state, step):
    # Under differentiation only (a plain forward runs sequence_shard itself, whose backend call keeps
    # nothing for a backward pass).
    init = _incoming_state(plan, k, v, slopes, initial_state, step, differentiated=True)
    out, backend_vjp = jax.vjp(functools.partial(_backend, plan), q, k, v, slopes, init)
    return out, (backend_vjp, q, slopes, step)


def _sequence_shard_bwd(plan, residuals, cotangents):
    backend_vjp, q, slopes, step = residuals
    do, d_final = cotangents  # d_final: nonzero only where the final state is taken (the last shard)
    a, a_pow = _shard_decay(slopes, q.shape[1])
    # G_loc = dL/dS_in through this shard's outputs: scale sum_i lam^(p_i+1) q_i^T dO_i
    g_loc = _state_function(plan, "state_gradient", q, do, slopes, scale=plan.scale, reverse=plan.reverse)
    # D(r) = sum_{r'>r} A^(r'-r-1) (G_loc(r') + A d_final(r')) + d_final(r)
    d_out = _scan(plan, a, g_loc + a[..., None, None] * d_final, step, a_pow, backward=True) + d_final
    dq, dk, dv, dslopes, dinit = backend_vjp((do, d_out))
    # dinit is dL/dS_in of this shard; only shard 0's S_in is the initial state.
    return dq, dk, dv, dslopes, jnp.where(step == 0, dinit, 0.0), None


sequence_shard.defvjp(_sequence_shard_fwd, _sequence_shard_bwd)


def _packed_local(plan, backend, q, slopes, initial_state, given_state, cu_seqlens, step, rank, lam_n):
    """Local work of one sequence shard with packed sequences (cu_seqlens, global offsets, batch 1).

    Everything is worked out in processing order ("p" frame: for reverse=True the global sequence and
    cu_seqlens are mirrored, cu_p = T - flip(cu), and sequence s is s_p = N-1-s), while the backend runs
    on the data in place with local offsets and reverse=plan.reverse.
    Returns o_loc, the backend's final states, a [1, h], s_loc [1, h, Dk, Dv], the processing position
    of the first sequence start in this shard (n if none) and finish(s_in) -> per-sequence final states.
    """
    n = q.shape[1]
    num = plan.num_seq
    T = num * n
    cu = cu_seqlens.astype(jnp.int32)
    to_p = (lambda x: jnp.flip(x, 0)) if plan.reverse else (lambda x: x)  # sequence order, both ways
    cu_p = T - jnp.flip(cu) if plan.reverse else cu
    lo, hi = step * n, (step + 1) * n  # this shard's tokens, processing order
    start, end = cu_p[:-1], cu_p[1:]  # [N]
    nonempty = end > start
    starts_here = nonempty & (start >= lo) & (start < hi)
    ends_here = nonempty & (end - 1 >= lo) & (end - 1 < hi)
    continued = start < lo  # the sequence began in an earlier shard
    first_start = jnp.min(jnp.where(starts_here, start - lo, n))

    # Backend: local offsets (a piece of every sequence, most of them empty, which the contract allows);
    # sequences that start here start from their own initial state, pieces that continue one from an
    # earlier shard start from zero (their S_in is added by the correction).
    cu_loc = jnp.clip(cu - rank * n, 0, n)
    init_loc = jnp.where(to_p(starts_here)[:, None, None, None], initial_state, 0.0)
    o_loc, fin_loc = backend(init_loc, cu_loc)
    fin_p = to_p(fin_loc)

    # A shard containing a start passes on no older state: what leaves it is the state of the piece
    # ongoing at its end, which began here from its own initial state.
    a = jnp.where(first_start < n, 0.0, lam_n)
    s_end = jnp.clip(jnp.searchsorted(cu_p, hi - 1, side="right") - 1, 0, start.shape[0] - 1)
    s_loc = fin_p[s_end][None]

    def finish(s_in):
        # Each sequence's final state comes from the shard holding its last token: the backend's local
        # final plus lam^len S_in when its piece there continued from an earlier shard. The length is
        # clipped before exp: masked-out entries would overflow, and inf * 0 is NaN in the gradient.
        # S_in is selected away (not weighted by 0) for sequences that start here: it may hold an earlier
        # sequence's NaN.
        through = continued & ends_here
        length = jnp.where(through, end - lo, 0).astype(jnp.float32)
        carry = jnp.exp(-slopes[None, :] * length[:, None])[..., None, None] * s_in  # [N, h, Dk, Dv]
        carry = jnp.where(through[:, None, None, None], carry, 0.0)
        mine = jnp.where(ends_here[:, None, None, None], fin_p + carry, 0.0)
        final_p = jax.lax.psum(mine, plan.seq_axis)
        # Empty sequences have no last token: their final state is their initial state (as given, which
        # like final_p does not vary over the sequence axis).
        init_p = jnp.zeros_like(final_p) if given_state is None else to_p(given_state.astype(jnp.float32))
        final_p = jnp.where(nonempty[:, None, None, None], final_p, init_p)
        return to_p(final_p)

    return o_loc, fin_loc, a, s_loc, first_start, finish


# ----------------------------------------------------------------------------------------------------


def sharded_lightning(
    q,
    k,
    v,
    *,
    mesh: Mesh,
    batch_axis=None,
    seq_axis=None,
    head_axis=None,
    scan: str = "auto",
    slopes=None,
    layer_idx=None,
    num_layers=None,
    decay="transnormer",
    scale=None,
    initial_state=None,
    reverse=False,
    cu_seqlens=None,
    return_state=False,
    implementation=None,
    layout="contiguous",
):
    """Lightning attention on `mesh`, batch-, head- and sequence-parallel, on global arrays.

    q: [B, T, H, Dk], k: [B, T, Hkv, Dk], v: [B, T, Hkv, Dv]; every other keyword as in
    `shardattn.lightning_attention` (same meaning, same result up to float rounding). Inputs may have any
    placement; they are placed with `shardattn.meshes.qkv_spec` (a no-op when they already are) and the
    output o [B, T, H, Dv] comes back sharded the same way; the final state [B or N, H, Dk, Dv] is
    sharded over batch and heads. Works eagerly, under jax.jit and jax.grad, with Auto or Explicit meshes.

    Axes: `batch_axis` (a name or a tuple of names), `seq_axis`, `head_axis`; None takes "data", "seq",
    "heads" when the mesh has that axis (the batch stays unsharded with cu_seqlens, which needs batch 1),
    `()` leaves the role unsharded. B and H must be divisible by their axis sizes; Hkv too, or it
    must divide the head-axis size (then k and v are replicated over that axis). Any T: a length the
    sequence axis does not divide is padded inside, exactly (outputs, final state and gradients are
    those of the unpadded call; o of T tokens cannot be sharded evenly, so it comes back gathered over
    the sequence axis: pad long sequences yourself to keep o sharded).
    `scan`: "ring" | "tree" | "allgather" | "auto" (the state scan across sequence shards; see module doc).
    `layout`: "contiguous", or "zigzag": q, k, v (and o) in the zigzag order of the sequence axis
    (`shardattn.meshes.to_zigzag`: 2P chunks, shard r holding chunks r and 2P-1-r), the layout that
    balances causal softmax attention (`sharded_attention(layout="zigzag")`), so that a hybrid model
    keeps one token order for every layer. T must divide by 2P; the state scan is then one all-gather
    of 2 states per shard (scan "auto" or "allgather"); no cu_seqlens.
    Unused axes: when a role is left at None and a mesh axis of size > 1 then serves no role (every
    device along it would compute the same result), it is a ValueError; name the axes, or pass every
    role explicitly (`()` included) to replicate over the rest on purpose.

    >>> mesh = shardattn.meshes.make_mesh(data=2, seq=4)
    >>> o = sharded_lightning(q, k, v, mesh=mesh, layer_idx=0, num_layers=24)
    """
    x = check_and_derive(
        q, k, v, slopes=slopes, layer_idx=layer_idx, num_layers=num_layers, decay=decay, scale=scale,
        initial_state=initial_state, cu_seqlens=cu_seqlens, implementation=implementation,
        reverse=reverse, return_state=return_state,
    )  # fmt: skip
    q, k, v, slopes, initial_state, cu_seqlens = x.q, x.k, x.v, x.slopes, x.initial_state, x.cu_seqlens
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if not isinstance(scan, str) or scan not in SCANS:
        raise ValueError(f"scan={scan!r} must be one of {SCANS}")
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    packed = cu_seqlens is not None
    defaulted = [batch_axis, seq_axis, head_axis].count(None)  # roles left to the default names
    if packed and batch_axis is None:
        batch_axis = ()  # batch 1: nothing to shard, and the default "data" axis would not divide it
    axes = resolve_axes(mesh, batch_axis, seq_axis, head_axis)
    if defaulted:
        check_axes_used(mesh, axes)
    # Axes of size 1 shard nothing; dropping them keeps the specs (and the varying axes that check_vma
    # tracks) to the axes that really split data, e.g. no psum over a size-1 "seq" for the final state.
    axes = axes._replace(
        batch=tuple(n for n in axes.batch if mesh.shape[n] > 1),
        seq=axes.seq if axes.seq and mesh.shape[axes.seq] > 1 else None,
        heads=axes.heads if axes.heads and mesh.shape[axes.heads] > 1 else None,
    )
    B, T, H, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    num_batch, num_seq, num_heads = (axis_size(mesh, x) for x in axes)
    # GQA/MQA with more head shards than kv heads (num_heads_shards % Hkv == 0): every head shard's query
    # heads share one kv head, so k and v stay replicated over the head axis and each shard slices its
    # own. Their gradients then sum over the head axis (an all-reduce of dk, dv in the backward pass,
    # as in Megatron's replicated kv heads). Otherwise Hkv must divide like H.
    kv_replicated = bool(Hkv % num_heads) and num_heads % Hkv == 0
    for what, size, shards, axis in (
        ("batch", B, num_batch, axes.batch),
        ("num_heads (q)", H, num_heads, (axes.heads,)),
    ):
        if size % shards:
            raise ValueError(
                f"{what}={size} must be divisible by the size of mesh axis {_entry(axis)!r}, {shards} "
                "(pass that role's axis argument as () to leave it unsharded)"
            )
    if Hkv % num_heads and not kv_replicated:
        raise ValueError(
            f"num_kv_heads (k, v)={Hkv} must be divisible by the size of mesh axis {axes.heads!r}, "
            f"{num_heads}, or divide it (then k, v are replicated over it)"
        )

    zigzag = layout == "zigzag" and num_seq > 1  # one shard: the zigzag order is the contiguous one
    if zigzag:
        if packed:
            raise NotImplementedError(
                "layout='zigzag' with cu_seqlens: packed sequences need each shard's tokens in one "
                "contiguous range of the sequence (pass layout='contiguous')"
            )
        if T % (2 * num_seq):
            raise ValueError(
                f"T={T} must be divisible by 2 x the size of mesh axis {axes.seq!r} ({num_seq}) for "
                "layout='zigzag' (the data must already be in zigzag order: shardattn.meshes.to_zigzag)"
            )
        if scan not in ("auto", "allgather"):
            raise ValueError(
                f"layout='zigzag' scans the states with one all-gather (each shard holds 2 of 2P chunks); "
                f"scan={scan!r} is not served: pass scan='auto' or 'allgather'"
            )

    spec_qkv = P(_entry(axes.batch), axes.seq, axes.heads, None)
    spec_kv = P(_entry(axes.batch), axes.seq, None, None) if kv_replicated else spec_qkv
    spec_state = P(None if packed else _entry(axes.batch), axes.heads, None, None)
    state_bytes = (B // num_batch) * (H // num_heads) * Dk * Dv * 4
    plan = _Plan(
        batch_axes=axes.batch,
        seq_axis=axes.seq,
        head_axis=axes.heads,
        num_seq=num_seq,
        scan="allgather" if zigzag else choose_scan(scan, num_seq, state_bytes),
        scale=x.scale,
        reverse=x.reverse,
        implementations=x.implementations,
        kv_replicated=kv_replicated,
        packed=packed,
        return_state=x.return_state,
        zigzag=zigzag,
    )
    # A sequence length the sequence axis does not divide is padded (with zeros, processed last: see
    # _pad_sequence) to a multiple of it; the pad tokens' outputs and states are dropped below.
    pad = -T % num_seq
    if pad:
        padded = _pad_sequence(q, k, v, initial_state, cu_seqlens, pad, plan.reverse)
        q, k, v, initial_state, cu_seqlens = padded
        if not packed:
            plan = dataclasses.replace(plan, real_len=T)

    # Inputs of any placement (numpy, one device, other shardings) go to the specs shard_map expects:
    # a no-op when they already match, a transfer eagerly, a constraint under jit. A mesh with Explicit
    # axes (jax.make_mesh's default) needs this: its shard_map refuses inputs placed otherwise.
    def place(x, spec):
        return place_on(x, NamedSharding(mesh, spec))

    args = [place(q, spec_qkv), place(k, spec_kv), place(v, spec_kv), place(slopes, P(axes.heads))]
    in_specs = [spec_qkv, spec_kv, spec_kv, P(axes.heads)]
    # Optional arguments are bound as None (no shard_map input) so that the per-device code sees None.
    optional = []
    for value, spec in ((initial_state, spec_state), (cu_seqlens, P())):
        if value is None:
            optional.append(None)
        else:
            args.append(place(value, spec))
            in_specs.append(spec)
            optional.append(len(args) - 1)

    out_specs = (spec_qkv, spec_state) if plan.return_state else spec_qkv
    try:
        out = _build(mesh, plan, tuple(in_specs), out_specs, tuple(optional))(*args)
    except TypeError as err:
        if not is_forward_mode_refusal(err):
            raise
        if num_seq > 1 and not packed:
            path = f"sequence shards (mesh axis {axes.seq!r} of size {num_seq}) without cu_seqlens"
        else:
            kernels = "the Triton, Mosaic GPU and Pallas kernels"
            path = f"{kernels} (this call: implementation={x.implementations})"
        raise forward_mode_error("sharded_lightning", path) from err
    if not pad:
        return out
    o, final = out if plan.return_state else (out, None)
    # o of T tokens cannot be sharded evenly over the sequence axis: gathered over it, then sliced (said
    # before the slice, which a mesh with Explicit axes requires).
    o = place(o, P(_entry(axes.batch), None, axes.heads, None))
    o = o[:, pad:] if plan.reverse and not packed else o[:, :T]
    if final is not None and packed:
        final = final[:-1]  # the pad sequence's
    return (o, final) if plan.return_state else o


def _pad_sequence(q, k, v, initial_state, cu_seqlens, pad, reverse):
    """q, k, v with `pad` zero tokens where they are processed last, so that no real output sees them.

    Without cu_seqlens: at the end (reverse=False) or the front (reverse=True); the final state is then
    computed over the real tokens alone (_real_final_state). With cu_seqlens the pad tokens form one more
    sequence at the end, from a zero initial state: no real sequence sees them, whatever the direction,
    and its final state is dropped. Cost: the pad tokens' share of the work (under one token per shard)
    and one copy of q, k, v.
    """
    at_front = reverse and cu_seqlens is None
    widths = [(0, 0), (pad, 0) if at_front else (0, pad), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    if cu_seqlens is not None:
        cu = jnp.asarray(cu_seqlens, jnp.int32)
        cu_seqlens = jnp.concatenate([cu, cu[-1:] + pad])
        if initial_state is not None:
            initial_state = jnp.concatenate([initial_state, jnp.zeros_like(initial_state[:1])])
    return q, k, v, initial_state, cu_seqlens


@functools.lru_cache(maxsize=256)
def _build(mesh, plan, in_specs, out_specs, optional):
    """The jitted shard_map for one configuration, cached: eager calls would otherwise trace and compile
    a fresh closure every time (under an outer jit the inner jit is simply inlined)."""

    def per_device(*local):
        init = None if optional[0] is None else local[optional[0]]
        cu = None if optional[1] is None else local[optional[1]]
        return _per_device(plan, *local[:4], init, cu)

    return jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=True)
    )


def _entry(batch_axes):
    # PartitionSpec entry for the batch dimension: None, one axis name, or a tuple of names.
    return None if not batch_axes else batch_axes[0] if len(batch_axes) == 1 else tuple(batch_axes)

"""Lightning attention in plain JAX, chunked: matrix work inside chunks, a scan over chunk states.

Portable (any XLA backend) and differentiable by autodiff. Within a chunk of C tokens (docs/design.md):

    o_i   = scale * (sum_{j<=i} lam^(i-j) (q_i . k_j) v_j  +  lam^(i+1) q_i S_in)
    S_out = lam^l S_in + sum_{j<l} lam^(l-1-j) k_j^T v_j          (l = valid tokens of the chunk)

Only the chain of chunk states is sequential. Memory for the backward pass: the chunk states
(T/C * Dk * Dv per head, i.e. O(T * D) for C ~ D) and the C x C intra-chunk scores (O(T * C)); no
per-token state is ever kept.

Packed sequences (cu_seqlens) are re-laid so that every sequence starts at a chunk boundary: each chunk
then carries a valid length, a "starts a sequence" flag and a sequence id, and the scan resets the state
to that sequence's initial state at a start. The re-layout is one gather in and one gather out.

A NaN or inf in k or v at token t reaches outputs at t and after only (see _chunked): the in-chunk
matmuls run on zeroed copies with the causal mask selected, and the NaN is put back from t on.
"""

import jax
import jax.numpy as jnp

from shardattn.kernels.lightning.packing import slot_maps

CHUNK_SIZE = 64


def _matmul_precision(dtype):
    # float32 inputs get full float32 matmuls (GPUs would otherwise use TF32); narrower inputs do not
    # need them, their tolerance is set by their own rounding.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def _varlen_layout(cu_seqlens, T, num_chunks, reverse):
    """Slot layout for packed sequences, each starting at a chunk boundary.

    Returns (token_of_slot [S], slot_valid [S], slot_of_token [T], chunk_start [nC], chunk_seq [nC],
    chunk_len [nC], last_chunk [N]) with S = num_chunks * C slots. With reverse=True the tokens of each
    sequence are laid out last-to-first, so the forward recurrence over slots is the reverse recurrence.
    """
    C = CHUNK_SIZE
    seq_len = cu_seqlens[1:] - cu_seqlens[:-1]  # [N]
    seq_chunks = (seq_len + C - 1) // C
    chunk_offset = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(seq_chunks)]).astype(jnp.int32)

    chunk = jnp.arange(num_chunks, dtype=jnp.int32)
    chunk_seq = jnp.clip(jnp.searchsorted(chunk_offset, chunk, side="right") - 1, 0, seq_len.shape[0] - 1)
    chunk_seq = chunk_seq.astype(jnp.int32)
    in_seq = chunk < chunk_offset[-1]  # chunks past the last sequence hold only padding
    first_pos = (chunk - chunk_offset[chunk_seq]) * C  # position in its sequence of the chunk's slot 0
    chunk_len = jnp.where(in_seq, jnp.clip(seq_len[chunk_seq] - first_pos, 0, C), 0)
    chunk_start = in_seq & (first_pos == 0)

    token_of_slot, slot_valid, slot_of_token = slot_maps(
        cu_seqlens, T, C, chunk_offset, chunk_seq, first_pos, chunk_len, reverse
    )
    last_chunk = chunk_offset[1:] - 1  # -1 for an empty first sequence; masked by seq_len > 0
    return token_of_slot, slot_valid, slot_of_token, chunk_start, chunk_seq, chunk_len, last_chunk


def _chunked(q, k, v, slopes, chunk_start, chunk_len, initial_for_chunk, *, scale, precision):
    """Chunked lightning attention over pre-laid chunks.

    q: [B, nC, C, K, G, Dk], k: [B, nC, C, K, Dk], v: [B, nC, C, K, Dv] (K kv heads, G query heads per kv
    head), slopes: [K, G], chunk_start: [nC] bool, chunk_len: [nC] int, initial_for_chunk(c) -> [B, K, G,
    Dk, Dv] state a chunk that starts a sequence starts from. Returns o [B, nC, C, K, G, Dv] float32 and
    per chunk the incoming and outgoing states, each [nC, B, K, G, Dk, Dv].
    """
    C = q.shape[2]
    pos = jnp.arange(C, dtype=jnp.float32)
    neg_s = -slopes[..., None, None]  # [K, G, 1, 1]
    # lam^(i-j) for j <= i. The exponent is masked before exp: exp(+s*(j-i)) would overflow, and inf*0
    # is NaN in the value and the gradient.
    diff = pos[:, None] - pos[None, :]
    intra_decay = jnp.exp(jnp.where(diff >= 0, neg_s * diff, -jnp.inf))  # [K, G, C, C]
    query_decay = jnp.exp(neg_s[..., 0] * (pos + 1.0))  # lam^(i+1): [K, G, C]
    # lam^(l-1-j) for the l valid tokens of each chunk; padded tokens (zero k, v) get weight 0.
    lengths = chunk_len.astype(jnp.float32)[:, None, None, None]  # [nC, 1, 1, 1]
    key_exp = lengths - 1.0 - pos
    key_decay = jnp.exp(jnp.where(key_exp >= 0, neg_s[None, ..., 0] * key_exp, -jnp.inf))  # [nC, K, G, C]
    chunk_decay = jnp.exp(-slopes[None] * lengths[..., 0])  # lam^l: [nC, K, G]

    ein = lambda spec, *xs: jnp.einsum(spec, *xs, precision=precision)
    # Non-finite values must reach only later outputs (causality). A masked matmul term is 0 * x, which is
    # NaN for x = NaN or inf, so the intra-chunk matmuls see q, k, v with non-finite entries replaced by 0
    # and the masks are selected (`where`), never multiplied. The non-finite values come back two ways:
    # every output from a bad k_j or v_j on (the inclusive prefix of the flags within the chunk) is set
    # to NaN, and the chunk states below are built from the raw k, v, so they carry it into every later
    # chunk (and shard). A bad q_i reaches o_i through the raw q of the inter-chunk term. For finite
    # inputs nothing changes, in values or gradients.
    finite = lambda x: jnp.where(jnp.isfinite(x), x, 0.0)
    bad = jnp.any(~jnp.isfinite(k), axis=-1) | jnp.any(~jnp.isfinite(v), axis=-1)  # [B, nC, C, K]
    reached = jax.lax.cummax(bad.astype(jnp.int8), axis=2) > 0  # some j <= i in the chunk is bad
    causal = diff >= 0  # [C, C]
    scores = jnp.where(causal, ein("bnikgd,bnjkd->bnkgij", finite(q), finite(k)) * intra_decay, 0.0)
    o_intra = ein("bnkgij,bnjkv->bnikgv", scores, finite(v))
    o_intra = jnp.where(reached[..., None, None], jnp.nan, o_intra)
    local_state = ein("bnjkd,nkgj,bnjkv->nbkgdv", k, key_decay, v)  # sum_j lam^(l-1-j) k_j^T v_j

    def step(state, chunk):
        delta, decay, start, c = chunk
        state_in = jnp.where(start, initial_for_chunk(c), state)
        state_out = decay[None, :, :, None, None] * state_in + delta
        return state_out, (state_in, state_out)

    num_chunks = q.shape[1]
    chunks = (local_state, chunk_decay, chunk_start, jnp.arange(num_chunks))
    # zeros_like of a value derived from the inputs, so that the carry varies over the same mesh axes as
    # the inputs when this runs inside shard_map (docs/design.md: jnp.zeros carries fail check_vma).
    _, (state_in, state_out) = jax.lax.scan(step, jnp.zeros_like(local_state[0]), chunks)
    o_inter = ein("bnikgd,nbkgdv->bnikgv", q * query_decay.transpose(2, 0, 1)[..., None], state_in)
    return scale * (o_intra + o_inter), state_in, state_out


def lightning_attention(q, k, v, slopes, initial_state=None, cu_seqlens=None, *, scale, reverse=False):
    B, T, H, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    G = H // Hkv
    C = CHUNK_SIZE
    out_dtype = q.dtype
    precision = _matmul_precision(q.dtype)
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    slopes = slopes.astype(jnp.float32).reshape(Hkv, G)
    num_states = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is None:
        # zeros_like keeps the varying mesh axes of q inside shard_map (see _chunked).
        initial_state = jnp.zeros_like(q, shape=(num_states, H, Dk, Dv))
    initial_state = initial_state.astype(jnp.float32).reshape(num_states, Hkv, G, Dk, Dv)

    if cu_seqlens is None:
        if reverse:
            q, k, v = (jnp.flip(x, axis=1) for x in (q, k, v))
        num_chunks = -(-T // C)
        pad = [(0, 0), (0, num_chunks * C - T), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        chunk = jnp.arange(num_chunks)
        chunk_start = chunk == 0
        chunk_len = jnp.clip(T - chunk * C, 0, C)
        o, _, state_out = _chunked(
            q.reshape(B, num_chunks, C, Hkv, G, Dk),
            k.reshape(B, num_chunks, C, Hkv, Dk),
            v.reshape(B, num_chunks, C, Hkv, Dv),
            slopes, chunk_start, chunk_len, lambda c: initial_state,
            scale=scale, precision=precision,
        )
        o = o.reshape(B, num_chunks * C, H, Dv)[:, :T]
        if reverse:
            o = jnp.flip(o, axis=1)
        final_state = state_out[-1]
    else:
        N = num_states
        num_chunks = -(-T // C) + N  # each sequence wastes less than one chunk on padding
        token_of_slot, slot_valid, slot_of_token, chunk_start, chunk_seq, chunk_len, last_chunk = (
            _varlen_layout(cu_seqlens, T, num_chunks, reverse)
        )

        def lay(x):  # [1, T, h, d] -> [1, nC, C, h, d], padding slots zero
            x = jnp.where(slot_valid[:, None, None], x[0, token_of_slot], 0.0)
            return x.reshape(1, num_chunks, C, *x.shape[1:])

        q_l, k_l, v_l = lay(q), lay(k), lay(v)
        o, _, state_out = _chunked(
            q_l.reshape(1, num_chunks, C, Hkv, G, Dk), k_l, v_l,
            slopes, chunk_start, chunk_len, lambda c: initial_state[chunk_seq[c]][None],
            scale=scale, precision=precision,
        )
        o = o.reshape(num_chunks * C, H, Dv)[slot_of_token][None]
        seq_len = cu_seqlens[1:] - cu_seqlens[:-1]
        ends = state_out[jnp.clip(last_chunk, 0, num_chunks - 1), 0]  # [N, K, G, Dk, Dv]
        final_state = jnp.where((seq_len > 0)[:, None, None, None, None], ends, initial_state)

    return o.astype(out_dtype), final_state.reshape(num_states, H, Dk, Dv)


# ---- sequence parallelism (reference.py: local_state, state_gradient): one weighted contraction each


def _weighted_states(x, y, weights, precision):
    """sum_i weights[i, h] x_i^T y_i per head: x [B, T, hx, K], y [B, T, hy, V] with hy in {hx, H},
    weights [T, H] float32 -> [B, H, K, V] float32. x's heads are shared by H // hx query heads (GQA)."""
    B, T, hx, K = x.shape
    H = weights.shape[1]
    # x scaled per query head, rounded back to x's dtype as the chunked kernels round their operands
    x_w = x.astype(jnp.float32)[:, :, :, None, :] * weights.reshape(T, hx, H // hx)[None, ..., None]
    x_w = x_w.astype(x.dtype)
    if y.shape[2] == H:
        y = y.reshape(B, T, hx, H // hx, y.shape[3])
        spec = "btjgk,btjgv->bjgkv"
    else:  # y shared by the group like x
        spec = "btjgk,btjv->bjgkv"
    out = jnp.einsum(spec, x_w, y, precision=precision, preferred_element_type=jnp.float32)
    return out.reshape(B, H, K, y.shape[-1])


def _processing_position(T, reverse):
    pos = jnp.arange(T, dtype=jnp.float32)
    return T - 1 - pos if reverse else pos


def local_state(k, v, slopes, *, reverse=False, differentiated=False):
    T = k.shape[1]
    p = _processing_position(T, reverse)
    weights = jnp.exp(-slopes[None, :].astype(jnp.float32) * (T - 1 - p[:, None]))  # [T, H]
    return _weighted_states(k, v, weights, _matmul_precision(k.dtype))


def state_gradient(q, do, slopes, *, scale, reverse=False):
    p = _processing_position(q.shape[1], reverse)
    weights = jnp.exp(-slopes[None, :].astype(jnp.float32) * (p[:, None] + 1.0))
    return scale * _weighted_states(q, do, weights, _matmul_precision(q.dtype))


def weighted_state(k, v, weights):
    """sum_j weights[j, h] k_j^T v_j per query head: [B, H, Dk, Dv] float32, differentiable.

    k: [B, T, Hkv, Dk], v: [B, T, Hkv, Dv], weights: [T, H] float32. (shardattn.sharded uses it for the
    exact final state of a padded sequence.)
    """
    return _weighted_states(k, v, weights, _matmul_precision(k.dtype))


# ---- serving (reference.py: decode): a gather of the used slots, one recurrence step, a scatter back


def decode(q, k, v, cache, slot_idx, slopes, *, scale):
    B, H, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    num_slots = cache.shape[0]
    used = (slot_idx >= 0) & (slot_idx < num_slots)
    # Padding rows index one past the end: their gather fills zeros without reading any slot, and their
    # scatter is dropped, so slot -1 never aliases slot num_slots - 1 (negative indices would wrap).
    target = jnp.where(used, slot_idx, num_slots)
    state = cache.at[target].get(mode="fill", fill_value=0.0).reshape(B, Hkv, G, Dk, Dv)
    decay = jnp.exp(-slopes.astype(jnp.float32)).reshape(Hkv, G)
    kv = k.astype(jnp.float32)[:, :, None, :, None] * v.astype(jnp.float32)[:, :, None, None, :]
    state = decay[None, :, :, None, None] * state + kv  # [B, Hkv, G, Dk, Dv]; kv shared by the group
    # A matrix-vector product per (row, head), memory-bound: full float32 precision costs nothing here.
    o = scale * jnp.einsum(
        "bjgk,bjgkv->bjgv", q.astype(jnp.float32).reshape(B, Hkv, G, Dk), state, precision="highest"
    )
    o = jnp.where(used[:, None, None, None], o, 0.0).reshape(B, H, Dv)
    cache = cache.at[target].set(state.reshape(B, H, Dk, Dv), mode="drop")
    return o.astype(q.dtype), cache

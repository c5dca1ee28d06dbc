"""Lightning attention, token by token, in float32: the contract every backend is tested against.

Per query head h, with decay lam_h = exp(-slopes[h]) and a float32 state S of shape [Dk, Dv]:

    S_t = lam_h * S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t        S_{-1} = initial_state (or 0)

reverse=True runs the same recurrence from the last token to the first. With GQA the key/value head of
query head h is h // (H // Hkv). With cu_seqlens (batch 1, packed sequences) the state restarts from
that sequence's initial state at the first token of each sequence; empty sequences keep their initial
state as final state.

Every backend in this folder has this module's signature:

    lightning_attention(q, k, v, slopes, initial_state=None, cu_seqlens=None, *, scale, reverse=False)
        q: [B, T, H, Dk]   k: [B, T, Hkv, Dk]   v: [B, T, Hkv, Dv]   slopes: [H] float32 (>= 0)
        initial_state: [N, H, Dk, Dv] float32 or None (zeros); N = B, or len(cu_seqlens) - 1
        cu_seqlens: [N + 1] int32 or None (then every batch row is one sequence); requires B == 1
        returns (o [B, T, H, Dv] in q.dtype, final_state [N, H, Dk, Dv] float32),
        differentiable in q, k, v, slopes and initial_state.
Arguments arrive checked by the API layer (shardattn.lightning); backends do not re-validate them, but a
backend that cannot serve a call raises NotImplementedError saying why.

Two more functions serve sequence parallelism (shardattn.sharded), values only, never differentiated,
no cu_seqlens; a backend may leave them out (then xla.py's are used):

    local_state(k, v, slopes, *, reverse=False) -> [B, H, Dk, Dv] float32
        the final state from a zero initial state: sum_j lam^(T-1-p_j) k_j^T v_j (p: processing position)
    state_gradient(q, do, slopes, *, scale, reverse=False) -> [B, H, Dk, Dv] float32
        d(initial_state) under the cotangent (do, 0): scale * sum_i lam^(p_i+1) q_i^T do_i

Serving (shardattn.serving) adds one more, values only, never differentiated; a backend may leave it
out (then the next backend in the list serves):

    decode(q, k, v, cache, slot_idx, slopes, *, scale) -> (o, cache)
        q: [B, H, Dk]   k: [B, Hkv, Dk]   v: [B, Hkv, Dv]   (one new token per row)
        cache: [num_slots, H, Dk, Dv] float32 (one recurrent state per slot)   slot_idx: [B] int32
        one recurrence step per row b with s = slot_idx[b] in [0, num_slots):
            S = lam * cache[s] + k_b^T v_b      o_b = scale * q_b S      cache[s] := S
        rows with s outside [0, num_slots) (-1 marks padding) give o_b = 0 and change no slot.
        returns (o [B, H, Dv] in q.dtype, the updated cache [num_slots, H, Dk, Dv] float32).
        The rows' used slots are distinct (the API layer checks it when slot_idx is concrete); a
        backend may update the cache in place when the caller donates it.
"""

import jax
import jax.numpy as jnp


def _one_stream(q, k, v, decay, seq_ids, initial_state, *, scale):
    """Runs the recurrence over one token stream.

    q: [T, H, Dk]  k: [T, H, Dk]  v: [T, H, Dv] (kv already repeated to H heads), decay: [H],
    seq_ids: [T] int32, non-decreasing in processing order, initial_state: [N, H, Dk, Dv].
    """
    is_start = jnp.concatenate([jnp.ones((1,), bool), seq_ids[1:] != seq_ids[:-1]])

    def step(carry, token):
        state, final = carry
        q_t, k_t, v_t, seq, start = token
        state = jnp.where(start, initial_state[seq], state)  # a new sequence starts from its own state
        state = decay[:, None, None] * state + k_t[:, :, None] * v_t[:, None, :]
        o_t = scale * jnp.einsum("hk,hkv->hv", q_t, state)
        final = final.at[seq].set(state)  # the last write for each sequence is its final state
        return (state, final), o_t

    carry = (jnp.zeros_like(initial_state[0]), initial_state)
    (_, final), o = jax.lax.scan(step, carry, (q, k, v, seq_ids, is_start))
    return o, final


def lightning_attention(q, k, v, slopes, initial_state=None, cu_seqlens=None, *, scale, reverse=False):
    B, T, H, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    group = H // Hkv
    out_dtype = q.dtype
    q = q.astype(jnp.float32)
    k = jnp.repeat(k.astype(jnp.float32), group, axis=2)
    v = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    decay = jnp.exp(-slopes.astype(jnp.float32))
    num_states = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is None:
        initial_state = jnp.zeros((num_states, H, Dk, Dv), jnp.float32)
    initial_state = initial_state.astype(jnp.float32)

    if reverse:
        q, k, v = (jnp.flip(x, axis=1) for x in (q, k, v))
    if cu_seqlens is None:
        seq_ids = jnp.zeros((T,), jnp.int32)
        run = jax.vmap(lambda q, k, v, s0: _one_stream(q, k, v, decay, seq_ids, s0[None], scale=scale))
        o, final = run(q, k, v, initial_state)
        final = final[:, 0]
    else:
        # Sequence of each token: the last n with cu_seqlens[n] <= t (skips empty sequences).
        seq_ids = jnp.searchsorted(cu_seqlens, jnp.arange(T), side="right").astype(jnp.int32) - 1
        if reverse:
            seq_ids = jnp.flip(seq_ids)
        o, final = _one_stream(q[0], k[0], v[0], decay, seq_ids, initial_state, scale=scale)
        o = o[None]
    if reverse:
        o = jnp.flip(o, axis=1)
    return o.astype(out_dtype), final


def local_state(k, v, slopes, *, reverse=False, differentiated=False):
    # differentiated: whether the sequence shard asking is differentiated, so that a backend whose
    # forward plans its launches differently then (mosaic_gpu) can share its first pass; the value is
    # the same either way, and backends without such a plan ignore it.
    B, T, _, Dk = k.shape
    q = jnp.zeros((B, T, slopes.shape[0], Dk), jnp.float32)  # o is not needed, only the state
    return lightning_attention(q, k, v, slopes, scale=1.0, reverse=reverse)[1]


def state_gradient(q, do, slopes, *, scale, reverse=False):
    B, T, H, Dk = q.shape
    k = jnp.zeros((B, T, H, Dk), jnp.float32)  # the gradient of the initial state needs neither k nor v
    v = jnp.zeros((B, T, H, do.shape[-1]), jnp.float32)
    s0 = jnp.zeros((B, H, Dk, do.shape[-1]), jnp.float32)
    _, pullback = jax.vjp(
        lambda s0: lightning_attention(q, k, v, slopes, s0, scale=scale, reverse=reverse), s0
    )
    return pullback((do, jnp.zeros_like(s0)))[0]


def decode(q, k, v, cache, slot_idx, slopes, *, scale):
    # One row at a time, in order: the recurrence step of lightning_attention above, on a cached state.
    H, Dk = q.shape[1:]
    group = H // k.shape[1]
    num_slots = cache.shape[0]
    decay = jnp.exp(-slopes.astype(jnp.float32))

    def row(cache, inputs):
        q_b, k_b, v_b, slot = inputs
        used = (slot >= 0) & (slot < num_slots)
        s = jnp.clip(slot, 0, num_slots - 1)
        k_b = jnp.repeat(k_b.astype(jnp.float32), group, axis=0)  # [H, Dk]
        v_b = jnp.repeat(v_b.astype(jnp.float32), group, axis=0)  # [H, Dv]
        state = decay[:, None, None] * cache[s] + k_b[:, :, None] * v_b[:, None, :]
        o_b = scale * jnp.einsum("hk,hkv->hv", q_b.astype(jnp.float32), state, precision="highest")
        cache = cache.at[s].set(jnp.where(used, state, cache[s]))  # a padding row writes back what it read
        return cache, jnp.where(used, o_b, 0.0)

    cache, o = jax.lax.scan(row, cache.astype(jnp.float32), (q, k, v, slot_idx))
    return o.astype(q.dtype), cache

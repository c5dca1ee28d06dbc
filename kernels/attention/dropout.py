"""The dropout keep mask of softmax attention: a pure function of integers, shared by every backend.

keep(b, h, i, j) depends only on (rng, global batch index b, global query head index h, global query
token index i, global key token index j), through a cheap counter-based integer hash, so that a blockwise
XLA loop, a Triton kernel and a sharded call (each holding a different slice of b, h, i and j, with
`dropout_offsets` saying where it starts: `offsets` below) all draw the same mask. Nothing here is
stateful or sequential.

The mixing step is the "lowbias32" 32-bit integer finaliser from Chris Wellons' hash-prospector search
(xorshift-multiply, two rounds). Per (row, key) pair it costs one XOR and one finaliser: the row part
(rng, b, h, i) and the key part (rng, j) are hashed once each and combined.
"""

import jax
import jax.numpy as jnp
import numpy as np

_M1 = np.uint32(0x7FEB352D)
_M2 = np.uint32(0x846CA68B)
_ROW_SALT = np.uint32(0x9E3779B9)  # distinct constants, so that row and key hashes of equal counters differ
_KEY_SALT = np.uint32(0x85EBCA6B)


def mix(x):
    """uint32 -> uint32 bijective finaliser (lowbias32)."""
    x = x ^ (x >> 16)
    x = x * _M1
    x = x ^ (x >> 15)
    x = x * _M2
    return x ^ (x >> 16)


def seed_words(rng):
    """A PRNG key (typed or raw uint32) -> two uint32 scalars that seed the hash."""
    words = jax.random.key_data(rng).reshape(-1).astype(jnp.uint32)
    s0 = jnp.uint32(0)
    for w in range(words.shape[0]):  # 2 words for threefry, 4 for rbg: static
        s0 = mix(s0 ^ words[w])
    return s0, mix(s0 ^ _KEY_SALT)


def offsets(dropout_offsets):
    """dropout_offsets -> (q_offset, kv_offset, batch_offset, head_offset), four int32 scalars.

    Accepts None (all 0), (q_offset, kv_offset) or (q_offset, kv_offset, batch_offset, head_offset):
    global index = local index + offset, for the query token, key token, batch and query head indices
    (a sequence shard, a ring block, a batch shard and a head shard each pass where their slice starts).
    Every backend reads the offsets through this function.
    """
    if dropout_offsets is None:
        dropout_offsets = (0, 0)
    if len(dropout_offsets) not in (2, 4):
        raise ValueError(
            "dropout_offsets must be (q_offset, kv_offset) or (q_offset, kv_offset, batch_offset, "
            f"head_offset), got {len(dropout_offsets)} entries"
        )
    full = tuple(dropout_offsets) if len(dropout_offsets) == 4 else (*dropout_offsets, 0, 0)
    return tuple(jnp.asarray(x, jnp.int32) for x in full)


def threshold(rate: float) -> np.uint32:
    """keep iff hash >= threshold: P(keep) = 1 - rate up to 2**-32."""
    return np.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))


def keep_mask(seed, batch, head, q_index, kv_index, rate: float):
    """Boolean keep mask, broadcast over the shapes of the index arrays.

    seed: seed_words(rng). batch, head, q_index: integer arrays broadcasting against each other (the row
    part); kv_index: integer array (the key part); e.g. batch [B, 1, 1, 1], head [1, H, 1, 1],
    q_index [1, 1, T, 1] and kv_index [1, 1, 1, S] give [B, H, T, S]. Indices are global token indices.
    """
    s0, s1 = seed
    row = mix(s0 ^ jnp.asarray(batch).astype(jnp.uint32))
    row = mix(row ^ (jnp.asarray(head).astype(jnp.uint32) + _ROW_SALT))
    row = mix(row ^ jnp.asarray(q_index).astype(jnp.uint32))
    key = mix(s1 ^ (jnp.asarray(kv_index).astype(jnp.uint32) + _KEY_SALT))
    return mix(row ^ key) >= threshold(rate)

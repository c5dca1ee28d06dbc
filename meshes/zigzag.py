"""The zigzag sequence layout: causal load balance for sequence-parallel softmax attention.

With causal masking and the contiguous layout, sequence shard r's queries see r + 1 of the P key
shards, so the last shard does P times the work of the first. The zigzag layout cuts the sequence into
2P chunks and gives shard r chunks r and 2P - 1 - r (one early, one late): every shard then sees the
same number of unmasked (query chunk, key chunk) pairs: 2P + 1 each, of the P(2P + 1) in all.

    contiguous, P = 4:  shard 0: [0 1]  shard 1: [2 3]  shard 2: [4 5]  shard 3: [6 7]
    zigzag,     P = 4:  shard 0: [0 7]  shard 1: [1 6]  shard 2: [2 5]  shard 3: [3 4]

Reorder once at data loading with `to_zigzag` (tokens, labels, positions, segment ids alike), run every
layer on the reordered sequence (`sharded_attention(..., layout="zigzag")` uses global positions for its
masks), and undo it with `from_zigzag` where the original order matters again.
"""

import jax.numpy as jnp
import numpy as np

from shardattn.meshes.specs import axis_size, resolve_axes

# Sequence layouts on a mesh's sequence axis, for sharded_lightning and sharded_attention alike.
LAYOUTS = ("contiguous", "zigzag")


def zigzag_order(num_shards: int) -> np.ndarray:
    """Chunk indices in zigzag order: [0, 2P-1, 1, 2P-2, ...] (shard r holds entries 2r and 2r + 1)."""
    r = np.arange(num_shards)
    return np.stack([r, 2 * num_shards - 1 - r], axis=1).reshape(-1)


def _num_shards(mesh, seq_axis):
    # Only the sequence role matters here; the batch and head roles are left unsharded so that their
    # defaults cannot raise for meshes that lack them.
    axes = resolve_axes(mesh, batch_axis=(), seq_axis=seq_axis, head_axis=())
    return axis_size(mesh, axes.seq)


def _reorder(x, mesh, seq_axis, axis, inverse):
    x = jnp.asarray(x)
    if not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis!r} must be an int naming a dimension of x (shape {x.shape})")
    axis = axis % x.ndim
    num = _num_shards(mesh, seq_axis)
    T = x.shape[axis]
    if T % (2 * num):
        raise ValueError(
            f"x.shape[{axis}]={T} (the sequence) must be divisible by 2 * (size of the sequence axis) = "
            f"{2 * num} for the zigzag layout"
        )
    order = zigzag_order(num)
    if inverse:
        order = np.argsort(order)
    chunks = x.reshape(*x.shape[:axis], 2 * num, T // (2 * num), *x.shape[axis + 1 :])
    chunks = jnp.take(chunks, jnp.asarray(order), axis=axis)
    return chunks.reshape(x.shape)


def to_zigzag(x, mesh, seq_axis=None, *, axis: int = 1):
    """Reorders the sequence dimension of x into the zigzag layout of `mesh`'s sequence axis.

    x: [B, T, ...] (axis=1 is the sequence; pass axis=2 and axis=3 for a bias [B, H, T, S]). The axis
    name defaults as in `sharded_lightning` ("seq" when the mesh has it; a mesh without a sequence axis
    leaves x as it is). T must be divisible by 2P. Works eagerly and under jit.

    >>> tokens_zz = to_zigzag(tokens, mesh)            # [B, T] or [B, T, H, D]
    >>> o = sharded_attention(q_zz, k_zz, v_zz, mesh=mesh, causal=True, layout="zigzag")
    >>> o = from_zigzag(o, mesh)
    """
    return _reorder(x, mesh, seq_axis, axis, inverse=False)


def from_zigzag(x, mesh, seq_axis=None, *, axis: int = 1):
    """The inverse of `to_zigzag`: back to the original sequence order."""
    return _reorder(x, mesh, seq_axis, axis, inverse=True)

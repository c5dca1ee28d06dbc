"""Serving lightning attention: a slot-indexed float32 state cache, one decode step, packed prefill into it.

The cache holds one recurrent state per slot, `cache: [num_slots, H, Dk, Dv]` float32 (docs/design.md,
"Serving"); a request owns one slot for its lifetime and `slot_idx` maps each row of a call (decode) or
each packed request (prefill) to its slot. `slot_idx = -1` marks a padding row: its output is 0 and no slot
changes (vLLM's convention). Both functions are pure, `(o, cache) = f(..., cache, ...)`; under
`jax.jit(..., donate_argnums=...)` with the cache donated the backends update it in place (xla: a gather of
the used slots and a scatter back into the donated buffer; triton: a kernel that aliases the cache through
`input_output_aliases`), so a step costs the used slots' states, not the cache.

With `mesh`, heads shard over `head_axis` (tensor parallelism): q, k, v and the cache are split by heads,
every shard runs the single-device step with the slopes of its own global heads, and nothing is
communicated.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardattn.lightning import _as_array, _concrete, check_and_derive, run_backends
from shardattn.meshes.specs import axis_size, resolve_axes
from shardattn.meshes.specs import place as place_on


def _check_cache(cache, slot_idx, num_rows, heads, dk, dv, rows):
    """cache [num_slots, H, Dk, Dv] float32; slot_idx [num_rows] int32 in [-1, num_slots), no duplicates."""
    if getattr(cache, "ndim", None) != 4 or tuple(cache.shape[1:]) != (heads, dk, dv):
        raise ValueError(
            f"cache must have shape [num_slots, heads, Dk, Dv]=[num_slots, {heads}, {dk}, {dv}], got "
            f"{jnp.shape(cache)}"
        )
    if cache.dtype != jnp.float32:
        raise TypeError(f"cache must be float32 (the recurrent states), got cache.dtype={cache.dtype}")
    num_slots = cache.shape[0]
    if num_slots < 1:
        raise ValueError(f"cache must have at least one slot, got {cache.shape=}")
    if getattr(slot_idx, "ndim", None) != 1 or slot_idx.shape[0] != num_rows:
        raise ValueError(f"slot_idx must have shape [{rows}]=({num_rows},), got {jnp.shape(slot_idx)}")
    if slot_idx.dtype != jnp.int32:
        raise TypeError(f"slot_idx must be int32, got slot_idx.dtype={slot_idx.dtype}")
    concrete = _concrete(slot_idx)
    if concrete is None:
        return  # traced: backends treat slots outside [0, num_slots) as padding; duplicates are undefined
    bad = concrete[(concrete < -1) | (concrete >= num_slots)]
    if bad.size:
        raise ValueError(f"slot_idx must be in [-1, {num_slots=}) (-1: padding row), got {bad.tolist()}")
    used, counts = np.unique(concrete[concrete >= 0], return_counts=True)
    if np.any(counts > 1):
        raise ValueError(
            f"slot_idx has duplicate slots {used[counts > 1].tolist()}: two rows cannot update one state"
        )


def _as_one_token(x):
    # [B, h, D] viewed as [B, 1, h, D] for lightning's shared checks (shapes and dtypes only, no data).
    return jax.ShapeDtypeStruct((x.shape[0], 1, *x.shape[1:]), x.dtype)


# ----------------------------------------------------------------------------------------------------
# Per device. `slot_idx` entries outside [0, num_slots) are padding.


def _prefill(implementations, scale, q, k, v, cache, slot_idx, slopes, cu_seqlens):
    num_slots = cache.shape[0]
    used = (slot_idx >= 0) & (slot_idx < num_slots)  # [N]
    # Padding requests index one past the end: the gather gives them a zero state without reading a slot
    # and the scatter drops their final state (a negative index would wrap onto the last slot).
    target = jnp.where(used, slot_idx, num_slots)
    initial_state = cache.at[target].get(mode="fill", fill_value=0.0)  # [N, h, Dk, Dv]
    o, final_state = run_backends(
        implementations, q, k, v, slopes, initial_state, cu_seqlens, scale=scale, reverse=False
    )
    request = jnp.searchsorted(cu_seqlens, jnp.arange(q.shape[1]), side="right") - 1  # [T]
    o = jnp.where(used[request][None, :, None, None], o, jnp.zeros_like(o))
    return o, cache.at[target].set(final_state, mode="drop")


def _decode(implementations, scale, q, k, v, cache, slot_idx, slopes):
    return run_backends(implementations, q, k, v, cache, slot_idx, slopes, function="decode", scale=scale)


# ----------------------------------------------------------------------------------------------------
# Tensor parallel: heads over one mesh axis, each shard on its own heads, no communication.


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static options of the per-shard function (hashable: the jitted shard_map is cached on it)."""

    prefill: bool
    implementations: tuple[str, ...]
    scale: float
    head_axis: str
    kv_replicated: bool  # k, v replicated over the head axis; each shard slices its one kv head


def _heads_spec(ndim, dim, axis):
    return P(*[axis if i == dim else None for i in range(ndim)])


def _per_shard(plan: _Plan, q, k, v, cache, slot_idx, slopes, *cu_seqlens):
    head_dim = 2 if plan.prefill else 1  # where the heads are in q, k, v
    if plan.kv_replicated:  # this shard's h query heads share the global kv head (rank * h) // group
        h = q.shape[head_dim]
        group = h * jax.lax.axis_size(plan.head_axis) // k.shape[head_dim]
        kv_head = jax.lax.axis_index(plan.head_axis) * h // group
        k, v = (jax.lax.dynamic_slice_in_dim(x, kv_head, 1, axis=head_dim) for x in (k, v))
    fn = _prefill if plan.prefill else _decode
    return fn(plan.implementations, plan.scale, q, k, v, cache, slot_idx, slopes, *cu_seqlens)


@functools.lru_cache(maxsize=64)
def _build(mesh, plan, in_specs, out_specs):
    shard = jax.shard_map(
        functools.partial(_per_shard, plan), mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=True
    )
    return jax.jit(shard)


def _head_parallel(mesh, head_axis, prefill, implementations, scale, q, k, v, cache, slot_idx, slopes,
                   cu_seqlens=None):  # fmt: skip
    axis = resolve_axes(mesh, batch_axis=(), seq_axis=(), head_axis=head_axis).heads
    if axis is None:
        raise ValueError(
            f"head_axis={head_axis!r}: the mesh (axes {mesh.axis_names}) has no 'heads' axis; name the axis "
            "to shard heads over"
        )
    shards = axis_size(mesh, axis)
    head_dim = 2 if prefill else 1
    H, Hkv = q.shape[head_dim], k.shape[head_dim]
    if H % shards:
        raise ValueError(f"num_heads={H} must be divisible by the size of mesh axis {axis!r}, {shards}")
    kv_replicated = Hkv % shards != 0
    if kv_replicated and shards % Hkv:
        raise ValueError(
            f"num_kv_heads={Hkv} (k, v) must be divisible by the size of mesh axis {axis!r}, {shards}, or "
            "divide it (then k, v are replicated over it)"
        )
    spec_q = _heads_spec(q.ndim, head_dim, axis)
    spec_kv = P() if kv_replicated else spec_q
    spec_cache = P(None, axis, None, None)
    in_specs = [spec_q, spec_kv, spec_kv, spec_cache, P(), P(axis)]
    args = [q, k, v, cache, slot_idx, slopes]
    if prefill:
        in_specs.append(P())
        args.append(cu_seqlens)
    # Inputs of any placement go to the specs (a no-op when they match, a constraint under jit).
    args = [place_on(x, NamedSharding(mesh, spec)) for x, spec in zip(args, in_specs, strict=True)]
    plan = _Plan(bool(prefill), implementations, scale, axis, kv_replicated)
    return _build(mesh, plan, tuple(in_specs), (spec_q, spec_cache))(*args)


# ----------------------------------------------------------------------------------------------------


def lightning_decode(
    q,
    k,
    v,
    cache,
    slot_idx,
    *,
    slopes=None,
    layer_idx=None,
    num_layers=None,
    decay="transnormer",
    scale=None,
    implementation=None,
    mesh=None,
    head_axis=None,
):
    """One decode step of lightning attention against a slot-indexed state cache.

    q: [B, H, Dk], k: [B, Hkv, Dk], v: [B, Hkv, Dv] (one new token per row, H divisible by Hkv),
    cache: [num_slots, H, Dk, Dv] float32, slot_idx: [B] int32 in [-1, num_slots). Row b updates slot
    s = slot_idx[b]: S = exp(-slope) * cache[s] + k_b^T v_b, o_b = scale * q_b S, cache[s] = S; rows with
    s = -1 are padding (o_b = 0, no slot changes). Slots must be distinct (checked when concrete).
    Decay and scale as in `lightning_attention`. Returns (o [B, H, Dv] in q's dtype, the new cache).
    Donate the cache under jit to update it in place. With `mesh`, heads shard over `head_axis`
    (default: the mesh's "heads" axis), without communication.

    >>> step = jax.jit(functools.partial(lightning_decode, layer_idx=0, num_layers=24), donate_argnums=3)
    >>> o, cache = step(q, k, v, cache, slot_idx)
    """
    # Array-likes (lists, numpy) as arrays; other types a TypeError naming the argument.
    q, k, v, cache, slot_idx = (
        _as_array(n, x) for n, x in (("q", q), ("k", k), ("v", v), ("cache", cache), ("slot_idx", slot_idx))
    )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 3:
            raise ValueError(
                f"{name} must be [batch, heads, head_dim] (one token per row), got shape {jnp.shape(x)}"
            )
    checked = check_and_derive(
        _as_one_token(q), _as_one_token(k), _as_one_token(v), slopes=slopes, layer_idx=layer_idx,
        num_layers=num_layers, decay=decay, scale=scale, initial_state=None, cu_seqlens=None,
        implementation=implementation,
    )  # fmt: skip
    slopes, scale, implementations = checked.slopes, checked.scale, checked.implementations
    B, H, Dk = q.shape
    _check_cache(cache, slot_idx, B, H, Dk, v.shape[2], "batch")
    if mesh is not None:
        return _head_parallel(
            mesh, head_axis, False, implementations, scale, q, k, v, cache, slot_idx, slopes
        )
    if head_axis is not None:
        raise ValueError(f"head_axis={head_axis!r} needs a mesh")
    return _decode(implementations, scale, q, k, v, cache, slot_idx, slopes)


def lightning_prefill(
    q,
    k,
    v,
    cache,
    slot_idx,
    cu_seqlens,
    *,
    slopes=None,
    layer_idx=None,
    num_layers=None,
    decay="transnormer",
    scale=None,
    implementation=None,
    mesh=None,
    head_axis=None,
):
    """Prefill of N packed requests, each continuing from its slot's state and writing its final state back.

    q: [1, T, H, Dk], k: [1, T, Hkv, Dk], v: [1, T, Hkv, Dv] (batch 1, requests packed along T),
    cu_seqlens: [N + 1] int (request i is tokens cu_seqlens[i]:cu_seqlens[i+1], any length, 0 included),
    cache: [num_slots, H, Dk, Dv] float32, slot_idx: [N] int32 in [-1, num_slots). Request i runs from
    cache[slot_idx[i]] and its final state replaces it; -1 marks a padding request (its tokens get o = 0,
    no slot changes). One backend call for all requests (lightning_attention with initial_state and
    cu_seqlens). Returns (o [1, T, H, Dv] in q's dtype, the new cache). Decay, scale, `implementation`,
    `mesh` and `head_axis` as in `lightning_decode`.

    >>> o, cache = lightning_prefill(q, k, v, cache, slot_idx, cu_seqlens, layer_idx=0, num_layers=24)
    """
    if cu_seqlens is None:
        raise ValueError("cu_seqlens must be given: [N + 1] request boundaries of the packed batch")
    cache, slot_idx = _as_array("cache", cache), _as_array("slot_idx", slot_idx)
    checked = check_and_derive(
        q, k, v, slopes=slopes, layer_idx=layer_idx, num_layers=num_layers, decay=decay, scale=scale,
        initial_state=None, cu_seqlens=cu_seqlens, implementation=implementation,
    )  # fmt: skip
    q, k, v, cu_seqlens = checked.q, checked.k, checked.v, checked.cu_seqlens
    slopes, scale, implementations = checked.slopes, checked.scale, checked.implementations
    _, _, H, Dk = q.shape
    _check_cache(cache, slot_idx, cu_seqlens.shape[0] - 1, H, Dk, v.shape[3], "number of requests")
    cu_seqlens = jnp.asarray(cu_seqlens, jnp.int32)
    if mesh is not None:
        return _head_parallel(
            mesh, head_axis, True, implementations, scale, q, k, v, cache, slot_idx, slopes, cu_seqlens
        )
    if head_axis is not None:
        raise ValueError(f"head_axis={head_axis!r} needs a mesh")
    return _prefill(implementations, scale, q, k, v, cache, slot_idx, slopes, cu_seqlens)

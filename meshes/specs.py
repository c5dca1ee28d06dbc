"""Meshes with the axes ("data", "seq", "heads") and the PartitionSpecs of [B, T, H, D] arrays on them.

Axis roles: the batch dimension shards over one or more mesh axes (`batch_axis`, a name or a tuple of
names), the sequence over one (`seq_axis`), the heads over one (`head_axis`). An argument left at None
takes the conventional name ("data", "seq", "heads") when the mesh has that axis and is unsharded
otherwise; `()` asks for unsharded explicitly. A name the mesh lacks is an error, never ignored.
"""

import math
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

try:  # jax.core.Tracer is the public name today; newer releases may keep only the private one
    from jax.core import Tracer as _Tracer
except ImportError:  # pragma: no cover
    from jax._src.core import Tracer as _Tracer

AXIS_NAMES = ("data", "seq", "heads")  # conventional names of the batch, sequence and head roles


class Axes(NamedTuple):
    """Resolved mesh axes of each role: a tuple of mesh axis names (empty = unsharded) for the batch,
    and one name or None for the sequence and the heads."""

    batch: tuple[str, ...]
    seq: str | None
    heads: str | None


def make_mesh(*, data: int = 1, seq: int = -1, heads: int = 1, devices=None) -> Mesh:
    """A Mesh with axes ("data", "seq", "heads") of the given sizes over `devices` (default: all).

    One size may be -1: it takes the devices the others leave. The axes are Auto (classic jit
    sharding propagation), like `jax.sharding.Mesh`; devices are laid out by `jax.make_mesh`, which
    puts neighbouring ranks of the last axes on neighbouring devices where the platform knows a topology.

    >>> mesh = make_mesh(data=2, seq=4)  # 8 devices: 2-way batch, 4-way sequence parallel
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "seq": seq, "heads": heads}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ValueError(f"{name}={size!r} must be a positive int or -1 (the remaining devices)")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"at most one axis size may be -1, got {sizes}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % known:
            raise ValueError(
                f"{len(devices)} devices cannot be split into {sizes} ({len(devices)} is not divisible by "
                f"the product of the fixed sizes, {known})"
            )
        sizes[free[0]] = len(devices) // known
    shape = tuple(int(sizes[name]) for name in AXIS_NAMES)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh shape data={shape[0]} x seq={shape[1]} x heads={shape[2]} = {math.prod(shape)} devices "
            f"does not match the {len(devices)} devices given"
        )
    auto = (jax.sharding.AxisType.Auto,) * len(AXIS_NAMES)
    return jax.make_mesh(shape, AXIS_NAMES, axis_types=auto, devices=devices)


def _check_name(mesh, role, name):
    if not isinstance(name, str):
        raise TypeError(f"{role}={name!r} must be a mesh axis name (str)")
    if name not in mesh.axis_names:
        raise ValueError(f"{role}={name!r} is not an axis of the mesh; its axes are {mesh.axis_names}")
    return name


def resolve_axes(mesh, batch_axis=None, seq_axis=None, head_axis=None) -> Axes:
    """Mesh axis names per role (see the module docstring); raises ValueError for names not in `mesh`."""

    def one(role, name, default):
        if name is None:
            return default if default in mesh.axis_names else None
        if name == ():
            return None
        return _check_name(mesh, role, name)

    if batch_axis is None:
        batch = ("data",) if "data" in mesh.axis_names else ()
    elif isinstance(batch_axis, str):
        batch = (_check_name(mesh, "batch_axis", batch_axis),)
    else:
        batch = tuple(_check_name(mesh, "batch_axis", n) for n in batch_axis)
    axes = Axes(batch, one("seq_axis", seq_axis, "seq"), one("head_axis", head_axis, "heads"))
    used = [*axes.batch, axes.seq, axes.heads]
    used = [n for n in used if n is not None]
    if len(set(used)) != len(used):
        raise ValueError(f"a mesh axis may serve only one role, got {axes}")
    return axes


def check_axes_used(mesh, axes: Axes) -> None:
    """Raises ValueError when a mesh axis of size > 1 serves none of the roles in `axes`.

    The public functions call this when some role was left at its default (None): an axis that no role
    uses makes every device along it compute the same result, which is almost never what was meant (a
    mesh with axes ("dp", "sp") and no axis arguments would run fully replicated). Passing every role
    explicitly, `()` included, is the way to replicate on purpose.
    """
    used = {*axes.batch, axes.seq, axes.heads}
    unused = [name for name in mesh.axis_names if name not in used and mesh.shape[name] > 1]
    if unused:
        sizes = {name: mesh.shape[name] for name in mesh.axis_names}
        raise ValueError(
            f"mesh axes {tuple(unused)} would serve no role (every device along them would compute the "
            f"same result): the mesh's axes are {sizes}, and the roles resolved to batch_axis="
            f"{axes.batch!r}, seq_axis={axes.seq!r}, head_axis={axes.heads!r} (None takes the names "
            f"{AXIS_NAMES} only). Pass batch_axis=, seq_axis= and/or head_axis= naming the mesh's axes "
            "(e.g. seq_axis=" + repr(unused[0]) + "), or pass every role explicitly (() to leave one "
            "unsharded) to replicate over the rest on purpose."
        )


def axis_size(mesh, names) -> int:
    """Number of shards along a role: the product of the sizes of its mesh axes (1 when unsharded)."""
    if names is None:
        return 1
    if isinstance(names, str):
        names = (names,)
    return math.prod(mesh.shape[n] for n in names)


def _batch_entry(batch):
    # A PartitionSpec entry: None, one name, or a tuple of names sharding one dimension.
    return None if not batch else batch[0] if len(batch) == 1 else tuple(batch)


def qkv_spec(mesh, batch_axis=None, seq_axis=None, head_axis=None) -> PartitionSpec:
    """PartitionSpec of a [B, T, H, D] array: batch, sequence and heads over their mesh axes.

    Axes of size 1 are kept (they split nothing); sharded_lightning drops them from its own specs.

    >>> qkv_spec(make_mesh(data=2, seq=4))  # 8 devices: axes data=2, seq=4, heads=1
    P('data', 'seq', 'heads', None)
    >>> qkv_spec(make_mesh(data=2, seq=4), head_axis=())
    P('data', 'seq', None, None)
    """
    axes = resolve_axes(mesh, batch_axis, seq_axis, head_axis)
    return PartitionSpec(_batch_entry(axes.batch), axes.seq, axes.heads, None)


def state_spec(mesh, batch_axis=None, head_axis=None, *, packed=False) -> PartitionSpec:
    """PartitionSpec of a state [B or N, H, Dk, Dv]: batch and heads sharded, replicated over the
    sequence axis. With packed sequences (cu_seqlens) the first dimension counts sequences, not batch
    rows, and is not sharded."""
    axes = resolve_axes(mesh, batch_axis, (), head_axis)
    return PartitionSpec(None if packed else _batch_entry(axes.batch), axes.heads, None, None)


def place(x, sharding: NamedSharding):
    """Puts x at `sharding`: eagerly a transfer (a no-op when already there), under jit a constraint.

    Under jit, device_put constrains only Explicit mesh axes (it is jax.sharding.reshard there); with
    Auto axes it leaves the sharding to propagation, so those get with_sharding_constraint instead.
    """
    if isinstance(x, _Tracer):
        auto = jax.sharding.AxisType.Auto
        types = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_types, strict=True))
        named = [
            n
            for entry in sharding.spec
            if entry is not None
            for n in (entry if isinstance(entry, tuple) else (entry,))
        ]
        if named and all(types[n] == auto for n in named):
            return jax.lax.with_sharding_constraint(x, sharding)
    return jax.device_put(x, sharding)


def shard_qkv(x, mesh, batch_axis=None, seq_axis=None, head_axis=None):
    """Places a [B, T, H, D] array on `mesh` with `qkv_spec` (a no-op when already placed so).

    Works on numpy arrays, on jax.Arrays of any placement, and inside jax.jit (as a sharding
    constraint), for meshes with Auto or Explicit axes. Every sharded dimension must be divisible by its
    axis size (ValueError otherwise; sharded_lightning takes unplaced arrays of any length and pads).
    """
    spec = qkv_spec(mesh, batch_axis, seq_axis, head_axis)
    shape = np.shape(x)
    if len(shape) != 4:
        raise ValueError(f"shard_qkv takes a [batch, seq, heads, head_dim] array, got shape {shape}")
    for dim, (what, entry) in enumerate(zip(("batch", "seq", "heads"), spec[:3], strict=True)):
        shards = axis_size(mesh, entry)
        if shape[dim] % shards:
            hint = (
                "pass the arrays unplaced to sharded_lightning, which pads the sequence itself"
                if what == "seq"
                else f"leave that role unsharded ({what.rstrip('s')}_axis=())"
            )
            raise ValueError(
                f"shard_qkv: {what}={shape[dim]} (dimension {dim} of shape {shape}) is not divisible by "
                f"the size of mesh axis {entry!r}, {shards}; {hint}"
            )
    return place(x, NamedSharding(mesh, spec))

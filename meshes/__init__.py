"""Mesh construction and partition specs (installed as shardattn.meshes). No kernels here."""

from shardattn.meshes.devices import use_fake_cpu_devices
from shardattn.meshes.specs import (
    AXIS_NAMES,
    Axes,
    axis_size,
    make_mesh,
    place,
    qkv_spec,
    resolve_axes,
    shard_qkv,
    state_spec,
)
from shardattn.meshes.zigzag import from_zigzag, to_zigzag, zigzag_order

__all__ = [
    "AXIS_NAMES",
    "Axes",
    "axis_size",
    "from_zigzag",
    "make_mesh",
    "place",
    "qkv_spec",
    "resolve_axes",
    "shard_qkv",
    "state_spec",
    "to_zigzag",
    "use_fake_cpu_devices",
    "zigzag_order",
]

"""Mesh construction and partition specs (installed as shardattn.meshes). No kernels here."""

from shardattn.meshes.devices import use_fake_cpu_devices

__all__ = ["use_fake_cpu_devices"]

"""shardattn: lightning and softmax attention for JAX, per device and on multi-device meshes."""

from shardattn.attention import flash_attention, merge_attention
from shardattn.decay import DECAY_PRESETS, decay_slopes
from shardattn.lightning import lightning_attention
from shardattn.sharded import sharded_lightning

__all__ = [
    "DECAY_PRESETS",
    "decay_slopes",
    "flash_attention",
    "lightning_attention",
    "merge_attention",
    "sharded_lightning",
]

"""shardattn: lightning and softmax attention for JAX, per device and on multi-device meshes."""

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)

from shardattn.attention import flash_attention, merge_attention  # noqa: E402
from shardattn.checks import debug_checks  # noqa: E402
from shardattn.decay import DECAY_PRESETS, decay_slopes  # noqa: E402
from shardattn.lightning import lightning_attention  # noqa: E402
from shardattn.serving import lightning_decode, lightning_prefill  # noqa: E402
from shardattn.sharded import sharded_lightning  # noqa: E402
from shardattn.sharded_attention import sharded_attention  # noqa: E402

__all__ = [
    "DECAY_PRESETS",
    "__version__",
    "debug_checks",
    "decay_slopes",
    "flash_attention",
    "lightning_attention",
    "lightning_decode",
    "lightning_prefill",
    "merge_attention",
    "sharded_attention",
    "sharded_lightning",
]

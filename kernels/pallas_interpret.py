"""Where shardattn's Pallas TPU kernels run: compiled by Mosaic on a TPU, or in the TPU interpreter on CPU.

The TPU interpreter (`pltpu.InterpretParams`) checks TPU semantics (VMEM/SMEM, the block pipeline,
out-of-bounds reads; unwritten memory reads as NaN), so CPU tests catch what a TPU would get wrong. Speed
and Mosaic's own passes are not checked this way.
"""

import jax
from jax.experimental.pallas import tpu as pltpu


def interpret_mode(on_gpu: str):
    """pallas_call's `interpret`: False on TPU, the TPU interpreter on CPU; on GPU NotImplementedError
    naming `on_gpu`, the backends to use there instead."""
    platform = jax.default_backend()
    if platform == "tpu":
        return False
    if platform == "cpu":
        return pltpu.InterpretParams()
    raise NotImplementedError(f"the pallas backend targets TPU (Mosaic); use {on_gpu} on GPU")

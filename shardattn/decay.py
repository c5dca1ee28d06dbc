"""Decay presets for lightning attention: per-head slopes s_h >= 0, decay lam_h = exp(-s_h)."""

import numpy as np

DECAY_PRESETS = ("transnormer", "minimax")


def decay_slopes(num_heads: int, layer_idx: int, num_layers: int, decay: str = "transnormer"):
    """Per-head slopes for layer `layer_idx` of `num_layers`, as float32 numpy `[num_heads]`.

    - "transnormer" (fla, ejkernel): s_h = (8 / H) * (1 - l / L) * h; head 0 does not decay.
    - "minimax" (MiniMax-01's own model code): s_h = 2^(-8 (h + 1) / H) * (1 - l / (L - 1 + 1e-5) + 1e-5),
      for every H (vLLM/sglang's ALiBi interleave agrees only for H a power of two).

    >>> decay_slopes(4, 0, 2)
    array([0., 2., 4., 6.], dtype=float32)
    """
    for name, value in (("num_heads", num_heads), ("layer_idx", layer_idx), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if num_heads < 1:
        raise ValueError(f"{num_heads=} must be >= 1")
    if num_layers < 1:
        raise ValueError(f"{num_layers=} must be >= 1")
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"{layer_idx=} must be in [0, {num_layers=})")
    h = np.arange(num_heads, dtype=np.float64)
    if decay == "transnormer":
        slopes = (8.0 / num_heads) * (1.0 - layer_idx / num_layers) * h
    elif decay == "minimax":
        base = 2.0 ** (-8.0 * (h + 1.0) / num_heads)
        slopes = base * (1.0 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5)
    else:
        raise ValueError(f"decay={decay!r} must be one of {DECAY_PRESETS}")
    return slopes.astype(np.float32)

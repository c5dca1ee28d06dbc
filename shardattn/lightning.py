"""Single-device lightning attention: argument checks, decay presets and backend choice.

The maths lives in shardattn.kernels.lightning (reference.py is the contract); this layer derives the
slopes and the scale once, checks every argument before any kernel runs, and tries the requested
backends in order.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from shardattn.decay import decay_slopes
from shardattn.kernels.lightning import BACKENDS, get_backend

# Backends tried, in order, when implementation=None, by jax.default_backend().
DEFAULT_IMPLEMENTATIONS = {"gpu": ("triton", "xla"), "tpu": ("pallas", "xla")}


def _concrete(x):
    """x as a numpy array when its value is known at trace time, else None."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_float(name, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {name}.dtype={x.dtype}")


def resolve_implementations(implementation) -> tuple[str, ...]:
    """implementation=None | name | sequence of names -> the tuple of backend names to try."""
    if implementation is None:
        return DEFAULT_IMPLEMENTATIONS.get(jax.default_backend(), ("xla",))
    names = (implementation,) if isinstance(implementation, str) else implementation
    if not isinstance(names, Sequence) or not names:
        raise ValueError(f"implementation={implementation!r} must be None, a name or a non-empty sequence")
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"implementation {name!r} is not one of {tuple(BACKENDS)}")
    return tuple(names)


def check_and_derive(
    q, k, v, *, slopes, layer_idx, num_layers, decay, scale, initial_state, cu_seqlens, implementation
):
    """Checks every argument of lightning_attention; returns (slopes [H] f32, scale, implementations).

    Raises ValueError/TypeError naming the argument and the constraint.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {jnp.shape(x)}")
        _check_float(name, x)
    B, T, H, Dk = q.shape
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T):
        raise ValueError(f"q, k, v must share [batch, seq]: {q.shape=}, {k.shape=}, {v.shape=}")
    Hkv = k.shape[2]
    if v.shape[2] != Hkv:
        raise ValueError(f"k and v must have the same number of heads: {k.shape=}, {v.shape=}")
    if k.shape[3] != Dk:
        raise ValueError(f"q and k must have the same head_dim: {q.shape=}, {k.shape=}")
    if H % Hkv:
        raise ValueError(f"num_heads={H} (q) must be divisible by num_kv_heads={Hkv} (k, v)")
    if T < 1 or B < 1:
        raise ValueError(f"q must have batch and seq of at least 1, got {q.shape=}")
    Dv = v.shape[3]

    if slopes is not None:
        if layer_idx is not None or num_layers is not None:
            raise ValueError("pass either slopes or layer_idx/num_layers (a decay preset), not both")
        _check_float("slopes", jnp.asarray(slopes))
        if jnp.shape(slopes) != (H,):
            raise ValueError(f"slopes must have shape [num_heads]=({H},), got {jnp.shape(slopes)}")
        concrete = _concrete(slopes)
        if concrete is not None and (not np.all(np.isfinite(concrete)) or np.any(concrete < 0)):
            raise ValueError(f"slopes must be finite and >= 0 (decay exp(-slope) <= 1), got {concrete}")
        slopes = jnp.asarray(slopes, jnp.float32)
    else:
        if layer_idx is None or num_layers is None:
            raise ValueError("pass slopes, or layer_idx and num_layers to use a decay preset")
        slopes = jnp.asarray(decay_slopes(H, layer_idx, num_layers, decay))

    if scale is None:
        scale = Dk**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a Python number, got {type(scale).__name__}")
    scale = float(scale)

    if cu_seqlens is not None:
        if getattr(cu_seqlens, "ndim", None) != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got {jnp.shape(cu_seqlens)}")
        if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
            raise TypeError(f"cu_seqlens must have an integer dtype, got {cu_seqlens.dtype}")
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch 1 (packed sequences), got batch={B}")
        concrete = _concrete(cu_seqlens)
        if concrete is not None:
            if concrete[0] != 0:
                raise ValueError(f"cu_seqlens must start at 0, got {concrete[0]}")
            if np.any(np.diff(concrete) < 0):
                raise ValueError(f"cu_seqlens must be non-decreasing, got {concrete}")
            if concrete[-1] != T:
                raise ValueError(f"cu_seqlens must end at seq={T}, got {concrete[-1]}")
    num_states = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is not None:
        _check_float("initial_state", initial_state)
        want = (num_states, H, Dk, Dv)
        if tuple(initial_state.shape) != want:
            what = "batch" if cu_seqlens is None else "number of sequences"
            raise ValueError(
                f"initial_state must have shape [{what}, heads, Dk, Dv]={want}, got {initial_state.shape}"
            )
    return slopes, scale, resolve_implementations(implementation)


# JAX's words when jax.jvp / jax.jacfwd meet a jax.custom_vjp function (the Triton and Pallas kernels, and
# sharded_lightning's sequence shards without cu_seqlens, have custom backward rules).
_JAX_JVP_REFUSAL = "can't apply forward-mode autodiff"


def is_forward_mode_refusal(err: Exception) -> bool:
    return isinstance(err, TypeError) and _JAX_JVP_REFUSAL in str(err)


def forward_mode_error(function: str, path: str) -> TypeError:
    """Our error for forward-mode autodiff through a custom_vjp path: what is refused and what works."""
    return TypeError(
        f"{function}: forward-mode autodiff (jax.jvp, jax.jacfwd, jax.linearize) is not supported on "
        f"{path}, whose gradient is a custom backward rule (jax.custom_vjp). Use reverse mode (jax.grad, "
        "jax.vjp, jax.jacrev), or implementation='xla' (or 'reference') on one device, on batch and head "
        "shards, or on sequence shards with cu_seqlens: those support both modes."
    )


def run_backends(implementations, *args, function="lightning_attention", **kwargs):
    """Calls `function` of the first backend in `implementations` that can serve the call."""
    reasons = []
    for name in implementations:
        try:
            return get_backend(name, function)(*args, **kwargs)
        except NotImplementedError as err:
            reasons.append(f"{name}: {err}")
    raise NotImplementedError("no lightning backend could serve this call:\n  " + "\n  ".join(reasons))


def lightning_attention(
    q,
    k,
    v,
    *,
    slopes=None,
    layer_idx=None,
    num_layers=None,
    decay="transnormer",
    scale=None,
    initial_state=None,
    reverse=False,
    cu_seqlens=None,
    return_state=False,
    implementation=None,
):
    """Lightning attention (linear attention with a per-head decay) on one device.

    q: [B, T, H, Dk], k: [B, T, Hkv, Dk], v: [B, T, Hkv, Dv] with H divisible by Hkv (GQA).
    Decay per head: explicit `slopes` [H] (learnable; decay exp(-slope)), or the preset `decay` for
    `layer_idx` of `num_layers`. `scale` defaults to Dk ** -0.5. `initial_state`: [B, H, Dk, Dv], or
    [N, H, Dk, Dv] with `cu_seqlens` [N + 1] (batch 1, packed sequences). Returns o [B, T, H, Dv] in
    q's dtype, and with return_state=True also the float32 final state.

    >>> o = lightning_attention(q, k, v, layer_idx=0, num_layers=24)
    """
    slopes, scale, implementations = check_and_derive(
        q, k, v, slopes=slopes, layer_idx=layer_idx, num_layers=num_layers, decay=decay, scale=scale,
        initial_state=initial_state, cu_seqlens=cu_seqlens, implementation=implementation,
    )  # fmt: skip
    if cu_seqlens is not None:
        cu_seqlens = jnp.asarray(cu_seqlens, jnp.int32)
    try:
        o, final_state = run_backends(
            implementations, q, k, v, slopes, initial_state, cu_seqlens, scale=scale, reverse=bool(reverse)
        )
    except TypeError as err:
        if not is_forward_mode_refusal(err):
            raise
        path = f"the Triton and Pallas kernels (this call: implementation={implementations})"
        raise forward_mode_error("lightning_attention", path) from err
    return (o, final_state) if return_state else o

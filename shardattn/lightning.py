"""Single-device lightning attention: argument checks, decay presets and backend choice.

The maths lives in shardattn.kernels.lightning (reference.py is the contract); this layer derives the
slopes and the scale once, checks every argument before any kernel runs, and tries the requested
backends in order, inside one cached jitted function per set of static options (so that an eager call
costs about what a jitted one does). docs/design.md describes the layers.
"""

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from shardattn.checks import check_traced
from shardattn.decay import decay_slopes
from shardattn.kernels.lightning import BACKENDS, get_backend

try:  # jax.core.Tracer is the public name today; newer releases may keep only the private one
    from jax.core import Tracer as _Tracer
except ImportError:  # pragma: no cover
    from jax._src.core import Tracer as _Tracer

# Backends tried, in order, when implementation=None, by jax.default_backend(). mosaic_gpu serves Hopper
# at Dk = 128, where its kernels measured faster (the forward walk; in bf16 also the backward's G walk and,
# at Dv = 128, its chunk kernel); the rest of its gradients are triton's (see its docstring).
DEFAULT_IMPLEMENTATIONS = {"gpu": ("mosaic_gpu", "triton", "xla"), "tpu": ("pallas", "xla")}


def _concrete(x):
    """x as a numpy array when its value is known at trace time, else None."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _as_array(name, x):
    """x as an array: jax.Arrays (tracers included) and numpy arrays as they are, array-likes (nested
    lists, scalars) through jnp.asarray; anything else is a TypeError naming the argument. Shape-only
    stand-ins (jax.ShapeDtypeStruct: serving checks one decode token as a [B, 1, H, D] sequence) pass too."""
    if isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be an array (jax.Array, numpy array or nested list of numbers), "
            f"got {type(x).__name__}: {err}"
        ) from None


def _check_bool(name, x):
    # bool(x) would turn reverse="no" into True: only real booleans are accepted.
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got {type(x).__name__} {x!r}")
    return bool(x)


def _check_float(name, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {name}.dtype={x.dtype}")


def choose_implementations(implementation, defaults: dict, backends: dict) -> tuple[str, ...]:
    """implementation=None (the platform's entry of `defaults`, else ("xla",)) | a name | a sequence of
    names, each a key of `backends` -> the tuple of backend names to try, in order."""
    if implementation is None:
        return defaults.get(jax.default_backend(), ("xla",))
    names = (implementation,) if isinstance(implementation, str) else implementation
    if not isinstance(names, Sequence) or not names:
        raise ValueError(f"implementation={implementation!r} must be None, a name or a non-empty sequence")
    for name in names:
        if name not in backends:
            raise ValueError(f"implementation {name!r} is not one of {tuple(backends)}")
    return tuple(names)


def resolve_implementations(implementation) -> tuple[str, ...]:
    """implementation=None | name | sequence of names -> the tuple of lightning backend names to try."""
    return choose_implementations(implementation, DEFAULT_IMPLEMENTATIONS, BACKENDS)


class Checked(NamedTuple):
    """The arguments of lightning_attention after check_and_derive: arrays, derived slopes and scale."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    slopes: jax.Array  # [H] float32
    scale: float
    initial_state: jax.Array | None
    cu_seqlens: jax.Array | None  # int32
    reverse: bool
    return_state: bool
    implementations: tuple[str, ...]


def check_and_derive(
    q, k, v, *, slopes, layer_idx, num_layers, decay, scale, initial_state, cu_seqlens, implementation,
    reverse=False, return_state=False,
) -> Checked:  # fmt: skip
    """Checks every argument of lightning_attention and derives the slopes and the scale once.

    Array-likes (lists, numpy) are accepted for q, k, v, slopes, initial_state and cu_seqlens. Values
    known at trace time are checked here; values known only under tracing (slopes, cu_seqlens,
    initial_state of a jitted function) get checkify checks when shardattn.debug_checks is on.
    Raises ValueError/TypeError naming the argument and the constraint.
    """
    q, k, v = (_as_array(name, x) for name, x in (("q", q), ("k", k), ("v", v)))
    reverse = _check_bool("reverse", reverse)
    return_state = _check_bool("return_state", return_state)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
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
        slopes = _as_array("slopes", slopes)
        _check_float("slopes", slopes)
        if slopes.shape != (H,):
            raise ValueError(f"slopes must have shape [num_heads]=({H},), got {slopes.shape}")
        concrete = _concrete(slopes)
        if concrete is not None and (not np.all(np.isfinite(concrete)) or np.any(concrete < 0)):
            raise ValueError(f"slopes must be finite and >= 0 (decay exp(-slope) <= 1), got {concrete}")
        slopes = jnp.asarray(slopes, jnp.float32)
        if concrete is None:
            check_traced(
                lambda: jnp.all(jnp.isfinite(slopes) & (slopes >= 0)),
                "slopes must be finite and >= 0 (decay exp(-slope) <= 1), got {slopes}",
                slopes=slopes,
            )
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
        cu_seqlens = _as_array("cu_seqlens", cu_seqlens)
        if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {cu_seqlens.shape}")
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
        cu_seqlens = jnp.asarray(cu_seqlens, jnp.int32)
        if concrete is None:
            cu = cu_seqlens
            check_traced(lambda: cu[0] == 0, "cu_seqlens must start at 0, got {cu}", cu=cu)
            check_traced(
                lambda: jnp.all(cu[1:] >= cu[:-1]), "cu_seqlens must be non-decreasing, got {cu}", cu=cu
            )
            check_traced(lambda: cu[-1] == T, f"cu_seqlens must end at seq={T}, got {{cu}}", cu=cu)
    num_states = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is not None:
        initial_state = _as_array("initial_state", initial_state)
        _check_float("initial_state", initial_state)
        want = (num_states, H, Dk, Dv)
        if tuple(initial_state.shape) != want:
            what = "batch" if cu_seqlens is None else "number of sequences"
            raise ValueError(
                f"initial_state must have shape [{what}, heads, Dk, Dv]={want}, got {initial_state.shape}"
            )
        # Only with debug_checks on (also for concrete values: checking them always would copy the
        # state to the host on every eager call).
        check_traced(lambda: jnp.all(jnp.isfinite(initial_state)), "initial_state must be finite")
    return Checked(
        q, k, v, slopes, scale, initial_state, cu_seqlens, reverse, return_state,
        resolve_implementations(implementation),
    )  # fmt: skip


# JAX's words when jax.jvp / jax.jacfwd meet a jax.custom_vjp function (the Triton, Mosaic GPU and Pallas
# kernels, and sharded_lightning's sequence shards without cu_seqlens, have custom backward rules).
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


@dataclasses.dataclass(frozen=True)
class _Options:
    """Static options of one lightning_attention call (hashable: the key of the jitted function)."""

    scale: float
    reverse: bool
    return_state: bool
    implementations: tuple[str, ...]


TRACES = [0]  # how many times _run was traced (tests check that repeated eager calls do not retrace)


def _run(options: _Options, q, k, v, slopes, initial_state, cu_seqlens):
    TRACES[0] += 1
    o, final_state = run_backends(
        options.implementations, q, k, v, slopes, initial_state, cu_seqlens,
        scale=options.scale, reverse=options.reverse,
    )  # fmt: skip
    return (o, final_state) if options.return_state else o


# Eager calls run this: one compiled program per shapes and options, cached, instead of the backend's
# ops dispatched one by one (~100x slower). Traced calls (under the caller's jit, grad, vmap) run _run
# directly: inside a trace there is nothing to gain, and a cached inner trace would hide changes that
# tests make to a backend's module-level settings (tests/test_triton_gpu.py's block sizes).
_run_jitted = jax.jit(_run, static_argnums=0)


def _is_traced(*arrays) -> bool:
    return any(isinstance(x, _Tracer) for x in arrays)


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
    x = check_and_derive(
        q, k, v, slopes=slopes, layer_idx=layer_idx, num_layers=num_layers, decay=decay, scale=scale,
        initial_state=initial_state, cu_seqlens=cu_seqlens, implementation=implementation,
        reverse=reverse, return_state=return_state,
    )  # fmt: skip
    options = _Options(x.scale, x.reverse, x.return_state, x.implementations)
    arrays = (x.q, x.k, x.v, x.slopes, x.initial_state, x.cu_seqlens)
    try:
        return (_run if _is_traced(*arrays) else _run_jitted)(options, *arrays)
    except TypeError as err:
        if not is_forward_mode_refusal(err):
            raise
        path = f"the Triton, Mosaic GPU and Pallas kernels (this call: implementation={x.implementations})"
        raise forward_mode_error("lightning_attention", path) from err

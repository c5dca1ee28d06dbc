"""Single-device softmax attention: argument checks, derived values, backend choice, and the merge of
partial results.

The maths lives in shardattn.kernels.attention (reference.py is the contract). This layer checks every
argument before any kernel runs, derives once what the backends share (scale, the normalised window,
default positions, segment ids and positions from cu_seqlens, sinks as [H, n]), and tries the requested
backends in order.
"""


import jax
import jax.numpy as jnp
import numpy as np

from shardattn.kernels.attention import BACKENDS, get_backend
from shardattn.kernels.attention.options import AttentionOptions
from shardattn.lightning import choose_implementations

# Backends tried, in order, when implementation=None, by jax.default_backend(); ("xla",) elsewhere.
DEFAULT_IMPLEMENTATIONS = {"gpu": ("cudnn", "triton", "xla"), "tpu": ("pallas", "xla")}
_INT32_MAX = int(np.iinfo(np.int32).max)


def _concrete(x):
    """x as a numpy array when its value is known at trace time, else None."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _is_number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating))


def _is_int(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, np.integer))


def _check_float(name, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {name}.dtype={x.dtype}")


def _check_int_array(name, x, shape):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an integer array of shape {shape}, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {name}.dtype={x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")


def resolve_implementations(implementation) -> tuple[str, ...]:
    """implementation=None | name | sequence of names -> the tuple of softmax backend names to try."""
    return choose_implementations(implementation, DEFAULT_IMPLEMENTATIONS, BACKENDS)


def _normalise_window(sliding_window, causal):
    """None | w | (left, right) -> None | (left, right) with causal cutting the right side to 0."""
    if sliding_window is None:
        return None
    if _is_int(sliding_window):
        pair = (sliding_window, sliding_window)
    elif isinstance(sliding_window, (tuple, list)) and len(sliding_window) == 2:
        pair = tuple(sliding_window)
    else:
        raise TypeError(
            f"sliding_window must be None, an int or a (left, right) pair, got {sliding_window!r}"
        )
    for side, w in zip(("left", "right"), pair, strict=True):
        if not _is_int(w):
            raise TypeError(f"sliding_window {side}={w!r} must be a Python int")
        if not 0 <= w <= _INT32_MAX:
            raise ValueError(f"sliding_window {side}={w} must be in [0, {_INT32_MAX}]")
    left, right = int(pair[0]), int(pair[1])
    return (left, 0 if causal else right)


def _check_cu_seqlens(name, cu, total):
    if getattr(cu, "ndim", None) != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries, got shape {jnp.shape(cu)}")
    if not jnp.issubdtype(cu.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {cu.dtype}")
    concrete = _concrete(cu)
    if concrete is not None:
        if concrete[0] != 0:
            raise ValueError(f"{name} must start at 0, got {concrete[0]}")
        if np.any(np.diff(concrete) < 0):
            raise ValueError(f"{name} must be non-decreasing, got {concrete}")
        if concrete[-1] != total:
            raise ValueError(f"{name} must end at the sequence length {total}, got {concrete[-1]}")


def _varlen(cu_q, cu_k, T, S):
    """Packed sequences -> (q_segment_ids [1, T], kv_segment_ids [1, S], q_positions, kv_positions).

    Token t belongs to the last sequence n with cu[n] <= t (empty sequences own no token). Positions are
    per sequence and end-aligned: query i of sequence n sits at kv_len_n - q_len_n + i, key j at j.
    """
    cu_q = jnp.asarray(cu_q, jnp.int32)
    cu_k = jnp.asarray(cu_k, jnp.int32)
    n = cu_q.shape[0] - 1
    t = jnp.arange(T, dtype=jnp.int32)
    s = jnp.arange(S, dtype=jnp.int32)
    seq_q = jnp.clip(jnp.searchsorted(cu_q, t, side="right") - 1, 0, n - 1).astype(jnp.int32)
    seq_k = jnp.clip(jnp.searchsorted(cu_k, s, side="right") - 1, 0, n - 1).astype(jnp.int32)
    q_len = cu_q[1:] - cu_q[:-1]
    k_len = cu_k[1:] - cu_k[:-1]
    q_pos = k_len[seq_q] - q_len[seq_q] + (t - cu_q[seq_q])
    kv_pos = s - cu_k[seq_k]
    return seq_q[None], seq_k[None], q_pos[None], kv_pos[None]


def check_and_derive(
    q, k, v, *, causal, scale, sliding_window, logits_soft_cap, sinks, bias, q_segment_ids, kv_segment_ids,
    cu_seqlens_q, cu_seqlens_k, q_positions, kv_positions, dropout_rate, dropout_rng, implementation,
):  # fmt: skip
    """Checks every argument of flash_attention; returns (backend keywords, implementations).

    Raises ValueError/TypeError naming the argument and the constraint.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {jnp.shape(x)}")
        _check_float(name, x)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    B, T, H, Dk = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"q, k, v must share the batch size: {q.shape=}, {k.shape=}, {v.shape=}")
    if v.shape[1:3] != (S, Hkv):
        raise ValueError(f"k and v must share [seq, heads]: {k.shape=}, {v.shape=}")
    if k.shape[3] != Dk:
        raise ValueError(f"q and k must have the same head_dim: {q.shape=}, {k.shape=}")
    if min(B, T, S, H, Hkv, Dk, v.shape[3]) < 1:
        raise ValueError(f"every dimension must be at least 1: {q.shape=}, {k.shape=}, {v.shape=}")
    if H % Hkv:
        raise ValueError(f"num_heads={H} (q) must be divisible by num_kv_heads={Hkv} (k, v)")

    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if scale is None:
        scale = Dk**-0.5
    if not _is_number(scale):
        raise TypeError(f"scale must be a Python number, got {type(scale).__name__}")
    window = _normalise_window(sliding_window, causal)
    if logits_soft_cap is not None:
        if not _is_number(logits_soft_cap):
            raise TypeError(f"logits_soft_cap must be None or a Python number, got {logits_soft_cap!r}")
        if not logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap must be > 0, got {logits_soft_cap}")
        logits_soft_cap = float(logits_soft_cap)
    if not _is_number(dropout_rate):
        raise TypeError(f"dropout_rate must be a Python number, got {dropout_rate!r}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    if dropout_rate > 0:
        if dropout_rng is None:
            raise ValueError(f"dropout_rate={dropout_rate} > 0 needs a dropout_rng (a PRNG key)")
        is_key = jax.dtypes.issubdtype(getattr(dropout_rng, "dtype", None), jax.dtypes.prng_key)
        if not is_key and not (
            getattr(dropout_rng, "dtype", None) == jnp.uint32 and dropout_rng.shape == (2,)
        ):
            raise TypeError(
                f"dropout_rng must be a PRNG key (jax.random.key or PRNGKey), got {dropout_rng!r}"
            )
    else:
        dropout_rng = None  # unused at rate 0

    if sinks is not None:
        if not hasattr(sinks, "dtype"):
            sinks = jnp.asarray(sinks)
        _check_float("sinks", sinks)
        if sinks.shape == (H,):
            sinks = sinks[:, None]
        if sinks.ndim != 2 or sinks.shape[0] != H or sinks.shape[1] < 1:
            raise ValueError(
                f"sinks must have shape [num_heads]=({H},) or [{H}, num_sinks], got {sinks.shape}"
            )
        sinks = sinks.astype(jnp.float32)
    if bias is not None:
        if getattr(bias, "ndim", None) != 4:
            raise ValueError(f"bias must be [batch or 1, heads or 1, T, S], got shape {jnp.shape(bias)}")
        _check_float("bias", bias)
        Bb, Hb, Tb, Sb = bias.shape
        if Bb not in (1, B) or Hb not in (1, H) or (Tb, Sb) != (T, S):
            raise ValueError(
                f"bias shape {bias.shape} does not broadcast to [batch, heads, T, S]=({B}, {H}, {T}, {S}) "
                f"(allowed: [{B} or 1, {H} or 1, {T}, {S}])"
            )

    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None:
        _check_int_array("q_segment_ids", q_segment_ids, (B, T))
        _check_int_array("kv_segment_ids", kv_segment_ids, (B, S))
        q_segment_ids = jnp.asarray(q_segment_ids, jnp.int32)
        kv_segment_ids = jnp.asarray(kv_segment_ids, jnp.int32)
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("pass both cu_seqlens_q and cu_seqlens_k, or neither")
    if cu_seqlens_q is not None:
        if q_segment_ids is not None:
            raise ValueError(
                "pass either cu_seqlens_q/k or q/kv_segment_ids (two forms of packing), not both"
            )
        if B != 1:
            raise ValueError(f"cu_seqlens_q/k need batch 1 (packed sequences), got batch={B}")
        if not hasattr(cu_seqlens_q, "shape"):  # a list or tuple of ints
            cu_seqlens_q = np.asarray(cu_seqlens_q)
        if not hasattr(cu_seqlens_k, "shape"):
            cu_seqlens_k = np.asarray(cu_seqlens_k)
        _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, T)
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, S)
        if cu_seqlens_q.shape != cu_seqlens_k.shape:
            raise ValueError(
                f"cu_seqlens_q and cu_seqlens_k must have the same number of sequences, got "
                f"{cu_seqlens_q.shape} and {cu_seqlens_k.shape}"
            )
        q_segment_ids, kv_segment_ids, q_pos, kv_pos = _varlen(cu_seqlens_q, cu_seqlens_k, T, S)
    else:
        # numpy, so that a backend can see at trace time that these are the default positions
        q_pos = np.broadcast_to(np.arange(S - T, S, dtype=np.int32), (B, T))
        kv_pos = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))
    if q_positions is not None:
        _check_int_array("q_positions", q_positions, (B, T))
        q_pos = jnp.asarray(q_positions, jnp.int32)
    if kv_positions is not None:
        _check_int_array("kv_positions", kv_positions, (B, S))
        kv_pos = jnp.asarray(kv_positions, jnp.int32)

    options = AttentionOptions(
        scale=float(scale), causal=causal, window=window, soft_cap=logits_soft_cap,
        dropout_rate=float(dropout_rate),
    )  # fmt: skip
    keywords = dict(
        bias=bias, sinks=sinks, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        q_positions=q_pos, kv_positions=kv_pos, dropout_rng=dropout_rng, options=options,
    )  # fmt: skip
    return keywords, resolve_implementations(implementation)


def run_backends(implementations, q, k, v, *, return_lse=True, **keywords):
    """(o, lse) from the first backend in `implementations` that can serve the call.

    With return_lse=False a backend's `output` function (o only; cudnn has one) is used where it exists,
    and lse is None.
    """
    reasons = []
    for name in implementations:
        try:
            if not return_lse:
                try:
                    output = get_backend(name, "output")
                except NotImplementedError:
                    pass
                else:
                    return output(q, k, v, **keywords), None
            return get_backend(name, "attention")(q, k, v, **keywords)
        except NotImplementedError as err:
            reasons.append(f"{name}: {err}")
    raise NotImplementedError(
        "no softmax attention backend could serve this call:\n  " + "\n  ".join(reasons)
    )


def flash_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    scale: float | None = None,
    sliding_window: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    sinks=None,
    bias=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    q_positions=None,
    kv_positions=None,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    return_residuals: bool = False,
    implementation=None,
):
    """Softmax attention on one device, with masks from positions.

    q: [B, T, H, Dk], k: [B, S, Hkv, Dk], v: [B, S, Hkv, Dv], H divisible by Hkv (GQA/MQA read natively).
    Returns o [B, T, H, Dv] in q's dtype (softmax in float32), and with return_residuals=True also
    lse [B, H, T] float32 (log-sum-exp of each row, sinks included; -inf for a row with nothing allowed).

    - positions: q_positions [B, T] / kv_positions [B, S] int32, by default kv arange(S) and queries
      aligned to the end of the keys, S - T + arange(T). causal: q_pos >= kv_pos.
    - sliding_window: (left, right) or w = (w, w): query at position i sees keys at i - left ... i + right
      inclusive (with causal, right is cut to 0). logits_soft_cap c: c * tanh(logits / c) before masking.
    - sinks [H] or [H, n]: logits joining every row's denominator with no value (learnable).
    - bias [B or 1, H or 1, T, S]: added to the logits. q_segment_ids [B, T] / kv_segment_ids [B, S]:
      attention within equal ids; cu_seqlens_q/k [N + 1] (batch 1): packed sequences, each with its own
      end-aligned positions.
    - dropout_rate with dropout_rng: dropout on the probabilities (deterministic for a given rng).
    - implementation: None (GPU: ("cudnn", "triton", "xla"), else ("xla",)), a name or a sequence, tried
      in order; a backend that cannot serve the call raises NotImplementedError and the next is tried.
    Rows with nothing to attend to give o = 0 and zero gradients.

    >>> o = flash_attention(q, k, v, causal=True, sliding_window=4096)
    """
    keywords, implementations = check_and_derive(
        q, k, v, causal=causal, scale=scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
        sinks=sinks, bias=bias, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, q_positions=q_positions,
        kv_positions=kv_positions, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        implementation=implementation,
    )  # fmt: skip
    if not isinstance(return_residuals, bool):
        raise TypeError(f"return_residuals must be a bool, got {return_residuals!r}")
    o, lse = run_backends(implementations, q, k, v, return_lse=return_residuals, **keywords)
    return (o, lse) if return_residuals else o


def merge_attention(o1, lse1, o2, lse2):
    """Exact merge of two attention results over disjoint key sets of the same queries.

    o1, o2: [B, T, H, Dv]; lse1, lse2: [B, H, T] float32 (log-sum-exp of each row, as returned with
    return_residuals=True). Returns (o [B, T, H, Dv] in o1's dtype, lse [B, H, T] float32) equal to the
    attention over the union of the two key sets. Rows where one lse is -inf (no allowed key on that side)
    take the other side; rows where both are -inf give o = 0, lse = -inf; no NaN in values or gradients.

    >>> o, lse = merge_attention(o_left, lse_left, o_right, lse_right)
    """
    lse1 = lse1.astype(jnp.float32)
    lse2 = lse2.astype(jnp.float32)
    m = jax.lax.stop_gradient(jnp.maximum(lse1, lse2))  # the weights are invariant to the shift
    empty = m == -jnp.inf  # both sides empty
    m = jnp.where(empty, 0.0, m)
    w1 = jnp.exp(lse1 - m)  # exp(-inf) = 0 with zero gradient
    w2 = jnp.exp(lse2 - m)
    total = jnp.where(empty, 1.0, w1 + w2)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(total))

    def weight(w):  # [B, H, T] -> [B, T, H, 1]
        return jnp.swapaxes(w / total, 1, 2)[..., None]

    o = weight(w1) * o1.astype(jnp.float32) + weight(w2) * o2.astype(jnp.float32)
    return o.astype(o1.dtype), lse

"""cuDNN flash attention through jax.nn.dot_product_attention(implementation="cudnn"), where it serves.

A delegate, not a kernel of ours: it serves causal attention, a left window with causal
(local_window_size), an additive bias and GQA/MQA, on bfloat16/float16 inputs with Dk == Dv, on an
NVIDIA GPU. Everything else raises NotImplementedError naming the feature, so that the API layer tries
the next backend:

- soft cap, sinks, dropout, segment ids (jax.nn.dot_product_attention has none of them);
- a window whose right side is open without causal (cuDNN has a left window only);
- causal or window masks unless the positions are known at trace time to be the defaults with T == S
  (cuDNN's causal mask is by index; our mask is by position);
- the log-sum-exp (`attention`, and so return_residuals=True): jax returns cuDNN's residual rounded
  to the output dtype, which is too coarse to merge partial results with. `output` returns o alone.

Gradients are jax's own (cuDNN's backward kernel).
"""

import jax
import jax.numpy as jnp
import numpy as np

from shardattn.kernels.attention.options import AttentionOptions


def _is_arange(x, n) -> bool:
    """True when x [B, n] is known at trace time and every row is 0..n-1."""
    try:
        x = np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False
    return x.shape[-1] == n and bool(np.all(x == np.arange(n)))


def _plan(q, k, v, bias, sinks, q_segment_ids, q_positions, kv_positions, options: AttentionOptions):
    """The keyword arguments of jax.nn.dot_product_attention for this call, or NotImplementedError."""
    T, S = q.shape[1], k.shape[1]
    if options.soft_cap is not None:
        raise NotImplementedError("cudnn has no logits soft cap")
    if sinks is not None:
        raise NotImplementedError("cudnn has no attention sinks")
    if options.dropout_rate > 0:
        raise NotImplementedError("cudnn (through jax.nn.dot_product_attention) has no dropout")
    if q_segment_ids is not None:
        raise NotImplementedError("cudnn here has no segment ids / cu_seqlens (packed sequences)")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"cudnn flash attention takes bfloat16/float16 inputs, got {q.dtype}")
    if k.shape[-1] != v.shape[-1]:
        raise NotImplementedError(f"cudnn needs Dk == Dv, got Dk={k.shape[-1]}, Dv={v.shape[-1]}")
    causal = options.causal
    window = None
    if options.window is not None:
        left, right = options.window
        if not causal and right != 0:
            raise NotImplementedError(f"cudnn has a left window only: window={options.window} without causal")
        causal = True  # (left, 0) is causal with a left window
        window = (left, 0)
    if causal:
        if T != S:
            raise NotImplementedError(f"cudnn's causal mask is by index: needs T == S, got T={T}, S={S}")
        if not (_is_arange(q_positions, T) and _is_arange(kv_positions, S)):
            raise NotImplementedError(
                "cudnn's causal/window mask is by index: positions must be the defaults"
            )
    if jax.default_backend() != "gpu":
        raise NotImplementedError(
            f"cudnn needs an NVIDIA GPU, jax.default_backend() is {jax.default_backend()!r}"
        )
    return dict(
        bias=None if bias is None else bias.astype(q.dtype),
        scale=options.scale,
        is_causal=causal,
        local_window_size=window,
        implementation="cudnn",
    )


def output(
    q,  # [B, T, H, Dk]
    k,  # [B, S, Hkv, Dk]
    v,  # [B, S, Hkv, Dv]
    *,
    bias=None,
    sinks=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_positions,
    kv_positions,
    dropout_rng=None,
    dropout_offsets=None,
    options: AttentionOptions,
):
    """o [B, T, H, Dv] alone (no lse), differentiable. Arguments as in reference.py."""
    del kv_segment_ids, dropout_rng, dropout_offsets  # refused through q_segment_ids / dropout_rate
    plan = _plan(q, k, v, bias, sinks, q_segment_ids, q_positions, kv_positions, options)
    bias = plan.pop("bias")
    try:
        return jax.nn.dot_product_attention(q, k, v, bias, **plan)
    except (ValueError, RuntimeError) as err:  # jax's own cuDNN support checks, at trace time
        raise NotImplementedError(f"cudnn refused this call: {err}") from err


def attention(q, k, v, **keywords):
    """The contract's (o, lse): not served, see the module docstring (use output)."""
    raise NotImplementedError(
        "cudnn does not return a float32 log-sum-exp (return_residuals=True); jax rounds cuDNN's to the "
        "output dtype"
    )

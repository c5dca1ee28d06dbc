"""Shared by the softmax Triton tests (interpreter and GPU): inputs, and the check against the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from helpers import assert_close, tolerance

from shardattn.kernels.attention import reference
from shardattn.kernels.attention import triton as triton_attn


def inputs(B, T, S, H, Hkv, Dk, Dv, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (B, T, H, Dk), jnp.float32)
    k = jax.random.normal(keys[1], (B, S, Hkv, Dk), jnp.float32)
    v = jax.random.normal(keys[2], (B, S, Hkv, Dv), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def loss_and_grads(fn, q, k, v, bias, sinks, kw, seed=3):
    """(o, lse) and the gradients in q, k, v, bias, sinks of a random projection of o and the finite lse."""
    B, T, H, _ = q.shape
    kw_o, kw_l = jax.random.split(jax.random.PRNGKey(seed))
    w_o = jax.random.normal(kw_o, (B, T, H, v.shape[3]), jnp.float32)
    w_l = jax.random.normal(kw_l, (B, H, T), jnp.float32)

    def loss(q, k, v, bias, sinks):
        o, lse = fn(q, k, v, bias=bias, sinks=sinks, **kw)
        lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(lse_term * w_l), (o, lse)

    argnums = (0, 1, 2) + ((3,) if bias is not None else ()) + ((4,) if sinks is not None else ())
    grads, (o, lse) = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(q, k, v, bias, sinks)
    return o, lse, grads


def check_against_reference(q, k, v, *, bias=None, sinks=None, options, blocks=None, **kw):
    """triton_attn.attention against the float32 reference: o, lse and every gradient (returns the errors)."""
    dtype = q.dtype
    triton_fn = functools.partial(triton_attn.attention, options=options, block_sizes=blocks)
    ref_fn = functools.partial(reference.attention, options=options)
    o, lse, grads = loss_and_grads(triton_fn, q, k, v, bias, sinks, kw)
    f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731
    ro, rlse, rgrads = loss_and_grads(ref_fn, f32(q), f32(k), f32(v), f32(bias), sinks, kw)
    assert o.dtype == dtype and lse.dtype == jnp.float32
    errors = {"o": assert_close("o", o, ro, tolerance(dtype))}
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(rlse))
    finite = np.isfinite(np.asarray(rlse))
    errors["lse"] = assert_close("lse", np.asarray(lse)[finite], np.asarray(rlse)[finite], tolerance(dtype))
    names = (
        ["dq", "dk", "dv"]
        + (["dbias"] if bias is not None else [])
        + (["dsinks"] if sinks is not None else [])
    )
    for name, g, rg in zip(names, grads, rgrads, strict=True):
        errors[name] = assert_close(name, g, rg, tolerance(dtype, grad=True))
    return errors


def positions(B, T, S):
    return (
        jnp.broadcast_to(jnp.arange(S - T, S, dtype=jnp.int32), (B, T)),
        jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)),
    )

"""Shared test helpers: tolerance table, relative-RMS comparison, random inputs, readable ids."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Relative-RMS error allowed against the float32 reference, per input dtype. Gradients get twice that.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 1.5e-2, jnp.float16: 4e-3}
GRAD_FACTOR = 2.0


def tolerance(dtype, grad: bool = False) -> float:
    return TOLERANCE[jnp.dtype(dtype).type] * (GRAD_FACTOR if grad else 1.0)


def rel_rms(actual, expected) -> float:
    """sqrt(mean((a - e)^2)) / sqrt(mean(e^2)), in float64 (fla's assert_close measure)."""
    a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    e = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    denom = np.sqrt(np.mean(e**2)) + 1e-30
    return float(np.sqrt(np.mean((a - e) ** 2)) / denom)


def assert_close(name, actual, expected, tol):
    err = rel_rms(actual, expected)
    assert np.all(np.isfinite(np.asarray(jnp.asarray(actual, jnp.float32)))), f"{name}: non-finite values"
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > {tol:.1e}"
    return err


@dataclasses.dataclass(frozen=True)
class Case:
    B: int = 2
    T: int = 63
    H: int = 4
    Hkv: int | None = None
    Dk: int = 32
    Dv: int | None = None
    dtype: object = jnp.float32

    @property
    def id(self) -> str:
        hkv = f"/{self.Hkv}" if self.Hkv and self.Hkv != self.H else ""
        dv = f"x{self.Dv}" if self.Dv and self.Dv != self.Dk else ""
        return f"B{self.B}-T{self.T}-H{self.H}{hkv}-D{self.Dk}{dv}-{jnp.dtype(self.dtype).name}"


def make_inputs(case: Case, seed: int = 0, with_state: bool = False, num_states: int | None = None):
    """Fresh random q, k, v (k, v scaled so outputs stay O(1)), slopes and optionally an initial state."""
    Hkv = case.Hkv or case.H
    Dv = case.Dv or case.Dk
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(keys[0], (case.B, case.T, case.H, case.Dk), jnp.float32)
    k = jax.random.normal(keys[1], (case.B, case.T, Hkv, case.Dk), jnp.float32) / np.sqrt(case.Dk)
    v = jax.random.normal(keys[2], (case.B, case.T, Hkv, Dv), jnp.float32)
    slopes = jax.random.uniform(keys[3], (case.H,), jnp.float32, 0.0, 1.0)
    out = dict(q=q.astype(case.dtype), k=k.astype(case.dtype), v=v.astype(case.dtype), slopes=slopes)
    if with_state:
        n = case.B if num_states is None else num_states
        out["initial_state"] = jax.random.normal(keys[4], (n, case.H, case.Dk, Dv), jnp.float32)
    return out


def run_with_grads(fn, inputs, *, seed: int = 1, out_dtype=None, **kw):
    """o, final state and the gradients (every input) of a random projection of both, under jit.

    fn(q, k, v, slopes=, initial_state=, return_state=True, **kw) is lightning_attention or
    sharded_lightning. out_dtype: round o to it before the projection, so that its cotangent is rounded
    the same way.
    """
    names = [n for n in ("q", "k", "v", "slopes", "initial_state") if n in inputs]

    def loss(*args):
        x = dict(zip(names, args, strict=True))
        o, s = fn(x["q"], x["k"], x["v"], slopes=x["slopes"], initial_state=x.get("initial_state"),
                  return_state=True, **kw)  # fmt: skip
        if out_dtype is not None:
            o = o.astype(out_dtype)
        ko, ks = jax.random.split(jax.random.PRNGKey(seed))
        w_o = jax.random.normal(ko, o.shape, jnp.float32)
        w_s = jax.random.normal(ks, s.shape, jnp.float32)
        return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(s * w_s), (o, s)

    grads, (o, s) = jax.jit(jax.grad(loss, argnums=tuple(range(len(names))), has_aux=True))(
        *(inputs[n] for n in names)
    )
    return o, s, dict(zip(names, grads, strict=True))

"""The Triton lightning kernels on CPU, in Triton's interpreter: reference match of both backward paths,
non-finite causality and the gradient direction of a NaN in q.

The Triton backends launch through kernels/triton_interpret.py (a jax.pure_callback running the kernel
bodies in the interpreter on torch CPU tensors) when SHARDATTN_TRITON_INTERPRET=1; everything else (the
wrappers, the custom_vjp, the JAX glue) is the backend's own. Skipped otherwise and unless torch and
triton import (the test extra has neither; a venv with triton 3.6, CPU torch and numpy<2.3 runs it:
`SHARDATTN_TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_interpret.py`, ~25 s on 2 cores).
Tiny shapes: the interpreter is slow.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from shardattn.kernels import triton_interpret

if not triton_interpret.enabled():
    pytest.skip(
        "set SHARDATTN_TRITON_INTERPRET=1 to run the Triton kernels in Triton's interpreter",
        allow_module_level=True,
    )
pytest.importorskip("torch")
pytest.importorskip("triton")

import test_nonfinite as nonfinite  # noqa: E402
from helpers import Case, assert_close, make_inputs, run_with_grads, tolerance  # noqa: E402

import shardattn  # noqa: E402
from shardattn.kernels.lightning import triton as backend  # noqa: E402


@pytest.fixture(params=["sequential", "chunk-parallel", "chunk-parallel-late-g"])
def backward(request, monkeypatch):
    """float32 takes the sequential backward by default; the chunk-parallel one (bf16's) is forced here,
    also with the chunk kernel's late read of G (the Dk = 128 default, par_late_g)."""
    if request.param.startswith("chunk-parallel"):
        default = backend.BlockSizes.get_default
        late = request.param.endswith("late-g")

        def parallel(dk, dv, dtype):
            return dataclasses.replace(default(dk, dv, dtype), bwd_parallel=True, par_late_g=late)

        monkeypatch.setattr(backend.BlockSizes, "get_default", staticmethod(parallel))
    return request.param


CASE = Case(B=1, T=100, H=2, Hkv=1, Dk=16)  # two chunks of 64, the second short


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_matches_reference(backward, reverse):
    x = make_inputs(CASE, 1, with_state=True)
    kw = dict(scale=0.7, reverse=reverse)
    o, s, g = run_with_grads(shardattn.lightning_attention, x, implementation="triton", **kw)
    o_r, s_r, g_r = run_with_grads(shardattn.lightning_attention, x, implementation="reference", **kw)
    assert_close("o", o, o_r, tolerance(jnp.float32))
    assert_close("final_state", s, s_r, tolerance(jnp.float32))
    for n in g:
        assert_close("d" + n, g[n], g_r[n], tolerance(jnp.float32, grad=True))


@pytest.mark.parametrize("reverse,packed", nonfinite.RUNS, ids=nonfinite.RUN_IDS)
def test_nonfinite_is_causal(reverse, packed):
    # Chunks of 64: the poisoned tokens 37, 63, 64, 31 are mid-chunk, chunk end, chunk start, mid-chunk.
    nonfinite.check_causal(nonfinite.backend_fn(backend, reverse, packed), reverse=reverse, packed=packed)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_nan_in_q_reaches_no_later_key_gradient(backward, reverse):
    def fn(q, k, v, slopes, s0):
        return backend.lightning_attention(q, k, v, slopes, s0, None, scale=nonfinite.SCALE, reverse=reverse)

    nonfinite.check_q_nan_gradient(fn, reverse=reverse)


def test_nonfinite_varies_nothing_for_finite_inputs():
    # The NaN machinery selects; finite inputs give the plain kernel's values (here: the reference's).
    x = make_inputs(Case(B=2, T=70, H=2, Dk=16), 2)
    o = backend.lightning_attention(x["q"], x["k"], x["v"], x["slopes"], scale=0.5)[0]
    o_r = shardattn.lightning_attention(x["q"], x["k"], x["v"], slopes=x["slopes"], scale=0.5,
                                        implementation="reference")  # fmt: skip
    assert np.all(np.isfinite(np.asarray(o)))
    assert_close("o", o, o_r, tolerance(jnp.float32))


def test_forward_where_flagged_rewrites_only_flagged_pairs():
    # mosaic_gpu.py's exact relaunch: flagged (sequence, head) pairs get this walk's o (here with a NaN in
    # v, by the non-finite rule), the others keep the o passed in (a sentinel) bit for bit.
    case = Case(B=2, T=100, H=2, Hkv=1, Dk=16)
    x = make_inputs(case, 3, with_state=True)
    v = x["v"].at[1, 40, 0, 3].set(jnp.nan)
    exact = backend.lightning_attention(x["q"], x["k"], v, x["slopes"], x["initial_state"], scale=0.7)[0]
    sentinel = jnp.full(exact.shape, 7.0, exact.dtype)
    flags = jnp.array([0.0, 1.0, 1.0, 0.0], jnp.float32)  # pairs n * H + h: (0, 1) and (1, 0)
    o = backend.forward_where_flagged(flags, sentinel, x["q"], x["k"], v, x["slopes"], x["initial_state"],
                                      scale=0.7)  # fmt: skip
    o, exact = np.asarray(o), np.asarray(exact)
    for n, h in [(0, 0), (1, 1)]:
        assert np.all(o[n, :, h] == 7.0), (n, h)
    for n, h in [(0, 1), (1, 0)]:
        np.testing.assert_array_equal(o[n, :, h], exact[n, :, h])
    assert np.isnan(o[1, 40:, 0]).any() and np.isfinite(o[1, :40, 0]).all()


def test_chunks_where_flagged_rewrites_only_flagged_items():
    # mosaic_gpu.py's exact relaunch of the backward's chunk kernel: flagged (chunk slot, head) items get
    # bwd_chunk_kernel's outputs (here with a NaN in q, by the non-finite rule), the others keep the
    # outputs passed in (sentinels) bit for bit.
    import jax

    case = Case(B=2, T=128, H=2, Hkv=1, Dk=16)
    x = make_inputs(case, 4)
    q = x["q"].at[1, 70, 1, 2].set(jnp.nan)  # slot 3 (sequence 1, chunk 1), head 1
    keys = jax.random.split(jax.random.PRNGKey(5), 2)
    do = jax.random.normal(keys[0], q.shape, jnp.float32)
    dfinal = jax.random.normal(keys[1], (case.B, case.H, case.Dk, case.Dk), jnp.float32)
    opts = backend.Options(scale=0.5, reverse=False)
    blocks = backend.BlockSizes.get_default(case.Dk, case.Dk, q.dtype)
    _, _, states = backend._forward_pass(q, x["k"], x["v"], x["slopes"], None, None, scale=0.5, reverse=False,
                                         store_states=True, out_dtype=q.dtype, blocks=blocks)  # fmt: skip
    gstates, _ = backend._g_walk(opts, blocks, q, do, x["slopes"], dfinal, None, jnp.float32)
    args = (opts, q, x["k"], x["v"], do, x["slopes"], states, gstates)
    exact = backend._chunks(opts, blocks, *args[1:], None)
    sentinels = tuple(jnp.full(e.shape, 7.0, e.dtype) for e in exact)
    flags = jnp.zeros((4, 2), jnp.float32).at[3, 1].set(1.0).at[0, 0].set(1.0)
    got = backend.chunks_where_flagged(flags, sentinels, *args)
    C, T, H = 64, case.T, case.H
    for what, g, e in zip(("dq", "dk", "dv", "dslope"), got, exact, strict=True):
        g, e = np.asarray(g), np.asarray(e)
        if what == "dslope":
            g, e = g.reshape(4, H), e.reshape(4, H)
        else:  # [B * T, H, D] (dq, dk with a leading Dv-block axis of 1)
            g, e = g.reshape(case.B * T // C, C, H, -1), e.reshape(case.B * T // C, C, H, -1)
            g, e = g.transpose(0, 2, 1, 3), e.transpose(0, 2, 1, 3)  # [slot, head, ...]
        for slot in range(4):
            for h in range(H):
                if float(flags[slot, h]):
                    np.testing.assert_array_equal(g[slot, h], e[slot, h], err_msg=f"{what} {slot} {h}")
                else:
                    assert np.all(g[slot, h] == 7.0), (what, slot, h)
    assert not np.isfinite(np.asarray(got[2]).reshape(4, C, H, -1)[3, :, 1]).all()  # dv reached in slot 3

"""Single-device lightning attention: every feature of every CPU backend against the float32 reference."""

import functools

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Case, assert_close, make_inputs, tolerance

import shardattn
from shardattn.kernels.lightning import reference

# Backends checked here on CPU. The Triton backend runs this file's cases in tests/test_triton_gpu.py
# (GPU only) and the Pallas backend in tests/test_pallas.py (interpret mode).
IMPLEMENTATIONS = ["xla"]
SCALE = 0.7


def run_with_grads(impl, inputs, **kw):
    """helpers.run_with_grads through the public API with implementation=impl."""
    api = shardattn.lightning_attention
    return helpers.run_with_grads(api, inputs, scale=SCALE, implementation=impl, **kw)


def check_against_reference(impl, inputs, dtype, **kw):
    return compare_with_reference(run_with_grads(impl, inputs, **kw), inputs, dtype, **kw)


def compare_with_reference(results, inputs, dtype, **kw):
    """(o, final state, grads) of a run on `inputs` against the reference's, run with the same kw."""
    o, s, g = results
    # The reference sees the same (possibly rounded) inputs, upcast to float32.
    ref_inputs = {n: x.astype(jnp.float32) for n, x in inputs.items()}
    o_ref, s_ref, g_ref = run_with_grads("reference", ref_inputs, **kw)
    errors = {"o": assert_close("o", o, o_ref, tolerance(dtype))}
    errors["final_state"] = assert_close("final_state", s, s_ref, tolerance(dtype))
    for n in g:
        errors["d" + n] = assert_close("d" + n, g[n], g_ref[n], tolerance(dtype, grad=True))
    return errors


CASES = [
    Case(B=2, T=63, H=4, Dk=32),
    Case(B=1, T=500, H=2, Dk=48),
    Case(B=2, T=100, H=4, Hkv=2, Dk=80),
    Case(B=1, T=70, H=8, Hkv=2, Dk=100),
    Case(B=2, T=64, H=4, Hkv=1, Dk=16),  # MQA
    Case(B=1, T=130, H=2, Dk=32, Dv=48),  # Dk != Dv
    Case(B=2, T=63, H=4, Hkv=2, Dk=32, dtype=jnp.bfloat16),
    Case(B=1, T=129, H=2, Dk=64, dtype=jnp.float16),
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(impl, case):
    check_against_reference(impl, make_inputs(case, with_state=True), case.dtype)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", [Case(B=2, T=100, H=4, Hkv=2, Dk=32), Case(B=1, T=63, H=2, Dk=16)],
                         ids=lambda c: c.id)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_reverse(impl, case, with_state):
    check_against_reference(impl, make_inputs(case, with_state=with_state), case.dtype, reverse=True)


VARLEN = {
    "3seqs": [0, 5, 70, 200],
    "empty-seq": [0, 5, 5, 70, 71, 200],
    "one-seq": [0, 200],
    "seq-per-chunk-edge": [0, 64, 128, 200],
}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("offsets", VARLEN.values(), ids=VARLEN.keys())
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_varlen(impl, offsets, reverse, with_state):
    case = Case(B=1, T=200, H=4, Hkv=2, Dk=16, Dv=24)
    cu = jnp.asarray(offsets, jnp.int32)
    inputs = make_inputs(case, with_state=with_state, num_states=len(offsets) - 1)
    check_against_reference(impl, inputs, case.dtype, cu_seqlens=cu, reverse=reverse)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_varlen_equals_separate_sequences(impl):
    """Packing is only a layout: each packed sequence gives what it gives alone."""
    case = Case(B=1, T=150, H=2, Dk=16)
    inputs = make_inputs(case, with_state=True, num_states=2)
    cut = 61
    o, s = shardattn.lightning_attention(
        inputs["q"], inputs["k"], inputs["v"], slopes=inputs["slopes"], return_state=True,
        initial_state=inputs["initial_state"], cu_seqlens=jnp.array([0, cut, 150]), implementation=impl,
    )
    for n, part in enumerate((slice(0, cut), slice(cut, 150))):
        o_n, s_n = shardattn.lightning_attention(
            inputs["q"][:, part], inputs["k"][:, part], inputs["v"][:, part], slopes=inputs["slopes"],
            initial_state=inputs["initial_state"][n : n + 1], return_state=True, implementation=impl,
        )
        assert_close(f"o[{n}]", o[:, part], o_n, 1e-6)
        assert_close(f"state[{n}]", s[n : n + 1], s_n, 1e-6)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("slope", [0.0, 8.0, "mixed"])
def test_decay_extremes(impl, slope):
    case = Case(B=1, T=200, H=4, Dk=32)
    inputs = make_inputs(case, with_state=True)
    if slope == "mixed":
        inputs["slopes"] = jnp.array([0.0, 1e-3, 1.0, 8.0], jnp.float32)
    else:
        inputs["slopes"] = jnp.full((case.H,), slope, jnp.float32)
    check_against_reference(impl, inputs, case.dtype)


def test_reference_matches_quadratic_form():
    """The contract itself, checked against the closed form in float64 numpy (docs/design.md)."""
    case = Case(B=1, T=40, H=2, Hkv=1, Dk=8, Dv=6)
    x = make_inputs(case, with_state=True)
    q, k, v, s0 = (np.asarray(x[n], np.float64) for n in ("q", "k", "v", "initial_state"))
    slopes = np.asarray(x["slopes"], np.float64)
    o, final = reference.lightning_attention(
        x["q"], x["k"], x["v"], x["slopes"], x["initial_state"], scale=SCALE
    )
    i = np.arange(case.T)
    for h in range(case.H):
        lam = np.exp(-slopes[h])
        decay = np.where(i[:, None] >= i[None, :], lam ** np.maximum(i[:, None] - i[None, :], 0), 0.0)
        scores = (q[0, :, h] @ k[0, :, 0].T) * decay
        expected = SCALE * (scores @ v[0, :, 0] + (lam ** (i + 1))[:, None] * (q[0, :, h] @ s0[0, h]))
        np.testing.assert_allclose(np.asarray(o[0, :, h]), expected, rtol=2e-5, atol=2e-5)
        state = lam ** case.T * s0[0, h] + (k[0, :, 0] * (lam ** (case.T - 1 - i))[:, None]).T @ v[0, :, 0]
        np.testing.assert_allclose(np.asarray(final[0, h]), state, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_deterministic(impl):
    case = Case(B=2, T=100, H=4, Hkv=2, Dk=32)
    inputs = make_inputs(case, with_state=True)
    first = run_with_grads(impl, inputs)
    second = run_with_grads(impl, inputs)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_vmap_over_batch_equals_batched_call(impl):
    case = Case(B=3, T=70, H=2, Dk=16)
    x = make_inputs(case)
    f = functools.partial(shardattn.lightning_attention, slopes=x["slopes"], implementation=impl)
    batched = f(x["q"], x["k"], x["v"])
    mapped = jax.vmap(lambda q, k, v: f(q[None], k[None], v[None])[0])(x["q"], x["k"], x["v"])
    assert_close("vmap", mapped, batched, 1e-6)


def test_decay_presets():
    # transnormer: s_h = (8 / H) * (1 - l / L) * h
    np.testing.assert_allclose(shardattn.decay_slopes(4, 1, 4), [0.0, 1.5, 3.0, 4.5], rtol=1e-6)
    # minimax: s_h = 2^(-8 (h + 1) / H) * (1 - l / (L - 1 + 1e-5) + 1e-5); H = 6 is not a power of two.
    h = np.arange(6)
    factor = 1 - 2 / (10 - 1 + 1e-5) + 1e-5
    np.testing.assert_allclose(
        shardattn.decay_slopes(6, 2, 10, "minimax"), 2.0 ** (-8 * (h + 1) / 6) * factor, rtol=1e-6
    )
    # The preset path of lightning_attention uses exactly these slopes.
    x = make_inputs(Case(B=1, T=40, H=4, Dk=16))
    by_preset = shardattn.lightning_attention(x["q"], x["k"], x["v"], layer_idx=1, num_layers=3,
                                              decay="minimax")
    by_slopes = shardattn.lightning_attention(x["q"], x["k"], x["v"],
                                              slopes=shardattn.decay_slopes(4, 1, 3, "minimax"))
    np.testing.assert_array_equal(np.asarray(by_preset), np.asarray(by_slopes))


def test_implementation_fallback_order():
    x = make_inputs(Case(B=1, T=40, H=2, Dk=16))
    xla = shardattn.lightning_attention(x["q"], x["k"], x["v"], slopes=x["slopes"], implementation="xla")
    # No GPU here: the Triton backend declines with NotImplementedError and the next one serves.
    if jax.default_backend() != "gpu":
        chained = shardattn.lightning_attention(
            x["q"], x["k"], x["v"], slopes=x["slopes"], implementation=("triton", "xla")
        )
        np.testing.assert_array_equal(np.asarray(chained), np.asarray(xla))
        with pytest.raises(NotImplementedError, match="triton"):
            shardattn.lightning_attention(x["q"], x["k"], x["v"], slopes=x["slopes"],
                                          implementation="triton")


def _bad_calls():
    q = jnp.zeros((1, 8, 4, 16))
    k = v = jnp.zeros((1, 8, 2, 16))
    ok = dict(slopes=jnp.ones(4))
    return [
        ("rank", ValueError, "q must be", (q[0], k, v), ok),
        ("seq-mismatch", ValueError, "share", (q, k[:, :4], v), ok),
        ("head-dim", ValueError, "head_dim", (q, k[..., :8], v), ok),
        ("kv-heads", ValueError, "same number of heads", (q, k, v[:, :, :1]), ok),
        ("gqa", ValueError, "divisible", (jnp.zeros((1, 8, 3, 16)), k, v), dict(slopes=jnp.ones(3))),
        ("int-dtype", TypeError, "floating", (q.astype(jnp.int32), k, v), ok),
        ("slopes-shape", ValueError, "slopes must have shape", (q, k, v), dict(slopes=jnp.ones(3))),
        ("slopes-negative", ValueError, ">= 0", (q, k, v), dict(slopes=-jnp.ones(4))),
        ("no-decay", ValueError, "layer_idx", (q, k, v), {}),
        ("both-decays", ValueError, "not both", (q, k, v), dict(slopes=jnp.ones(4), layer_idx=0,
                                                                 num_layers=2)),
        ("layer-range", ValueError, "layer_idx", (q, k, v), dict(layer_idx=2, num_layers=2)),
        ("decay-name", ValueError, "decay", (q, k, v), dict(layer_idx=0, num_layers=2, decay="alibi")),
        ("impl-name", ValueError, "implementation", (q, k, v), dict(ok, implementation="cuda")),
        ("state-shape", ValueError, "initial_state", (q, k, v),
         dict(ok, initial_state=jnp.zeros((2, 4, 16, 16)))),
        ("varlen-batch", ValueError, "batch 1", (jnp.zeros((2, 8, 4, 16)), k.repeat(2, 0), v.repeat(2, 0)),
         dict(ok, cu_seqlens=jnp.array([0, 8]))),
        ("varlen-start", ValueError, "start at 0", (q, k, v), dict(ok, cu_seqlens=jnp.array([1, 8]))),
        ("varlen-order", ValueError, "non-decreasing", (q, k, v),
         dict(ok, cu_seqlens=jnp.array([0, 6, 4, 8]))),
        ("varlen-end", ValueError, "end at", (q, k, v), dict(ok, cu_seqlens=jnp.array([0, 7]))),
        ("varlen-state-count", ValueError, "number of sequences", (q, k, v),
         dict(ok, cu_seqlens=jnp.array([0, 3, 8]), initial_state=jnp.zeros((1, 4, 16, 16)))),
        ("varlen-dtype", TypeError, "integer", (q, k, v), dict(ok, cu_seqlens=jnp.array([0.0, 8.0]))),
        ("scale-type", TypeError, "scale", (q, k, v), dict(ok, scale=jnp.array(1.0))),
    ]


@pytest.mark.parametrize("name,exc,match,args,kwargs", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_is_rejected(name, exc, match, args, kwargs):
    with pytest.raises(exc, match=match):
        shardattn.lightning_attention(*args, **kwargs)


def test_backward_memory_is_linear_in_sequence():
    """jit(grad) of the XLA backend keeps no per-token states: temp memory < 6x the bytes of q, k, v."""
    B, T, H, D = 1, 32768, 4, 64
    spec = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
    slopes = jnp.asarray(shardattn.decay_slopes(H, 0, 2))

    def loss(q, k, v):
        o = shardattn.lightning_attention(q, k, v, slopes=slopes, implementation="xla")
        return jnp.sum(o * o)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    qkv_bytes = 3 * B * T * H * D * 4
    per_token_states = B * T * H * D * D * 4  # what a naive scan would keep: 16x qkv_bytes at D = 64
    assert temp < 6 * qkv_bytes, f"temp {temp / 2**20:.0f} MiB >= 6 x qkv {qkv_bytes / 2**20:.0f} MiB"
    assert temp < per_token_states / 4


# ---------------------------------------------------------------------------------------------------
# The two state functions of sequence parallelism (reference.py: local_state, state_gradient).

STATE_CASES = [
    Case(B=2, T=63, H=4, Dk=16, Dv=32),
    Case(B=1, T=130, H=4, Hkv=2, Dk=16),
    Case(B=2, T=70, H=4, Hkv=1, Dk=32, dtype=jnp.bfloat16),
]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", STATE_CASES, ids=lambda c: c.id)
def test_state_functions(case, reverse):
    from shardattn.kernels.lightning import xla

    x = make_inputs(case)
    q, k, v, slopes = x["q"], x["k"], x["v"], x["slopes"]
    do = jax.random.normal(jax.random.PRNGKey(7), q.shape[:3] + (v.shape[3],)).astype(case.dtype)
    tol = tolerance(case.dtype)
    expected_local = reference.local_state(k, v, slopes, reverse=reverse)
    expected_grad = reference.state_gradient(q, do, slopes, scale=SCALE, reverse=reverse)
    assert_close("local_state", xla.local_state(k, v, slopes, reverse=reverse), expected_local, tol)
    assert_close("state_gradient", xla.state_gradient(q, do, slopes, scale=SCALE, reverse=reverse),
                 expected_grad, tol)  # fmt: skip
    # The contract itself: the final state from zero (the other, d(initial_state), is a vjp by definition).
    _, final = reference.lightning_attention(q, k, v, slopes, scale=SCALE, reverse=reverse)
    assert_close("reference local_state", expected_local, final, 1e-6)

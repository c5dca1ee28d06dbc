"""Pallas TPU backend, run on CPU in the TPU interpreter: every feature against the float32 reference.

Outputs, final states and the gradients of q, k, v, initial_state and slopes, through the public API
(`implementation="pallas"`). Cases are few and small because every interpreted kernel compiles for a
few seconds; each case combines several features.
"""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Case, assert_close, make_inputs, tolerance
from test_lightning import SCALE, run_with_grads

import shardattn
from shardattn.kernels.lightning import pallas_tpu, reference


def check_against_reference(inputs, dtype, **kw):
    o, s, g = run_with_grads("pallas", inputs, **kw)
    assert o.dtype == inputs["q"].dtype and s.dtype == jnp.float32
    # The reference sees the same (possibly rounded) inputs, upcast to float32, and its output is rounded
    # to the dtype of q like the backend's, so both get the same cotangent of o. Without that, the
    # bfloat16 rounding of that cotangent alone moves d(slopes), a sum full of cancelling terms, by up
    # to 4e-2 relative (B2-T63-H4/2-D80-bfloat16), whatever the kernel does.
    ref_inputs = {n: x.astype(jnp.float32) for n, x in inputs.items()}
    o_ref, s_ref, g_ref = run_with_grads("reference", ref_inputs, out_dtype=inputs["q"].dtype, **kw)
    errors = {"o": assert_close("o", o, o_ref, tolerance(dtype))}
    errors["final_state"] = assert_close("final_state", s, s_ref, tolerance(dtype))
    for n in g:
        errors["d" + n] = assert_close("d" + n, g[n], g_ref[n], tolerance(dtype, grad=True))
    print(" ".join(f"{n}={e:.1e}" for n, e in errors.items()))  # pytest -s shows the measured errors
    return errors


# T not a multiple of the chunk (63 -> one chunk of 64, 200 -> two chunks of 128), head dims 32 to 80
# (lane padding to 128), GQA 4/2 and 4/1, Dk != Dv, bfloat16 and float32 (and float16).
CASES = [
    Case(B=2, T=63, H=4, Hkv=2, Dk=48),
    Case(B=1, T=200, H=4, Hkv=2, Dk=32, Dv=80),
    Case(B=2, T=63, H=4, Hkv=2, Dk=80, dtype=jnp.bfloat16),
    Case(B=1, T=200, H=4, Hkv=1, Dk=64, Dv=48, dtype=jnp.bfloat16),
    Case(B=1, T=63, H=2, Dk=32, dtype=jnp.float16),  # computed in float32
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case):
    check_against_reference(make_inputs(case, with_state=True), case.dtype)


def test_reverse():
    """reverse=True without packing (the wrapper flips the tokens): two chunks, GQA, initial states.
    Packed reverse runs in test_varlen and test_many_small_chunks."""
    case = Case(B=2, T=200, H=4, Hkv=2, Dk=48, dtype=jnp.bfloat16)
    check_against_reference(make_inputs(case, with_state=True), case.dtype, reverse=True)


VARLEN = {
    "3seqs": [0, 5, 70, 200],
    "empty-seqs": [0, 0, 5, 5, 130, 200, 200],  # empty first, middle and last sequences
}


@pytest.mark.parametrize(
    "offsets,reverse,with_state",
    [
        (VARLEN["empty-seqs"], False, True),
        (VARLEN["empty-seqs"], True, True),
        (VARLEN["3seqs"], True, False),
    ],
    ids=["empty-seqs-fwd-initial-state", "empty-seqs-rev-initial-state", "3seqs-rev-zero-state"],
)
def test_varlen(offsets, reverse, with_state):
    case = Case(B=1, T=200, H=4, Hkv=2, Dk=16, Dv=24)
    cu = jnp.asarray(offsets, jnp.int32)
    inputs = make_inputs(case, with_state=with_state, num_states=len(offsets) - 1)
    check_against_reference(inputs, case.dtype, cu_seqlens=cu, reverse=reverse)


def test_decay_extremes():
    """Slope 0 (no decay: nothing may overflow) and 8 (lam^128 underflows to 0: no 0 * inf) beside
    ordinary ones."""
    case = Case(B=1, T=200, H=4, Dk=32)
    inputs = make_inputs(case, with_state=True)
    inputs["slopes"] = jnp.asarray([0.0, 8.0, 1e-3, 1.0], jnp.float32)
    check_against_reference(inputs, case.dtype)


def test_forward_only_matches_reference():
    """Without jax.grad the primal kernel runs (it saves no chunk states); packed, reversed, GQA, bf16."""
    case = Case(B=1, T=200, H=4, Hkv=2, Dk=48, Dv=32, dtype=jnp.bfloat16)
    cu = jnp.asarray(VARLEN["empty-seqs"], jnp.int32)
    x = make_inputs(case, with_state=True, num_states=len(VARLEN["empty-seqs"]) - 1)
    kw = dict(slopes=x["slopes"], initial_state=x["initial_state"], cu_seqlens=cu, reverse=True,
              scale=SCALE, return_state=True)
    o, s = jax.jit(lambda q, k, v: shardattn.lightning_attention(q, k, v, implementation="pallas", **kw))(
        x["q"], x["k"], x["v"]
    )
    o_ref, s_ref = shardattn.lightning_attention(
        *(x[n].astype(jnp.float32) for n in "qkv"), implementation="reference", **kw
    )
    assert o.dtype == jnp.bfloat16
    assert_close("o", o, o_ref, tolerance(case.dtype))
    assert_close("final_state", s, s_ref, tolerance(case.dtype))


def test_many_small_chunks():
    """Chunk 16: the state chain crosses many chunk boundaries, inside and between packed sequences."""
    case = Case(B=1, T=100, H=4, Hkv=2, Dk=16, Dv=24)
    x = make_inputs(case, with_state=True, num_states=4)
    cu = jnp.asarray([0, 5, 5, 71, 100], jnp.int32)
    args = (x["q"], x["k"], x["v"], x["slopes"], x["initial_state"], cu)

    def loss(backend, *a, **kw):
        o, s = backend(*a, scale=SCALE, reverse=True, **kw)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(s * jnp.sin(s)), (o, s)

    grad = jax.grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True)
    g, (o, s) = jax.jit(
        lambda *a: grad(pallas_tpu.lightning_attention, *a, block_sizes=pallas_tpu.BlockSizes(chunk=16))
    )(*args)
    g_ref, (o_ref, s_ref) = jax.jit(lambda *a: grad(reference.lightning_attention,
                                                    *a))(*args)
    assert_close("o", o, o_ref, tolerance(jnp.float32))
    assert_close("final_state", s, s_ref, tolerance(jnp.float32))
    for name, a, b in zip(["dq", "dk", "dv", "dslopes", "dinitial_state"], g, g_ref, strict=True):
        assert_close(name, a, b, tolerance(jnp.float32, grad=True))


def test_batch_sharded_shard_map_equals_unsharded():
    """The kernel per shard inside shard_map(check_vma=True) over 8 fake devices, values and gradients.

    (The TPU interpreter holds the 8 shards at a barrier at each kernel start while its callbacks copy
    buffers through CPU device 0: on 2 cores this needs the larger CPU thread pool conftest.py sets.)
    """
    case = Case(B=8, T=40, H=2, Dk=16)
    x = make_inputs(case, with_state=True)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("batch",))
    P = jax.sharding.PartitionSpec

    def attention(q, k, v, slopes, s0):
        return pallas_tpu.lightning_attention(q, k, v, slopes, s0, scale=SCALE)

    # Slopes replicated, everything else split over the batch; the backend matches their varying axes.
    sharded = jax.shard_map(
        attention, mesh=mesh, in_specs=(P("batch"), P("batch"), P("batch"), P(), P("batch")),
        out_specs=(P("batch"), P("batch")), check_vma=True,
    )

    def loss(f, *a):
        o, s = f(*a)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(s * jnp.sin(s)), (o, s)

    args = (x["q"], x["k"], x["v"], x["slopes"], x["initial_state"])
    grad = jax.grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True)
    g_sh, out_sh = jax.jit(lambda *a: grad(sharded, *a))(*args)
    g_un, out_un = jax.jit(lambda *a: grad(attention, *a))(*args)
    sharded_leaves = jax.tree.leaves((out_sh, g_sh[:3], g_sh[4]))
    for a, b in zip(sharded_leaves, jax.tree.leaves((out_un, g_un[:3], g_un[4])), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # d(slopes) sums over the batch; across shards that sum is a psum, in another order.
    assert_close("dslopes", g_sh[3], g_un[3], 1e-6)


def test_vmap_over_batch_equals_batched_call():
    case = Case(B=3, T=40, H=2, Dk=16)
    x = make_inputs(case, with_state=True)

    def one(q, k, v, s0):  # a single batch row
        o, s = shardattn.lightning_attention(q[None], k[None], v[None], slopes=x["slopes"],
                                             initial_state=s0[None], return_state=True,
                                             implementation="pallas")
        return o[0], s[0]

    def loss(f, q, k, v, s0):
        o, s = f(q, k, v, s0)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(s * jnp.sin(s))

    def batched(q, k, v, s0):
        return shardattn.lightning_attention(q, k, v, slopes=x["slopes"], initial_state=s0, return_state=True,
                                             implementation="pallas")

    args = (x["q"], x["k"], x["v"], x["initial_state"])
    grad = jax.grad(loss, argnums=(1, 2, 3, 4))
    mapped = jax.jit(lambda *a: (jax.vmap(one)(*a), grad(jax.vmap(one), *a)))(*args)
    whole = jax.jit(lambda *a: (batched(*a), grad(batched, *a)))(*args)
    for a, b in zip(jax.tree.leaves(mapped), jax.tree.leaves(whole), strict=True):
        assert_close("vmap", a, b, 1e-6)


def test_lowers_to_mosaic_for_tpu():
    """Forward and backward lower to Mosaic (tpu_custom_call) for TPU, also under vmap. No TPU compiler
    runs here, so this checks the Pallas-to-Mosaic lowering of every op, not Mosaic's own passes."""
    x = make_inputs(Case(B=1, T=150, H=4, Hkv=2, Dk=48, Dv=80, dtype=jnp.bfloat16), with_state=True)

    def loss(q, k, v, slopes, s0):
        o, s = pallas_tpu.lightning_attention(q, k, v, slopes, s0, scale=SCALE)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s**2)

    with mock.patch.object(pallas_tpu, "_interpret_mode", lambda: False):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(
            x["q"], x["k"], x["v"], x["slopes"], x["initial_state"]
        ).lower(lowering_platforms=("tpu",))
    text = lowered.as_text()
    assert text.count("tpu_custom_call") == 2, "expected one forward and one backward Mosaic kernel"
    assert "lightning_fwd_C128_G2" in text and "lightning_bwd_C128_G2" in text

    def one_row(q, k, v):
        return pallas_tpu.lightning_attention(q[None], k[None], v[None], x["slopes"], scale=SCALE)[0][0]

    with mock.patch.object(pallas_tpu, "_interpret_mode", lambda: False):
        lowered = jax.jit(jax.grad(lambda *a: jnp.sum(jax.vmap(one_row)(*a).astype(jnp.float32) ** 2),
                                   argnums=(0, 1, 2))).trace(
            x["q"][0][None].repeat(2, 0), x["k"][0][None].repeat(2, 0), x["v"][0][None].repeat(2, 0)
        ).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 2


def test_gpu_is_refused_and_api_falls_back():
    x = make_inputs(Case(B=1, T=40, H=2, Dk=16))
    with mock.patch.object(jax, "default_backend", lambda: "gpu"):
        with pytest.raises(NotImplementedError, match="use triton on GPU"):
            pallas_tpu.lightning_attention(x["q"], x["k"], x["v"], x["slopes"], scale=SCALE)
        served = shardattn.lightning_attention(
            x["q"], x["k"], x["v"], slopes=x["slopes"], scale=SCALE, implementation=("pallas", "xla")
        )
    xla = shardattn.lightning_attention(x["q"], x["k"], x["v"], slopes=x["slopes"], scale=SCALE,
                                        implementation="xla")
    np.testing.assert_array_equal(np.asarray(served), np.asarray(xla))


def test_too_much_vmem_is_refused():
    """16 query heads per kv head with 512 x 512 float32 states need ~90 MiB of VMEM: refused up front."""
    x = make_inputs(Case(B=1, T=16, H=16, Hkv=1, Dk=512))
    with pytest.raises(NotImplementedError, match="VMEM"):
        pallas_tpu.lightning_attention(x["q"], x["k"], x["v"], x["slopes"], scale=SCALE)


@pytest.mark.parametrize("chunk", [0, 24, 100])
def test_block_sizes_are_checked(chunk):
    with pytest.raises(ValueError, match="chunk"):
        pallas_tpu.BlockSizes(chunk=chunk)

"""Triton backend (GPU only): outputs, final states and every gradient against the float32 reference.

Skipped off-GPU by tests/conftest.py (the `gpu` marker). Run on the GPU machine with
`python3 -m pytest -m gpu tests/test_triton_gpu.py -q`.
"""

import functools

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_nonfinite as nonfinite
from helpers import Case, assert_close, make_inputs, tolerance
from test_lightning import SCALE, check_against_reference, compare_with_reference, run_with_grads

import shardattn

pytestmark = pytest.mark.gpu
IMPL = "triton"

CASES = [
    Case(B=2, T=500, H=4, Dk=64),
    Case(B=1, T=63, H=2, Dk=128),
    Case(B=2, T=130, H=4, Dk=48),
    Case(B=1, T=200, H=2, Dk=100),
    Case(B=1, T=500, H=8, Hkv=2, Dk=64),  # GQA 8/2
    Case(B=2, T=100, H=4, Hkv=1, Dk=32, Dv=96),  # MQA, Dk != Dv
    Case(B=1, T=70, H=2, Dk=16, Dv=256),
    Case(B=2, T=500, H=4, Dk=64, dtype=jnp.bfloat16),
    Case(B=1, T=500, H=4, Dk=128, dtype=jnp.bfloat16),
    Case(B=1, T=63, H=8, Hkv=2, Dk=128, dtype=jnp.bfloat16),
    Case(B=2, T=130, H=4, Dk=48, Dv=100, dtype=jnp.bfloat16),
    Case(B=1, T=129, H=2, Dk=64, dtype=jnp.float16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_matches_reference(case, with_state):
    check_against_reference(IMPL, make_inputs(case, with_state=with_state), case.dtype)


@pytest.mark.parametrize(
    "case",
    [Case(B=2, T=500, H=4, Hkv=2, Dk=64), Case(B=1, T=63, H=2, Dk=48, Dv=100, dtype=jnp.bfloat16)],
    ids=lambda c: c.id,
)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_reverse(case, with_state):
    check_against_reference(IMPL, make_inputs(case, with_state=with_state), case.dtype, reverse=True)


VARLEN = {
    "3seqs": [0, 5, 70, 300],
    "empty-seq": [0, 5, 5, 70, 71, 300],
    "empty-last": [0, 150, 300, 300],
    "chunk-edges": [0, 64, 128, 300],
}


@pytest.mark.parametrize("offsets", VARLEN.values(), ids=VARLEN.keys())
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_varlen(offsets, reverse, with_state, dtype):
    case = Case(B=1, T=300, H=4, Hkv=2, Dk=64, Dv=48, dtype=dtype)
    inputs = make_inputs(case, with_state=with_state, num_states=len(offsets) - 1)
    cu = jnp.asarray(offsets, jnp.int32)
    check_against_reference(IMPL, inputs, dtype, cu_seqlens=cu, reverse=reverse)


@pytest.mark.parametrize("slope", [0.0, 8.0, "mixed"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_decay_extremes(slope, dtype):
    case = Case(B=1, T=300, H=4, Dk=64, dtype=dtype)
    inputs = make_inputs(case, with_state=True)
    if slope == "mixed":
        inputs["slopes"] = jnp.array([0.0, 1e-3, 1.0, 8.0], jnp.float32)
    else:
        inputs["slopes"] = jnp.full((case.H,), slope, jnp.float32)
    check_against_reference(IMPL, inputs, dtype)


def test_slope_gradient_long_sequence_bf16():
    """d(slopes) over 4096 tokens in bf16: the sum that a closed form over positions would cancel."""
    case = Case(B=1, T=4096, H=4, Dk=64, dtype=jnp.bfloat16)
    inputs = make_inputs(case)
    inputs["slopes"] = jnp.array([0.0, 0.01, 0.3, 2.0], jnp.float32)
    check_against_reference(IMPL, inputs, case.dtype)


def test_through_public_api_matches_xla():
    case = Case(B=2, T=257, H=4, Hkv=2, Dk=64, dtype=jnp.bfloat16)
    x = make_inputs(case, with_state=True)
    outs = {
        impl: shardattn.lightning_attention(
            x["q"], x["k"], x["v"], slopes=x["slopes"], initial_state=x["initial_state"],
            return_state=True, implementation=impl,
        )
        for impl in ("triton", "xla")
    }
    assert_close("o", outs["triton"][0], outs["xla"][0], 1e-2)
    assert_close("final_state", outs["triton"][1], outs["xla"][1], 1e-2)
    if jax.default_backend() != "gpu":
        return  # Triton's interpreter on CPU: there the default implementation is not triton
    # At Dk = 64 the default on a GPU is the Triton backend (mosaic_gpu, first in the list, serves Dk = 128).
    default = shardattn.lightning_attention(
        x["q"], x["k"], x["v"], slopes=x["slopes"], initial_state=x["initial_state"], return_state=True
    )
    np.testing.assert_array_equal(np.asarray(default[0]), np.asarray(outs["triton"][0]))


def test_deterministic():
    case = Case(B=2, T=300, H=4, Hkv=2, Dk=64, dtype=jnp.bfloat16)
    inputs = make_inputs(case, with_state=True)
    first = run_with_grads(IMPL, inputs)
    second = run_with_grads(IMPL, inputs)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


MANY_SLOTS = 66000


def test_more_chunk_slots_than_a_grid_axis_holds():
    """66000 packed sequences of one chunk each: 66000 chunk slots and 132000 (sequence, head) pairs, past
    the 65535 programs that grid axes 1 and 2 hold, so only a single flat grid axis launches it. The packed
    call equals the reference run on the same tokens as a batch of 66000 separate sequences."""
    n, C = MANY_SLOTS, 64
    case = Case(B=n, T=C, H=2, Dk=16, dtype=jnp.bfloat16)
    inputs = make_inputs(case, with_state=True)
    cu = jnp.arange(0, n * C + 1, C, dtype=jnp.int32)

    def packed(q, k, v, *, slopes, initial_state, return_state, **kw):
        flat = lambda x: x.reshape(1, n * C, *x.shape[2:])  # noqa: E731
        o, s = shardattn.lightning_attention(
            flat(q), flat(k), flat(v), slopes=slopes, initial_state=initial_state, cu_seqlens=cu,
            return_state=return_state, implementation=IMPL, **kw,
        )
        return o.reshape(q.shape[:3] + o.shape[3:]), s

    compare_with_reference(helpers.run_with_grads(packed, inputs, scale=SCALE), inputs, case.dtype)


def test_unsupported_head_dim_raises():
    from shardattn.kernels.lightning import triton as backend

    x = make_inputs(Case(B=1, T=16, H=1, Dk=272))
    with pytest.raises(NotImplementedError, match="head dims"):
        backend.lightning_attention(x["q"], x["k"], x["v"], x["slopes"], scale=1.0)


@pytest.fixture
def block_sizes(monkeypatch):
    """Runs the backend under changed BlockSizes fields (to reach its other code paths)."""
    import dataclasses

    from shardattn.kernels.lightning import triton as backend

    default = backend.BlockSizes.get_default

    def use(**change):
        monkeypatch.setattr(backend.BlockSizes, "get_default",
                            staticmethod(lambda *a: dataclasses.replace(default(*a), **change)))

    return use


@pytest.mark.parametrize("case", [Case(B=1, T=700, H=2, Dk=64), Case(B=2, T=500, H=4, Hkv=2, Dk=128, Dv=64,
                                                                    dtype=jnp.bfloat16)], ids=lambda c: c.id)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_segment_scan(block_sizes, case, reverse):
    """Sequences cut into 1-chunk segments: the forward's segment scan must be exact."""
    block_sizes(min_seg_chunks=1, seg_below=10**6, min_programs=10**6)
    check_against_reference(IMPL, make_inputs(case, with_state=True), case.dtype, reverse=reverse)


@pytest.mark.parametrize("case", [Case(B=1, T=700, H=2, Dk=64, Dv=96, dtype=jnp.bfloat16),
                                  Case(B=2, T=1000, H=4, Hkv=2, Dk=128, Dv=64, dtype=jnp.bfloat16)],
                         ids=lambda c: c.id)
@pytest.mark.parametrize("seg_chunks", [None, 1, 3], ids=["unsplit", "seg1", "seg3"])
@pytest.mark.parametrize("walk", [{}, {"walk_bk": 16, "fwd_bv": 32}], ids=["walk-default", "walk-16x32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_backward_segment_scan(block_sizes, case, seg_chunks, walk, reverse, with_state):
    """The chunk-parallel backward's G walk, unsplit or cut into segments of 1 or 3-4 chunks (the last
    one, walked first, shorter; T = 700 and 1000 end in a partial chunk), in its default blocks (Dk = 128:
    two Dk blocks; Dv = 96: a partial Dv block) or in 16 x 32 blocks: dq, dk, dv, d(slopes), d(initial_state).
    """
    if seg_chunks is None:
        block_sizes(min_programs=1, **walk)
    else:
        block_sizes(min_seg_chunks=seg_chunks, seg_below=10**6, min_programs=10**6, **walk)
    check_against_reference(IMPL, make_inputs(case, with_state=with_state), case.dtype, reverse=reverse)


@pytest.mark.parametrize("change", [{"bwd_parallel": False}, {"par_bv": 32}], ids=["sequential", "dv-split"])
@pytest.mark.parametrize("offsets", [None, [0, 5, 5, 70, 300]], ids=["dense", "varlen"])
def test_backward_variants(block_sizes, change, offsets):
    block_sizes(**change)
    case = Case(B=1 if offsets else 2, T=300, H=4, Hkv=2, Dk=64, Dv=96, dtype=jnp.bfloat16)
    n = None if offsets is None else len(offsets) - 1
    inputs = make_inputs(case, with_state=True, num_states=n)
    cu = None if offsets is None else jnp.asarray(offsets, jnp.int32)
    check_against_reference(IMPL, inputs, case.dtype, cu_seqlens=cu, reverse=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_inside_shard_map_with_varying_axes_checked(dtype):
    """The kernel under shard_map(check_vma=True): outputs typed like the data, grads equal to the bare call.

    A mesh axis of size 1 still makes the sharded inputs vary over it, so one GPU exercises the typing
    (and a wrong cast, which would psum per-shard values, would still show in d(slopes)/d(state)).
    """
    from jax.sharding import PartitionSpec as P

    from shardattn.kernels.lightning import get_backend

    case = Case(B=2, T=500, H=4, Hkv=2, Dk=64, dtype=dtype)
    x = make_inputs(case, with_state=True)
    kernel = get_backend(IMPL)
    mesh = jax.make_mesh((1, 1), ("data", "seq"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    spec = P("data", "seq", None, None)

    def bare(q, k, v, slopes, s0):
        o, s = kernel(q, k, v, slopes, s0, None, scale=0.5)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s**2)

    def sharded(q, k, v, slopes, s0):
        run = jax.shard_map(
            lambda q, k, v, slopes, s0: kernel(q, k, v, slopes, s0, None, scale=0.5),
            # The final state is per sequence shard, so it varies over "seq" too (size 1 here).
            mesh=mesh, in_specs=(spec, spec, spec, P(), P("data")), out_specs=(spec, P("data", "seq")),
            check_vma=True,
        )
        o, s = run(q, k, v, slopes, s0)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s**2)

    args = (x["q"], x["k"], x["v"], x["slopes"], x["initial_state"])
    want = jax.jit(jax.value_and_grad(bare, argnums=tuple(range(5))))(*args)
    got = jax.jit(jax.value_and_grad(sharded, argnums=tuple(range(5))))(*args)
    for name, a, b in zip(["loss", "dq", "dk", "dv", "dslopes", "dstate"], jax.tree.leaves(got),
                          jax.tree.leaves(want), strict=True):
        assert_close(name, a, b, 1e-6)


def test_sharded_lightning_on_one_gpu_equals_kernel():
    from shardattn.meshes import make_mesh

    case = Case(B=2, T=1000, H=4, Dk=64, dtype=jnp.bfloat16)
    x = make_inputs(case)
    mesh = make_mesh(seq=1, devices=jax.devices()[:1])
    o_sharded = shardattn.sharded_lightning(x["q"], x["k"], x["v"], mesh=mesh, slopes=x["slopes"],
                                            implementation=IMPL)
    o_bare = shardattn.lightning_attention(x["q"], x["k"], x["v"], slopes=x["slopes"], implementation=IMPL)
    np.testing.assert_array_equal(np.asarray(o_sharded, np.float32), np.asarray(o_bare, np.float32))


# ---------------------------------------------------------------------------------------------------
# The two state functions of sequence parallelism (reference.py: local_state, state_gradient).

STATE_CASES = [
    Case(B=2, T=500, H=4, Dk=64),
    Case(B=1, T=300, H=8, Hkv=2, Dk=64, Dv=48),  # GQA
    Case(B=2, T=130, H=4, Hkv=2, Dk=128, Dv=64, dtype=jnp.bfloat16),  # GQA 4/2, Dk = 128
    Case(B=1, T=1000, H=4, Hkv=1, Dk=48, Dv=100, dtype=jnp.bfloat16),  # MQA, partial Dk / Dv blocks
]
STATE_SEGMENTS = {
    "default": {},
    "seg1": {"min_seg_chunks": 1, "state_programs": 10**6},
    "seg3-16x32": {"min_seg_chunks": 3, "state_programs": 10**6, "state_bk": 16, "fwd_bv": 32},
}


@pytest.mark.parametrize("case", STATE_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("segments", STATE_SEGMENTS.values(), ids=STATE_SEGMENTS.keys())
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_state_functions(block_sizes, case, segments, reverse):
    """local_state and state_gradient against the reference: default segments (unsplit, or 2 segments at
    T = 1000), 1-chunk segments, segments of 3-4 chunks in 16 x 32 blocks (Dv blocks of the states-only
    walk, Dk x Dv blocks of G: Dk = 48 and 128 split in 3 and 8). Every T ends in a partial chunk, so the
    last segment is short."""
    from shardattn.kernels.lightning import reference
    from shardattn.kernels.lightning import triton as backend

    block_sizes(**segments)
    x = make_inputs(case)
    q, k, v, slopes = x["q"], x["k"], x["v"], x["slopes"]
    do = jax.random.normal(jax.random.PRNGKey(7), q.shape[:3] + (v.shape[3],)).astype(case.dtype)
    tol = tolerance(case.dtype)
    got = jax.jit(functools.partial(backend.local_state, reverse=reverse))(k, v, slopes)
    assert_close("local_state", got, reference.local_state(k, v, slopes, reverse=reverse), tol)
    got = jax.jit(functools.partial(backend.state_gradient, scale=0.3, reverse=reverse))(q, do, slopes)
    want = reference.state_gradient(q, do, slopes, scale=0.3, reverse=reverse)
    assert_close("state_gradient", got, want, tol)


def test_state_functions_inside_shard_map():
    """Under shard_map(check_vma=True) both results vary like their inputs (out_specs say so) and equal
    the bare calls (a mesh axis of size 1 still makes the sharded inputs vary over it)."""
    from jax.sharding import PartitionSpec as P

    from shardattn.kernels.lightning import triton as backend

    case = Case(B=2, T=500, H=4, Hkv=2, Dk=64, dtype=jnp.bfloat16)
    x = make_inputs(case)
    q, k, v, slopes = x["q"], x["k"], x["v"], x["slopes"]
    do = jax.random.normal(jax.random.PRNGKey(7), q.shape).astype(case.dtype)
    mesh = jax.make_mesh((1, 1), ("data", "seq"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    spec = P("data", "seq", None, None)

    def both(q, k, v, do, slopes):
        return (
            backend.local_state(k, v, slopes, reverse=True),
            backend.state_gradient(q, do, slopes, scale=0.5, reverse=True),
        )

    sharded = jax.shard_map(
        both, mesh=mesh, in_specs=(spec, spec, spec, spec, P()), out_specs=(P("data", "seq"),) * 2,
        check_vma=True,
    )  # fmt: skip
    got = jax.jit(sharded)(q, k, v, do, slopes)
    want = jax.jit(both)(q, k, v, do, slopes)
    for name, a, b in zip(["local_state", "state_gradient"], got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


# ---- non-finite values flow only forward (tests/test_nonfinite.py's checks, on the Triton kernels)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("reverse,packed", nonfinite.RUNS, ids=["fwd", "rev", "packed", "packed-rev"])
def test_nonfinite_is_causal(reverse, packed, dtype):
    # Chunks of 64: the poisoned tokens 37, 63, 64, 31 are mid-chunk, chunk end, chunk start, mid-chunk.
    from shardattn.kernels.lightning import triton as backend

    inner = nonfinite.backend_fn(backend, reverse, packed)
    fn = jax.jit(lambda q, k, v, s, s0: inner(q.astype(dtype), k.astype(dtype), v.astype(dtype), s, s0))
    nonfinite.check_causal(fn, reverse=reverse, packed=packed)


# float32 takes the sequential backward (dq pass + dkdv_kernel), bfloat16 the chunk-parallel one.
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_nan_in_q_reaches_no_later_key_gradient(reverse, dtype):
    from shardattn.kernels.lightning import triton as backend

    fn = lambda q, k, v, slopes, s0: backend.lightning_attention(  # noqa: E731
        q, k, v, slopes, s0, None, scale=nonfinite.SCALE, reverse=reverse
    )
    nonfinite.check_q_nan_gradient(fn, reverse=reverse, dtype=dtype)

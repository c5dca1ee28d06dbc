"""The Triton lightning backend's shared launches, checked on any machine (no Triton needed).

A sequence shard computes local_state and then runs the kernel from S_in; where the kernel cuts its
sequences into segments, its first pass is the same walk over k, v. Both must be the same launch (same
kernel, grid, operands, output shapes and parameters), so that XLA computes it once (CSE); likewise
state_gradient and the backward G walk's first pass. (On an H200 this took a 2-way shard of 512K tokens
per device from 0.87 to 1.00 of the bare kernel's forward speed; benchmarks/scaling.py --emulate.)
Here the launches are recorded instead of run, and compared.
"""

import jax
import jax.numpy as jnp
import pytest

from shardattn.kernels.lightning import triton as tr
from shardattn.kernels.triton_grid import flat_grid


@pytest.fixture
def launches(monkeypatch):
    calls = []
    kernels = ("fwd_kernel", "dkdv_kernel", "dstate_kernel", "chunk_kernel")
    monkeypatch.setattr(tr, "_kernels", lambda: kernels)

    def record(kernel, grid, inputs, out_shapes, **params):
        calls.append(dict(kernel=kernel, grid=grid, inputs=inputs, out_shapes=out_shapes, params=params))
        return tuple(jnp.zeros(s.shape, s.dtype) for s in out_shapes)

    monkeypatch.setattr(tr, "_launch", record)
    return calls


def _same_launch(a, b, shared):
    """Equal kernel, grid, outputs and parameters; the operands in `shared` are the same traced values."""
    for key in ("kernel", "grid", "out_shapes", "params"):
        assert a[key] == b[key], key
    assert len(a["inputs"]) == len(b["inputs"])
    for i, (x, y) in enumerate(zip(a["inputs"], b["inputs"], strict=True)):
        if i in shared:
            assert x is y, f"operand {i} differs"
        else:  # constants made from static shapes (dummies, sequence bounds)
            assert (x.shape, x.dtype) == (y.shape, y.dtype), f"operand {i} differs"


@pytest.mark.parametrize("D", [64, 128])  # at 128 the walk that stores S_in has its own Dv block and warps
@pytest.mark.parametrize("reverse", [False, True])
def test_local_state_is_the_forward_segment_pass(launches, reverse, D):
    B, T, H = 1, 1100, 2
    blocks = tr.BlockSizes.get_default(D, D, jnp.bfloat16)
    P, _ = tr._segments(B * H, T, blocks)
    assert P > 1  # the case where the kernel has a segment pass

    def traced(q, k, v, slopes, s0):  # compared while tracing: the operands are tracers
        tr._local_state(k, v, slopes, reverse, blocks)
        tr._forward_pass(q, k, v, slopes, s0, None, scale=0.125, reverse=reverse, store_states=True,
                         out_dtype=q.dtype, blocks=blocks, state_dtype=jnp.bfloat16)  # fmt: skip
        local, prepass, main = launches
        assert local["params"]["STATES_ONLY"] and not main["params"]["STATES_ONLY"]
        _same_launch(local, prepass, shared={1, 2, 3})  # k, v, slopes
        return 0

    x = jnp.zeros((B, T, H, D), jnp.bfloat16)
    jax.make_jaxpr(traced)(x, x, x, jnp.ones((H,), jnp.float32), jnp.zeros((B, H, D, D), jnp.float32))
    assert len(launches) == 3


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("reverse", [False, True])
def test_state_gradient_is_the_g_walk_first_pass(launches, reverse, D):
    B, T, H = 1, 1100, 2
    blocks = tr.BlockSizes.get_default(D, D, jnp.bfloat16)
    opts = tr.Options(scale=0.125, reverse=reverse)

    def traced(q, do, slopes, dfinal):
        tr._state_gradient(q, do, slopes, 0.125, reverse, blocks)
        tr._g_walk(opts, blocks, q, do, slopes, dfinal, None, jnp.bfloat16)
        grad, first, second = launches
        assert second["params"]["SEG_G0"]  # the G walk was cut into segments
        _same_launch(grad, first, shared={0, 1, 2})  # q, dO, slopes
        return 0

    x = jnp.zeros((B, T, H, D), jnp.bfloat16)
    jax.make_jaxpr(traced)(x, x, jnp.ones((H,), jnp.float32), jnp.zeros((B, H, D, D), jnp.float32))
    assert len(launches) == 3


def test_grids_are_one_axis_past_cudas_65535(launches):
    """Every launch of a forward+backward puts all its programs on the grid's first axis (the others hold
    at most 65535): here 70000 chunk slots of one head, which a (Dv block, slot, head) grid could not
    launch. Traced only (make_jaxpr): nothing of this size is allocated."""
    B, T, H, D = 1, 64 * 70000, 1, 16
    blocks = tr.BlockSizes.get_default(D, D, jnp.bfloat16)
    opts = tr.Options(scale=0.25, reverse=False)

    def traced(q, k, v, slopes, do, dfinal):
        _, _, states = tr._forward_pass(q, k, v, slopes, None, None, scale=0.25, reverse=False,
                                        store_states=True, out_dtype=q.dtype, blocks=blocks,
                                        state_dtype=jnp.bfloat16)  # fmt: skip
        tr._bwd_parallel(opts, blocks, q, k, v, slopes, None, None, do, dfinal, states)
        return 0

    x = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
    jax.make_jaxpr(traced)(x, x, x, jax.ShapeDtypeStruct((H,), jnp.float32), x,
                           jax.ShapeDtypeStruct((B, H, D, D), jnp.float32))  # fmt: skip
    kinds = [c["kernel"] for c in launches]
    assert "chunk_kernel" in kinds and "dstate_kernel" in kinds and "fwd_kernel" in kinds
    for call in launches:
        assert len(call["grid"]) == 1, (call["kernel"], call["grid"])
    chunk = launches[kinds.index("chunk_kernel")]
    assert chunk["grid"][0] == chunk["params"]["NV"] * 70000 * H > 65535


def test_flat_grid_refuses_more_programs_than_cuda_launches():
    """kernels/triton_grid.flat_grid, which every lightning and softmax Triton launch uses: one axis of
    all the programs (B * H may pass the 65535 of CUDA's second axis); past 2**31 - 1 it refuses."""
    assert flat_grid(3, 5, 7) == (105,)
    assert flat_grid(3, 70000) == (210000,)
    with pytest.raises(ValueError, match="2\\*\\*31 - 1 programs"):
        flat_grid(2**16, 2**15)

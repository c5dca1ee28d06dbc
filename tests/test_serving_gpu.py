"""Triton decode kernel (GPU only): lightning_decode / lightning_prefill with implementation="triton".

The same comparisons as tests/test_serving.py: decode steps against one reference lightning_attention call,
padding rows, in-place update under donation, blocks and warps, shard_map. Skipped off-GPU by
tests/conftest.py. Run on the GPU machine with `python3 -m pytest -m gpu tests/test_serving_gpu.py -q`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, tolerance
from test_serving import NUM_SLOTS, SCALE, per_request_reference, random_problem, reference_call, run_decode

import shardattn
from shardattn.kernels import triton_interpret
from shardattn.kernels.lightning import reference
from shardattn.meshes import make_mesh

pytestmark = pytest.mark.gpu

CASES = {
    "B3-H4/2-D16x24-f32": dict(B=3, T=5, H=4, Hkv=2, Dk=16, Dv=24),
    "B2-H8/8-D128-f32": dict(B=2, T=4, H=8, Hkv=8, Dk=128, Dv=128),
    "B4-H4/1-D32x96-f32": dict(B=4, T=3, H=4, Hkv=1, Dk=32, Dv=96),  # MQA, Dk != Dv
    "B2-H2-D100-f32": dict(B=2, T=3, H=2, Hkv=2, Dk=100, Dv=100),
    "B2-H2-D256-f32": dict(B=2, T=3, H=2, Hkv=2, Dk=256, Dv=256),
    "B3-H8/2-D128-bf16": dict(B=3, T=5, H=8, Hkv=2, Dk=128, Dv=128, dtype=jnp.bfloat16),
    "B2-H4-D48x100-bf16": dict(B=2, T=4, H=4, Hkv=4, Dk=48, Dv=100, dtype=jnp.bfloat16),
    "B3-H4/2-D64-f16": dict(B=3, T=4, H=4, Hkv=2, Dk=64, Dv=64, dtype=jnp.float16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decode_steps_equal_one_lightning_call(name):
    case = CASES[name]
    dtype = case.get("dtype", jnp.float32)
    q, k, v, slopes, cache = random_problem(11, **case)
    slot_idx = jnp.array([5, 0, NUM_SLOTS - 1, 2][: case["B"]], jnp.int32)
    o, new_cache = run_decode("triton", q, k, v, slopes, cache, slot_idx)
    assert o.dtype == dtype
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    o_ref, s_ref = reference_call()(*f32, slopes, cache[slot_idx])
    assert_close("o", o, o_ref, tolerance(dtype))
    assert_close("states", new_cache[slot_idx], s_ref, tolerance(dtype))
    untouched = np.setdiff1d(np.arange(NUM_SLOTS), np.asarray(slot_idx))
    np.testing.assert_array_equal(new_cache[untouched], cache[untouched])


def test_decode_padding_rows():
    q, k, v, slopes, cache = random_problem(12, B=5, T=2, H=4, Hkv=2, Dk=64, Dv=64)
    slot_idx = jnp.array([-1, 3, -1, 0, -1], jnp.int32)
    o, new_cache = run_decode("triton", q, k, v, slopes, cache, slot_idx)
    assert np.all(np.asarray(o[jnp.array([0, 2, 4])]) == 0.0)
    untouched = np.array([s for s in range(NUM_SLOTS) if s not in (0, 3)])
    np.testing.assert_array_equal(new_cache[untouched], cache[untouched])  # slot 8 (= -1 wrapped) included
    o_xla, cache_xla = run_decode("xla", q, k, v, slopes, cache, slot_idx)
    assert_close("o vs xla", o, o_xla, tolerance(jnp.float32))
    assert_close("cache vs xla", new_cache, cache_xla, tolerance(jnp.float32))


@pytest.mark.skipif(triton_interpret.enabled(), reason="the CPU interpreter's callback cannot alias buffers")
def test_decode_updates_donated_cache_in_place():
    # The compiled module aliases the donated cache to the output, and its temporary memory stays far
    # below the cache's size: the kernel writes into the caller's buffer, no copy of the cache is made.
    q, k, v, slopes, _ = random_problem(13, B=4, T=1, H=8, Hkv=8, Dk=128, Dv=128)
    cache = jnp.zeros((256, 8, 128, 128), jnp.float32)  # 128 MiB
    slot_idx = jnp.array([3, 200, -1, 17], jnp.int32)
    step = jax.jit(
        functools.partial(shardattn.lightning_decode, scale=SCALE, implementation="triton", slopes=slopes),
        donate_argnums=3,
    )
    compiled = step.lower(q[:, 0], k[:, 0], v[:, 0], cache, slot_idx).compile()
    header = compiled.as_text().split("\n", 1)[0]
    assert "input_output_alias={ {1}: (3, {}" in header, header
    memory = compiled.memory_analysis()
    assert memory.temp_size_in_bytes < cache.nbytes // 8, memory
    pointer = cache.unsafe_buffer_pointer()
    o, new_cache = step(q[:, 0], k[:, 0], v[:, 0], cache, slot_idx)
    assert new_cache.unsafe_buffer_pointer() == pointer  # the same buffer, updated in place
    o_ref, cache_ref = reference.decode(
        q[:, 0], k[:, 0], v[:, 0], jnp.zeros_like(new_cache), slot_idx, slopes, scale=SCALE
    )
    assert_close("o", o, o_ref, tolerance(jnp.float32))
    assert_close("cache", new_cache, cache_ref, tolerance(jnp.float32))


@pytest.mark.parametrize("bv, num_warps", [(16, 4), (64, 4), (128, 8), (32, 1)])
def test_block_sizes(bv, num_warps):
    from shardattn.kernels.lightning import triton_decode

    q, k, v, slopes, cache = random_problem(14, B=3, T=1, H=4, Hkv=2, Dk=128, Dv=96, dtype=jnp.bfloat16)
    slot_idx = jnp.array([1, -1, 6], jnp.int32)
    args = (q[:, 0], k[:, 0], v[:, 0], cache, slot_idx, slopes)
    blocks = triton_decode.BlockSizes(bv=bv, num_warps=num_warps)
    o, new_cache = jax.jit(functools.partial(triton_decode.decode, scale=SCALE, blocks=blocks))(*args)
    o_ref, cache_ref = reference.decode(*args, scale=SCALE)
    assert_close("o", o, o_ref, tolerance(jnp.bfloat16))
    assert_close("cache", new_cache, cache_ref, tolerance(jnp.float32))


@pytest.mark.skipif(triton_interpret.enabled(), reason="a cache past 2**31 elements: too big for the host")
def test_large_cache_int64_offsets():
    # 131073 slots of one 128 x 128 head: slot offsets pass 2^31 elements (8.6 GB of float32 states).
    num_slots = 2**31 // (128 * 128) + 1
    q, k, v, slopes, _ = random_problem(15, B=2, T=1, H=1, Hkv=1, Dk=128, Dv=128)
    cache = jnp.zeros((num_slots, 1, 128, 128), jnp.float32)
    slot_idx = jnp.array([num_slots - 1, 5], jnp.int32)
    step = jax.jit(
        functools.partial(shardattn.lightning_decode, scale=SCALE, implementation="triton", slopes=slopes),
        donate_argnums=3,
    )
    o, cache = step(q[:, 0], k[:, 0], v[:, 0], cache, slot_idx)
    two_slots = jnp.zeros((2, 1, 128, 128), jnp.float32)  # the used slots, as they were (zero)
    o_ref, s_ref = reference.decode(
        q[:, 0], k[:, 0], v[:, 0], two_slots, jnp.array([0, 1], jnp.int32), slopes, scale=SCALE
    )
    assert_close("o", o, o_ref, tolerance(jnp.float32))
    assert_close("last slot", cache[num_slots - 1], s_ref[0], tolerance(jnp.float32))
    assert_close("slot 5", cache[5], s_ref[1], tolerance(jnp.float32))
    assert float(jnp.abs(cache[num_slots - 2]).max()) == 0.0


def test_inside_shard_map_with_varying_axes_checked():
    # Head-parallel decode on a one-GPU mesh (shard_map with check_vma=True) equals the bare kernel call.
    mesh = make_mesh(data=1, seq=1, heads=1, devices=jax.devices()[:1])
    q, k, v, slopes, cache = random_problem(16, B=3, T=1, H=4, Hkv=2, Dk=64, Dv=32, dtype=jnp.bfloat16)
    slot_idx = jnp.array([2, -1, 4], jnp.int32)
    kw = dict(slopes=slopes, scale=SCALE, implementation="triton")
    args = (q[:, 0], k[:, 0], v[:, 0], cache, slot_idx)
    o, c = jax.jit(functools.partial(shardattn.lightning_decode, **kw))(*args)
    o_tp, c_tp = jax.jit(functools.partial(shardattn.lightning_decode, mesh=mesh, **kw))(*args)
    np.testing.assert_array_equal(np.asarray(o_tp, np.float32), np.asarray(o, np.float32))
    np.testing.assert_array_equal(c_tp, c)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_prefill_through_triton_equals_per_request_calls(dtype):
    lengths, slots = [0, 1, 63, 5, 300], [2, 6, 0, -1, 8]
    cu = np.concatenate([[0], np.cumsum(lengths)])
    q, k, v, slopes, cache = random_problem(17, B=1, T=int(cu[-1]), H=4, Hkv=2, Dk=64, Dv=64, dtype=dtype)
    o, new_cache = shardattn.lightning_prefill(
        q, k, v, cache, jnp.array(slots, jnp.int32), jnp.asarray(cu, jnp.int32), slopes=slopes, scale=SCALE,
        implementation="triton",
    )  # fmt: skip
    o_ref, cache_ref = per_request_reference(q, k, v, slopes, cache, slots, cu)
    assert_close("o", o, o_ref, tolerance(dtype))
    assert_close("states", new_cache, cache_ref, tolerance(dtype))

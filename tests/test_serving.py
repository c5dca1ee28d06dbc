"""Serving: lightning_decode / lightning_prefill on a slot-indexed state cache, against the reference.

Decode steps must reproduce lightning_attention over the same tokens (outputs and final states); prefill of
packed requests must reproduce one lightning_attention call per request; head-sharded runs on the 8 fake
CPU devices must equal the unsharded ones bitwise, with no collectives. The Triton decode kernel runs the
same comparisons in tests/test_serving_gpu.py (GPU only).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, tolerance

import shardattn
from shardattn.meshes import make_mesh

SCALE = 0.7
NUM_SLOTS = 9


def random_problem(seed, *, B, T, H, Hkv, Dk, Dv, dtype=jnp.float32, num_slots=NUM_SLOTS):
    """T tokens for each of B rows (k, v scaled so outputs stay O(1)), slopes, and a random cache.

    Drawn with numpy: eager jax.random would compile once per shape, which costs more than the tests."""
    rng = np.random.default_rng(seed)
    draw = lambda *shape: rng.standard_normal(shape, np.float32)
    q = jnp.asarray(draw(B, T, H, Dk).astype(dtype))
    k = jnp.asarray((draw(B, T, Hkv, Dk) / np.sqrt(Dk)).astype(dtype))
    v = jnp.asarray(draw(B, T, Hkv, Dv).astype(dtype))
    slopes = jnp.asarray(rng.uniform(0.0, 1.0, H).astype(np.float32))
    cache = jnp.asarray(draw(num_slots, H, Dk, Dv))
    return q, k, v, slopes, cache


@functools.cache
def reference_call():
    """Jitted reference lightning_attention (one compile per shape rather than one per eager op)."""
    fn = functools.partial(
        shardattn.lightning_attention, scale=SCALE, return_state=True, implementation="reference"
    )
    return jax.jit(lambda q, k, v, slopes, s0: fn(q, k, v, slopes=slopes, initial_state=s0))


@functools.cache
def decode_step(impl):
    # One compiled step per backend, shared by the cases; the cache is donated (updated in place).
    fn = functools.partial(shardattn.lightning_decode, scale=SCALE, implementation=impl)
    return jax.jit(
        lambda q, k, v, cache, slot, slopes: fn(q, k, v, cache, slot, slopes=slopes), donate_argnums=3
    )


def run_decode(impl, q, k, v, slopes, cache, slot_idx):
    """T decode steps of the B rows of q, k, v [B, T, h, D]: o [B, T, H, Dv] and the final cache."""
    step = decode_step(impl)
    cache = jnp.array(cache)  # a copy: the step donates it
    q, k, v = (np.asarray(x) for x in (q, k, v))  # host slices: no eager slicing op per step
    outs = []
    for t in range(q.shape[1]):
        o, cache = step(q[:, t], k[:, t], v[:, t], cache, slot_idx, slopes)
        outs.append(o)
    return jnp.stack(outs, axis=1), cache


DECODE_CASES = {
    "B3-H4/2-D16x24-f32": dict(B=3, T=5, H=4, Hkv=2, Dk=16, Dv=24),
    "B2-H4/1-D32-f32": dict(B=2, T=4, H=4, Hkv=1, Dk=32, Dv=32),  # MQA
    "B3-H4/2-D16x24-bf16": dict(B=3, T=5, H=4, Hkv=2, Dk=16, Dv=24, dtype=jnp.bfloat16),
}


# The reference's decode (a scan over rows) once; the xla backend on every case.
@pytest.mark.parametrize(
    "impl, name", [("reference", "B3-H4/2-D16x24-f32")] + [("xla", name) for name in DECODE_CASES]
)
def test_decode_steps_equal_one_lightning_call(impl, name):
    case = DECODE_CASES[name]
    dtype = case.get("dtype", jnp.float32)
    q, k, v, slopes, cache = random_problem(1, **case)
    slot_idx = jnp.array([5, 0, NUM_SLOTS - 1][: case["B"]], jnp.int32)
    o, new_cache = run_decode(impl, q, k, v, slopes, cache, slot_idx)
    assert o.dtype == dtype and new_cache.dtype == jnp.float32
    # The same tokens in one call, each row starting from its slot's state (reference on float32 inputs).
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    o_ref, s_ref = reference_call()(*f32, slopes, cache[slot_idx])
    assert_close("o", o, o_ref, tolerance(dtype))
    assert_close("states", new_cache[slot_idx], s_ref, tolerance(dtype))
    untouched = np.setdiff1d(np.arange(NUM_SLOTS), np.asarray(slot_idx))
    np.testing.assert_array_equal(new_cache[untouched], cache[untouched])


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_decode_padding_rows(impl):
    # Rows with slot -1 give o = 0 and change nothing, in particular not slot num_slots - 1 (no wrap).
    q, k, v, slopes, cache = random_problem(2, B=4, T=2, H=4, Hkv=2, Dk=16, Dv=24)
    slot_idx = jnp.array([-1, 3, -1, 0], jnp.int32)
    o, new_cache = run_decode(impl, q, k, v, slopes, cache, slot_idx)
    assert np.all(np.asarray(o[jnp.array([0, 2])]) == 0.0)
    untouched = np.array([s for s in range(NUM_SLOTS) if s not in (0, 3)])
    np.testing.assert_array_equal(new_cache[untouched], cache[untouched])
    # The real rows are unaffected by the padding ones: the same as a call with those rows alone.
    o_real, cache_real = run_decode(impl, q[1::2], k[1::2], v[1::2], slopes, cache, slot_idx[1::2])
    np.testing.assert_allclose(o[1::2], o_real, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new_cache, cache_real, rtol=1e-6, atol=1e-6)


def test_decode_donation_updates_in_place():
    # Under jit with the cache donated, the compiled module aliases it to the output cache, and the
    # temporary memory is far below the cache's size (no copy of it). xla backend, 64 slots, 2 rows.
    q, k, v, slopes, _ = random_problem(3, B=2, T=1, H=4, Hkv=2, Dk=16, Dv=24)
    cache = jnp.zeros((64, 4, 16, 24), jnp.float32)
    slot_idx = jnp.array([7, 40], jnp.int32)
    compiled = decode_step("xla").lower(q[:, 0], k[:, 0], v[:, 0], cache, slot_idx, slopes).compile()
    text = compiled.as_text()
    header = text[: text.index("\n")]
    assert "input_output_alias={ {1}: (3, {}" in header, header  # output 1 (cache) <- parameter 3 (cache)
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes == cache.nbytes
    assert memory.temp_size_in_bytes < cache.nbytes // 8, memory


def per_request_reference(q, k, v, slopes, cache, slot_idx, cu):
    """One reference lightning_attention call per request, from its slot's state (zero for -1)."""
    outs, new_cache = [], np.array(cache)
    for i in range(len(cu) - 1):
        s = int(slot_idx[i])
        lo, hi = cu[i], cu[i + 1]
        state = cache[s][None] if s >= 0 else jnp.zeros_like(cache[:1])
        if hi == lo:
            continue
        o_i, s_i = reference_call()(*(x[:, lo:hi].astype(jnp.float32) for x in (q, k, v)), slopes, state)
        outs.append(o_i if s >= 0 else jnp.zeros_like(o_i))
        if s >= 0:
            new_cache[s] = s_i[0]
    return jnp.concatenate(outs, axis=1), new_cache


@pytest.mark.parametrize("dtype", [jnp.float32], ids=["f32"])  # bf16: tests/test_serving_gpu.py
def test_prefill_equals_per_request_calls(dtype):
    # Requests of lengths 0, 1, 63, 300 (and a padding request of 5) from non-zero states, in one call.
    lengths, slots = [0, 1, 63, 5, 300], [2, 6, 0, -1, 8]
    cu = np.concatenate([[0], np.cumsum(lengths)])
    q, k, v, slopes, cache = random_problem(4, B=1, T=int(cu[-1]), H=4, Hkv=2, Dk=16, Dv=24, dtype=dtype)
    slot_idx = jnp.array(slots, jnp.int32)
    prefill = jax.jit(
        functools.partial(shardattn.lightning_prefill, scale=SCALE, implementation="xla"), donate_argnums=3
    )
    o, new_cache = prefill(q, k, v, jnp.array(cache), slot_idx, jnp.asarray(cu, jnp.int32), slopes=slopes)
    o_ref, cache_ref = per_request_reference(q, k, v, slopes, cache, slots, cu)
    assert o.dtype == dtype
    assert_close("o", o, o_ref, tolerance(dtype))
    assert_close("states", new_cache, cache_ref, tolerance(dtype))
    np.testing.assert_array_equal(np.asarray(o[0, 64:69]), 0.0)  # the padding request's tokens
    for s in (1, 3, 4, 5, 7, 2):  # unused slots, and slot 2 (its request is empty): unchanged
        np.testing.assert_array_equal(new_cache[s], cache[s])


# ---------------------------------------------------------------------------------- tensor parallel


COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter")


@pytest.mark.parametrize("heads, Hkv", [(8, 8), (4, 2)], ids=["heads8-kv8", "heads4-kv2-replicated"])
def test_head_sharded_equals_unsharded(heads, Hkv):
    # 8 query heads over `heads` shards. 2 kv heads do not split over 4 shards: k, v are replicated over
    # the axis and each shard slices the kv head of its query heads.
    # Prefill equals the unsharded call bitwise. Decode may differ in the last bit: XLA's CPU loop for
    # decay * S + k v^T contracts it into an FMA in its vector body but not in the scalar tail of the
    # loop, and a shard's loop (fewer heads) has its tail elsewhere (seen: every element of a shard
    # equals fma(k, v, round(decay * S)); the unsharded loop's last head does not). So decode is held
    # to one float32 rounding, not to bit equality.
    H = 8
    mesh = make_mesh(data=8 // heads, seq=1, heads=heads)
    q, k, v, slopes, cache = random_problem(5, B=3, T=20, H=H, Hkv=Hkv, Dk=16, Dv=8)
    kw = dict(slopes=slopes, scale=SCALE, implementation="xla")
    slot_idx = jnp.array([4, -1, 1], jnp.int32)

    decode = functools.partial(shardattn.lightning_decode, **kw)
    args = (q[:, 0], k[:, 0], v[:, 0], cache, slot_idx)
    o, c = jax.jit(decode)(*args)
    sharded = jax.jit(functools.partial(decode, mesh=mesh))
    o_tp, c_tp = sharded(*args)
    np.testing.assert_allclose(o_tp, o, rtol=5e-7, atol=5e-7 * float(jnp.max(jnp.abs(o))))
    np.testing.assert_allclose(c_tp, c, rtol=5e-7, atol=5e-7 * float(jnp.max(jnp.abs(c))))
    assert c_tp.sharding.spec[1] == "heads"
    text = sharded.lower(*args).compile().as_text()
    assert not [op for op in COLLECTIVES if op in text]

    prefill = functools.partial(shardattn.lightning_prefill, **kw)
    cu = jnp.array([0, 1, 13, 20], jnp.int32)
    args = (q[:1], k[:1], v[:1], cache, slot_idx, cu)
    o, c = jax.jit(prefill)(*args)
    sharded = jax.jit(functools.partial(prefill, mesh=mesh))
    o_tp, c_tp = sharded(*args)
    np.testing.assert_array_equal(o_tp, o)
    np.testing.assert_array_equal(c_tp, c)
    text = sharded.lower(*args).compile().as_text()
    assert not [op for op in COLLECTIVES if op in text]


# ---------------------------------------------------------------------------------------- bad inputs


def _decode_args(**over):
    q, k, v, slopes, cache = random_problem(6, B=2, T=1, H=4, Hkv=2, Dk=8, Dv=8)
    args = dict(q=q[:, 0], k=k[:, 0], v=v[:, 0], cache=cache, slot_idx=jnp.array([0, 1], jnp.int32))
    args.update(over)
    return args


BAD_DECODE = {
    "slot-out-of-range": (dict(slot_idx=jnp.array([0, NUM_SLOTS], jnp.int32)), ValueError, "slot_idx"),
    "slot-below-minus-one": (dict(slot_idx=jnp.array([-2, 0], jnp.int32)), ValueError, "slot_idx"),
    "slot-duplicate": (dict(slot_idx=jnp.array([3, 3], jnp.int32)), ValueError, "duplicate"),
    "slot-dtype": (dict(slot_idx=jnp.array([0, 1], jnp.float32)), TypeError, "slot_idx"),
    "slot-shape": (dict(slot_idx=jnp.array([0, 1, 2], jnp.int32)), ValueError, "slot_idx"),
    "cache-dtype": (dict(cache=jnp.zeros((NUM_SLOTS, 4, 8, 8), jnp.bfloat16)), TypeError, "cache"),
    "cache-shape": (dict(cache=jnp.zeros((NUM_SLOTS, 2, 8, 8), jnp.float32)), ValueError, "cache"),
    "q-rank": (dict(q=jnp.zeros((2, 1, 4, 8))), ValueError, "q must be"),
    "kv-heads": (dict(k=jnp.zeros((2, 3, 8)), v=jnp.zeros((2, 3, 8))), ValueError, "divisible"),
}


@pytest.mark.parametrize("name", list(BAD_DECODE))
def test_decode_bad_inputs(name):
    over, error, match = BAD_DECODE[name]
    args = _decode_args(**over)
    with pytest.raises(error, match=match):
        shardattn.lightning_decode(**args, layer_idx=0, num_layers=2)


def test_prefill_bad_inputs():
    q, k, v, _, cache = random_problem(7, B=1, T=10, H=4, Hkv=2, Dk=8, Dv=8)
    cu = jnp.array([0, 4, 10], jnp.int32)
    call = functools.partial(shardattn.lightning_prefill, layer_idx=0, num_layers=2)
    with pytest.raises(ValueError, match="slot_idx must have shape"):
        call(q, k, v, cache, jnp.array([0], jnp.int32), cu)
    with pytest.raises(ValueError, match="duplicate"):
        call(q, k, v, cache, jnp.array([1, 1], jnp.int32), cu)
    with pytest.raises(ValueError, match="cu_seqlens must end"):
        call(q, k, v, cache, jnp.array([0, 1], jnp.int32), jnp.array([0, 4, 9], jnp.int32))
    with pytest.raises(ValueError, match="cu_seqlens must be given"):
        call(q, k, v, cache, jnp.array([0, 1], jnp.int32), None)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    with pytest.raises(ValueError, match="head_axis"):  # the mesh has no "heads" axis
        call(q, k, v, cache, jnp.array([0, 1], jnp.int32), cu, mesh=mesh)
    with pytest.raises(ValueError, match="divisible by the size of mesh axis 'x'"):  # 4 heads, 8 shards
        call(q, k, v, cache, jnp.array([0, 1], jnp.int32), cu, mesh=mesh, head_axis="x")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the fall-through where triton cannot run")
def test_decode_backend_fall_through():
    # The Triton kernel cannot run off-GPU: asked alone it raises NotImplementedError with the reason,
    # first in a list it hands the call to the next backend.
    args = _decode_args()
    with pytest.raises(NotImplementedError, match="triton"):
        shardattn.lightning_decode(**args, layer_idx=0, num_layers=2, implementation="triton")
    o, cache = shardattn.lightning_decode(**args, layer_idx=0, num_layers=2, implementation=("triton", "xla"))
    o_xla, cache_xla = shardattn.lightning_decode(**args, layer_idx=0, num_layers=2, implementation="xla")
    np.testing.assert_array_equal(o, o_xla)
    np.testing.assert_array_equal(cache, cache_xla)

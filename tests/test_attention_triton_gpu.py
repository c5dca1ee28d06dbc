"""Softmax Triton backend (GPU only): o, lse and every gradient against the float32 reference.

Skipped off-GPU by tests/conftest.py (the `gpu` marker). Run on the GPU machine with
`python3 -m pytest -m gpu tests/test_attention_triton_gpu.py -q`. The same kernel bodies run on CPU in
Triton's interpreter (test_attention_triton_interpret.py), at tiny shapes and without bfloat16.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, tolerance
from triton_attention_check import check_against_reference, inputs, loss_and_grads, positions

import shardattn
from shardattn.kernels.attention import reference
from shardattn.kernels.attention import triton as triton_attn
from shardattn.kernels.attention.options import AttentionOptions

pytestmark = pytest.mark.gpu

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
# (B, T, S, H, Hkv, Dk, Dv): odd lengths, T != S both ways, GQA / MQA, head dims padded to powers of two
SHAPES = [
    (2, 500, 500, 4, 4, 64, 64),
    (1, 63, 200, 2, 2, 128, 128),
    (2, 130, 130, 4, 4, 48, 100),
    (1, 500, 500, 8, 2, 64, 64),
    (2, 100, 300, 4, 1, 32, 96),
    (1, 300, 120, 4, 2, 80, 80),
    (1, 200, 200, 2, 2, 256, 256),
    (1, 70, 70, 2, 2, 16, 256),
]


def _id(shape, dtype):
    B, T, S, H, Hkv, Dk, Dv = shape
    hkv = f"/{Hkv}" if Hkv != H else ""
    dv = f"x{Dv}" if Dv != Dk else ""
    return f"B{B}-T{T}-S{S}-H{H}{hkv}-D{Dk}{dv}-{jnp.dtype(dtype).name}"


# Every shape in bfloat16; float32 and float16 on a few (each new shape compiles three kernels).
CASES = [(s, BF16) for s in SHAPES] + [(SHAPES[i], F32) for i in (0, 2, 4, 6)] + [(SHAPES[3], F16)]


@pytest.mark.parametrize("shape,dtype", CASES, ids=[_id(*c) for c in CASES])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_matches_reference(shape, dtype, causal):
    B, T, S, H, Hkv, Dk, Dv = shape
    q, k, v = inputs(B, T, S, H, Hkv, Dk, Dv, dtype)
    qp, kp = positions(B, T, S)
    check_against_reference(q, k, v, q_positions=qp, kv_positions=kp,
                            options=AttentionOptions(scale=Dk**-0.5, causal=causal))  # fmt: skip


# Features combined as a user would write them (a small product, not one at a time only).
FEATURES = [
    dict(causal=True, window=(64, 0)),
    dict(causal=False, window=(40, 17)),
    dict(causal=True, soft_cap=20.0),
    dict(causal=True, sinks=2),
    dict(causal=True, segments=True),
    dict(causal=True, window=(50, 0), soft_cap=5.0, sinks=1, segments=True),
    dict(causal=False, bias=(1, 4)),
    dict(causal=True, bias=(2, 1), soft_cap=10.0, sinks=1),
    dict(causal=True, window=(100, 0), bias=(2, 4), segments=True),
]


def _feature_id(f):
    return "-".join(f"{k}{'' if v is True else v}" for k, v in f.items() if v is not False).replace(" ", "")


FEATURE_CASES = [(f, BF16) for f in FEATURES] + [(FEATURES[i], F32) for i in (1, 5, 7)]


@pytest.mark.parametrize(
    "feature,dtype", FEATURE_CASES, ids=[f"{_feature_id(f)}-{jnp.dtype(d).name}" for f, d in FEATURE_CASES]
)
def test_features(feature, dtype):
    B, T, S, H, Hkv, D = 2, 333, 333, 4, 2, 64
    q, k, v = inputs(B, T, S, H, Hkv, D, D, dtype, seed=1)
    qp, kp = positions(B, T, S)
    kw = {}
    if feature.get("segments"):  # packed: per-row different lengths, positions restarting per segment
        lens = [[100, 150, 83], [33, 200, 100]]
        seg = np.stack([np.repeat(np.arange(3), ln) for ln in lens]).astype(np.int32)
        pos = np.stack([np.concatenate([np.arange(n) for n in ln]) for ln in lens]).astype(np.int32)
        kw.update(q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg))
        qp = kp = jnp.asarray(pos)
    bias = sinks = None
    if "bias" in feature:
        bias = jax.random.normal(jax.random.PRNGKey(2), (*feature["bias"], T, S), jnp.float32)
    if "sinks" in feature:
        sinks = jax.random.normal(jax.random.PRNGKey(3), (H, feature["sinks"]), jnp.float32)
    options = AttentionOptions(scale=D**-0.5, causal=feature["causal"], window=feature.get("window"),
                               soft_cap=feature.get("soft_cap"))  # fmt: skip
    check_against_reference(q, k, v, bias=bias, sinks=sinks, q_positions=qp, kv_positions=kp, options=options,
                            **kw)  # fmt: skip


@pytest.mark.parametrize("offsets", [(1000, 77), (1000, 77, 6, 12)], ids=["q-kv", "q-kv-batch-head"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_dropout_equals_reference_mask(dtype, offsets):
    """The kernels' hash with global token offsets, and with batch and head offsets too (a batch/head
    shard of sharded_attention passes them), equals the reference's mask."""
    B, T, S, H, D = 2, 300, 400, 4, 64
    q, k, v = inputs(B, T, S, H, 2, D, D, dtype, seed=4)
    qp, kp = positions(B, T, S)
    options = AttentionOptions(scale=D**-0.5, causal=True, dropout_rate=0.2)
    check_against_reference(q, k, v, q_positions=qp, kv_positions=kp, dropout_rng=jax.random.key(5),
                            dropout_offsets=tuple(map(jnp.int32, offsets)), options=options)  # fmt: skip


@pytest.mark.parametrize("soft_cap", [None, 4.0], ids=["no-cap", "soft-cap"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_empty_rows_and_nan_at_unseen_keys(dtype, soft_cap):
    B, T, S, H, D = 1, 300, 384, 4, 64
    q, k, v = inputs(B, T, S, H, 2, D, D, dtype, seed=5)
    q_seg = np.zeros((B, T), np.int32)
    q_seg[:, 250:] = 9  # no key has segment 9
    kv_seg = np.zeros((B, S), np.int32)
    kv_seg[:, 290:] = -1  # no query has segment -1: these keys hold NaN
    k = k.at[:, 290:].set(jnp.nan)
    v = v.at[:, 290:].set(jnp.nan)
    qp, kp = positions(B, T, S)
    options = AttentionOptions(scale=D**-0.5, causal=True, soft_cap=soft_cap)  # tanh(NaN) must not leak
    kw = dict(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg), q_positions=qp,
              kv_positions=kp)  # fmt: skip
    fn = functools.partial(triton_attn.attention, options=options)
    o, lse, (dq, dk, dv) = loss_and_grads(fn, q, k, v, None, None, kw)
    assert np.all(np.asarray(o, np.float32)[:, 250:] == 0) and np.all(np.asarray(lse)[:, :, 250:] == -np.inf)
    assert np.all(np.asarray(dq, np.float32)[:, 250:] == 0)
    assert np.all(np.asarray(dk, np.float32)[:, 290:] == 0) and np.all(
        np.asarray(dv, np.float32)[:, 290:] == 0
    )
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref = functools.partial(reference.attention, options=options)
    ro, rlse, rgrads = loss_and_grads(ref, f32(q), f32(k), f32(v), None, None, kw)
    assert_close("o", o, ro, tolerance(dtype))
    assert_close("lse", np.asarray(lse)[:, :, :250], np.asarray(rlse)[:, :, :250], tolerance(dtype))
    for name, g, rg in zip(("dq", "dk", "dv"), (dq, dk, dv), rgrads, strict=True):
        assert_close(name, g, rg, tolerance(dtype, grad=True))


def test_small_blocks_many_programs():
    """Blocks of 16 at T = 1000 (grids of 63 x 8 programs, many masked and full blocks) in bfloat16."""
    small = triton_attn.BlockSizes(16, 16, 4, 1, 16, 16, 4, 1, 16, 16, 4, 1)
    q, k, v = inputs(1, 1000, 1000, 8, 2, 64, 64, BF16, seed=6)
    qp, kp = positions(1, 1000, 1000)
    check_against_reference(q, k, v, q_positions=qp, kv_positions=kp, blocks=small,
                            options=AttentionOptions(scale=0.125, causal=True, window=(200, 0)))  # fmt: skip


def test_more_batch_heads_than_a_grid_axis_holds():
    """B * H = 66000 (GQA 10 to 1): past the 65535 programs that grid axes 1 and 2 hold, so only the single
    flat grid axis launches the forward, dq and dk/dv kernels; two query and key blocks each."""
    q, k, v = inputs(3, 150, 150, 22000, 2200, 16, 16, BF16, seed=7)
    qp, kp = positions(3, 150, 150)
    check_against_reference(q, k, v, q_positions=qp, kv_positions=kp,
                            options=AttentionOptions(scale=0.25, causal=True))  # fmt: skip


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_backward_with_merged_o_and_lse(dtype):
    """A ring's use: forward on two key halves, merge_attention, then backward per half with the merged o
    and lse; dq summed and dk, dv concatenated equal the whole call's gradients."""
    B, T, S, H, D = 1, 256, 512, 4, 64
    q, k, v = inputs(B, T, S, H, 2, D, D, dtype, seed=7)
    qp, kp = positions(B, T, S)
    do = jax.random.normal(jax.random.PRNGKey(8), (B, T, H, D), jnp.float32).astype(dtype)
    options = AttentionOptions(scale=D**-0.5, causal=True)
    halves = (slice(0, S // 2), slice(S // 2, S))
    parts = [triton_attn.forward(q, k[:, h], v[:, h], q_positions=qp, kv_positions=kp[:, h], options=options)
             for h in halves]  # fmt: skip
    o, lse = shardattn.merge_attention(*parts[0], *parts[1])
    whole_o, whole_lse = triton_attn.forward(q, k, v, q_positions=qp, kv_positions=kp, options=options)
    assert_close("merged o", o, whole_o, tolerance(dtype))
    assert_close("merged lse", lse, whole_lse, tolerance(dtype))
    whole = triton_attn.backward(q, k, v, whole_o, whole_lse, do, q_positions=qp, kv_positions=kp,
                                 options=options)  # fmt: skip
    grads = [triton_attn.backward(q, k[:, h], v[:, h], o, lse, do, q_positions=qp, kv_positions=kp[:, h],
                                  options=options) for h in halves]  # fmt: skip
    tol = tolerance(dtype, grad=True)
    assert_close("dq", grads[0][0].astype(F32) + grads[1][0].astype(F32), whole[0], tol)
    assert_close("dk", jnp.concatenate([grads[0][1], grads[1][1]], axis=1), whole[1], tol)
    assert_close("dv", jnp.concatenate([grads[0][2], grads[1][2]], axis=1), whole[2], tol)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_through_flash_attention(dtype):
    """shardattn.flash_attention(implementation="triton"): cu_seqlens, window, soft cap, sinks, lse."""
    q, k, v = inputs(1, 600, 600, 4, 2, 64, 64, dtype, seed=9)
    cu = jnp.array([0, 100, 350, 600], jnp.int32)
    sinks = jax.random.normal(jax.random.PRNGKey(10), (4,), jnp.float32)
    kw = dict(causal=True, sliding_window=128, logits_soft_cap=30.0, cu_seqlens_q=cu, cu_seqlens_k=cu,
              return_residuals=True)  # fmt: skip

    def loss(impl, q, k, v, sinks):
        o, lse = shardattn.flash_attention(q, k, v, sinks=sinks, implementation=impl, **kw)
        return jnp.sum(o.astype(F32) ** 2) + jnp.sum(lse), (o, lse)

    f32 = lambda x: x.astype(F32)  # noqa: E731
    g, (o, lse) = jax.jit(jax.grad(functools.partial(loss, "triton"), argnums=(0, 1, 2, 3), has_aux=True))(
        q, k, v, sinks
    )
    rg, (ro, rlse) = jax.jit(
        jax.grad(functools.partial(loss, "reference"), argnums=(0, 1, 2, 3), has_aux=True)
    )(f32(q), f32(k), f32(v), sinks)
    assert_close("o", o, ro, tolerance(dtype))
    assert_close("lse", lse, rlse, tolerance(dtype))
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), g, rg, strict=True):
        assert_close(name, a, b, tolerance(dtype, grad=True))


def test_deterministic():
    q, k, v = inputs(2, 500, 500, 4, 2, 64, 64, BF16, seed=11)
    qp, kp = positions(2, 500, 500)
    fn = functools.partial(triton_attn.attention, options=AttentionOptions(scale=0.125, causal=True))
    a = loss_and_grads(fn, q, k, v, None, None, dict(q_positions=qp, kv_positions=kp))
    b = loss_and_grads(fn, q, k, v, None, None, dict(q_positions=qp, kv_positions=kp))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_inside_shard_map_with_varying_axes_checked(dtype):
    """Under shard_map(check_vma=True), batch and heads sharded over axes of size 1: outputs typed like the
    data, replicated sinks' gradient cast correctly; values and gradients equal the bare call."""
    from jax.sharding import PartitionSpec as P

    B, T, H, D = 2, 300, 4, 64
    q, k, v = inputs(B, T, T, H, 2, D, D, dtype, seed=12)
    qp, kp = positions(B, T, T)
    sinks = jax.random.normal(jax.random.PRNGKey(13), (H, 1), jnp.float32)
    options = AttentionOptions(scale=D**-0.5, causal=True)
    mesh = jax.make_mesh((1, 1), ("data", "heads"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    spec = P("data", None, "heads", None)

    def call(q, k, v, sinks, qp, kp):
        o, lse = triton_attn.attention(q, k, v, sinks=sinks, q_positions=qp, kv_positions=kp, options=options)
        return o, lse

    def bare(q, k, v, sinks):
        o, lse = call(q, k, v, sinks, qp, kp)
        return jnp.sum(o.astype(F32) ** 2) + jnp.sum(lse)

    def sharded(q, k, v, sinks):
        run = jax.shard_map(
            call, mesh=mesh, in_specs=(spec, spec, spec, P("heads"), P("data"), P("data")),
            out_specs=(spec, P("data", "heads")), check_vma=True,
        )  # fmt: skip
        o, lse = run(q, k, v, sinks, qp, kp)
        return jnp.sum(o.astype(F32) ** 2) + jnp.sum(lse)

    want = jax.jit(jax.value_and_grad(bare, argnums=(0, 1, 2, 3)))(q, k, v, sinks)
    got = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3)))(q, k, v, sinks)
    for name, a, b in zip(["loss", "dq", "dk", "dv", "dsinks"], jax.tree.leaves(got), jax.tree.leaves(want),
                          strict=True):  # fmt: skip
        assert_close(name, a, b, 1e-6)


def test_refuses_large_head_dim():
    q = jnp.zeros((1, 64, 2, 320), BF16)
    pos = jnp.arange(64, dtype=jnp.int32)[None]
    with pytest.raises(NotImplementedError, match="head dims up to 256"):
        triton_attn.attention(q, q, q, q_positions=pos, kv_positions=pos, options=AttentionOptions(scale=1.0))

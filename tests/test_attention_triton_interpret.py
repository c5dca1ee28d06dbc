"""The softmax Triton kernels (kernels/attention/triton_kernels.py) in Triton's interpreter, on CPU.

Skipped unless torch and triton import (e.g. a venv with triton and torch for CPU). The JAX side of
kernels/attention/triton.py runs unchanged (block ranges, argument plumbing, custom_vjp); only its
`_launch` is replaced by one that runs the same kernel bodies in the interpreter (TRITON_INTERPRET=1, torch
CPU tensors) through jax.pure_callback. Shapes are tiny (the interpreter runs every program in Python);
blocks of 16 make every case span several blocks.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, tolerance
from triton_attention_check import check_against_reference, inputs, loss_and_grads, positions

# The interpreter must be chosen before triton is first imported: triton's own standard-library functions
# (tl.zeros, tl.max, ...) are @triton.jit functions, decorated at import. A GPU process runs the compiled
# kernels instead (tests/test_attention_triton_gpu.py) and must not get interpreted ones.
if jax.default_backend() == "gpu":
    pytest.skip("on a GPU the compiled kernels are tested instead", allow_module_level=True)
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"
torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from shardattn.kernels.attention import reference  # noqa: E402
from shardattn.kernels.attention import triton as triton_attn  # noqa: E402
from shardattn.kernels.attention.options import AttentionOptions  # noqa: E402
from shardattn.kernels.lightning.varying import match_varying  # noqa: E402

SMALL = triton_attn.BlockSizes(16, 16, 4, 1, 16, 16, 4, 1, 16, 16, 4, 1)


def _check(*args, **kw):
    return check_against_reference(*args, blocks=SMALL, **kw)


def _interpreted():
    from shardattn.kernels.attention import triton_kernels

    return triton_kernels


_TORCH = {
    jnp.dtype(jnp.float32): torch.float32,
    jnp.dtype(jnp.bfloat16): torch.bfloat16,
    jnp.dtype(jnp.float16): torch.float16,
    jnp.dtype(jnp.int32): torch.int32,
    jnp.dtype(jnp.uint32): torch.int32,  # carried as int32 bits; the kernels cast to uint32
}


def _to_torch(a):
    a = np.asarray(a)
    if a.dtype == jnp.bfloat16:
        return torch.from_numpy(a.view(np.uint16).astype(np.int16)).view(torch.bfloat16)
    if a.dtype == np.uint32:
        return torch.from_numpy(a.view(np.int32).copy())
    return torch.from_numpy(a.copy())


def _to_numpy(t, dtype):
    if jnp.dtype(dtype) == jnp.bfloat16:
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy().astype(dtype)


def _interpret_launch(name, grid, inputs, out_shapes, *, num_warps, num_stages, zeroed_outputs=(), **meta):
    kernel = getattr(_interpreted(), name)
    meta = dict(meta, FAST_TANH=False)  # tanh.approx.f32 is PTX (inline asm): not in the interpreter

    def host(*arrays):
        args = [_to_torch(a) for a in arrays]
        # Outputs not declared zeroed start as NaN, so an element the kernel fails to write shows up.
        outs = [
            torch.full(s.shape, 0 if n in zeroed_outputs else float("nan"), dtype=_TORCH[jnp.dtype(s.dtype)])
            for n, s in enumerate(out_shapes)
        ]
        kernel[grid](*args, *outs, **meta)
        return tuple(_to_numpy(t, s.dtype) for t, s in zip(outs, out_shapes, strict=True))

    outputs = jax.pure_callback(host, tuple(out_shapes), *inputs)
    return tuple(match_varying(o, *inputs) for o in outputs)  # as triton._launch does


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setattr(triton_attn, "_launch", _interpret_launch)
    monkeypatch.setattr(triton_attn, "_check_platform", lambda: None)


def test_causal_gqa_odd_head_dims():
    """B2-T40-S56-H4/2-D24x20 float32: padded head dims, T != S, several masked and full blocks."""
    B, T, S = 2, 40, 56
    q, k, v = inputs(B, T, S, 4, 2, 24, 20, jnp.float32)
    qp, kp = positions(B, T, S)
    _check(q, k, v, q_positions=qp, kv_positions=kp, options=AttentionOptions(scale=24**-0.5, causal=True))


def test_window_softcap_bias_sinks():
    """Two-sided window (9, 5), soft cap, bias [1, H, T, S], two sinks per head; not causal; MQA H4/1."""
    B, T, S = 1, 48, 48
    q, k, v = inputs(B, T, S, 4, 1, 16, 16, jnp.float32, seed=1)
    qp, kp = positions(B, T, S)
    bias = jax.random.normal(jax.random.PRNGKey(5), (1, 4, T, S), jnp.float32)
    sinks = jax.random.normal(jax.random.PRNGKey(6), (4, 2), jnp.float32)
    options = AttentionOptions(scale=0.5, window=(9, 5), soft_cap=3.0)
    _check(q, k, v, bias=bias, sinks=sinks, q_positions=qp, kv_positions=kp, options=options)


def test_segments_causal_bias_per_batch():
    """Packed segments with causal positions per segment and a bias [B, 1, T, S]."""
    B, T = 2, 48
    q, k, v = inputs(B, T, T, 2, 2, 16, 16, jnp.float32, seed=2)
    seg = np.repeat(np.array([[0, 1, 2], [5, 6, 7]]), [13, 20, 15], axis=1).astype(np.int32)
    pos = np.concatenate([np.arange(13), np.arange(20), np.arange(15)]).astype(np.int32)
    pos = jnp.asarray(np.broadcast_to(pos, (B, T)))
    bias = jax.random.normal(jax.random.PRNGKey(7), (B, 1, T, T), jnp.float32)
    _check(q, k, v, bias=bias, q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg),
           q_positions=pos, kv_positions=pos, options=AttentionOptions(scale=0.25, causal=True))  # fmt: skip


def test_dropout_reproduces_the_shared_mask():
    """Dropout with global offsets: the kernels' uint32 hash must equal dropout.py's bit for bit."""
    B, T, S = 1, 32, 40
    q, k, v = inputs(B, T, S, 2, 2, 16, 16, jnp.float32, seed=3)
    qp, kp = positions(B, T, S)
    options = AttentionOptions(scale=0.25, causal=True, dropout_rate=0.3)
    _check(q, k, v, q_positions=qp, kv_positions=kp, dropout_rng=jax.random.key(11),
           dropout_offsets=(jnp.int32(64), jnp.int32(-8)), options=options)  # fmt: skip


def test_dropout_batch_and_head_offsets():
    """dropout_offsets (q, kv, batch, head): a batch/head shard's kernels hash the global batch and head
    indices (B2, GQA 4/2), equal to the reference with the same offsets and, for the whole-call check,
    to the matching slice of an unsharded call's mask (offsets (0, 0, 1, 2) = batch row 1, heads 2-3)."""
    B, T, S = 2, 32, 32
    q, k, v = inputs(B, T, S, 4, 2, 16, 16, jnp.float32, seed=8)
    qp, kp = positions(B, T, S)
    options = AttentionOptions(scale=0.25, causal=True, dropout_rate=0.3)
    rng = jax.random.key(12)
    offsets = (jnp.int32(16), jnp.int32(-4), jnp.int32(3), jnp.int32(5))
    _check(q, k, v, q_positions=qp, kv_positions=kp, dropout_rng=rng, dropout_offsets=offsets,
           options=options)  # fmt: skip
    # The slice [batch 1, heads 2:4] of the whole call, against that slice called alone with its offsets.
    kw = dict(dropout_rng=rng, options=options, block_sizes=SMALL)
    whole, _ = triton_attn.forward(q, k, v, q_positions=qp, kv_positions=kp, **kw)
    shard = (q[1:, :, 2:], k[1:, :, 1:], v[1:, :, 1:])  # batch row 1, query heads 2, 3 (kv head 1)
    shard_kw = dict(q_positions=qp[1:], kv_positions=kp[1:], **kw)
    part, _ = triton_attn.forward(*shard, **shard_kw, dropout_offsets=(0, 0, 1, 2))
    np.testing.assert_allclose(np.asarray(part), np.asarray(whole[1:, :, 2:]), rtol=1e-6, atol=1e-6)
    unshifted, _ = triton_attn.forward(*shard, **shard_kw)
    assert float(jnp.max(jnp.abs(unshifted - part))) > 0.1  # the offsets did change the mask


def test_empty_rows_and_nan_at_unseen_keys():
    """Rows with nothing allowed: o = 0, lse = -inf, zero gradients; NaN in unseen keys reaches nothing."""
    B, T, S = 1, 40, 48
    q, k, v = inputs(B, T, S, 2, 1, 16, 16, jnp.float32, seed=4)
    q_seg = np.zeros((B, T), np.int32)
    q_seg[:, 30:] = 9  # segment 9 has no keys: empty rows
    kv_seg = np.zeros((B, S), np.int32)
    kv_seg[:, 36:] = -1  # keys that no query sees, holding NaN
    k = k.at[:, 36:].set(jnp.nan)
    v = v.at[:, 36:].set(jnp.nan)
    qp, kp = positions(B, T, S)
    sinks = None
    for options in (
        AttentionOptions(scale=0.25, causal=True),
        AttentionOptions(scale=0.25, causal=True, soft_cap=4.0),
    ):
        _check_empty_and_nan(q, k, v, q_seg, kv_seg, qp, kp, sinks, options)


def _check_empty_and_nan(q, k, v, q_seg, kv_seg, qp, kp, sinks, options):
    kw = dict(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg), q_positions=qp,
              kv_positions=kp)  # fmt: skip
    fn = functools.partial(triton_attn.attention, options=options, block_sizes=SMALL)
    o, lse, (dq, dk, dv) = loss_and_grads(fn, q, k, v, None, sinks, kw)
    assert np.all(np.asarray(o)[:, 30:] == 0) and np.all(np.asarray(lse)[:, :, 30:] == -np.inf)
    assert np.all(np.asarray(dq)[:, 30:] == 0)
    assert np.all(np.asarray(dk)[:, 36:] == 0) and np.all(np.asarray(dv)[:, 36:] == 0)
    # the rest against the reference on the same (NaN-holding) inputs
    ro, rlse, (rdq, rdk, rdv) = loss_and_grads(functools.partial(reference.attention, options=options),
                                                q, k, v, None, None, kw)  # fmt: skip
    tol = tolerance(jnp.float32)
    assert_close("o", o, ro, tol)
    assert_close("lse", np.asarray(lse)[:, :, :30], np.asarray(rlse)[:, :, :30], tol)
    for name, g, rg in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert_close(name, g, rg, 2 * tol)


def test_more_queries_than_keys_and_unsorted_positions():
    """T > S with end-aligned positions (early rows see nothing), then shuffled positions with a window."""
    B, T, S = 1, 56, 40
    q, k, v = inputs(B, T, S, 2, 2, 16, 16, jnp.float32, seed=5)
    qp, kp = positions(B, T, S)
    _check(q, k, v, q_positions=qp, kv_positions=kp, options=AttentionOptions(scale=0.25, causal=True))
    rng = np.random.default_rng(0)
    qp = jnp.asarray(rng.permutation(T)[None].astype(np.int32))
    kp = jnp.asarray(rng.permutation(S)[None].astype(np.int32) + 10)
    _check(q, k, v, q_positions=qp, kv_positions=kp,
           options=AttentionOptions(scale=0.25, causal=True, window=(12, 0)))  # fmt: skip


def test_float16():
    """Half precision with soft cap and a sink. (Not bfloat16: the interpreter stores bfloat16 as uint16 and
    its tl.dot then multiplies the bits; bfloat16 runs in tests/test_attention_triton_gpu.py.)"""
    B, T, S = 1, 40, 40
    q, k, v = inputs(B, T, S, 4, 2, 32, 32, jnp.float16, seed=6)
    qp, kp = positions(B, T, S)
    sinks = jax.random.normal(jax.random.PRNGKey(8), (4, 1), jnp.float32)
    _check(q, k, v, sinks=sinks, q_positions=qp, kv_positions=kp,
           options=AttentionOptions(scale=32**-0.5, causal=True, soft_cap=5.0))  # fmt: skip


def test_backward_uses_the_given_lse_and_o():
    """backward with the whole o and lse, on two key halves: dq sums and dk/dv per half match the whole."""
    B, T, S = 1, 32, 48
    q, k, v = inputs(B, T, S, 2, 2, 16, 16, jnp.float32, seed=7)
    qp, kp = positions(B, T, S)
    options = AttentionOptions(scale=0.25, causal=True)
    do = jax.random.normal(jax.random.PRNGKey(9), (B, T, 2, 16), jnp.float32)
    kw = dict(options=options, block_sizes=SMALL)
    o, lse = triton_attn.forward(q, k, v, q_positions=qp, kv_positions=kp, **kw)
    whole = triton_attn.backward(q, k, v, o, lse, do, q_positions=qp, kv_positions=kp, **kw)
    half = S // 2
    parts = [
        triton_attn.backward(q, k[:, sl], v[:, sl], o, lse, do, q_positions=qp, kv_positions=kp[:, sl], **kw)
        for sl in (slice(0, half), slice(half, S))
    ]
    tol = 2 * tolerance(jnp.float32)
    assert_close("dq", parts[0][0] + parts[1][0], whole[0], tol)
    # grad_dtype=float32 (a ring's partial sums) on float16 inputs: float32 gradients, same values
    half = [x.astype(jnp.float16) for x in (q, k, v, o, do)]
    g16 = triton_attn.backward(*half[:4], lse, half[4], q_positions=qp, kv_positions=kp, **kw)
    g32 = triton_attn.backward(*half[:4], lse, half[4], q_positions=qp, kv_positions=kp, **kw,
                               grad_dtype=jnp.float32)  # fmt: skip
    assert [g.dtype for g in g16[:3]] == [jnp.float16] * 3 and [g.dtype for g in g32[:3]] == [jnp.float32] * 3
    for name, a, b in zip(("dq", "dk", "dv"), g32[:3], g16[:3], strict=True):
        assert_close(name, b, a, 1e-3)  # float16 rounding of the same float32 sums
    assert_close("dk", jnp.concatenate([parts[0][1], parts[1][1]], axis=1), whole[1], tol)
    assert_close("dv", jnp.concatenate([parts[0][2], parts[1][2]], axis=1), whole[2], tol)

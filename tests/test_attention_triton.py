"""The JAX side of the softmax Triton backend on CPU: block ranges from positions, block skipping's cost,
and what the backend refuses. (The kernels themselves: test_attention_triton_interpret.py in Triton's
interpreter, test_attention_triton_gpu.py compiled on a GPU.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shardattn
from shardattn.kernels.attention import triton as triton_attn
from shardattn.kernels.attention.options import AttentionOptions, allowed


def _case(name):
    """(q_pos, kv_pos, q_seg, kv_seg, options): [B, T] / [B, S] int32 arrays and the static options."""
    rng = np.random.default_rng(0)
    B, T, S = 2, 100, 130
    qp = np.broadcast_to(np.arange(S - T, S), (B, T)).astype(np.int32)
    kp = np.broadcast_to(np.arange(S), (B, S)).astype(np.int32)
    none = (None, None)
    if name == "causal":
        return qp, kp, *none, AttentionOptions(scale=1.0, causal=True)
    if name == "window":
        return qp, kp, *none, AttentionOptions(scale=1.0, window=(20, 5))
    if name == "causal-window":
        return qp, kp, *none, AttentionOptions(scale=1.0, causal=True, window=(33, 0))
    if name == "more-queries":  # T > S, end-aligned: the first rows see nothing
        qp = np.broadcast_to(np.arange(-70, 130), (B, 200)).astype(np.int32)
        return qp, kp, *none, AttentionOptions(scale=1.0, causal=True)
    if name == "segments":  # packed, per-batch-row different packings, positions restart per segment
        lens = [[40, 35, 55], [10, 90, 30]]
        seg = np.stack([np.repeat(np.arange(3), ln) for ln in lens]).astype(np.int32)
        pos = np.stack([np.concatenate([np.arange(n) for n in ln]) for ln in lens]).astype(np.int32)
        return pos, pos, seg, seg, AttentionOptions(scale=1.0, causal=True)
    if name == "shuffled":  # arbitrary positions: ranges are a superset
        qp = np.stack([rng.permutation(S)[:T] for _ in range(B)]).astype(np.int32)
        kp = np.stack([rng.permutation(S) for _ in range(B)]).astype(np.int32)
        return qp, kp, *none, AttentionOptions(scale=1.0, causal=True, window=(40, 0))
    raise ValueError(name)


MONOTONE = ("causal", "window", "causal-window", "more-queries", "segments")


@pytest.mark.parametrize("name", MONOTONE + ("shuffled",))
@pytest.mark.parametrize("bq,bk", [(16, 32), (32, 16)])
def test_block_ranges_cover_every_allowed_pair(name, bq, bk):
    """Every allowed pair lies in a visited block; blocks in [flo, fhi) are wholly allowed and unpadded;
    with monotone positions the visited range is exactly the first to the last block with an allowed pair.
    Checked for the query-block ranges (forward, dq) and the transposed ones (dkdv)."""
    qp, kp, qs, ks, options = _case(name)
    B, T = qp.shape
    S = kp.shape[1]
    mask = np.asarray(allowed(jnp.asarray(qp), jnp.asarray(kp), None if qs is None else jnp.asarray(qs),
                              None if ks is None else jnp.asarray(ks), options))  # fmt: skip
    nq, nk = -(-T // bq), -(-S // bk)
    padded = np.zeros((B, nq * bq, nk * bk), bool)
    padded[:, :T, :S] = mask
    pairs = padded.reshape(B, nq, bq, nk, bk).transpose(0, 1, 3, 2, 4)  # [B, nq, nk, bq, bk]
    some = pairs.any(axis=(3, 4))
    every = pairs.all(axis=(3, 4))  # padding counts as not allowed
    need, full = triton_attn.block_pairs(qp, kp, qs, ks, options, bq, bk)
    for ranges, some_, every_ in (
        (triton_attn.block_ranges(need, full), some, every),
        (triton_attn.block_ranges(jnp.swapaxes(need, 1, 2), jnp.swapaxes(full, 1, 2)),
         some.transpose(0, 2, 1), every.transpose(0, 2, 1)),
    ):  # fmt: skip
        r = np.asarray(ranges)
        lo, flo, fhi, hi = (r[..., n] for n in range(4))
        assert np.all((lo <= flo) & (flo <= fhi) & (fhi <= hi))
        idx = np.arange(some_.shape[2])
        visited = (idx >= lo[..., None]) & (idx < hi[..., None])
        assert not np.any(some_ & ~visited), "an allowed pair in a skipped block"
        unmasked = (idx >= flo[..., None]) & (idx < fhi[..., None])
        assert not np.any(unmasked & ~every_), "a block run without mask holds a masked or padded pair"
        if name in MONOTONE:
            has = some_.any(axis=2)
            first = np.where(has, np.argmax(some_, axis=2), 0)
            last = np.where(has, some_.shape[2] - np.argmax(some_[..., ::-1], axis=2), 0)
            np.testing.assert_array_equal(lo, first)
            np.testing.assert_array_equal(hi, last)
            if name in ("causal", "more-queries"):  # (narrow bands and short segments have no full block)
                assert np.sum(unmasked) > 0


def _visited_pairs(T, options, bq=128, bk=64):
    pos = np.arange(T, dtype=np.int32)[None]
    need, full = triton_attn.block_pairs(pos, pos, None, None, options, bq, bk)
    r = np.asarray(triton_attn.block_ranges(need, full))
    return int(np.sum(r[..., 3] - r[..., 0])), int(np.sum(r[..., 2] - r[..., 1]))


def test_window_skips_blocks():
    """Causal window 4096 over 32768 tokens visits its band only: 2 * 4096 / 32768 = 1/4 of causal's pairs
    (1/8 of full attention's) plus one block row of edge per query block."""
    T = 32768
    causal, causal_full = _visited_pairs(T, AttentionOptions(scale=1.0, causal=True))
    window, _ = _visited_pairs(T, AttentionOptions(scale=1.0, causal=True, window=(4096, 0)))
    full, _ = _visited_pairs(T, AttentionOptions(scale=1.0))
    nq, nk = T // 128, T // 64
    assert full == nq * nk
    assert causal == sum(min(nk, (i + 1) * 2) for i in range(nq))  # the causal triangle, to the block
    assert causal_full == causal - 2 * nq  # only the two diagonal key blocks of each query block are masked
    assert window / causal < 0.26 and window / full < 0.131, (window / causal, window / full)


def test_refuses_off_gpu_and_what_it_cannot_serve():
    q = jnp.zeros((1, 16, 2, 32), jnp.float32)
    pos = jnp.arange(16, dtype=jnp.int32)[None]
    with pytest.raises(NotImplementedError, match="needs a GPU"):
        triton_attn.attention(q, q, q, q_positions=pos, kv_positions=pos, options=AttentionOptions(scale=1.0))
    big = jnp.zeros((1, 16, 2, 320), jnp.float32)
    with pytest.raises(NotImplementedError, match="head dims up to 256"):
        triton_attn._check_call(big, big, big, None)
    with pytest.raises(NotImplementedError, match="float32/bfloat16/float16"):
        triton_attn._check_call(q.astype(jnp.int32), q, q, None)
    with pytest.raises(ValueError, match="power of two"):
        triton_attn.BlockSizes(fwd_q=48)


def test_flash_attention_falls_back_from_triton():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (1, 24, 2, 16), jnp.float32) for kk in keys)
    with pytest.raises(NotImplementedError, match="triton: the triton backend needs a GPU"):
        shardattn.flash_attention(q, k, v, causal=True, implementation="triton")
    o = shardattn.flash_attention(q, k, v, causal=True, implementation=("triton", "xla"))
    np.testing.assert_array_equal(o, shardattn.flash_attention(q, k, v, causal=True, implementation="xla"))

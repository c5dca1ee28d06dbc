"""Softmax attention: every backend against the float32 reference (kernels/attention/reference.py).

Outputs, lse and the gradients of q, k, v, bias and sinks, under jit. Feature combinations come from a
small covering array (every pair of features appears on and off together in some case), with the shape
and dtype varied across the cases too, so that each case is one compile per backend.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, rel_rms, tolerance

import shardattn
from shardattn import flash_attention, merge_attention
from shardattn.kernels.attention import dropout, reference, xla
from shardattn.kernels.attention.options import AttentionOptions

f32 = jnp.float32
SMALL_BLOCKS = xla.BlockSizes(block_q=16, block_k=32)  # several blocks even at T = 63


@dataclasses.dataclass(frozen=True)
class Case:
    B: int = 2
    T: int = 63
    S: int | None = None
    H: int = 4
    Hkv: int | None = None
    Dk: int = 32
    Dv: int | None = None
    dtype: object = f32
    causal: bool = False
    window: tuple[int, int] | None = None
    soft_cap: float | None = None
    sinks: bool = False
    segments: bool = False
    bias: str | None = None  # None, "head" ([1, H, T, S]) or "batch" ([B, 1, T, S])
    dropout: float = 0.0
    shuffled: bool = False  # arbitrary (unsorted) positions
    blocks: xla.BlockSizes = SMALL_BLOCKS

    @property
    def id(self) -> str:
        hkv = f"/{self.Hkv}" if self.Hkv and self.Hkv != self.H else ""
        dv = f"x{self.Dv}" if self.Dv and self.Dv != self.Dk else ""
        s = f"-S{self.S}" if self.S and self.S != self.T else ""
        parts = [f"B{self.B}-T{self.T}{s}-H{self.H}{hkv}-D{self.Dk}{dv}-{jnp.dtype(self.dtype).name}"]
        if self.causal:
            parts.append("causal")
        if self.window:
            parts.append(f"win{self.window[0]}.{self.window[1]}")
        if self.soft_cap:
            parts.append(f"cap{self.soft_cap:g}")
        if self.sinks:
            parts.append("sinks")
        if self.segments:
            parts.append("seg")
        if self.bias:
            parts.append(f"bias-{self.bias}")
        if self.dropout:
            parts.append(f"drop{self.dropout:g}")
        if self.shuffled:
            parts.append("shuffled")
        return "-".join(parts)

    @property
    def options(self) -> AttentionOptions:
        window = self.window
        if window is not None and self.causal:
            window = (window[0], 0)
        return AttentionOptions(
            scale=self.Dk**-0.5, causal=self.causal, window=window, soft_cap=self.soft_cap,
            dropout_rate=self.dropout,
        )  # fmt: skip


def make_inputs(case: Case, seed: int = 0, nan_at_unseen: bool = False):
    """Fresh random inputs; the keyword arguments of a backend (options excepted)."""
    B, T, H = case.B, case.T, case.H
    S, Hkv, Dv = case.S or T, case.Hkv or H, case.Dv or case.Dk
    key = jax.random.split(jax.random.PRNGKey(seed), 10)
    rng = np.random.default_rng(seed)
    q = jax.random.normal(key[0], (B, T, H, case.Dk), f32)
    k = jax.random.normal(key[1], (B, S, Hkv, case.Dk), f32)
    v = jax.random.normal(key[2], (B, S, Hkv, Dv), f32)
    kw = dict(bias=None, sinks=None, q_segment_ids=None, kv_segment_ids=None, dropout_rng=None)
    if case.shuffled:
        q_pos = np.stack([rng.permutation(T) + S - T for _ in range(B)])
        kv_pos = np.stack([rng.permutation(S) for _ in range(B)])
    else:
        q_pos = np.broadcast_to(np.arange(S - T, S), (B, T))
        kv_pos = np.broadcast_to(np.arange(S), (B, S))
    kw["q_positions"] = jnp.asarray(q_pos, jnp.int32)
    kw["kv_positions"] = jnp.asarray(kv_pos, jnp.int32)
    if case.segments:
        # three segments per row, with random cut points; batch row 0 ends in 5 padding keys (id -1, seen
        # by no query), batch row 1 in queries of a segment (3) that has no key: fully masked rows.
        def cuts(n):
            return np.sort(rng.choice(np.arange(1, n), 2, replace=False))

        q_seg = np.stack([np.searchsorted(cuts(T), np.arange(T), side="right") for _ in range(B)])
        kv_seg = np.stack([np.searchsorted(cuts(S), np.arange(S), side="right") for _ in range(B)])
        kv_seg[0, -5:] = -1
        q_seg[-1, -4:] = 3
        kw["q_segment_ids"] = jnp.asarray(q_seg, jnp.int32)
        kw["kv_segment_ids"] = jnp.asarray(kv_seg, jnp.int32)
        if nan_at_unseen:
            k = k.at[0, -5:].set(jnp.nan)
            v = v.at[0, -5:].set(jnp.inf)
    if case.bias:
        shape = (1, H, T, S) if case.bias == "head" else (B, 1, T, S)
        kw["bias"] = jax.random.normal(key[3], shape, f32)
    if case.sinks:
        kw["sinks"] = jax.random.normal(key[4], (H, 2), f32) + 1.0
    if case.dropout:
        kw["dropout_rng"] = jax.random.PRNGKey(seed + 100)
    kw["q"], kw["k"], kw["v"] = (x.astype(case.dtype) for x in (q, k, v))
    return kw


def _loss(fn, options, out_dtype, q, k, v, bias, sinks, rest, w_o, w_lse):
    o, lse = fn(q, k, v, bias=bias, sinks=sinks, options=options, **rest)
    if out_dtype is not None:  # round like the backend under test, so both see the same cotangent
        o = o.astype(out_dtype)
    lse_term = jnp.where(jnp.isfinite(lse), lse * w_lse, 0.0)
    return jnp.sum(o.astype(f32) * w_o) + jnp.sum(lse_term), (o, lse)


@functools.cache
def _grad_fn(backend: str, options: AttentionOptions, blocks, out_dtype):
    fn = (
        reference.attention
        if backend == "reference"
        else functools.partial(xla.attention, block_sizes=blocks)
    )
    loss = functools.partial(_loss, fn, options, out_dtype)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


def run(backend: str, case: Case, inputs, seed: int = 1):
    """(o, lse, {q, k, v, bias, sinks: gradient}) of a random projection of o and lse, under jit."""
    x = dict(inputs)
    if backend == "reference":
        for name in ("q", "k", "v"):
            x[name] = x[name].astype(f32)
    out_dtype = jnp.dtype(case.dtype) if backend == "reference" and case.dtype != f32 else None
    T, H, Dv = case.T, case.H, case.Dv or case.Dk
    ko, kl = jax.random.split(jax.random.PRNGKey(seed))
    w_o = jax.random.normal(ko, (case.B, T, H, Dv), f32)
    w_lse = jax.random.normal(kl, (case.B, H, T), f32)
    args = [x.pop(n) for n in ("q", "k", "v", "bias", "sinks")]
    grads, (o, lse) = _grad_fn(backend, case.options, case.blocks, out_dtype)(*args, x, w_o, w_lse)
    return o, lse, dict(zip(("q", "k", "v", "bias", "sinks"), grads, strict=True))


def check_against_reference(case: Case, inputs, backend="xla"):
    """Asserts o, lse and every gradient of `backend` match the reference; returns the errors."""
    o, lse, grads = run(backend, case, inputs)
    o_ref, lse_ref, grads_ref = run("reference", case, inputs)
    errors = {"o": assert_close("o", o, o_ref, tolerance(case.dtype))}
    empty = np.asarray(lse_ref) == -np.inf
    assert np.array_equal(np.asarray(lse) == -np.inf, empty), "rows with nothing allowed differ"
    errors["lse"] = assert_close(
        "lse", jnp.where(empty, 0.0, lse), jnp.where(empty, 0.0, lse_ref), tolerance(case.dtype)
    )
    if empty.any():  # fully masked rows: exactly zero output
        rows = np.asarray(jnp.swapaxes(jnp.asarray(empty), 1, 2))  # [B, T, H]
        assert np.all(np.asarray(o, np.float32)[rows] == 0.0)
    for name, g in grads.items():
        if grads_ref[name] is None:
            assert g is None
            continue
        errors[f"d{name}"] = assert_close(f"d{name}", g, grads_ref[name], tolerance(case.dtype, grad=True))
    return errors


# -------------------------------------------------------------------------- features x shapes x dtypes

FEATURES = ("causal", "window", "soft_cap", "sinks", "segments", "bias", "dropout", "shuffled")


def covering_rows(num_factors: int) -> list[tuple[bool, ...]]:
    """6 rows of on/off values in which every pair of up to 10 factors takes all four value pairs.

    Row 0 is all off; factor f is on in rows 1 + s for s in the f-th 3-subset of {0..4}: two distinct
    3-subsets of 5 meet (both on), and each has an element the other lacks (on/off, off/on).
    """
    subsets = list(itertools.combinations(range(5), 3))[:num_factors]
    return [(False,) * num_factors] + [tuple(r in s for s in subsets) for r in range(5)]


def _feature_case(flags, shape) -> Case:
    on = dict(zip(FEATURES, flags, strict=True))
    return Case(
        **shape,
        causal=on["causal"],
        window=(9, 4) if on["window"] else None,
        soft_cap=4.0 if on["soft_cap"] else None,
        sinks=on["sinks"],
        segments=on["segments"],
        bias=("head" if shape.get("Hkv") else "batch") if on["bias"] else None,
        dropout=0.25 if on["dropout"] else 0.0,
        shuffled=on["shuffled"],
    )


# One shape and dtype per row of the covering array: odd T, S != T both ways, head dims 48/80/128,
# Dv != Dk, GQA 8/2, MQA, float32 and bfloat16.
ROW_SHAPES = [
    dict(B=2, T=63, H=8, Hkv=2, Dk=48),
    dict(B=2, T=63, S=80, H=4, Hkv=2, Dk=32),
    dict(B=2, T=37, S=100, H=4, Dk=128, dtype=jnp.bfloat16),
    dict(B=1, T=63, H=4, Hkv=1, Dk=80),
    dict(B=2, T=80, S=63, H=8, Hkv=2, Dk=64, dtype=jnp.bfloat16),
    dict(B=2, T=63, S=80, H=4, Dk=32, Dv=48),
]
FEATURE_CASES = [
    _feature_case(flags, shape) for flags, shape in zip(covering_rows(len(FEATURES)), ROW_SHAPES, strict=True)
]
EXTRA_CASES = [
    # long enough for real key-block skipping with the default-sized blocks of a short run
    Case(B=1, T=500, H=4, Hkv=1, Dk=80, causal=True, window=(64, 0), blocks=xla.BlockSizes(128, 128)),
    # more queries than keys: the first 63 (end-aligned) queries see nothing
    Case(B=2, T=100, S=37, H=4, Dk=32, causal=True),
    # MQA with a per-head bias: dbias per query head although the blocked bias view has one kv head
    # (it was summed over the heads: relative error ~1)
    Case(B=2, T=40, H=4, Hkv=1, Dk=16, causal=True, bias="head"),
]


def test_covering_rows_cover_every_pair():
    rows = covering_rows(len(FEATURES))
    for a, b in itertools.combinations(range(len(FEATURES)), 2):
        assert {(r[a], r[b]) for r in rows} == {(False, False), (False, True), (True, False), (True, True)}


@pytest.mark.parametrize("case", FEATURE_CASES + EXTRA_CASES, ids=lambda c: c.id)
def test_xla_matches_reference(case):
    check_against_reference(case, make_inputs(case))


def _segment_case():
    return next(c for c in FEATURE_CASES if c.segments and c.dtype == f32)


def test_nan_at_keys_nobody_sees_reaches_nothing():
    """NaN in k and inf in v at padding keys (no query may see them): o, lse and grads as without them."""
    case = _segment_case()
    clean = make_inputs(case)
    dirty = make_inputs(case, nan_at_unseen=True)
    o, lse, grads = run("xla", case, dirty)  # same shapes: the compiled function is reused
    o_ref, lse_ref, grads_ref = run("reference", case, clean)
    assert_close("o", o, o_ref, tolerance(f32))
    finite = np.isfinite(np.asarray(lse_ref))
    assert np.array_equal(np.isfinite(np.asarray(lse)), finite)
    for name in ("q", "k", "v"):
        g = np.asarray(grads[name])
        assert np.all(np.isfinite(g)), name
    assert np.all(np.asarray(grads["k"])[0, -5:] == 0) and np.all(np.asarray(grads["v"])[0, -5:] == 0)
    assert_close("dq", grads["q"], grads_ref["q"], tolerance(f32, grad=True))


def test_fully_masked_rows_zero_output_and_gradient():
    case = EXTRA_CASES[1]  # T=100 > S=37, causal: rows 0..62 see no key
    o, lse, grads = run("xla", case, make_inputs(case))
    assert np.all(np.asarray(lse)[:, :, :63] == -np.inf) and np.all(np.isfinite(np.asarray(lse)[:, :, 63:]))
    assert np.all(np.asarray(o)[:, :63] == 0) and np.all(np.asarray(grads["q"])[:, :63] == 0)
    assert np.all(np.isfinite(np.asarray(grads["q"])))


def test_deterministic_bitwise():
    case = next(c for c in FEATURE_CASES if c.dropout)
    inputs = make_inputs(case)
    first, second = run("xla", case, inputs), run("xla", case, inputs)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_key_block_skipping_ranges():
    """Causal and window masks visit only the key blocks they can reach (not all of them)."""
    B, T = 1, 256
    L = xla._Layout(B=B, T=T, S=T, Hkv=1, G=1, bq=32, bk=32, nq=8, nk=8)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    valid = jnp.ones((B, T), bool)
    lo, hi = xla._ranges(pos, valid, pos, valid, None, None, AttentionOptions(1.0, causal=True), L)
    assert lo.tolist() == [0] * 8 and hi.tolist() == list(range(1, 9))
    opts = AttentionOptions(1.0, causal=True, window=(40, 0))
    lo, hi = xla._ranges(pos, valid, pos, valid, None, None, opts, L)
    assert lo.tolist() == [0, 0, 0, 1, 2, 3, 4, 5] and hi.tolist() == list(range(1, 9))
    seg = (jnp.arange(T, dtype=jnp.int32) // 64)[None]  # 4 packed sequences of 2 blocks each
    lo, hi = xla._ranges(pos, valid, pos, valid, seg, seg, AttentionOptions(1.0), L)
    assert lo.tolist() == [0, 0, 2, 2, 4, 4, 6, 6] and hi.tolist() == [2, 2, 4, 4, 6, 6, 8, 8]


# ----------------------------------------------------------------------------------------- merge


def test_merge_of_two_halves_equals_whole():
    """Attention over keys [0, 40) and [40, 80) merged by lse equals attention over all 80, values and
    gradients; with dropout, the halves' dropout_offsets make them draw the whole call's mask."""
    case = Case(B=2, T=63, S=80, H=4, Hkv=2, Dk=32, causal=True, sinks=False, dropout=0.25)
    x = make_inputs(case)
    opts = case.options
    common = dict(dropout_rng=x["dropout_rng"], options=opts, block_sizes=SMALL_BLOCKS)

    def whole(q, k, v):
        return xla.attention(q, k, v, q_positions=x["q_positions"], kv_positions=x["kv_positions"], **common)

    def merged(q, k, v):
        parts = [
            xla.attention(q, k[:, sl], v[:, sl], q_positions=x["q_positions"],
                          kv_positions=x["kv_positions"][:, sl], dropout_offsets=(0, sl.start), **common)
            for sl in (slice(0, 40), slice(40, 80))
        ]  # fmt: skip
        return merge_attention(*parts[0], *parts[1])

    def loss(fn, q, k, v):
        o, lse = fn(q, k, v)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(jnp.sin(lse)), (o, lse)

    grad = functools.partial(jax.grad, argnums=(0, 1, 2), has_aux=True)
    g_whole, (o_whole, lse_whole) = jax.jit(grad(functools.partial(loss, whole)))(x["q"], x["k"], x["v"])
    g_merge, (o_merge, lse_merge) = jax.jit(grad(functools.partial(loss, merged)))(x["q"], x["k"], x["v"])
    assert_close("o", o_merge, o_whole, 1e-6)
    assert_close("lse", lse_merge, lse_whole, 1e-6)
    for name, a, b in zip("qkv", g_merge, g_whole, strict=True):
        assert_close(f"d{name}", a, b, 2e-6)


def test_forward_backward_halves_with_global_lse():
    """What a ring does: backward over each key half, given the GLOBAL o and lse, yields the whole call's
    dk, dv for that half and, summed, its dq and dsinks (with dropout offsets, sinks and an lse cotangent)."""
    case = Case(B=2, T=63, S=80, H=4, Hkv=2, Dk=32, causal=True, sinks=True, dropout=0.25)
    x = make_inputs(case)
    key = jax.random.split(jax.random.PRNGKey(9), 2)
    do = jax.random.normal(key[0], (2, 63, 4, 32))
    dlse = jax.random.normal(key[1], (2, 4, 63))
    kw = dict(sinks=x["sinks"], dropout_rng=x["dropout_rng"], options=case.options, block_sizes=SMALL_BLOCKS)

    @jax.jit
    def whole_and_halves(q, k, v, q_pos, kv_pos):
        o, lse = xla.forward(q, k, v, q_positions=q_pos, kv_positions=kv_pos, **kw)
        whole = xla.backward(q, k, v, o, lse, do, dlse, q_positions=q_pos, kv_positions=kv_pos, **kw)
        halves = [
            xla.backward(q, k[:, sl], v[:, sl], o, lse, do, dlse, q_positions=q_pos,
                         kv_positions=kv_pos[:, sl], dropout_offsets=(0, sl.start), **kw)
            for sl in (slice(0, 40), slice(40, 80))
        ]  # fmt: skip
        return whole, halves

    whole, (h1, h2) = whole_and_halves(x["q"], x["k"], x["v"], x["q_positions"], x["kv_positions"])
    assert_close("dq", h1[0] + h2[0], whole[0], 1e-6)
    assert_close("dk", jnp.concatenate([h1[1], h2[1]], axis=1), whole[1], 1e-6)
    assert_close("dv", jnp.concatenate([h1[2], h2[2]], axis=1), whole[2], 1e-6)
    # sinks belong to every row, not to a key set: each half returns the full dsinks
    assert_close("dsinks", h1[4], whole[4], 1e-6)
    assert whole[3] is None
    # and the whole agrees with autodiff of the reference
    ref_vjp = jax.vjp(
        lambda q, k, v, sinks: reference.attention(
            q, k, v, sinks=sinks, q_positions=x["q_positions"], kv_positions=x["kv_positions"],
            dropout_rng=x["dropout_rng"], options=case.options),
        x["q"], x["k"], x["v"], x["sinks"],
    )[1]((do, dlse))  # fmt: skip
    for name, a, b in zip(("dq", "dk", "dv"), whole[:3], ref_vjp[:3], strict=True):
        assert_close(name, a, b, tolerance(f32, grad=True))
    assert_close("dsinks", whole[4], ref_vjp[3], tolerance(f32, grad=True))


def test_backward_grad_dtype_keeps_float32_partials():
    """bf16 inputs: backward's gradients come in bf16, or in float32 with grad_dtype (for ring sums)."""
    q, k, v = _bf16_inputs(T=16, D=16)
    kw = dict(q_positions=jnp.arange(16)[None], kv_positions=jnp.arange(16)[None],
              options=AttentionOptions(scale=0.25, causal=True), sinks=jnp.zeros((4, 1)))  # fmt: skip

    @jax.jit
    def both(q, k, v):
        o, lse = xla.forward(q, k, v, **kw)
        return [xla.backward(q, k, v, o, lse, o, **kw, grad_dtype=g) for g in (None, jnp.float32)]

    native, wide = both(q, k, v)
    assert [g.dtype for g in native if g is not None] == [jnp.bfloat16] * 3 + [jnp.float32]
    assert all(g.dtype == jnp.float32 for g in wide if g is not None)
    for a, b in zip(native[:3], wide[:3], strict=True):
        assert_close("grad", a, b, tolerance(jnp.bfloat16))  # the same gradients, rounded or not


def test_merge_with_empty_sides():
    """-inf on one side takes the other; -inf on both gives 0, -inf, and finite zero gradients."""
    key = jax.random.split(jax.random.PRNGKey(3), 4)
    o1, o2 = jax.random.normal(key[0], (1, 3, 2, 4)), jax.random.normal(key[1], (1, 3, 2, 4))
    lse1 = jax.random.normal(key[2], (1, 2, 3)).at[0, :, 0].set(-jnp.inf).at[0, :, 2].set(-jnp.inf)
    lse2 = jax.random.normal(key[3], (1, 2, 3)).at[0, :, 1].set(-jnp.inf).at[0, :, 2].set(-jnp.inf)
    o, lse = merge_attention(o1, lse1, o2, lse2)
    np.testing.assert_allclose(o[0, 0], o2[0, 0], rtol=1e-6)
    np.testing.assert_allclose(o[0, 1], o1[0, 1], rtol=1e-6)
    assert np.all(np.asarray(o[0, 2]) == 0) and np.all(np.asarray(lse[0, :, 2]) == -np.inf)
    grads = jax.grad(lambda *a: jnp.sum(merge_attention(*a)[0] ** 2), argnums=(0, 1, 2, 3))(
        o1, lse1, o2, lse2
    )
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert np.all(np.asarray(grads[1])[0, :, 2] == 0) and np.all(np.asarray(grads[0])[0, 2] == 0)


# --------------------------------------------------------------------------------------- dropout


def test_dropout_mask_rate_and_offsets():
    b, h = jnp.arange(2)[:, None, None, None], jnp.arange(3)[None, :, None, None]
    i, j = jnp.arange(128)[None, None, :, None], jnp.arange(96)[None, None, None, :]

    @jax.jit
    def masks(key7, key8, typed7):
        seed = dropout.seed_words(key7)
        return (
            dropout.keep_mask(seed, b, h, i, j, 0.3),
            dropout.keep_mask(seed, b, h, jnp.arange(40, 90)[:, None], jnp.arange(17, 96), 0.3),
            dropout.keep_mask(dropout.seed_words(key8), b, h, i, j, 0.3),
            dropout.keep_mask(dropout.seed_words(typed7), b, h, i, j, 0.3),
        )

    keep, part, other, typed = map(
        np.asarray, masks(jax.random.PRNGKey(7), jax.random.PRNGKey(8), jax.random.key(7))
    )
    assert abs(1.0 - keep.mean() - 0.3) < 0.01  # 73728 draws: sd 0.0017
    assert np.array_equal(part, keep[:, :, 40:90, 17:])  # a pure function of the global indices
    assert (other != keep).mean() > 0.3  # another rng, another mask (expected 0.42)
    assert np.array_equal(typed, keep)  # typed and raw keys of one seed agree


# ------------------------------------------------------------------------------------------- memory


def test_jit_grad_memory_is_linear_in_sequence():
    """jit(grad) at B=1, T=S=16384, H=4, D=64 float32 causal: temp memory < 8x the bytes of q, k, v."""
    B, T, H, D = 1, 16384, 4, 64
    spec = jax.ShapeDtypeStruct((B, T, H, D), f32)
    pos = jax.ShapeDtypeStruct((B, T), jnp.int32)
    opts = AttentionOptions(scale=D**-0.5, causal=True)

    def loss(q, k, v, q_pos, kv_pos):
        return jnp.sum(xla.attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos, options=opts)[0])

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec, pos, pos).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    qkv_bytes = 3 * B * T * H * D * 4
    assert temp < 8 * qkv_bytes, f"temp memory {temp / qkv_bytes:.2f}x the bytes of q, k, v"


# ------------------------------------------------------------------------------------------ the API


def _api_inputs(B=1, T=24, S=None, H=4, Hkv=2, D=16, seed=0):
    key = jax.random.split(jax.random.PRNGKey(seed), 3)
    S = S or T
    return (
        jax.random.normal(key[0], (B, T, H, D), f32),
        jax.random.normal(key[1], (B, S, Hkv, D), f32),
        jax.random.normal(key[2], (B, S, Hkv, D), f32),
    )


def test_api_derives_and_dispatches():
    """Defaults (end-aligned positions, scale, int window, sinks [H]), cu_seqlens as segments +
    end-aligned positions, backend fall-through, jit and vmap, all against the reference backend."""
    q, k, v = _api_inputs(T=20, S=30)
    sinks = jnp.linspace(-1.0, 1.0, 4)
    # packed sequences of lengths (q 5, kv 12), (q 0, kv 3), (q 15, kv 15)
    cu_q, cu_k = jnp.array([0, 5, 5, 20]), jnp.array([0, 12, 15, 30])
    q_seg = jnp.array([0] * 5 + [2] * 15)[None]
    kv_seg = jnp.array([0] * 12 + [1] * 3 + [2] * 15)[None]
    q_pos = jnp.concatenate([jnp.arange(7, 12), jnp.arange(15)])[None]
    kv_pos = jnp.concatenate([jnp.arange(12), jnp.arange(3), jnp.arange(15)])[None]
    qs, ks, vs = (jnp.stack([x, x[::-1] * 0.5]) for x in (q, k, v))  # two independent problems

    @jax.jit
    def results(q, k, v, cu_q, cu_k, qs, ks, vs):
        out = {}
        for impl in ("reference", ("cudnn", "xla")):  # cudnn cannot serve on CPU: falls through to xla
            name = impl if isinstance(impl, str) else "xla"
            out[f"window-{name}"] = flash_attention(
                q,
                k,
                v,
                causal=True,
                sliding_window=5,
                sinks=sinks,
                return_residuals=True,
                implementation=impl,
            )
            out[f"varlen-{name}"] = flash_attention(
                q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, implementation=impl
            )
        out["window-explicit"] = reference.attention(
            q, k, v, sinks=sinks[:, None],
            q_positions=jnp.arange(10, 30)[None], kv_positions=jnp.arange(30)[None],
            options=AttentionOptions(scale=16**-0.5, causal=True, window=(5, 0)),
        )  # fmt: skip
        out["varlen-explicit"] = flash_attention(
            q, k, v, causal=True, q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_positions=q_pos,
            kv_positions=kv_pos, implementation="reference",
        )  # fmt: skip
        # the widest window int32 allows is no window (no overflow in the mask or the block ranges)
        out["widest-window"] = flash_attention(
            q, k, v, sliding_window=2**31 - 1, sinks=sinks, implementation="xla"
        )
        out["no-window"] = flash_attention(q, k, v, sinks=sinks, implementation="reference")
        out["vmap"] = jax.vmap(lambda a, b, c: flash_attention(a, b, c, causal=True))(qs, ks, vs)
        out["one-by-one"] = [flash_attention(qs[n], ks[n], vs[n], causal=True, implementation="reference")
                             for n in range(2)]  # fmt: skip
        return out

    out = results(q, k, v, cu_q, cu_k, qs, ks, vs)
    assert_close("o", out["window-reference"][0], out["window-explicit"][0], 1e-6)
    assert_close("lse", out["window-reference"][1], out["window-explicit"][1], 1e-6)
    assert_close("o", out["window-xla"][0], out["window-reference"][0], tolerance(f32))
    assert_close("lse", out["window-xla"][1], out["window-reference"][1], tolerance(f32))
    assert_close("o", out["varlen-reference"], out["varlen-explicit"], 1e-6)
    assert_close("o", out["varlen-xla"], out["varlen-reference"], tolerance(f32))
    assert_close("o", out["widest-window"], out["no-window"], tolerance(f32))
    for n in range(2):
        assert_close("o", out["vmap"][n], out["one-by-one"][n], tolerance(f32))


def test_api_gradient_of_sinks_and_bias():
    """Learnable sinks [H] and a broadcast bias get their gradients through flash_attention."""
    q, k, v = _api_inputs(B=2, T=16, H=4, Hkv=4)
    sinks = jnp.array([0.5, -0.3, 1.0, 0.0])
    bias = jax.random.normal(jax.random.PRNGKey(5), (1, 4, 16, 16))

    def loss(impl, sinks, bias):
        o = flash_attention(q, k, v, causal=True, sinks=sinks, bias=bias, implementation=impl)
        return jnp.sum(o * jnp.sin(o))

    @jax.jit
    def grads(sinks, bias):
        return [
            jax.grad(functools.partial(loss, impl), argnums=(0, 1))(sinks, bias)
            for impl in ("reference", "xla")
        ]

    ga, gb = grads(sinks, bias)
    assert ga[0].shape == (4,) and ga[1].shape == (1, 4, 16, 16)
    assert_close("dsinks", gb[0], ga[0], tolerance(f32, grad=True))
    assert_close("dbias", gb[1], ga[1], tolerance(f32, grad=True))


def test_api_dropout_deterministic():
    q, k, v = _api_inputs()

    @functools.partial(jax.jit, static_argnames="impl")
    def call(rng, impl="xla"):
        return flash_attention(q, k, v, dropout_rate=0.5, dropout_rng=rng, implementation=impl)

    a, b = call(jax.random.PRNGKey(0)), call(jax.random.PRNGKey(0))
    c = call(jax.random.PRNGKey(1))
    ref = call(jax.random.PRNGKey(0), impl="reference")
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.allclose(a, c)
    assert_close("o", a, ref, tolerance(f32))
    assert rel_rms(a, jax.jit(flash_attention)(q, k, v)) > 0.1  # dropout did something


def _bf16_inputs(B=1, T=32, S=None, H=4, Hkv=2, D=16):
    return tuple(x.astype(jnp.bfloat16) for x in _api_inputs(B=B, T=T, S=S, H=H, Hkv=Hkv, D=D))


SEG32 = jnp.zeros((1, 32), jnp.int32)
CUDNN_REFUSALS = [
    ("soft-cap", dict(logits_soft_cap=5.0), "soft cap"),
    ("sinks", dict(sinks=jnp.zeros((4,))), "sinks"),
    ("dropout", dict(dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0)), "dropout"),
    ("segments", dict(q_segment_ids=SEG32, kv_segment_ids=SEG32), "segment ids"),
    ("lse", dict(return_residuals=True), "log-sum-exp"),
    ("right-window", dict(sliding_window=(4, 2)), "left window only"),
    ("positions", dict(causal=True, q_positions=jnp.arange(32)[None] + 1), "positions"),
    ("float32", dict(dtype=jnp.float32), "bfloat16/float16"),
    ("T!=S", dict(causal=True, S=48), "T == S"),
]  # fmt: skip


@pytest.mark.parametrize(
    "overrides,text", [r[1:] for r in CUDNN_REFUSALS], ids=[r[0] for r in CUDNN_REFUSALS]
)
def test_cudnn_refuses_naming_the_feature(overrides, text):
    """Each feature cuDNN lacks raises NotImplementedError naming it (checked before the device)."""
    kw = dict(overrides)
    q, k, v = _bf16_inputs(S=kw.pop("S", None))
    if "dtype" in kw:
        dtype = kw.pop("dtype")
        q, k, v = (x.astype(dtype) for x in (q, k, v))
    with pytest.raises(NotImplementedError, match=text):
        flash_attention(q, k, v, implementation="cudnn", **kw)


def test_cudnn_falls_through_to_xla():
    """The GPU default ("cudnn", "xla") on a call cudnn cannot serve runs xla."""
    q, k, v = _bf16_inputs()
    expected = "needs an NVIDIA GPU" if jax.default_backend() != "gpu" else "soft cap"
    with pytest.raises(NotImplementedError, match=expected):
        flash_attention(q, k, v, causal=True, logits_soft_cap=2.0 if expected == "soft cap" else None,
                        implementation="cudnn")  # fmt: skip
    o = jax.jit(
        lambda q, k, v: flash_attention(q, k, v, logits_soft_cap=2.0, implementation=("cudnn", "xla"))
    )(q, k, v)
    ref = flash_attention(q, k, v, logits_soft_cap=2.0, implementation="reference")
    assert_close("o", o, ref, tolerance(jnp.bfloat16))


CUDNN_CASES = [
    Case(B=2, T=256, H=8, Hkv=2, Dk=64, dtype=jnp.bfloat16, causal=True),
    Case(B=2, T=256, H=8, Hkv=8, Dk=128, dtype=jnp.bfloat16, causal=True, window=(64, 0)),
    Case(B=2, T=128, H=4, Hkv=4, Dk=64, dtype=jnp.bfloat16, bias="head"),
    Case(B=1, T=512, H=4, Hkv=1, Dk=64, dtype=jnp.float16, causal=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CUDNN_CASES, ids=lambda c: c.id)
def test_cudnn_matches_reference(case):
    """cuDNN's o and gradients (q, k, v, bias) against the float32 reference."""
    x = make_inputs(case)
    w_o = jax.random.normal(jax.random.PRNGKey(11), (case.B, case.T, case.H, case.Dk), f32)

    def loss(impl, q, k, v, bias):
        o = flash_attention(
            q, k, v, causal=case.causal, sliding_window=case.window, bias=bias, implementation=impl
        )
        return jnp.sum(o.astype(f32) * w_o), o

    argnums = (0, 1, 2, 3) if case.bias else (0, 1, 2)
    grad = functools.partial(jax.grad, argnums=argnums, has_aux=True)
    g, o = jax.jit(grad(functools.partial(loss, "cudnn")))(x["q"], x["k"], x["v"], x["bias"])
    up = [x[n].astype(f32) for n in ("q", "k", "v")]
    g_ref, o_ref = jax.jit(grad(functools.partial(loss, "reference")))(*up, x["bias"])
    assert_close("o", o, o_ref, tolerance(case.dtype))
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), g, g_ref, strict=False):
        assert_close(name, a, b, tolerance(case.dtype, grad=True))


@pytest.mark.gpu
def test_gpu_default_uses_cudnn_and_triton_for_residuals():
    q, k, v = _bf16_inputs(T=256, D=64)
    o = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True))(q, k, v)
    o_cudnn = flash_attention(q, k, v, causal=True, implementation="cudnn")
    assert np.array_equal(np.asarray(o, np.float32), np.asarray(o_cudnn, np.float32))
    # cudnn returns no lse: the default order's next backend, our Triton kernel, serves it
    o2, lse = flash_attention(q, k, v, causal=True, return_residuals=True)
    o_tri, lse_tri = flash_attention(q, k, v, causal=True, return_residuals=True, implementation="triton")
    assert np.array_equal(np.asarray(lse), np.asarray(lse_tri))
    assert np.array_equal(np.asarray(o2, np.float32), np.asarray(o_tri, np.float32))
    o_xla, lse_xla = flash_attention(q, k, v, causal=True, return_residuals=True, implementation="xla")
    assert_close("lse", lse, lse_xla, tolerance(jnp.bfloat16))
    assert_close("o", o2, o_xla, tolerance(jnp.bfloat16))


SEG8, CU8 = jnp.zeros((1, 8), jnp.int32), jnp.array([0, 8])
BAD_INPUTS = [
    # (id, keyword overrides, exception, text the message must contain)
    ("q-rank", dict(q=jnp.zeros((2, 8, 4))), ValueError, "q must be"),
    ("q-int", dict(q=jnp.zeros((1, 8, 4, 16), jnp.int32)), TypeError, "q must have a floating"),
    ("dtype-mix", dict(k=jnp.zeros((1, 8, 2, 16), jnp.bfloat16)), TypeError, "share a dtype"),
    ("batch", dict(k=jnp.zeros((2, 8, 2, 16)), v=jnp.zeros((2, 8, 2, 16))), ValueError, "batch"),
    ("kv-seq", dict(v=jnp.zeros((1, 9, 2, 16))), ValueError, "k and v"),
    ("head-dim", dict(k=jnp.zeros((1, 8, 2, 8))), ValueError, "head_dim"),
    ("gqa", dict(k=jnp.zeros((1, 8, 3, 16)), v=jnp.zeros((1, 8, 3, 16))), ValueError, "divisible"),
    ("scale", dict(scale=jnp.float32(0.1)), TypeError, "scale"),
    ("causal", dict(causal=1), TypeError, "causal"),
    ("window-neg", dict(sliding_window=-1), ValueError, "sliding_window"),
    ("window-float", dict(sliding_window=(2.5, 1)), TypeError, "sliding_window"),
    ("window-triple", dict(sliding_window=(1, 2, 3)), TypeError, "sliding_window"),
    ("soft-cap", dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap"),
    ("sinks-shape", dict(sinks=jnp.zeros((3,))), ValueError, "sinks"),
    ("sinks-int", dict(sinks=jnp.zeros((4,), jnp.int32)), TypeError, "sinks"),
    ("bias-shape", dict(bias=jnp.zeros((1, 4, 8, 7))), ValueError, "bias"),
    ("bias-heads", dict(bias=jnp.zeros((1, 2, 8, 8))), ValueError, "bias"),
    ("bias-rank", dict(bias=jnp.zeros((8, 8))), ValueError, "bias"),
    ("seg-one", dict(q_segment_ids=jnp.zeros((1, 8), jnp.int32)), ValueError, "segment_ids"),
    ("seg-shape", dict(q_segment_ids=jnp.zeros((1, 7), jnp.int32), kv_segment_ids=SEG8), ValueError,
     "q_segment_ids"),
    ("seg-dtype", dict(q_segment_ids=jnp.zeros((1, 8)), kv_segment_ids=jnp.zeros((1, 8))), TypeError,
     "q_segment_ids"),
    ("cu-one", dict(cu_seqlens_q=jnp.array([0, 8])), ValueError, "cu_seqlens"),
    ("cu-start", dict(cu_seqlens_q=jnp.array([1, 8]), cu_seqlens_k=CU8), ValueError, "start at 0"),
    ("cu-order", dict(cu_seqlens_q=jnp.array([0, 5, 3, 8]), cu_seqlens_k=jnp.array([0, 2, 4, 8])), ValueError,
     "non-decreasing"),
    ("cu-end", dict(cu_seqlens_q=jnp.array([0, 7]), cu_seqlens_k=jnp.array([0, 8])), ValueError, "end at"),
    ("cu-count", dict(cu_seqlens_q=jnp.array([0, 8]), cu_seqlens_k=jnp.array([0, 4, 8])), ValueError,
     "same number"),
    ("cu-float", dict(cu_seqlens_q=jnp.array([0.0, 8.0]), cu_seqlens_k=jnp.array([0, 8])), TypeError,
     "cu_seqlens_q"),
    ("cu-batch", dict(q=jnp.zeros((2, 8, 4, 16)), k=jnp.zeros((2, 8, 2, 16)), v=jnp.zeros((2, 8, 2, 16)),
                      cu_seqlens_q=jnp.array([0, 8]), cu_seqlens_k=jnp.array([0, 8])), ValueError, "batch 1"),
    ("cu-and-seg", dict(cu_seqlens_q=jnp.array([0, 8]), cu_seqlens_k=jnp.array([0, 8]),
                        q_segment_ids=SEG8, kv_segment_ids=SEG8),
     ValueError, "not both"),
    ("pos-shape", dict(q_positions=jnp.zeros((1, 9), jnp.int32)), ValueError, "q_positions"),
    ("pos-dtype", dict(kv_positions=jnp.zeros((1, 8))), TypeError, "kv_positions"),
    ("drop-rate", dict(dropout_rate=1.0, dropout_rng=jax.random.PRNGKey(0)), ValueError, "dropout_rate"),
    ("drop-rng", dict(dropout_rate=0.1), ValueError, "dropout_rng"),
    ("drop-rng-type", dict(dropout_rate=0.1, dropout_rng=jnp.zeros((3,))), TypeError, "dropout_rng"),
    ("impl", dict(implementation="flash"), ValueError, "implementation"),
    ("residuals", dict(return_residuals="yes"), TypeError, "return_residuals"),
]  # fmt: skip


@pytest.mark.parametrize("overrides,error,text", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(overrides, error, text):
    kw = dict(q=jnp.zeros((1, 8, 4, 16)), k=jnp.zeros((1, 8, 2, 16)), v=jnp.zeros((1, 8, 2, 16)))
    kw.update(overrides)
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    with pytest.raises(error, match=text):
        flash_attention(q, k, v, **kw)


def test_exported():
    assert shardattn.flash_attention is flash_attention and shardattn.merge_attention is merge_attention


# ------------------------------------------------------------------------------------ the Flax layer


def test_flax_softmax_attention_layer():
    """SoftmaxAttention (GQA, rotary, learnable sinks, packed segments) equals its maths written out
    with the reference backend, values and the gradients of the sinks and the q projection."""
    nnx = pytest.importorskip("flax.nnx")
    from shardattn.flax import SoftmaxAttention, rotary

    layer = SoftmaxAttention(32, 4, num_kv_heads=2, sinks=True, sliding_window=6, implementation="xla",
                             rngs=nnx.Rngs(0))  # fmt: skip
    layer.sinks[...] = jnp.array([0.5, -1.0, 0.0, 2.0])
    B, T = 2, 24
    x = jax.random.normal(jax.random.PRNGKey(1), (B, T, 32))
    seg = jnp.broadcast_to((jnp.arange(T) >= 10).astype(jnp.int32), (B, T))
    pos = jnp.where(seg == 0, jnp.arange(T), jnp.arange(T) - 10)  # two packed sequences

    def by_hand(params):
        q = (x @ params["q"]).reshape(B, T, 4, 8)
        k = (x @ params["k"]).reshape(B, T, 2, 8)
        v = (x @ params["v"]).reshape(B, T, 2, 8)
        q, k = rotary(q, pos), rotary(k, pos)
        o = flash_attention(
            q,
            k,
            v,
            causal=True,
            sliding_window=6,
            sinks=params["sinks"],
            q_positions=pos,
            kv_positions=pos,
            q_segment_ids=seg,
            kv_segment_ids=seg,
            implementation="reference",
        )
        return o.reshape(B, T, 32) @ params["out"]  # fmt: skip

    params = dict(q=layer.q_proj.kernel[...], k=layer.k_proj.kernel[...], v=layer.v_proj.kernel[...],
                  out=layer.out_proj.kernel[...], sinks=layer.sinks[...])  # fmt: skip

    @nnx.jit
    def layer_loss_and_grads(layer):
        def loss(layer):
            y = layer(x, pos, segment_ids=seg)
            return jnp.sum(y * jnp.cos(y)), y

        return nnx.grad(loss, has_aux=True)(layer)

    grads, y = layer_loss_and_grads(layer)
    g_ref, y_ref = jax.jit(
        jax.grad(lambda p: (lambda y: (jnp.sum(y * jnp.cos(y)), y))(by_hand(p)), has_aux=True)
    )(params)
    assert_close("y", y, y_ref, tolerance(f32))
    assert_close("dsinks", grads.sinks[...], g_ref["sinks"], tolerance(f32, grad=True))
    assert_close("dW_q", grads.q_proj.kernel[...], g_ref["q"], tolerance(f32, grad=True))
    assert float(jnp.max(jnp.abs(g_ref["sinks"]))) > 1e-3  # the sinks are learnable: they get a gradient



@pytest.mark.parametrize("strategy,layout", [("ring", "zigzag"), ("allgather", "contiguous")])
def test_softmax_layer_on_a_mesh_equals_one_device(strategy, layout):
    # SoftmaxAttention(mesh=...) runs sharded_attention: same outputs and weight gradients as without a
    # mesh (8 fake devices: data 2 x seq 4), GQA, sinks, causal; zigzag gets the tokens reordered.
    pytest.importorskip("flax")
    from flax import nnx

    from shardattn.flax import SoftmaxAttention
    from shardattn.meshes import make_mesh, to_zigzag

    mesh = make_mesh(data=2, seq=4)
    kw = dict(num_kv_heads=2, sinks=True, rngs=nnx.Rngs(3))
    sharded = SoftmaxAttention(32, 4, mesh=mesh, strategy=strategy, layout=layout, **kw)
    plain = SoftmaxAttention(32, 4, **{**kw, "rngs": nnx.Rngs(3)})
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 32, 32))
    pos = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (2, 32))

    def run(layer, x, pos):
        def loss(layer):
            y = layer(x, pos)
            return jnp.sum(y * jnp.cos(y)), y

        return nnx.grad(loss, has_aux=True)(layer)

    g_1, y_1 = run(plain, x, pos)
    if layout == "zigzag":  # the data in zigzag order; the loss is a sum over tokens, so order-free
        g_m, y_m = run(sharded, to_zigzag(x, mesh), to_zigzag(pos, mesh))
        y_m = jnp.asarray(y_m)[:, np.argsort(np.asarray(to_zigzag(jnp.arange(32)[None], mesh))[0])]
    else:
        g_m, y_m = run(sharded, x, pos)
    assert_close("y", y_m, y_1, tolerance(f32))
    assert_close("dW_q", g_m.q_proj.kernel[...], g_1.q_proj.kernel[...], tolerance(f32, grad=True))
    assert_close("dsinks", g_m.sinks[...], g_1.sinks[...], tolerance(f32, grad=True))
    with pytest.raises(ValueError, match="zigzag"):
        SoftmaxAttention(32, 4, mesh=mesh, layout="zigzag", **{**kw, "rngs": nnx.Rngs(0)})(x)
    with pytest.raises(ValueError, match="strategy"):
        SoftmaxAttention(32, 4, mesh=mesh, strategy="bogus", **{**kw, "rngs": nnx.Rngs(0)})


def test_rotary_depends_only_on_relative_position():
    pytest.importorskip("flax")
    from shardattn.flax import rotary

    q = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 2, 16))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 2, 16))
    p = jnp.array([[0, 3, 7, 8, 20]])
    s = jnp.array([[1, 1, 2, 30, 4]])
    dots = [jnp.sum(rotary(q, p + c) * rotary(k, s + c), axis=-1) for c in (0, 13)]
    np.testing.assert_allclose(dots[0], dots[1], rtol=1e-4, atol=1e-4)
    assert not np.allclose(dots[0], jnp.sum(q * k, axis=-1), atol=1e-3)  # it does rotate


def test_xla_inside_shard_map_with_varying_axes_checked():
    """forward, backward and the differentiable attention run per shard under shard_map(check_vma=True)
    (what a ring over sequence shards does): loop carries vary like the inputs, and the replicated sinks
    get the sum of the shards' gradients. Batch-sharded results equal the unsharded ones."""
    from jax.sharding import PartitionSpec as P

    # (no dropout: its mask hashes the local batch index, so batch shards would draw other masks)
    case = Case(B=2, T=63, S=80, H=4, Hkv=2, Dk=32, causal=True, sinks=True, segments=True, bias="batch")
    x = make_inputs(case)
    kw = dict(options=case.options, block_sizes=SMALL_BLOCKS)

    def local(q, k, v, bias, q_seg, kv_seg, q_pos, kv_pos, sinks):
        ints = dict(bias=bias, sinks=sinks, q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_positions=q_pos,
                    kv_positions=kv_pos)  # fmt: skip

        def loss(q, k, v, bias, sinks):
            o, lse = xla.attention(q, k, v, **{**ints, "bias": bias, "sinks": sinks}, **kw)
            return jnp.sum(o * jnp.cos(o)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

        grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, bias, sinks)
        o, lse = xla.forward(q, k, v, **ints, **kw)
        return o, lse, grads[:4], grads[4]  # the replicated sinks' gradient: already summed over shards

    names = ("q", "k", "v", "bias", "q_segment_ids", "kv_segment_ids", "q_positions", "kv_positions")
    args = [x[n] for n in names] + [x["sinks"]]
    specs = (P("data"),) * len(names) + (P(),)
    out_specs = (P("data"), P("data"), P("data"), P())

    def on(devices):
        mesh = jax.sharding.Mesh(np.array(devices), ("data",))
        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=True))

    sharded = on(jax.devices()[:2])(*args)
    whole = on(jax.devices()[:1])(*args)  # one shard: the unsharded computation
    # Not bitwise: XLA:CPU's batched matmuls round differently at batch 1 and 2 (seen: 4e-7 absolute).
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(whole), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.array_equal(np.isfinite(a), np.isfinite(b))  # lse = -inf on the same rows
        assert_close("sharded", np.where(np.isfinite(b), a, 0.0), np.where(np.isfinite(b), b, 0.0), 1e-6)

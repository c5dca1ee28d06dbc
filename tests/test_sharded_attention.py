"""sharded_attention on the 8 fake CPU devices: every strategy x layout against the float32 reference.

Sequence sharding reorders sums (tolerance table); batch and head sharding must give the unsharded
result exactly. Outputs, lse and every gradient (q, k, v, bias, sinks). The compiled HLO is read to see
what moves. Compile time dominates on CPU, so each case compiles one jit(grad) program that serves both
the numbers and the HLO, and the product of features is a few rich combinations per strategy x layout.
"""

import collections
import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, tolerance
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardattn
from shardattn import flash_attention, sharded_attention
from shardattn.meshes import from_zigzag, make_mesh, to_zigzag

sa = importlib.import_module("shardattn.sharded_attention")  # the module (its internals: plan, counts)

B, T, H, HKV, D = 2, 32, 4, 2, 8
SEQ = 4  # sequence shards of the product tests (mesh data=2 x seq=4)

# Feature combinations users write (each with GQA):
# - "causal-cap-sinks-segments": causal, soft cap, 2 sinks per head, segment ids whose segments cross
#   shard boundaries, lse returned (its cotangent enters the loss).
# - "window-bias-packed": a two-sided window, a [1, H, T, T] bias, packed sequences (cu_seqlens, batch 1)
#   crossing shards.
SEGMENTS = np.array([[0] * 5 + [1] * 14 + [2] * 13, [0] * 11 + [1] * 21])  # [B, T], boundaries at 5, 19 / 11
CU = np.array([0, 6, 21, 32])
FEATURES = {
    "causal-cap-sinks-segments": dict(causal=True, logits_soft_cap=2.5, sinks=True, segments=True),
    "window-bias-packed": dict(sliding_window=(7, 3), bias=True, packed=True),
}


def inputs(heads=H, kv_heads=HKV, batch=B, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = jax.random.normal(keys[0], (batch, T, heads, D), jnp.float32)
    k = jax.random.normal(keys[1], (batch, T, kv_heads, D), jnp.float32)
    v = jax.random.normal(keys[2], (batch, T, kv_heads, D), jnp.float32)
    bias = jax.random.normal(keys[3], (1, heads, T, T), jnp.float32)
    sinks = jax.random.normal(keys[4], (heads, 2), jnp.float32)
    w_o = jax.random.normal(keys[5], (batch, T, heads, D), jnp.float32)
    w_lse = jax.random.normal(keys[6], (batch, heads, T), jnp.float32)
    return dict(q=q, k=k, v=v, bias=bias, sinks=sinks), (w_o, w_lse)


def loss_fn(attend, feature, segments_layout=lambda x: x):
    """loss(q, k, v, bias, sinks, w_o, w_lse) = <o, w_o> + <lse, w_lse> of `attend` with the feature's
    keywords (segment ids passed through `segments_layout`, the layout of the data)."""
    f = FEATURES[feature]

    def loss(q, k, v, bias, sinks, w_o, w_lse):
        kw = dict(causal=f.get("causal", False), sliding_window=f.get("sliding_window"))
        kw["logits_soft_cap"] = f.get("logits_soft_cap")
        if f.get("sinks"):
            kw["sinks"] = sinks
        if f.get("bias"):
            kw["bias"] = bias
        if f.get("segments"):
            seg = jnp.asarray(SEGMENTS[: q.shape[0]], jnp.int32)
            kw["q_segment_ids"] = kw["kv_segment_ids"] = segments_layout(seg)
        if f.get("packed"):  # cu_seqlens describe the original order (the API layer reorders)
            kw["cu_seqlens_q"] = kw["cu_seqlens_k"] = jnp.asarray(CU, jnp.int32)
        o, lse = attend(q, k, v, return_residuals=True, **kw)
        return jnp.sum(o * w_o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse), (o, lse)

    return loss


def batch_of(feature):
    return 1 if FEATURES[feature].get("packed") else B


@functools.cache
def expected(feature, heads, kv_heads):
    """Reference o, lse and gradients of q, k, v, bias, sinks (float32, one device)."""
    x, w = inputs(heads, kv_heads, batch_of(feature))
    b = batch_of(feature)
    loss = loss_fn(functools.partial(flash_attention, implementation="reference"), feature)
    grads, (o, lse) = jax.jit(jax.grad(loss, argnums=tuple(range(5)), has_aux=True))(*x.values(), *w)
    return o, lse, grads, b


def run_sharded(mesh, feature, *, heads=H, kv_heads=HKV, layout="contiguous", **kw):
    """Compiles jit(grad) of the sharded loss once; returns (o, lse, grads, compiled HLO text), all in
    the original sequence order. With the zigzag layout the data are reordered outside the compiled
    program (as at data loading), so that its HLO shows only what sharded_attention itself moves."""
    x, w = inputs(heads, kv_heads, batch_of(feature))
    args = [x["q"], x["k"], x["v"], x["bias"], x["sinks"], *w]
    seq_axes = [(1,), (1,), (1,), (2, 3), (), (1,), (2,)]  # sequence axes of each argument
    to_layout = lambda a, axis=1: a  # noqa: E731
    if layout == "zigzag":
        to_layout = functools.partial(_zz, mesh, to_zigzag)  # for the segment ids (constants)
        args = [_reorder(mesh, to_zigzag, a, axes) for a, axes in zip(args, seq_axes, strict=True)]
    attend = functools.partial(sharded_attention, mesh=mesh, layout=layout, **kw)
    loss = loss_fn(attend, feature, segments_layout=to_layout)
    compiled = jax.jit(jax.grad(loss, argnums=tuple(range(5)), has_aux=True)).lower(*args).compile()
    grads, (o, lse) = compiled(*args)
    if layout == "zigzag":
        o, lse = from_zigzag(o, mesh), from_zigzag(lse, mesh, axis=2)
        grads = [_reorder(mesh, from_zigzag, g, axes) for g, axes in zip(grads, seq_axes[:5], strict=True)]
    return o, lse, grads, compiled.as_text()


def _reorder(mesh, fn, x, axes):
    for axis in axes:
        x = fn(x, mesh, axis=axis)
    return x


def _zz(mesh, fn, x, axis=1):
    return fn(x, mesh, axis=axis)


def check_against_reference(feature, got, heads=H, kv_heads=HKV, report=""):
    o, lse, grads = got[:3]
    o_ref, lse_ref, g_ref, _ = expected(feature, heads, kv_heads)
    tol, gtol = tolerance(jnp.float32), tolerance(jnp.float32, grad=True)
    errors = {"o": assert_close("o", o, o_ref, tol)}
    finite = np.isfinite(np.asarray(lse_ref))
    assert np.array_equal(np.isfinite(np.asarray(lse)), finite), "lse: -inf rows differ"
    errors["lse"] = assert_close("lse", np.where(finite, lse, 0), np.where(finite, lse_ref, 0), tol)
    for name, g, r in zip(("q", "k", "v", "bias", "sinks"), grads, g_ref, strict=True):
        if name == "bias" and not FEATURES[feature].get("bias"):
            continue
        if name == "sinks" and not FEATURES[feature].get("sinks"):
            continue
        errors["d" + name] = assert_close("d" + name, g, r, gtol)
    print(f"\n{report}: " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()), end="")


def collectives(hlo):
    """{op name: [result shapes]} of the collectives in compiled HLO text."""
    found = collections.defaultdict(list)
    pattern = r"= (\S+|\([^=]*?\)) (all-gather|all-to-all|collective-permute|reduce-scatter|all-reduce)\("
    for shape, op in re.findall(pattern, hlo):
        found[op].append(shape)
    return found


# ----------------------------------------------------------------------------------------------------
# The product: strategy x layout x feature combination, outputs and every gradient, and what moves.

LAYOUTS_ = ("contiguous", "zigzag")
STRATEGY_LAYOUTS = [(s, lay) for s in ("ring", "allgather", "ulysses") for lay in LAYOUTS_]


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("strategy,layout", STRATEGY_LAYOUTS, ids=lambda x: x)
def test_matches_reference(strategy, layout, feature):
    mesh = make_mesh(data=2, seq=SEQ)
    # Ulysses needs H and Hkv divisible by the sequence axis: GQA 8/4 there.
    heads, kv_heads = (8, 4) if strategy == "ulysses" else (H, HKV)
    # The reference backend serves the ring through the generic halves (its autodiff), which keeps these
    # compiles small; the xla backend's own halves are tested below.
    got = run_sharded(mesh, feature, heads=heads, kv_heads=kv_heads, layout=layout, strategy=strategy,
                      implementation="reference")  # fmt: skip
    check_against_reference(feature, got, heads, kv_heads, report=f"{strategy} {layout} {feature}")
    if feature != "causal-cap-sinks-segments":
        return
    ops = collectives(got[3])
    b, n = B // 2, T // SEQ
    if strategy == "ring":
        # Only K/V-sized blocks (and their positions / segment ids, and the dK/dV accumulators) move,
        # never q: Hkv = 2 heads on the wire, q has 4.
        # (the all-reduce: d sinks, summed over the batch and sequence shards it is replicated on)
        assert set(ops) == {"collective-permute", "all-reduce"}, dict(ops)
        assert {s.split("{")[0] for s in ops["all-reduce"]} == {f"f32[{heads},2]"}, ops["all-reduce"]
        kv_block = f"f32[{b},{n},{kv_heads},{D}]"
        ids = f"s32[{b},{n}]"
        shapes = collections.Counter(s.split("{")[0] for s in ops["collective-permute"])
        assert set(shapes) == {kv_block, ids}, shapes
        # k and v for P-1 rounds (XLA on CPU merges the backward's rotations with the forward's), dK and
        # dV for P rotations (the last one home); positions and segment ids for P-1 rounds.
        assert shapes[kv_block] == 2 * (SEQ - 1) + 2 * SEQ, shapes
        assert shapes[ids] == 2 * (SEQ - 1), shapes
    elif strategy == "allgather":
        assert set(ops) <= {"all-gather", "reduce-scatter", "all-reduce"}, dict(ops)
        gathered = collections.Counter(s.split("{")[0] for s in ops["all-gather"])
        assert gathered[f"f32[{b},{T},{kv_heads},{D}]"] == 2, gathered  # k and v, once each
        scattered = collections.Counter(s.split("{")[0] for s in ops["reduce-scatter"])
        assert scattered[f"f32[{b},{n},{kv_heads},{D}]"] == 2, scattered  # dK and dV (the transpose)
    else:
        assert set(ops) == {"all-to-all", "all-gather", "all-reduce"}, dict(ops)
        # forward: q, k, v to heads, o and lse back; backward: do and dlse to heads, dq, dk, dv back.
        assert len(ops["all-to-all"]) == 10, ops["all-to-all"]
        # Segment ids gathered (the positions are the defaults, rebuilt on each device; here the q and
        # kv segment ids are one array, gathered once).
        assert [s.split("{")[0] for s in ops["all-gather"]] == [f"s32[{b},{T}]"], ops["all-gather"]
        assert {s.split("{")[0] for s in ops["all-reduce"]} == {f"f32[{heads // SEQ},2]"}  # d sinks


def test_ring_with_the_xla_halves():
    """The ring on the xla backend's own forward/backward (global o and lse passed in), both layouts."""
    mesh = make_mesh(data=2, seq=SEQ)
    for layout, feature in (("zigzag", "causal-cap-sinks-segments"), ("contiguous", "window-bias-packed")):
        got = run_sharded(mesh, feature, layout=layout, strategy="ring", implementation="xla")
        check_against_reference(feature, got, report=f"ring xla {layout} {feature}")


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_heads_and_sequence_together(strategy):
    """Head and sequence axes at once (2 x 2 x 2): bias and sinks per head are sliced to each device's
    heads (ulysses: the head dimension split over (heads, seq)); S = 2T, queries end-aligned."""
    mesh = make_mesh(data=2, seq=2, heads=2)
    keys = jax.random.split(jax.random.PRNGKey(11), 5)
    q = jax.random.normal(keys[0], (2, 16, 8, 8))
    k = jax.random.normal(keys[1], (2, 32, 4, 8))
    v = jax.random.normal(keys[2], (2, 32, 4, 8))
    bias = jax.random.normal(keys[3], (2, 8, 16, 32))
    sinks = jax.random.normal(keys[4], (8,))
    w = jax.random.normal(jax.random.PRNGKey(12), (2, 16, 8, 8))

    def loss(attend):
        def f(q, k, v, bias, sinks):
            return jnp.sum(
                attend(q, k, v, bias=bias, sinks=sinks, causal=True, implementation="reference") * w
            )

        return f

    ours = functools.partial(sharded_attention, mesh=mesh, strategy=strategy)
    got = jax.jit(jax.value_and_grad(loss(ours), argnums=tuple(range(5))))(q, k, v, bias, sinks)
    want = jax.jit(jax.value_and_grad(loss(flash_attention), argnums=tuple(range(5))))(q, k, v, bias, sinks)
    assert_close("loss", got[0], want[0], tolerance(jnp.float32))
    for name, g, r in zip(("q", "k", "v", "bias", "sinks"), got[1], want[1], strict=True):
        assert_close("d" + name, g, r, tolerance(jnp.float32, grad=True))


@pytest.mark.parametrize("strategy", ["ring", "allgather", "ulysses"])
def test_kv_heads_replicated_over_the_head_axis(strategy):
    """2 kv heads over 4 head shards (seq 2 x heads 4, H8/2): each shard's 2 query heads read one kv head,
    so k, v stay replicated over the head axis and each device takes its head. Only that head moves (ring:
    its blocks; allgather and ulysses: all-gathers of it), and shard_map's transpose sums dK/dV over the
    head axis (one all-reduce): outputs and every gradient against the unsharded reference."""
    mesh = make_mesh(seq=2, heads=4)
    keys = jax.random.split(jax.random.PRNGKey(13), 5)
    q = jax.random.normal(keys[0], (B, T, 8, D))
    k, v = (jax.random.normal(kk, (B, T, 2, D)) for kk in keys[1:3])
    sinks = jax.random.normal(keys[3], (8,))
    w = jax.random.normal(keys[4], q.shape)
    seg = jnp.asarray(SEGMENTS, jnp.int32)

    def loss(attend, **kw):
        def f(q, k, v, sinks):
            o = attend(q, k, v, sinks=sinks, causal=True, q_segment_ids=seg, kv_segment_ids=seg, **kw)
            return jnp.sum(o * w), o

        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True))

    ours = functools.partial(sharded_attention, mesh=mesh, strategy=strategy, implementation="xla")
    compiled = loss(ours).lower(q, k, v, sinks).compile()
    got, o = compiled(q, k, v, sinks)
    want, o_ref = loss(flash_attention, implementation="reference")(q, k, v, sinks)
    errors = {"o": assert_close("o", o, o_ref, tolerance(jnp.float32))}
    for name, g, r in zip(("q", "k", "v", "sinks"), got, want, strict=True):
        errors["d" + name] = assert_close("d" + name, g, r, tolerance(jnp.float32, grad=True))
    print(f"\nreplicated kv {strategy}: " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()), end="")

    ops = {op: collections.Counter(x.split("{")[0].lstrip("(") for x in shapes)
           for op, shapes in collectives(compiled.as_text()).items()}  # fmt: skip
    n = T // 2
    one_head, ids = f"f32[{B},{n},1,{D}]", f"s32[{B},{n}]"
    assert ops["all-reduce"][f"f32[{B},{n},2,{D}]"] >= 1, ops  # dK, dV summed over the head axis
    if strategy == "ring":
        assert set(ops) == {"collective-permute", "all-reduce"}, ops
        assert set(ops["collective-permute"]) == {one_head, ids}, ops  # never q, never both kv heads
    else:  # the one kv head gathered over the sequence (ulysses too: it serves all the query heads)
        assert ops["all-gather"][f"f32[{B},{T},1,{D}]"] == 2, ops
        assert ops["reduce-scatter"][one_head] == 2, ops  # its transpose: dK, dV
        assert ("all-to-all" in ops) == (strategy == "ulysses"), ops


# ----------------------------------------------------------------------------------------------------
# Block counts: the zigzag layout gives every device the same work; a window shortens the ring.


class _Captured(Exception):
    pass


def _plan_of(*args, **kwargs):
    """The static plan sharded_attention builds for a call (captured before anything compiles)."""

    def capture(mesh, plan, *rest):
        raise _Captured(plan)

    real, sa._build = sa._build, capture
    try:
        sharded_attention(*args, **kwargs)
    except _Captured as captured:
        return captured.args[0]
    finally:
        sa._build = real
    raise AssertionError("sharded_attention did not build a plan")


def per_device_counts(mesh, T_, causal, window, layout, positions_default=True):
    """Key blocks (zigzag: chunk pairs) each sequence shard computes in the ring's forward."""
    x, _ = inputs()
    q, k, v = (a[:, :T_] if T_ <= T else jnp.tile(a, (1, T_ // T, 1, 1)) for a in (x["q"], x["k"], x["v"]))
    plan = _plan_of(q, k, v, mesh=mesh, strategy="ring", layout=layout, causal=causal,
                    sliding_window=window, implementation="reference")  # fmt: skip
    seq = plan.seq_axis
    spec = P(None, seq)
    pos = jnp.broadcast_to(jnp.arange(T_, dtype=jnp.int32), (q.shape[0], T_))
    if layout == "zigzag":
        pos = to_zigzag(pos, mesh)

    def count(q, k, v, qp, kp):
        _, _, c = sa._ring_forward(plan, q, k, v, None, qp, kp, None, None, None)
        return c[None]

    f = jax.shard_map(count, mesh=mesh, in_specs=(spec, spec, spec, spec, spec), out_specs=P(seq),
                      check_vma=False)  # fmt: skip
    return np.asarray(jax.jit(f)(q, k, v, pos, pos)), plan


@pytest.mark.parametrize("num", [4, 8])
def test_zigzag_equal_work_per_device(num):
    mesh = make_mesh(seq=num, devices=jax.devices()[:num]) if num < 8 else make_mesh(seq=8)
    counts, plan = per_device_counts(mesh, 64, True, None, "zigzag")
    # 2P + 1 chunk pairs on every device: exactly the causal triangle's P(2P + 1), split evenly.
    assert counts.tolist() == [2 * num + 1] * num, counts
    assert plan.rounds == num
    contiguous, _ = per_device_counts(mesh, 64, True, None, "contiguous")
    assert contiguous.tolist() == list(range(1, num + 1)), contiguous  # rank r: r + 1 key blocks


def test_window_shortens_the_ring():
    mesh = make_mesh(seq=8)  # 8 tokens per shard at T = 64
    counts, plan = per_device_counts(mesh, 64, True, (9, 0), "contiguous")  # reaches 2 shards back
    assert (plan.rounds, plan.shift) == (3, 0)
    assert counts.tolist() == [1, 2, 3, 3, 3, 3, 3, 3], counts
    counts, plan = per_device_counts(mesh, 64, False, (3, 12), "contiguous")  # 1 back, 2 ahead
    assert (plan.rounds, plan.shift) == (4, 2)
    assert counts.tolist() == [3, 4, 4, 4, 4, 4, 3, 2], counts


@pytest.mark.parametrize(
    "causal,window,impl",
    [(True, 9, "xla"), (False, (3, 12), "reference")],
    ids=["causal-w9-3of8rounds-xla", "w3,12-4of8rounds-shifted-reference"],
)
def test_window_ring_matches_reference(causal, window, impl):
    """The shortened ring against the reference, outputs and gradients: causal window 9 runs 3 of 8
    rounds (dK/dV sent home from 2 hops away); window (3, 12) runs 4 rounds after an initial shift of 2
    ranks ahead (dK/dV home from 1 hop)."""
    mesh = make_mesh(seq=8)
    x, _ = inputs()
    q, k, v = (jnp.tile(x[n], (1, 2, 1, 1)) for n in ("q", "k", "v"))  # T = 64, 8 tokens per shard
    w = jax.random.normal(jax.random.PRNGKey(5), q.shape)

    def loss(attend, impl):
        def f(q, k, v):
            o = attend(q, k, v, causal=causal, sliding_window=window, implementation=impl)
            return jnp.sum(o * w), o

        return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))

    got, o = loss(functools.partial(sharded_attention, mesh=mesh, strategy="ring"), impl)(q, k, v)
    want, o_ref = loss(flash_attention, "reference")(q, k, v)
    assert_close("o", o, o_ref, tolerance(jnp.float32))
    for name, g, r in zip("qkv", got, want, strict=True):
        assert_close("d" + name, g, r, tolerance(jnp.float32, grad=True))


# ----------------------------------------------------------------------------------------------------
# Batch and heads: no communication, exact.


def test_batch_and_head_sharding_is_exact():
    """No communication and no reordered sums: batch shards give the unsharded result bit for bit, head
    shards the unsharded call on their own heads bit for bit. (Against the whole unsharded call, head
    shards differ in the last bit: XLA on CPU compiles a 2-head program's contractions differently from
    an 8-head one's, the reference backend's too; nothing crosses devices.)"""
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    q = jax.random.normal(keys[0], (2, 24, 8, 16))
    k = jax.random.normal(keys[1], (2, 24, 4, 16))
    v = jax.random.normal(keys[2], (2, 24, 4, 16))
    sinks = jax.random.normal(keys[3], (8, 1))
    kw = dict(causal=True, sliding_window=(6, 0), logits_soft_cap=3.0, implementation="xla")

    def one(q, k, v, s):
        return flash_attention(q, k, v, sinks=s, **kw)

    o_1 = jax.jit(one)(q, k, v, sinks)
    batch_mesh = make_mesh(data=2, seq=1, devices=jax.devices()[:2])
    o = jax.jit(lambda *a: sharded_attention(*a[:3], sinks=a[3], mesh=batch_mesh, **kw))(q, k, v, sinks)
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o_1))

    mesh = make_mesh(data=2, seq=1, heads=4)

    def sharded(q, k, v, s):
        return sharded_attention(q, k, v, sinks=s, mesh=mesh, **kw)

    o = jax.jit(sharded)(q, k, v, sinks)
    assert o.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, "heads", None)), 4)
    per_shard = jax.jit(
        lambda q, k, v, s: jnp.concatenate(
            [
                one(q[:, :, 2 * i : 2 * i + 2], k[:, :, i : i + 1], v[:, :, i : i + 1], s[2 * i : 2 * i + 2])
                for i in range(4)
            ],
            axis=2,
        )  # fmt: skip
    )(q, k, v, sinks)
    np.testing.assert_array_equal(np.asarray(o), np.asarray(per_shard))
    assert_close("o vs the whole unsharded call", o, o_1, 1e-6)

    def loss(attend):
        return lambda *a: jnp.sum(attend(*a) ** 2)

    g = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2, 3)))(q, k, v, sinks)
    g_1 = jax.jit(jax.grad(loss(one), argnums=(0, 1, 2, 3)))(q, k, v, sinks)
    for name, a, b in zip(("q", "k", "v", "sinks"), g, g_1, strict=True):
        assert_close("d" + name, a, b, 1e-6)


# ----------------------------------------------------------------------------------------------------
# Eager, Explicit meshes, dropout, the auto rule.


def test_eager_on_an_explicit_mesh():
    mesh = jax.make_mesh((2, 4), ("data", "seq"))  # Explicit axes (jax.make_mesh's default)
    x, _ = inputs()
    o = sharded_attention(x["q"], x["k"], x["v"], mesh=mesh, causal=True, strategy="allgather",
                          implementation="reference")  # fmt: skip
    o_ref = flash_attention(x["q"], x["k"], x["v"], causal=True, implementation="reference")
    assert_close("o", o, o_ref, tolerance(jnp.float32))
    assert o.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "seq", None, None)), 4)

    # and a jitted gradient there (the ring: custom_vjp under an Explicit mesh)
    def loss(attend):
        return lambda q: jnp.sum(attend(q, x["k"], x["v"], causal=True, implementation="reference") ** 2)

    ring = functools.partial(sharded_attention, mesh=mesh, strategy="ring")
    dq = jax.jit(jax.grad(loss(ring)))(x["q"])
    assert_close("dq", dq, jax.grad(loss(flash_attention))(x["q"]), tolerance(jnp.float32, grad=True))


# Dropout under every sharding: the mask hashes global batch, head and token indices (dropout_offsets
# (q, kv, batch, head) from axis_index; zigzag chunks called apart or put back in order), so every
# sharding draws the unsharded call's mask. The xla backend's dropout is exact: the sharded result equals
# the unsharded xla call up to float32 reordering (sequence shards merge partials).
DROPOUT_TOL = 2e-6  # relative RMS, outputs; gradients 2x (a wrong keep mask gives errors of order 1)
DROPOUT_FEATURES = {
    "causal": dict(causal=True),
    "window": dict(sliding_window=(6, 2)),  # not causal: the zigzag ring's non-pair path
}


def _dropout_grad(attend, feature, seg, w_o, w_lse):
    """jit(grad) of <o, w_o> + <lse, w_lse> in q, k, v, bias, sinks, with (o, lse) as aux."""
    kw = dict(dropout_rate=0.3, dropout_rng=jax.random.key(21), implementation="xla",
              return_residuals=True, **DROPOUT_FEATURES[feature])  # fmt: skip

    def f(q, k, v, bias, sinks):
        o, lse = attend(q, k, v, bias=bias, sinks=sinks, q_segment_ids=seg, kv_segment_ids=seg, **kw)
        return jnp.sum(o * w_o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse), (o, lse)

    return jax.jit(jax.grad(f, argnums=tuple(range(5)), has_aux=True))


@functools.cache
def _unsharded_dropout(feature, heads, kv_heads):
    x, w = inputs(heads, kv_heads, seed=9)
    seg = jnp.asarray(SEGMENTS, jnp.int32)
    grads, (o, lse) = _dropout_grad(flash_attention, feature, seg, *w)(*(x[n] for n in x))
    return o, lse, grads


@pytest.mark.parametrize(
    "strategy,layout,feature,mesh_shape",
    [
        *[(s, lay, "causal", (2, 2, 2)) for s in ("ring", "allgather", "ulysses") for lay in LAYOUTS_],
        ("ring", "zigzag", "window", (2, 2, 2)),
        ("local", "contiguous", "causal", (2, 1, 4)),  # batch x heads only, kv heads replicated
    ],
    ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else x,
)
def test_dropout_under_every_sharding(strategy, layout, feature, mesh_shape):
    """Dropout with causal or window, bias, sinks and segments crossing shards, on batch x seq x heads
    (2 x 2 x 2, H8/4; and 2 x 1 x 4 without a sequence axis, H8/2: the 2 kv heads do not divide over 4
    and stay replicated): o, lse and every gradient equal the unsharded xla call with the same rng."""
    heads, kv_heads = 8, 2 if strategy == "local" else 4
    mesh = make_mesh(data=mesh_shape[0], seq=mesh_shape[1], heads=mesh_shape[2])
    x, w = inputs(heads, kv_heads, seed=9)
    args = [x[n] for n in x]  # q, k, v, bias, sinks
    seg = jnp.asarray(SEGMENTS, jnp.int32)
    attend = functools.partial(sharded_attention, mesh=mesh, layout=layout,
                               strategy="auto" if strategy == "local" else strategy)  # fmt: skip
    if layout == "zigzag":  # reordered at "data loading", outside the compiled program
        zz = functools.partial(_reorder, mesh, to_zigzag)
        seq_axes = [(1,), (1,), (1,), (2, 3), ()]
        args = [zz(a, axes=ax) for a, ax in zip(args, seq_axes, strict=True)]
        grads, (o, lse) = _dropout_grad(attend, feature, zz(seg, axes=(1,)), zz(w[0], axes=(1,)),
                                        zz(w[1], axes=(2,)))(*args)  # fmt: skip
        o, lse = from_zigzag(o, mesh), from_zigzag(lse, mesh, axis=2)
        grads = [_reorder(mesh, from_zigzag, g, ax) for g, ax in zip(grads, seq_axes, strict=True)]
    else:
        grads, (o, lse) = _dropout_grad(attend, feature, seg, *w)(*args)
    o_ref, lse_ref, g_ref = _unsharded_dropout(feature, heads, kv_heads)
    errors = {"o": assert_close("o", o, o_ref, DROPOUT_TOL)}
    finite = np.isfinite(np.asarray(lse_ref))
    assert np.array_equal(np.isfinite(np.asarray(lse)), finite)
    errors["lse"] = assert_close("lse", np.where(finite, lse, 0), np.where(finite, lse_ref, 0), DROPOUT_TOL)
    for name, g, r in zip(("q", "k", "v", "bias", "sinks"), grads, g_ref, strict=True):
        errors["d" + name] = assert_close("d" + name, g, r, 2 * DROPOUT_TOL)
    print(f"\ndropout {strategy} {layout} {feature}: " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()),
          end="")  # fmt: skip


def test_bf16_zigzag_ring():
    """bf16 inputs, xla halves: partials merge in float32; against the float32 reference of the same
    (bf16-rounded) inputs, with the bf16 tolerances."""
    mesh = make_mesh(data=2, seq=SEQ)
    x, (w, _) = inputs()
    q, k, v = (x[n].astype(jnp.bfloat16) for n in ("q", "k", "v"))

    def loss(attend, impl):
        def f(q, k, v):
            o = attend(q, k, v, causal=True, sliding_window=12, implementation=impl)
            return jnp.sum(o.astype(jnp.float32) * w), o

        return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))

    zz = functools.partial(_reorder, mesh, to_zigzag, axes=(1,))
    ours = functools.partial(sharded_attention, mesh=mesh, strategy="ring", layout="zigzag")
    got, o = loss(lambda *a, **kw: from_zigzag(ours(*map(zz, a), **kw), mesh), "xla")(q, k, v)
    assert o.dtype == jnp.bfloat16
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    want, o_ref = loss(flash_attention, "reference")(*f32)
    assert_close("o", o, o_ref, tolerance(jnp.bfloat16))
    for name, g, r in zip("qkv", got, want, strict=True):
        assert_close("d" + name, g, r, tolerance(jnp.bfloat16, grad=True))


def test_auto_rule():
    pick = functools.partial(sa.choose_strategy, "auto", num_seq=8, has_bias=False)
    mb = 2**20
    assert pick(H=16, Hkv=8, q_bytes=mb, kv_bytes=mb) == "ulysses"
    assert pick(H=16, Hkv=2, q_bytes=mb, kv_bytes=mb / 4) == "allgather"  # GQA 16/2: small gathered K/V
    assert pick(H=12, Hkv=12, q_bytes=mb, kv_bytes=2 * mb) == "ring"  # MHA, 12 heads do not split 8 ways
    assert (
        sa.choose_strategy("auto", num_seq=8, H=16, Hkv=8, has_bias=True, q_bytes=mb, kv_bytes=mb) == "ring"
    )
    assert sa.choose_strategy("ring", num_seq=8, H=16, Hkv=8, has_bias=False, q_bytes=1, kv_bytes=1) == "ring"


# ----------------------------------------------------------------------------------------------------
# Bad input: errors name the argument and the constraint, before any kernel runs.


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(strategy="tree"), ValueError, r"strategy='tree' must be one of"),
        (dict(layout="striped"), ValueError, r"layout='striped' must be one of"),
        (dict(seq_axis="sequence"), ValueError, r"seq_axis='sequence' is not an axis of the mesh"),
        (dict(head_axis="seq"), ValueError, r"only one role"),
        (dict(mesh="mesh"), TypeError, r"mesh must be a jax.sharding.Mesh"),
        (dict(T=34), ValueError, r"seq \(q\)=34 must be divisible by the size of mesh axis 'seq', 4"),
        (dict(T=36, layout="zigzag"), ValueError, r"seq \(q\)=36 must be divisible by 2 x the size"),
        (dict(B=3), ValueError, r"batch \(q, k, v\)=3 must be divisible by the size of mesh axis 'data', 2"),
        (
            dict(strategy="ulysses"),
            ValueError,
            r"strategy='ulysses' needs the heads per device, num_heads=4 "
            r"and num_kv_heads=2, divisible by the size of the sequence axis 'seq', 4",
        ),
        (  # 3 kv heads over 2 head shards, each shard's 3 query heads in two groups of 2: not served
            dict(mesh_heads=True, H=6, Hkv=3),
            ValueError,
            r"num_kv_heads \(k, v\)=3 must be divisible by the size of mesh axis 'heads', 2, or each "
            r"device's num_heads / 2 = 3 query heads must share one kv head",
        ),
        (  # replicated kv head (MQA over 2 head shards): ulysses still splits the 1 query head per device
            dict(mesh_heads=True, H=2, Hkv=1, strategy="ulysses"),
            ValueError,
            r"strategy='ulysses' needs the heads per device, num_heads=1 and num_kv_heads=1, divisible by "
            r"the size of the sequence axis 'seq', 2 \(k, v replicated over the head axis: query heads "
            r"only\)",
        ),
        (dict(causal="yes"), TypeError, r"causal must be a bool"),
        (dict(sliding_window=-1), ValueError, r"sliding_window left=-1 must be in"),
        (dict(unknown=1), TypeError, r"unexpected keyword arguments \['unknown'\]"),
    ],
    ids=lambda x: str(x) if isinstance(x, dict) else "",
)
def test_bad_input(kwargs, exc, match):
    kw = dict(kwargs)
    shape = dict(B=kw.pop("B", 2), T=kw.pop("T", 32), H=kw.pop("H", 4), Hkv=kw.pop("Hkv", 2))
    mesh = make_mesh(data=2, seq=2, heads=2) if kw.pop("mesh_heads", False) else make_mesh(data=2, seq=4)
    mesh = kw.pop("mesh", mesh)
    q = jnp.zeros((shape["B"], shape["T"], shape["H"], 8))
    k = jnp.zeros((shape["B"], shape["T"], shape["Hkv"], 8))
    with pytest.raises(exc, match=match):
        sharded_attention(q, k, k, mesh=mesh, **kw)


def test_exported():
    assert shardattn.sharded_attention is sharded_attention
    assert callable(shardattn.meshes.to_zigzag)


@pytest.mark.parametrize("strategy,mesh_shape", [("auto", (2, 1, 4)), ("ulysses", (1, 4, 1))])
def test_default_positions_reach_the_backend_as_constants(monkeypatch, strategy, mesh_shape):
    """Where a device holds whole sequences (batch/head shards, ulysses), the backend gets the default
    positions as numpy constants, as under flash_attention: cudnn serves causal only when it can see
    that at trace time, and only without lse."""
    seen = []
    real = sa.run_backends

    def spy(implementations, q, k, v, **kw):
        seen.append((type(kw["q_positions"]), type(kw["kv_positions"]), kw["return_lse"]))
        return real(implementations, q, k, v, **kw)

    monkeypatch.setattr(sa, "run_backends", spy)
    sa._build.cache_clear()  # trace afresh, through the spy
    mesh = make_mesh(data=mesh_shape[0], seq=mesh_shape[1], heads=mesh_shape[2],
                     devices=jax.devices()[: int(np.prod(mesh_shape))])  # fmt: skip
    x, _ = inputs(heads=8, kv_heads=4)
    o = sharded_attention(x["q"], x["k"], x["v"], mesh=mesh, strategy=strategy, causal=True,
                          implementation="reference")  # fmt: skip
    # ... and, without return_residuals, lse is not asked for (cudnn serves o alone).
    assert seen and all(t == (np.ndarray, np.ndarray, False) for t in seen), seen
    o_ref = flash_attention(x["q"], x["k"], x["v"], causal=True, implementation="reference")
    assert_close("o", o, o_ref, tolerance(jnp.float32))


@pytest.mark.gpu
def test_one_gpu_mesh_is_the_bare_call():
    """On one GPU, sharded_attention on a 1-device mesh runs the same per-device call as flash_attention
    (default implementation: cudnn where it serves): bitwise the same output and gradients."""
    mesh = make_mesh(seq=1, devices=jax.devices()[:1])
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (1, 1024, 8, 128), jnp.bfloat16) for kk in keys)

    def loss(attend):
        return lambda q, k, v: jnp.sum(attend(q, k, v, causal=True).astype(jnp.float32) ** 2)

    ours = functools.partial(sharded_attention, mesh=mesh)
    o = jax.jit(lambda *a: ours(*a, causal=True))(q, k, v)
    o_1 = jax.jit(lambda *a: flash_attention(*a, causal=True))(q, k, v)
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(o_1, np.float32))
    g = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
    g_1 = jax.jit(jax.grad(loss(flash_attention), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g, g_1, strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))

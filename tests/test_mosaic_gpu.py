"""mosaic_gpu backend (kernels/lightning/mosaic_gpu.py): the Mosaic GPU forward walk against the float32
reference, its segment rule, the exact relaunch for non-finite inputs, and what it declines.

The `gpu` cases need a Hopper GPU (skipped elsewhere by tests/conftest.py); the others run on CPU.
"""

import functools

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Case, assert_close, make_inputs, tolerance
from jax import lax
from test_lightning import SCALE, compare_with_reference, run_with_grads

import shardattn
from shardattn.kernels.lightning import mosaic_gpu, reference, triton

BF16 = jnp.bfloat16


def test_declines_off_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("checks the CPU answer")
    x = make_inputs(Case(B=1, T=256, H=2, Dk=128, dtype=BF16))
    with pytest.raises(NotImplementedError, match="mosaic_gpu backend needs a GPU"):
        mosaic_gpu.lightning_attention(x["q"], x["k"], x["v"], x["slopes"], scale=0.1)
    # the GPU default list starts with it; elsewhere the platform's list never names it
    assert shardattn.lightning.resolve_implementations(None) == ("xla",)


@pytest.mark.parametrize(
    "B,H,Dv,chunks,sms,split_segments,want",
    [
        (4, 16, 128, 128, 132, True, (1, 1)),  # b4-t8k: 128 one-block programs fill the GPU unsegmented
        (4, 16, 128, 128, 132, False, (1, 1)),
        (2, 64, 128, 256, 132, True, (2, 1)),  # b2-t16k: 256 would take two waves; two blocks, 128 programs
        (1, 16, 128, 512, 132, True, (1, 4)),  # b1-t32k: the split walk, 4 segments of 128 chunks
        (1, 16, 128, 512, 132, False, (2, 8)),  # the G walk's plan: two blocks, 8 segments of 64 chunks
        (1, 16, 128, 2048, 132, True, (1, 4)),  # b1-t128k
        (1, 16, 128, 2048, 132, False, (2, 8)),
        (1, 2, 128, 64, 132, True, (1, 16)),  # 4 one-block items x 16 segments (32 leave 2 chunks < 3 slots)
        (1, 2, 128, 64, 132, False, (2, 32)),  # segments of 2 chunks: as short as two slots allow
        (1, 2, 192, 64, 132, False, (1, 16)),  # Dv 192: one block; 6 items x 16 (not 21: it must divide 64)
        (1, 2, 64, 5, 132, True, (1, 1)),  # fewer than 2 x 3 chunks: never segmented
    ],
)
def test_plan(monkeypatch, B, H, Dv, chunks, sms, split_segments, want):
    class Device:
        core_count = sms

    monkeypatch.setattr(jax, "devices", lambda *a: [Device()])
    NW, P = mosaic_gpu._plan(B, H, Dv, chunks, split_segments=split_segments)
    assert (NW, P) == want
    items = B * H * Dv // (mosaic_gpu.BV * NW)
    assert chunks % P == 0 and chunks // P >= mosaic_gpu.STAGES[NW] and (P == 1 or items * P <= sms)


@pytest.mark.parametrize("split", [True, False], ids=["split", "fused"])
@pytest.mark.parametrize("nw,P,Dv,with_state,store", [(1, 1, 128, False, False), (2, 4, 128, True, False),
                                                      (1, 2, 192, True, False), (1, 1, 128, False, True),
                                                      (2, 4, 128, True, True)])
def test_walk_lowers_for_cuda(nw, P, Dv, with_state, store, split):
    # The Mosaic GPU lowering (layouts, transforms, shared-memory fit) on any machine with jaxlib's CUDA
    # plugin installed, no GPU needed (a development check; CI has no plugin and skips it).
    pytest.importorskip("jax_cuda12_plugin")
    B, T, H, Dk = 1, 512, 2, 128
    a, av = (jax.ShapeDtypeStruct((B, T, H, d), BF16) for d in (Dk, Dv))
    s0 = jax.ShapeDtypeStruct((B, H, P, Dk, Dv), jnp.float32) if with_state else None

    def walk(q, k, v, slopes, s0):
        return mosaic_gpu._walk(q, k, v, slopes, s0, scale=0.1, P=P, NW=nw, store_states=store, split=split)

    lowered = jax.jit(walk).trace(a, a, av, jax.ShapeDtypeStruct((H,), jnp.float32), s0)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("nw,P", [(1, 1), (2, 4)])
def test_g_walk_lowers_for_cuda(nw, P):
    pytest.importorskip("jax_cuda12_plugin")
    B, T, H, D = 1, 512, 2, 128
    a = jax.ShapeDtypeStruct((B, T, H, D), BF16)
    g0 = jax.ShapeDtypeStruct((B, H, P, D, D), jnp.float32)

    def walk(q, do, slopes, g0):
        return mosaic_gpu._g_walk_kernel(q, do, slopes, g0, scale=0.1, P=P, NW=nw)

    lowered = jax.jit(walk).trace(a, a, jax.ShapeDtypeStruct((H,), jnp.float32), g0)
    assert "mosaic_gpu" in lowered.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("differentiated", [True, False])
def test_shard_state_pass_is_the_training_forwards_for_cuda(monkeypatch, differentiated):
    # Lowered for CUDA without a GPU (a development check, as above; also needs jax-triton): a
    # differentiated sequence shard's local_state(differentiated=True) launches the very first pass of
    # the storing forward's segments (the plans differ: the plain forward's split walk takes 4 segments
    # here, the storing one 8), so XLA computes it once; with differentiated=False it is another launch.
    # (On the GPU, test_sequence_shard_reads_k_v_once_for_its_states counts the compiled launches.)
    pytest.importorskip("jax_cuda12_plugin")
    triton_lib = pytest.importorskip("jax_triton.triton_lib")
    import re

    monkeypatch.setattr(triton_lib.triton_kernel_call_lib, "get_compute_capability", lambda device: 90)
    monkeypatch.setattr(mosaic_gpu, "_check_supported", lambda *a, **k: None)
    monkeypatch.setattr(triton, "_check_supported", lambda *a, **k: None)
    monkeypatch.setattr(mosaic_gpu, "_num_sms", lambda: 132)
    B, T, H, D = 1, 1024, 4, 128
    assert mosaic_gpu._plan(B, H, D, T // 64) == (1, 4)
    assert mosaic_gpu._plan(B, H, D, T // 64, split_segments=False) == (2, 8)
    q, kv = (jax.ShapeDtypeStruct((B, T, h, D), BF16) for h in (H, 2))
    s_in = jax.ShapeDtypeStruct((B, H, D, D), jnp.float32)
    slopes = jnp.linspace(0.1, 1.0, H).astype(jnp.float32)
    opts = triton.Options(scale=0.3, reverse=False)

    def training(with_local_state):
        def run(q, k, v, s_in, do):
            def attn(q, k, v):
                init = s_in
                if with_local_state:
                    k_, v_ = lax.stop_gradient(k), lax.stop_gradient(v)
                    init = init + 0.5 * mosaic_gpu.local_state(k_, v_, slopes, differentiated=differentiated)
                return mosaic_gpu._lightning(q, k, v, slopes, init, None, opts)[0]

            o, pullback = jax.vjp(attn, q, k, v)
            return o, pullback(do)

        return run

    def launches(fn):
        text = jax.jit(fn).trace(q, kv, kv, s_in, q).lower(lowering_platforms=("cuda",)).as_text()
        return [re.search(r'backend_config = "([^"]*)"', line).group(1) + line.rsplit(":", 1)[-1]
                for line in text.splitlines() if "triton_kernel_call" in line]  # fmt: skip

    alone, shard = launches(training(False)), launches(training(True))
    extra = list(shard)
    for launch in alone:
        extra.remove(launch)  # every launch of the shard's own forward and backward is there
    assert len(extra) == 1  # local_state's
    assert (extra[0] in alone) == differentiated


@pytest.mark.parametrize("B,T,H,Hkv", [(1, 512, 2, 2), (2, 1024, 4, 2)])
def test_chunk_kernel_lowers_for_cuda(B, T, H, Hkv):
    pytest.importorskip("jax_cuda12_plugin")
    a, kv = (jax.ShapeDtypeStruct((B, T, h, 128), BF16) for h in (H, Hkv))
    st = jax.ShapeDtypeStruct((H, B * T // 64, 128, 128), BF16)

    def chunks(q, k, v, do, slopes, st, gt):
        return mosaic_gpu._chunk_kernel(q, k, v, do, slopes, st, gt, scale=0.1, num_programs=132)

    lowered = jax.jit(chunks).trace(a, kv, kv, a, jax.ShapeDtypeStruct((H,), jnp.float32), st, st)
    assert "mosaic_gpu" in lowered.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("kernel", ["walk", "walk_from_states", "g_walk", "chunk_kernel"])
def test_kernels_lower_inside_shard_map(kernel):
    # Inside shard_map with check_vma=True, every input varying over a mesh axis (as sharded_lightning's
    # per-device calls are), under a mesh with the usual axis names, each kernel lowers, without NVSHMEM:
    # - Mosaic GPU resolves lax.axis_index against the enclosing mesh's axes first. When the walks' grid
    #   axis was named "heads", as meshes.AXIS_NAMES has it, it became the device's mesh index, read
    #   through NVSHMEM (nvshmem_my_pe), which XLA does not support. The kernels' axis names are their own.
    # - A value loaded from an input's ref keeps the input's varying axes, a wgmma accumulator's has none:
    #   the walks' loops from a loaded state (a segment's S_in, the G entering) failed to trace, their
    #   carry types differing, until _walk_loop took their first step outside the loop.
    pytest.importorskip("jax_cuda12_plugin")
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "seq", "heads", "batch"))
    B, T, H, D = 2, 512, 2, 128
    a = jax.ShapeDtypeStruct((B, T, H, D), BF16)
    sl = jax.ShapeDtypeStruct((H,), jnp.float32)
    st = jax.ShapeDtypeStruct((H, B * T // 64, D, D), BF16)
    s0 = jax.ShapeDtypeStruct((B, H, 2, D, D), jnp.float32)
    V, VS = P("data"), P(None, "data")
    cases = {
        "walk": (lambda q, k, v, s: mosaic_gpu._walk(q, k, v, s, None, scale=0.1, P=2, NW=2,
                                                     store_states=True), (a, a, a, sl), (V,) * 4),
        "walk_from_states": (lambda q, k, v, s, s0: mosaic_gpu._walk(q, k, v, s, s0, scale=0.1, P=2, NW=1),
                             (a, a, a, sl, s0), (V,) * 5),
        "g_walk": (lambda q, do, s, g0: mosaic_gpu._g_walk_kernel(q, do, s, g0, scale=0.1, P=2, NW=2),
                   (a, a, sl, s0), (V,) * 4),
        "chunk_kernel": (lambda q, k, v, do, s, st, gt: mosaic_gpu._chunk_kernel(
            q, k, v, do, s, st, gt, scale=0.1, num_programs=132), (a, a, a, a, sl, st, st),
            (V,) * 5 + (VS, VS)),
    }
    f, args, specs = cases[kernel]
    inside = jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=V, check_vma=True)
    text = jax.jit(inside).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert "nvshmem" not in text and "xla_replica_ids" not in text


@pytest.mark.parametrize("H", [4, 33], ids=["segmented", "unsegmented"])
def test_traces_under_grad_inside_shard_map(monkeypatch, H):
    # The whole backend (Mosaic kernels, Triton's first passes, relaunches and backward) under jax.grad
    # inside shard_map with check_vma=True, q, k, v and the initial state varying, the slopes replicated;
    # traced on CPU, nothing runs. Without the casts of the kernels' outputs (_launch) the custom_vjp's
    # backward does not type-check ("the manual axis types do not match"); without _walk_loop the walks
    # do not trace. The trace holds the three Mosaic kernels (forward walk, G walk, chunk kernel: one
    # mpmd_map each) and the sum of the replicated slopes' gradient over the shards (psum_invariant).
    pytest.importorskip("jax_triton")
    pytest.importorskip("jax_cuda12_plugin")
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    monkeypatch.setattr(mosaic_gpu, "_check_supported", lambda *a: None)  # no GPU here
    monkeypatch.setattr(triton, "_check_supported", lambda *a: None)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    B, T, D = 2, 512, 128
    args = [jax.ShapeDtypeStruct((B, T, H, D), BF16)] * 3 + [
        jax.ShapeDtypeStruct((H,), jnp.float32), jax.ShapeDtypeStruct((B, H, D, D), jnp.float32)]

    def per_device(q, k, v, slopes, s0):
        return shardattn.lightning_attention(q, k, v, slopes=slopes, initial_state=s0, scale=0.3,
                                             return_state=True, implementation="mosaic_gpu")

    V = P("data")
    f = jax.shard_map(per_device, mesh=mesh, in_specs=(V, V, V, P(), V), out_specs=(V, V), check_vma=True)
    loss = lambda *x: sum(jnp.sum(o.astype(jnp.float32)) for o in f(*x))  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)
    names = []

    def walk(j):
        for e in j.eqns:
            names.append(e.primitive.name)
            for p in e.params.values():
                sub = getattr(p, "jaxpr", p)
                if hasattr(sub, "eqns"):
                    walk(sub)

    walk(jaxpr.jaxpr)
    assert names.count("mpmd_map") == 3, sorted(set(names))
    assert "psum_invariant" in names


def _chunk_states(q, k, v, do, slopes, dfinal, scale):
    """S_in and G = dL/dS_out of every chunk, [H, B * T // 64, Dk, Dv] float64, by their recurrences."""
    q, k, v, do = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (q, k, v, do))
    B, T, H, D = q.shape
    group, C, NC = H // k.shape[2], 64, T // 64
    lam = np.exp(-np.asarray(slopes, np.float64))
    i = np.arange(C)
    S_in, G = np.zeros((2, H, B * NC, D, v.shape[3]))
    for b in range(B):
        for h in range(H):
            S, Gc = np.zeros((D, v.shape[3])), np.asarray(dfinal[b, h], np.float64)
            for c in range(NC):
                rows = slice(c * C, (c + 1) * C)
                S_in[h, b * NC + c] = S
                kd = k[b, rows, h // group] * lam[h] ** (C - 1 - i)[:, None]
                S = lam[h] ** C * S + kd.T @ v[b, rows, h // group]
            for c in reversed(range(NC)):
                rows = slice(c * C, (c + 1) * C)
                G[h, b * NC + c] = Gc
                qd = q[b, rows, h] * lam[h] ** (i + 1)[:, None]
                Gc = lam[h] ** C * Gc + scale * qd.T @ do[b, rows, h]
    return S_in, G


@pytest.mark.parametrize("Hkv", [1, 2], ids=["gqa", "mha"])
def test_chunk_kernel_in_interpret_mode_matches_reference(Hkv):
    # The Mosaic backward's chunk kernel in Pallas's GPU interpret mode on CPU (its dots emulated with
    # 16-bit operands and float32 accumulation; TMA, barriers, slots and the elementwise maths as written),
    # given exact S_in and G, against the gradients of the float32 reference: dq, dk, dv (GQA: summed over
    # each group) and d(slopes). Skipped where jax has no Mosaic GPU interpret mode.
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:
        pytest.skip("this jax has no Pallas Mosaic GPU interpret mode")
    # 4 items; GQA: float32 dk, dv per query head (summed below), MHA: bf16, through shared memory
    case = Case(B=1, T=128, H=2, Hkv=Hkv, Dk=128, dtype=BF16)
    x = make_inputs(case, 13)
    do, dfinal = _cotangents(case, 14)
    scale = 0.3
    S_in, G = (jnp.asarray(a, BF16) for a in _chunk_states(x["q"], x["k"], x["v"], do, x["slopes"], dfinal,
                                                             scale))  # fmt: skip
    dq, dk, dv, r0, r1 = mosaic_gpu._chunk_kernel(x["q"], x["k"], x["v"], do, x["slopes"], S_in, G,
                                                  scale=scale, num_programs=1, interpret=InterpretGPUParams())
    f32 = {n: jnp.asarray(a, jnp.float32) for n, a in x.items()}

    def ref(q, k, v, slopes):
        return reference.lightning_attention(q, k, v, slopes, scale=scale)

    _, pullback = jax.vjp(ref, f32["q"], f32["k"], f32["v"], f32["slopes"])
    want = pullback((do.astype(jnp.float32), dfinal))
    group = (1, 128, Hkv, 2 // Hkv, 128)
    got = (dq, dk.reshape(group).sum(3), dv.reshape(group).sum(3),
           -(r0[:, 0].sum(-1) + r1[:, 0].sum(-1)).reshape(2, 2).sum(0))
    for name, g, w in zip(("dq", "dk", "dv", "dslopes"), got, want, strict=True):
        assert_close(name, g, w, tolerance(BF16, grad=True))
    # the check rows (row sums of the stored outputs) are finite: no item flagged
    assert np.isfinite(np.asarray(r0[:, 1])).all() and np.isfinite(np.asarray(r1[:, 1:])).all()


def _hopper():
    capability = str(getattr(jax.devices()[0], "compute_capability", ""))
    if jax.default_backend() != "gpu" or not capability.startswith("9"):
        pytest.skip("needs a Hopper GPU")


FORWARD_CASES = [
    Case(B=2, T=512, H=4, Dk=128, dtype=BF16),  # two warpgroups, 4 segments
    Case(B=1, T=4096, H=2, Dk=128, dtype=BF16),  # two warpgroups, 32 segments of 2 chunks
    Case(B=1, T=1024, H=8, Hkv=2, Dk=128, dtype=BF16),  # GQA; two warpgroups, 8 segments
    Case(B=2, T=256, H=2, Dk=128, Dv=192, dtype=BF16),  # three Dv blocks: one per program (split walk)
    Case(B=1, T=640, H=4, Dk=128, dtype=jnp.float16),  # two warpgroups, 5 segments
    Case(B=2, T=512, H=33, Dk=128, dtype=BF16),  # 132 one-block programs (split walk), unsegmented
    Case(B=1, T=256, H=66, Dk=128, Dv=256, dtype=BF16),  # two warpgroups x 2 programs per pair
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_forward_matches_reference(case, with_state):
    # Undifferentiated: this is the Mosaic walk (a gradient would run the Triton rules).
    _hopper()
    x = make_inputs(case, 5, with_state=with_state)
    kw = dict(slopes=x["slopes"], initial_state=x.get("initial_state"), scale=0.3, return_state=True)
    o, s = shardattn.lightning_attention(x["q"], x["k"], x["v"], implementation="mosaic_gpu", **kw)
    ref = {n: a.astype(jnp.float32) for n, a in x.items()}
    o_r, s_r = shardattn.lightning_attention(ref["q"], ref["k"], ref["v"], implementation="reference",
                                             **dict(kw, slopes=ref["slopes"],
                                                    initial_state=ref.get("initial_state")))  # fmt: skip
    assert o.dtype == case.dtype
    assert_close("o", o, o_r, tolerance(case.dtype))
    assert_close("final_state", s, s_r, tolerance(case.dtype))


GRAD_CASES = [
    Case(B=1, T=1024, H=4, Hkv=2, Dk=128, dtype=BF16),  # GQA; two warpgroups, 8 segments
    Case(B=2, T=512, H=33, Dk=128, dtype=BF16),  # 132 one-block programs (split walk), unsegmented
    Case(B=1, T=640, H=4, Dk=128, dtype=jnp.float16),  # fp16: Triton's forward (float32 chunk states)
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.id)
def test_gradients_match_reference(case):
    # Through the backend's custom_vjp: in bf16 the Mosaic walk stores S_in of every chunk and the Triton
    # backward reads them.
    _hopper()
    x = make_inputs(case, 6, with_state=True)
    compare_with_reference(run_with_grads("mosaic_gpu", x), x, case.dtype)


def _cotangents(case, seed):
    """dO [B, T, H, Dv] in the case's dtype and dL/dS_final [B, H, Dk, Dv] float32, random."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 2)
    Dv = case.Dv or case.Dk
    do = jax.random.normal(keys[0], (case.B, case.T, case.H, Dv), jnp.float32).astype(case.dtype)
    return do, jax.random.normal(keys[1], (case.B, case.H, case.Dk, Dv), jnp.float32)


def _assert_like_triton(name, got, want, dtype, same_nonfinite=True):
    """got close to Triton's want where want is finite; non-finite at the same entries (else: compared
    where both are finite)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, name
    finite = np.isfinite(want)
    if same_nonfinite:
        np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=name)
    else:
        finite &= np.isfinite(got)
    assert_close(name, got[finite], want[finite], tolerance(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [False, True], ids=["finite", "nonfinite"])
@pytest.mark.parametrize("case", GRAD_CASES[:2], ids=lambda c: c.id)
def test_chunk_states_match_triton(case, bad):
    # What the backward reads: S_in of every chunk as the Mosaic walk stores it, against the Triton
    # forward's, including where a non-finite k or v has reached them (the relaunch rewrites only o).
    _hopper()
    x = make_inputs(case, 10, with_state=True)
    if bad:
        x["v"] = x["v"].at[0, 37, 0, 5].set(np.nan)
        x["k"] = x["k"].at[0, 200, -1, 3].set(np.inf)
    opts = triton.Options(scale=0.3, reverse=False)
    args = (x["q"], x["k"], x["v"], x["slopes"], x["initial_state"], None)
    (o_m, f_m), res_m = jax.jit(mosaic_gpu._lightning_fwd, static_argnums=6)(*args, opts)
    (o_t, f_t), res_t = jax.jit(triton._lightning_fwd, static_argnums=6)(*args, opts)
    assert res_m[-1].dtype == res_t[-1].dtype == BF16
    for name, got, want in (("S_in", res_m[-1], res_t[-1]), ("final", f_m, f_t), ("o", o_m, o_t)):
        assert np.isfinite(np.asarray(want, np.float32)).all() != bad, name
        # o: the chunk of a bad v_j is NaN from j on in the columns of the Triton walk's Dv block that
        # holds it, and the two walks' blocks differ (the relaunch is the plain walk's, 32 columns; the
        # storing walk's 64): its causality is test_nonfinite_is_causal's. The states: the same entries.
        _assert_like_triton(name, got, want, case.dtype, same_nonfinite=name != "o")


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [False, True], ids=["finite", "nonfinite"])
@pytest.mark.parametrize("case", GRAD_CASES[:2], ids=lambda c: c.id)
def test_g_walk_matches_triton(case, bad):
    # The backward's G of every chunk and d(initial_state), Mosaic's G walk against Triton's, including
    # where a non-finite q or dO has reached them (the update has no mask: the same entries).
    _hopper()
    x = make_inputs(case, 11)
    do, dfinal = _cotangents(case, 12)
    q = x["q"]
    if bad:
        q = q.at[0, 300, 1, 7].set(np.nan)
        do = do.at[0, 64, 0, 2].set(np.inf)
    opts = triton.Options(scale=0.3, reverse=False)
    blocks = triton.BlockSizes.get_default(case.Dk, case.Dk, case.dtype)
    args = (q, do, x["slopes"], dfinal)

    def walk(fn):
        return jax.jit(lambda q, do, s, g: fn(opts, blocks, q, do, s, g, None, BF16))(*args)

    for name, got, want in zip(("G", "d(initial_state)"), walk(mosaic_gpu._g_walk), walk(triton._g_walk),
                               strict=True):
        assert np.isfinite(np.asarray(want)).all() != bad, name
        _assert_like_triton(name, got, want, case.dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [False, True], ids=["finite", "nonfinite"])
@pytest.mark.parametrize("case", GRAD_CASES[:2], ids=lambda c: c.id)
def test_chunk_kernel_matches_triton(case, bad):
    # The backward's chunk kernel (Mosaic, then the exact relaunch of the flagged items) against Triton's:
    # close where finite; with non-finite q, k, v the same non-finite entries, and the flagged items
    # (those with a non-finite output) bit for bit Triton's.
    _hopper()
    x = make_inputs(case, 15)
    do, dfinal = _cotangents(case, 16)
    q, k, v = x["q"], x["k"], x["v"]
    opts = triton.Options(scale=0.3, reverse=False)
    blocks = triton.BlockSizes.get_default(case.Dk, case.Dk, case.dtype)
    _, _, states = triton._forward_pass(q, k, v, x["slopes"], None, None, scale=0.3, reverse=False,
                                        store_states=True, out_dtype=q.dtype, blocks=blocks,
                                        state_dtype=BF16)  # fmt: skip
    gstates, _ = triton._g_walk(opts, blocks, q, do, x["slopes"], dfinal, None, BF16)
    if bad:  # after the states: each bad entry reaches only its own chunk here
        q = q.at[0, 70, 1, 7].set(np.nan)
        k = k.at[0, 130, 0, 3].set(np.inf)
        v = v.at[0, 300, 0, 5].set(np.nan)

    def run(fn):
        return jax.jit(lambda *a: fn(opts, blocks, *a, None))(q, k, v, do, x["slopes"], states, gstates)

    got, want = run(mosaic_gpu._chunks), run(triton._chunks)
    for name, g, w in zip(("dq", "dk", "dv", "dslope"), got, want, strict=True):
        _assert_like_triton(name, g, w, case.dtype)
    if bad:
        for g, w in zip(got[:3], want[:3], strict=True):
            g, w = (np.asarray(a, np.float32).reshape(case.B * case.T // 64, 64, case.H, -1) for a in (g, w))
            for slot, h in ((1, 1), (2, 0), (4, 0)):  # the items of the bad entries (slot = chunk here)
                np.testing.assert_array_equal(g[slot, :, h], w[slot, :, h])


@pytest.mark.gpu
def test_default_on_hopper():
    _hopper()
    for dk, expected in ((128, "mosaic_gpu"), (64, "triton")):
        x = make_inputs(Case(B=1, T=512, H=4, Dk=dk, dtype=BF16), 7)
        default = shardattn.lightning_attention(x["q"], x["k"], x["v"], slopes=x["slopes"])
        named = shardattn.lightning_attention(x["q"], x["k"], x["v"], slopes=x["slopes"],
                                              implementation=expected)  # fmt: skip
        np.testing.assert_array_equal(np.asarray(default), np.asarray(named), err_msg=f"Dk={dk}")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case,kw,reason",
    [
        (Case(B=1, T=300, H=2, Dk=128, dtype=BF16), {}, "T a multiple of 64"),
        (Case(B=1, T=256, H=2, Dk=64, dtype=BF16), {}, "serves Dk = 128"),
        (Case(B=1, T=256, H=2, Dk=128), {}, "bfloat16/float16"),
        (Case(B=1, T=256, H=2, Dk=128, dtype=BF16), {"reverse": True}, "reverse"),
    ],
)
def test_declines_and_triton_serves(case, kw, reason):
    _hopper()
    x = make_inputs(case, 8)
    with pytest.raises(NotImplementedError, match=reason):
        mosaic_gpu.lightning_attention(x["q"], x["k"], x["v"], x["slopes"], scale=0.3, **kw)
    both = shardattn.lightning_attention(x["q"], x["k"], x["v"], slopes=x["slopes"], scale=0.3,
                                         implementation=("mosaic_gpu", "triton"), **kw)  # fmt: skip
    alone = shardattn.lightning_attention(x["q"], x["k"], x["v"], slopes=x["slopes"], scale=0.3,
                                          implementation="triton", **kw)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(both), np.asarray(alone))


# (batch row, token, kv head, "k" | "v", value): mid-chunk, chunk start, chunk end, in a later segment
BAD = [(0, 37, 0, "v", np.nan), (1, 64, 1, "k", np.inf), (1, 191, 0, "v", -np.inf), (2, 1000, 1, "v", np.nan)]


@pytest.mark.gpu
def test_nonfinite_is_causal():
    # A bad k_j or v_j reaches outputs p >= j of its sequence and kv head's query heads, nothing before:
    # the Mosaic walk alone would spread a bad v_j to the whole chunk; the exact relaunch must undo that.
    _hopper()
    case = Case(B=3, T=2048, H=4, Hkv=2, Dk=128, dtype=BF16)  # 12 pairs: the split walk, 4 segments
    assert mosaic_gpu._plan(case.B, case.H, 128, case.T // 64)[1] > 1
    x = make_inputs(case, 9, with_state=True)
    y = dict(x)
    for b, t, kv, name, value in BAD:
        y[name] = y[name].at[b, t, kv, 5].set(value)

    def run(d):
        o, s = shardattn.lightning_attention(d["q"], d["k"], d["v"], slopes=d["slopes"], scale=0.3,
                                             initial_state=d["initial_state"], return_state=True,
                                             implementation="mosaic_gpu")  # fmt: skip
        return np.asarray(o, np.float32), np.asarray(s)

    o_fin, s_fin = run(x)
    o_bad, s_bad = run(y)
    f32 = {n: a.astype(jnp.float32) for n, a in y.items()}
    o_ref, s_ref = (np.asarray(a) for a in reference.lightning_attention(
        f32["q"], f32["k"], f32["v"], f32["slopes"], f32["initial_state"], scale=0.3))  # fmt: skip
    reach = np.zeros(o_bad.shape[:3], bool)
    reach_state = np.zeros(s_bad.shape[:2], bool)
    for b, t, kv, _, _ in BAD:
        reach[b, t:, 2 * kv : 2 * kv + 2] = True
        reach_state[b, 2 * kv : 2 * kv + 2] = True
    runs = (("o", o_bad, o_fin, o_ref, reach), ("state", s_bad, s_fin, s_ref, reach_state))
    for what, got, fin, ref, mask in runs:
        mask = np.broadcast_to(mask.reshape(mask.shape + (1,) * (got.ndim - mask.ndim)), got.shape)
        assert np.all(np.isfinite(ref[~mask])) and not np.all(np.isfinite(ref[mask])), what
        assert np.all(np.isfinite(got[~mask])), f"{what}: non-finite values where no bad token reaches"
        # (a flagged pair's o is the Triton walk's, which rounds differently from the Mosaic walk's)
        np.testing.assert_allclose(got[~mask], fin[~mask], rtol=2e-2, atol=2e-2, err_msg=what)
        missing = mask & ~np.isfinite(ref) & np.isfinite(got)
        assert not missing.any(), f"{what}: finite at {np.argwhere(missing)[:5]} where the reference is not"
    # pairs no bad token reaches at all are not recomputed: bit for bit the finite run
    untouched = ~reach_state
    by_pair = lambda o: o.transpose(0, 2, 1, 3)[untouched]  # noqa: E731
    np.testing.assert_array_equal(by_pair(o_bad), by_pair(o_fin))


SHARD_MAP_CASES = [
    Case(B=2, T=512, H=4, Dk=128, dtype=BF16),  # two warpgroups, 4 segments (Triton's first pass)
    Case(B=2, T=512, H=33, Dk=128, dtype=BF16),  # 132 one-block programs (split walk), unsegmented
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", SHARD_MAP_CASES, ids=lambda c: c.id)
def test_inside_shard_map_matches_reference(case):
    # The backend inside jax.shard_map with check_vma=True (a one-device mesh: one GPU here), q, k, v and
    # the initial state varying over the mesh axis (size 1, but typed as varying all the same), the slopes
    # replicated: its kernels' outputs must be cast to the inputs' varying axes, else the custom_vjp's
    # backward does not type-check ("the manual axis types do not match"), and the slopes to q's, so that
    # their gradient is summed over the shards. implementation="mosaic_gpu" alone: a decline would raise
    # instead of falling back to Triton.
    _hopper()
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    x = make_inputs(case, 10, with_state=True)

    def sharded(q, k, v, *, slopes, initial_state, **kw):
        def per_device(q, k, v, slopes, initial_state):
            return shardattn.lightning_attention(q, k, v, slopes=slopes, initial_state=initial_state, **kw)

        spec = P("data")
        return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, spec, P(), spec),
                             out_specs=(spec, spec), check_vma=True)(q, k, v, slopes, initial_state)

    results = helpers.run_with_grads(sharded, x, scale=SCALE, implementation="mosaic_gpu")
    compare_with_reference(results, x, case.dtype)
    # and the same values as the one-device call, up to the float rounding of a different XLA program
    alone = run_with_grads("mosaic_gpu", x)
    for name, got, want in [("o", results[0], alone[0]), ("final_state", results[1], alone[1])] + [
            ("d" + n, results[2][n], alone[2][n]) for n in results[2]]:
        assert_close(name, got, want, tolerance(case.dtype))


@pytest.mark.gpu
def test_sharded_lightning_serves_with_mosaic_gpu():
    # sharded_lightning's per-device calls on the Mosaic kernels (batch and head axes; one GPU here),
    # forward and gradients against the reference.
    _hopper()
    from shardattn.meshes import make_mesh
    from shardattn.sharded import sharded_lightning

    mesh = make_mesh(data=1, seq=1, heads=1, devices=jax.devices()[:1])
    case = SHARD_MAP_CASES[1]
    x = make_inputs(case, 11, with_state=True)
    results = helpers.run_with_grads(sharded_lightning, x, scale=SCALE, mesh=mesh,
                                     implementation="mosaic_gpu")
    compare_with_reference(results, x, case.dtype)


STATE_CASES = [
    Case(B=1, T=1024, H=4, Hkv=2, Dk=128, dtype=BF16),  # GQA; segmented: 4 (split walk) or 8 (storing)
    Case(B=2, T=512, H=33, Dk=128, dtype=BF16),  # unsegmented: Triton's state functions
    Case(B=1, T=640, H=4, Dk=128, dtype=jnp.float16),  # 2 segments; fp16's training forward is Triton's
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", STATE_CASES, ids=lambda c: c.id)
def test_state_functions_match_reference(case):
    # local_state and state_gradient (a sequence shard's), from the launches of the walks' first passes.
    _hopper()
    x = make_inputs(case, 12)
    q, k, v, slopes = x["q"], x["k"], x["v"], x["slopes"]
    do = jax.random.normal(jax.random.PRNGKey(7), q.shape[:3] + (v.shape[3],)).astype(case.dtype)
    tol = tolerance(case.dtype)
    for differentiated in (False, True):  # (the two forwards' plans: the first passes differ)
        got = jax.jit(functools.partial(mosaic_gpu.local_state, differentiated=differentiated))(k, v, slopes)
        assert_close(f"local_state {differentiated=}", got, reference.local_state(k, v, slopes), tol)
    got = jax.jit(lambda q, do, s: mosaic_gpu.state_gradient(q, do, s, scale=0.3))(q, do, slopes)
    assert_close("state_gradient", got, reference.state_gradient(q, do, slopes, scale=0.3), tol)


def _triton_launches(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text().count('custom_call_target="triton_kernel_call"')


@pytest.mark.gpu
def test_sequence_shard_reads_k_v_once_for_its_states():
    # In a sequence shard (local state, scan, backend from S_in) the local state's launch is the segmented
    # walk's first pass, which XLA computes once: the shard's program launches no more Triton kernels
    # than the forward alone (its first pass and the exact relaunch).
    _hopper()
    case = STATE_CASES[0]
    x = make_inputs(case, 13, with_state=True)
    slopes = x["slopes"]

    def alone(q, k, v, s_in):
        return mosaic_gpu.lightning_attention(q, k, v, slopes, s_in, scale=0.3)[0]

    def shard(q, k, v, s_in):  # S_in from this shard's own local state (a stand-in for the scan)
        return alone(q, k, v, s_in + 0.5 * mosaic_gpu.local_state(k, v, slopes))

    args = (x["q"], x["k"], x["v"], x["initial_state"])
    assert _triton_launches(shard, *args) == _triton_launches(alone, *args) >= 2

    # Differentiated, the walk stores S_in with its own plan, and local_state(differentiated=True) shares
    # that first pass (forward and backward: the vjp's program)
    do = jax.random.normal(jax.random.PRNGKey(14), x["q"].shape).astype(case.dtype)

    def vjp_of(fn):
        def run(q, k, v, s_in):
            o, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, s_in), q, k, v)
            return o, pullback(do)

        return run

    def shard_training(q, k, v, s_in):
        # (values only, as in sharded.py's custom_vjp rules)
        k_, v_ = lax.stop_gradient(k), lax.stop_gradient(v)
        s_loc = mosaic_gpu.local_state(k_, v_, slopes, differentiated=True)
        return alone(q, k, v, s_in + 0.5 * s_loc)

    assert _triton_launches(vjp_of(shard_training), *args) == _triton_launches(vjp_of(alone), *args)

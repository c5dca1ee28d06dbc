"""A NaN or inf in k or v at token t reaches outputs at t and after (processing order), never before, and
never another packed sequence; a NaN in q at t reaches no dk, dv of later tokens.

Each run poisons a few tokens (mid-chunk, chunk start, chunk end; k and v; NaN and inf; GQA kv heads),
then checks every output: those no bad token can reach equal the finite-input run of the same function,
and those it can reach are non-finite wherever the token-by-token reference is.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Case, make_inputs

from shardattn.kernels.lightning import pallas_tpu, reference, xla
from shardattn.meshes import make_mesh
from shardattn.sharded import sharded_lightning

SCALE = 0.7
T = 128
CASE = Case(B=4, T=T, H=4, Hkv=2, Dk=16)
GROUP = CASE.H // CASE.Hkv
# (batch row, token, kv head, "k" | "v", value). xla chunks are 64 tokens, the pallas runs below use 32,
# the sharded runs 16 tokens per shard: 37 is mid-chunk, 64 a chunk (and shard) start, 63 and 31 ends.
BATCHED_BAD = [
    (0, 37, 0, "k", np.nan),
    (1, 64, 1, "v", np.inf),
    (2, 63, 1, "k", -np.inf),
    (3, 31, 0, "v", np.nan),
]
# Packed: sequences [0, 37), [37, 100), [100, 128); bad tokens mid-sequence, at the last token of the
# first sequence (the next must stay clean) and at the first token of the last.
CU = (0, 37, 100, 128)
PACKED_BAD = [(0, 50, 0, "k", np.nan), (0, 36, 1, "v", np.inf), (0, 100, 1, "k", np.nan)]


def inputs(packed):
    case = Case(B=1, T=T, H=4, Hkv=2, Dk=16) if packed else CASE
    x = make_inputs(case, 0, with_state=True, num_states=len(CU) - 1 if packed else None)
    return x


def poison(x, bad):
    x = dict(x)
    for b, t, kv, name, value in bad:
        x[name] = x[name].at[b, t, kv, 3].set(value)
    return x


def reach(shape, bad, *, reverse, packed):
    """[B, T, H] bool: outputs that some bad token may reach (same row, kv head and sequence, p >= p_t)."""
    B, T, H = shape
    seq = np.searchsorted(np.asarray(CU), np.arange(T), side="right") - 1 if packed else np.zeros(T, int)
    proc = T - 1 - np.arange(T) if reverse else np.arange(T)
    mask = np.zeros((B, T, H), bool)
    for b, t, kv, _, _ in bad:
        later = (seq == seq[t]) & (proc >= proc[t])
        mask[b, later, kv * GROUP : (kv + 1) * GROUP] = True
    return mask


def state_reach(num_states, bad, packed):
    mask = np.zeros((num_states, CASE.H), bool)
    seq = np.searchsorted(np.asarray(CU), np.arange(T), side="right") - 1 if packed else None
    for b, t, kv, _, _ in bad:
        mask[seq[t] if packed else b, kv * GROUP : (kv + 1) * GROUP] = True
    return mask


@functools.cache
def ref_fn(reverse, packed):
    cu = jnp.asarray(CU, jnp.int32) if packed else None
    return jax.jit(
        lambda q, k, v, slopes, s0: reference.lightning_attention(
            q, k, v, slopes, s0, cu, scale=SCALE, reverse=reverse
        )
    )


def check_causal(fn, *, reverse, packed):
    """fn(q, k, v, slopes, initial_state) -> (o, final_state), jitted; runs it on finite and poisoned
    inputs and checks the outputs and final states."""
    bad = PACKED_BAD if packed else BATCHED_BAD
    x = inputs(packed)
    y = poison(x, bad)
    args = lambda d: (d["q"], d["k"], d["v"], d["slopes"], d["initial_state"])  # noqa: E731
    o_fin, s_fin = (np.asarray(a, np.float32) for a in fn(*args(x)))
    o_bad, s_bad = (np.asarray(a, np.float32) for a in fn(*args(y)))
    o_ref, s_ref = (np.asarray(a) for a in ref_fn(reverse, packed)(*args(y)))

    for what, got, fin, ref, mask in (
        ("o", o_bad, o_fin, o_ref, reach(o_bad.shape[:3], bad, reverse=reverse, packed=packed)),
        ("final_state", s_bad, s_fin, s_ref, state_reach(s_bad.shape[0], bad, packed)),
    ):
        mask = np.broadcast_to(mask.reshape(mask.shape + (1,) * (got.ndim - mask.ndim)), got.shape)
        # The checker's own premise: the reference is finite where no bad token reaches, and non-finite
        # somewhere where one does.
        assert np.all(np.isfinite(ref[~mask])) and not np.all(np.isfinite(ref[mask])), what
        unreached = got[~mask]
        assert np.all(np.isfinite(unreached)), f"{what}: non-finite values where no bad token reaches"
        np.testing.assert_allclose(unreached, fin[~mask], rtol=1e-6, atol=1e-6, err_msg=what)
        missing = mask & ~np.isfinite(ref) & np.isfinite(got)
        assert not missing.any(), f"{what}: finite at {np.argwhere(missing)[:5]} where the reference is not"


def backend_fn(module, reverse, packed, **kw):
    cu = jnp.asarray(CU, jnp.int32) if packed else None
    return jax.jit(
        lambda q, k, v, slopes, s0: module.lightning_attention(
            q, k, v, slopes, s0, cu, scale=SCALE, reverse=reverse, **kw
        )
    )


BACKENDS = {
    "xla": (xla, {}),
    # 32-token chunks, so that 31/63 end and 64 starts a chunk here too.
    "pallas": (pallas_tpu, {"block_sizes": pallas_tpu.BlockSizes(chunk=32)}),
}
RUNS = [(False, False), (True, False), (False, True), (True, True)]
RUN_IDS = ["fwd", "rev", "packed", "packed-rev"]
# xla in every direction and layout; the slower pallas interpreter in two of them.
BACKEND_RUNS = [("xla", *r) for r in RUNS] + [("pallas", False, False), ("pallas", True, True)]


@pytest.mark.parametrize(
    "backend,reverse,packed",
    BACKEND_RUNS,
    ids=[f"{b}-{RUN_IDS[RUNS.index((r, p))]}" for b, r, p in BACKEND_RUNS],
)
def test_backend_nonfinite_is_causal(backend, reverse, packed):
    module, kw = BACKENDS[backend]
    check_causal(backend_fn(module, reverse, packed, **kw), reverse=reverse, packed=packed)


@functools.cache
def sharded_fn(scan, reverse, packed):
    mesh = make_mesh(seq=8)
    cu = jnp.asarray(CU, jnp.int32) if packed else None
    return jax.jit(
        lambda q, k, v, slopes, s0: sharded_lightning(
            q,
            k,
            v,
            mesh=mesh,
            scan=scan,
            slopes=slopes,
            initial_state=s0,
            scale=SCALE,
            reverse=reverse,
            cu_seqlens=cu,
            return_state=True,
            implementation="xla",
        )
    )


SHARDED_RUNS = [
    ("ring", False, False),
    ("ring", True, True),
    ("tree", False, True),
    ("tree", True, False),
    ("allgather", False, False),
    ("allgather", True, True),
]


@pytest.mark.parametrize(
    "scan,packed,reverse",
    SHARDED_RUNS,
    ids=[f"{s}-{'packed' if p else 'batched'}-{'rev' if r else 'fwd'}" for s, p, r in SHARDED_RUNS],
)
def test_sharded_nonfinite_is_causal(scan, packed, reverse):
    check_causal(sharded_fn(scan, reverse, packed), reverse=reverse, packed=packed)


# ---- gradients: a NaN in q at token t reaches no dk, dv of a later token (processing order)

Q_BAD = (0, 40, 1)  # batch row, token, query head (of kv head 0)
GRAD_CASE = Case(B=1, T=64, H=2, Hkv=1, Dk=16)  # two 32-token pallas chunks, four 16-token shards


def grads(fn, q, k, v, slopes, s0):
    (o, s), pullback = jax.vjp(fn, q, k, v, slopes, s0)
    w_o = jax.random.normal(jax.random.PRNGKey(7), o.shape, jnp.float32)
    return pullback((w_o.astype(o.dtype), jnp.ones_like(s)))


def sharded_grad_fn(scan, reverse):
    mesh = make_mesh(seq=4, devices=jax.devices()[:4])
    return lambda q, k, v, slopes, s0: sharded_lightning(
        q,
        k,
        v,
        mesh=mesh,
        scan=scan,
        slopes=slopes,
        initial_state=s0,
        scale=SCALE,
        reverse=reverse,
        return_state=True,
        implementation="xla",
    )


GRAD_RUNS = {
    "xla-rev": lambda: backend_fn(xla, True, False),
    "pallas-fwd": lambda: backend_fn(pallas_tpu, False, False, block_sizes=pallas_tpu.BlockSizes(chunk=32)),
    "sharded-tree-rev": lambda: sharded_grad_fn("tree", True),
    "sharded-allgather-fwd": lambda: sharded_grad_fn("allgather", False),
}


def check_q_nan_gradient(fn, *, reverse, dtype=jnp.float32):
    """fn as in check_causal, not jitted; a NaN in q must reach no dk, dv of a later token."""
    grad_fn = jax.jit(functools.partial(grads, fn))
    x = make_inputs(GRAD_CASE, 3, with_state=True)
    x = dict(x, **{n: x[n].astype(dtype) for n in "qkv"})
    b, t, h = Q_BAD
    y = dict(x, q=x["q"].at[b, t, h, 5].set(np.nan))
    args = lambda d: (d["q"], d["k"], d["v"], d["slopes"], d["initial_state"])  # noqa: E731
    _, dk_fin, dv_fin, _, _ = (np.asarray(g.astype(jnp.float32)) for g in grad_fn(*args(x)))
    _, dk_bad, dv_bad, _, _ = (np.asarray(g.astype(jnp.float32)) for g in grad_fn(*args(y)))
    later = np.arange(GRAD_CASE.T) < t if reverse else np.arange(GRAD_CASE.T) > t
    for name, bad, fin in (("dk", dk_bad, dk_fin), ("dv", dv_bad, dv_fin)):
        assert np.all(np.isfinite(bad[b, later])), f"{name}: NaN of q at token {t} reached a later token"
        np.testing.assert_allclose(bad[b, later], fin[b, later], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("run", GRAD_RUNS)
def test_nan_in_q_reaches_no_later_key_gradient(run):
    # Only this direction is promised: with the intra-chunk products on zeroed copies, the NaN reaches
    # dk, dv of earlier tokens through the state gradient (earlier chunks, earlier shards) but not those
    # of earlier tokens in its own chunk.
    check_q_nan_gradient(GRAD_RUNS[run](), reverse=run.endswith("rev"))

"""Forward-mode autodiff (jax.jvp, jax.jacfwd): exact where the README says it works, our TypeError where
a custom backward rule (jax.custom_vjp) stands in the way."""

import jax
import jax.numpy as jnp
import pytest
from helpers import Case, assert_close, make_inputs, tolerance

import shardattn
from shardattn.meshes import make_mesh
from shardattn.sharded import sharded_lightning

SCALE = 0.7
CASE = Case(B=2, T=40, H=4, Hkv=2, Dk=8)
CU = jnp.asarray([0, 13, 40], jnp.int32)


def _inputs(packed=False):
    case = Case(B=1, T=40, H=4, Hkv=2, Dk=8) if packed else CASE
    x = make_inputs(case, 4, with_state=True, num_states=2 if packed else None)
    tangents = make_inputs(case, 5, with_state=True, num_states=2 if packed else None)
    names = ("q", "k", "v", "slopes", "initial_state")
    return tuple(x[n] for n in names), tuple(tangents[n] for n in names)


def _jvp(fn, packed=False, **kw):
    primals, tangents = _inputs(packed)

    def f(q, k, v, slopes, s0):
        return fn(q, k, v, slopes=slopes, initial_state=s0, scale=SCALE, return_state=True, **kw)

    return jax.jit(lambda p, t: jax.jvp(f, p, t))(primals, tangents)


def _ref_jvp(packed=False):
    kw = {"cu_seqlens": CU} if packed else {}
    return _jvp(shardattn.lightning_attention, packed, implementation="reference", **kw)


SUPPORTED = {
    "one-device-xla": (shardattn.lightning_attention, False, {"implementation": "xla"}),
    "batch-head-shards-xla": (sharded_lightning, False, {"mesh": make_mesh(data=2, seq=1, heads=4)}),
    "packed-seq-shards-xla": (sharded_lightning, True, {"mesh": make_mesh(seq=8), "cu_seqlens": CU}),
}


@pytest.mark.parametrize("path", SUPPORTED)
def test_jvp_matches_reference(path):
    fn, packed, kw = SUPPORTED[path]
    if fn is sharded_lightning:
        kw = dict(kw, implementation="xla")
    (o, s), (do, ds) = _jvp(fn, packed, **kw)
    (o_r, s_r), (do_r, ds_r) = _ref_jvp(packed)
    tol = tolerance(jnp.float32)
    assert_close("o", o, o_r, tol)
    assert_close("final_state", s, s_r, tol)
    assert_close("tangent of o", do, do_r, 2 * tol)
    assert_close("tangent of final_state", ds, ds_r, 2 * tol)


def test_jacfwd_of_slopes_matches_jacrev():
    (q, k, v, slopes, _), _ = _inputs()

    def f(slopes, impl):
        o = shardattn.lightning_attention(q, k, v, slopes=slopes, scale=SCALE, implementation=impl)
        return jnp.sum(o[:, -5:] ** 2, axis=(0, 1, 3))  # [H]

    fwd = jax.jit(jax.jacfwd(lambda s: f(s, "xla")))(slopes)
    rev = jax.jit(jax.jacrev(lambda s: f(s, "reference")))(slopes)
    assert_close("jacobian", fwd, rev, 2 * tolerance(jnp.float32))


REFUSED = {
    "seq-shards": (
        sharded_lightning,
        {"mesh": make_mesh(seq=8), "implementation": "xla"},
        r"sharded_lightning: forward-mode autodiff .* sequence shards \(mesh axis 'seq' of size 8\) "
        r"without cu_seqlens.*jax\.grad",
    ),
    "pallas-one-device": (
        shardattn.lightning_attention,
        {"implementation": "pallas"},
        r"lightning_attention: forward-mode autodiff .* Triton, Mosaic GPU and Pallas kernels .*'pallas'"
        r".*jax\.vjp",
    ),
    "pallas-batch-shards": (
        sharded_lightning,
        {"mesh": make_mesh(data=2, seq=1, heads=1, devices=jax.devices()[:2]), "implementation": "pallas"},
        r"sharded_lightning: forward-mode autodiff .* Triton, Mosaic GPU and Pallas kernels",
    ),
}


@pytest.mark.parametrize(
    "path,mode", [(p, "jvp") for p in REFUSED] + [("seq-shards", "jacfwd")], ids=lambda x: x
)
def test_forward_mode_is_refused_with_our_error(path, mode):
    fn, kw, match = REFUSED[path]
    (q, k, v, slopes, _), (dq, _, _, _, _) = _inputs()

    def f(q):
        return fn(q, k, v, slopes=slopes, scale=SCALE, **kw)

    with pytest.raises(TypeError, match=match):
        if mode == "jvp":
            jax.jvp(f, (q,), (dq,))
        else:
            jax.jacfwd(lambda x: f(q.at[0, 0, 0, 0].set(x)))(1.0)

"""API hygiene: checks of traced values (debug_checks), bool options, unused mesh axes, array-likes,
eager calls that do not retrace. Small shapes: these are about the API layer, not the maths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Case, assert_close, make_inputs, tolerance
from jax.experimental import checkify
from jax.sharding import Mesh

import shardattn
import shardattn.lightning as lightning
from shardattn.meshes import make_mesh

CASE = Case(B=1, T=16, H=2, Dk=8)
X = make_inputs(CASE, with_state=True)


def attention(q, k, v, slopes, cu_seqlens=None, initial_state=None):
    return shardattn.lightning_attention(
        q, k, v, slopes=slopes, cu_seqlens=cu_seqlens, initial_state=initial_state, implementation="xla"
    )


def sharded(q, k, v, slopes, cu_seqlens=None, initial_state=None):
    return shardattn.sharded_lightning(
        q, k, v, mesh=make_mesh(seq=8), slopes=slopes, cu_seqlens=cu_seqlens, initial_state=initial_state,
        implementation="xla",
    )  # fmt: skip


def primitive_counts(jaxpr, counts=None):
    """How often each primitive occurs in a jaxpr, nested jaxprs (jit, shard_map, custom_vjp) included."""
    counts = {} if counts is None else counts
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    primitive_counts(inner, counts)
    return counts


def primitives(jaxpr):
    """Names of every primitive in a jaxpr, nested jaxprs included."""
    return set(primitive_counts(jaxpr))


# ---------------------------------------------------------------------------------------------------
# Item 2: traced values, checked with checkify under shardattn.debug_checks.

GOOD_CU = jnp.array([0, 5, 16], jnp.int32)
BAD_VALUES = [
    ("slopes-negative", dict(slopes=jnp.array([-0.5, 0.1])), "slopes must be finite and >= 0"),
    ("slopes-nan", dict(slopes=jnp.array([jnp.nan, 0.1])), "slopes must be finite and >= 0"),
    ("cu-unsorted", dict(cu_seqlens=jnp.array([0, 20, 16])), "cu_seqlens must be non-decreasing"),
    ("cu-start", dict(cu_seqlens=jnp.array([2, 5, 16])), "cu_seqlens must start at 0"),
    ("cu-end", dict(cu_seqlens=jnp.array([0, 5, 12])), "cu_seqlens must end at seq=16"),
    ("state-inf", dict(initial_state=jnp.full((2, 2, 8, 8), jnp.inf)), "initial_state must be finite"),
]


def checked(fn):
    """jit(checkify(fn)) with slopes, cu_seqlens and initial_state as traced arguments (traced once)."""

    def f(slopes, cu_seqlens, initial_state):
        return fn(X["q"], X["k"], X["v"], slopes, cu_seqlens=cu_seqlens, initial_state=initial_state)

    good = dict(slopes=X["slopes"], cu_seqlens=GOOD_CU, initial_state=jnp.zeros((2, 2, 8, 8)))
    run = jax.jit(checkify.checkify(f))
    return lambda **bad: run(**(good | bad))[0].get()


@pytest.mark.parametrize("fn", [attention, sharded], ids=["lightning_attention", "sharded_lightning"])
def test_debug_checks_report_bad_traced_values(fn):
    with shardattn.debug_checks():  # on while tracing (the first call below)
        call = checked(fn)
        assert call() is None  # good values: no error
        for name, bad, message in BAD_VALUES:
            got = call(**bad)
            assert got is not None and message in got, (name, got)
    assert not shardattn.checks.debug_checks_enabled()  # the context manager restored the mode


def test_debug_checks_off_adds_nothing():
    # A fresh function per trace: the mode is read when tracing, and JAX caches traces per function.
    def function():
        return lambda slopes, cu_seqlens: attention(
            X["q"], X["k"], X["v"], slopes, cu_seqlens, initial_state=jnp.zeros((2, 2, 8, 8))
        )

    off = primitive_counts(jax.make_jaxpr(function())(X["slopes"], GOOD_CU).jaxpr)
    shardattn.debug_checks(True)  # the call form sets the mode until changed again
    try:
        on = primitive_counts(jax.make_jaxpr(function())(X["slopes"], GOOD_CU).jaxpr)
        # Under the mode, JAX refuses an unfunctionalised check under jit (nothing is skipped silently).
        with pytest.raises(ValueError, match="functionalized"):
            jax.jit(function())(X["slopes"], GOOD_CU)
    finally:
        shardattn.debug_checks(False)
    # Off, not even the predicates are traced: no check, and none of the predicates' is_finite and
    # reduce_and (the backend's own non-finite handling has is_finite ops of its own, in both traces).
    assert on.get("check", 0) > 0 and off.get("check", 0) == 0
    for name in ("is_finite", "reduce_and"):
        assert on.get(name, 0) > off.get(name, 0), (name, on.get(name), off.get(name))
    # Concrete values are always checked, debug mode or not.
    with pytest.raises(ValueError, match=">= 0"):
        attention(X["q"], X["k"], X["v"], jnp.array([-0.5, 0.1]))
    with pytest.raises(TypeError, match="enabled must be a bool"):
        shardattn.debug_checks("yes")


# ---------------------------------------------------------------------------------------------------
# Item 3: no silent fallbacks.


@pytest.mark.parametrize("fn", [shardattn.lightning_attention, shardattn.sharded_lightning])
@pytest.mark.parametrize("option,value", [("reverse", "no"), ("reverse", 1), ("return_state", "yes")])
def test_bool_options_must_be_bools(fn, option, value):
    kwargs = dict(mesh=make_mesh(seq=8)) if fn is shardattn.sharded_lightning else {}
    with pytest.raises(TypeError, match=f"{option} must be a bool"):
        fn(X["q"], X["k"], X["v"], slopes=X["slopes"], **{option: value}, **kwargs)


def test_mesh_without_default_axis_names_is_an_error():
    devices = np.array(jax.devices())
    mesh = Mesh(devices.reshape(2, 4), ("dp", "sp"))
    q, k, v = (jnp.zeros((2, 16, 2, 8)),) * 3
    call = lambda **kw: shardattn.sharded_lightning(q, k, v, mesh=mesh, slopes=X["slopes"], **kw)
    with pytest.raises(ValueError, match=r"\('dp', 'sp'\) would serve no role.*'dp': 2, 'sp': 4.*seq_axis="):
        call()
    with pytest.raises(ValueError, match=r"\('dp',\) would serve no role"):
        call(seq_axis="sp")  # the batch left at its default, which "dp" is not
    # Size-1 axes split nothing and are not reported; every role explicit means replication was chosen.
    call(batch_axis="dp", seq_axis="sp")
    call(batch_axis=(), seq_axis="sp", head_axis=())
    with pytest.raises(ValueError, match=r"\('data',\) would serve no role"):  # packed: batch 1
        shardattn.sharded_lightning(
            q[:1], k[:1], v[:1], mesh=make_mesh(data=2, seq=4), slopes=X["slopes"],
            cu_seqlens=jnp.array([0, 16]),
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Item 4: array-likes are accepted like arrays; other types are TypeErrors naming the argument.


@pytest.mark.parametrize("fn", [attention, sharded], ids=["lightning_attention", "sharded_lightning"])
def test_array_likes_are_accepted(fn):
    cu = [0, 5, 16]
    state = np.asarray(X["initial_state"][:1]).repeat(2, 0)
    want = fn(X["q"], X["k"], X["v"], X["slopes"], jnp.asarray(cu), jnp.asarray(state))
    lists = [np.asarray(X[n]).tolist() for n in ("q", "k", "v")]
    got = fn(*lists, np.asarray(X["slopes"]).tolist(), cu, state.tolist())
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    got = fn(*(np.asarray(X[n]) for n in ("q", "k", "v")), np.asarray(X["slopes"]), np.asarray(cu), state)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("q", dict(q="not an array")),
        ("k", dict(k={"k": 1})),
        ("cu_seqlens", dict(cu_seqlens="0,16")),
        ("initial_state", dict(initial_state=object())),
        ("slopes", dict(slopes=[[0.1], "x"])),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_other_types_are_type_errors(name, kwargs):
    args = dict(q=X["q"], k=X["k"], v=X["v"], slopes=X["slopes"]) | kwargs
    with pytest.raises(TypeError, match=f"{name} must be an array"):
        shardattn.lightning_attention(**args)


# ---------------------------------------------------------------------------------------------------
# Item 5: an eager call runs one cached jitted function: a second call with the same shapes and options
# does not trace again (timings are in the closing note, not asserted here).


def test_eager_calls_do_not_retrace():
    x = make_inputs(Case(B=1, T=24, H=2, Dk=8), with_state=True)  # shapes no other test uses
    call = lambda: shardattn.lightning_attention(
        x["q"], x["k"], x["v"], slopes=x["slopes"], initial_state=x["initial_state"], scale=0.5,
        return_state=True, implementation="xla",
    )  # fmt: skip
    before = lightning.TRACES[0]
    o1, s1 = call()
    assert lightning.TRACES[0] == before + 1
    o2, s2 = call()
    assert lightning.TRACES[0] == before + 1  # served from the cache
    np.testing.assert_array_equal(np.asarray(o1), np.asarray(o2))
    # ... and it is still the same maths: against the float32 reference.
    o_ref, s_ref = shardattn.lightning_attention(
        x["q"], x["k"], x["v"], slopes=x["slopes"], initial_state=x["initial_state"], scale=0.5,
        return_state=True, implementation="reference",
    )  # fmt: skip
    assert_close("o", o1, o_ref, tolerance(jnp.float32))
    assert_close("final_state", s1, s_ref, tolerance(jnp.float32))


def test_traced_calls_trace_the_backend_afresh(monkeypatch):
    # Under the caller's jit the backend is traced in place, not served from the eager cache: a change
    # to what the backend does (here: a wrapper that counts calls) is seen by every new trace.
    calls = []
    original = lightning.run_backends
    monkeypatch.setattr(lightning, "run_backends", lambda *a, **k: calls.append(1) or original(*a, **k))
    for _ in range(2):
        jax.jit(lambda q: attention(q, X["k"], X["v"], X["slopes"]))(X["q"])
    assert len(calls) == 2


def test_serving_accepts_array_likes():
    # lightning_decode / lightning_prefill take lists and numpy arrays like lightning_attention does.
    H, D, slots = 2, 8, 4
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    q, k, v = (jax.random.normal(key, (1, 6, H, D)) for key in keys[:3])
    cache = jax.random.normal(keys[3], (slots, H, D, D))
    slot_idx = jnp.array([2, 0], jnp.int32)
    cu = jnp.array([0, 2, 6], jnp.int32)
    kw = dict(slopes=X["slopes"], implementation="xla")
    as_list = lambda x: np.asarray(x).tolist()
    want = shardattn.lightning_prefill(q, k, v, cache, slot_idx, cu, **kw)
    got = shardattn.lightning_prefill(*map(as_list, (q, k, v, cache, slot_idx, cu)), **kw)
    want_d = shardattn.lightning_decode(q[0, :2], k[0, :2], v[0, :2], cache, slot_idx, **kw)
    got_d = shardattn.lightning_decode(*map(as_list, (q[0, :2], k[0, :2], v[0, :2], cache, slot_idx)), **kw)
    for a, b in zip((*got, *got_d), (*want, *want_d), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(TypeError, match="cache must be an array"):
        shardattn.lightning_decode(q[0, :2], k[0, :2], v[0, :2], "cache", slot_idx, **kw)

"""sharded_lightning on the 8 fake CPU devices: every mesh and scan against the single-device reference.

Sequence sharding reorders sums, so it gets the tolerance table; batch and head sharding must give the
unsharded same-backend result exactly. Gradients of q, k, v, initial_state and slopes everywhere.
"""

import collections
import functools
import re

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Case, assert_close, make_inputs, tolerance
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardattn
from shardattn.meshes import make_mesh, shard_qkv
from shardattn.sharded import sharded_lightning

# Backend of the sharded runs (the expected values always come from implementation="reference").
IMPL = "xla"
SCALE = 0.7
SCANS = ["ring", "tree", "allgather"]
# (data, seq, heads)
MESHES = [(1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]


def mesh_id(shape):
    return "x".join(map(str, shape))


# o, final state and all gradients of a random projection, under jit (helpers.run_with_grads)
run_with_grads = functools.partial(helpers.run_with_grads, scale=SCALE)


@functools.cache
def expected(case, seed, with_state, num_states, reverse, cu):
    """Reference results for make_inputs(case, seed, ...), cached across meshes and scans."""
    inputs = make_inputs(case, seed, with_state=with_state, num_states=num_states)
    ref_inputs = {n: x.astype(jnp.float32) for n, x in inputs.items()}
    cu_seqlens = None if cu is None else jnp.asarray(cu, jnp.int32)
    return run_with_grads(
        shardattn.lightning_attention, ref_inputs, reverse=reverse, cu_seqlens=cu_seqlens,
        implementation="reference",
    )  # fmt: skip


def check(case, mesh, *, seed=0, with_state=True, reverse=False, cu=None, report="", **kw):
    num_states = None if cu is None else len(cu) - 1
    inputs = make_inputs(case, seed, with_state=with_state, num_states=num_states)
    cu_seqlens = None if cu is None else jnp.asarray(cu, jnp.int32)
    o, s, g = run_with_grads(
        sharded_lightning,
        inputs,
        mesh=mesh,
        reverse=reverse,
        cu_seqlens=cu_seqlens,
        implementation=IMPL,
        **kw,
    )
    o_ref, s_ref, g_ref = expected(case, seed, with_state, num_states, reverse, cu)
    errors = {"o": assert_close("o", o, o_ref, tolerance(case.dtype))}
    errors["state"] = assert_close("final_state", s, s_ref, tolerance(case.dtype))
    for n in g:
        errors["d" + n] = assert_close("d" + n, g[n], g_ref[n], tolerance(case.dtype, grad=True))
    # Shown with pytest -s: the measured errors, for the record.
    print(f"\n{report}: " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()), end="")
    return o, s, g


def check_forward(case, mesh, *, report="", **kw):
    """Like check, output and final state only (a forward program compiles in a third of the time)."""
    x = make_inputs(case, 0, with_state=True)
    o, s = jax.jit(
        lambda q, k, v, slopes, s0: sharded_lightning(
            q, k, v, mesh=mesh, slopes=slopes, initial_state=s0, scale=SCALE, return_state=True,
            implementation=IMPL, **kw,
        )
    )(x["q"], x["k"], x["v"], x["slopes"], x["initial_state"])  # fmt: skip
    o_ref, s_ref, _ = expected(case, 0, True, None, False, None)
    errors = {"o": assert_close("o", o, o_ref, tolerance(case.dtype))}
    errors["state"] = assert_close("final_state", s, s_ref, tolerance(case.dtype))
    print(f"\n{report}: " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()), end="")
    return o, s


CASE = Case(B=2, T=64, H=4, Hkv=2, Dk=16, Dv=32)


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("shape", MESHES, ids=mesh_id)
def test_matches_reference(shape, scan):
    mesh = make_mesh(data=shape[0], seq=shape[1], heads=shape[2])
    check(CASE, mesh, scan=scan, report=f"{mesh_id(shape)} {scan}")


def test_batch_only_mesh():
    # (8, 1, 1): every batch row on its own device, no scan at all.
    check(Case(B=8, T=64, H=2, Dk=16), make_mesh(data=8, seq=1), report="8x1x1")


def test_bf16_without_initial_state():
    case = Case(B=2, T=128, H=2, Dk=16, dtype=jnp.bfloat16)
    o, _, _ = check(case, make_mesh(data=2, seq=4), scan="tree", with_state=False, report="bf16 2x4x1 tree")
    assert o.dtype == jnp.bfloat16


@pytest.mark.parametrize("scan", SCANS)
def test_reverse(scan):
    check(CASE, make_mesh(data=2, seq=4), scan=scan, reverse=True, report=f"reverse 2x4x1 {scan}")


def test_three_shards():
    # P = 3 is not a power of two (the tree's last round is partial) and 14 tokens per shard are not a
    # multiple of the XLA backend's chunk; also packed sequences in reverse on it.
    mesh = make_mesh(seq=3, devices=jax.devices()[:3])
    check(Case(B=1, T=42, H=2, Dk=16), mesh, scan="tree", report="P=3 tree")
    check(Case(B=1, T=42, H=2, Dk=16), mesh, scan="ring", cu=(0, 5, 17, 40, 42), reverse=True,
          report="P=3 varlen reverse ring")  # fmt: skip


def test_pallas_backend_inside_shard_map():
    """The Pallas kernels (TPU interpreter on CPU) under shard_map with check_vma=True."""
    case = Case(B=1, T=32, H=2, Dk=16)
    x = make_inputs(case)
    try:
        shardattn.lightning_attention(x["q"], x["k"], x["v"], slopes=x["slopes"], implementation="pallas")
    except NotImplementedError as err:
        pytest.skip(f"pallas backend unavailable here: {err}")
    mesh = make_mesh(seq=2, devices=jax.devices()[:2])
    o, s, g = run_with_grads(sharded_lightning, x, mesh=mesh, implementation="pallas")
    o_ref, s_ref, g_ref = expected(case, 0, False, None, False, None)
    assert_close("o", o, o_ref, tolerance(case.dtype))
    assert_close("final_state", s, s_ref, tolerance(case.dtype))
    for n in g:
        assert_close("d" + n, g[n], g_ref[n], tolerance(case.dtype, grad=True))


def test_one_dimensional_mesh_and_custom_names():
    # A mesh with only a sequence axis, under another name, and an unused extra axis on a second mesh.
    devices = np.array(jax.devices())
    seq_only = Mesh(devices, ("sp",))
    check(CASE, seq_only, seq_axis="sp", scan="tree", report="1-D sp=8 tree")
    custom = Mesh(devices.reshape(2, 2, 2), ("dp", "sp", "tp"))
    check_forward(CASE, custom, batch_axis="dp", seq_axis="sp", head_axis="tp", scan="ring",
                  report="dp2 x sp2 x tp2 ring")  # fmt: skip
    # "model" plays no role: replicated over it, on purpose (every role explicit; left at None, the
    # unused axis would be an error, tests/test_api.py).
    unused = Mesh(devices.reshape(4, 2), ("seq", "model"))
    check_forward(CASE, unused, batch_axis=(), seq_axis="seq", head_axis=(), scan="allgather",
                  report="seq4 x model2 allgather")  # fmt: skip


def test_batch_over_two_axes():
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("pod", "data", "seq"))
    o, s = check_forward(Case(B=4, T=64, H=2, Dk=16), mesh, batch_axis=("pod", "data"), scan="ring",
                         report="batch over (pod, data), seq 2")  # fmt: skip
    assert o.sharding.spec[0] == ("pod", "data")


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 1, 4)], ids=mesh_id)
def test_batch_and_head_sharding_is_exact(shape):
    """Without a sequence axis each device runs the single-device backend on its own rows and heads:
    the same output and final state, bit for bit."""
    case = Case(B=8, T=64, H=8, Hkv=4, Dk=16)
    inputs = make_inputs(case, with_state=True)
    mesh = make_mesh(data=shape[0], seq=shape[1], heads=shape[2])
    o, s, g = run_with_grads(sharded_lightning, inputs, mesh=mesh, implementation=IMPL)
    o_1, s_1, g_1 = run_with_grads(shardattn.lightning_attention, inputs, implementation=IMPL)
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o_1))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_1))
    # Gradients: XLA compiles the backward of a batch-1 (or 2-head) program with other fusions than the
    # batch-8 one (dq differs in the last bit), and d slopes is a psum across devices, which adds in
    # another order; so these are equal to float32 rounding, not bitwise.
    for n in g:
        assert_close("d" + n, g[n], g_1[n], 1e-6)


@pytest.mark.parametrize(
    "shape,case",
    [((1, 2, 4), Case(B=1, T=64, H=4, Hkv=2, Dk=16)), ((2, 1, 4), Case(B=2, T=64, H=4, Hkv=1, Dk=16))],
    ids=lambda x: mesh_id(x) if isinstance(x, tuple) else x.id,
)
def test_fewer_kv_heads_than_head_shards(shape, case):
    """GQA/MQA with Hkv < head shards: k, v replicated over the head axis, each shard slices its kv head."""
    mesh = make_mesh(data=shape[0], seq=shape[1], heads=shape[2])
    check(case, mesh, scan="tree", report=f"{mesh_id(shape)} {case.id}")


# Packed sequences crossing shard boundaries (4 shards of 16 tokens at T = 64): "many" has several
# starts in shard 0 and 2, an empty sequence, one spanning shards 1-2, and one spanning two whole shards
# plus pieces; "edges" has starts exactly on shard boundaries and empty sequences at both ends.
VARLEN = {
    "many": (0, 3, 5, 5, 20, 37, 40, 41, 64),
    "long": (0, 7, 60, 64),
    "edges": (0, 0, 16, 32, 33, 48, 64, 64),
    "one": (0, 64),
}


# The scans see only (a, S) pairs, so the packing logic (which differs by direction and layout) is
# what needs the cases: every layout in both directions, every scan at least twice (compile time).
VARLEN_RUNS = [
    ("ring", "many", False),
    ("tree", "many", True),
    ("allgather", "many", False),
    ("allgather", "long", True),
    ("tree", "long", False),
    ("ring", "edges", True),
    ("tree", "edges", False),
    ("allgather", "one", True),
]


@pytest.mark.parametrize("scan,layout,reverse", VARLEN_RUNS, ids=["-".join(map(str, r)) for r in VARLEN_RUNS])
def test_varlen(scan, layout, reverse):
    offsets = VARLEN[layout]
    case = Case(B=1, T=64, H=4, Hkv=2, Dk=16)
    mesh = make_mesh(seq=4, heads=2)
    check(case, mesh, scan=scan, cu=offsets, reverse=reverse, report=f"varlen {offsets} {scan} {reverse=}")


def test_varlen_eight_shards_and_traced_offsets():
    """cu_seqlens as a traced jit argument (values unknown at trace time), 8 shards of 8 tokens."""
    case = Case(B=1, T=64, H=2, Dk=16)
    offsets = (0, 2, 3, 30, 31, 64)
    x = make_inputs(case, with_state=True, num_states=len(offsets) - 1)
    mesh = make_mesh(seq=8)

    @jax.jit
    def f(cu):
        return sharded_lightning(x["q"], x["k"], x["v"], mesh=mesh, slopes=x["slopes"], scale=SCALE,
                                 initial_state=x["initial_state"], cu_seqlens=cu, return_state=True,
                                 implementation=IMPL)  # fmt: skip

    o, s = f(jnp.asarray(offsets, jnp.int32))
    o_ref, s_ref, _ = expected(case, 0, True, len(offsets) - 1, False, offsets)
    assert_close("o", o, o_ref, tolerance(case.dtype))
    assert_close("final_state", s, s_ref, tolerance(case.dtype))


# ---------------------------------------------------------------------------------------------------
# What moves between devices: read the compiled HLO.

COLLECTIVE = re.compile(
    r"= (\(?[a-z0-9]+\[[^=]*?\]\S*\)?) (all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)"
    r"(?:-start)?\("
)


def collectives(hlo):
    """[(op, element count of its result)] for every collective in an HLO text."""
    found = []
    for m in COLLECTIVE.finditer(hlo):
        shapes = re.findall(r"[a-z0-9]+\[([0-9,]*)\]", m.group(1))
        count = sum(int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes)
        found.append((m.group(2), count))
    return found


@pytest.mark.parametrize("scan", SCANS)
def test_only_states_move(scan):
    case = Case(B=2, T=512, H=2, Dk=16)
    x = make_inputs(case, with_state=True)
    mesh = make_mesh(data=2, seq=4)
    q, k, v = (shard_qkv(x[n], mesh) for n in "qkv")
    s0 = jax.device_put(x["initial_state"], NamedSharding(mesh, P("data")))

    def fwd(q, k, v, slopes, s0):
        return sharded_lightning(q, k, v, mesh=mesh, scan=scan, slopes=slopes, initial_state=s0,
                                 return_state=True, implementation=IMPL)  # fmt: skip

    def loss(*args):
        o, s = fwd(*args)
        return jnp.sum(o**2) + jnp.sum(s**2)

    local_state = (case.B // 2) * case.H * case.Dk * case.Dk
    local_qkv = (case.B // 2) * (case.T // 4) * case.H * case.Dk
    assert 4 * local_state < local_qkv  # so that the size bound below tells states from q, k, v, o
    for name, f in (("forward", fwd), ("grad", jax.grad(loss, argnums=range(5)))):
        hlo = jax.jit(f).lower(q, k, v, x["slopes"], s0).compile().as_text()
        ops = collectives(hlo)
        print(f"\n{scan} {name}: {collections.Counter(op for op, _ in ops)}", end="")
        kinds = {op for op, _ in ops}
        assert "all-to-all" not in kinds, ops
        for op, count in ops:  # at most the 4 gathered states of the sequence axis
            assert count <= 4 * local_state, f"{name}: {op} moves {count} elements: {ops}"
        if scan in ("ring", "tree"):
            assert "collective-permute" in kinds and "all-gather" not in kinds, ops
            permutes = [n for op, n in ops if op == "collective-permute"]
            # One state per round (the decays are known locally without packed sequences): forward
            # P-1 = 3 rounds for ring, log2(P) = 2 for tree; the backward mirrors them.
            assert permutes == [local_state] * {"ring": 3, "tree": 2}[scan] * (1 if name == "forward" else 2)
        else:
            assert "collective-permute" not in kinds, ops
            # Once, the states; the backward gathers the state gradients once more (the mirrored scan).
            gathers = [n for op, n in ops if op == "all-gather"]
            assert gathers == [4 * local_state] * (1 if name == "forward" else 2), ops


# ---------------------------------------------------------------------------------------------------
# The zigzag layout (the order sharded_attention balances causal softmax in): data arrive reordered.


def _zigzag_lightning(mesh):
    """sharded_lightning(layout="zigzag") on data in the original order: to_zigzag in, from_zigzag out."""
    from shardattn.meshes import from_zigzag, to_zigzag

    def fn(q, k, v, **kw):
        q, k, v = (to_zigzag(x, mesh) for x in (q, k, v))
        o, s = sharded_lightning(q, k, v, mesh=mesh, layout="zigzag", **kw)
        return from_zigzag(o, mesh), s

    return fn


@pytest.mark.parametrize(
    "shape,reverse",
    [((2, 4, 1), False), ((1, 8, 1), True), ((1, 4, 2), False)],
    ids=["2x4x1", "1x8x1-rev", "1x4x2"],
)
def test_zigzag_layout_matches_reference(shape, reverse):
    mesh = make_mesh(data=shape[0], seq=shape[1], heads=shape[2])
    inputs = make_inputs(CASE, 0, with_state=True)
    o, s, g = run_with_grads(_zigzag_lightning(mesh), inputs, reverse=reverse, implementation=IMPL)
    o_ref, s_ref, g_ref = expected(CASE, 0, True, None, reverse, None)
    errors = {"o": assert_close("o", o, o_ref, tolerance(CASE.dtype))}
    errors["state"] = assert_close("final_state", s, s_ref, tolerance(CASE.dtype))
    for n in g:
        errors["d" + n] = assert_close("d" + n, g[n], g_ref[n], tolerance(CASE.dtype, grad=True))
    print(
        f"\nzigzag {mesh_id(shape)} reverse={reverse}: " + " ".join(f"{k}={v:.1e}" for k, v in errors.items())
    )


def test_zigzag_layout_moves_only_states():
    case = Case(B=2, T=512, H=2, Dk=16)
    x = make_inputs(case, with_state=True)
    mesh = make_mesh(data=2, seq=4)
    q, k, v = (shard_qkv(x[n], mesh) for n in "qkv")

    def loss(q, k, v, slopes):
        o = sharded_lightning(q, k, v, mesh=mesh, slopes=slopes, layout="zigzag", implementation=IMPL)
        return jnp.sum(o**2)

    hlo = jax.jit(jax.grad(loss, argnums=range(4))).lower(q, k, v, x["slopes"]).compile().as_text()
    ops = collectives(hlo)
    local_state = (case.B // 2) * case.H * case.Dk * case.Dk
    # One all-gather of the 2 chunk states of each of the 4 shards forward, one of the state gradients
    # backward; nothing of q, k, v or o's size moves (no permute, no all-to-all).
    assert [n for op, n in ops if op == "all-gather"] == [2 * 4 * local_state] * 2, ops
    assert {op for op, _ in ops} <= {"all-gather", "all-reduce"}, ops
    assert all(n <= 8 * local_state for _, n in ops), ops


# ---------------------------------------------------------------------------------------------------
# Meshes from jax.make_mesh (Explicit axes) and jax.sharding.Mesh (Auto), eager and jitted; training.


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_explicit_and_auto_meshes(axis_type):
    case = Case(B=2, T=64, H=2, Dk=16)
    x = make_inputs(case)
    if axis_type == "explicit":
        mesh = jax.make_mesh((2, 4), ("data", "seq"))  # Explicit by default
        assert mesh.axis_types[0] == jax.sharding.AxisType.Explicit
    else:
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "seq"))
    o_ref = shardattn.lightning_attention(
        x["q"], x["k"], x["v"], slopes=x["slopes"], implementation="reference"
    )
    call = functools.partial(sharded_lightning, mesh=mesh, slopes=x["slopes"], implementation=IMPL)
    # Inputs placed otherwise: q over seq only, k on one device, v not placed (eagerly); under jit, q
    # placed otherwise (jit itself refuses committed arguments on different device sets).
    q = jax.device_put(x["q"], NamedSharding(mesh, P(None, "seq")))
    eager = call(q, jax.device_put(x["k"], jax.devices()[3]), np.asarray(x["v"]))
    jitted = jax.jit(call)(q, x["k"], x["v"])
    for o in (eager, jitted):
        assert_close("o", o, o_ref, tolerance(case.dtype))
        assert o.sharding.spec[:2] == ("data", "seq")
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


def test_jitted_training_step():
    """A jitted SGD step on NamedSharding inputs: projections -> sharded lightning -> loss, jax.grad."""
    B, T, E, H, D = 2, 64, 16, 2, 8
    mesh = make_mesh(data=2, seq=4)
    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    params = {
        "w_qkv": jax.random.normal(keys[0], (E, 3, H, D)) / np.sqrt(E),
        "slopes": jnp.array([0.1, 0.7]),
    }
    x = jax.device_put(jax.random.normal(keys[1], (B, T, E)), NamedSharding(mesh, P("data", "seq")))
    target = jax.device_put(jax.random.normal(keys[2], (B, T, H, D)), NamedSharding(mesh, P("data", "seq")))

    def loss(params, x, target, attention, **kw):
        qkv = jnp.einsum("bte,ekhd->kbthd", x, params["w_qkv"])
        o = attention(qkv[0], qkv[1], qkv[2], slopes=params["slopes"], **kw)
        return jnp.mean((o - target) ** 2)

    def step(params, x, target, attention, **kw):
        value, grads = jax.value_and_grad(loss)(params, x, target, attention, **kw)
        return value, grads, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    sharded_step = jax.jit(
        functools.partial(step, attention=sharded_lightning, mesh=mesh, implementation=IMPL)
    )
    value, grads, new_params = sharded_step(params, x, target)
    value2, _, _ = sharded_step(new_params, x, target)  # the step runs again on its own output
    ref_value, ref_grads, _ = jax.jit(
        functools.partial(step, attention=shardattn.lightning_attention, implementation="reference")
    )(params, x, target)
    assert_close("loss", value, ref_value, tolerance(jnp.float32))
    for n in params:
        assert_close("d" + n, grads[n], ref_grads[n], tolerance(jnp.float32, grad=True))
    assert value2 < value


# ---------------------------------------------------------------------------------------------------
# Errors: raised before anything is traced, naming the axis and the sizes.


def _bad_calls():
    mesh = make_mesh(data=2, seq=2, heads=2)
    q = jnp.zeros((2, 8, 4, 16))
    kv = jnp.zeros((2, 8, 2, 16))
    ok = dict(mesh=mesh, slopes=jnp.ones(4))
    return [
        ("axis-typo", ValueError, "'sequence' is not an axis", (q, kv, kv), dict(ok, seq_axis="sequence")),
        ("batch-typo", ValueError, "'dta' is not an axis", (q, kv, kv), dict(ok, batch_axis=("dta",))),
        # (a length the seq axis does not divide is padded: tests/test_padding.py)
        ("heads-divisible", ValueError, r"num_heads \(q\)=3 must be divisible .* 'heads', 2",
         (jnp.zeros((2, 8, 3, 16)), kv[:, :, :1], kv[:, :, :1]), dict(ok, slopes=jnp.ones(3))),
        ("kv-heads-divisible", ValueError, r"num_kv_heads \(k, v\)=3 must be .* 'heads', 2, or divide",
         (jnp.zeros((2, 8, 6, 16)), jnp.zeros((2, 8, 3, 16)), jnp.zeros((2, 8, 3, 16))),
         dict(ok, slopes=jnp.ones(6))),
        ("batch-divisible", ValueError, r"batch=1 must be divisible .* 'data', 2",
         (q[:1], kv[:1], kv[:1]), ok),
        ("scan-name", ValueError, "scan='linear'", (q, kv, kv), dict(ok, scan="linear")),
        ("one-role-per-axis", ValueError, "only one role", (q, kv, kv), dict(ok, head_axis="seq")),
        ("mesh-type", TypeError, "jax.sharding.Mesh", (q, kv, kv), dict(ok, mesh="seq")),
        # check_and_derive on the global shapes comes first.
        ("slopes-shape", ValueError, "slopes must have shape", (q, kv, kv), dict(ok, slopes=jnp.ones(2))),
        ("state-shape", ValueError, "initial_state", (q, kv, kv),
         dict(ok, initial_state=jnp.zeros((2, 2, 16, 16)))),
        ("varlen-batch-axis", ValueError, "batch=1 must be divisible", (q[:1], kv[:1], kv[:1]),
         dict(ok, batch_axis="data", cu_seqlens=jnp.array([0, 8]))),
        ("layout-name", ValueError, "layout='ring'", (q, kv, kv), dict(ok, layout="ring")),
        ("zigzag-divisible", ValueError, r"T=6 must be divisible by 2 x .* 'seq' \(2\)",
         (q[:, :6], kv[:, :6], kv[:, :6]), dict(ok, layout="zigzag")),
        ("zigzag-scan", ValueError, "scan='ring' is not served", (q, kv, kv),
         dict(ok, layout="zigzag", scan="ring")),
        ("zigzag-packed", NotImplementedError, "cu_seqlens", (q[:1], kv[:1], kv[:1]),
         dict(ok, batch_axis=(), seq_axis="seq", head_axis="heads", layout="zigzag",
              cu_seqlens=jnp.array([0, 3, 8]))),
    ]  # fmt: skip


@pytest.mark.parametrize("name,exc,match,args,kwargs", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_is_rejected(name, exc, match, args, kwargs, monkeypatch):
    # Nothing may reach a kernel: validation happens on the global shapes before shard_map traces.
    import shardattn.sharded as sharded

    def no_kernel(*a, **k):
        raise AssertionError("a kernel was traced before the arguments were checked")

    monkeypatch.setattr(sharded, "run_backends", no_kernel)
    with pytest.raises(exc, match=match):
        sharded_lightning(*args, **kwargs)


def test_auto_scan_choice():
    from shardattn.sharded import choose_scan

    assert choose_scan("auto", 4, 2**20) == "allgather"
    assert choose_scan("auto", 64, 2**20) == "tree"
    assert choose_scan("auto", 8, 2**30) == "tree"  # gathered states would not fit comfortably
    assert choose_scan("ring", 64, 2**20) == "ring"
    # scan="auto" runs end to end in test_explicit_and_auto_meshes and examples/quickstart.py.

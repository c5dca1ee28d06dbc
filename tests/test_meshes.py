"""shardattn.meshes: make_mesh, axis roles, partition specs and placement, on the 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardattn.meshes import make_mesh, qkv_spec, resolve_axes, shard_qkv, state_spec


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        ({}, (1, 8, 1)),
        ({"data": 2}, (2, 4, 1)),
        ({"data": 2, "seq": 2, "heads": 2}, (2, 2, 2)),
        ({"seq": 4, "heads": 2}, (1, 4, 2)),
        ({"data": 8, "seq": 1}, (8, 1, 1)),
        ({"data": 2, "seq": 2, "heads": -1}, (2, 2, 2)),
    ],
    ids=str,
)
def test_make_mesh_shapes(kwargs, shape):
    mesh = make_mesh(**kwargs)
    assert mesh.axis_names == ("data", "seq", "heads")
    assert tuple(mesh.shape.values()) == shape
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))  # every device exactly once


def test_make_mesh_on_a_subset_of_devices():
    devices = jax.devices()[4:]
    mesh = make_mesh(data=2, devices=devices)
    assert tuple(mesh.shape.values()) == (2, 2, 1)
    assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"data": 3}, r"8 devices cannot be split"),
        ({"data": 2, "seq": 2}, r"= 4 devices does not match the 8 devices"),
        ({"data": 2, "seq": 8}, r"= 16 devices does not match the 8 devices"),
        ({"data": -1, "seq": -1}, r"at most one axis size may be -1"),
        ({"seq": 0}, r"seq=0 must be a positive int or -1"),
        ({"heads": 2.0}, r"heads=2.0 must be a positive int"),
    ],
    ids=str,
)
def test_make_mesh_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(**kwargs)


def test_specs_follow_roles():
    mesh = make_mesh(data=2, seq=2, heads=2)
    assert qkv_spec(mesh) == P("data", "seq", "heads", None)
    assert qkv_spec(mesh, head_axis=()) == P("data", "seq", None, None)  # () = unsharded on purpose
    assert qkv_spec(mesh, batch_axis=("data", "heads"), head_axis=()) == P(
        ("data", "heads"), "seq", None, None
    )
    assert state_spec(mesh) == P("data", "heads", None, None)  # replicated over seq
    assert state_spec(mesh, packed=True) == P(None, "heads", None, None)  # one entry per packed sequence
    # A mesh without the conventional names: None means unsharded; explicit names are used.
    custom = Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "sp"))
    assert qkv_spec(custom) == P(None, None, None, None)
    assert qkv_spec(custom, batch_axis="dp", seq_axis="sp") == P("dp", "sp", None, None)
    assert resolve_axes(custom, batch_axis="dp", seq_axis="sp") == (("dp",), "sp", None)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"seq_axis": "sequence"}, ValueError, r"seq_axis='sequence' is not an axis of the mesh"),
        ({"batch_axis": ("data", "dat")}, ValueError, r"batch_axis='dat' is not an axis"),
        ({"head_axis": "seq"}, ValueError, r"only one role"),
        ({"seq_axis": 1}, TypeError, r"must be a mesh axis name"),
    ],
    ids=str,
)
def test_spec_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        qkv_spec(make_mesh(data=2, seq=2, heads=2), **kwargs)


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_shard_qkv_places_data(axis_type):
    x = np.random.default_rng(0).standard_normal((2, 16, 4, 8)).astype(np.float32)
    if axis_type == "auto":
        mesh = make_mesh(data=2, seq=2, heads=2)
    else:
        mesh = jax.make_mesh((2, 2, 2), ("data", "seq", "heads"))  # Explicit axes
    want = NamedSharding(mesh, P("data", "seq", "heads", None))
    placed = shard_qkv(x, mesh)
    assert placed.sharding.is_equivalent_to(want, 4)
    assert placed.addressable_shards[0].data.shape == (1, 8, 2, 8)
    np.testing.assert_array_equal(np.asarray(placed), x)
    # Re-placing an array placed otherwise, eagerly and inside jit (there: a sharding constraint).
    other = jax.device_put(x, NamedSharding(mesh, P(None, "heads")))
    np.testing.assert_array_equal(np.asarray(shard_qkv(other, mesh)), x)
    jitted = jax.jit(lambda y: shard_qkv(y * 2.0, mesh))(other)
    assert jitted.sharding.is_equivalent_to(want, 4)
    np.testing.assert_array_equal(np.asarray(jitted), 2.0 * x)


def test_shard_qkv_on_one_device_array():
    mesh = make_mesh(seq=8)
    x = jax.device_put(jnp.arange(2 * 16 * 2 * 4, dtype=jnp.float32).reshape(2, 16, 2, 4), jax.devices()[5])
    placed = shard_qkv(x, mesh)
    assert placed.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "seq")), 4)
    assert {s.data.shape for s in placed.addressable_shards} == {(2, 2, 2, 4)}
    np.testing.assert_array_equal(np.asarray(placed), np.asarray(x))


def test_zigzag_layout_round_trip():
    from shardattn.meshes import from_zigzag, to_zigzag, zigzag_order

    mesh = make_mesh(data=2, seq=4)
    assert zigzag_order(4).tolist() == [0, 7, 1, 6, 2, 5, 3, 4]
    x = np.random.default_rng(0).standard_normal((2, 16, 3, 5)).astype(np.float32)
    zz = to_zigzag(x, mesh)
    # Shard r of the reordered sequence holds chunks r and 2P-1-r of 2 tokens each.
    chunks = x.reshape(2, 8, 2, 3, 5)
    for r in range(4):
        np.testing.assert_array_equal(np.asarray(zz[:, 4 * r : 4 * r + 2]), chunks[:, r])
        np.testing.assert_array_equal(np.asarray(zz[:, 4 * r + 2 : 4 * r + 4]), chunks[:, 7 - r])
    np.testing.assert_array_equal(np.asarray(from_zigzag(zz, mesh)), x)
    # Under jit, on [B, T] token arrays, on another axis (a bias's key dimension), custom axis names.
    tokens = np.arange(32).reshape(2, 16)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda t: from_zigzag(to_zigzag(t, mesh), mesh))(tokens)), tokens
    )
    bias = np.random.default_rng(1).standard_normal((1, 2, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(to_zigzag(bias, mesh, axis=3)[..., 2:4]), bias[..., 14:16])
    custom = Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "sp"))
    np.testing.assert_array_equal(np.asarray(to_zigzag(x, custom, "sp")), np.asarray(zz))
    # A mesh without a sequence axis: one shard, nothing moves.
    np.testing.assert_array_equal(np.asarray(to_zigzag(x, custom)), x)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((np.zeros((2, 12)),), {}, r"x.shape\[1\]=12 \(the sequence\) must be divisible by 2 \* \(size"),
        ((np.zeros((2, 16)),), {"axis": 2}, r"axis=2 must be an int naming a dimension"),
        ((np.zeros((2, 16)), "sequence"), {}, r"seq_axis='sequence' is not an axis of the mesh"),
    ],
    ids=str,
)
def test_zigzag_errors(args, kwargs, match):
    from shardattn.meshes import to_zigzag

    with pytest.raises(ValueError, match=match):
        to_zigzag(args[0], make_mesh(data=2, seq=4), *args[1:], **kwargs)

"""Sequence lengths the sequence axis does not divide: sharded_lightning pads inside, exactly.

Outputs, final states and every gradient against the unpadded single-device reference, on the 8 fake
CPU devices; shard_qkv refuses such lengths with our error.
"""

import jax
import numpy as np
import pytest
from helpers import Case, assert_close, make_inputs, tolerance
from test_sharded import SCALE, check, mesh_id

import shardattn
from shardattn.meshes import make_mesh, shard_qkv
from shardattn.sharded import sharded_lightning

# (case, mesh (data, seq, heads), scan, reverse, with initial state, cu_seqlens)
PADDED = [
    # 3 pad tokens at the end; MQA on 2 head shards: k, v replicated over heads, each slices its kv head
    (Case(B=2, T=61, H=4, Hkv=1, Dk=16), (1, 4, 2), "allgather", False, True, None),
    # reverse: 7 pad tokens at the front, filling 3.5 of the 8 shards (1 real token per full shard)
    (Case(B=1, T=9, H=2, Dk=16), (1, 8, 1), "tree", True, True, None),
    # packed (with an empty sequence), reverse, GQA: the pads form a fourth sequence
    (Case(B=1, T=61, H=4, Hkv=2, Dk=16), (1, 8, 1), "ring", True, True, (0, 20, 20, 61)),
]


def _id(run):
    case, shape, scan, reverse, state, cu = run
    return "-".join(
        [case.id, mesh_id(shape), scan, "rev" if reverse else "fwd", "s0" if state else "zero"]
        + (["packed"] if cu else [])
    )


@pytest.mark.parametrize("run", PADDED, ids=[_id(r) for r in PADDED])
def test_padded_sequence_matches_unpadded_reference(run):
    case, shape, scan, reverse, with_state, cu = run
    mesh = make_mesh(data=shape[0], seq=shape[1], heads=shape[2])
    # o, final state and the gradients of q, k, v, slopes (and initial_state) against the reference
    check(case, mesh, with_state=with_state, reverse=reverse, cu=cu, scan=scan, report=_id(run))


def test_long_odd_length_forward():
    # T = 1001 on 8 shards (7 pad tokens at the front: reverse), GQA, o only (return_state=False takes
    # its own exit; the final state and the gradients are checked above at T = 61 and 9: the
    # reference's 1001-step token loop is slow to differentiate).
    case = Case(B=1, T=1001, H=4, Hkv=2, Dk=16)
    x = make_inputs(case, 2, with_state=True)
    mesh = make_mesh(seq=8)
    kw = dict(slopes=x["slopes"], initial_state=x["initial_state"], scale=SCALE, reverse=True)
    o = sharded_lightning(x["q"], x["k"], x["v"], mesh=mesh, scan="tree", implementation="xla", **kw)
    o_ref = shardattn.lightning_attention(x["q"], x["k"], x["v"], implementation="reference", **kw)
    assert_close("o", o, o_ref, tolerance(case.dtype))


def test_padded_on_explicit_mesh_eager_and_jitted():
    # jax.make_mesh's Explicit axes: the padded output is gathered over "seq" before it is sliced.
    case = Case(B=2, T=61, H=2, Dk=8)
    x = make_inputs(case, 3, with_state=True)
    mesh = jax.make_mesh((2, 4), ("data", "seq"))
    kw = dict(slopes=x["slopes"], initial_state=x["initial_state"], scale=SCALE, return_state=True)
    o_ref, s_ref = shardattn.lightning_attention(x["q"], x["k"], x["v"], implementation="reference", **kw)
    run = lambda q, k, v: sharded_lightning(q, k, v, mesh=mesh, implementation="xla", **kw)  # noqa: E731
    for how, fn in (("eager", run), ("jit", jax.jit(run))):
        o, s = fn(x["q"], x["k"], x["v"])
        assert_close(f"o ({how})", o, o_ref, tolerance(case.dtype))
        assert_close(f"final_state ({how})", s, s_ref, tolerance(case.dtype))


def test_shard_qkv_refuses_lengths_the_axis_does_not_divide():
    mesh = make_mesh(data=2, seq=4)
    x = np.zeros((2, 1001, 4, 8), np.float32)
    with pytest.raises(ValueError, match=r"seq=1001 .* mesh axis 'seq', 4; pass the arrays unplaced"):
        shard_qkv(x, mesh)
    with pytest.raises(ValueError, match=r"batch=3 .* mesh axis 'data', 2; leave that role unsharded"):
        shard_qkv(np.zeros((3, 1000, 4, 8), np.float32), mesh)

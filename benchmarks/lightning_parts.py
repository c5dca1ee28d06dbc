"""Where the Triton lightning forward+backward spends its time: each launch group timed on its own.

    python benchmarks/lightning_parts.py --workloads b4-t8k-h16-d128,b1-t32k-h16-d128 --out parts.json

Parts, each a jitted call of the backend's own internals on the same inputs (wall time of back-to-back
calls, one executable each): the plain forward; the differentiated forward (also writes S_in of every
chunk); the backward's G walk; the whole chunk-parallel backward given those states (G walk + the
chunk kernel + the JAX sums); and jax.vjp of the whole. Beside each, its HBM floor: the bytes it must
move at least over the copy bandwidth measured in the same run.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lightning import LAYER_IDX, NUM_LAYERS, _inputs  # noqa: E402
from timing import add_run_arguments  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def parts(w, warmup, rounds, inner):
    import jax
    import jax.numpy as jnp
    from timing import time_call

    import shardattn
    from shardattn.kernels.lightning import triton as tri

    q, k, v, do = _inputs(w)
    slopes = jnp.asarray(shardattn.decay_slopes(w.H, LAYER_IDX, NUM_LAYERS), jnp.float32)
    scale = w.D**-0.5
    opts = tri.Options(scale=scale, reverse=False)
    blocks = tri.BlockSizes.get_default(w.D, w.D, q.dtype)
    state_dtype = tri._state_dtype(q.dtype)

    def fwd(q, k, v):
        return tri._lightning(q, k, v, slopes, None, None, opts)[0]

    def fwd_states(q, k, v):
        o, _, st = tri._forward_pass(q, k, v, slopes, None, None, scale=scale, reverse=False,
                                     store_states=True, out_dtype=q.dtype, blocks=blocks,
                                     state_dtype=state_dtype)
        return o, st

    dfinal = jnp.zeros((w.B, w.H, w.D, w.D), jnp.float32)

    def g_walk(q, do):
        return tri._g_walk(opts, blocks, q, do, slopes, dfinal, None, state_dtype)

    def backward(q, k, v, do, states):
        return tri._bwd_parallel(opts, blocks, q, k, v, slopes, None, None, do, dfinal, states)[:3]

    def fwd_bwd(q, k, v, do):
        attn = lambda q, k, v: tri.lightning_attention(q, k, v, slopes, scale=scale)[0]  # noqa: E731
        o, pullback = jax.vjp(attn, q, k, v)
        return pullback(do)

    _, states = jax.jit(fwd_states)(q, k, v)
    t = lambda fn, *args: time_call(jax.jit(fn), *args, warmup=warmup, repeats=rounds, inner=inner)
    itemsize = jnp.dtype(q.dtype).itemsize
    unit = w.B * w.T * w.H * w.D * itemsize  # one [B, T, H, D] tensor
    state_bytes = states.size * states.dtype.itemsize
    gstate_bytes = state_bytes  # G of every chunk: same shape and dtype
    row = {
        "fwd_ms": t(fwd, q, k, v),
        "fwd_states_ms": t(fwd_states, q, k, v),
        "g_walk_ms": t(g_walk, q, do),
        "backward_ms": t(backward, q, k, v, do, states),
        "fwd_bwd_ms": t(fwd_bwd, q, k, v, do),
        # bytes each part must move at least
        "fwd_bytes": 4 * unit,
        "fwd_states_bytes": 4 * unit + state_bytes,
        "g_walk_bytes": 2 * unit + gstate_bytes,
        # G walk, then the chunk kernel: q, k, v, dO, S_in, G read; dq, dk, dv written
        "backward_bytes": 2 * unit + gstate_bytes + 7 * unit + state_bytes + gstate_bytes,
    }
    row["chunk_kernel_ms"] = row["backward_ms"] - row["g_walk_ms"]
    row["chunk_kernel_bytes"] = 7 * unit + state_bytes + gstate_bytes
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, "b4-t8k-h16-d128,b1-t32k-h16-d128,b8-t4k-h32-d64")
    args = p.parse_args(argv)

    import jax
    from timing import copy_bandwidth_gbs, environment

    bw = copy_bandwidth_gbs()
    rows = []
    for name in [n for n in args.workloads.split(",") if n]:
        row = {"workload": name, **parts(WORKLOADS[name], args.warmup, args.rounds, args.inner)}
        rows.append(row)
    print(f"{jax.devices()[0].device_kind}, copy bandwidth {bw:.0f} GB/s; ms (x its HBM floor)")
    keys = ("fwd", "fwd_states", "g_walk", "chunk_kernel", "backward")
    print(f"{'workload':18s} " + " ".join(f"{k:>18s}" for k in keys) + f" {'fwd_bwd':>9s}")
    for r in rows:
        cells = [f"{r[k + '_ms']:.3f} ({r[k + '_ms'] / (r[k + '_bytes'] / bw / 1e6):.1f}x)" for k in keys]
        print(f"{r['workload']:18s} " + " ".join(f"{c:>18s}" for c in cells) + f" {r['fwd_bwd_ms']:9.3f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({**environment(), "copy_bandwidth_gbs": bw, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

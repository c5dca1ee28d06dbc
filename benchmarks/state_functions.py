"""Times the two state functions of sequence parallelism (reference.py: local_state, state_gradient),
Triton against XLA's einsums, next to the bare Triton forward and the HBM floor (GPU only).

    python benchmarks/state_functions.py --T 32768,131072            # table
    python benchmarks/state_functions.py --T 32768 --sweep           # also segment counts / blocks

B=1, H=16, D=128, bf16 by default (one sequence shard). The floor of a state function is the bytes of its
two inputs read once over the copy bandwidth measured in the same run; the forward's is q, k, v, o.
"""

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from timing import copy_bandwidth_gbs, environment, time_call  # noqa: E402

import shardattn  # noqa: E402
from shardattn.kernels.lightning import triton, xla  # noqa: E402

SCALE = 0.088


def _rel(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.sqrt(jnp.mean((a - b) ** 2)) / jnp.sqrt(jnp.mean(b**2)))


def _sweep(T, B, H, D, q, k, v, do, slopes, want_local, want_grad, ms, segments, inner):
    """Segment counts and block shapes of both functions (the defaults' choice is one of these rows)."""
    default = triton.BlockSizes.get_default(D, D, q.dtype)
    local_cfgs = [dict(fwd_bv=64, seg_warps=4), dict(fwd_bv=128, seg_warps=4), dict(fwd_bv=128, seg_warps=8)]
    grad_cfgs = [
        dict(state_bk=0, fwd_bv=64, seg_warps=4),
        dict(state_bk=64, fwd_bv=64, seg_warps=4),
        dict(state_bk=64, fwd_bv=128, seg_warps=4),
        dict(state_bk=0, fwd_bv=128, seg_warps=8),
    ]
    for P in segments:
        for cfg in local_cfgs:
            nv = -(-D // min(cfg["fwd_bv"], D))
            blocks = dataclasses.replace(default, state_programs=P * B * H * nv, min_seg_chunks=1, **cfg)
            fn = jax.jit(lambda k, v, s, b=blocks: triton._local_state(k, v, s, False, b))
            t = time_call(fn, k, v, slopes, warmup=2, repeats=10, inner=inner)
            err = _rel(fn(k, v, slopes), want_local)
            print(
                f"sweep T={T} local_state P={P:2d} {cfg}: {t:.3f} ms ({t / ms:.2f}x floor) err {err:.1e}",
                flush=True,
            )
        for cfg in grad_cfgs:
            nv = -(-D // min(cfg["fwd_bv"], D))
            nk = -(-D // cfg["state_bk"]) if cfg["state_bk"] else 1
            blocks = dataclasses.replace(default, state_programs=P * B * H * nv * nk, min_seg_chunks=1, **cfg)
            fn = jax.jit(lambda q, do, s, b=blocks: triton._state_gradient(q, do, s, SCALE, False, b))
            t = time_call(fn, q, do, slopes, warmup=2, repeats=10, inner=inner)
            err = _rel(fn(q, do, slopes), want_grad)
            print(
                f"sweep T={T} state_gradient P={P:2d} {cfg}: {t:.3f} ms ({t / ms:.2f}x floor) err {err:.1e}",
                flush=True,
            )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--T", default="32768,131072")
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=16)
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--sweep", action="store_true", help="also time segment counts and block shapes")
    parser.add_argument("--segments", default="4,8,12,16,24,32", help="segment counts of --sweep")
    parser.add_argument("--inner", type=int, default=20, help="back-to-back calls per timing round")
    args = parser.parse_args()
    B, H, D = args.B, args.H, args.D
    env = environment()
    bw = copy_bandwidth_gbs()
    print(f"{env['device']}, jax {env['jax']}, copy bandwidth {bw:.0f} GB/s (read + write)", flush=True)
    slopes = jnp.asarray(shardattn.decay_slopes(H, 0, 24))  # on the device: no transfer per call
    rows = []
    for T in map(int, args.T.split(",")):
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        q, k, v, do = (jax.random.normal(key, (B, T, H, D), jnp.float32).astype(jnp.bfloat16) for key in keys)
        k = (k.astype(jnp.float32) / D**0.5).astype(jnp.bfloat16)
        two = 2 * q.size * q.dtype.itemsize  # bytes of two inputs
        floor2 = two / (bw * 1e9) * 1e3
        fns = {
            "triton local_state": (jax.jit(triton.local_state), (k, v, slopes), floor2),
            "xla local_state": (jax.jit(xla.local_state), (k, v, slopes), floor2),
            "triton state_gradient": (
                jax.jit(lambda q, do, s: triton.state_gradient(q, do, s, scale=SCALE)),
                (q, do, slopes),
                floor2,
            ),
            "xla state_gradient": (
                jax.jit(lambda q, do, s: xla.state_gradient(q, do, s, scale=SCALE)),
                (q, do, slopes),
                floor2,
            ),
            "triton forward": (
                jax.jit(
                    lambda q, k, v: shardattn.lightning_attention(
                        q, k, v, slopes=slopes, scale=SCALE, implementation="triton"
                    )
                ),
                (q, k, v),
                2 * floor2,
            ),
        }
        outs = {}
        for name, (fn, fargs, floor) in fns.items():
            ms = time_call(fn, *fargs, warmup=2, repeats=10, inner=args.inner)
            outs[name] = fn(*fargs)
            rows.append((T, name, ms, floor))
            print(f"T={T} {name}: {ms:.3f} ms, floor {floor:.3f} ms", flush=True)
        err_l = _rel(outs["triton local_state"], outs["xla local_state"])
        err_g = _rel(outs["triton state_gradient"], outs["xla state_gradient"])
        print(f"T={T} triton vs xla relative RMS: local_state {err_l:.1e}, state_gradient {err_g:.1e}")
        if args.sweep:
            _sweep(
                T,
                B,
                H,
                D,
                q,
                k,
                v,
                do,
                slopes,
                outs["xla local_state"],
                outs["xla state_gradient"],
                floor2,
                [int(p) for p in args.segments.split(",")],
                args.inner,
            )
    print(f"\n| T | function | ms | floor ms | / floor |  (B={B}, H={H}, D={D}, bf16; {bw:.0f} GB/s)")
    print("| ---: | --- | ---: | ---: | ---: |")
    for T, name, ms, floor in rows:
        print(f"| {T} | {name} | {ms:.3f} | {floor:.3f} | {ms / floor:.2f} |")


if __name__ == "__main__":
    main()

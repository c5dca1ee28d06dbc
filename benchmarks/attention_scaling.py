"""Softmax attention on a mesh: sharded_attention per strategy and layout, and its overhead on one device.

For each device count P (a sequence axis of size P, B=1) and each strategy / layout it times forward and
forward+backward of causal `sharded_attention` and reports weak scaling (tokens per device fixed,
efficiency = t(1 device) / t(P devices)) and strong scaling (global T fixed, speed-up). On one device
every strategy is the same per-device call, timed against the bare `flash_attention`: that ratio is the
wrapper's overhead (target: at most 2 %). Prints a table and writes JSON.

    python benchmarks/attention_scaling.py --devices 1 --out benchmarks/results/attention-1gpu.json
    python benchmarks/attention_scaling.py --devices 1,2,4,8      # several GPUs
    python benchmarks/attention_scaling.py --quick                # tiny sizes on 8 fake CPU devices
"""

import argparse
import json
import os
import sys

if "--quick" in sys.argv:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
from timing import copy_bandwidth_gbs, environment, time_call  # noqa: E402

from shardattn import flash_attention, sharded_attention  # noqa: E402
from shardattn.meshes import make_mesh  # noqa: E402

# (strategy, layout) pairs; zigzag matters for the ring (causal load balance) and is shown for the others.
VARIANTS = (
    "ring:contiguous",
    "ring:zigzag",
    "allgather:contiguous",
    "allgather:zigzag",
    "ulysses:contiguous",
)


def inputs(mesh, T, args):
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    spec = NamedSharding(mesh, P(None, "seq"))
    q = jax.random.normal(keys[0], (1, T, args.heads, args.head_dim), dtype)
    k = jax.random.normal(keys[1], (1, T, args.kv_heads, args.head_dim), dtype)
    v = jax.random.normal(keys[2], (1, T, args.kv_heads, args.head_dim), dtype)
    return [jax.device_put(x, spec) for x in (q, k, v)]


def programs(attend):
    """Jitted forward and forward+backward (grads of q, k, v of a sum) of attend(q, k, v)."""
    fwd = jax.jit(attend)

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32))

    return fwd, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(devices, T, variant, args):
    strategy, layout = variant.split(":")
    mesh = make_mesh(seq=devices, devices=jax.devices()[:devices])
    q, k, v = inputs(mesh, T, args)
    kw = dict(causal=True, implementation=args.impl)
    attend = lambda q, k, v: sharded_attention(  # noqa: E731
        q, k, v, mesh=mesh, strategy=strategy, layout=layout, **kw
    )
    row = {"devices": devices, "T": T, "tokens_per_device": T // devices, "variant": variant}
    try:
        fwd, fwdbwd = programs(attend)
        row["fwd_ms"] = time_call(fwd, q, k, v, warmup=args.warmup, repeats=args.repeats)
        row["fwdbwd_ms"] = time_call(fwdbwd, q, k, v, warmup=args.warmup, repeats=args.repeats)
    except (ValueError, NotImplementedError) as err:  # e.g. ulysses with heads not divisible by P
        row["skipped"] = f"{type(err).__name__}: {err}"
        return row
    except Exception as err:  # out of memory and the like: recorded, not fatal
        row["failed"] = f"{type(err).__name__}: {str(err)[:300]}"
        return row
    if devices == 1:  # the wrapper against the bare per-device call
        bare_fwd, bare_fwdbwd = programs(lambda q, k, v: flash_attention(q, k, v, **kw))
        row["bare_fwd_ms"] = time_call(bare_fwd, q, k, v, warmup=args.warmup, repeats=args.repeats)
        row["bare_fwdbwd_ms"] = time_call(bare_fwdbwd, q, k, v, warmup=args.warmup, repeats=args.repeats)
        row["overhead_fwd"] = row["fwd_ms"] / row["bare_fwd_ms"] - 1
        row["overhead_fwdbwd"] = row["fwdbwd_ms"] / row["bare_fwdbwd_ms"] - 1
    return row


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", default=None, help="device counts, e.g. 1,2 (default: 1 and all)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="strategy:layout, comma separated")
    parser.add_argument("--weak", default="32768,131072", help="tokens per device")
    parser.add_argument("--strong", default="262144,1048576", help="global tokens")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--impl", default=None, help="per-device backend (default: the platform's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny sizes on 8 fake CPU devices")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args()
    if args.quick:
        args.weak, args.strong, args.heads, args.kv_heads, args.head_dim = "64", "", 8, 8, 16
        args.dtype, args.warmup, args.repeats = "float32", 1, 2
        args.devices = args.devices or "1,8"

    n = jax.device_count()
    counts = [int(c) for c in args.devices.split(",")] if args.devices else sorted({1, n})
    counts = [c for c in counts if c <= n]
    variants = args.variants.split(",")
    env = environment()
    env["copy_bandwidth_gbs"] = copy_bandwidth_gbs(nbytes=1 << (20 if args.quick else 30))
    rows = []
    for kind, sizes in (("weak", args.weak), ("strong", args.strong)):
        for size in (int(s) for s in sizes.split(",") if s):
            for c in counts:
                T = size * c if kind == "weak" else size
                for variant in variants if c > 1 else variants[:1]:  # one device: one program
                    rows.append({"kind": kind, **measure(c, T, variant, args)})
                    print(rows[-1], flush=True)

    base = {
        (r["kind"], r["tokens_per_device" if r["kind"] == "weak" else "T"]): r
        for r in rows
        if r["devices"] == 1
    }
    for r in rows:
        ref = base.get((r["kind"], r["tokens_per_device" if r["kind"] == "weak" else "T"]))
        if ref and r["devices"] > 1 and "fwd_ms" in r and "fwd_ms" in ref:
            key = "efficiency" if r["kind"] == "weak" else "speedup"
            r[f"{key}_fwd"] = ref["fwd_ms"] / r["fwd_ms"]
            r[f"{key}_fwdbwd"] = ref["fwdbwd_ms"] / r["fwdbwd_ms"]

    print(
        f"\n{env['device']} x{n}, copy bandwidth {env['copy_bandwidth_gbs']:.0f} GB/s, causal, "
        f"H={args.heads}/{args.kv_heads} D={args.head_dim} {args.dtype}"
    )
    print(
        f"{'kind':6} {'P':>2} {'T':>9} {'variant':21} {'fwd ms':>9} {'f+b ms':>9} "
        f"{'ratio f':>8} {'ratio f+b':>9}"
    )
    for r in rows:
        if "fwd_ms" not in r:
            print(
                f"{r['kind']:6} {r['devices']:>2} {r['T']:>9} {r['variant']:21} "
                f"{r.get('skipped') or r['failed']}"
            )
            continue
        key = "efficiency" if r["kind"] == "weak" else "speedup"
        print(
            f"{r['kind']:6} {r['devices']:>2} {r['T']:>9} {r['variant']:21} {r['fwd_ms']:9.3f} "
            f"{r['fwdbwd_ms']:9.3f} {r.get(key + '_fwd', float('nan')):8.3f} "
            f"{r.get(key + '_fwdbwd', float('nan')):9.3f}"
        )
    for r in rows:
        if "overhead_fwd" in r:
            print(
                f"sharded_attention on 1 device vs bare flash_attention, T={r['T']}: "
                f"fwd {r['overhead_fwd']:+.1%}, fwd+bwd {r['overhead_fwdbwd']:+.1%}"
            )
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"environment": env, "args": vars(args), "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

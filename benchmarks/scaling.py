"""Sequence-parallel scaling of sharded_lightning across devices (any number of GPUs; CPU for smoke runs).

For each device count P and scan strategy it times forward and forward+backward of sharded_lightning
(B=1, seq axis of size P) and reports:
  - weak scaling: tokens per device fixed; efficiency = t(1 device) / t(P devices);
  - strong scaling: global T fixed; speed-up = t(1 device) / t(P devices);
  - the exposed cost of the state scan: t(sharded_lightning) - t(local kernels alone, no communication);
  - the longest global sequence whose forward+backward fits (doubling T until out of memory).
With --emulate P (one device is enough) it also times, on one device, one sequence shard of a P-way run:
sharded_lightning's own per-shard function (shardattn.sharded.sequence_shard) with a stand-in for the
collectives of the scan. That is the per-device program without communication: t(bare kernel) /
t(shard) bounds the weak-scaling efficiency from above, and the longest shard that fits bounds the
longest sequence.
Prints a table, writes JSON (and a PNG plot when matplotlib is present).

    python benchmarks/scaling.py --devices 1,2 --out benchmarks/results/scaling-2xh200.json
    python benchmarks/scaling.py --devices 1 --emulate 2 --longest     # one GPU
    python benchmarks/scaling.py --smoke            # tiny sizes on 8 fake CPU devices
"""

import argparse
import json
import os
import subprocess
import sys
import time

if "--smoke" in sys.argv:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
from timing import copy_bandwidth_gbs, environment, time_call  # noqa: E402

from shardattn import decay_slopes, lightning_attention, sharded  # noqa: E402
from shardattn.lightning import resolve_implementations  # noqa: E402
from shardattn.meshes import make_mesh  # noqa: E402
from shardattn.sharded import sharded_lightning  # noqa: E402

SCANS = ("ring", "tree", "allgather")


def inputs(mesh, T, H, D, dtype, seed=0):
    """q, k, v [1, T, H, D] created directly in their sequence-sharded placement."""
    sharding = NamedSharding(mesh, P(None, "seq", None, None))

    @jax.jit
    def make(key):
        keys = jax.random.split(key, 3)
        shape = (1, T, H, D)
        q = jax.random.normal(keys[0], shape, dtype)
        k = jax.random.normal(keys[1], shape, dtype) * jnp.asarray(D**-0.5, dtype)  # no float32 copy
        v = jax.random.normal(keys[2], shape, dtype)
        return tuple(jax.lax.with_sharding_constraint(x, sharding) for x in (q, k, v))

    return make(jax.random.PRNGKey(seed))


def programs(mesh, scan, impl):
    """Jitted forward and forward+backward of sharded_lightning, and of the local kernels alone."""
    kw = dict(layer_idx=0, num_layers=8, implementation=impl)

    def sharded(q, k, v):
        return sharded_lightning(q, k, v, mesh=mesh, scan=scan, **kw)

    spec = P(None, "seq", None, None)

    def local_only(q, k, v):  # the same per-device work with no state exchanged: the lower bound
        return jax.shard_map(
            lambda q, k, v: lightning_attention(q, k, v, **kw),
            mesh=mesh,
            in_specs=(spec, spec, spec),
            out_specs=spec,
            check_vma=False,
        )(q, k, v)

    def bare(q, k, v):  # the kernel on one device, no shard_map: the overhead baseline at P = 1
        return lightning_attention(q, k, v, **kw)

    def with_grad(f):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))

    return {
        "fwd": jax.jit(sharded),
        "fwdbwd": with_grad(sharded),
        "local_fwd": jax.jit(local_only),
        "local_fwdbwd": with_grad(local_only),
        "bare_fwd": jax.jit(bare),
        "bare_fwdbwd": with_grad(bare),
    }


def shard_programs(heads, head_dim, impl, num_seq):
    """Forward and forward+backward of one sequence shard (a middle one) of a num_seq-way run, on one
    device: sharded_lightning's own per-shard function with a stand-in for the scan's collectives, which
    returns half the local state (so values and gradients flow as in the real run)."""
    sharded._SCAN_FNS.setdefault("stand-in", lambda a, s, **_: 0.5 * s)
    plan = sharded._Plan(
        batch_axes=(), seq_axis="seq", head_axis=None, num_seq=num_seq, scan="stand-in",
        scale=head_dim**-0.5, reverse=False, implementations=resolve_implementations(impl), packed=False,
        kv_replicated=False, return_state=False,
    )  # fmt: skip
    slopes = decay_slopes(heads, 0, 8)

    def shard(q, k, v):
        zeros = jnp.zeros((q.shape[0], heads, head_dim, head_dim), jnp.float32)
        return sharded.sequence_shard(plan, q, k, v, slopes, zeros, jnp.int32(1))[0]

    grad = jax.grad(lambda q, k, v: jnp.sum(shard(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    return {"fwd": jax.jit(shard), "fwdbwd": jax.jit(grad)}


def measure_shard(P_, T, args):
    """The local work of one shard of a P_-way run with global length T, timed on one device."""
    mesh = make_mesh(seq=1, devices=jax.devices()[:1])
    q, k, v = inputs(mesh, T // P_, args.heads, args.head_dim, jnp.dtype(args.dtype))
    fns = shard_programs(args.heads, args.head_dim, args.impl, P_)
    row = {"devices": P_, "T": T, "tokens_per_device": T // P_, "scan": "emulated", "emulated": True}
    for name, fn in fns.items():
        row[f"{name}_ms"] = time_call(fn, q, k, v, warmup=args.warmup, repeats=args.repeats, inner=args.inner)
        # Kernel launches in the compiled program (Triton custom calls): shows whether XLA computed the
        # shard's local-state pass and the kernel's own segment pass once (CSE) or twice.
        hlo = fn.lower(q, k, v).compile().as_text()
        row[f"{name}_triton_launches"] = hlo.count('custom_call_target="triton_kernel_call"')
    return row


def measure(P_, T, scan, args):
    mesh = make_mesh(seq=P_, devices=jax.devices()[:P_])
    q, k, v = inputs(mesh, T, args.heads, args.head_dim, jnp.dtype(args.dtype))
    fns = programs(mesh, scan, args.impl)
    row = {"devices": P_, "T": T, "tokens_per_device": T // P_, "scan": scan}
    for name, fn in fns.items():
        if (name.startswith("local") and P_ == 1) or (name.startswith("bare") and P_ > 1):
            continue
        row[f"{name}_ms"] = time_call(fn, q, k, v, warmup=args.warmup, repeats=args.repeats, inner=args.inner)
    if P_ == 1:  # what wrapping one device in sharded_lightning costs
        row["overhead_fwd"] = row["fwd_ms"] / row["bare_fwd_ms"] - 1
        row["overhead_fwdbwd"] = row["fwdbwd_ms"] / row["bare_fwdbwd_ms"] - 1
    if P_ > 1:
        row["exposed_scan_fwd_ms"] = row["fwd_ms"] - row["local_fwd_ms"]
        row["exposed_scan_fwdbwd_ms"] = row["fwdbwd_ms"] - row["local_fwdbwd_ms"]
    return row


def longest_sequence(P_, scan, args, start_T, time_budget_s):
    """Doubles T until forward+backward no longer fits (or the time budget is spent).

    scan="emulated": one device holds one shard of a P_-way run (T / P_ tokens), see --emulate.
    Returns the longest T that ran and the first that did not (None if the time budget ended it).
    """
    emulated = scan == "emulated"
    mesh = make_mesh(seq=1 if emulated else P_, devices=jax.devices()[: 1 if emulated else P_])
    fns = (
        shard_programs(args.heads, args.head_dim, args.impl, P_)
        if emulated
        else programs(mesh, scan, args.impl)
    )
    shard = P_ if emulated else 1  # one device holds T / shard tokens
    best, T, t0 = None, start_T, time.time()
    failed = None
    while time.time() - t0 < time_budget_s:
        try:
            q, k, v = inputs(mesh, T // shard, args.heads, args.head_dim, jnp.dtype(args.dtype))
            ms = time_call(fns["fwdbwd"], q, k, v, warmup=1, repeats=1)
            best = {"devices": P_, "scan": scan, "T": T, "fwdbwd_ms": ms}
            del q, k, v
        except Exception as err:  # XLA reports out-of-memory as a runtime error
            if "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower():
                failed = T
                break
            raise
        T *= 2
    return {**(best or {"devices": P_, "scan": scan}), "first_out_of_memory_T": failed}


def longest_in_child(P_, scan, args, start_T, time_budget_s):
    """longest_sequence in a fresh process: after an out-of-memory error the allocator of the process that
    saw it can fail smaller sizes too (seen on an H200), so every search starts clean."""
    cmd = [sys.executable, os.path.abspath(__file__), "--longest-child", f"{P_},{scan},{start_T}",
           "--longest-budget-s", str(time_budget_s), "--heads", str(args.heads), "--head-dim",
           str(args.head_dim), "--dtype", args.dtype] + (["--impl", args.impl] if args.impl else []) + (
           ["--smoke"] if args.smoke else [])  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=time_budget_s + 600)
    for line in proc.stdout.splitlines():
        if line.startswith("LONGEST_JSON "):
            return json.loads(line[len("LONGEST_JSON ") :])
    raise RuntimeError(f"longest-sequence search failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", default=None, help="device counts, e.g. 1,2 (default: 1 and all)")
    parser.add_argument("--scans", default=",".join(SCANS))
    parser.add_argument("--weak", default="32768,131072,524288", help="tokens per device")
    parser.add_argument("--strong", default="262144,1048576", help="global tokens")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--impl", default=None, help="per-device backend (default: the platform's best)")
    parser.add_argument("--longest", action="store_true", help="also find the longest sequence that fits")
    parser.add_argument("--longest-budget-s", type=float, default=120.0)
    parser.add_argument("--longest-child", default=None, help=argparse.SUPPRESS)  # "P,scan,start_T"
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    # Single calls of ~0.5 ms (32K tokens) read up to 30 % apart between programs of the same work, and
    # within 2.2 % as rounds of 5 back-to-back calls (H200, 2026-12-02; README, "Scaling across devices").
    parser.add_argument("--inner", type=int, default=5, help="back-to-back calls per timed round")
    parser.add_argument("--emulate", default="", help="shard counts P to emulate on one device, e.g. 2,8")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on 8 fake CPU devices")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args()
    if args.longest_child:  # one search, in this (fresh) process; see longest_in_child
        P_, scan, start_T = args.longest_child.split(",")
        found = longest_sequence(int(P_), scan, args, int(start_T), args.longest_budget_s)
        print("LONGEST_JSON " + json.dumps(found), flush=True)
        return
    if args.smoke:
        args.weak, args.strong, args.heads, args.head_dim, args.dtype = "256", "1024", 2, 16, "float32"
        args.warmup, args.repeats, args.inner = 1, 2, 1

    n = jax.device_count()
    counts = [int(c) for c in args.devices.split(",")] if args.devices else sorted({1, n})
    counts = [c for c in counts if c <= n]
    scans = args.scans.split(",")
    emulate = [int(c) for c in args.emulate.split(",") if c]
    env = environment()
    env["copy_bandwidth_gbs"] = copy_bandwidth_gbs(nbytes=1 << (20 if args.smoke else 30))
    rows = []
    for tokens in (int(t) for t in args.weak.split(",") if t):
        for c in counts:
            for scan in scans if c > 1 else scans[:1]:  # one device: every scan is the same program
                rows.append({"kind": "weak", **measure(c, tokens * c, scan, args)})
                print(rows[-1], flush=True)
        for c in emulate:
            rows.append({"kind": "weak", **measure_shard(c, tokens * c, args)})
            print(rows[-1], flush=True)
    for T in (int(t) for t in args.strong.split(",") if t):
        for c in counts:
            for scan in scans if c > 1 else scans[:1]:
                rows.append({"kind": "strong", **measure(c, T, scan, args)})
                print(rows[-1], flush=True)
        for c in emulate:
            rows.append({"kind": "strong", **measure_shard(c, T, args)})
            print(rows[-1], flush=True)
    longest = []
    if args.longest:
        for c in counts:
            for scan in scans if c > 1 else scans[:1]:
                longest.append(longest_in_child(c, scan, args, 1 << 18, args.longest_budget_s))
                print(longest[-1], flush=True)
        for c in emulate:
            longest.append(longest_in_child(c, "emulated", args, 1 << 18, args.longest_budget_s))
            print(longest[-1], flush=True)

    # Efficiency / speed-up against the one-device time of the same size class.
    base = {
        (r["kind"], r["tokens_per_device"] if r["kind"] == "weak" else r["T"]): r
        for r in rows
        if r["devices"] == 1
    }
    for r in rows:
        ref = base.get((r["kind"], r["tokens_per_device"] if r["kind"] == "weak" else r["T"]))
        if ref and r["devices"] > 1:
            key = "efficiency" if r["kind"] == "weak" else "speedup"
            r[f"{key}_fwd"] = ref["fwd_ms"] / r["fwd_ms"]
            r[f"{key}_fwdbwd"] = ref["fwdbwd_ms"] / r["fwdbwd_ms"]

    print(
        f"\n{env['device']} x{n}, copy bandwidth {env['copy_bandwidth_gbs']:.0f} GB/s, "
        f"H={args.heads} D={args.head_dim} {args.dtype}"
    )
    print(
        f"{'kind':6} {'P':>2} {'T':>9} {'scan':9} {'fwd ms':>9} {'f+b ms':>9} "
        f"{'ratio f':>8} {'ratio f+b':>9} {'scan f+b ms':>11}"
    )
    for r in rows:
        key = "efficiency" if r["kind"] == "weak" else "speedup"
        print(
            f"{r['kind']:6} {r['devices']:>2} {r['T']:>9} {r['scan']:9} "
            f"{r['fwd_ms']:9.3f} {r['fwdbwd_ms']:9.3f} "
            f"{r.get(key + '_fwd', float('nan')):8.3f} {r.get(key + '_fwdbwd', float('nan')):9.3f} "
            f"{r.get('exposed_scan_fwdbwd_ms', float('nan')):11.3f}"
        )
    for r in rows:
        if "overhead_fwd" in r:
            print(
                f"sharded_lightning on 1 device vs bare kernel, T={r['T']}: fwd {r['overhead_fwd']:+.1%}, "
                f"fwd+bwd {r['overhead_fwdbwd']:+.1%}"
            )
    for r in longest:
        where = "one shard on 1 device" if r["scan"] == "emulated" else f"scan={r['scan']}"
        print(
            f"longest fwd+bwd on {r['devices']} device(s) ({where}): T={r.get('T')} "
            f"({r.get('fwdbwd_ms', float('nan')):.1f} ms); "
            f"first out of memory: T={r['first_out_of_memory_T']}"
        )

    result = {"environment": env, "args": vars(args), "rows": rows, "longest": longest}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        plot(result, os.path.splitext(args.out)[0] + ".png")


def plot(result, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind, key in ((axes[0], "weak", "efficiency_fwdbwd"), (axes[1], "strong", "speedup_fwdbwd")):
        for scan, P_ in sorted({(r["scan"], r["devices"]) for r in result["rows"] if r["devices"] > 1}):
            pts = sorted(
                (r["tokens_per_device"] if kind == "weak" else r["T"], r[key])
                for r in result["rows"]
                if r["kind"] == kind and r["scan"] == scan and r["devices"] == P_ and key in r
            )
            if pts:
                label = f"{P_} devices, " + ("one shard, no collective" if scan == "emulated" else scan)
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per device" if kind == "weak" else "global tokens")
        ax.set_ylabel("efficiency t1/tP" if kind == "weak" else "speed-up t1/tP")
        ax.set_title(f"{kind} scaling, fwd+bwd")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    env = result["environment"]
    fig.suptitle(f"sharded_lightning on {env['device']} x{env['num_devices']} ({env['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plot"]:  # re-draw a saved result: scaling.py --plot result.json
        with open(sys.argv[2]) as f:
            plot(json.load(f), os.path.splitext(sys.argv[2])[0] + ".png")
    else:
        main()

"""Times shardattn.flash_attention per backend (forward, forward+backward) on the named softmax workloads.

    python benchmarks/attention.py                          # GPU: cudnn and xla on every named workload
    python benchmarks/attention.py --impl xla --workloads causal-b4-t8k-h16-d128
    python benchmarks/attention.py --quick                  # CPU smoke run: tiny shapes, seconds

Every figure comes with the device, the measured dense matmul rate (one jitted [n, n] x [n, n] matmul
in the workloads' dtype) and the device copy bandwidth (x + 1 over 1 GiB float32, bytes read + written),
both measured in the same run. Rates count the matmul FLOPs of the pairs the mask allows (causal about
half, a window fewer): forward 4·B·H·D·pairs, forward+backward 3.5x that (the backward recomputes the
logits: 5 matmuls to the forward's 2). `--xla-blocks 256x512,...` adds rows of the xla backend with
other (block_q x block_k) sizes than the default 512x512. Each backend's time is also given as a ratio
to cudnn's on the same workload where cudnn serves it (it has no soft cap). Writes JSON under
benchmarks/results/.
"""

import argparse
import dataclasses
import datetime
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workloads import ATTENTION_WORKLOADS, AttentionWorkload  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def quick_version(w: AttentionWorkload) -> AttentionWorkload:
    """The same features at CPU size: T=256, B=1, D=32, float32, heads scaled down with their ratio."""
    ratio = w.H // w.Hkv
    window = None if w.window is None else 64
    return dataclasses.replace(w, B=1, T=256, H=2 * ratio, Hkv=2, D=32, dtype="float32", window=window)


def _inputs(w: AttentionWorkload, seed=0):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    dt = jnp.dtype(w.dtype)
    q = jax.random.normal(keys[0], (w.B, w.T, w.H, w.D), jnp.float32).astype(dt)
    k = jax.random.normal(keys[1], (w.B, w.T, w.Hkv, w.D), jnp.float32).astype(dt)
    v = jax.random.normal(keys[2], (w.B, w.T, w.Hkv, w.D), jnp.float32).astype(dt)
    do = jax.random.normal(keys[3], (w.B, w.T, w.H, w.D), jnp.float32).astype(dt)
    return q, k, v, do


def time_backend(impl: str, w: AttentionWorkload, warmup: int, rounds: int, inner: int) -> dict:
    from timing import time_fwd_bwd

    import shardattn

    q, k, v, do = _inputs(w)

    def attn(q, k, v):
        return shardattn.flash_attention(q, k, v, causal=w.causal, sliding_window=w.window,
                                         logits_soft_cap=w.soft_cap, implementation=impl)  # fmt: skip

    return time_fwd_bwd(attn, q, k, v, do, warmup=warmup, rounds=rounds, inner=inner)


def matmul_tflops(dtype: str, n: int) -> float:
    """Measured rate of one jitted [n, n] x [n, n] matmul, in TFLOP/s."""
    import jax
    import jax.numpy as jnp
    from timing import time_call

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    ms = time_call(jax.jit(lambda x, y: x @ y), a, a, warmup=3, repeats=10, inner=5)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--impl", default=None, help="comma-separated backends; default cudnn,xla on GPU, else xla"
    )
    p.add_argument(
        "--workloads", default=",".join(ATTENTION_WORKLOADS), help=f"from {list(ATTENTION_WORKLOADS)}"
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny CPU-sized versions of the workloads (smoke run)"
    )
    p.add_argument(
        "--out", default=None, help="JSON file (default benchmarks/results/attention_<device>_<date>.json)"
    )
    p.add_argument("--xla-blocks", default="", help="more xla rows at these block sizes: 256x256,1024x512")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (median taken)")
    p.add_argument("--inner", type=int, default=5, help="back-to-back calls per round")
    args = p.parse_args(argv)
    names = [n for n in args.workloads.split(",") if n]
    for n in names:
        if n not in ATTENTION_WORKLOADS:
            p.error(f"unknown workload {n!r}; known: {list(ATTENTION_WORKLOADS)}")
    workloads = {n: ATTENTION_WORKLOADS[n] for n in names}
    if args.quick:
        workloads = {n: quick_version(w) for n, w in workloads.items()}
        args.warmup, args.rounds, args.inner = 1, 3, 1

    import jax
    from timing import copy_bandwidth_gbs, environment

    on_gpu = jax.default_backend() == "gpu"
    impls = args.impl.split(",") if args.impl else (["cudnn", "xla"] if on_gpu else ["xla"])
    if args.quick and not args.impl:
        impls = ["xla", "reference"]
    device = jax.devices()[0]
    dtype = next(iter(workloads.values())).dtype
    bw = copy_bandwidth_gbs(nbytes=(1 << 24) if args.quick else (1 << 30))
    rate = matmul_tflops(dtype, 512 if args.quick else 8192)
    print(f"device: {device.device_kind} ({jax.default_backend()}); {dtype} matmul {rate:.1f} TFLOP/s; "
          f"copy bandwidth {bw:.0f} GB/s (read + write)", flush=True)  # fmt: skip

    from shardattn.kernels.attention import xla as xla_backend

    variants = [(impl, None) for impl in impls]  # (backend, xla block sizes or None for the default)
    for spec in (b for b in args.xla_blocks.split(",") if b):
        bq, bk = (int(n) for n in spec.split("x"))
        variants.append(("xla", xla_backend.BlockSizes(bq, bk)))
    default_blocks = xla_backend.DEFAULT_BLOCK_SIZES
    rows = []
    for name, w in workloads.items():
        for impl, blocks in variants:
            xla_backend.DEFAULT_BLOCK_SIZES = blocks or default_blocks
            label = impl if blocks is None else f"xla{blocks.block_q}x{blocks.block_k}"
            try:
                r = time_backend(impl, w, args.warmup, args.rounds, args.inner)
            except NotImplementedError as err:  # cudnn refuses some features: say which, keep going
                r = {"fwd_ms": None, "fwd_bwd_ms": None, "error": f"NotImplementedError: {str(err)[:300]}"}
            except Exception as err:  # one failing backend must not lose the others' figures
                r = {"fwd_ms": None, "fwd_bwd_ms": None, "error": f"{type(err).__name__}: {str(err)[:500]}"}
            flops = w.flops_fwd()
            r["fwd_tflops"] = flops / (r["fwd_ms"] * 1e-3) / 1e12 if r["fwd_ms"] else None
            r["fwd_bwd_tflops"] = 3.5 * flops / (r["fwd_bwd_ms"] * 1e-3) / 1e12 if r["fwd_bwd_ms"] else None
            xla_backend.DEFAULT_BLOCK_SIZES = default_blocks
            rows.append(dict(workload=name, impl=label, **r))
            print(
                f"  {name:28s} {label:9s} fwd {r['fwd_ms'] or float('nan'):9.3f} ms  fwd+bwd "
                f"{r['fwd_bwd_ms'] or float('nan'):9.3f} ms  {r.get('error', '')[:120]}",
                flush=True,
            )

    by = {(r["workload"], r["impl"]): r for r in rows}
    for r in rows:
        base = by.get((r["workload"], "cudnn"))
        for key in ("fwd_ms", "fwd_bwd_ms"):
            ok = base and base[key] and r[key]
            r[f"{key[:-3]}_vs_cudnn"] = r[key] / base[key] if ok else None

    def num(x, width, prec=3):
        return f"{x:{width}.{prec}f}" if x is not None else f"{'n/a':>{width}s}"

    print(f"\n{device.device_kind}: {dtype} matmul {rate:.1f} TFLOP/s, copy bandwidth {bw:.0f} GB/s")
    print(f"{'workload':28s} {'impl':9s} {'fwd ms':>9s} {'TFLOP/s':>8s} {'/cudnn':>7s} "
          f"{'fwd+bwd ms':>10s} {'TFLOP/s':>8s} {'/cudnn':>7s}")  # fmt: skip
    for r in rows:
        print(f"{r['workload']:28s} {r['impl']:9s} {num(r['fwd_ms'], 9)} {num(r['fwd_tflops'], 8, 1)} "
              f"{num(r['fwd_vs_cudnn'], 7, 2)} {num(r['fwd_bwd_ms'], 10)} {num(r['fwd_bwd_tflops'], 8, 1)} "
              f"{num(r['fwd_bwd_vs_cudnn'], 7, 2)}")  # fmt: skip

    out = args.out
    if out is None and not args.quick:
        slug = device.device_kind.lower().replace(" ", "-")
        out = os.path.join(RESULTS, f"attention_{slug}_{datetime.date.today().isoformat()}.json")
    if out:
        result = {
            **environment(),
            "jaxlib": _version("jaxlib"),
            "copy_bandwidth_gbs": bw,
            "matmul_tflops": {"dtype": dtype, "rate": rate},
            "timing": {
                "warmup": args.warmup,
                "rounds": args.rounds,
                "inner": args.inner,
                "quick": args.quick,
            },
            "workloads": {n: dataclasses.asdict(w) for n, w in workloads.items()},
            "rows": rows,
        }
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Times shardattn.lightning_attention per backend (forward, forward+backward) against the HBM floor.

    python benchmarks/lightning.py --impl triton,xla --workloads b4-t8k-h16-d128 --fla \
        --out benchmarks/results/h100.json
    python benchmarks/lightning.py --impl reference --workloads tiny        # CPU smoke run

Every figure comes with the device and the device-to-device copy bandwidth measured in the same run
(x + 1 over 1 GiB float32: bytes read + written / time). The floor of the forward pass is the bytes
of q, k, v read once and o written once over that bandwidth. `--fla` also times flash-linear-
attention's chunk_lightning_attn (PyTorch, same shapes and slopes) in a child process three ways: wall
time of back-to-back calls, CUDA events around each call, and its GPU time, the sum of the durations of
the CUDA kernels one call launches (torch.profiler). PyTorch spends much host time launching fla's
kernels, so the first two overstate what fla costs inside a training step whose host work runs ahead:
the ratios against fla use its GPU time (`fwd_ms` / `fwd_bwd_ms` of the fla rows; the other two are kept
as `*_events_ms` / `*_wall_ms`). Ours is timed two ways: the wall time of back-to-back jitted calls
(`fwd_ms` / `fwd_bwd_ms`), and on a GPU also its GPU time the same way as fla's, the sum of the
durations of the GPU activities one call launches, from a jax.profiler (CUPTI) trace (`fwd_gpu` /
`fwd_bwd_gpu`, with the span of those activities and the host's dispatch time per call beside it: see
timing.gpu_time_ms). The ratio lines give both: ours by wall time ÷ fla's GPU time (ours charged with
any idle gaps between its kernels), and GPU time ÷ GPU time. The copy bandwidth is measured both ways
too, and the floor beside a GPU time uses the copy kernel's GPU time. XLA_PYTHON_CLIENT_PREALLOCATE=false
lets JAX and PyTorch share the GPU.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workloads import GPU_WORKLOADS, WORKLOADS  # noqa: E402

LAYER_IDX, NUM_LAYERS = 0, 24  # transnormer slopes (8 / H) * h, as fla's chunk_lightning_attn builds them


def _inputs(w, seed=0):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    dt = jnp.dtype(w.dtype)
    q = jax.random.normal(keys[0], (w.B, w.T, w.H, w.D), jnp.float32).astype(dt)
    k = (jax.random.normal(keys[1], (w.B, w.T, w.Hkv, w.D), jnp.float32) / w.D**0.5).astype(dt)
    v = jax.random.normal(keys[2], (w.B, w.T, w.Hkv, w.D), jnp.float32).astype(dt)
    do = jax.random.normal(keys[3], (w.B, w.T, w.H, w.D), jnp.float32).astype(dt)
    return q, k, v, do


def time_jax(impl, w, warmup, rounds, inner):
    import jax
    from timing import time_fwd_bwd

    import shardattn

    q, k, v, do = _inputs(w)
    slopes = shardattn.decay_slopes(w.H, LAYER_IDX, NUM_LAYERS)

    def attn(q, k, v):
        return shardattn.lightning_attention(q, k, v, slopes=slopes, implementation=impl)

    return time_fwd_bwd(attn, q, k, v, do, warmup=warmup, rounds=rounds, inner=inner,
                        gpu_time=jax.default_backend() == "gpu")  # fmt: skip


# Block-size variants of the Triton backend tried by --sweep (fields of triton.BlockSizes).
SWEEP = {
    "default": {},
    "fwd_w8": {"fwd_warps": 8},
    "fwd_w4": {"fwd_warps": 4},
    "par_bv64_w8": {"par_bv": 64, "par_warps": 8},
    "fwd_bv32": {"fwd_bv": 32},
    "stages2": {"num_stages": 2},
    "seg_always": {"seg_below": 10**6},
    "seg_never": {"min_programs": 1},
    "par_bv128_w8": {"par_bv": 128, "par_warps": 8},
    "par_bv64_w4": {"par_bv": 64, "par_warps": 4},
    "par_bv32_w4": {"par_bv": 32, "par_warps": 4},
    "sequential_bwd": {"bwd_parallel": False},
}


def sweep(names, variants, warmup, rounds, inner):
    """Times the Triton backend under each BlockSizes variant; prints one line each."""
    import dataclasses

    from shardattn.kernels.lightning import triton as backend

    default = backend.BlockSizes.get_default
    rows = []
    try:
        for variant in variants:
            change = SWEEP[variant]
            backend.BlockSizes.get_default = staticmethod(
                lambda *a, change=change: dataclasses.replace(default(*a), **change))
            for name in names:
                try:
                    r = time_jax("triton", WORKLOADS[name], warmup, rounds, inner)
                except Exception as err:
                    error = f"{type(err).__name__}: {str(err)[:300]}"
                    r = {"fwd_ms": None, "fwd_bwd_ms": None, "error": error}
                rows.append(dict(workload=name, variant=variant, **r))
                print(f"sweep {name:18s} {variant:14s} fwd {r['fwd_ms'] or float('nan'):8.3f} ms  "
                      f"fwd+bwd {r['fwd_bwd_ms'] or float('nan'):8.3f} ms {r.get('error', '')}", flush=True)
    finally:
        backend.BlockSizes.get_default = default
    return rows


def fla_worker(names, warmup, reps):
    """Child process: times fla's chunk_lightning_attn with CUDA events; prints one JSON line."""
    import tempfile

    # Triton needs a writable cache directory; the GPU machine's default one could not be created.
    cache = tempfile.mkdtemp(prefix="triton-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache
    os.environ["TRITON_HOME"] = cache
    import torch
    import triton
    from fla.ops.lightning_attn import chunk_lightning_attn

    try:
        triton.knobs.cache.dir = cache
    except Exception:  # older Triton without knobs: the environment variable serves
        pass

    def events_ms(fn):
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        return times[len(times) // 2]

    def wall_ms(fn):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / reps * 1e3

    def kernel_ms(fn):
        # GPU busy time: every CUDA kernel (and memcpy/memset) the calls launched, summed, per call.
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        total_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
        return total_us / reps / 1e3

    def bench(fn, label):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        gpu, events, wall = kernel_ms(fn), events_ms(fn), wall_ms(fn)
        return {f"{label}_ms": gpu, f"{label}_events_ms": events, f"{label}_wall_ms": wall}

    out = {}
    for name in names:
        w = WORKLOADS[name]
        dt = getattr(torch, w.dtype)
        g = torch.Generator(device="cuda").manual_seed(0)
        shape = (w.B, w.T, w.H, w.D)  # fla has no GQA: these workloads have Hkv == H
        q = torch.randn(shape, device="cuda", dtype=dt, generator=g).requires_grad_()
        k = (torch.randn(shape, device="cuda", dtype=dt, generator=g) / w.D**0.5).requires_grad_()
        v = torch.randn(shape, device="cuda", dtype=dt, generator=g).requires_grad_()
        do = torch.randn(shape, device="cuda", dtype=dt, generator=g)

        def fwd(q=q, k=k, v=v):
            with torch.no_grad():
                return chunk_lightning_attn(q, k, v, LAYER_IDX, NUM_LAYERS)

        def fwd_bwd(q=q, k=k, v=v, do=do):
            o, _ = chunk_lightning_attn(q, k, v, LAYER_IDX, NUM_LAYERS)
            torch.autograd.grad(o, (q, k, v), do)

        out[name] = {**bench(fwd, "fwd"), **bench(fwd_bwd, "fwd_bwd")}
        del q, k, v, do, fwd, fwd_bwd
        torch.cuda.empty_cache()
    out["_versions"] = {"torch": torch.__version__, "fla": _version("fla-core")}
    print("FLA_JSON " + json.dumps(out), flush=True)


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def run_fla(names, warmup, reps, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--fla-worker", "--workloads", ",".join(names),
           "--warmup", str(warmup), "--reps", str(reps)]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"fla run took over {timeout} s; left out", file=sys.stderr)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("FLA_JSON "):
            return json.loads(line[len("FLA_JSON "):])
    print(f"fla run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", default="triton,xla", help="backends: mosaic_gpu, triton, xla, reference")
    p.add_argument("--workloads", default=",".join(GPU_WORKLOADS), help=f"names from {list(WORKLOADS)}")
    p.add_argument("--out", default=None, help="JSON file to write (benchmarks/results/...)")
    p.add_argument("--fla", action="store_true", help="also time fla's chunk_lightning_attn (PyTorch)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (median taken)")
    p.add_argument("--inner", type=int, default=5, help="back-to-back calls per round")
    p.add_argument("--reps", type=int, default=25, help="fla: timed calls (median taken)")
    # fla autotunes its forward and backward kernels per head dim on first use: on an H200 with a cold
    # Triton cache three workloads (D = 128 and 64) took over 240 s, four took under 420 s.
    p.add_argument("--fla-timeout", type=int, default=480, help="fla: seconds before the child is stopped")
    p.add_argument("--sweep", default="", help=f"Triton block-size variants to time first: {list(SWEEP)}")
    p.add_argument("--fla-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = [n for n in args.workloads.split(",") if n]
    for n in names:
        if n not in WORKLOADS:
            p.error(f"unknown workload {n!r}; known: {list(WORKLOADS)}")
    if args.fla_worker:
        return fla_worker(names, args.warmup, args.reps)

    # fla first, in its own process, before this one's JAX takes the GPU (its autotuning can be slow).
    fla = run_fla(names, args.warmup, args.reps, args.fla_timeout) if args.fla else None

    import jax
    from timing import copy_bandwidth_gbs

    device = jax.devices()[0]
    bw = copy_bandwidth_gbs()
    bw_gpu = copy_bandwidth_gbs(gpu_time=True) if jax.default_backend() == "gpu" else None
    print(f"device: {device.device_kind} ({jax.default_backend()}); copy bandwidth {bw:.0f} GB/s "
          f"(read + write; by the copy kernel's GPU time {bw_gpu or float('nan'):.0f} GB/s)", flush=True)
    sweep_rows = sweep(names, [v for v in args.sweep.split(",") if v], args.warmup, args.rounds,
                       args.inner) if args.sweep else []
    rows = []
    for name in names:
        w = WORKLOADS[name]
        floor_ms = w.bytes_qkvo() / (bw * 1e9) * 1e3
        for impl in [i for i in args.impl.split(",") if i]:
            try:
                r = time_jax(impl, w, args.warmup, args.rounds, args.inner)
            except Exception as err:  # one failing backend must not lose the others' figures
                print(f"{name} {impl}: failed: {type(err).__name__}: {str(err)[:500]}", flush=True)
                r = {"fwd_ms": None, "fwd_bwd_ms": None, "error": f"{type(err).__name__}: {str(err)[:500]}"}
            if bw_gpu:  # the floor at the bandwidth the copy kernel's GPU time gives, for GPU times
                r["floor_fwd_gpu_ms"] = w.bytes_qkvo() / (bw_gpu * 1e9) * 1e3
            rows.append(dict(workload=name, impl=impl, floor_fwd_ms=floor_ms, **r))
            print(f"  {name:18s} {impl:9s} fwd {r['fwd_ms'] or float('nan'):8.3f} ms  "
                  f"fwd+bwd {r['fwd_bwd_ms'] or float('nan'):8.3f} ms", flush=True)
    if fla:
        for name in names:
            if name in fla:
                rows.append(dict(workload=name, impl="fla", floor_fwd_ms=WORKLOADS[name].bytes_qkvo()
                                 / (bw * 1e9) * 1e3, **fla[name]))

    print(f"\n{device.device_kind}, copy bandwidth {bw:.0f} GB/s (by GPU time {bw_gpu or float('nan'):.0f}); "
          "fla rows: GPU time (kernel sum), events and wall time beside it; ours: wall time, GPU time "
          "beside it")
    print(f"{'workload':18s} {'impl':9s} {'fwd ms':>8s} {'fwd+bwd ms':>10s} {'floor ms':>8s} "
          f"{'fwd/floor':>9s}")
    for r in rows:
        f, fb = r["fwd_ms"], r["fwd_bwd_ms"]
        ratio = f / r["floor_fwd_ms"] if f else float("nan")
        extra = ""
        if r["impl"] == "fla":
            extra = (f"  (events {r['fwd_events_ms']:.3f} / {r['fwd_bwd_events_ms']:.3f}, "
                     f"wall {r['fwd_wall_ms']:.3f} / {r['fwd_bwd_wall_ms']:.3f})")
        elif "fwd_gpu" in r:
            g, gb = r["fwd_gpu"], r["fwd_bwd_gpu"]
            extra = (f"  (GPU time {g['kernel_ms']:.3f} / {gb['kernel_ms']:.3f}, "
                     f"{g['kernel_ms'] / r['floor_fwd_gpu_ms']:.2f}x its floor; span {g['span_ms']:.3f} / "
                     f"{gb['span_ms']:.3f}, dispatch {g['dispatch_ms']:.3f} / {gb['dispatch_ms']:.3f})")
        print(f"{r['workload']:18s} {r['impl']:9s} {f or float('nan'):8.3f} {fb or float('nan'):10.3f} "
              f"{r['floor_fwd_ms']:8.3f} {ratio:9.2f}{extra}")

    by = {(r["workload"], r["impl"]): r for r in rows}
    for name in names:
        f = by.get((name, "fla"))
        for impl in [i for i in args.impl.split(",") if i]:
            t = by.get((name, impl))
            if t and f and t["fwd_ms"] and t["fwd_bwd_ms"]:
                gpu = ""
                if "fwd_gpu" in t:
                    gpu = (f"; GPU time / fla GPU time: fwd {t['fwd_gpu']['kernel_ms'] / f['fwd_ms']:.2f}x, "
                           f"fwd+bwd {t['fwd_bwd_gpu']['kernel_ms'] / f['fwd_bwd_ms']:.2f}x")
                print(f"{name:18s} {impl}: wall / fla GPU time: fwd {t['fwd_ms'] / f['fwd_ms']:.2f}x, "
                      f"fwd+bwd {t['fwd_bwd_ms'] / f['fwd_bwd_ms']:.2f}x{gpu}")

    if args.out:
        result = {
            "device": device.device_kind,
            "backend": jax.default_backend(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "copy_bandwidth_gbs": bw,
            "copy_bandwidth_gpu_time_gbs": bw_gpu,
            "versions": {"python": platform.python_version(), "jax": jax.__version__,
                         "jaxlib": _version("jaxlib"), "jax-triton": _version("jax-triton"),
                         "triton": _version("triton"), **((fla or {}).get("_versions", {}))},
            "timing": {"warmup": args.warmup, "rounds": args.rounds, "inner": args.inner,
                       "fla_reps": args.reps},
            "workloads": {n: WORKLOADS[n].__dict__ for n in names},
            "rows": rows,
            "sweep": sweep_rows,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

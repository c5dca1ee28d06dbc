"""The mosaic_gpu lightning forward against the triton one, in one process, on the GPU machine.

    python benchmarks/lightning_mosaic_gpu.py --out benchmarks/results/h200_lightning_mosaic_gpu_DATE.json

Times the undifferentiated forward of `implementation="mosaic_gpu"` and `"triton"`, and the Mosaic
forward without its exact relaunch for non-finite inputs (what that launch costs on finite inputs), in
interleaved rounds (medians of wall time of back-to-back jitted calls). Prints each against Triton and
against the forward's HBM floor (q, k, v read once, o written once, at the copy bandwidth measured in
the same run). Then forward+backward (jax.vjp) of both, also interleaved (in bf16 mosaic_gpu's forward
walk stores the chunk states, and its G walk and chunk kernel run the backward, with Triton's segment
passes), and those three parts alone against Triton's. Last, every one of them by GPU time
(timing.gpu_time_ms: the sum of a call's GPU activities, which the wall time exceeds by the GPU's idle
gaps between kernels and more; benchmarks/RESULTS_mosaic_gpu.md, session 13).
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import (  # noqa: E402
    add_run_arguments,
    copy_bandwidth_gbs,
    environment,
    fwd_and_fwd_bwd,
    gpu_time_ms,
    time_call,
)
from workloads import WORKLOADS  # noqa: E402

LAYER_IDX, NUM_LAYERS = 2, 8


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, "b4-t8k-h16-d128,b1-t32k-h16-d128,b2-t16k-h64-d128,b1-t128k-h16-d128")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import shardattn
    from shardattn.kernels.lightning import mosaic_gpu, triton

    def no_relaunch(flags, o, *a, **kw):
        return o

    def part_fns(mod, w, slopes):
        """A backend module's differentiated forward, G walk and chunk kernel, jitted (q, k, v, dO,
        dL/dS_final, S_in and G of every chunk)."""
        opts = triton.Options(scale=w.D**-0.5, reverse=False)
        blocks = triton.BlockSizes.get_default(w.D, w.D, w.dtype)

        def fwd(q, k, v, do, dfinal, states, gstates):  # o, final state, chunk states (not q, k, v: copies)
            (o, final), residuals = mod._lightning_fwd(q, k, v, slopes, None, None, opts)
            return o, final, residuals[-1]

        def g_walk(q, k, v, do, dfinal, states, gstates):
            return mod._g_walk(opts, blocks, q, do, slopes, dfinal, None, triton._state_dtype(q.dtype))

        def chunks(q, k, v, do, dfinal, states, gstates):
            return mod._chunks(opts, blocks, q, k, v, do, slopes, states, gstates, None)

        return jax.jit(fwd), jax.jit(g_walk), jax.jit(chunks)

    def interleaved(fns, inputs):
        """Median ms per call of each function, timed in interleaved rounds after a warm-up of each."""
        for f in fns.values():
            time_call(f, *inputs, warmup=args.warmup, repeats=1)
        samples = {n: [] for n in fns}
        for _ in range(args.rounds):
            for n, f in fns.items():
                samples[n].append(time_call(f, *inputs, warmup=1, repeats=1, inner=args.inner))
        return {n: statistics.median(x) for n, x in samples.items()}

    def gpu_times(fns, inputs):
        """GPU time per call of each function (timing.gpu_time_ms: the sum of its GPU activities)."""
        return {n: gpu_time_ms(f, *inputs)["kernel_ms"] for n, f in fns.items()}

    bw = copy_bandwidth_gbs()
    rows = []
    for name in args.workloads.split(","):
        w = WORKLOADS[name]
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        q, k, v = (jax.random.normal(kk, (w.B, w.T, h, w.D), jnp.float32).astype(w.dtype)
                   for kk, h in zip(keys, (w.H, w.Hkv, w.Hkv), strict=True))  # fmt: skip
        slopes = jnp.asarray(shardattn.decay_slopes(w.H, LAYER_IDX, NUM_LAYERS))

        def fwd(impl, slopes=slopes):
            def attn(*qkv):
                return shardattn.lightning_attention(*qkv, slopes=slopes, implementation=impl)

            return jax.jit(attn)

        fns = {"triton": fwd("triton"), "mosaic_gpu": fwd("mosaic_gpu")}
        relaunch = triton.forward_where_flagged
        triton.forward_where_flagged = no_relaunch  # traced now, inside the next warm-up
        fns["mosaic_gpu, no exact relaunch"] = fwd("mosaic_gpu")
        time_call(fns["mosaic_gpu, no exact relaunch"], q, k, v, warmup=1, repeats=1)
        triton.forward_where_flagged = relaunch
        ms = interleaved(fns, (q, k, v))
        gpu_ms = gpu_times(fns, (q, k, v))
        do = jax.random.normal(jax.random.PRNGKey(1), q.shape[:3] + (w.D,), jnp.float32).astype(w.dtype)
        grads = {n: fwd_and_fwd_bwd(lambda *qkv, n=n, slopes=slopes: shardattn.lightning_attention(
            *qkv, slopes=slopes, implementation=n))[1] for n in ("triton", "mosaic_gpu")}  # fmt: skip
        fwd_bwd_ms = interleaved(grads, (q, k, v, do))
        fwd_bwd_gpu_ms = gpu_times(grads, (q, k, v, do))
        gdiff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                    for a, b in zip(jax.tree.leaves(grads["mosaic_gpu"](q, k, v, do)),
                                    jax.tree.leaves(grads["triton"](q, k, v, do)), strict=True))  # fmt: skip
        # The parts that differ: the differentiated forward (it stores S_in of every chunk) and the G walk
        parts = {}
        for n, mod in (("triton", triton), ("mosaic_gpu", mosaic_gpu)):
            parts[f"{n} fwd storing S_in"], parts[f"{n} G walk"], parts[f"{n} chunk kernel"] = part_fns(
                mod, w, slopes)
        dfinal = jax.random.normal(jax.random.PRNGKey(2), (w.B, w.H, w.D, w.D), jnp.float32)
        states = parts["triton fwd storing S_in"](q, k, v, do, dfinal, None, None)[2]
        gstates = parts["triton G walk"](q, k, v, do, dfinal, None, None)[0]
        parts_ms = interleaved(parts, (q, k, v, do, dfinal, states, gstates))
        parts_gpu_ms = gpu_times(parts, (q, k, v, do, dfinal, states, gstates))
        floor = w.bytes_qkvo() / (bw * 1e9) * 1e3
        NW, P = mosaic_gpu._plan(w.B, w.H, w.D, w.T // mosaic_gpu.CHUNK)
        diff = float(jnp.max(jnp.abs(fns["mosaic_gpu"](q, k, v).astype(jnp.float32)
                                     - fns["triton"](q, k, v).astype(jnp.float32))))  # fmt: skip
        rows.append(dict(workload=name, ms=ms, fwd_bwd_ms=fwd_bwd_ms, parts_ms=parts_ms, gpu_ms=gpu_ms,
                         fwd_bwd_gpu_ms=fwd_bwd_gpu_ms, parts_gpu_ms=parts_gpu_ms, floor_ms=floor,
                         segments=P, compute_warpgroups=NW, max_abs_diff_vs_triton=diff,
                         fwd_bwd_max_abs_diff_vs_triton=gdiff))  # fmt: skip
    print(f"{environment()['device']}, copy {bw:.0f} GB/s; forward ms (÷ triton, ÷ HBM floor)")
    for r in rows:
        t = r["ms"]["triton"]
        cells = "  ".join(f"{n} {m:.3f} ({m / t:.2f}, {m / r['floor_ms']:.2f})" for n, m in r["ms"].items())
        plan = f"NW={r['compute_warpgroups']} P={r['segments']:<2d}"
        print(f"{r['workload']:18s} {plan} floor {r['floor_ms']:.3f}  {cells}  "
              f"max|mosaic-triton| {r['max_abs_diff_vs_triton']:.3g}")  # fmt: skip
    print("forward+backward ms (÷ triton)")
    for r in rows:
        t = r["fwd_bwd_ms"]["triton"]
        cells = "  ".join(f"{n} {m:.3f} ({m / t:.2f})" for n, m in r["fwd_bwd_ms"].items())
        print(f"{r['workload']:18s} {cells}  max|mosaic-triton| (o, dq, dk, dv) "
              f"{r['fwd_bwd_max_abs_diff_vs_triton']:.3g}")
    print("parts, ms (mosaic ÷ triton)")
    for r in rows:
        m = r["parts_ms"]
        cells = "  ".join(f"{part} {m['triton ' + part]:.3f} / {m['mosaic_gpu ' + part]:.3f} "
                          f"({m['mosaic_gpu ' + part] / m['triton ' + part]:.2f})"
                          for part in ("fwd storing S_in", "G walk", "chunk kernel"))  # fmt: skip
        print(f"{r['workload']:18s} {cells}")
    print("GPU time, ms (the sum of each call's GPU activities; mosaic_gpu / triton)")
    for r in rows:
        g, gb, gp = r["gpu_ms"], r["fwd_bwd_gpu_ms"], r["parts_gpu_ms"]
        cells = "  ".join(f"{part} {gp['mosaic_gpu ' + part]:.3f} / {gp['triton ' + part]:.3f}"
                          for part in ("fwd storing S_in", "G walk", "chunk kernel"))  # fmt: skip
        print(f"{r['workload']:18s} forward {g['mosaic_gpu']:.3f} / {g['triton']:.3f}  forward+backward "
              f"{gb['mosaic_gpu']:.3f} / {gb['triton']:.3f}  {cells}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({**environment(), "copy_bandwidth_gbs": bw, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

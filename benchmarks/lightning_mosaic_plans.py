"""mosaic_gpu's forward with and without the split walk for segmented workloads, on the GPU machine.

    python benchmarks/lightning_mosaic_plans.py --workloads b1-t32k-h16-d128,b1-t128k-h16-d128 \
        --out benchmarks/results/h200_lightning_mosaic_segment_plans_DATE.json

Times `lightning_attention(implementation="mosaic_gpu")` forward and forward+backward (jax.vjp) with
mosaic_gpu.SPLIT_SEGMENTS off (segmented workloads walk two Dv blocks per program) and on (one block per
program, the split walk, fewer segments), in interleaved rounds (median wall time of back-to-back jitted
calls) and by GPU time (timing.gpu_time_ms: the sum of the GPU activities' durations per call). Prints
each plan, each figure against the forward's HBM floor at the copy kernel's GPU-time bandwidth, and the
largest difference between the two plans' outputs and gradients.

The flag is read when a call is traced. Since session 13 it moves only the plain forward's plan (the
forward that stores S_in under differentiation keeps two blocks per program); the first run of this
script (results/h200_lightning_mosaic_segment_plans_2026-12-02.json) was made when it moved both.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lightning import LAYER_IDX, NUM_LAYERS, _inputs  # noqa: E402
from timing import (  # noqa: E402
    add_run_arguments,
    copy_bandwidth_gbs,
    environment,
    fwd_and_fwd_bwd,
    gpu_time_ms,
    time_call,
)
from workloads import WORKLOADS  # noqa: E402

VARIANTS = (("2wg-segments", False), ("split-segments", True))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, "b1-t32k-h16-d128,b1-t128k-h16-d128")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import shardattn
    from shardattn.kernels.lightning import mosaic_gpu as mg

    bw, bw_gpu = copy_bandwidth_gbs(), copy_bandwidth_gbs(gpu_time=True)
    print(f"copy {bw:.0f} GB/s by wall time, {bw_gpu:.0f} GB/s by GPU time", flush=True)
    rows = []
    default = mg.SPLIT_SEGMENTS
    for name in args.workloads.split(","):
        w = WORKLOADS[name]
        q, k, v, do = _inputs(w)
        slopes = shardattn.decay_slopes(w.H, LAYER_IDX, NUM_LAYERS)
        fns, outs = {}, {}
        try:
            for variant, flag in VARIANTS:
                mg.SPLIT_SEGMENTS = flag
                f, fb = fwd_and_fwd_bwd(lambda q, k, v, slopes=slopes: shardattn.lightning_attention(
                    q, k, v, slopes=slopes, implementation="mosaic_gpu"))  # fmt: skip
                outs[variant] = (f(q, k, v), fb(q, k, v, do))  # traced now, with the flag set
                fns[variant + " fwd"], fns[variant + " fwd+bwd"] = f, fb
                print(name, variant, "plan (NW, P)", mg._plan(w.B, w.H, w.D, w.T // mg.CHUNK), flush=True)
        finally:
            mg.SPLIT_SEGMENTS = default

        def operands(n, q=q, k=k, v=v, do=do):
            return (q, k, v, do) if "bwd" in n else (q, k, v)

        samples = {n: [] for n in fns}
        for _ in range(args.rounds):
            for n, f in fns.items():
                samples[n].append(time_call(f, *operands(n), warmup=1, repeats=1, inner=args.inner))
        floor = w.bytes_qkvo() / (bw_gpu * 1e9) * 1e3
        for n, f in fns.items():
            g = gpu_time_ms(f, *operands(n))
            rows.append(dict(workload=name, fn=n, wall_ms=statistics.median(samples[n]),
                             gpu_ms=g["kernel_ms"], span_ms=g["span_ms"], floor_gpu_ms=floor))  # fmt: skip
        a, b = (jax.tree.leaves(outs[variant]) for variant, _ in VARIANTS)
        diff = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
                   for x, y in zip(a, b, strict=True))  # fmt: skip
        rows.append(dict(workload=name, fn="max |difference| between the plans (o, dq, dk, dv)", value=diff))
    for r in rows:
        if "value" in r:
            print(f"{r['workload']:18s} {r['fn']}: {r['value']:.3g}")
        else:
            print(f"{r['workload']:18s} {r['fn']:24s} wall {r['wall_ms']:.3f} ms  GPU {r['gpu_ms']:.3f} ms "
                  f"({r['gpu_ms'] / r['floor_gpu_ms']:.2f}x the forward's floor)  span {r['span_ms']:.3f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({**environment(), "copy_bandwidth_gbs": bw, "copy_bandwidth_gpu_time_gbs": bw_gpu,
                       "rows": rows}, fh, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()

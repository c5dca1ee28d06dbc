"""The Mosaic GPU walks alone, under each program plan, on the GPU machine: what bounds them.

    python benchmarks/lightning_mosaic_walks.py --out benchmarks/results/h200_lightning_mosaic_walks_DATE.json
    M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct
    ncu --clock-control none --csv --log-file ncu.csv --metrics $M \
        python benchmarks/lightning_mosaic_walks.py --once        # each walk launched twice, nothing timed
    python benchmarks/lightning_mosaic_walks.py --ncu-summary ncu.csv   # those metrics, kernels over 20 us

Times the forward walk (plain and storing S_in of every chunk, as under differentiation) and the G walk
(kernels of mosaic_gpu.py, called directly, unsegmented: P = 1) with one compute warpgroup split in two
(state / output, "1s"), one doing both ("1f") and two Dv blocks per program ("2f"), in interleaved rounds
(medians of wall time of back-to-back jitted calls) and by GPU time (timing.gpu_time_ms). Beside each: its
HBM floor (bytes it must move once, at the copy bandwidth measured in the same run) and the bytes it
moves if every program reads its q, k (forward) or q (G walk) itself, i.e. if the programs of one
(sequence, head) share nothing in L2: what `ncu`'s dram__bytes_read then tells apart.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import add_run_arguments, copy_bandwidth_gbs, environment, gpu_time_ms, time_call  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

LAYER_IDX, NUM_LAYERS = 2, 8
PLANS = {"1s": (1, True), "1f": (1, False), "2f": (2, False)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, "b4-t8k-h16-d128")
    p.add_argument("--plans", default="1s,1f,2f", help=f"comma-separated from {sorted(PLANS)}")
    p.add_argument("--once", action="store_true", help="launch each walk twice and time nothing (for ncu)")
    p.add_argument("--ncu-summary", default=None, help="print an ncu --csv log's kernels over 20 us and exit")
    args = p.parse_args(argv)
    if args.ncu_summary:
        return ncu_summary(args.ncu_summary)

    import jax
    import jax.numpy as jnp

    import shardattn
    from shardattn.kernels.lightning import mosaic_gpu as mg

    bw = None if args.once else copy_bandwidth_gbs()
    rows = []
    for name in args.workloads.split(","):
        w = WORKLOADS[name]
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        q, k, v, do = (jax.random.normal(kk, (w.B, w.T, w.H, w.D), jnp.float32).astype(w.dtype)
                       for kk in keys)  # fmt: skip
        slopes = jnp.asarray(shardattn.decay_slopes(w.H, LAYER_IDX, NUM_LAYERS), jnp.float32)
        g0 = jax.random.normal(jax.random.PRNGKey(5), (w.B, w.H, 1, w.D, w.D), jnp.float32)
        fns = walk_fns(mg, slopes, g0, w.D**-0.5, args.plans.split(","))
        for f in fns.values():  # compile, and the first launch
            jax.block_until_ready(f(q, k, v, do))
        if args.once:
            for f in fns.values():
                jax.block_until_ready(f(q, k, v, do))
            print("launched:", ", ".join(fns))
            continue
        samples = {n: [] for n in fns}
        for _ in range(args.rounds):
            for n, f in fns.items():
                samples[n].append(time_call(f, q, k, v, do, warmup=1, repeats=1, inner=args.inner))
        ms = {n: statistics.median(x) for n, x in samples.items()}
        gpu = {n: gpu_time_ms(f, q, k, v, do) for n, f in fns.items()}
        x = w.B * w.T * w.H * w.D * 2  # bytes of one of q, k, v, o, dO
        state = w.B * w.H * (w.T // mg.CHUNK) * w.D * w.D * 2  # S_in or G of every chunk, bf16
        nv = w.D // mg.BV  # one-block programs per (sequence, head)
        floor = {"forward": 4 * x, "storing forward": 4 * x + state, "G walk": 2 * x + state}
        unshared = {"forward": (2 * x) * nv + 2 * x, "G walk": x * nv + x + state}  # (NW = 1)
        unshared["storing forward"] = unshared["forward"] + state
        for n, m in ms.items():
            kind, plan = n.rsplit(" ", 1)
            moved = unshared[kind] if PLANS[plan][0] == 1 else floor[kind]
            rows.append(dict(workload=name, walk=n, ms=m, gpu=gpu[n], floor_ms=floor[kind] / (bw * 1e9) * 1e3,
                             unshared_bytes_ms=moved / (bw * 1e9) * 1e3))  # fmt: skip
    if args.once:
        return
    print(f"{environment()['device']}, copy {bw:.0f} GB/s; wall ms (÷ floor), GPU time ms (÷ floor; span, "
          f"dispatch), and the bytes moved if each program reads q, k itself, at that bandwidth")
    for r in rows:
        g = r["gpu"]
        print(f"{r['workload']:18s} {r['walk']:22s} {r['ms']:.3f} ({r['ms'] / r['floor_ms']:.2f})  "
              f"{g['kernel_ms']:.3f} ({g['kernel_ms'] / r['floor_ms']:.2f}; {g['span_ms']:.3f}, "
              f"{g['dispatch_ms']:.3f})  {r['unshared_bytes_ms']:.3f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({**environment(), "copy_bandwidth_gbs": bw, "rows": rows}, fh, indent=1)


def ncu_summary(path):
    """One line per kernel of an `ncu --csv` log that ran 20 us or more: its duration, DRAM bytes read and
    written, their rate, and the L2 hit rate (the metrics in the module docstring's command)."""
    import csv

    with open(path) as fh:
        rows = list(csv.reader(fh))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
    names = ("ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value")
    col = {n: rows[start].index(n) for n in names}
    kernels = {}
    for r in rows[start + 1:]:
        if len(r) == len(rows[start]):
            kernels.setdefault(r[col["ID"]], {"name": r[col["Kernel Name"]]})[r[col["Metric Name"]]] = (
                float(r[col["Metric Value"]].replace(",", "")), r[col["Metric Unit"]])
    to_base = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9,
               "%": 1}  # fmt: skip

    def value(k, metric):
        v, unit = k.get(metric, (float("nan"), ""))
        return v * to_base.get(unit, float("nan"))

    for i, k in kernels.items():
        seconds = value(k, "gpu__time_duration.sum")
        if not seconds >= 20e-6:
            continue
        rd, wr = value(k, "dram__bytes_read.sum"), value(k, "dram__bytes_write.sum")
        print(f"{i:>4} {k['name'][:40]:40s} {seconds * 1e6:8.1f} us  DRAM read {rd / 1e9:.3f} GB, write "
              f"{wr / 1e9:.3f} GB ({(rd + wr) / seconds / 1e9:.0f} GB/s), L2 hit "
              f"{value(k, 'lts__t_sector_hit_rate.pct'):.1f} %")


def walk_fns(mg, slopes, g0, scale, plans):
    """{"<walk> <plan>": jitted (q, k, v, dO) -> the walk's outputs} for each plan."""
    import jax

    def forward(NW, store, split):
        return jax.jit(lambda q, k, v, do: mg._walk(q, k, v, slopes, None, scale=scale, P=1, NW=NW,
                                                    store_states=store, split=split))  # fmt: skip

    def g_walk(NW):
        return jax.jit(lambda q, k, v, do: mg._g_walk_kernel(q, do, slopes, g0, scale=scale, P=1, NW=NW))

    fns = {}
    for plan in plans:
        NW, split = PLANS[plan]
        fns[f"forward {plan}"] = forward(NW, False, split)
        fns[f"storing forward {plan}"] = forward(NW, True, split)
        if not split:  # (the G walk has one chain: nothing to split)
            fns[f"G walk {plan}"] = g_walk(NW)
    return fns


if __name__ == "__main__":
    main()

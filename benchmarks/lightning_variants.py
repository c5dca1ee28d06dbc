"""Times copies of the Triton lightning backend against each other in one run (A/B of kernel changes).

    python benchmarks/lightning_variants.py --variant prev=/path/to/old/triton.py --out results.json
    python benchmarks/lightning_variants.py --blocks w4=fwd_warps=4,fwd_bv=32 --fwd-only

Each `--variant NAME=FILE` is a copy of kernels/lightning/triton.py (e.g. `git show REV:kernels/lightning/
triton.py > old.py`), loaded as its own module; `current` is always the installed backend. Each
`--blocks NAME=FIELD=VALUE,...` is a fresh copy of the installed backend (`--blocks NAME:OTHER=...`: of
the file of the variant OTHER) whose default BlockSizes have those fields replaced, for every head dim
and dtype. Every variant is timed on the same inputs (forward, forward+backward, wall time of
back-to-back jitted calls), with the copy bandwidth of the run and each variant's ratio to `current`,
and its outputs are compared with `current`'s (relative RMS). The variants of a workload are timed
in interleaved rounds (round r times every variant once, in turn), so that drift of the clocks or of the
machine over the run falls on all of them alike; each figure is the median over its rounds.
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lightning import LAYER_IDX, NUM_LAYERS, _inputs  # noqa: E402
from timing import add_run_arguments  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def load_variant(name, path):
    """A copy of triton.py, loaded as its own module (own kernels, own globals)."""
    spec = importlib.util.spec_from_file_location(f"shardattn.kernels.lightning._variant_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def blocks_variant(name, change, path):
    """A fresh copy of the backend file `path`; its BlockSizes.get_default replaces the fields in `change`."""
    import dataclasses

    module = load_variant(name, path)
    default = module.BlockSizes.get_default

    def get_default(dk, dv, dtype):
        return dataclasses.replace(default(dk, dv, dtype), **change)

    module.BlockSizes.get_default = staticmethod(get_default)
    return module


def build_variant(module, w, inputs):
    """(jitted forward, jitted forward+backward, their arguments) of `module` on `inputs` (q, k, v, dO)."""
    import jax.numpy as jnp
    from timing import fwd_and_fwd_bwd

    import shardattn

    q, k, v, do = inputs
    slopes = jnp.asarray(shardattn.decay_slopes(w.H, LAYER_IDX, NUM_LAYERS))
    scale = w.D**-0.5

    def attn(q, k, v):
        return module.lightning_attention(q, k, v, slopes, scale=scale)[0]

    fwd, fwd_bwd = fwd_and_fwd_bwd(attn)
    return fwd, fwd_bwd, (q, k, v, do)


def time_interleaved(built, warmup, rounds, inner, fwd_only=False):
    """{name: {"fwd_ms", "fwd_bwd_ms"}}: medians over rounds, each round timing every variant in turn
    (fwd_bwd_ms is NaN with fwd_only)."""
    from timing import time_call

    samples = {name: {"fwd_ms": [], "fwd_bwd_ms": []} for name in built}
    for fwd, fwd_bwd, args in built.values():  # warm-up (and compilation) before any timing
        time_call(fwd, *args[:3], warmup=warmup, repeats=1, inner=1)
        if not fwd_only:
            time_call(fwd_bwd, *args, warmup=warmup, repeats=1, inner=1)
    for _ in range(rounds):
        for name, (fwd, fwd_bwd, args) in built.items():
            samples[name]["fwd_ms"].append(time_call(fwd, *args[:3], warmup=1, repeats=1, inner=inner))
            samples[name]["fwd_bwd_ms"].append(
                float("nan") if fwd_only else time_call(fwd_bwd, *args, warmup=1, repeats=1, inner=inner))
    return {name: {key: statistics.median(values) for key, values in per.items()}
            for name, per in samples.items()}


def rel_rms(a, b):
    """Relative RMS difference of two arrays (float32)."""
    import jax.numpy as jnp

    a, b = (jnp.asarray(x, jnp.float32) for x in (a, b))
    return float(jnp.sqrt(jnp.mean((a - b) ** 2) / jnp.maximum(jnp.mean(b**2), 1e-30)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[], help="NAME=FILE (a copy of triton.py)")
    p.add_argument("--blocks", action="append", default=[],
                   help="NAME[:OTHER]=FIELD=VALUE,... (the backend, or variant OTHER, with these BlockSizes)")
    p.add_argument("--fwd-only", action="store_true", help="time the forward only; compare outputs only")
    add_run_arguments(p, "b4-t8k-h16-d128,b1-t32k-h16-d128,b8-t4k-h32-d64")
    args = p.parse_args(argv)

    import jax
    from timing import copy_bandwidth_gbs, environment

    from shardattn.kernels.lightning import triton as current

    variants = {"current": current}
    for item in args.variant:
        name, path = item.split("=", 1)
        variants[name] = load_variant(name, path)
    for item in args.blocks:
        name, fields = item.split("=", 1)
        name, _, other = name.partition(":")
        change = {key: int(value) for key, value in (f.split("=") for f in fields.split(","))}
        variants[name] = blocks_variant(name, change, variants[other or "current"].__file__)
    bw = copy_bandwidth_gbs()
    print(f"device: {jax.devices()[0].device_kind}; copy bandwidth {bw:.0f} GB/s", flush=True)
    rows = []
    for wname in [n for n in args.workloads.split(",") if n]:
        w = WORKLOADS[wname]
        floor = w.bytes_qkvo() / (bw * 1e9) * 1e3
        built, inputs = {}, _inputs(w)  # one set of inputs for every variant
        for vname, module in variants.items():
            try:
                built[vname] = build_variant(module, w, inputs)
                fwd, fwd_bwd, fargs = built[vname]  # compile now: a failure shows here
                jax.block_until_ready(fwd(*fargs[:3]) if args.fwd_only else fwd_bwd(*fargs))
            except Exception as err:  # a variant that does not build is reported, not fatal
                print(f"  {wname:18s} {vname:10s} FAILED: {type(err).__name__}: {str(err)[:300]}", flush=True)
                built.pop(vname, None)
        times = time_interleaved(built, args.warmup, args.rounds, args.inner, args.fwd_only)
        base = None
        for vname, (fwd, fwd_bwd, fargs) in built.items():
            if args.fwd_only:
                values = (fwd(*fargs[:3]),)
            else:
                o, grads = fwd_bwd(*fargs)
                values = (o,) + tuple(grads)
            base = values if base is None else base
            r = dict(times[vname])
            # Agreement with `current` (relative RMS of o, dq, dk, dv): a variant must compute the same.
            r["rel_rms_vs_current"] = [rel_rms(a, b) for a, b in zip(values, base, strict=True)]
            rows.append(dict(workload=wname, variant=vname, floor_fwd_ms=floor, **r))
            print(f"  {wname:18s} {vname:10s} fwd {r['fwd_ms']:.3f} ms  fwd+bwd {r['fwd_bwd_ms']:.3f} ms  "
                  f"max rel RMS vs current {max(r['rel_rms_vs_current']):.1e}", flush=True)
    print(f"\n{jax.devices()[0].device_kind}, copy bandwidth {bw:.0f} GB/s; ratios to 'current'")
    cur = {r["workload"]: r for r in rows if r["variant"] == "current"}
    for r in rows:
        c = cur[r["workload"]]
        print(f"{r['workload']:18s} {r['variant']:10s} "
              f"fwd {r['fwd_ms']:.3f} ({r['fwd_ms'] / c['fwd_ms']:.2f}x)"
              f"  fwd+bwd {r['fwd_bwd_ms']:.3f} ({r['fwd_bwd_ms'] / c['fwd_bwd_ms']:.2f}x)"
              f"  fwd/floor {r['fwd_ms'] / r['floor_fwd_ms']:.2f}  err {max(r['rel_rms_vs_current']):.0e}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({**environment(), "copy_bandwidth_gbs": bw, "variants": list(variants),
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

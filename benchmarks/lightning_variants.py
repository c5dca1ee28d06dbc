"""Times copies of the Triton lightning backend against each other in one run (A/B of kernel changes).

    python benchmarks/lightning_variants.py --variant prev=/path/to/old/triton.py --out results.json

Each `--variant NAME=FILE` is a copy of kernels/lightning/triton.py (e.g. `git show REV:kernels/lightning/
triton.py > old.py`), loaded as its own module; `current` is always the installed backend. Every variant
is timed on the same inputs (forward, forward+backward, wall time of back-to-back jitted calls), with the
copy bandwidth of the run and each variant's ratio to `current`.
"""

import argparse
import importlib.util
import json
import os
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


def time_variant(module, w, warmup, rounds, inner):
    import jax.numpy as jnp
    from timing import fwd_and_fwd_bwd, time_fwd_bwd

    import shardattn

    q, k, v, do = _inputs(w)
    slopes = jnp.asarray(shardattn.decay_slopes(w.H, LAYER_IDX, NUM_LAYERS))
    scale = w.D**-0.5

    def attn(q, k, v):
        return module.lightning_attention(q, k, v, slopes, scale=scale)[0]

    times = time_fwd_bwd(attn, q, k, v, do, warmup=warmup, rounds=rounds, inner=inner)
    o, grads = fwd_and_fwd_bwd(attn)[1](q, k, v, do)
    return times, (o,) + tuple(grads)


def rel_rms(a, b):
    """Relative RMS difference of two arrays (float32)."""
    import jax.numpy as jnp

    a, b = (jnp.asarray(x, jnp.float32) for x in (a, b))
    return float(jnp.sqrt(jnp.mean((a - b) ** 2) / jnp.maximum(jnp.mean(b**2), 1e-30)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[], help="NAME=FILE (a copy of triton.py)")
    add_run_arguments(p, "b4-t8k-h16-d128,b1-t32k-h16-d128,b8-t4k-h32-d64")
    args = p.parse_args(argv)

    import jax
    from timing import copy_bandwidth_gbs, environment

    from shardattn.kernels.lightning import triton as current

    variants = {"current": current}
    for item in args.variant:
        name, path = item.split("=", 1)
        variants[name] = load_variant(name, path)
    bw = copy_bandwidth_gbs()
    print(f"device: {jax.devices()[0].device_kind}; copy bandwidth {bw:.0f} GB/s", flush=True)
    rows = []
    for wname in [n for n in args.workloads.split(",") if n]:
        w = WORKLOADS[wname]
        floor = w.bytes_qkvo() / (bw * 1e9) * 1e3
        base = None
        for vname, module in variants.items():
            try:
                r, values = time_variant(module, w, args.warmup, args.rounds, args.inner)
            except Exception as err:  # a variant that does not build is reported, not fatal
                print(f"  {wname:18s} {vname:10s} FAILED: {type(err).__name__}: {str(err)[:300]}", flush=True)
                continue
            base = values if base is None else base
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

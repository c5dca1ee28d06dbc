"""Times the softmax Triton backend against cuDNN and JAX's Pallas mha in the same run (issue 14's targets).

    python benchmarks/attention_triton.py                       # GPU: every workload, triton / cudnn / pallas
    python benchmarks/attention_triton.py --workloads causal-b1-t32k-h16-d128 --impl triton \
        --triton-blocks "fwd_q=128,fwd_k=128;dkdv_q=64,dkdv_k=128"   # block-size variants of triton
    python benchmarks/attention_triton.py --quick               # CPU smoke run (triton rows say why not)

Rows: `triton` (shardattn.flash_attention(implementation="triton"), or the backend directly with other
BlockSizes), `cudnn` (jax.nn.dot_product_attention(implementation="cudnn"), where it serves the features),
`pallas` (jax.experimental.pallas.ops.gpu.attention.mha, causal / full only; k and v repeated for GQA, as
it has no GQA) and optionally `xla`. Rates count the matmul FLOPs of the allowed pairs (causal about half
the square): forward 4·B·H·D·pairs, forward+backward 3.5x that, printed next to the bf16 matmul rate
and the copy bandwidth measured in the same run. Extra workloads beyond benchmarks/workloads.py: sinks,
packed segments (8 x 4K in 32K, cu_seqlens) and soft cap at 32K, which the issue asks to be within 10%
of plain causal's time. Writes JSON under benchmarks/results/.
"""

import argparse
import dataclasses
import datetime
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention import matmul_tflops, quick_version  # noqa: E402
from workloads import ATTENTION_WORKLOADS, AttentionWorkload  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass(frozen=True)
class Extra:
    """Features of a workload that AttentionWorkload has no field for."""

    sinks: int = 0  # sinks per head
    packed: int = 0  # equal sequences packed into T (cu_seqlens)


WORKLOADS = {name: (w, Extra()) for name, w in ATTENTION_WORKLOADS.items()}
_T32K = AttentionWorkload(1, 32768, 16, 16, 128)
WORKLOADS.update({
    "softcap50-b1-t32k-h16-d128": (dataclasses.replace(_T32K, soft_cap=50.0), Extra()),
    "sinks-b1-t32k-h16-d128": (_T32K, Extra(sinks=1)),
    "packed8x4k-b1-t32k-h16-d128": (_T32K, Extra(packed=8)),
})  # fmt: skip


def pairs(w: AttentionWorkload, extra: Extra) -> int:
    if extra.packed:
        return extra.packed * dataclasses.replace(w, T=w.T // extra.packed).allowed_pairs()
    return w.allowed_pairs()


def _inputs(w: AttentionWorkload, extra: Extra, seed=0):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    dt = jnp.dtype(w.dtype)
    q = jax.random.normal(keys[0], (w.B, w.T, w.H, w.D), jnp.float32).astype(dt)
    k = jax.random.normal(keys[1], (w.B, w.T, w.Hkv, w.D), jnp.float32).astype(dt)
    v = jax.random.normal(keys[2], (w.B, w.T, w.Hkv, w.D), jnp.float32).astype(dt)
    do = jax.random.normal(keys[3], (w.B, w.T, w.H, w.D), jnp.float32).astype(dt)
    kw = {}
    if extra.sinks:
        kw["sinks"] = jax.random.normal(keys[4], (w.H, extra.sinks), jnp.float32)
    if extra.packed:
        cu = jnp.arange(extra.packed + 1, dtype=jnp.int32) * (w.T // extra.packed)
        kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu)
    return q, k, v, do, kw


def _callable(impl: str, w: AttentionWorkload, extra: Extra, kw: dict, blocks):
    """attn(q, k, v) -> o for one row, or NotImplementedError."""
    import jax.numpy as jnp

    import shardattn

    if impl == "pallas":
        if w.window is not None or w.soft_cap is not None or extra.sinks or extra.packed:
            raise NotImplementedError("pallas mha has only causal / full masks")
        from jax.experimental.pallas.ops.gpu.attention import mha

        group = w.H // w.Hkv

        def attn(q, k, v):
            if group > 1:  # mha has no GQA
                k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
            return mha(q, k, v, None, sm_scale=w.D**-0.5, causal=w.causal)

        return attn
    api = dict(causal=w.causal, sliding_window=w.window, logits_soft_cap=w.soft_cap, **kw)
    if impl == "triton" and blocks is not None:
        from shardattn.attention import check_and_derive
        from shardattn.kernels.attention import triton as triton_backend

        def attn(q, k, v):
            keywords, _ = check_and_derive(
                q, k, v, scale=None, bias=None, q_segment_ids=None, kv_segment_ids=None, q_positions=None,
                kv_positions=None, dropout_rate=0.0, dropout_rng=None, implementation="triton",
                cu_seqlens_q=api.get("cu_seqlens_q"), cu_seqlens_k=api.get("cu_seqlens_k"),
                causal=w.causal, sliding_window=w.window, logits_soft_cap=w.soft_cap, sinks=api.get("sinks"),
            )  # fmt: skip
            return triton_backend.attention(q, k, v, **keywords, block_sizes=blocks)[0]

        return attn

    def attn(q, k, v):
        return shardattn.flash_attention(q, k, v, implementation=impl, **api)

    return attn


def time_row(impl, w, extra, blocks, warmup, rounds, inner) -> dict:
    from timing import time_fwd_bwd

    q, k, v, do, kw = _inputs(w, extra)
    attn = _callable(impl, w, extra, kw, blocks)
    return time_fwd_bwd(attn, q, k, v, do, warmup=warmup, rounds=rounds, inner=inner)


def parse_blocks(spec: str):
    """ "fwd_q=128,fwd_k=128;dq_q=64" -> [BlockSizes] (each over the defaults of the workload's head dim)."""
    variants = []
    for part in (p for p in spec.split(";") if p.strip()):
        fields = {}
        for item in part.split(","):
            key, value = item.split("=")
            fields[key.strip()] = int(value)
        variants.append(fields)
    return variants


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", default="triton,cudnn,pallas", help="comma-separated: triton,cudnn,pallas,xla")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"from {list(WORKLOADS)}")
    p.add_argument(
        "--triton-blocks", default="", help="more triton rows: BlockSizes fields, ';' between rows"
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny CPU-sized versions of the workloads (smoke run)"
    )
    p.add_argument(
        "--out", default=None, help="JSON (default benchmarks/results/attention_triton_<device>_<date>.json)"
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (median taken)")
    p.add_argument("--inner", type=int, default=5, help="back-to-back calls per round")
    args = p.parse_args(argv)
    names = [n for n in args.workloads.split(",") if n]
    for n in names:
        if n not in WORKLOADS:
            p.error(f"unknown workload {n!r}; known: {list(WORKLOADS)}")
    workloads = {n: WORKLOADS[n] for n in names}
    if args.quick:
        workloads = {
            n: (quick_version(w), e if not e.packed else Extra(packed=2)) for n, (w, e) in workloads.items()
        }
        args.warmup, args.rounds, args.inner = 1, 2, 1

    import jax
    from timing import copy_bandwidth_gbs, environment

    from shardattn.kernels.attention import triton as triton_backend

    device = jax.devices()[0]
    dtype = next(iter(workloads.values()))[0].dtype
    bw = copy_bandwidth_gbs(nbytes=(1 << 24) if args.quick else (1 << 30))
    rate = matmul_tflops(dtype, 512 if args.quick else 8192)
    print(f"device: {device.device_kind} ({jax.default_backend()}); {dtype} matmul {rate:.1f} TFLOP/s; "
          f"copy bandwidth {bw:.0f} GB/s (read + write)", flush=True)  # fmt: skip

    variants = [(impl, None) for impl in args.impl.split(",") if impl]
    variants += [("triton", fields) for fields in parse_blocks(args.triton_blocks)]
    rows = []
    for name, (w, extra) in workloads.items():
        for impl, fields in variants:
            label = (
                impl if fields is None else "triton[" + ",".join(f"{k}={v}" for k, v in fields.items()) + "]"
            )
            blocks = None
            if fields is not None:
                base = triton_backend.BlockSizes.get_default(w.D, w.D, w.dtype)
                blocks = dataclasses.replace(base, **fields)
            try:
                r = time_row(impl, w, extra, blocks, args.warmup, args.rounds, args.inner)
            except NotImplementedError as err:  # a backend that does not serve the features: say why
                r = {"fwd_ms": None, "fwd_bwd_ms": None, "error": f"NotImplementedError: {str(err)[:300]}"}
            except Exception as err:  # one failing row must not lose the others
                r = {"fwd_ms": None, "fwd_bwd_ms": None, "error": f"{type(err).__name__}: {str(err)[:500]}"}
            flops = 4 * w.B * w.H * w.D * pairs(w, extra)
            r["fwd_tflops"] = flops / (r["fwd_ms"] * 1e-3) / 1e12 if r["fwd_ms"] else None
            r["fwd_bwd_tflops"] = 3.5 * flops / (r["fwd_bwd_ms"] * 1e-3) / 1e12 if r["fwd_bwd_ms"] else None
            r["floor_fwd_ms"] = flops / (rate * 1e12) * 1e3  # the matmul FLOPs at the measured matmul rate
            rows.append(dict(workload=name, impl=label, **r))
            fwd, both = r["fwd_ms"] or float("nan"), r["fwd_bwd_ms"] or float("nan")
            print(f"  {name:30s} {label:10s} fwd {fwd:9.3f} ms  fwd+bwd {both:9.3f} ms  "
                  f"{r.get('error', '')[:150]}", flush=True)  # fmt: skip

    by = {(r["workload"], r["impl"]): r for r in rows}
    for r in rows:
        base = by.get((r["workload"], "cudnn"))
        causal = by.get(("causal-b1-t32k-h16-d128", r["impl"]))
        for key in ("fwd_ms", "fwd_bwd_ms"):
            ok = base and base[key] and r[key]
            r[f"{key[:-3]}_vs_cudnn"] = r[key] / base[key] if ok else None
            ok = causal and causal[key] and r[key] and r["workload"].endswith("b1-t32k-h16-d128")
            r[f"{key[:-3]}_vs_causal32k"] = r[key] / causal[key] if ok else None

    def num(x, width, prec=3):
        return f"{x:{width}.{prec}f}" if x is not None else f"{'n/a':>{width}s}"

    print(f"\n{device.device_kind}: {dtype} matmul {rate:.1f} TFLOP/s, copy bandwidth {bw:.0f} GB/s")
    print(f"{'workload':30s} {'impl':10s} {'fwd ms':>9s} {'TFLOP/s':>8s} {'/cudnn':>7s} {'/causal':>7s} "
          f"{'fwd+bwd ms':>10s} {'TFLOP/s':>8s} {'/cudnn':>7s} {'/causal':>7s}")  # fmt: skip
    for r in rows:
        print(f"{r['workload']:30s} {r['impl'][:10]:10s} {num(r['fwd_ms'], 9)} {num(r['fwd_tflops'], 8, 1)} "
              f"{num(r['fwd_vs_cudnn'], 7, 2)} {num(r['fwd_vs_causal32k'], 7, 2)} {num(r['fwd_bwd_ms'], 10)} "
              f"{num(r['fwd_bwd_tflops'], 8, 1)} {num(r['fwd_bwd_vs_cudnn'], 7, 2)} "
              f"{num(r['fwd_bwd_vs_causal32k'], 7, 2)}")  # fmt: skip

    out = args.out
    if out is None and not args.quick:
        slug = device.device_kind.lower().replace(" ", "-")
        out = os.path.join(RESULTS, f"attention_triton_{slug}_{datetime.date.today().isoformat()}.json")
    if out:
        result = {
            **environment(),
            "copy_bandwidth_gbs": bw,
            "matmul_tflops": {"dtype": dtype, "rate": rate},
            "timing": {
                "warmup": args.warmup,
                "rounds": args.rounds,
                "inner": args.inner,
                "quick": args.quick,
            },
            "workloads": {
                n: dict(dataclasses.asdict(w), **dataclasses.asdict(e)) for n, (w, e) in workloads.items()
            },
            "rows": rows,
        }
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Times serving: one lightning decode step against the HBM floor, and packed prefill against a request loop.

    python benchmarks/serving.py                 # GPU: table, JSON under benchmarks/results/
    python benchmarks/serving.py --quick         # CPU smoke run of this script, seconds

Decode: B = 64 and 256 rows, H = 64, Dk = Dv = 128, bf16 q/k/v, a float32 cache of 1024 slots, distinct
random slots, the cache donated to a jitted step (in place; the script checks the buffer stays the same).
The floor is the bytes a step must move, each used slot's state read once and written once plus q, k, v
and o, over the device copy bandwidth measured in the same run (benchmarks/timing.py). The Triton kernel's
block sizes are swept (`--no-sweep` to skip). Prefill: 16 requests of 2K tokens packed into one
lightning_prefill call against 16 calls of one request each (vLLM's Python loop), each request continuing
from its slot.
"""

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from timing import copy_bandwidth_gbs, environment  # noqa: E402

import shardattn  # noqa: E402

LAYER_IDX, NUM_LAYERS = 3, 24
SCALE = 128**-0.5

FULL = dict(
    decode_batches=(64, 256),
    H=64,
    Hkv=64,
    D=128,
    num_slots=1024,
    dtype="bfloat16",
    prefill_requests=16,
    prefill_len=2048,
    impls=("triton", "xla"),
    warmup=3,
    rounds=7,
    inner=10,
)
QUICK = dict(
    decode_batches=(4, 8),
    H=4,
    Hkv=2,
    D=16,
    num_slots=32,
    dtype="float32",
    prefill_requests=4,
    prefill_len=40,
    impls=("xla", "reference"),
    warmup=1,
    rounds=2,
    inner=2,
)
# Triton decode block sizes tried by the sweep: (columns of Dv per program, warps).
SWEEP = ((16, 2), (32, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8))


def _random(key, shape, dtype, scale=1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def time_steps(step, args, cache, *, warmup, rounds, inner):
    """Median ms of one call of step(*args[:3], cache, *args[3:]) -> (o, cache), the cache threaded
    through (donated), `inner` calls per round. Returns (ms, cache, whether the buffer stayed in place)."""
    q, k, v, *rest = args
    pointer = _pointer(cache)
    for _ in range(warmup):
        o, cache = step(q, k, v, cache, *rest)
    jax.block_until_ready(cache)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(inner):
            o, cache = step(q, k, v, cache, *rest)
        jax.block_until_ready((o, cache))
        times.append((time.perf_counter() - start) / inner)
    return 1e3 * statistics.median(times), cache, pointer is not None and _pointer(cache) == pointer


def _pointer(x):
    try:
        return x.unsafe_buffer_pointer()
    except Exception:  # not every platform / sharding exposes it
        return None


def decode_bytes(B, H, Hkv, D, itemsize):
    """Fewest bytes one decode step moves: used states read + written (float32), q, k, v read, o written."""
    return B * H * D * D * 4 * 2 + itemsize * B * D * (2 * H + 2 * Hkv) + 4 * B


def bench_decode(cfg, bw, sweep):
    H, Hkv, D, NS = cfg["H"], cfg["Hkv"], cfg["D"], cfg["num_slots"]
    dtype = jnp.dtype(cfg["dtype"])
    timing = dict(warmup=cfg["warmup"], rounds=cfg["rounds"], inner=cfg["inner"])
    slopes = jnp.asarray(shardattn.decay_slopes(H, LAYER_IDX, NUM_LAYERS))
    rows, sweep_rows = [], []
    for B in cfg["decode_batches"]:
        keys = jax.random.split(jax.random.PRNGKey(B), 4)
        q = _random(keys[0], (B, H, D), dtype)
        k = _random(keys[1], (B, Hkv, D), dtype, D**-0.5)
        v = _random(keys[2], (B, Hkv, D), dtype)
        slot_idx = jnp.asarray(np.random.default_rng(B).permutation(NS)[:B], jnp.int32)
        cache0 = _random(keys[3], (NS, H, D, D), jnp.float32, 0.1)
        floor_ms = decode_bytes(B, H, Hkv, D, dtype.itemsize) / (bw * 1e9) * 1e3
        outputs = {}
        for impl in cfg["impls"]:
            fn = functools.partial(
                shardattn.lightning_decode, slopes=slopes, scale=SCALE, implementation=impl
            )
            step = jax.jit(fn, donate_argnums=3)
            try:
                outputs[impl] = step(q, k, v, jnp.array(cache0), slot_idx)
                ms, _, in_place = time_steps(step, (q, k, v, slot_idx), jnp.array(cache0), **timing)
                row = dict(
                    B=B, impl=impl, ms=ms, floor_ms=floor_ms, of_floor=ms / floor_ms, in_place=in_place
                )
            except Exception as err:  # one failing backend must not lose the others' figures
                row = dict(
                    B=B, impl=impl, ms=None, floor_ms=floor_ms, error=f"{type(err).__name__}: {err}"[:500]
                )
            rows.append(row)
            _print_decode(row)
        if len(outputs) > 1:  # agreement of the backends on this step (o and the updated slots)
            (a, (oa, ca)), (b, (ob, cb)) = list(outputs.items())[:2]
            rows[-1]["rel_err_vs_" + a] = dict(o=_rel(ob, oa), states=_rel(cb[slot_idx], ca[slot_idx]))
            print(
                f"    {b} vs {a}: o rel err {_rel(ob, oa):.2e}, states {_rel(cb[slot_idx], ca[slot_idx]):.2e}"
            )
        if sweep and "triton" in cfg["impls"]:
            from shardattn.kernels.lightning import triton_decode

            for bv, warps in SWEEP:
                blocks = triton_decode.BlockSizes(bv=bv, num_warps=warps)
                step = jax.jit(
                    functools.partial(triton_decode.decode, scale=SCALE, blocks=blocks), donate_argnums=3
                )
                try:
                    wrap = lambda q, k, v, c, s, step=step: step(q, k, v, c, s, slopes)
                    ms, _, _ = time_steps(wrap, (q, k, v, slot_idx), jnp.array(cache0), **timing)
                    row = dict(B=B, bv=bv, num_warps=warps, ms=ms, of_floor=ms / floor_ms)
                except Exception as err:
                    row = dict(
                        B=B, bv=bv, num_warps=warps, ms=None, error=f"{type(err).__name__}: {err}"[:300]
                    )
                sweep_rows.append(row)
                print(
                    f"    sweep B={B} bv={bv:3d} warps={warps}: "
                    f"{row['ms'] or float('nan'):.4f} ms ({row.get('of_floor', float('nan')):.2f}x floor)"
                )
    return rows, sweep_rows


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b**2)) + 1e-30))


def _print_decode(r):
    if r["ms"] is None:
        print(f"  decode B={r['B']:4d} {r['impl']:9s} failed: {r['error']}", flush=True)
    else:
        print(
            f"  decode B={r['B']:4d} {r['impl']:9s} {r['ms']:.4f} ms  floor {r['floor_ms']:.4f} ms  "
            f"{r['of_floor']:.2f}x  in place: {r['in_place']}",
            flush=True,
        )


def bench_prefill(cfg):
    H, Hkv, D, NS = cfg["H"], cfg["Hkv"], cfg["D"], cfg["num_slots"]
    N, L = cfg["prefill_requests"], cfg["prefill_len"]
    dtype = jnp.dtype(cfg["dtype"])
    keys = jax.random.split(jax.random.PRNGKey(7), 4)
    q = _random(keys[0], (1, N * L, H, D), dtype)
    k = _random(keys[1], (1, N * L, Hkv, D), dtype, D**-0.5)
    v = _random(keys[2], (1, N * L, Hkv, D), dtype)
    cache0 = _random(keys[3], (NS, H, D, D), jnp.float32, 0.1)
    slot_idx = jnp.asarray(np.random.default_rng(0).permutation(NS)[:N], jnp.int32)
    slopes = jnp.asarray(shardattn.decay_slopes(H, LAYER_IDX, NUM_LAYERS))
    rows = []
    for impl in cfg["impls"]:
        try:
            row = _prefill_impl(cfg, impl, q, k, v, cache0, slot_idx, slopes)
            print(
                f"  prefill {N}x{L} {impl:9s} one call {row['one_call_ms']:.3f} ms, {N} calls "
                f"{row['loop_ms']:.3f} ms: {row['speedup']:.2f}x (o rel err {row['rel_err']['o']:.1e})",
                flush=True,
            )
        except Exception as err:  # one failing backend must not lose the others' figures
            row = dict(impl=impl, one_call_ms=None, loop_ms=None, error=f"{type(err).__name__}: {err}"[:500])
            print(f"  prefill {impl}: failed: {row['error']}", flush=True)
        rows.append(row)
    return rows


def _prefill_impl(cfg, impl, q, k, v, cache0, slot_idx, slopes):
    """One packed lightning_prefill call against a Python loop of one call per request (compiled once)."""
    N, L = cfg["prefill_requests"], cfg["prefill_len"]
    timing = dict(warmup=cfg["warmup"], rounds=cfg["rounds"], inner=1)
    fn = functools.partial(shardattn.lightning_prefill, slopes=slopes, scale=SCALE, implementation=impl)
    cu = jnp.arange(N + 1, dtype=jnp.int32) * L
    cu_one = jnp.array([0, L], jnp.int32)
    packed = jax.jit(fn, donate_argnums=3)
    single = jax.jit(fn, donate_argnums=3)
    pieces = [tuple(x[:, i * L : (i + 1) * L] for x in (q, k, v)) for i in range(N)]
    slots = [slot_idx[i : i + 1] for i in range(N)]

    def one_call(q, k, v, cache, slot_idx):
        return packed(q, k, v, cache, slot_idx, cu)

    def loop(q, k, v, cache, slot_idx):
        outs = []
        for (qi, ki, vi), si in zip(pieces, slots, strict=True):
            o, cache = single(qi, ki, vi, cache, si, cu_one)
            outs.append(o)
        return jnp.concatenate(outs, axis=1), cache

    o_one, c_one = one_call(q, k, v, jnp.array(cache0), slot_idx)
    o_loop, c_loop = loop(q, k, v, jnp.array(cache0), slot_idx)
    err = dict(o=_rel(o_loop, o_one), states=_rel(c_loop, c_one))
    one_ms, _, _ = time_steps(one_call, (q, k, v, slot_idx), jnp.array(cache0), **timing)
    loop_ms, _, _ = time_steps(loop, (q, k, v, slot_idx), jnp.array(cache0), **timing)
    return dict(impl=impl, one_call_ms=one_ms, loop_ms=loop_ms, speedup=loop_ms / one_ms, rel_err=err)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, xla + reference: a CPU smoke run")
    p.add_argument("--impl", default=None, help="comma-separated backends (default triton,xla)")
    p.add_argument("--no-sweep", action="store_true", help="skip the Triton block-size sweep")
    p.add_argument(
        "--out",
        default=None,
        help="JSON file (default benchmarks/results/<device>_serving_<date>.json; none with --quick)",
    )
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.impl:
        cfg["impls"] = tuple(i for i in args.impl.split(",") if i)

    env = environment()
    bw = copy_bandwidth_gbs(1 << 24 if args.quick else 1 << 30)
    print(
        f"device: {env['device']} ({env['platform']}); copy bandwidth {bw:.0f} GB/s (read + write)",
        flush=True,
    )
    decode_rows, sweep_rows = bench_decode(cfg, bw, sweep=not args.no_sweep and not args.quick)
    prefill_rows = bench_prefill(cfg)

    print(
        f"\n{env['device']}, copy bandwidth {bw:.0f} GB/s; decode H={cfg['H']}/{cfg['Hkv']} D={cfg['D']} "
        f"{cfg['dtype']}, {cfg['num_slots']} slots"
    )
    print(f"{'step':22s} {'impl':9s} {'ms':>9s} {'floor ms':>9s} {'x floor':>8s}")
    for r in decode_rows:
        if r["ms"] is not None:
            print(
                f"{'decode B=' + str(r['B']):22s} {r['impl']:9s} {r['ms']:9.4f} {r['floor_ms']:9.4f} "
                f"{r['of_floor']:8.2f}"
            )
    best = {}
    for r in sweep_rows:
        if r["ms"] is not None and (r["B"] not in best or r["ms"] < best[r["B"]]["ms"]):
            best[r["B"]] = r
    for B, r in best.items():
        print(
            f"{'decode B=' + str(B):22s} {'triton*':9s} {r['ms']:9.4f} {'':9s} {r['of_floor']:8.2f}  "
            f"(best sweep: bv={r['bv']}, warps={r['num_warps']})"
        )
    print(f"{'prefill':22s} {'impl':9s} {'1 call ms':>9s} {'loop ms':>9s} {'speedup':>8s}")
    for r in prefill_rows:
        if r["one_call_ms"] is not None:
            name = f"{cfg['prefill_requests']}x{cfg['prefill_len']}"
            print(
                f"{name:22s} {r['impl']:9s} {r['one_call_ms']:9.3f} {r['loop_ms']:9.3f} {r['speedup']:8.2f}"
            )

    out = args.out
    if out is None and not args.quick:
        slug = env["device"].lower().replace(" ", "-")
        out = os.path.join(
            os.path.dirname(os.path.abspath(__file__)),
            "results",
            f"{slug}_serving_{datetime.date.today().isoformat()}.json",
        )
    if out:
        result = dict(
            environment=env,
            copy_bandwidth_gbs=bw,
            config=cfg,
            decode=decode_rows,
            sweep=sweep_rows,
            prefill=prefill_rows,
        )
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()

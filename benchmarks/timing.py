"""Timing helpers shared by the benchmark scripts: wall time of jitted calls, copy bandwidth, device."""

import datetime
import platform
import statistics
import time

import jax
import jax.numpy as jnp


def add_run_arguments(parser, workloads: str) -> None:
    """The options every A/B script of the Triton lightning backend takes: workloads, output, timing."""
    parser.add_argument("--workloads", default=workloads, help="comma-separated names from workloads.py")
    parser.add_argument("--out", default=None, help="JSON path")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median taken)")
    parser.add_argument("--inner", type=int, default=5, help="back-to-back calls per round")


def time_call(fn, *args, warmup: int = 2, repeats: int = 10, inner: int = 1) -> float:
    """Median over `repeats` rounds of the mean wall time in ms of `inner` back-to-back calls of fn(*args)
    (a jitted function), synchronised on the outputs at the end of each round."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner)
    return 1e3 * statistics.median(times)


def fwd_and_fwd_bwd(attn):
    """jax.jit(attn) and a jitted (q, k, v, dO) -> (o, (dq, dk, dv)) through jax.vjp; attn(q, k, v) -> o."""

    @jax.jit
    def fwd_bwd(q, k, v, do):
        o, pullback = jax.vjp(attn, q, k, v)
        return o, pullback(do)

    return jax.jit(attn), fwd_bwd


def time_fwd_bwd(attn, q, k, v, do, *, warmup: int, rounds: int, inner: int) -> dict:
    """{"fwd_ms", "fwd_bwd_ms"} of attn(q, k, v) -> o (time_call of both functions of fwd_and_fwd_bwd)."""
    fwd, fwd_bwd = fwd_and_fwd_bwd(attn)
    return {
        "fwd_ms": time_call(fwd, q, k, v, warmup=warmup, repeats=rounds, inner=inner),
        "fwd_bwd_ms": time_call(fwd_bwd, q, k, v, do, warmup=warmup, repeats=rounds, inner=inner),
    }


def copy_bandwidth_gbs(nbytes: int = 1 << 30, device=None) -> float:
    """Device memory bandwidth in GB/s measured by copying a buffer (bytes read + bytes written)."""
    device = device or jax.devices()[0]
    x = jax.device_put(jnp.zeros((nbytes // 4,), jnp.float32), device)
    copy = jax.jit(lambda a: a + 1.0)  # one read and one write of every element
    ms = time_call(copy, x, warmup=3, repeats=10, inner=5)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def environment() -> dict:
    device = jax.devices()[0]
    return {
        "date": datetime.date.today().isoformat(),
        "device": getattr(device, "device_kind", str(device)),
        "num_devices": jax.device_count(),
        "platform": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }

"""Timing helpers shared by the benchmark scripts: wall time of jitted calls, copy bandwidth, device."""

import datetime
import glob
import gzip
import json
import platform
import statistics
import tempfile
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


def gpu_time_ms(fn, *args, calls: int = 20) -> dict:
    """What `calls` back-to-back calls of fn(*args) (jitted, already compiled) cost the GPU, from a
    jax.profiler trace (CUPTI's activity records, as torch.profiler takes fla's):
      * kernel_ms: the sum of the durations of the GPU activities (kernels, copies) per call, the figure
        fla's "GPU time" is;
      * span_ms: first start to last end of them, per call (kernel_ms plus the GPU's idle gaps);
      * dispatch_ms: host time per call to issue them (when it is about span_ms, the host waits on the GPU
        inside the calls);
      * threads: the GPU trace lines summed, with their ms per call."""
    jax.block_until_ready(fn(*args))
    log_dir = tempfile.mkdtemp(prefix="shardattn_trace_")
    with jax.profiler.trace(log_dir):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        dispatch = time.perf_counter() - start
        jax.block_until_ready(out)
    (path,) = glob.glob(f"{log_dir}/plugins/profile/*/*.trace.json.gz")
    with gzip.open(path) as fh:
        events = json.load(fh)["traceEvents"]
    meta = [e for e in events if e.get("ph") == "M"]
    gpu_pids = {e["pid"] for e in meta if e.get("name") == "process_name" and "GPU" in e["args"]["name"]}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e.get("name") == "thread_name"}
    # a GPU's lines: its streams' activities, and XLA's own lines (modules, ops) that repeat them
    busy = [e for e in events if e.get("ph") == "X" and e["pid"] in gpu_pids
            and threads.get((e["pid"], e["tid"]), "").startswith("Stream")]  # fmt: skip
    if not busy:
        raise RuntimeError(f"no GPU stream activity in the trace ({sorted(set(threads.values()))[:20]})")
    per_thread = {}
    for e in busy:
        name = threads[(e["pid"], e["tid"])]
        per_thread[name] = per_thread.get(name, 0.0) + e["dur"] / 1e3 / calls
    span = max(e["ts"] + e["dur"] for e in busy) - min(e["ts"] for e in busy)
    return {"kernel_ms": sum(e["dur"] for e in busy) / 1e3 / calls, "span_ms": span / 1e3 / calls,
            "dispatch_ms": 1e3 * dispatch / calls, "threads": per_thread}  # fmt: skip


def fwd_and_fwd_bwd(attn):
    """jax.jit(attn) and a jitted (q, k, v, dO) -> (o, (dq, dk, dv)) through jax.vjp; attn(q, k, v) -> o."""

    @jax.jit
    def fwd_bwd(q, k, v, do):
        o, pullback = jax.vjp(attn, q, k, v)
        return o, pullback(do)

    return jax.jit(attn), fwd_bwd


def time_fwd_bwd(attn, q, k, v, do, *, warmup: int, rounds: int, inner: int, gpu_time: bool = False) -> dict:
    """{"fwd_ms", "fwd_bwd_ms"} of attn(q, k, v) -> o (time_call of both functions of fwd_and_fwd_bwd);
    gpu_time: also "fwd_gpu" and "fwd_bwd_gpu", gpu_time_ms of each (on a GPU)."""
    fwd, fwd_bwd = fwd_and_fwd_bwd(attn)
    r = {
        "fwd_ms": time_call(fwd, q, k, v, warmup=warmup, repeats=rounds, inner=inner),
        "fwd_bwd_ms": time_call(fwd_bwd, q, k, v, do, warmup=warmup, repeats=rounds, inner=inner),
    }
    if gpu_time:
        try:
            r["fwd_gpu"] = gpu_time_ms(fwd, q, k, v)
            r["fwd_bwd_gpu"] = gpu_time_ms(fwd_bwd, q, k, v, do)
        except Exception as err:  # (the wall times stand without it)
            r["gpu_time_error"] = f"{type(err).__name__}: {str(err)[:300]}"
            r.pop("fwd_gpu", None)
    return r


def copy_bandwidth_gbs(nbytes: int = 1 << 30, device=None, gpu_time: bool = False) -> float:
    """Device memory bandwidth in GB/s measured by copying a buffer (bytes read + bytes written), over the
    wall time of back-to-back calls, or with gpu_time over the copy kernel's duration (gpu_time_ms): the
    bandwidth to set beside GPU times."""
    device = device or jax.devices()[0]
    x = jax.device_put(jnp.zeros((nbytes // 4,), jnp.float32), device)
    copy = jax.jit(lambda a: a + 1.0)  # one read and one write of every element
    if gpu_time:
        ms = gpu_time_ms(copy, x)["kernel_ms"]
    else:
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

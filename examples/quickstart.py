"""Quick start: sequence- and batch-parallel lightning attention, checked against the reference.

    python examples/quickstart.py            # 8 fake CPU devices, or the GPUs/TPUs it finds
    python examples/quickstart.py --scan ring --seq-len 1024

Builds a ("data", "seq", "heads") mesh over the devices, runs `sharded_lightning` with a MiniMax-01 decay
preset on random float32 and bfloat16 data, and compares the output and the gradients of q, k, v
with the float32 token-by-token reference on one device. Prints what it did; exits 1 if a check fails.
"""

import argparse
import sys
import time

from shardattn.meshes import use_fake_cpu_devices

# Before JAX starts: 8 CPU devices. This only changes the CPU platform; where GPUs or TPUs are found,
# JAX's default backend is theirs and the example runs on them.
use_fake_cpu_devices(8)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import shardattn  # noqa: E402
from shardattn.meshes import make_mesh, shard_qkv  # noqa: E402
from shardattn.sharded import choose_scan, sharded_lightning  # noqa: E402

# Relative-RMS error allowed against the float32 reference (tests/helpers.py uses the same table);
# gradients twice that.
TOLERANCE = {"float32": 2e-5, "bfloat16": 1.5e-2}


def rel_rms(actual, expected):
    a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    e = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    return float(np.sqrt(np.mean((a - e) ** 2)) / (np.sqrt(np.mean(e**2)) + 1e-30))


def timed(fn, *args):
    """(result, seconds of the first call incl. compile, seconds of a second call)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return out, first, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scan", default="auto", choices=["auto", "ring", "tree", "allgather"])
    parser.add_argument("--seq-len", type=int, default=None, help="default: 128 tokens per sequence shard")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    args = parser.parse_args(argv)

    devices = jax.devices()
    n = len(devices)
    data = 2 if n % 2 == 0 and n >= 4 else 1  # batch-parallel over 2, sequence-parallel over the rest
    mesh = make_mesh(data=data, seq=-1)
    seq = mesh.shape["seq"]
    B, H, D = 2 * data, args.heads, args.head_dim
    T = args.seq_len or 128 * seq
    layer_idx, num_layers = 3, 24
    print(f"devices: {n} x {devices[0].platform} ({devices[0].device_kind})")
    print(
        f"mesh: {dict(mesh.shape)}  q, k, v: [B={B}, T={T}, H={H}, D={D}] -> "
        f"{-(-T // seq)} tokens per seq shard" + (f" ({-T % seq} pad tokens)" if T % seq else "")
    )
    state_bytes = (B // data) * H * D * D * 4
    print(
        f"decay: minimax preset, layer {layer_idx} of {num_layers}, scale 1.0; "
        f"scan={args.scan} (runs {choose_scan(args.scan, seq, state_bytes)} over {seq} sequence shards)"
    )

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (B, T, H, D), jnp.float32)
    k = jax.random.normal(keys[1], (B, T, H, D), jnp.float32) / np.sqrt(D)
    v = jax.random.normal(keys[2], (B, T, H, D), jnp.float32)
    w = jax.random.normal(keys[3], (B, T, H, D), jnp.float32)  # a random projection for the loss
    common = dict(layer_idx=layer_idx, num_layers=num_layers, decay="minimax", scale=1.0)

    def loss_and_grads(attention, **kw):
        def loss(q, k, v):
            o = attention(q, k, v, **common, **kw)
            return jnp.sum(o.astype(jnp.float32) * w), o

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    ok = True
    for dtype in (jnp.float32, jnp.bfloat16):
        name = jnp.dtype(dtype).name
        x = [a.astype(dtype) for a in (q, k, v)]
        if T % seq == 0:  # placed over data and seq; other lengths go in unplaced: sharded_lightning pads
            x = [shard_qkv(a, mesh) for a in x]
        sharded = loss_and_grads(sharded_lightning, mesh=mesh, scan=args.scan)
        ((_, o), grads), first, again = timed(sharded, *x)
        # The reference sees the same rounded inputs, in float32, on one device.
        ref_x = [jax.device_put(a.astype(jnp.float32), devices[0]) for a in x]
        ((_, o_ref), grads_ref), _, ref_time = timed(
            loss_and_grads(shardattn.lightning_attention, implementation="reference"), *ref_x
        )
        errors = {"o": rel_rms(o, o_ref)}
        errors.update({f"d{n_}": rel_rms(g, r) for n_, g, r in zip("qkv", grads, grads_ref, strict=True)})
        limits = {key: TOLERANCE[name] * (1 if key == "o" else 2) for key in errors}
        passed = all(errors[key] <= limits[key] for key in errors)
        ok &= passed
        print(
            f"{name:>8}: o sharded as {o.sharding.spec}; rel. RMS error vs reference: "
            + ", ".join(f"{key} {err:.1e}" for key, err in errors.items())
            + f" (limit {limits['o']:.1e}/{limits['dq']:.1e}) -> {'ok' if passed else 'FAILED'}"
        )
        print(
            f"          forward+backward: {first:.2f} s first call (compile), {again * 1e3:.1f} ms after; "
            f"reference on one device {ref_time * 1e3:.1f} ms"
        )
    print("all checks passed" if ok else "CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

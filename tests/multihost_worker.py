"""One process of the multi-process tests (tests/test_multihost.py), started by examples/launch_local.py.

    python tests/multihost_worker.py --out r.npz --coordinator HOST:PORT --num-processes 2 --process-id I

Every process owns 4 fake CPU devices; together they form one 8-device mesh. Each case runs
sharded_lightning (outputs, final state and every gradient of a random projection) or sharded_attention
(outputs and the gradients of q, k, v) on a global mesh,
gathers the results to every process with multihost_utils.process_allgather, and process 0 saves them.
The cases and inputs come from `cases()`, which the test also runs in one process on 8 devices.
"""

import argparse
import os
import pathlib
import sys

DEVICES_PER_PROCESS = 4


def cases():
    """(name, mesh shape (data, seq, heads), sharded_lightning keywords) of every compared run."""
    return [
        ("seq8-allgather", (1, 8, 1), dict(scan="allgather")),
        ("data2-seq4-tree", (2, 4, 1), dict(scan="tree")),
        ("data2-seq2-heads2-ring-reverse", (2, 2, 2), dict(scan="ring", reverse=True)),
    ]


def inputs():
    import jax
    import jax.numpy as jnp

    B, T, H, D = 2, 64, 4, 16
    keys = jax.random.split(jax.random.PRNGKey(42), 5)
    q = jax.random.normal(keys[0], (B, T, H, D), jnp.float32)
    k = jax.random.normal(keys[1], (B, T, H, D), jnp.float32) / 4
    v = jax.random.normal(keys[2], (B, T, H, D), jnp.float32)
    slopes = jax.random.uniform(keys[3], (H,), jnp.float32, 0.0, 1.0)
    s0 = jax.random.normal(keys[4], (B, H, D, D), jnp.float32)
    return q, k, v, slopes, s0


def run_case(mesh_shape, kwargs, devices):
    """o, final state and the gradients of (q, k, v, slopes, initial_state), as global arrays."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from shardattn.meshes import make_mesh
    from shardattn.sharded import sharded_lightning

    data, seq, heads = mesh_shape
    mesh = make_mesh(data=data, seq=seq, heads=heads, devices=devices)
    host = [np.asarray(x) for x in inputs()]
    # Global arrays built from per-device pieces: on several processes each one fills only its own.
    specs = [P("data", "seq", "heads"), P("data", "seq", "heads"), P("data", "seq", "heads"), P("heads"),
             P("data", "heads")]  # fmt: skip
    args = [
        jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i, x=x: x[i])
        for x, spec in zip(host, specs, strict=True)
    ]

    def loss(q, k, v, slopes, s0):
        o, s = sharded_lightning(q, k, v, mesh=mesh, slopes=slopes, initial_state=s0, return_state=True,
                                 **kwargs)  # fmt: skip
        w_o = jax.random.normal(jax.random.PRNGKey(7), o.shape, jnp.float32)
        w_s = jax.random.normal(jax.random.PRNGKey(8), s.shape, jnp.float32)
        return jnp.sum(o * w_o) + jnp.sum(s * w_s), (o, s)

    grads, (o, s) = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(*args)
    names = ("dq", "dk", "dv", "dslopes", "ds0")
    return {"o": o, "state": s, **dict(zip(names, grads, strict=True))}


def attention_cases():
    """(name, mesh shape, sharded_attention keywords) of the softmax runs compared."""
    return [
        ("attn-seq4-ring-zigzag", (2, 4, 1), dict(strategy="ring", layout="zigzag", causal=True)),
        ("attn-seq8-allgather", (1, 8, 1), dict(strategy="allgather", causal=True)),
    ]


def run_attention_case(mesh_shape, kwargs, devices):
    """o and the gradients of (q, k, v) of sharded_attention (GQA 4/2), as global arrays."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from shardattn.meshes import make_mesh
    from shardattn.sharded_attention import sharded_attention

    data, seq, heads = mesh_shape
    mesh = make_mesh(data=data, seq=seq, heads=heads, devices=devices)
    q, k, v = (np.asarray(x) for x in inputs()[:3])
    k, v = k[:, :, :2], v[:, :, :2]  # two kv heads: GQA
    spec = NamedSharding(mesh, P("data", "seq"))
    args = [jax.make_array_from_callback(x.shape, spec, lambda i, x=x: x[i]) for x in (q, k, v)]

    def loss(q, k, v):
        o = sharded_attention(q, k, v, mesh=mesh, **kwargs)
        w = jax.random.normal(jax.random.PRNGKey(9), o.shape, jnp.float32)
        return jnp.sum(o * w), o

    grads, o = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
    return {"o": o, **dict(zip(("dq", "dk", "dv"), grads, strict=True))}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    a = parser.parse_args(argv)

    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(a.coordinator, num_processes=a.num_processes, process_id=a.process_id)
    import numpy as np
    from jax.experimental import multihost_utils

    assert jax.device_count() == a.num_processes * DEVICES_PER_PROCESS, jax.devices()
    results = {}
    for name, mesh_shape, kwargs in cases():
        out = run_case(mesh_shape, kwargs, jax.devices())
        for key, value in out.items():
            results[f"{name}/{key}"] = np.asarray(multihost_utils.process_allgather(value, tiled=True))
    for name, mesh_shape, kwargs in attention_cases():
        out = run_attention_case(mesh_shape, kwargs, jax.devices())
        for key, value in out.items():
            results[f"{name}/{key}"] = np.asarray(multihost_utils.process_allgather(value, tiled=True))
    if jax.process_index() == 0:
        np.savez(a.out, **results)
    print(f"process {jax.process_index()}: {len(results)} arrays", flush=True)


if __name__ == "__main__":
    main()

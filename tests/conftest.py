"""Test set-up: 8 fake CPU devices (before JAX starts), a compilation cache, and the `gpu` marker."""

import os

# On 2-core machines (ours and CI's) the CPU client's thread pool is too small for 8 fake devices that
# wait on each other (collectives, the Pallas TPU interpreter's barrier): runs were seen to deadlock.
# PJRT_NPROC sizes that pool; it is read when JAX starts its CPU backend, so it must be set here.
os.environ.setdefault("PJRT_NPROC", "16")
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"]
)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _has_gpu_triton() -> bool:
    from shardattn.kernels import triton_interpret

    if triton_interpret.enabled():  # Triton's CPU interpreter stands in for the GPU (slow; small cases)
        return True
    try:
        if jax.default_backend() != "gpu":
            return False
        import jax_triton  # noqa: F401
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    if _has_gpu_triton():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with jax-triton (or SHARDATTN_TRITON_INTERPRET=1)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""Fake CPU devices for tests and examples."""

import os
import sys


def use_fake_cpu_devices(n: int) -> None:
    """Makes JAX start with `n` CPU devices. Call before JAX creates its backends.

    If JAX has already started with a different number of CPU devices, raises RuntimeError instead of
    silently leaving the caller with fewer devices than asked for.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be a positive int")
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if "force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, flag])
    jax = sys.modules.get("jax")
    if jax is not None:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            have = jax.device_count("cpu")
            if have != n:
                raise RuntimeError(
                    f"JAX already started with {have} CPU devices; use_fake_cpu_devices({n}) must run "
                    "before the first JAX computation (or set XLA_FLAGS="
                    f"{flag} in the environment)"
                )
            return
        jax.config.update("jax_num_cpu_devices", n)

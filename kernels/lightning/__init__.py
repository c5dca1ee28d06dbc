"""Lightning attention backends. Each module has the signature documented in reference.py.

Backends are imported lazily by name, so that a backend whose dependencies are missing (jax_triton on a
CPU-only install) costs nothing until it is asked for.
"""

from shardattn.kernels import load_backend

# backend name -> module in this folder
BACKENDS = {
    "reference": "reference",
    "xla": "xla",
    "triton": "triton",
    "mosaic_gpu": "mosaic_gpu",
    "pallas": "pallas_tpu",
}


def get_backend(name: str, function: str = "lightning_attention"):
    """Returns `function` (see reference.py) of backend `name`.

    Raises NotImplementedError when the backend cannot be imported on this installation or lacks the
    (optional) function.
    """
    return load_backend(__name__, BACKENDS, name, function)

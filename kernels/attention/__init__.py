"""Softmax (flash) attention backends. Each module has the signature documented in reference.py.

Backends are imported lazily by name, so that a backend whose dependencies are missing costs nothing
until it is asked for.
"""

from shardattn.kernels import load_backend

# backend name -> module in this folder
BACKENDS = {
    "reference": "reference",
    "xla": "xla",
    "cudnn": "cudnn",
    "triton": "triton",
    "pallas": "pallas_tpu",
}


def get_backend(name: str, function: str = "attention"):
    """Returns `function` ("attention", or "forward"/"backward" where a backend has them) of backend `name`.

    Raises NotImplementedError when the backend cannot be imported on this installation or lacks the
    (optional) function.
    """
    return load_backend(__name__, BACKENDS, name, function)

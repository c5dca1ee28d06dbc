"""Softmax (flash) attention backends. Each module has the signature documented in reference.py.

Backends are imported lazily by name, so that a backend whose dependencies are missing costs nothing
until it is asked for.
"""

import importlib

# backend name -> module in this folder
BACKENDS = {"reference": "reference", "xla": "xla", "cudnn": "cudnn", "triton": "triton"}


def get_backend(name: str, function: str = "attention"):
    """Returns `function` ("attention", or "forward"/"backward" where a backend has them) of backend `name`.

    Raises NotImplementedError when the backend cannot be imported on this installation or lacks the
    (optional) function.
    """
    if name not in BACKENDS:
        raise ValueError(f"implementation={name!r} is not one of {tuple(BACKENDS)}")
    try:
        module = importlib.import_module(f"{__name__}.{BACKENDS[name]}")
    except ModuleNotFoundError as err:
        raise NotImplementedError(f"backend {name!r} is not available here: {err}") from err
    if not hasattr(module, function):
        raise NotImplementedError(f"backend {name!r} has no {function}")
    return getattr(module, function)

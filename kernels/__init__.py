"""Per-device kernels, one folder per algorithm, one file per backend (installed as shardattn.kernels)."""

import importlib


def load_backend(package: str, backends: dict[str, str], name: str, function: str):
    """`function` of backend `name` (a module of `package` named by `backends`), imported on first use.

    Raises ValueError for an unknown name, NotImplementedError when the backend cannot be imported on this
    installation or lacks the (optional) function.
    """
    if name not in backends:
        raise ValueError(f"implementation={name!r} is not one of {tuple(backends)}")
    try:
        module = importlib.import_module(f"{package}.{backends[name]}")
    except ModuleNotFoundError as err:
        raise NotImplementedError(f"backend {name!r} is not available here: {err}") from err
    if not hasattr(module, function):
        raise NotImplementedError(f"backend {name!r} has no {function}")
    return getattr(module, function)

"""Opt-in checks of values that are known only under tracing (docs/design.md, "Argument checks").

Shapes, dtypes and every value known at trace time are always checked, with a ValueError or TypeError.
Values known only inside a traced function (slopes, cu_seqlens or initial_state passed into a
`jax.jit`-ed function, learnable slopes under `jax.grad`) cannot raise there. With `debug_checks` on,
the API layer adds `jax.experimental.checkify` checks for them; the caller functionalises the function
with `checkify.checkify` and throws the error:

    >>> from jax.experimental import checkify
    >>> with shardattn.debug_checks():
    ...     err, o = jax.jit(checkify.checkify(attention))(q, k, v, slopes)
    >>> err.throw()  # raises JaxRuntimeError: "slopes must be finite and >= 0 ..." if they were not

Off (the default), nothing is added to the traced program.
"""

from jax.experimental import checkify

_enabled = False


class debug_checks:  # noqa: N801 (used like a function: debug_checks(True), with debug_checks(): ...)
    """Turns the checkify checks of traced values on (or off, `enabled=False`).

    Called, it sets the mode until changed again; as a context manager, it restores the previous mode
    on exit. The mode is read when a function is traced: a `jax.jit` function traced (and cached) with
    the mode off keeps no checks until it is traced again. Under the mode a function with traced
    checked values must be run through `checkify.checkify` (JAX refuses an unfunctionalised check
    under jit rather than skipping it).

    >>> shardattn.debug_checks(True)
    >>> with shardattn.debug_checks(): ...
    """

    def __init__(self, enabled: bool = True):
        global _enabled
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} {enabled!r}")
        self._previous = _enabled
        _enabled = enabled

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        global _enabled
        _enabled = self._previous
        return False


def debug_checks_enabled() -> bool:
    """Whether debug_checks is on."""
    return _enabled


def check_traced(predicate, message: str, **values) -> None:
    """checkify.check(predicate(), message, **values) when debug_checks is on; nothing otherwise.

    `predicate` is a function, called only when the mode is on: off, not even the comparison is traced.
    """
    if _enabled:
        checkify.check(predicate(), message, **values)

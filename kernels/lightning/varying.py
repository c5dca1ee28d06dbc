"""Varying mesh axes for kernels called inside shard_map with check_vma=True.

Custom kernels (jax-triton's triton_call, pallas_call) are typed as not varying over any mesh axis, and
replicated arguments (slopes, initial states) are typed invariant. Both must be cast to the varying axes
of the data: outputs so that they type-check against the out_specs, replicated inputs so that autodiff
of the cast (a psum) sums their per-shard gradients. Outside shard_map these are no-ops.
"""

import jax


def varying_axes(x) -> frozenset:
    """The mesh axes x varies over (jax 0.10 spells them aval.mat.varying, later versions aval.vma)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def match_varying(x, *likes):
    """x cast to also vary over every mesh axis that any of `likes` varies over."""
    want = frozenset().union(*(varying_axes(like) for like in likes))
    missing = tuple(sorted(want - varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

"""One grid axis for every Triton launch of shardattn's kernels (lightning and softmax attention).

CUDA's second and third grid axes hold at most 65535 programs, which chunk slots (4M tokens per call)
or batch x heads can pass; the first holds 2**31 - 1. So every launch puts all its programs on the first
axis, in the order a grid of the same dims would run them (the first dim fastest), and the kernel splits
the index back (`program_id(0) % d0`, ...).
"""

import math


def flat_grid(*dims):
    """(prod(dims),) for a grid of `dims`; ValueError past 2**31 - 1 programs."""
    total = math.prod(int(d) for d in dims)
    if total >= 2**31:
        raise ValueError(f"a Triton launch holds at most 2**31 - 1 programs, this call needs {total} "
                         f"(grid {dims}): split the batch or the sequence")
    return (total,)

"""Runs shardattn's Triton kernels in Triton's CPU interpreter, for development and CPU tests.

With `SHARDATTN_TRITON_INTERPRET=1` in the environment (before the first Triton kernel is built), the
Triton backends launch their kernels through `launch` below instead of jax-triton: a
`jax.pure_callback` that copies the inputs to torch CPU tensors, runs the kernel with
`TRITON_INTERPRET=1` (Triton executes every program of the grid in numpy), and copies the outputs back.
It needs `triton` and `torch` (CPU build) but no GPU and no jax-triton, so the kernels' logic (masks,
indexing, the walks over chunks and blocks) can be checked against the reference on a CPU machine.
It is slow (Python per program instance): use small shapes. Speed, the compiled code and GPU-only
behaviour (tensor cores, TMA, shared-memory limits) are not checked this way: the GPU tests do that.
"""

import functools
import os
import threading

import jax
import numpy as np

ENV = "SHARDATTN_TRITON_INTERPRET"
# The interpreter keeps the grid of the running launch in a global, and XLA may run independent callbacks
# on several threads at once: launches take turns.
_ONE_LAUNCH_AT_A_TIME = threading.Lock()


def enabled() -> bool:
    """Whether the Triton backends run in the interpreter."""
    if os.environ.get(ENV, "") != "1":
        return False
    # TRITON_INTERPRET is read when a kernel is decorated (triton.jit picks the interpreter then), so it
    # is set here, before a backend asks for its kernels (each backend calls this first).
    os.environ["TRITON_INTERPRET"] = "1"
    return True


@functools.cache
def _setup():
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    # Triton 3.6's interpreter multiplies the uint16 bit patterns of bfloat16 dot operands (numpy has
    # no bfloat16): widen them to float32 first (exact), as the tensor cores do.
    dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *args):
        def widen(x):
            if x.dtype.scalar != tl.bfloat16:
                return x
            wide = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(wide.reshape(x.data.shape), tl.float32)

        return dot(self, widen(a), widen(b), d, *args)

    interpreter.InterpreterBuilder.create_dot = create_dot
    return torch


def _to_torch(torch, x):
    if x.dtype == jax.numpy.bfloat16:  # numpy holds bf16 as ml_dtypes; torch reads its bits
        return torch.from_numpy(np.ascontiguousarray(x).view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(x, copy=True))


def _to_numpy(torch, t, dtype):
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(jax.numpy.bfloat16)
    return t.numpy().astype(dtype, copy=False)



def launch(kernel, grid, inputs, out_shapes, *, input_output_aliases=None, **constexprs):
    """jax_triton.triton_call's meaning (outputs after all inputs in the kernel's signature; aliased
    outputs start as copies of their inputs), run by the interpreter inside a pure_callback. Other float
    outputs start as NaN, so that a block a kernel forgets to write shows in the comparison.

    `inputs` may mix arrays and Python scalars; launch options (num_warps, num_stages, name) are dropped.
    """
    torch = _setup()
    for option in ("num_warps", "num_stages", "name", "num_ctas"):
        constexprs.pop(option, None)
    aliases = dict(input_output_aliases or {})
    single = not isinstance(out_shapes, (tuple, list))
    shapes = [out_shapes] if single else list(out_shapes)
    positions = [i for i, x in enumerate(inputs) if isinstance(x, jax.Array | np.ndarray)]
    arrays = [inputs[i] for i in positions]

    def run(*host_arrays):
        args = list(inputs)
        for i, x in zip(positions, host_arrays, strict=True):
            args[i] = _to_torch(torch, x)
        outs = []
        for j, s in enumerate(shapes):
            aliased = [i for i, out in aliases.items() if out == j]
            if aliased:  # the kernel reads and writes one buffer: both arguments are that tensor
                outs.append(args[aliased[0]])
            else:
                fill = float("nan") if np.issubdtype(np.dtype(s.dtype), np.floating) else 0
                outs.append(torch.full(s.shape, fill, dtype=getattr(torch, np.dtype(s.dtype).name)))
        with _ONE_LAUNCH_AT_A_TIME:
            kernel[tuple(grid)](*args, *outs, **constexprs)
        return tuple(_to_numpy(torch, t, s.dtype) for t, s in zip(outs, shapes, strict=True))

    result_shapes = tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in shapes)
    outs = jax.pure_callback(run, result_shapes, *arrays, vmap_method="sequential")
    return outs[0] if single else type(out_shapes)(outs)

"""Triton kernels compiled for Hopper (sm_90a) on any machine with triton, no GPU needed: the PTX,
ptxas -v's registers and spills, and a digest of the instructions (used by the *_ptxas.py scripts).

The digest is blind to register numbers and to instruction order: two builds of a kernel with equal
digests run the same instructions, the same number of times per listing, so a refactor of kernel source
that keeps the digest (the scripts' output on two checkouts) changes no work, only names and the order
ptxas schedules anyway.
"""

import collections
import hashlib
import os
import re
import subprocess
import tempfile

_INSTRUCTION = re.compile(r"(@!?%\w+\s+)?([a-z][\w.:]*)")


def opcode_counts(ptx: str) -> collections.Counter:
    """Instruction name (with its type suffixes) -> count, over the code of a PTX listing."""
    if ".section\t.debug" in ptx:
        ptx = ptx[: ptx.index(".section\t.debug")]
    counts = collections.Counter()
    for line in ptx.splitlines():
        line = line.strip()
        match = _INSTRUCTION.match(line)
        if match and not line.startswith("."):
            counts[match.group(2)] += 1
    return counts


def opcode_digest(ptx: str) -> str:
    """12 hex digits of sha1 over the sorted opcode counts."""
    text = "\n".join(f"{name} {n}" for name, n in sorted(opcode_counts(ptx).items()))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def compile_sm90a(kernel, types, constexprs, num_warps, num_stages):
    """(compiled kernel, ptxas -v's register / spill lines joined by '; ') for sm_90a.

    types: the pointer (and scalar) types of the leading arguments, e.g. ["*bf16", "*fp32"]; every
    pointer is taken as 16-byte aligned, as jax-triton specialises them.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    args = kernel.arg_names[: len(types)]
    signature = dict(zip(args, types, strict=True)) | {k: "constexpr" for k in constexprs}
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(args))}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))  # fmt: skip
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as fh:
            fh.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, "-v", "-arch=sm_90a", path, "-o", path + ".cubin"],
                             capture_output=True, text=True)  # fmt: skip
    info = [line.split("info    :")[-1].strip() for line in out.stderr.splitlines()
            if "spill" in line or "registers" in line]  # fmt: skip
    return compiled, "; ".join(info)


def programs_per_sm(info: str, smem: int, warps: int) -> int:
    """Programs (CTAs) of one kernel an H100 / H200 SM holds at once, from ptxas's register count (in
    `info`, as compile_sm90a returns it), Triton's shared memory and the warps: 64K registers allocated
    per warp in units of 256, 228 KiB of shared memory with 1 KiB reserved per program, 64 warps. (These
    limits gave Nsight Compute's "Block Limit" figures for every lightning kernel on an H200.)"""
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    per_warp = -(-regs * 32 // 256) * 256
    return min(65536 // (per_warp * warps), 233472 // (smem + 1024), 64 // warps)


def dot_lowering(ptx: str) -> str:
    """"wgmma", "mma" (mma.sync) or "fma": what the kernel's dots became."""
    return "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "fma")

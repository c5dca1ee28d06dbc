"""Compiles the lightning Triton kernels for Hopper (sm_90a) on any machine with triton, no GPU needed, and
prints per launch ptxas's registers and spills, the shared memory Triton allocates, whether the dots
became wgmma, and how many programs of it an SM holds: a first look at register pressure and occupancy
before GPU time (the walks are latency-bound: programs per SM decided the 2026-12-01 forward blocks).

    python benchmarks/lightning_triton_ptxas.py
    python benchmarks/lightning_triton_ptxas.py --variant prev=/tmp/old_triton.py     # a copy of triton.py
    python benchmarks/lightning_triton_ptxas.py --blocks seg_warps=8                   # BlockSizes fields

The launches are those of a bf16 forward+backward of the named workloads at the default BlockSizes
(`_forward_pass`, `_g_walk`, `_bwd_parallel`): the forward walk with and without chunk states, the G walk
and the chunk-parallel backward kernel. Each line ends with the PTX's opcode digest (hopper_ptx.py): equal
digests on two checkouts mean a source change moved no instructions. The launch parameters come from
the backend's own rules (`_segments`, `_walk_blocks`, `_g_walk_blocks`, `BlockSizes.walk_warps`), so a
`--variant` must be a copy of triton.py that has them. Do not run with TRITON_INTERPRET=1 /
SHARDATTN_TRITON_INTERPRET=1.
"""

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hopper_ptx import compile_sm90a, dot_lowering, opcode_digest, programs_per_sm  # noqa: E402
from lightning_variants import load_variant  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def compile_launch(kernel, types, meta, warps, stages):
    """(dot lowering, ptxas -v summary with the opcode digest, shared memory bytes) for sm_90a."""
    compiled, info = compile_sm90a(kernel, types, meta, warps, stages)
    ptx = compiled.asm["ptx"]
    return dot_lowering(ptx), f"{info}; opcodes {opcode_digest(ptx)}", compiled.metadata.shared


def launches(tri, w, change):
    """(label, kernel, pointer types, constexprs, warps, stages) of a bf16 forward+backward of w."""
    B, T, H, HKV, D = w.B, w.T, w.H, w.Hkv, w.D
    blocks = dataclasses.replace(tri.BlockSizes.get_default(D, D, "bfloat16"), **change)
    fwd, _, dstate, chunk = tri._kernels()[:4]
    N, nc_total = B, B * (-(-T // tri.CHUNK))
    BK = tri._pow2(D)
    out = []
    # forward walk (its segment rule as _forward_pass applies it), plain and storing S_in of every chunk
    BV = min(blocks.fwd_bv, tri._pow2(D))
    NV = -(-D // BV)
    P, TSEG = tri._segments(N * H * NV, T, blocks)
    base = dict(T=T, H=H, HKV=HKV, DK=D, DV=D, BK=BK, BV=BV, C=tri.CHUNK, SCALE=D**-0.5, NC_TOTAL=nc_total,
                REVERSE=False, VARLEN=False, HAS_S0=P > 1, IEEE=False, P=P, TSEG=TSEG, STATES_ONLY=False)
    types = ["*bf16"] * 3 + ["*fp32", "*fp32", "*i32", "*i32", "*bf16", "*fp32", "*bf16"]
    for store in (False, True):
        bv, w_ = tri._walk_blocks(blocks, BV, D, P, stores=store)
        label = f"fwd walk{' + S_in' if store else ''} (P={P}, BV={bv})"
        out.append((label, fwd, types, dict(base, BV=bv, STORE_STATES=store), w_, blocks.num_stages))
    # G walk
    BKw, NK, BVw, NVw, Pw, TSEGw = tri._g_walk_blocks(N, H, T, D, D, blocks, split=True)
    warps = blocks.walk_warps(Pw)
    meta = dict(T=T, H=H, DK=D, DV=D, BK=BKw, BV=BVw, C=tri.CHUNK, SCALE=D**-0.5, NC_TOTAL=nc_total,
                REVERSE=False, VARLEN=False, IEEE=False, P=Pw, TSEG=TSEGw, SEG_G0=Pw > 1, HAS_G0=True,
                STORE_STATES=True)
    types = ["*bf16", "*bf16", "*fp32", "*fp32", "*i32", "*i32", "*bf16", "*fp32"]
    out.append((f"G walk (P={Pw}, {BKw}x{BVw})", dstate, types, meta, warps, blocks.num_stages))
    # chunk-parallel backward
    BVp = min(blocks.par_bv, tri._pow2(D))
    NVp = -(-D // BVp)
    meta = dict(T=T, H=H, HKV=HKV, DK=D, DV=D, BK=BK, BV=BVp, C=tri.CHUNK, SCALE=D**-0.5, NC_TOTAL=nc_total,
                NV=NVp, NTOK=B * T, REVERSE=False, VARLEN=False, IEEE=False, LATE_G=blocks.par_late_g)
    part = "*fp32" if NVp > 1 else "*bf16"
    types = ["*bf16"] * 4 + ["*fp32", "*bf16", "*bf16"] + ["*i32"] * 4 + [part, part, "*bf16", "*fp32"]
    out.append((f"chunk kernel ({BK}x{BVp})", chunk, types, meta, blocks.par_warps, 1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[], help="NAME=FILE (a copy of triton.py)")
    p.add_argument("--workloads", default="b4-t8k-h16-d128,b1-t32k-h16-d128,b8-t4k-h32-d64")
    p.add_argument("--blocks", default="", help="BlockSizes fields over the defaults: seg_warps=8")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("SHARDATTN_TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET / SHARDATTN_TRITON_INTERPRET: this compiles the kernels")

    from shardattn.kernels.lightning import triton as current

    change = {k: int(v) for k, v in (item.split("=") for item in args.blocks.split(",") if item)}
    variants = {"current": current}
    for item in args.variant:
        name, path = item.split("=", 1)
        variants[name] = load_variant(name, path)
    print("sm_90a (Hopper), bf16; ptxas -v per launch; smem = Triton's shared-memory allocation; "
          "programs per SM from registers, smem and warps (hopper_ptx.programs_per_sm)")
    for wname in [n for n in args.workloads.split(",") if n]:
        for vname, module in variants.items():
            for label, kernel, types, meta, warps, stages in launches(module, WORKLOADS[wname], change):
                mma, info, smem = compile_launch(kernel, types, meta, warps, stages)
                per_sm = programs_per_sm(info, smem, warps)
                print(f"{wname:18s} {vname:10s} {label:28s} w{warps} s{stages}: {mma}; {info}; "
                      f"smem {smem} B; {per_sm} per SM", flush=True)


if __name__ == "__main__":
    main()

"""Compiles the softmax Triton kernels for Hopper (sm_90a) on any machine with triton, no GPU needed, and
prints ptxas's registers and spills per kernel, dtype, head dim and feature set at the default BlockSizes.

    python benchmarks/attention_triton_ptxas.py                       # the default sweep
    python benchmarks/attention_triton_ptxas.py --dims 128 --dtypes bf16 --blocks fwd_q=128,fwd_k=128

A cheap first filter for block-size choices before GPU time: spills (local memory traffic) are what
ruled out pipelining for float32 (stages > 1 spilled tens of KB). Each line ends with the PTX's opcode
digest (hopper_ptx.py): equal digests on two checkouts mean a source refactor changed no instructions.
Do not run with TRITON_INTERPRET=1.
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hopper_ptx import compile_sm90a, dot_lowering, opcode_digest  # noqa: E402

FEATURES = {
    "causal": ("causal",),
    "all": ("causal", "window", "seg", "bias", "cap", "drop", "sinks", "gqa"),
}
_TYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def compile_kernel(name, dtype, d, blocks, features, T=8192):
    """ptxas -v's summary line of one kernel (and the compile time in s)."""
    from shardattn.kernels.attention import triton_kernels

    f = set(features)
    prefix = {"fwd_kernel": "fwd", "dkdv_kernel": "dkdv", "dq_kernel": "dq"}[name]
    bq, bk = getattr(blocks, prefix + "_q"), getattr(blocks, prefix + "_k")
    meta = dict(
        T=T, S=T, H=16, HKV=4 if "gqa" in f else 16, DK=d, DV=d, BD=d, BDV=d, BQ=bq, BK=bk, SCALE=d**-0.5,
        SOFT_CAP=30.0 if "cap" in f else 0.0, FAST_TANH=dtype != "fp32" and blocks.fast_tanh,
        CAUSAL="causal" in f, WINDOW="window" in f, LEFT=4096, RIGHT=0,
        HAS_SEG="seg" in f, HAS_BIAS="bias" in f, BIAS_SB=0, BIAS_SH=T * T if "bias" in f else 0,
        DROPOUT="drop" in f, DROP_SCALE=1.25, IEEE=dtype == "fp32",
    )  # fmt: skip
    x = f"*{dtype}"
    if name == "fwd_kernel":
        types = [x] * 3 + ["*i32"] * 4 + ["*fp32", "*fp32", "*u32", "*i32", x, "*fp32"]
        meta.update(NQ=T // bq, NSINK=1 if "sinks" in f else 0, BSINK=16)
    else:
        types = [x] * 4 + ["*fp32"] * 2 + ["*i32"] * 4 + ["*fp32", "*u32", "*i32"]
        types += [x, x] if name == "dkdv_kernel" else [x, "*fp32"]
        meta.update({"NK": T // bk} if name == "dkdv_kernel" else {"NQ": T // bq})
    warps, stages = getattr(blocks, prefix + "_warps"), getattr(blocks, prefix + "_stages")
    start = time.time()
    compiled, info = compile_sm90a(getattr(triton_kernels, name), types, meta, warps, stages)
    seconds = time.time() - start
    ptx = compiled.asm["ptx"]
    return f"{dot_lowering(ptx)}; {info}; opcodes {opcode_digest(ptx)}", seconds, (bq, bk, warps, stages)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="fwd_kernel,dkdv_kernel,dq_kernel")
    p.add_argument("--dtypes", default="bf16,fp32", help="from bf16, fp16, fp32")
    p.add_argument("--dims", default="64,128,256")
    p.add_argument("--features", default="causal,all", help=f"from {list(FEATURES)}")
    p.add_argument("--blocks", default="", help="BlockSizes fields over the defaults: fwd_q=128,fwd_k=128")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: this compiles the kernels")

    from shardattn.kernels.attention.triton import BlockSizes

    change = {k: int(v) for k, v in (item.split("=") for item in args.blocks.split(",") if item)}
    for name in args.kernels.split(","):
        for dtype in args.dtypes.split(","):
            for d in map(int, args.dims.split(",")):
                blocks = dataclasses.replace(BlockSizes.get_default(d, d, _TYPES[dtype]), **change)
                for feat in args.features.split(","):
                    line, seconds, tile = compile_kernel(name, dtype, d, blocks, FEATURES[feat])
                    print(f"{name:11s} {dtype} D{d:<3d} {feat:6s} tile {tile[0]}x{tile[1]} w{tile[2]} "
                          f"s{tile[3]}: {line} ({seconds:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""Lightning attention decode step in Triton: one token per row against a slot-indexed state cache.

reference.py's `decode`: row b with slot s = slot_idx[b] in [0, num_slots) does, per query head h,

    S = lam_h * cache[s, h] + k_b^T v_b        o_b = scale * q_b S        cache[s, h] := S

One program owns one (row, query head, block of BV columns of Dv): it reads its [Dk, BV] block of the
slot's float32 state once, updates it in registers (an outer product and a decay; no tl.dot, so any head
dims up to 256 and tiny batches work), writes it back once and writes its BV outputs. The cache is aliased
to the kernel's cache output (`input_output_aliases`): with the cache donated under jit XLA hands the
kernel the caller's buffer and nothing else of the cache is read or written; undonated, XLA copies it
first (functional semantics). A padding row (slot outside [0, num_slots), -1 by convention) stores zero
outputs and returns before touching the cache. GQA reads kv head h // (H // Hkv) in-kernel.

Imported on first use by triton.py's `decode` (after its GPU / jax-triton check); `import triton` works
without a GPU, jax_triton is imported inside the wrapper.
"""

import dataclasses

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from shardattn.kernels import triton_interpret
from shardattn.kernels.lightning.varying import match_varying


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Columns of Dv per program and warps per program."""

    bv: int
    num_warps: int = 4

    def __post_init__(self):
        if self.bv < 16 or self.bv & (self.bv - 1):
            raise ValueError(f"bv={self.bv} must be a power of two >= 16")

    @staticmethod
    def get_default(dk: int, dv: int) -> "BlockSizes":
        # A [Dk, BV] float32 block of about 4K elements (32 per thread at 4 warps): Dk = 128 gives BV = 32,
        # 4 Dv blocks per (row, head), enough programs to fill the GPU already at B = 64, H = 64.
        bk, bv = _pow2(dk), _pow2(dv)
        return BlockSizes(bv=max(16, min(bv, 4096 // bk)), num_warps=4)


def _pow2(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _decode_row(
    q_ptr, k_ptr, v_ptr, slope_ptr, slot_ptr, cache_ptr, o_ptr, cache_out_ptr,
    H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, NUM_SLOTS: tl.constexpr, SCALE: tl.constexpr,
):  # fmt: skip
    # q: [B, H, DK]  k: [B, HKV, DK]  v: [B, HKV, DV]  slope: [H] float32  slot: [B] int32
    # cache, cache_out: [NUM_SLOTS, H, DK, DV] float32 (the same buffer)  o: [B, H, DV]
    pid = tl.program_id(0)  # b * H + h: the grid's first axis has room for any B * H
    pid_v = tl.program_id(1)
    b = pid // H
    h = pid % H
    rv = pid_v * BV + tl.arange(0, BV)
    mv = rv < DV
    o_off = pid.to(tl.int64) * DV + rv
    slot = tl.load(slot_ptr + b)
    if (slot < 0) | (slot >= NUM_SLOTS):  # padding row: o = 0, the cache is not touched
        tl.store(o_ptr + o_off, tl.zeros([BV], dtype=o_ptr.dtype.element_ty), mask=mv)
        return
    hk = h // (H // HKV)
    rk = tl.arange(0, BK)
    mk = rk < DK
    q = tl.load(q_ptr + pid.to(tl.int64) * DK + rk, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + (b * HKV + hk).to(tl.int64) * DK + rk, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + (b * HKV + hk).to(tl.int64) * DV + rv, mask=mv, other=0.0).to(tl.float32)
    lam = tl.exp(-tl.load(slope_ptr + h).to(tl.float32))
    # int64: num_slots * H * DK * DV passes 2^31 at realistic sizes (2048 slots of 64 x 128 x 128).
    state_off = (slot.to(tl.int64) * H + h) * (DK * DV) + rk[:, None] * DV + rv[None, :]
    mkv = mk[:, None] & mv[None, :]
    S = tl.load(cache_ptr + state_off, mask=mkv, other=0.0)
    S = lam * S + k[:, None] * v[None, :]
    o = SCALE * tl.sum(q[:, None] * S, axis=0)  # [BV]
    tl.store(cache_out_ptr + state_off, S, mask=mkv)
    tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=mv)


# jax-triton before 0.4 passes a pointer for every output after the inputs, aliased outputs included;
# from 0.4 an aliased output has no pointer of its own (it is its input's). One kernel for each.


@triton.jit
def decode_kernel(
    q_ptr, k_ptr, v_ptr, slope_ptr, slot_ptr, cache_ptr,  # inputs
    o_ptr, cache_out_ptr,  # outputs (cache_out aliases cache)
    H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, NUM_SLOTS: tl.constexpr, SCALE: tl.constexpr,
):  # fmt: skip
    _decode_row(q_ptr, k_ptr, v_ptr, slope_ptr, slot_ptr, cache_ptr, o_ptr, cache_out_ptr,
                H, HKV, DK, DV, BK, BV, NUM_SLOTS, SCALE)  # fmt: skip


@triton.jit
def decode_kernel_aliased(
    q_ptr, k_ptr, v_ptr, slope_ptr, slot_ptr, cache_ptr,  # inputs (cache also the aliased output)
    o_ptr,  # output
    H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, NUM_SLOTS: tl.constexpr, SCALE: tl.constexpr,
):  # fmt: skip
    _decode_row(q_ptr, k_ptr, v_ptr, slope_ptr, slot_ptr, cache_ptr, o_ptr, cache_ptr,
                H, HKV, DK, DV, BK, BV, NUM_SLOTS, SCALE)  # fmt: skip


# --------------------------------------------------------------------------------------------- wrapper

CACHE_INPUT = 5  # index of the cache among the kernel's inputs


def decode(q, k, v, cache, slot_idx, slopes, *, scale, blocks: BlockSizes | None = None):
    """reference.py's decode: o [B, H, Dv] in q.dtype and the updated cache [num_slots, H, Dk, Dv] float32.

    q: [B, H, Dk]  k: [B, Hkv, Dk]  v: [B, Hkv, Dv]  cache float32  slot_idx: [B] int32  slopes: [H].
    Called through triton.py's `decode`, which checks that the backend can run here.
    """
    B, H, DK = q.shape
    HKV, DV = k.shape[1], v.shape[2]
    blocks = blocks or BlockSizes.get_default(DK, DV)
    BV = min(blocks.bv, _pow2(DV))
    inputs = (q, k, v, slopes.astype(jnp.float32), slot_idx.astype(jnp.int32), cache)
    out_shape = (jax.ShapeDtypeStruct((B, H, DV), q.dtype), jax.ShapeDtypeStruct(cache.shape, cache.dtype))
    grid = (B * H, -(-DV // BV))
    meta = dict(H=H, HKV=HKV, DK=DK, DV=DV, BK=_pow2(DK), BV=BV, NUM_SLOTS=cache.shape[0], SCALE=float(scale))
    if triton_interpret.enabled():  # CPU interpreter: the aliased output is the input tensor itself
        o, new_cache = triton_interpret.launch(
            decode_kernel, grid, inputs, out_shape, input_output_aliases={CACHE_INPUT: 1}, **meta
        )
        return o, new_cache
    import jax_triton as jt

    new_api = tuple(jt.__version_info__[:2]) >= (0, 4)
    o, new_cache = jt.triton_call(
        *inputs, kernel=decode_kernel_aliased if new_api else decode_kernel, out_shape=out_shape, grid=grid,
        input_output_aliases={CACHE_INPUT: 1}, name="lightning_decode", num_warps=blocks.num_warps,
        num_stages=1, **meta,
    )  # fmt: skip
    # Inside shard_map triton_call's outputs are typed as varying over no mesh axis (see varying.py).
    return match_varying(o, q, k, v, cache, slopes), match_varying(new_cache, q, k, v, cache, slopes)

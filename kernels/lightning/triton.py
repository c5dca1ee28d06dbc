"""Lightning attention in Triton, called from JAX through jax-triton (NVIDIA GPUs).

Chunked form (docs/design.md), chunk of C tokens, position i inside the chunk, lam = exp(-s_h):

    o_i   = scale * (sum_{j<=i} lam^(i-j) (q_i . k_j) v_j  +  lam^(i+1) q_i S_in)
    S_out = lam^l S_in + sum_{j<l} lam^(l-1-j) k_j^T v_j                    (l = valid tokens)

One program owns one (sequence, query head, block of Dv columns) and walks its chunks in order with
the float32 state block S [Dk, BV] in registers, so the state never goes to memory; four tl.dot's per
chunk (q k^T, its product with v, q S_in, and the update k^T (lam^(l-1-j) v_j)). The walk is latency-bound,
so the blocks are chosen for programs per SM: at Dk = 128 (bf16/fp16) Dv blocks of 32 at 4 warps fit two
per SM, while the differentiated forward, which also stores S_in, runs Dv 64 at 8 warps.
Positions are "processing positions": token bos + p forward, bos + L - 1 - p with reverse=True, so
reverse costs nothing but the index map. GQA reads the kv head h // (H // Hkv) in-kernel; k and v are
never repeated. cu_seqlens gives each program its own sequence bounds, so packed sequences need no
re-layout.

Backward (no per-token state kept; residuals are q, k, v and, for bf16/fp16, S_in of every chunk):
  * chunk-parallel (bf16/fp16, the default): the differentiated forward also stores S_in of every
    chunk; a light reverse walk (dstate_kernel; for few (sequence, head) pairs cut into Dk blocks and
    into segments, see _g_walk) stores G = dL/dS_out of every chunk,
        dL/dS_in = lam^l G + scale sum_i lam^(i+1) q_i^T dO_i                  (dS0 at the first chunk)
    and one kernel over all (chunk, head) pairs (bwd_chunk_kernel) does the matrix work:
        dq_i = scale (sum_{j<=i} lam^(i-j) (dO_i . v_j) k_j + lam^(i+1) dO_i S_in^T)
        dk_j = scale sum_{i>=j} lam^(i-j) (dO_i . v_j) q_i + lam^(l-1-j) G v_j
        dv_j = scale sum_{i>=j} lam^(i-j) (q_i . k_j) dO_i + lam^(l-1-j) k_j G
  * sequential (float32): dq from the forward kernel on (q, k, v) := (dO, v, k) with state S^T (it also
    stores S_in^T of every chunk), then dkdv_kernel walks the chunks backwards carrying G.
  * dslopes, exactly, in both: every term of the loss is lam^e times something, e = the distance it
    decayed over, so dL/ds = -sum e * term. Split by where the decay is applied, each part is a product
    the kernels have at hand, with no cancellation between large sums:
        intra pairs:          -scale sum_{i>=j} (i-j) lam^(i-j) (q_i . k_j)(dO_i . v_j)
        keys into S_out:      -sum_j (l-1-j) k_j . [lam^(l-1-j) G v_j]
        queries from S_in:    -scale <S_in, sum_i (i+1) lam^(i+1) q_i^T dO_i>
                              (chunk-parallel: -scale sum_i (i+1) q_i . [lam^(i+1) dO_i S_in^T], dq's term)
        S_in carried to S_out: -l lam^l <G, S_in>
    (A closed form over global positions, sum_i i dO_i.o_i - sum_j j dk_j.k_j, cancels catastrophically
    in bf16: two O(T) sums whose difference is O(1/slope).)

Sequence parallelism (reference.py's local_state, state_gradient; values only): the forward's states-only
walk over k, v and the G walk's first pass over q, dO, every segment from zero, weighted and summed in JAX.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from shardattn.kernels import triton_interpret
from shardattn.kernels.lightning.varying import match_varying
from shardattn.kernels.triton_grid import flat_grid

CHUNK = 64
MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class Options:
    """Static options of one call: the custom_vjp's nondiff argument (hashable, no arrays)."""

    scale: float
    reverse: bool


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Block sizes per program, warps, pipeline stages and the segment rule; chosen by head dim and dtype."""

    fwd_bv: int
    fwd_warps: int
    bwd_bv: int
    bwd_warps: int
    num_stages: int = 2
    min_programs: int = 224  # programs a segment split may reach, at most (see _num_segments)
    min_seg_chunks: int = 8  # shortest segment worth a program, in chunks
    seg_below: int = 128  # cut sequences into segments only below this many (seq, head, Dv block) items
    bwd_parallel: bool = True  # chunk-parallel backward (else one sequential dkdv kernel)
    par_bv: int = 64  # Dv block of the chunk-parallel backward kernel
    par_warps: int = 8
    par_late_g: bool = False  # chunk-parallel backward: read G after dq is stored, S_in again for <S_in, G>
    seg_warps: int = 0  # warps of the forward walk when sequences are cut into segments (0: fwd_warps)
    walk_bk: int = 64  # Dk block of the backward's G walk when it has few items (see _g_walk)
    walk_bv: int = 0  # Dv block of the G walk (0: fwd_bv)
    store_bv: int = 0  # Dv block of the differentiated forward's walk, which also stores S_in (0: fwd_bv)
    store_warps: int = 0  # its warps (0: as the plain walk)
    state_programs: int = 256  # programs local_state / state_gradient cut segments for, at most (H100 sweep)
    state_bk: int = 0  # Dk block of state_gradient's walk (0: all of Dk; a split did not pay on the H100)

    def __post_init__(self):
        for name in ("fwd_bv", "bwd_bv", "par_bv", "walk_bk", "walk_bv", "store_bv", "state_bk"):
            value = getattr(self, name)
            if (value < 16 or value & (value - 1)) and not (name in ("walk_bv", "store_bv", "state_bk")
                                                             and value == 0):
                raise ValueError(f"{name}={value} must be a power of two >= 16 (tl.dot tiles)")

    def walk_warps(self, P: int) -> int:
        """Warps of a walk whose sequences are cut into P segments (P == 1: not cut)."""
        return self.seg_warps if P > 1 and self.seg_warps else self.fwd_warps

    @staticmethod
    def get_default(dk: int, dv: int, dtype) -> "BlockSizes":
        bk, bv = _pow2(dk), _pow2(dv)
        if jnp.dtype(dtype) == jnp.float32:
            # ieee float32 dots run on FMA units; smaller tiles keep registers in check.
            # The chunk-parallel backward's float32 tiles spill (seen on an H100 as launch failures
            # for want of local memory): float32 keeps the sequential backward.
            return BlockSizes(min(bv, 32), 4, min(bv, 32), 4, 1, bwd_parallel=False)
        # H100 sweep (benchmarks/RESULTS_triton.md): 3 stages beat 2; the parallel backward best with all of
        # Dv <= 128 in one program (no partial sums for dq, dk).
        bwd_bv = min(bv, 64 if bk <= 64 else 32)
        common = dict(par_bv=min(bv, 128) if bk <= 128 else 32, par_warps=4 if bk <= 64 else 8)
        if 64 < bk <= 128:
            # The chunk-parallel backward with G read late: 0.95-0.96x forward+backward on an H200 at
            # Dk = 128 (2026-12-01, two runs), 1.04-1.05x at Dk = 64, where it stays off.
            common["par_late_g"] = True
            # H200 sweep (2026-12-01): the plain forward walk in Dv blocks of 32 at 4 warps (236 registers,
            # 112 KiB shared memory: two programs per SM) with programs for two per SM of 132 SMs; the walk
            # that also stores S_in needs more shared memory (one program per SM) and runs Dv blocks of 64
            # at 8 warps, as does the G walk.
            return BlockSizes(min(bv, 32), 4, bwd_bv, 8, 3, seg_warps=4, min_programs=264,
                              store_bv=min(bv, 64), store_warps=8, walk_bv=min(bv, 64), **common)
        # Dk <= 64 or > 128 (H100): 4 warps at Dk <= 64; 8 for an unsplit walk at Dk > 128, 4 once sequences
        # are cut into segments.
        warps = 4 if bk <= 64 else 8
        return BlockSizes(min(bv, 64 if bk <= 64 else 32), warps, bwd_bv, warps, 3, seg_warps=4, **common)


def _pow2(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


# --------------------------------------------------------------------------------------------- kernels
# Triton is imported lazily (jax-triton refuses to import without a GPU jax); the kernels are built on
# first use and cached.


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    # Triton resolves the helpers a kernel calls in the module's globals, not in this closure.
    global _dot, _dot_acc, _finite, _seq_bounds, fwd_kernel, bwd_chunk_kernel

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        # float32 inputs need true float32 products (the reference tolerance is 2e-5; TF32 gives ~3e-4).
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _dot_acc(a, b, acc, IEEE: tl.constexpr):
        # acc + a @ b, accumulated by the dot itself (wgmma's accumulator: no separate add pass)
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _finite(x):
        # x with NaN and +-inf entries replaced by 0 (NaN fails every comparison). The intra-chunk dots
        # use such copies: a causally masked term of a dot is 0 * x, which is NaN for a non-finite x and
        # would reach earlier tokens. The raw values still go into the chunk states (and NaN rows are
        # re-injected in the forward), so non-finite values flow forward, and only forward.
        return tl.where(tl.abs(x.to(tl.float32)) < float("inf"), x, tl.zeros_like(x))

    @triton.jit
    def _seq_bounds(cu_ptr, coff_ptr, n, T, NC_PER_SEQ, C: tl.constexpr, VARLEN: tl.constexpr):
        # (first token, length, first chunk slot in the chunk-state buffer) of sequence n.
        if VARLEN:
            bos = tl.load(cu_ptr + n)
            L = tl.load(cu_ptr + n + 1) - bos
            coff = tl.load(coff_ptr + n)
        else:
            bos = n * T
            L = T
            coff = n * NC_PER_SEQ
        return bos, L, coff

    @triton.jit
    def fwd_kernel(
        q_ptr, k_ptr, v_ptr, slope_ptr, s0_ptr, cu_ptr, coff_ptr,  # inputs
        o_ptr, sf_ptr, st_ptr,  # outputs: o, final state, per-chunk incoming states
        T: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
        BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, SCALE: tl.constexpr,
        NC_TOTAL: tl.constexpr, REVERSE: tl.constexpr, VARLEN: tl.constexpr, HAS_S0: tl.constexpr,
        STORE_STATES: tl.constexpr, IEEE: tl.constexpr, P: tl.constexpr, TSEG: tl.constexpr,
        STATES_ONLY: tl.constexpr,
    ):
        # q: [B*T, H, DK]  k: [B*T, HKV, DK]  v: [B*T, HKV, DV]  s0, sf: [N, H, P, DK, DV] float32
        # st: [H, NC_TOTAL, DK, DV] float32 (S_in of every chunk, only with STORE_STATES)
        # Each sequence is cut into P segments of TSEG tokens (a multiple of C) in processing order; a
        # program runs one segment from its own incoming state s0[n, h, s]. STATES_ONLY runs a segment
        # from zero and only writes its local final state (the first pass of the segment scan).
        NVB: tl.constexpr = (DV + BV - 1) // BV
        pid_v = tl.program_id(0) % NVB  # one flat grid axis (flat_grid), Dv blocks fastest
        pid = tl.program_id(0) // NVB  # (n * H + h) * P + segment
        seg = pid % P
        pid_nh = pid // P
        n = pid_nh // H
        h = pid_nh % H
        hk = h // (H // HKV)
        NC_PER_SEQ: tl.constexpr = (T + C - 1) // C
        bos, L, coff = _seq_bounds(cu_ptr, coff_ptr, n, T, NC_PER_SEQ, C, VARLEN)
        p_lo = seg * TSEG
        seg_len = tl.minimum(L - p_lo, TSEG)

        neg = -tl.load(slope_ptr + h).to(tl.float32) * 1.4426950408889634  # log2(lam)
        ii = tl.arange(0, C)
        rk = tl.arange(0, BK)
        rv = pid_v * BV + tl.arange(0, BV)
        mk = rk < DK
        mv = rv < DV
        # lam^(i-j) for j <= i; the exponent is masked before exp2, so nothing overflows (no inf * 0).
        # The causal select below compares integer positions: a float [C, C] lag tile kept alive across
        # the loop for it cost registers. With the decay on v's rows (the state update below), Dv blocks
        # of 32 at 4 warps and Dk 128 no longer spill (ptxas: 148 bytes per thread before, 60 with this
        # change alone, 0 with both), so two programs fit on an SM.
        lag = ii[:, None] - ii[None, :]
        intra = tl.exp2(tl.where(lag >= 0, lag.to(tl.float32) * neg, float("-inf")))
        q_decay = tl.exp2((ii + 1).to(tl.float32) * neg)  # lam^(i+1)

        state_off = pid.to(tl.int64) * (DK * DV) + rk[:, None] * DV + rv[None, :]
        if HAS_S0:
            S = tl.load(s0_ptr + state_off, mask=mk[:, None] & mv[None, :], other=0.0)
        else:
            S = tl.zeros([BK, BV], dtype=tl.float32)

        num_chunks = tl.cdiv(seg_len, C)
        for c in range(0, num_chunks):
            p = p_lo + c * C + ii
            valid = p < p_lo + seg_len
            if REVERSE:
                t = bos + L - 1 - p
            else:
                t = bos + p
            t = t.to(tl.int64)
            k = tl.load(k_ptr + t[:, None] * (HKV * DK) + hk * DK + rk[None, :],
                        mask=valid[:, None] & mk[None, :], other=0.0)
            v = tl.load(v_ptr + t[:, None] * (HKV * DV) + hk * DV + rv[None, :],
                        mask=valid[:, None] & mv[None, :], other=0.0)
            if STORE_STATES:
                st_off = (h * NC_TOTAL + coff + p_lo // C + c).to(tl.int64) * (DK * DV)
                tl.store(st_ptr + st_off + rk[:, None] * DV + rv[None, :], S.to(st_ptr.dtype.element_ty),
                         mask=mk[:, None] & mv[None, :])
            if not STATES_ONLY:
                q = tl.load(q_ptr + t[:, None] * (H * DK) + h * DK + rk[None, :],
                            mask=valid[:, None] & mk[None, :], other=0.0)
                # Causality of non-finite values. The mask is selected (tl.where, never * 0), so a bad
                # q_i or k_j reaches only the rows i' >= j of the scores. In the second dot a bad v_j
                # would reach every row (0 * NaN), so bad rows of v are zeroed there and their NaN
                # re-enters every output from j on: bad_j = sum(0 * v_j) is 0, or NaN exactly when v_j
                # is not finite, and its prefix sum is NaN from j on. The chunk state below uses the raw
                # k, v and carries the NaN. Per chunk: one row reduction and its sum, the flag; only a
                # chunk with a non-finite v zeroes rows and scans, since the plain product is the same
                # otherwise (H200: forward 0.94-0.99x). What the rule still costs at Dk = 128: a walk
                # without it ran 0.80-0.90x, one leaving it to a second launch 0.94x (RESULTS_triton.md).
                scores = tl.where(ii[:, None] >= ii[None, :], _dot(q, tl.trans(k), IEEE) * intra, 0.0)
                bad = tl.sum(v.to(tl.float32) * 0.0, axis=1)  # [C]: 0 or NaN
                if tl.sum(bad, axis=0) == 0.0:
                    o = _dot(scores.to(v.dtype), v, IEEE)
                else:
                    o = _dot(scores.to(v.dtype), tl.where(bad[:, None] == 0.0, v, tl.zeros_like(v)), IEEE)
                    o += tl.cumsum(bad, axis=0)[:, None]
                o += q_decay[:, None] * _dot(q, S.to(q.dtype), IEEE)
                tl.store(o_ptr + t[:, None] * (H * DV) + h * DV + rv[None, :],
                         (SCALE * o).to(o_ptr.dtype.element_ty), mask=valid[:, None] & mv[None, :])
            # valid tokens in this chunk: only the last chunk of a segment may be short
            length = tl.minimum(seg_len - c * C, C)
            key_exp = (length - 1 - ii).to(tl.float32)
            key_decay = tl.exp2(tl.where(key_exp >= 0, key_exp * neg, float("-inf")))  # lam^(l-1-j)
            # k^T diag(lam^(l-1-j)) v with the decay on the rows of v: k^T is then read from shared memory
            # as it is (no register copy of k, its transpose and its re-staging for the dot).
            vd = (v * key_decay[:, None]).to(v.dtype)
            S = _dot_acc(tl.trans(k), vd, tl.exp2(length.to(tl.float32) * neg) * S, IEEE)

        tl.store(sf_ptr + state_off, S, mask=mk[:, None] & mv[None, :])

    @triton.jit
    def dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, slope_ptr, dsf_ptr, st_ptr, cu_ptr, coff_ptr,  # inputs
        dk_ptr, dv_ptr, ds0_ptr, dslope_ptr,  # outputs
        T: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
        BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, SCALE: tl.constexpr,
        NC_TOTAL: tl.constexpr, NV: tl.constexpr, NTOK: tl.constexpr, REVERSE: tl.constexpr,
        VARLEN: tl.constexpr, IEEE: tl.constexpr,
    ):
        # q, do per query head; k, v per kv head. dsf: [N, H, DK, DV] cotangent of the final state.
        # st: [H, NC_TOTAL, DV, DK] S_in^T of every chunk (written by the dq pass).
        # dk: [NV, B*T, H, DK] partial sums over Dv blocks (float32); dv: [B*T, H, DV] float32 per query
        # head (summed over the GQA group outside); ds0: [N, H, DK, DV]; dslope: [N*H*NV] partial sums.
        pid_v = tl.program_id(0) % NV  # one flat grid axis (flat_grid), Dv blocks fastest
        pid_nh = tl.program_id(0) // NV
        n = pid_nh // H
        h = pid_nh % H
        hk = h // (H // HKV)
        NC_PER_SEQ: tl.constexpr = (T + C - 1) // C
        bos, L, coff = _seq_bounds(cu_ptr, coff_ptr, n, T, NC_PER_SEQ, C, VARLEN)

        neg = -tl.load(slope_ptr + h).to(tl.float32) * 1.4426950408889634
        ii = tl.arange(0, C)
        rk = tl.arange(0, BK)
        rv = pid_v * BV + tl.arange(0, BV)
        mk = rk < DK
        mv = rv < DV
        mkv = mk[:, None] & mv[None, :]
        # Rows j (keys), columns i (queries): lam^(i-j) for i >= j, and the lag i - j itself.
        lag = (ii[None, :] - ii[:, None]).to(tl.float32)
        intra_t = tl.exp2(tl.where(lag >= 0, lag * neg, float("-inf")))
        pos1 = (ii + 1).to(tl.float32)
        q_decay = tl.exp2(pos1 * neg)  # lam^(i+1)

        state_off = (n * H + h).to(tl.int64) * (DK * DV) + rk[:, None] * DV + rv[None, :]
        G = tl.load(dsf_ptr + state_off, mask=mkv, other=0.0)  # dL/dS_out of the current chunk
        # Slope gradient: an elementwise accumulator for the <S_in, .> terms and a scalar for the rest.
        ds_state = tl.zeros([BK, BV], dtype=tl.float32)
        ds_rest = 0.0

        num_chunks = tl.cdiv(L, C)
        for cc in range(0, num_chunks):
            c = num_chunks - 1 - cc
            p = c * C + ii
            valid = p < L
            if REVERSE:
                t = bos + L - 1 - p
            else:
                t = bos + p
            t = t.to(tl.int64)
            mq = valid[:, None] & mk[None, :]
            mo = valid[:, None] & mv[None, :]
            q = tl.load(q_ptr + t[:, None] * (H * DK) + h * DK + rk[None, :], mask=mq, other=0.0)
            k = tl.load(k_ptr + t[:, None] * (HKV * DK) + hk * DK + rk[None, :], mask=mq, other=0.0)
            v = tl.load(v_ptr + t[:, None] * (HKV * DV) + hk * DV + rv[None, :], mask=mo, other=0.0)
            do = tl.load(do_ptr + t[:, None] * (H * DV) + h * DV + rv[None, :], mask=mo, other=0.0)
            st_off = (h * NC_TOTAL + coff + c).to(tl.int64) * (DK * DV) + rv[None, :] * DK + rk[:, None]
            S_in = tl.load(st_ptr + st_off, mask=mkv, other=0.0)  # [BK, BV]

            length = tl.minimum(L - c * C, C)
            key_exp = (length - 1 - ii).to(tl.float32)
            key_decay = tl.exp2(tl.where(key_exp >= 0, key_exp * neg, float("-inf")))  # lam^(l-1-j)
            chunk_decay = tl.exp2(length.to(tl.float32) * neg)

            # Zeroed copies of non-finite entries and selected masks in the intra-chunk products (as in
            # the forward): a NaN in q_i then reaches no dk_j, dv_j of a later token j.
            # (k, v enter only products whose masked terms are selected away: no copies needed.)
            q_f = _finite(q)
            kq = _dot(k, tl.trans(q), IEEE)  # [j, i] = k_j . q_i
            vdo = _dot(v, tl.trans(do), IEEE)  # [j, i] = v_j . dO_i
            a = tl.where(lag >= 0, kq * intra_t, 0.0)
            b = tl.where(lag >= 0, vdo * intra_t, 0.0)
            dv = SCALE * _dot(a.to(do.dtype), do, IEEE)
            dk = SCALE * _dot(b.to(q.dtype), q_f, IEEE)
            # G holds dL/dS_out of this chunk: the keys' share
            dk_inter = key_decay[:, None] * _dot(v, tl.trans(G.to(v.dtype)), IEEE)
            dv += key_decay[:, None] * _dot(k, G.to(k.dtype), IEEE)
            dk += dk_inter
            ds_key = tl.sum(key_exp * tl.sum(k.to(tl.float32) * dk_inter, axis=1), axis=0)
            ds_intra = SCALE * tl.sum(tl.sum(lag * a * vdo, axis=1), axis=0)  # lam^(i-j) once: a has it

            qd = (q * q_decay[:, None]).to(q.dtype)
            qd_pos = (q * (q_decay * pos1)[:, None]).to(q.dtype)
            x = _dot(tl.trans(qd), do, IEEE)  # sum_i lam^(i+1) q_i^T dO_i
            x_pos = _dot(tl.trans(qd_pos), do, IEEE)  # sum_i (i+1) lam^(i+1) q_i^T dO_i
            ds_state += S_in * (SCALE * x_pos + (length.to(tl.float32) * chunk_decay) * G)
            ds_rest += ds_key + ds_intra
            G = chunk_decay * G + SCALE * x

            dk_base = dk_ptr + pid_v.to(tl.int64) * (NTOK * H * DK)
            tl.store(dk_base + t[:, None] * (H * DK) + h * DK + rk[None, :], dk.to(dk_ptr.dtype.element_ty),
                     mask=mq)
            tl.store(dv_ptr + t[:, None] * (H * DV) + h * DV + rv[None, :], dv.to(dv_ptr.dtype.element_ty),
                     mask=mo)

        tl.store(ds0_ptr + state_off, G, mask=mkv)
        tl.store(dslope_ptr + pid_nh * NV + pid_v, -(tl.sum(tl.sum(ds_state, axis=1), axis=0) + ds_rest))

    @triton.jit
    def dstate_kernel(
        q_ptr, do_ptr, slope_ptr, g0_ptr, cu_ptr, coff_ptr,  # inputs
        gt_ptr, gout_ptr,  # outputs
        T: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
        BV: tl.constexpr, C: tl.constexpr, SCALE: tl.constexpr, NC_TOTAL: tl.constexpr,
        REVERSE: tl.constexpr, VARLEN: tl.constexpr, IEEE: tl.constexpr, P: tl.constexpr,
        TSEG: tl.constexpr, SEG_G0: tl.constexpr, HAS_G0: tl.constexpr, STORE_STATES: tl.constexpr,
    ):
        # The backward state chain alone: walks the chunks last to first and stores G = dL/dS_out of
        # every chunk (gt: [H, NC_TOTAL, DK, DV]); dL/dS_in = lam^l G + scale sum_i lam^(i+1) q_i^T dO_i.
        # Each sequence is cut into P segments of TSEG tokens (as in fwd_kernel); a program walks one
        # segment backwards and writes the G leaving it at its first chunk (gout: [N, H, P, DK, DV]).
        # The walk starts from g0: with SEG_G0 one G per segment ([N, H, P, DK, DV]: the segment scan's
        # second pass), else g0 = dL/dS_final [N, H, DK, DV] feeds the last segment and the others start
        # from zero (every segment from zero without HAS_G0: state_gradient). A program owns a [BK, BV]
        # block of G: its rows need only the same columns of q.
        NVB: tl.constexpr = (DV + BV - 1) // BV
        NKB: tl.constexpr = (DK + BK - 1) // BK
        pid_v = tl.program_id(0) % NVB  # one flat grid axis (flat_grid): Dv blocks, then Dk blocks
        pid_k = (tl.program_id(0) // NVB) % NKB
        pid = tl.program_id(0) // (NVB * NKB)  # (n * H + h) * P + segment
        seg = pid % P
        pid_nh = pid // P
        n = pid_nh // H
        h = pid_nh % H
        NC_PER_SEQ: tl.constexpr = (T + C - 1) // C
        bos, L, coff = _seq_bounds(cu_ptr, coff_ptr, n, T, NC_PER_SEQ, C, VARLEN)
        p_lo = seg * TSEG
        seg_len = tl.minimum(L - p_lo, TSEG)
        neg = -tl.load(slope_ptr + h).to(tl.float32) * 1.4426950408889634
        ii = tl.arange(0, C)
        rk = pid_k * BK + tl.arange(0, BK)
        rv = pid_v * BV + tl.arange(0, BV)
        mk = rk < DK
        mv = rv < DV
        mkv = mk[:, None] & mv[None, :]
        q_decay = tl.exp2((ii + 1).to(tl.float32) * neg)
        tile = rk[:, None] * DV + rv[None, :]
        state_off = pid.to(tl.int64) * (DK * DV) + tile
        if SEG_G0:
            G = tl.load(g0_ptr + state_off, mask=mkv, other=0.0)
        elif HAS_G0:
            G = tl.load(g0_ptr + pid_nh.to(tl.int64) * (DK * DV) + tile, mask=mkv & (seg == P - 1), other=0.0)
        else:
            G = tl.zeros([BK, BV], dtype=tl.float32)
        num_chunks = tl.cdiv(seg_len, C)
        for cc in range(0, num_chunks):
            c = p_lo // C + num_chunks - 1 - cc
            p = c * C + ii
            valid = p < L
            if REVERSE:
                t = bos + L - 1 - p
            else:
                t = bos + p
            t = t.to(tl.int64)
            q = tl.load(q_ptr + t[:, None] * (H * DK) + h * DK + rk[None, :],
                        mask=valid[:, None] & mk[None, :], other=0.0)
            do = tl.load(do_ptr + t[:, None] * (H * DV) + h * DV + rv[None, :],
                         mask=valid[:, None] & mv[None, :], other=0.0)
            if STORE_STATES:
                gt_off = (h * NC_TOTAL + coff + c).to(tl.int64) * (DK * DV) + tile
                tl.store(gt_ptr + gt_off, G.to(gt_ptr.dtype.element_ty), mask=mkv)
            length = tl.minimum(L - c * C, C)
            qd = (q * q_decay[:, None]).to(q.dtype)
            G = tl.exp2(length.to(tl.float32) * neg) * G + SCALE * _dot(tl.trans(qd), do, IEEE)
        tl.store(gout_ptr + state_off, G, mask=mkv)

    @triton.jit
    def bwd_chunk_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, slope_ptr, st_ptr, gt_ptr, cu_ptr, coff_ptr, slot_seq_ptr,
        slot_chunk_ptr,  # inputs
        dq_ptr, dk_ptr, dv_ptr, dslope_ptr,  # outputs
        T: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
        BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, SCALE: tl.constexpr,
        NC_TOTAL: tl.constexpr, NV: tl.constexpr, NTOK: tl.constexpr, REVERSE: tl.constexpr,
        VARLEN: tl.constexpr, IEEE: tl.constexpr, LATE_G: tl.constexpr,
    ):
        # Every chunk at once, given S_in (st) and G = dL/dS_out (gt) of each chunk:
        #   dq_i = scale (sum_{j<=i} lam^(i-j) (dO_i . v_j) k_j + lam^(i+1) dO_i S_in^T)
        #   dk_j = scale sum_{i>=j} lam^(i-j) (dO_i . v_j) q_i + lam^(l-1-j) G v_j
        #   dv_j = scale sum_{i>=j} lam^(i-j) (q_i . k_j) dO_i + lam^(l-1-j) k_j G
        # and this chunk's share of dL/dslope (module docstring). dq, dk: [NV, B*T, H, DK] partial sums
        # over Dv blocks; dv: [B*T, H, DV] per query head; dslope: [NV, NC_TOTAL, H].
        # LATE_G: G is read only once dq is stored, and S_in read a second time (a cache hit) for the
        # <S_in, G> term, so that neither [Dk, BV] tile is held across dq's work (at Dk = 128: 84 bytes of
        # spills per thread instead of 196 and 90112 B of shared memory instead of 114688, ptxas).
        pid_v = tl.program_id(0) % NV  # one flat grid axis (flat_grid): Dv blocks, chunk slots, heads
        slot = (tl.program_id(0) // NV) % NC_TOTAL
        h = tl.program_id(0) // (NV * NC_TOTAL)
        hk = h // (H // HKV)
        NC_PER_SEQ: tl.constexpr = (T + C - 1) // C
        if VARLEN:
            n = tl.load(slot_seq_ptr + slot)
            c = tl.load(slot_chunk_ptr + slot)
        else:
            n = slot // NC_PER_SEQ
            c = slot % NC_PER_SEQ
        bos, L, coff = _seq_bounds(cu_ptr, coff_ptr, n, T, NC_PER_SEQ, C, VARLEN)
        in_use = c * C < L  # varlen leaves slots past the last chunk unused (never written states)
        length = tl.maximum(tl.minimum(L - c * C, C), 0)

        neg = -tl.load(slope_ptr + h).to(tl.float32) * 1.4426950408889634
        ii = tl.arange(0, C)
        rk = tl.arange(0, BK)
        rv = pid_v * BV + tl.arange(0, BV)
        mk = rk < DK
        mv = rv < DV
        mkv = mk[:, None] & mv[None, :] & in_use
        lag = (ii[:, None] - ii[None, :]).to(tl.float32)  # [i, j]
        intra = tl.exp2(tl.where(lag >= 0, lag * neg, float("-inf")))
        pos1 = (ii + 1).to(tl.float32)
        q_decay = tl.exp2(pos1 * neg)
        key_exp = (length - 1 - ii).to(tl.float32)
        key_decay = tl.exp2(tl.where(key_exp >= 0, key_exp * neg, float("-inf")))

        p = c * C + ii
        valid = p < L
        if REVERSE:
            t = bos + L - 1 - p
        else:
            t = bos + p
        t = t.to(tl.int64)
        mq = valid[:, None] & mk[None, :]
        mo = valid[:, None] & mv[None, :]
        q = tl.load(q_ptr + t[:, None] * (H * DK) + h * DK + rk[None, :], mask=mq, other=0.0)
        k = tl.load(k_ptr + t[:, None] * (HKV * DK) + hk * DK + rk[None, :], mask=mq, other=0.0)
        v = tl.load(v_ptr + t[:, None] * (HKV * DV) + hk * DV + rv[None, :], mask=mo, other=0.0)
        do = tl.load(do_ptr + t[:, None] * (H * DV) + h * DV + rv[None, :], mask=mo, other=0.0)
        s_off = (h * NC_TOTAL + coff + c).to(tl.int64) * (DK * DV) + rk[:, None] * DV + rv[None, :]
        if not LATE_G:
            Gc = tl.load(gt_ptr + s_off, mask=mkv, other=0.0)

        # Zeroed copies of non-finite entries and selected masks in the intra-chunk products (as in the
        # forward): a NaN in q_i then reaches no dk_j, dv_j of a later token j.
        # (The score products select their masked terms away and need no copies.)
        qk = _dot(q, tl.trans(k), IEEE)  # [i, j]
        dov = _dot(do, tl.trans(v), IEEE)  # [i, j]
        a = tl.where(lag >= 0, qk * intra, 0.0)
        b = tl.where(lag >= 0, dov * intra, 0.0)
        # dq and its slope terms first, stored before dk and dv are formed: fewer tiles live at once. (H200,
        # b4-t8k fwd+bwd against the kernel with the x_pos dot: this order 0.82x; the same statements with
        # dq formed next to dk and stored last 1.14x. Register pressure, presumably; not inspected.)
        ds = 0.0
        base = pid_v.to(tl.int64) * (NTOK * H * DK)
        rows = t[:, None] * (H * DK) + h * DK + rk[None, :]
        S_in = tl.load(st_ptr + s_off, mask=mkv, other=0.0)
        dq_inter = q_decay[:, None] * _dot(do, tl.trans(S_in.to(do.dtype)), IEEE)
        dq = _dot(b.to(k.dtype), _finite(k), IEEE) + dq_inter
        ds += SCALE * tl.sum(tl.sum(lag * a * dov, axis=1), axis=0)  # lam^(i-j) once: a has it
        # Queries from S_in: scale <S_in, sum_i (i+1) lam^(i+1) q_i^T dO_i>
        #   = scale sum_i (i+1) q_i . [lam^(i+1) dO_i S_in^T], from dq's term above: no [Dk, Dv] dot.
        ds += SCALE * tl.sum(tl.sum(pos1[:, None] * q.to(tl.float32) * dq_inter, axis=1), axis=0)
        chunk_decay = tl.exp2(length.to(tl.float32) * neg)
        if LATE_G:
            tl.store(dq_ptr + base + rows, (SCALE * dq).to(dq_ptr.dtype.element_ty), mask=mq)
            Gc = tl.load(gt_ptr + s_off, mask=mkv, other=0.0)
            S_in = tl.load(st_ptr + s_off, mask=mkv, other=0.0)
        ds += (length.to(tl.float32) * chunk_decay) * tl.sum(
            tl.sum(S_in.to(tl.float32) * Gc.to(tl.float32), axis=1), axis=0)
        if not LATE_G:
            tl.store(dq_ptr + base + rows, (SCALE * dq).to(dq_ptr.dtype.element_ty), mask=mq)
        dk_inter = key_decay[:, None] * _dot(v, tl.trans(Gc.to(v.dtype)), IEEE)
        dk = SCALE * _dot(tl.trans(b).to(q.dtype), _finite(q), IEEE) + dk_inter
        dv = SCALE * _dot(tl.trans(a).to(do.dtype), do, IEEE)
        dv += key_decay[:, None] * _dot(k, Gc.to(k.dtype), IEEE)
        ds += tl.sum(key_exp * tl.sum(k.to(tl.float32) * dk_inter, axis=1), axis=0)
        tl.store(dk_ptr + base + rows, dk.to(dk_ptr.dtype.element_ty), mask=mq)
        tl.store(dv_ptr + t[:, None] * (H * DV) + h * DV + rv[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=mo)
        tl.store(dslope_ptr + (pid_v * NC_TOTAL + slot) * H + h, -ds)

    @triton.jit
    def fwd_where_flagged_kernel(
        q_ptr, k_ptr, v_ptr, slope_ptr, s0_ptr, cu_ptr, coff_ptr, flag_ptr, o_in_ptr,  # inputs
        o_ptr, sf_ptr, st_ptr,  # outputs: o_in in place (input_output_aliases), scratch final states
        T: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
        BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, SCALE: tl.constexpr,
        NC_TOTAL: tl.constexpr, REVERSE: tl.constexpr, VARLEN: tl.constexpr, HAS_S0: tl.constexpr,
        STORE_STATES: tl.constexpr, IEEE: tl.constexpr, P: tl.constexpr, TSEG: tl.constexpr,
        STATES_ONLY: tl.constexpr,
    ):
        # fwd_kernel's programs, each only where its (sequence, head) is flagged (flag_ptr[n * H + h]
        # != 0; P == 1): another backend's forward left o_in there (mosaic_gpu.py), and this rewrites
        # o of the flagged pairs by fwd_kernel's walk, the non-finite rule included. The rest return.
        NVB: tl.constexpr = (DV + BV - 1) // BV
        if tl.load(flag_ptr + tl.program_id(0) // NVB) != 0.0:
            fwd_kernel(q_ptr, k_ptr, v_ptr, slope_ptr, s0_ptr, cu_ptr, coff_ptr, o_ptr, sf_ptr, st_ptr,
                       T, H, HKV, DK, DV, BK, BV, C, SCALE, NC_TOTAL, REVERSE, VARLEN, HAS_S0,
                       STORE_STATES, IEEE, P, TSEG, STATES_ONLY)

    @triton.jit
    def bwd_chunk_where_flagged_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, slope_ptr, st_ptr, gt_ptr, cu_ptr, coff_ptr, slot_seq_ptr,
        slot_chunk_ptr, flag_ptr, dq_in_ptr, dk_in_ptr, dv_in_ptr, dslope_in_ptr,  # inputs
        dq_ptr, dk_ptr, dv_ptr, dslope_ptr,  # outputs: the *_in buffers, in place (input_output_aliases)
        T: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
        BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, SCALE: tl.constexpr,
        NC_TOTAL: tl.constexpr, NV: tl.constexpr, NTOK: tl.constexpr, REVERSE: tl.constexpr,
        VARLEN: tl.constexpr, IEEE: tl.constexpr, LATE_G: tl.constexpr,
    ):
        # bwd_chunk_kernel's programs, each only where its (chunk slot, head) is flagged
        # (flag_ptr[slot * H + h] != 0): another backend's chunk kernel left its outputs there
        # (mosaic_gpu.py), and this rewrites the flagged items', the non-finite rule included.
        slot = (tl.program_id(0) // NV) % NC_TOTAL
        h = tl.program_id(0) // (NV * NC_TOTAL)
        if tl.load(flag_ptr + slot * H + h) != 0.0:
            bwd_chunk_kernel(q_ptr, k_ptr, v_ptr, do_ptr, slope_ptr, st_ptr, gt_ptr, cu_ptr, coff_ptr,
                             slot_seq_ptr, slot_chunk_ptr, dq_ptr, dk_ptr, dv_ptr, dslope_ptr,
                             T, H, HKV, DK, DV, BK, BV, C, SCALE, NC_TOTAL, NV, NTOK, REVERSE, VARLEN, IEEE,
                             LATE_G)

    return (fwd_kernel, dkdv_kernel, dstate_kernel, bwd_chunk_kernel, fwd_where_flagged_kernel,
            bwd_chunk_where_flagged_kernel)


# --------------------------------------------------------------------------------------------- wrappers


def _launch(kernel, grid, inputs, out_shapes, *, name, num_warps, num_stages, input_output_aliases=None,
            **constexprs):
    """One Triton launch through jax-triton; outputs follow the inputs in the kernel's signature.
    input_output_aliases {input index: output index}: that output is written over that input's buffer."""
    aliases = dict(input_output_aliases or {})
    if triton_interpret.enabled():  # development/CPU tests: Triton's interpreter, no GPU
        outputs = triton_interpret.launch(kernel, grid, inputs, out_shapes, input_output_aliases=aliases,
                                          **constexprs)
    else:
        import jax_triton as jt

        outputs = jt.triton_call(
            *inputs, kernel=kernel, out_shape=out_shapes, grid=grid, name=name, num_warps=num_warps,
            num_stages=num_stages, input_output_aliases=aliases, **constexprs,
        )
    # Inside shard_map, the launch's outputs (triton_call's, or the interpreter's pure_callback's) are
    # typed as varying over no mesh axis; they vary like the data they were computed from. (This runs
    # inside the custom_vjp rules, so the cast is never differentiated: no psum of a per-shard value.)
    arrays = [x for x in inputs if isinstance(x, jax.Array)]
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(match_varying(o, *arrays) for o in outputs)
    return match_varying(outputs, *arrays)


def _layout(cu_seqlens, B, T):
    """(number of sequences, chunk slots in the per-chunk state buffer, cu, chunk offset per sequence)."""
    C = CHUNK
    if cu_seqlens is None:
        dummy = jnp.zeros((1,), jnp.int32)
        return B, B * (-(-T // C)), dummy, dummy
    N = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.astype(jnp.int32)
    chunks = (cu[1:] - cu[:-1] + C - 1) // C
    coff = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(chunks).astype(jnp.int32)])
    # sum_n ceil(L_n / C) <= ceil(T / C) + N - 1
    return N, -(-T // C) + N, cu, coff


def _num_segments(num_items, num_chunks, blocks, programs=None):
    """Segments per sequence so that up to `blocks.min_programs` programs run at once.

    Few (sequence, head, block) items leave most SMs idle while each walks a long chain of chunks;
    cutting sequences into segments costs one extra read of the walk's inputs (the first pass). The
    forward's time is not monotonic in the count (H100, b1-t32k, 32 items of 512 chunks: 5 segments
    0.49 ms, 7: 0.38-0.39, 8: 0.49-0.52, 9: 0.44-0.45, 10: 0.44, 11: 0.41, 13: 0.47, 17: 0.46), so the
    count is capped (rounded down) at the best measured: 224 programs, 7 segments of 32 items. At Dk = 128
    in bf16/fp16 the cap is 264, two programs per SM on 132 SMs (H200 / H100 SXM), since two of those
    programs fit on an SM (BlockSizes.get_default; H200, 2026-12-01).
    `programs` given (local_state, state_gradient: segments are independent there, no scan over them
    in a kernel) replaces both min_programs and seg_below.
    """
    if programs is None:
        if num_items >= min(blocks.min_programs, blocks.seg_below):
            return 1
        programs = blocks.min_programs
    want = programs // num_items
    return max(1, min(want, num_chunks // blocks.min_seg_chunks))


def _segments(num_items, T, blocks, split=True, programs=None):
    """(P, TSEG): segments per sequence and their length in tokens (a multiple of CHUNK; T if P == 1).

    Every segment but the last in processing order is full; none is empty.
    """
    num_chunks = -(-T // CHUNK)
    P = _num_segments(num_items, num_chunks, blocks, programs) if split else 1
    seg_chunks = -(-num_chunks // P)
    P = -(-num_chunks // seg_chunks)
    return P, (seg_chunks * CHUNK if P > 1 else T)


def _walk_blocks(blocks, BV, DV, P, stores):
    """(Dv block, warps) of the forward walk over P segments of plain-walk Dv blocks BV; `stores`: the
    walk that writes o and also stores S_in of every chunk, which may take its own (store_bv/_warps)."""
    if stores and blocks.store_bv:
        return min(blocks.store_bv, _pow2(DV)), blocks.store_warps or blocks.walk_warps(P)
    return BV, blocks.walk_warps(P)


def _forward_pass(q, k, v, slopes, s0, cu_seqlens, *, scale, reverse, store_states, out_dtype, blocks,
                  bv=None, states_only=False, state_dtype=jnp.float32):
    """The forward kernel: o [B, T, H, DV], final state [N, H, DK, DV], optional per-chunk S_in.

    Also serves the dq pass (q, k, v) := (dO, v, k), which is why the roles are generic here.
    """
    B, T, H, DK = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    N, nc_total, cu, coff = _layout(cu_seqlens, B, T)
    BK = _pow2(DK)
    BV = min(bv or blocks.fwd_bv, _pow2(DV))
    NV = -(-DV // BV)
    # The segments (and their first pass, which local_state shares) follow the plain walk's Dv block even
    # where the walk that also writes o and stores S_in takes other blocks and warps (store_bv/_warps).
    P, TSEG = _segments(N * H * NV, T, blocks, split=cu_seqlens is None and not states_only)
    walk_bv, warps = _walk_blocks(blocks, BV, DV, P, stores=store_states and not states_only and bv is None)
    dummy = jnp.zeros((1,), jnp.float32)
    st_shape = jax.ShapeDtypeStruct((H, nc_total, DK, DV) if store_states else (1,), state_dtype)
    meta = dict(
        name="lightning_fwd", num_warps=warps, num_stages=blocks.num_stages,
        T=T, H=H, HKV=HKV, DK=DK, DV=DV, BK=BK, BV=walk_bv, C=CHUNK, SCALE=float(scale),
        NC_TOTAL=nc_total, REVERSE=bool(reverse), VARLEN=cu_seqlens is not None, IEEE=q.dtype == jnp.float32,
        P=P, TSEG=TSEG,
    )
    state_shape = jax.ShapeDtypeStruct((N, H, P, DK, DV), jnp.float32)
    if P > 1:
        s0_arg, has_s0 = segment_incoming(k, v, slopes, s0, bool(reverse), blocks, P, TSEG, BV), True
    else:
        has_s0 = s0 is not None
        s0_arg = s0[:, :, None] if has_s0 else dummy
    o, sf, st = _launch(
        _kernels()[0], flat_grid(-(-DV // walk_bv), N * H * P), (q, k, v, slopes, s0_arg, cu, coff),
        (jax.ShapeDtypeStruct(q.shape[:3] + (DV,) if not states_only else (1,), out_dtype), state_shape,
         st_shape),
        HAS_S0=has_s0, STORE_STATES=bool(store_states), STATES_ONLY=bool(states_only), **meta,
    )
    return o, sf[:, :, -1], (st if store_states else None)


def forward_where_flagged(flags, o, q, k, v, slopes, s0, *, scale):
    """o with the (sequence, head) pairs whose flags [B * H] are not 0 recomputed by this backend's walk
    (one segment, the non-finite rule included); the other pairs keep o as it is, in place.

    For another backend's forward (mosaic_gpu.py) that follows the non-finite rule only for finite
    inputs: it flags the pairs whose final state is not finite (a non-finite k or v reaches it).
    Values only, no cu_seqlens, no reverse. The unflagged programs return at once: on finite inputs
    this launch costs its start only.
    """
    B, T, H, DK = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    blocks = BlockSizes.get_default(DK, DV, q.dtype)
    N, nc_total, cu, coff = _layout(None, B, T)
    BV = min(blocks.fwd_bv, _pow2(DV))
    walk_bv, warps = _walk_blocks(blocks, BV, DV, 1, stores=False)
    dummy = jnp.zeros((1,), jnp.float32)
    inputs = (q, k, v, slopes, dummy if s0 is None else s0[:, :, None], cu, coff, flags, o)
    out, _, _ = _launch(
        _kernels()[4], flat_grid(-(-DV // walk_bv), N * H), inputs,
        (jax.ShapeDtypeStruct(o.shape, o.dtype), jax.ShapeDtypeStruct((N, H, 1, DK, DV), jnp.float32),
         jax.ShapeDtypeStruct((1,), jnp.float32)),
        input_output_aliases={len(inputs) - 1: 0}, name="lightning_fwd_where_flagged", num_warps=warps,
        num_stages=blocks.num_stages, T=T, H=H, HKV=HKV, DK=DK, DV=DV, BK=_pow2(DK), BV=walk_bv, C=CHUNK,
        SCALE=float(scale), NC_TOTAL=nc_total, REVERSE=False, VARLEN=False, HAS_S0=s0 is not None,
        STORE_STATES=False, IEEE=q.dtype == jnp.float32, P=1, TSEG=T, STATES_ONLY=False,
    )  # fmt: skip
    return out


def _check_supported(q, k, v):
    if triton_interpret.enabled():
        pass  # Triton's CPU interpreter (kernels/triton_interpret.py) needs neither a GPU nor jax-triton
    elif jax.default_backend() != "gpu":
        raise NotImplementedError(f"the triton backend needs a GPU; jax.default_backend() is "
                                  f"{jax.default_backend()!r}")
    else:
        try:
            import jax_triton  # noqa: F401
            import triton  # noqa: F401
        except Exception as err:  # jax-triton raises ImportError/RuntimeError without a CUDA jax
            raise NotImplementedError(f"the triton backend needs jax-triton and triton: {err}") from err
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype) not in map(jnp.dtype, (jnp.float32, jnp.bfloat16, jnp.float16)):
            raise NotImplementedError(f"the triton backend takes float32/bfloat16/float16, got {name}.dtype="
                                      f"{x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise NotImplementedError(
            f"the triton backend needs one dtype for q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}")
    Dk, Dv = q.shape[3], v.shape[3]
    if max(Dk, Dv) > MAX_HEAD_DIM:
        raise NotImplementedError(
            f"the triton backend takes head dims up to {MAX_HEAD_DIM}, got {Dk=}, {Dv=}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _lightning(q, k, v, slopes, initial_state, cu_seqlens, opts):
    # Without differentiation nothing is kept for a backward pass: no chunk states are written.
    blocks = BlockSizes.get_default(q.shape[3], v.shape[3], q.dtype)
    o, final, _ = _forward_pass(q, k, v, slopes, initial_state, cu_seqlens, scale=opts.scale,
                                reverse=opts.reverse, store_states=False, out_dtype=q.dtype, blocks=blocks)
    return o, final


def _state_dtype(dtype):
    # Chunk states kept for the backward pass: bf16 inputs round them to bf16 in every product anyway;
    # fp16 could overflow, float32 must stay exact.
    return jnp.bfloat16 if dtype == jnp.bfloat16 else jnp.float32


def _lightning_fwd(q, k, v, slopes, initial_state, cu_seqlens, opts):
    # Only under differentiation: the forward also keeps S_in of every chunk for the chunk-parallel
    # backward (O(T * D) per head: T / C * Dk * Dv), which then skips its own walk over k and v.
    blocks = BlockSizes.get_default(q.shape[3], v.shape[3], q.dtype)
    keep = blocks.bwd_parallel
    o, final, states = _forward_pass(q, k, v, slopes, initial_state, cu_seqlens, scale=opts.scale,
                                     reverse=opts.reverse, store_states=keep, out_dtype=q.dtype,
                                     blocks=blocks, state_dtype=_state_dtype(q.dtype))
    return (o, final), (q, k, v, slopes, initial_state, cu_seqlens, states)


def _lightning_bwd(opts, residuals, cotangents, g_walk=None, chunks=None):
    """The backward rule. Another backend's parts of the chunk-parallel backward (mosaic_gpu.py), each
    returning what this one's does: g_walk as _g_walk, chunks as _chunks."""
    q, k, v, slopes, s0, cu_seqlens, states = residuals
    do, dfinal = cotangents
    blocks = BlockSizes.get_default(q.shape[3], v.shape[3], q.dtype)
    do = do.astype(q.dtype)
    dfinal = dfinal.astype(jnp.float32)
    if blocks.bwd_parallel:
        return _bwd_parallel(opts, blocks, q, k, v, slopes, s0, cu_seqlens, do, dfinal, states,
                             g_walk=g_walk, chunks=chunks)
    return _bwd_sequential(opts, blocks, q, k, v, slopes, s0, cu_seqlens, do, dfinal)


def _bwd_parallel(opts, blocks, q, k, v, slopes, s0, cu_seqlens, do, dfinal, states, g_walk=None,
                  chunks=None):
    """Backward as fla structures it: two light sequential chains (S_in and G of every chunk), then one
    kernel over all (chunk, head) pairs that does the matrix work. Chunk states are stored in the input
    dtype (bf16/fp16 products round them anyway), float32 for float32 inputs."""
    B, T, H, DK = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    G = H // HKV
    state_dtype = _state_dtype(q.dtype)
    if states is None:  # not kept by the forward: one walk over k and v alone
        _, _, states = _forward_pass(q, k, v, slopes, s0, cu_seqlens, scale=opts.scale, reverse=opts.reverse,
                                     store_states=True, out_dtype=q.dtype, blocks=blocks, states_only=True,
                                     state_dtype=state_dtype)
    gstates, ds0 = (g_walk or _g_walk)(opts, blocks, q, do, slopes, dfinal, cu_seqlens, state_dtype)
    dq_part, dk_part, dv_h, dslope_part = (chunks or _chunks)(opts, blocks, q, k, v, do, slopes, states,
                                                              gstates, cu_seqlens)
    split = dq_part.shape[0] > 1
    dq = (dq_part.sum(0) if split else dq_part[0]).reshape(B, T, H, DK).astype(q.dtype)
    dk = (dk_part.sum(0) if split else dk_part[0]).reshape(B, T, HKV, G, DK)
    dk = (dk.sum(3) if G > 1 else dk[:, :, :, 0]).astype(k.dtype)
    dv = dv_h.reshape(B, T, HKV, G, DV)
    dv = (dv.sum(3) if G > 1 else dv[:, :, :, 0]).astype(v.dtype)
    dslopes = dslope_part.reshape(-1, H).sum(0).astype(slopes.dtype)
    ds0 = None if s0 is None else ds0.astype(s0.dtype)
    return dq, dk, dv, dslopes, ds0, None


def _chunk_launch_args(opts, blocks, q, k, v, do, slopes, states, gstates, cu_seqlens):
    """(grid, inputs, output shapes, launch options) of bwd_chunk_kernel over every (chunk slot, head)."""
    B, T, H, DK = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    G = H // HKV
    N, nc_total, cu, coff = _layout(cu_seqlens, B, T)
    if cu_seqlens is None:
        slot_seq = slot_chunk = jnp.zeros((1,), jnp.int32)
    else:
        slot = jnp.arange(nc_total, dtype=jnp.int32)
        slot_seq = jnp.clip(jnp.searchsorted(coff, slot, side="right") - 1, 0, N - 1).astype(jnp.int32)
        slot_chunk = (slot - coff[slot_seq]).astype(jnp.int32)
    BV = min(blocks.par_bv, _pow2(DV))
    NV = -(-DV // BV)
    split = NV > 1
    inputs = (q, k, v, do, slopes, states, gstates, cu, coff, slot_seq, slot_chunk)
    # Partial sums (over Dv blocks or the GQA group) stay float32; otherwise write the final dtype.
    out_shapes = (jax.ShapeDtypeStruct((NV, B * T, H, DK), jnp.float32 if split else q.dtype),
                  jax.ShapeDtypeStruct((NV, B * T, H, DK), jnp.float32 if split or G > 1 else k.dtype),
                  jax.ShapeDtypeStruct((B * T, H, DV), jnp.float32 if G > 1 else v.dtype),
                  jax.ShapeDtypeStruct((NV * nc_total * H,), jnp.float32))
    meta = dict(
        num_warps=blocks.par_warps, num_stages=1, T=T, H=H, HKV=HKV, DK=DK, DV=DV, BK=_pow2(DK), BV=BV,
        C=CHUNK, SCALE=float(opts.scale), NC_TOTAL=nc_total, NV=NV, NTOK=B * T, REVERSE=bool(opts.reverse),
        VARLEN=cu_seqlens is not None, IEEE=q.dtype == jnp.float32, LATE_G=blocks.par_late_g,
    )
    return flat_grid(NV, nc_total, H), inputs, out_shapes, meta


def _chunks(opts, blocks, q, k, v, do, slopes, states, gstates, cu_seqlens):
    """The chunk-parallel backward kernel: (dq, dk partial sums [NV, B*T, H, Dk], dv per query head
    [B*T, H, Dv], d(slopes) shares [NV * NC_TOTAL * H]) from S_in (states) and G (gstates) of every chunk."""
    grid, inputs, out_shapes, meta = _chunk_launch_args(opts, blocks, q, k, v, do, slopes, states, gstates,
                                                        cu_seqlens)
    return _launch(_kernels()[3], grid, inputs, out_shapes, name="lightning_bwd_chunks", **meta)


def chunks_where_flagged(flags, outputs, opts, q, k, v, do, slopes, states, gstates):
    """outputs (as _chunks returns them, with one Dv block: mosaic_gpu.py's chunk kernel) with the
    (chunk slot, head) items whose flags [NC_TOTAL, H] are not 0 recomputed by bwd_chunk_kernel (the
    non-finite rule included), in place; the other items keep theirs. No cu_seqlens. On finite inputs
    (nothing flagged) this launch costs its start only."""
    blocks = BlockSizes.get_default(q.shape[3], v.shape[3], q.dtype)
    grid, inputs, out_shapes, meta = _chunk_launch_args(opts, blocks, q, k, v, do, slopes, states, gstates,
                                                        None)
    mismatch = any(o.shape != s.shape or o.dtype != s.dtype for o, s in zip(outputs, out_shapes, strict=True))
    if meta["NV"] != 1 or mismatch:
        raise ValueError(f"outputs {[(o.shape, o.dtype) for o in outputs]} are not bwd_chunk_kernel's "
                         f"{[(s.shape, s.dtype) for s in out_shapes]} with one Dv block")
    n = len(inputs) + 1
    return _launch(_kernels()[5], grid, inputs + (flags.reshape(-1),) + tuple(outputs), out_shapes,
                   input_output_aliases={n + i: i for i in range(4)},
                   name="lightning_bwd_chunks_where_flagged", **meta)


def _g_walk(opts, blocks, q, do, slopes, dfinal, cu_seqlens, state_dtype):
    """G = dL/dS_out of every chunk [H, NC_TOTAL, DK, DV] and d(initial_state) [N, H, DK, DV] (float32).

    The G chain walked backwards, one program per (sequence, head, Dk block, Dv block). Few such items:
    the chain is cut into P segments like the forward's state chain (varlen keeps P = 1). G flows from
    the last chunk to the first, so the last segment (in processing order) is walked first and is the
    only one that may be short: a first pass starts it from dL/dS_final and the others from zero and
    writes only the G leaving each segment, G_loc(s). The G entering segment s at its end is G_out(s + 1),
    the G leaving segment s + 1, and
        G_out(P - 1) = G_loc(P - 1),   G_out(s) = lam^TSEG G_out(s + 1) + G_loc(s)   (s < P - 1: full)
    over the P segments in plain JAX; the second pass walks every segment from the G entering it and
    stores G of every chunk. G_out(0) = d(initial_state). (One pass from zero with the fix-up
    G += lam^(segment end - chunk end) G_entering done in bwd_chunk_kernel instead was correct but made
    that kernel ~0.5 ms slower on b1-t32k, H100; likely register pressure from one more float32 tile.)
    H100, b1-t32k, this walk alone: 0.54 ms unsplit (32 programs of 128 x 64), 0.46 with 9 segments,
    0.39 in 64 x 64 blocks with 5 segments (the default's 3 were timed only inside fwd+bwd).
    """
    B, T, H, DK = q.shape
    DV = do.shape[3]
    N, nc_total, cu, coff = _layout(cu_seqlens, B, T)
    BK, NK, BV, NV, P, TSEG = _g_walk_blocks(N, H, T, DK, DV, blocks, split=cu_seqlens is None)
    walk = functools.partial(
        _launch, _kernels()[2], flat_grid(NV, NK, N * H * P), name="lightning_dstate",
        num_stages=blocks.num_stages, num_warps=blocks.walk_warps(P),
        T=T, H=H, DK=DK, DV=DV, BK=BK, BV=BV, C=CHUNK, SCALE=float(opts.scale), NC_TOTAL=nc_total,
        REVERSE=bool(opts.reverse), VARLEN=cu_seqlens is not None, IEEE=q.dtype == jnp.float32, P=P,
        TSEG=TSEG, HAS_G0=True,
    )
    gstate_shape = jax.ShapeDtypeStruct((H, nc_total, DK, DV), state_dtype)
    gout_shape = jax.ShapeDtypeStruct((N, H, P, DK, DV), jnp.float32)
    entering = segment_entering_gradients(q, do, slopes, dfinal, opts, blocks, BK, BV, P, TSEG)
    gstates, g_out = walk((q, do, slopes, entering, cu, coff), (gstate_shape, gout_shape), SEG_G0=P > 1,
                          STORE_STATES=True)
    return gstates, g_out[:, :, 0]


def segment_entering_gradients(q, do, slopes, dfinal, opts, blocks, BK, BV, P, TSEG):
    """The G entering each of P segments at its end, [B, H, P, Dk, Dv] float32 (dfinal itself when
    P == 1): the G walk's first pass (every segment from zero, _segment_gradients) and the scan over the
    segments in JAX (_g_walk's docstring). Also mosaic_gpu.py's G walk's."""
    if P == 1:
        return dfinal
    T = q.shape[1]
    # Every segment from zero (the launch state_gradient makes for these q, dO: XLA computes it once in a
    # sequence shard's backward); the last one's G_out adds lam^(its length) dL/dS_final.
    g_loc = _segment_gradients(q, do, slopes, float(opts.scale), bool(opts.reverse), blocks, BK, BV, P, TSEG)
    lam_seg = jnp.exp(-slopes * float(TSEG))[None, :, None, None]
    lam_last = jnp.exp(-slopes * float(T - (P - 1) * TSEG))[None, :, None, None]
    # G entering segments P - 1, P - 2, ..., 0 at their ends
    entering = [dfinal, lam_last * dfinal + g_loc[:, :, P - 1]]
    for seg in range(P - 2, 0, -1):
        entering.append(lam_seg * entering[-1] + g_loc[:, :, seg])
    return jnp.stack(entering[::-1], axis=2)


def _g_walk_blocks(N, H, T, DK, DV, blocks, split):
    """(BK, NK, BV, NV, P, TSEG) of the G walk over N sequences of T tokens and H heads."""
    BV = min(blocks.walk_bv or blocks.fwd_bv, _pow2(DV))
    NV = -(-DV // BV)
    # Few (sequence, head, Dv block) items: Dk is cut into blocks too (a block of G needs only its own
    # columns of q), which shortens each step and multiplies the programs before segments do.
    few = N * H * NV < blocks.seg_below
    BK = min(blocks.walk_bk, _pow2(DK)) if few else _pow2(DK)
    NK = -(-DK // BK)
    P, TSEG = _segments(N * H * NK * NV, T, blocks, split=split)
    return BK, NK, BV, NV, P, TSEG


def _segment_gradients(q, do, slopes, scale, reverse, blocks, BK, BV, P, TSEG):
    """G leaving each of the P segments, walked from zero: [B, H, P, Dk, Dv] float32 (dstate_kernel,
    q and dO read once). The G walk's first pass and state_gradient both launch it through here."""
    B, T, H, DK = q.shape
    DV = do.shape[3]
    N, nc_total, cu, coff = _layout(None, B, T)
    NK, NV = -(-DK // BK), -(-DV // BV)
    dummy = jnp.zeros((1,), jnp.float32)  # g0 (never read without SEG_G0 / HAS_G0)
    _, g_seg = _launch(
        _kernels()[2], flat_grid(NV, NK, N * H * P), (q, do, slopes, dummy, cu, coff),
        (jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((N, H, P, DK, DV), jnp.float32)),
        name="lightning_segment_gradients",
        num_warps=blocks.walk_warps(P),
        num_stages=blocks.num_stages,
        T=T, H=H, DK=DK, DV=DV, BK=BK, BV=BV, C=CHUNK, SCALE=scale, NC_TOTAL=nc_total, REVERSE=reverse,
        VARLEN=False, IEEE=q.dtype == jnp.float32, P=P, TSEG=TSEG, SEG_G0=False, HAS_G0=False,
        STORE_STATES=False,
    )  # fmt: skip
    return g_seg


def _bwd_sequential(opts, blocks, q, k, v, slopes, s0, cu_seqlens, do, dfinal):
    """Backward with one program per (sequence, head, Dv block) walking its chunks: the dq pass (the
    forward kernel on dO, v, k), then the dkdv kernel backwards. Less memory, little parallelism."""
    B, T, H, DK = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    G = H // HKV

    # dq pass: the forward kernel with (q, k, v) := (dO, v, k) and state S^T; it also leaves S_in^T of
    # every chunk behind for the slope gradient.
    s0_t = None if s0 is None else jnp.swapaxes(s0.astype(jnp.float32), 2, 3)
    dq, _, states_t = _forward_pass(do, v, k, slopes, s0_t, cu_seqlens, scale=opts.scale,
                                    reverse=opts.reverse, store_states=True, out_dtype=q.dtype, blocks=blocks,
                                    bv=blocks.bwd_bv)

    N, nc_total, cu, coff = _layout(cu_seqlens, B, T)
    BK = _pow2(DK)
    BV = min(blocks.bwd_bv, _pow2(DV))
    NV = -(-DV // BV)
    dk_part, dv_h, ds0, dslope_part = _launch(
        _kernels()[1], flat_grid(NV, N * H),
        (q, k, v, do, slopes, dfinal, states_t, cu, coff),
        # Partial sums (over Dv blocks or the GQA group) stay float32; otherwise write the final dtype.
        (jax.ShapeDtypeStruct((NV, B * T, H, DK), jnp.float32 if NV > 1 or G > 1 else k.dtype),
         jax.ShapeDtypeStruct((B * T, H, DV), jnp.float32 if G > 1 else v.dtype),
         jax.ShapeDtypeStruct((N, H, DK, DV), jnp.float32),
         jax.ShapeDtypeStruct((N * H * NV,), jnp.float32)),
        name="lightning_dkdv", num_warps=blocks.bwd_warps, num_stages=blocks.num_stages,
        T=T, H=H, HKV=HKV, DK=DK, DV=DV, BK=BK, BV=BV, C=CHUNK, SCALE=float(opts.scale),
        NC_TOTAL=nc_total, NV=NV, NTOK=B * T, REVERSE=bool(opts.reverse), VARLEN=cu_seqlens is not None,
        IEEE=q.dtype == jnp.float32,
    )
    # dk, dv of query head h belong to kv head h // G: sum each group (the state is per query head).
    dk = (dk_part.sum(0) if NV > 1 else dk_part[0]).reshape(B, T, HKV, G, DK)
    dk = (dk.sum(3) if G > 1 else dk[:, :, :, 0]).astype(k.dtype)
    dv = dv_h.reshape(B, T, HKV, G, DV)
    dv = (dv.sum(3) if G > 1 else dv[:, :, :, 0]).astype(v.dtype)
    dslopes = dslope_part.reshape(N, H, NV).sum((0, 2)).astype(slopes.dtype)
    ds0 = None if s0 is None else ds0.astype(s0.dtype)
    return dq, dk, dv, dslopes, ds0, None


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def lightning_attention(q, k, v, slopes, initial_state=None, cu_seqlens=None, *, scale, reverse=False):
    """Triton lightning attention; signature and meaning as in reference.py.

    q: [B, T, H, Dk]  k: [B, T, Hkv, Dk]  v: [B, T, Hkv, Dv]  slopes: [H] float32
    initial_state: [N, H, Dk, Dv] or None; cu_seqlens: [N + 1] int32 or None (B == 1).
    Returns (o [B, T, H, Dv] in q.dtype, final_state [N, H, Dk, Dv] float32).
    Raises NotImplementedError off-GPU, without jax-triton, for other dtypes or head dims > 256.
    """
    _check_supported(q, k, v)
    opts = Options(scale=float(scale), reverse=bool(reverse))
    # Replicated slopes / initial states vary like q inside shard_map; autodiff of this cast psums their
    # per-shard gradients (see varying.py).
    slopes = match_varying(slopes.astype(jnp.float32), q)
    if initial_state is not None:
        initial_state = match_varying(initial_state.astype(jnp.float32), q)
    return _lightning(q, k, v, slopes, initial_state, cu_seqlens, opts)


# ------------------------------------------------------------------ sequence parallelism (reference.py)
# Values only (they run inside shardattn.sharded's custom_vjp rules). A sequence is cut into P segments
# that are all walked from zero, in parallel; the P local results are then weighted and summed in JAX
# (a few MB of float32 states, no scan). Outputs vary like the inputs inside shard_map (_launch).


def _segment_weights(slopes, exponents):
    """lam_h^e for every segment's exponent e: [1, H, P, 1, 1] float32 (e static, exact in float32)."""
    e = jnp.asarray(exponents, jnp.float32)
    return jnp.exp(-slopes[:, None] * e[None, :])[None, :, :, None, None]


def local_state(k, v, slopes, *, reverse=False, differentiated=False):
    """sum_j lam^(T-1-p_j) k_j^T v_j per query head from zero: [B, H, Dk, Dv] float32 (reference.py).

    k: [B, T, Hkv, Dk]  v: [B, T, Hkv, Dv]  slopes: [H]. The forward kernel's states-only walk (k, v
    read once), each segment from zero; S = sum_s lam^(tokens after segment s) S_seg(s). differentiated
    (reference.py) changes nothing here: both forwards cut the plain walk's segments.
    """
    _check_supported(k, k, v)
    blocks = BlockSizes.get_default(k.shape[3], v.shape[3], k.dtype)
    return _local_state(k, v, jnp.asarray(slopes, jnp.float32), bool(reverse), blocks)


def _local_state(k, v, slopes, reverse, blocks):
    B, T, HKV, DK = k.shape
    H, DV = slopes.shape[0], v.shape[3]
    BV = min(blocks.fwd_bv, _pow2(DV))
    NV = -(-DV // BV)
    # Where the forward kernel over these k, v would cut its sequences into segments too, cut them the
    # same way: its first pass is then the very launch below (same operands and parameters), which XLA
    # computes once (CSE), so a sequence shard (local_state, scan, kernel from S_in) reads k, v for its
    # states once, not twice.
    P, TSEG = _segments(B * H * NV, T, blocks)
    if P == 1:
        P, TSEG = _segments(B * H * NV, T, blocks, programs=blocks.state_programs)
    s_seg = _segment_states(k, v, slopes, reverse, blocks, P, TSEG, BV)
    if P == 1:
        return s_seg[:, :, 0]
    after = [T - min((s + 1) * TSEG, T) for s in range(P)]  # tokens processed after segment s (last: 0)
    return jnp.sum(_segment_weights(slopes, after) * s_seg, axis=2)


def segment_incoming(k, v, slopes, s0, reverse, blocks, P, TSEG, BV):
    """The state entering each of the P segments of TSEG tokens: [B, H, P, Dk, Dv] float32 (s0 or zeros
    enters the first). The segment scan: local final states of every segment from zero (k, v only,
    _segment_states), then S_in(s) = lam^TSEG S_in(s-1) + S_loc(s-1) over the few segments, in plain
    JAX (every segment but the last is full). Also the first pass of mosaic_gpu.py's segmented walk."""
    B, _, _, DK = k.shape
    H, DV = slopes.shape[0], v.shape[3]
    s_loc = _segment_states(k, v, slopes, reverse, blocks, P, TSEG, BV)
    lam_seg = jnp.exp(-slopes * float(TSEG))[None, :, None, None]
    incoming = [jnp.zeros((B, H, DK, DV), jnp.float32) if s0 is None else s0]
    for seg in range(1, P):
        incoming.append(lam_seg * incoming[-1] + s_loc[:, :, seg - 1])
    return jnp.stack(incoming, axis=2)


def _segment_states(k, v, slopes, reverse, blocks, P, TSEG, BV):
    """Local final state of each of the P segments of TSEG tokens, from zero: [B, H, P, Dk, Dv] float32.

    The forward kernel's states-only walk (k, v read once). The forward's segment pass and local_state
    both launch it through here, so that equal calls are equal HLO (see _local_state).
    """
    B, T, HKV, DK = k.shape
    H, DV = slopes.shape[0], v.shape[3]
    N, nc_total, cu, coff = _layout(None, B, T)
    NV = -(-DV // BV)
    dummy = jnp.zeros((1,), jnp.float32)  # q (never read with STATES_ONLY), s0
    _, s_seg, _ = _launch(
        _kernels()[0], flat_grid(NV, N * H * P), (dummy, k, v, slopes, dummy, cu, coff),
        (jax.ShapeDtypeStruct((1,), k.dtype), jax.ShapeDtypeStruct((N, H, P, DK, DV), jnp.float32),
         jax.ShapeDtypeStruct((1,), jnp.float32)),
        name="lightning_segment_states",
        num_warps=blocks.walk_warps(P),
        num_stages=blocks.num_stages,
        T=T, H=H, HKV=HKV, DK=DK, DV=DV, BK=_pow2(DK), BV=BV, C=CHUNK, SCALE=1.0, NC_TOTAL=nc_total,
        REVERSE=bool(reverse), VARLEN=False, IEEE=k.dtype == jnp.float32, P=P, TSEG=TSEG, HAS_S0=False,
        STORE_STATES=False, STATES_ONLY=True,
    )  # fmt: skip
    return s_seg


def state_gradient(q, do, slopes, *, scale, reverse=False):
    """scale * sum_i lam^(p_i+1) q_i^T dO_i per head: [B, H, Dk, Dv] float32 (reference.py).

    q: [B, T, H, Dk]  do: [B, T, H, Dv] (cast to q's dtype, as the backward does). The G walk's first
    pass (dstate_kernel: q, dO read once, no per-chunk G), every segment from zero;
    G = sum_s lam^(tokens before segment s) G_seg(s).
    """
    do = do.astype(q.dtype)
    _check_supported(q, q, do)
    blocks = BlockSizes.get_default(q.shape[3], do.shape[3], q.dtype)
    return _state_gradient(q, do, jnp.asarray(slopes, jnp.float32), float(scale), bool(reverse), blocks)


def _state_gradient(q, do, slopes, scale, reverse, blocks):
    B, T, H, DK = q.shape
    DV = do.shape[3]
    # Where the backward's G walk over these q, dO would cut its sequences into segments, use its blocks
    # and segments: its first pass is then this very launch (see _g_walk). Otherwise [Dk, BV] blocks of
    # G, the forward walk's tiles (a Dk split as in _g_walk was slower here: b1-t32k and b1-t128k, H100,
    # 256 programs), and segments supply the parallelism.
    BK, NK, BV, NV, P, TSEG = _g_walk_blocks(B, H, T, DK, DV, blocks, split=True)
    if P == 1:
        BK = min(blocks.state_bk, _pow2(DK)) if blocks.state_bk else _pow2(DK)
        NK = -(-DK // BK)
        P, TSEG = _segments(B * H * NK * NV, T, blocks, programs=blocks.state_programs)
    g_seg = _segment_gradients(q, do, slopes, scale, reverse, blocks, BK, BV, P, TSEG)
    if P == 1:
        return g_seg[:, :, 0]
    before = [s * TSEG for s in range(P)]  # tokens processed before segment s
    return jnp.sum(_segment_weights(slopes, before) * g_seg, axis=2)


# ------------------------------------------------------------------------------ serving (reference.py)


def decode(q, k, v, cache, slot_idx, slopes, *, scale):
    """One decode step against a slot-indexed state cache (reference.py: decode); the kernel, which
    updates the cache in place through input_output_aliases, is in triton_decode.py.

    q: [B, H, Dk]  k: [B, Hkv, Dk]  v: [B, Hkv, Dv]  cache: [num_slots, H, Dk, Dv] float32
    slot_idx: [B] int32. Returns (o [B, H, Dv] in q.dtype, cache).
    """
    as_tokens = lambda x: jax.ShapeDtypeStruct((x.shape[0], 1, *x.shape[1:]), x.dtype)  # [B, 1, h, D]
    _check_supported(as_tokens(q), as_tokens(k), as_tokens(v))
    from shardattn.kernels.lightning import triton_decode  # imported on first use: it imports triton

    return triton_decode.decode(q, k, v, cache, slot_idx, slopes, scale=scale)

"""Triton kernel bodies of softmax flash attention (FlashAttention-2 structure). Imports only triton.

The JAX side (launch, grid, block ranges, custom_vjp) is kernels/attention/triton.py; it imports this
module on first use. Kept apart so that the bodies can also run in Triton's interpreter on CPU
(TRITON_INTERPRET=1, torch tensors): tests/test_attention_triton_interpret.py.

Layouts (contiguous): q [B, T, H, DK], k [B, S, HKV, DK], v [B, S, HKV, DV], o [B, T, H, DV],
lse, delta [B, H, T] float32, positions / segment ids [B, T] and [B, S] int32, bias [Bb, Hb, T, S]
(strides BIAS_SB, BIAS_SH: 0 on a broadcast dim), sinks [H, NSINK] float32. Query head h reads kv head
h // (H // HKV): k and v are never repeated. Head dims are padded to BD, BDV (powers of two) by masks.

Logits are kept in base 2 (s2 = log2(e) * s), so that every exponential is one exp2:
    s = scale * q.k; s = c * tanh(s / c) (soft cap); s += bias; s2 = s * log2(e); masked s2 = MASK_VALUE.
The forward's online softmax per query block, over key blocks (Dao 2023, FlashAttention-2):
    m' = max(m, rowmax(s2)); p = exp2(s2 - m'); den' = 2^(m - m') den + rowsum(p);
    acc' = 2^(m - m') acc + Z p v
then sinks join den, o = acc / den, lse = ln 2 * (m + log2 den) (natural log, as the contract says).

Key-block ranges come from the JAX side per (batch, query block) as four ints (lo, flo, fhi, hi): blocks
[lo, hi) may hold allowed pairs; [flo, fhi) is a run of blocks where every pair is allowed and nothing is
padding, looped without any mask work; [lo, flo) and [fhi, hi) are masked. The backward's dk/dv kernel gets
the transposed ranges (query blocks per key block).

Masking never multiplies by zero: masked logits and probabilities are selected with tl.where, and keys
that no row of a block may see are zeroed before a product (v in the forward, k in dq), so NaN stored
there (padding, an unused cache slot) reaches no output.

Dropout reproduces kernels/attention/dropout.py bit for bit (the same uint32 xor-shift-multiply steps):
keep(b, h, i, j) = mix(row(b, h, i) ^ key(j)) >= threshold, with global batch, head and token indices.
"""

import triton
import triton.language as tl

# Module constants that kernels read must be tl.constexpr.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Masked base-2 logits: finite (no inf - inf in max / exp2), options.MASK_VALUE's value.
MASK_VALUE = tl.constexpr(-0.7 * 3.4028234663852886e38)


# ---------------------------------------------------------------------------------------------- helpers


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # float32 inputs need true float32 products (the float32 tolerance is 2e-5; TF32 gives ~1e-3).
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_tile(base, offs, ok, STRIDE: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    # Rows `offs` (valid where ok) of a token-major tensor with row stride STRIDE: columns [0, D) padded to
    # BD with zeros.
    rd = tl.arange(0, BD)
    return tl.load(base + offs[:, None] * STRIDE + rd[None, :], mask=ok[:, None] & (rd[None, :] < D),
                   other=0.0)  # fmt: skip


@triton.jit
def _store_tile(base, offs, ok, x, STRIDE: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    # _load_tile's rows and columns, written with x (cast to the buffer's dtype).
    rd = tl.arange(0, BD)
    tl.store(base + offs[:, None] * STRIDE + rd[None, :], x.to(base.dtype.element_ty),
             mask=ok[:, None] & (rd[None, :] < D))  # fmt: skip


@triton.jit
def _positions(pos_base, seg_base, offs, ok, HAS_SEG: tl.constexpr):
    # (positions, segment ids) of tokens `offs`; the positions stand in for the ids without segments.
    pos = tl.load(pos_base + offs, mask=ok, other=0)
    seg = pos
    if HAS_SEG:
        seg = tl.load(seg_base + offs, mask=ok, other=0)
    return pos, seg


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    if FAST:
        # One MUFU instruction (relative error ~2^-11, below bf16's 2^-8): the exact form below costs an
        # exp2 and a division per logit on the unit whose throughput already bounds the forward.
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)  # fmt: skip
    # tanh from exp2 of a non-positive argument (no overflow): tanh|x| = (1 - e) / (1 + e), e = e^(-2|x|).
    e = tl.exp2(-2.0 * LOG2E * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _mix(x):
    # dropout.mix (lowbias32) on uint32: logical shifts, multiplications modulo 2^32.
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _row_hash(drop_ptr, b, h, offs_q):
    # dropout.keep_mask's row part for local batch b, local head h, local query indices offs_q: [BQ]
    # uint32; the global indices add the offsets drop[3] (query), drop[5] (batch), drop[6] (head).
    s0 = tl.load(drop_ptr).to(tl.uint32)  # (the cast keeps uint32 maths whatever the pointer's type)
    q_off = tl.load(drop_ptr + 3).to(tl.uint32)
    b_off = tl.load(drop_ptr + 5).to(tl.uint32)
    h_off = tl.load(drop_ptr + 6).to(tl.uint32)
    row = _mix(s0 ^ (b.to(tl.uint32) + b_off))
    row = _mix(row ^ ((h.to(tl.uint32) + h_off) + 0x9E3779B9))
    return _mix(row ^ (offs_q.to(tl.uint32) + q_off))


@triton.jit
def _key_hash(drop_ptr, offs_k):
    # dropout.keep_mask's key part for local key indices offs_k: [BK] uint32.
    s1 = tl.load(drop_ptr + 1).to(tl.uint32)
    kv_off = tl.load(drop_ptr + 4).to(tl.uint32)
    return _mix(s1 ^ ((offs_k.to(tl.uint32) + kv_off) + 0x85EBCA6B))


@triton.jit
def _keep(row, key, drop_ptr):
    # row, key broadcast against each other ([BQ, 1] and [1, BK], or transposed): keep mask.
    return _mix(row ^ key) >= tl.load(drop_ptr + 2).to(tl.uint32)


@triton.jit
def _allowed(
    qp,
    kp,
    qs,
    ks,
    ok,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    LEFT: tl.constexpr,
    RIGHT: tl.constexpr,
    HAS_SEG: tl.constexpr,
):
    # options.allowed on broadcast blocks (qp [BQ, 1] with kp [1, BK], or transposed); ok: not padding.
    # The position difference is taken in int32: positions must span less than 2^31.
    d = qp - kp
    mask = ok
    if CAUSAL:
        mask = mask & (d >= 0)
    if WINDOW:
        mask = mask & (d <= LEFT) & (d >= -RIGHT)
    if HAS_SEG:
        mask = mask & (qs == ks)
    return mask


@triton.jit
def _logits(
    qk, bias, SCALE: tl.constexpr, SOFT_CAP: tl.constexpr, HAS_BIAS: tl.constexpr, FAST_TANH: tl.constexpr
):
    # (s2, t): base-2 logits before masking and tanh(s / c) (for the soft cap's derivative; qk if no cap).
    if SOFT_CAP > 0:
        t = _tanh(qk * (SCALE / SOFT_CAP), FAST_TANH)
        s = SOFT_CAP * t
    else:
        t = qk
        s = qk * SCALE
    if HAS_BIAS:
        return (s + bias) * LOG2E, t
    if SOFT_CAP > 0:
        return s * LOG2E, t
    return qk * (SCALE * LOG2E), t  # one multiply per logit on the plain path


# ---------------------------------------------------------------------------------------------- forward


@triton.jit
def _key_block(
    q, q_ok, offs_q, j, k_base, v_base, bias_base,
    S: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
    BDV: tl.constexpr, BK: tl.constexpr, SCALE: tl.constexpr, SOFT_CAP: tl.constexpr, FAST_TANH: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    # Key block j of one query block (the forward's and dq's loops): its keys, k, v, and the base-2
    # logits with the soft cap's tanh (see _logits).
    offs_k = j * BK + tl.arange(0, BK)
    k_ok = offs_k < S
    k = _load_tile(k_base, offs_k, k_ok, HKV * DK, DK, BD)
    v = _load_tile(v_base, offs_k, k_ok, HKV * DV, DV, BDV)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(
            bias_base + offs_q[:, None] * S + offs_k[None, :],
            mask=q_ok[:, None] & k_ok[None, :],
            other=0.0,
        ).to(tl.float32)
    s2, t = _logits(_dot(q, tl.trans(k), IEEE), bias, SCALE, SOFT_CAP, HAS_BIAS, FAST_TANH)
    return offs_k, k_ok, k, v, s2, t


@triton.jit
def _fwd_blocks(
    acc, m, den, q, qp, qs, q_ok, rowh, offs_q, lo, hi,
    k_base, v_base, kvpos_base, kvseg_base, bias_base, drop_ptr,
    S: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
    BDV: tl.constexpr, BK: tl.constexpr, SCALE: tl.constexpr, SOFT_CAP: tl.constexpr, FAST_TANH: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, DROP_SCALE: tl.constexpr,
    IEEE: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    # Key blocks [lo, hi) of one query block; MASKED=False only for blocks where every pair is allowed.
    for j in range(lo, hi):
        offs_k, k_ok, k, v, s2, _ = _key_block(
            q, q_ok, offs_q, j, k_base, v_base, bias_base,
            S, HKV, DK, DV, BD, BDV, BK, SCALE, SOFT_CAP, FAST_TANH, HAS_BIAS, IEEE,
        )  # fmt: skip
        if MASKED:
            kp, ks = _positions(kvpos_base, kvseg_base, offs_k, k_ok, HAS_SEG)
            pair_ok = q_ok[:, None] & k_ok[None, :]
            allowed = _allowed(qp[:, None], kp[None, :], qs[:, None], ks[None, :], pair_ok,
                               CAUSAL, WINDOW, LEFT, RIGHT, HAS_SEG)  # fmt: skip
            s2 = tl.where(allowed, s2, MASK_VALUE)
            seen = tl.max(allowed.to(tl.int32), axis=0) > 0  # [BK]: some row of the block sees key j
            v = tl.where(seen[:, None], v, 0.0)
        m_new = tl.maximum(m, tl.max(s2, axis=1))
        p = tl.exp2(s2 - m_new[:, None])
        if MASKED:
            p = tl.where(allowed, p, 0.0)
        alpha = tl.exp2(m - m_new)
        den = den * alpha + tl.sum(p, axis=1)
        if DROPOUT:  # the denominator (and lse) are un-dropped; the values are dropped and rescaled
            keep = _keep(rowh[:, None], _key_hash(drop_ptr, offs_k)[None, :], drop_ptr)
            p = tl.where(keep, p * DROP_SCALE, 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new
    return acc, m, den


@triton.jit
def fwd_kernel(
    q_ptr, k_ptr, v_ptr, qpos_ptr, kvpos_ptr, qseg_ptr, kvseg_ptr, bias_ptr, sinks_ptr, drop_ptr,
    ranges_ptr,  # inputs
    o_ptr, lse_ptr,  # outputs
    T: tl.constexpr, S: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    NQ: tl.constexpr, SCALE: tl.constexpr, SOFT_CAP: tl.constexpr, FAST_TANH: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, HAS_SEG: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_SB: tl.constexpr, BIAS_SH: tl.constexpr, NSINK: tl.constexpr,
    BSINK: tl.constexpr, DROPOUT: tl.constexpr, DROP_SCALE: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    # NQ * B * H programs: one per (query block, batch, query head).
    # ranges: [B, NQ, 4] int32 (lo, flo, fhi, hi) key blocks; drop: [7] uint32 (s0, s1, threshold,
    # q_offset, kv_offset, batch_offset, head_offset) with DROPOUT.
    # Query blocks in reverse launch order: under causal masks the last ones walk the most key blocks, and
    # starting them first shortens the tail of the grid.
    i = NQ - 1 - tl.program_id(0) % NQ  # one grid axis, query blocks fastest (kernels/triton_grid.py)
    bh = tl.program_id(0) // NQ
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    b64 = b.to(tl.int64)
    offs_q = i * BQ + tl.arange(0, BQ)
    q_ok = offs_q < T

    q = _load_tile(q_ptr + (b64 * T * H + h) * DK, offs_q, q_ok, H * DK, DK, BD)
    qp, qs = _positions(qpos_ptr + b64 * T, qseg_ptr + b64 * T, offs_q, q_ok, HAS_SEG)
    rowh = offs_q.to(tl.uint32)
    if DROPOUT:
        rowh = _row_hash(drop_ptr, b, h, offs_q)
    k_base = k_ptr + (b64 * S * HKV + hk) * DK
    v_base = v_ptr + (b64 * S * HKV + hk) * DV
    kvpos_base = kvpos_ptr + b64 * S
    kvseg_base = kvseg_ptr + b64 * S  # a dummy [1] without segments: never read
    bias_base = bias_ptr + b64 * BIAS_SB + h.to(tl.int64) * BIAS_SH

    r = ranges_ptr + (b * NQ + i) * 4
    lo = tl.load(r)
    flo = tl.load(r + 1)
    fhi = tl.load(r + 2)
    hi = tl.load(r + 3)
    m = tl.full([BQ], MASK_VALUE, tl.float32)
    den = tl.zeros([BQ], tl.float32)
    acc = tl.zeros([BQ, BDV], tl.float32)
    acc, m, den = _fwd_blocks(
        acc, m, den, q, qp, qs, q_ok, rowh, offs_q, lo, flo, k_base, v_base, kvpos_base, kvseg_base,
        bias_base, drop_ptr, S, HKV, DK, DV, BD, BDV, BK, SCALE, SOFT_CAP, FAST_TANH, CAUSAL, WINDOW, LEFT,
        RIGHT,
        HAS_SEG, HAS_BIAS, DROPOUT, DROP_SCALE, IEEE, True,
    )  # fmt: skip
    acc, m, den = _fwd_blocks(
        acc, m, den, q, qp, qs, q_ok, rowh, offs_q, flo, fhi, k_base, v_base, kvpos_base, kvseg_base,
        bias_base, drop_ptr, S, HKV, DK, DV, BD, BDV, BK, SCALE, SOFT_CAP, FAST_TANH, CAUSAL, WINDOW, LEFT,
        RIGHT,
        HAS_SEG, HAS_BIAS, DROPOUT, DROP_SCALE, IEEE, False,
    )  # fmt: skip
    acc, m, den = _fwd_blocks(
        acc, m, den, q, qp, qs, q_ok, rowh, offs_q, fhi, hi, k_base, v_base, kvpos_base, kvseg_base,
        bias_base, drop_ptr, S, HKV, DK, DV, BD, BDV, BK, SCALE, SOFT_CAP, FAST_TANH, CAUSAL, WINDOW, LEFT,
        RIGHT,
        HAS_SEG, HAS_BIAS, DROPOUT, DROP_SCALE, IEEE, True,
    )  # fmt: skip

    if NSINK > 0:  # sinks join the denominator with no value
        rs = tl.arange(0, BSINK)
        sk = tl.load(sinks_ptr + h * NSINK + rs, mask=rs < NSINK, other=float("-inf")) * LOG2E
        m_new = tl.maximum(m, tl.max(sk, axis=0))
        alpha = tl.exp2(m - m_new)
        den = den * alpha + tl.sum(tl.exp2(sk[None, :] - m_new[:, None]), axis=1)
        acc = acc * alpha[:, None]
        m = m_new
    nonempty = den > 0
    den_safe = tl.where(nonempty, den, 1.0)
    o = acc / den_safe[:, None]
    lse = tl.where(nonempty, (m + tl.log2(den_safe)) * LN2, float("-inf"))
    _store_tile(o_ptr + (b64 * T * H + h) * DV, offs_q, q_ok, o, H * DV, DV, BDV)
    tl.store(lse_ptr + (b64 * H + h) * T + offs_q, lse, mask=q_ok)


# --------------------------------------------------------------------------------------------- backward
# Residuals: o and lse as GIVEN (a ring passes merged ones); delta = rowsum(do * o) - dlse is computed in
# JAX. Per pair: p = exp2(s2 - lse2), dp = Z (do . v), ds = p (dp - delta) (d of the capped, biased
# logits), then ds (1 - t^2) through the soft cap, times scale to q.k.


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, kp, ks, k_ok, keyh, offs_k, lo, hi, h, b,
    q_base, do_base, lse_base, delta_base, qpos_base, qseg_base, bias_base, drop_ptr,
    T: tl.constexpr, S: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BQ: tl.constexpr, SCALE: tl.constexpr, SOFT_CAP: tl.constexpr,
    FAST_TANH: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, DROP_SCALE: tl.constexpr,
    IEEE: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    # Query blocks [lo, hi) of one key block, one query head; every block is [BK, BQ] (keys as rows).
    for i in range(lo, hi):
        offs_q = i * BQ + tl.arange(0, BQ)
        q_ok = offs_q < T
        q = _load_tile(q_base, offs_q, q_ok, H * DK, DK, BD)
        do = _load_tile(do_base, offs_q, q_ok, H * DV, DV, BDV)
        lse = tl.load(lse_base + offs_q, mask=q_ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # empty row: p = 0
        delta = tl.load(delta_base + offs_q, mask=q_ok, other=0.0)
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(
                bias_base + offs_q[None, :] * S + offs_k[:, None],
                mask=k_ok[:, None] & q_ok[None, :],
                other=0.0,
            ).to(tl.float32)
        s2, t = _logits(_dot(k, tl.trans(q), IEEE), bias, SCALE, SOFT_CAP, HAS_BIAS, FAST_TANH)  # [BK, BQ]
        p = tl.exp2(s2 - lse2[None, :])
        dp = _dot(v, tl.trans(do), IEEE)  # [BK, BQ]
        if MASKED:
            qp, qs = _positions(qpos_base, qseg_base, offs_q, q_ok, HAS_SEG)
            allowed = _allowed(
                qp[None, :],
                kp[:, None],
                qs[None, :],
                ks[:, None],
                k_ok[:, None] & q_ok[None, :],
                CAUSAL,
                WINDOW,
                LEFT,
                RIGHT,
                HAS_SEG,
            )
            p = tl.where(allowed, p, 0.0)
        pz = p
        if DROPOUT:
            keep = _keep(_row_hash(drop_ptr, b, h, offs_q)[None, :], keyh[:, None], drop_ptr)
            pz = tl.where(keep, p * DROP_SCALE, 0.0)
            dp = tl.where(keep, dp * DROP_SCALE, 0.0)
        dv += _dot(pz.to(do.dtype), do, IEEE)
        ds = p * (dp - delta[None, :])
        if SOFT_CAP > 0:
            ds = ds * (1.0 - t * t)
        if MASKED:  # dp and t are NaN where v and k are; such keys are masked for every row here
            ds = tl.where(allowed, ds, 0.0)
        dk += _dot(ds.to(q.dtype), q, IEEE)
    return dk, dv


@triton.jit
def dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, qpos_ptr, kvpos_ptr, qseg_ptr, kvseg_ptr, bias_ptr,
    drop_ptr, ranges_ptr,  # inputs
    dk_ptr, dv_ptr,  # outputs
    T: tl.constexpr, S: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    NK: tl.constexpr, SCALE: tl.constexpr, SOFT_CAP: tl.constexpr, FAST_TANH: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, HAS_SEG: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_SB: tl.constexpr, BIAS_SH: tl.constexpr, DROPOUT: tl.constexpr,
    DROP_SCALE: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    # NK * B * HKV programs: one per (key block, batch, kv head) walks the G query heads of its group
    # and their query blocks, so dk, dv [B, S, HKV, D] are summed over the group in registers (no atomics).
    # ranges: [B, NK, 4] int32 (lo, flo, fhi, hi) query blocks per key block.
    j = tl.program_id(0) % NK  # one grid axis, key blocks fastest (kernels/triton_grid.py)
    bh = tl.program_id(0) // NK
    b = bh // HKV
    hk = bh % HKV
    G: tl.constexpr = H // HKV
    b64 = b.to(tl.int64)
    offs_k = j * BK + tl.arange(0, BK)
    k_ok = offs_k < S
    kv_rows = b64 * S * HKV + hk
    k = _load_tile(k_ptr + kv_rows * DK, offs_k, k_ok, HKV * DK, DK, BD)
    v = _load_tile(v_ptr + kv_rows * DV, offs_k, k_ok, HKV * DV, DV, BDV)
    kp, ks = _positions(kvpos_ptr + b64 * S, kvseg_ptr + b64 * S, offs_k, k_ok, HAS_SEG)
    keyh = offs_k.to(tl.uint32)
    if DROPOUT:
        keyh = _key_hash(drop_ptr, offs_k)
    qpos_base = qpos_ptr + b64 * T
    qseg_base = qseg_ptr + b64 * T

    r = ranges_ptr + (b * NK + j) * 4
    lo = tl.load(r)
    flo = tl.load(r + 1)
    fhi = tl.load(r + 2)
    hi = tl.load(r + 3)
    dk = tl.zeros([BK, BD], tl.float32)
    dv = tl.zeros([BK, BDV], tl.float32)
    for g in range(G):
        h = hk * G + g
        q_base = q_ptr + (b64 * T * H + h) * DK
        do_base = do_ptr + (b64 * T * H + h) * DV
        lse_base = lse_ptr + (b64 * H + h) * T
        delta_base = delta_ptr + (b64 * H + h) * T
        bias_base = bias_ptr + b64 * BIAS_SB + h.to(tl.int64) * BIAS_SH
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, kp, ks, k_ok, keyh, offs_k, lo, flo, h, b, q_base, do_base, lse_base,
            delta_base, qpos_base, qseg_base, bias_base, drop_ptr, T, S, H, DK, DV, BD, BDV, BQ, SCALE,
            SOFT_CAP, FAST_TANH, CAUSAL, WINDOW, LEFT, RIGHT, HAS_SEG, HAS_BIAS, DROPOUT, DROP_SCALE, IEEE,
            True,
        )  # fmt: skip
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, kp, ks, k_ok, keyh, offs_k, flo, fhi, h, b, q_base, do_base, lse_base,
            delta_base, qpos_base, qseg_base, bias_base, drop_ptr, T, S, H, DK, DV, BD, BDV, BQ, SCALE,
            SOFT_CAP, FAST_TANH, CAUSAL, WINDOW, LEFT, RIGHT, HAS_SEG, HAS_BIAS, DROPOUT, DROP_SCALE, IEEE,
            False,
        )  # fmt: skip
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, kp, ks, k_ok, keyh, offs_k, fhi, hi, h, b, q_base, do_base, lse_base,
            delta_base, qpos_base, qseg_base, bias_base, drop_ptr, T, S, H, DK, DV, BD, BDV, BQ, SCALE,
            SOFT_CAP, FAST_TANH, CAUSAL, WINDOW, LEFT, RIGHT, HAS_SEG, HAS_BIAS, DROPOUT, DROP_SCALE, IEEE,
            True,
        )  # fmt: skip
    dk = dk * SCALE
    _store_tile(dk_ptr + kv_rows * DK, offs_k, k_ok, dk, HKV * DK, DK, BD)
    _store_tile(dv_ptr + kv_rows * DV, offs_k, k_ok, dv, HKV * DV, DV, BDV)


@triton.jit
def _dq_blocks(
    dq, q, do, lse2, delta, qp, qs, q_ok, rowh, offs_q, lo, hi,
    k_base, v_base, kvpos_base, kvseg_base, bias_base, dbias_base, drop_ptr,
    S: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
    BDV: tl.constexpr, BK: tl.constexpr, SCALE: tl.constexpr, SOFT_CAP: tl.constexpr, FAST_TANH: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, DROP_SCALE: tl.constexpr,
    IEEE: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    # Key blocks [lo, hi) of one query block: dq, and dS per pair into dbias when there is a bias.
    for j in range(lo, hi):
        offs_k, k_ok, k, v, s2, t = _key_block(
            q, q_ok, offs_q, j, k_base, v_base, bias_base,
            S, HKV, DK, DV, BD, BDV, BK, SCALE, SOFT_CAP, FAST_TANH, HAS_BIAS, IEEE,
        )  # fmt: skip
        p = tl.exp2(s2 - lse2[:, None])
        dp = _dot(do, tl.trans(v), IEEE)  # [BQ, BK]
        if MASKED:
            kp, ks = _positions(kvpos_base, kvseg_base, offs_k, k_ok, HAS_SEG)
            pair_ok = q_ok[:, None] & k_ok[None, :]
            allowed = _allowed(qp[:, None], kp[None, :], qs[:, None], ks[None, :], pair_ok,
                               CAUSAL, WINDOW, LEFT, RIGHT, HAS_SEG)  # fmt: skip
            p = tl.where(allowed, p, 0.0)
            seen = tl.max(allowed.to(tl.int32), axis=0) > 0
            k = tl.where(seen[:, None], k, 0.0)
        if DROPOUT:
            keep = _keep(rowh[:, None], _key_hash(drop_ptr, offs_k)[None, :], drop_ptr)
            dp = tl.where(keep, dp * DROP_SCALE, 0.0)
        ds = p * (dp - delta[:, None])
        if MASKED:  # dp is NaN where v is
            ds = tl.where(allowed, ds, 0.0)
        if HAS_BIAS:  # dS of this (b, h) pair block; summed over broadcast dims in JAX
            tl.store(
                dbias_base + offs_q[:, None] * S + offs_k[None, :], ds, mask=q_ok[:, None] & k_ok[None, :]
            )
        if SOFT_CAP > 0:
            ds = ds * (1.0 - t * t)
            if MASKED:  # t is NaN where k is: select again, never multiply a masked 0 by it
                ds = tl.where(allowed, ds, 0.0)
        dq += _dot(ds.to(k.dtype), k, IEEE)
    return dq


@triton.jit
def dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, qpos_ptr, kvpos_ptr, qseg_ptr, kvseg_ptr, bias_ptr,
    drop_ptr, ranges_ptr,  # inputs
    dq_ptr, dbias_ptr,  # outputs (dbias: [B, H, T, S] float32 dS, zeroed, with HAS_BIAS; else [1])
    T: tl.constexpr, S: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    NQ: tl.constexpr, SCALE: tl.constexpr, SOFT_CAP: tl.constexpr, FAST_TANH: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, HAS_SEG: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_SB: tl.constexpr, BIAS_SH: tl.constexpr, DROPOUT: tl.constexpr,
    DROP_SCALE: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    # NQ * B * H programs, as the forward: one per (query block, batch, query head).
    # Query blocks in reverse launch order: under causal masks the last ones walk the most key blocks, and
    # starting them first shortens the tail of the grid.
    i = NQ - 1 - tl.program_id(0) % NQ  # one grid axis, query blocks fastest (kernels/triton_grid.py)
    bh = tl.program_id(0) // NQ
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    b64 = b.to(tl.int64)
    offs_q = i * BQ + tl.arange(0, BQ)
    q_ok = offs_q < T
    q_rows = b64 * T * H + h
    q = _load_tile(q_ptr + q_rows * DK, offs_q, q_ok, H * DK, DK, BD)
    do = _load_tile(do_ptr + q_rows * DV, offs_q, q_ok, H * DV, DV, BDV)
    lse = tl.load(lse_ptr + (b64 * H + h) * T + offs_q, mask=q_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(delta_ptr + (b64 * H + h) * T + offs_q, mask=q_ok, other=0.0)
    qp, qs = _positions(qpos_ptr + b64 * T, qseg_ptr + b64 * T, offs_q, q_ok, HAS_SEG)
    rowh = offs_q.to(tl.uint32)
    if DROPOUT:
        rowh = _row_hash(drop_ptr, b, h, offs_q)
    k_base = k_ptr + (b64 * S * HKV + hk) * DK
    v_base = v_ptr + (b64 * S * HKV + hk) * DV
    kvpos_base = kvpos_ptr + b64 * S
    kvseg_base = kvseg_ptr + b64 * S  # a dummy [1] without segments: never read
    bias_base = bias_ptr + b64 * BIAS_SB + h.to(tl.int64) * BIAS_SH
    dbias_base = dbias_ptr + (b64 * H + h) * T * S

    r = ranges_ptr + (b * NQ + i) * 4
    lo = tl.load(r)
    flo = tl.load(r + 1)
    fhi = tl.load(r + 2)
    hi = tl.load(r + 3)
    dq = tl.zeros([BQ, BD], tl.float32)
    dq = _dq_blocks(
        dq, q, do, lse2, delta, qp, qs, q_ok, rowh, offs_q, lo, flo, k_base, v_base, kvpos_base, kvseg_base,
        bias_base, dbias_base, drop_ptr, S, HKV, DK, DV, BD, BDV, BK, SCALE, SOFT_CAP, FAST_TANH, CAUSAL,
        WINDOW,
        LEFT, RIGHT, HAS_SEG, HAS_BIAS, DROPOUT, DROP_SCALE, IEEE, True,
    )  # fmt: skip
    dq = _dq_blocks(
        dq, q, do, lse2, delta, qp, qs, q_ok, rowh, offs_q, flo, fhi, k_base, v_base, kvpos_base, kvseg_base,
        bias_base, dbias_base, drop_ptr, S, HKV, DK, DV, BD, BDV, BK, SCALE, SOFT_CAP, FAST_TANH, CAUSAL,
        WINDOW,
        LEFT, RIGHT, HAS_SEG, HAS_BIAS, DROPOUT, DROP_SCALE, IEEE, False,
    )  # fmt: skip
    dq = _dq_blocks(
        dq, q, do, lse2, delta, qp, qs, q_ok, rowh, offs_q, fhi, hi, k_base, v_base, kvpos_base, kvseg_base,
        bias_base, dbias_base, drop_ptr, S, HKV, DK, DV, BD, BDV, BK, SCALE, SOFT_CAP, FAST_TANH, CAUSAL,
        WINDOW,
        LEFT, RIGHT, HAS_SEG, HAS_BIAS, DROPOUT, DROP_SCALE, IEEE, True,
    )  # fmt: skip
    dq = dq * SCALE
    _store_tile(dq_ptr + q_rows * DK, offs_q, q_ok, dq, H * DK, DK, BD)

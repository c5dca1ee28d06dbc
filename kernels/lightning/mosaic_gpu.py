"""Lightning attention's forward walk in Pallas on Mosaic GPU (Hopper), warp-specialised; the rest Triton's.

Same chunked form as triton.py (chunks of C = 64 tokens, lam = exp(-s_h)):

    o_i   = scale * (sum_{j<=i} lam^(i-j) (q_i . k_j) v_j  +  lam^(i+1) q_i S_in)
    S_out = lam^C S_in + sum_j lam^(C-1-j) k_j^T v_j

One program (a CUDA block of two warpgroups) owns one (sequence, head, segment, block of 64 Dv
columns). Its memory warpgroup streams the q, k, v chunks of the segment into a ring of `STAGES`
shared-memory slots by TMA, a slot refilled as soon as the compute warpgroup has released it. The
compute warpgroup walks the chunks with the float32 state S [Dk, 64] as a wgmma accumulator in
registers and a bf16 copy of it in shared memory (the operand of q S_in). Per chunk all of its dots are
in flight at once: the update k^T (lam^(C-1-j) v_j), accumulated in place onto lam^C S; q k^T; q S_in;
then P v onto lam^(i+1) q S_in as soon as q k^T is back. The Triton walk (triton.py) waits for each dot
in turn; this is what makes the Mosaic walk faster at Dk = 128 (benchmarks/RESULTS_mosaic_gpu.md).

Few (sequence, head) pairs are cut into P segments as in triton.py: Triton's states-only first pass
gives each segment's local state, a P-step scan in JAX the state entering each, and the Mosaic walk
runs every segment from its own.

What this file does not do itself:
  * Gradients. Under differentiation the Triton backend's forward (which also stores S_in of every
    chunk) and its backward run (custom_vjp rules of triton.py); only undifferentiated calls, inference
    and prefill, take the Mosaic walk.
  * The non-finite rule inside a chunk (README, "Non-finite values"): a non-finite v_j reaches
    outputs i < j of its chunk in P v (0 * NaN). A non-finite k or v also reaches the final state and
    stays there, so every (sequence, head) pair whose final state is not finite is recomputed by the
    Triton walk, rule included, in place (triton.forward_where_flagged); on finite inputs that launch
    returns at once. A non-finite q reaches only its own row either way.

Serves: an NVIDIA Hopper GPU (wgmma, TMA; compute capability 9.x), bf16 or fp16, Dk = 128 (at Dk = 64
the Triton walk measured faster, so those calls are left to it), Dv a multiple of 64, T a multiple of
64, no cu_seqlens, reverse=False. Anything else raises NotImplementedError (the API then tries the next
backend). Signature and meaning as in reference.py.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from shardattn.kernels.lightning import triton
from shardattn.kernels.lightning.varying import match_varying

CHUNK = 64
BV = 64  # Dv columns per program: a [Dk, 64] float32 state is 64 registers per thread at Dk = 128
STAGES = 3  # shared-memory slots of q, k, v chunks (2: 0.22 ms, 3: 0.20 ms on b4-t8k, H200)
COMPUTE_REGISTERS = 232  # per thread of the compute warpgroup (setmaxnreg); the memory one keeps 40
LOG2E = 1.4426950408889634
DEFAULT_SMS = 132  # H100 SXM / H200; the device's own count is used when JAX reports it


def _plgpu():
    try:
        import jax.experimental.pallas as pl
        import jax.experimental.pallas.mosaic_gpu as plgpu
    except Exception as err:  # jaxlib without Mosaic GPU (CPU-only wheels still import it)
        raise NotImplementedError(f"the mosaic_gpu backend needs Pallas's Mosaic GPU: {err}") from err
    return pl, plgpu


def _check_supported(q, k, v, cu_seqlens, reverse):
    if jax.default_backend() != "gpu":
        raise NotImplementedError(f"the mosaic_gpu backend needs a GPU; jax.default_backend() is "
                                  f"{jax.default_backend()!r}")
    capability = getattr(jax.devices()[0], "compute_capability", "")
    if not str(capability).startswith("9"):
        raise NotImplementedError(f"the mosaic_gpu backend's walk is written for Hopper (wgmma, compute "
                                  f"capability 9.x); this GPU reports {capability!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise NotImplementedError(f"the mosaic_gpu backend takes bfloat16/float16, got {name}.dtype="
                                      f"{x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise NotImplementedError(
            f"the mosaic_gpu backend needs one dtype for q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}")
    T, Dk, Dv = q.shape[1], q.shape[3], v.shape[3]
    if Dk != 128:
        raise NotImplementedError(f"the mosaic_gpu backend serves Dk = 128 (at Dk = 64 the triton walk "
                                  f"measured faster), got Dk={Dk}")
    if Dv % BV:
        raise NotImplementedError(f"the mosaic_gpu backend needs Dv a multiple of {BV}, got Dv={Dv}")
    if T % CHUNK or T < STAGES * CHUNK:
        raise NotImplementedError(f"the mosaic_gpu backend needs T a multiple of {CHUNK} and at least "
                                  f"{STAGES * CHUNK}, got T={T}")
    if cu_seqlens is not None:
        raise NotImplementedError("the mosaic_gpu backend does not take cu_seqlens (packed sequences)")
    if reverse:
        raise NotImplementedError("the mosaic_gpu backend does not take reverse=True")


def _num_segments(num_items, num_chunks):
    """Segments per sequence: the most, dividing the chunks evenly (every segment at least STAGES
    chunks), that keep the programs within one per SM. Measured on b1-t32k (32 items of 512 chunks):
    4 segments 0.32 ms, 8 segments 0.34 ms; the walk holds one program per SM."""
    sms = getattr(jax.devices()[0], "core_count", None) or DEFAULT_SMS
    best = 1
    for p in range(1, num_chunks // STAGES + 1):
        if num_chunks % p == 0 and num_items * p <= sms:
            best = p
    return best


def _walk(q, k, v, slopes, s0, *, scale, P):
    """The Mosaic walk: o [B, T, H, Dv] and every segment's final state [B, H, P, Dk, Dv] float32;
    segment p (T // P tokens) starts from s0[:, :, p] (zeros when s0 is None)."""
    pl, plgpu = _plgpu()
    B, T, H, DK = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    C, NV, G = CHUNK, DV // BV, H // HKV
    NC = T // (C * P)  # chunks per segment
    dtype, f32 = q.dtype, jnp.float32
    wgmma = plgpu.Layout.WGMMA
    row = plgpu.Layout.WGMMA.reduce(1)

    def iota(shape, dim, layout):
        return plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, shape, dim), layout)

    def transposed(ref):
        return ref.transpose((1, 0)) if hasattr(ref, "transpose") else plgpu.transpose_ref(ref, (1, 0))

    def load(ref, layout):  # jax 0.10 takes the index positionally
        try:
            return plgpu.load(ref, layout=layout, optimized=False)
        except TypeError:
            return plgpu.load(ref, (), layout=layout, optimized=False)

    def kernel(q_ref, k_ref, v_ref, sl_ref, s0_ref, o_ref, sf_ref, scoped):
        (q_s, k_s, v_s, s_s, vd_s, o_s, f_s), (qb, kb, vb), freed = scoped
        b = lax.axis_index("batch")
        h = lax.axis_index("heads")
        vs = lax.axis_index("vs")  # (segment, Dv block), Dv blocks fastest
        seg, iv = lax.div(vs, jnp.array(NV, vs.dtype)), lax.rem(vs, jnp.array(NV, vs.dtype))
        hk = lax.div(h, jnp.array(G, h.dtype))
        vcols = pl.ds(iv * BV, BV)
        c0 = seg * NC  # first chunk of this program's segment
        wg = lax.axis_index("wg")

        @pl.when(wg == 0)
        def _compute():
            plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
            neg = -sl_ref[h] * LOG2E  # log2(lam)
            rows = iota((C, C), 0, wgmma)
            cols = iota((C, C), 1, wgmma)
            causal = rows >= cols
            # lam^(i-j) for j <= i; the exponent is masked before exp2, so nothing overflows
            intra = jnp.exp2(jnp.where(causal, (rows - cols).astype(f32) * neg, -jnp.inf))
            r = iota((C,), 0, row).astype(f32)
            q_decay = lax.broadcast_in_dim(jnp.exp2((r + 1.0) * neg), (C, BV), [0])  # lam^(i+1)
            k_decay = lax.broadcast_in_dim(jnp.exp2((C - 1.0 - r) * neg), (C, BV), [0])  # lam^(C-1-j)
            lam_c = jnp.exp2(neg * C)

            if s0 is None:
                S = plgpu.layout_cast(jnp.zeros((DK, BV), f32), wgmma)
            else:
                S = load(s0_ref.at[b, h, seg, :, vcols], wgmma)
            s_s[...] = S.astype(dtype)
            plgpu.commit_smem()

            def step(c, S):
                slot = lax.rem(c, STAGES)
                plgpu.barrier_wait(vb.at[slot])
                vd_s[...] = (v_s.at[slot][...].astype(f32) * k_decay).astype(dtype)
                plgpu.commit_smem()
                plgpu.barrier_wait(qb.at[slot])
                plgpu.barrier_wait(kb.at[slot])
                kt = transposed(k_s.at[slot])

                def dots(refs):
                    s_acc, o_acc = refs
                    plgpu.wgmma(s_acc, kt, vd_s)  # S_out = lam^C S_in + k^T (decay v)

                    def q_dots(qk_acc, qs_acc):
                        plgpu.wgmma(qk_acc, q_s.at[slot], kt)
                        plgpu.wgmma(qs_acc, q_s.at[slot], s_s)
                        qk = plgpu.wgmma_accumulator_load(qk_acc, wait_n=1)  # q S_in may still run
                        # the causal mask is selected, never multiplied: a non-finite q_i or k_j stays
                        # in the rows i' >= j
                        return jnp.where(causal, qk * intra, 0.0).astype(dtype), qs_acc[...]

                    scores, qs = pl.run_scoped(q_dots, plgpu.ACC((C, C), f32), plgpu.ACC((C, BV), f32))
                    o_acc[...] = q_decay * qs
                    plgpu.wgmma(o_acc, scores, v_s.at[slot])

                zeros = plgpu.layout_cast(jnp.zeros((C, BV), f32), wgmma)
                S, o = pl.run_state(dots)((plgpu.ACC.init(lam_c * S), plgpu.ACC.init(zeros)))
                plgpu.barrier_arrive(freed.at[slot])
                ob = lax.rem(c, 2)
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store from o_s[ob] two chunks ago
                o_s.at[ob][...] = (o * scale).astype(dtype)
                s_s[...] = S.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_s.at[ob], o_ref.at[b, pl.ds((c0 + c) * C, C), h, vcols])
                return S

            S = lax.fori_loop(0, NC, step, S)
            f_s[...] = S
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(f_s, sf_ref.at[b, h, seg, :, vcols])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def issue(c, slot):
                rows_ = pl.ds((c0 + c) * C, C)
                plgpu.copy_gmem_to_smem(q_ref.at[b, rows_, h], q_s.at[slot], qb.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[b, rows_, hk], k_s.at[slot], kb.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, rows_, hk, vcols], v_s.at[slot], vb.at[slot])

            for i in range(STAGES):
                issue(i, i)

            @pl.loop(0, NC - STAGES)
            def _(c):
                slot = lax.rem(c, STAGES)
                plgpu.barrier_wait(freed.at[slot])
                issue(c + STAGES, slot)

    def entry(q_ref, k_ref, v_ref, sl_ref, s0_ref, o_ref, sf_ref):
        tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = [
            plgpu.SMEM((STAGES, C, DK), dtype, transforms=tiled),  # q
            plgpu.SMEM((STAGES, C, DK), dtype, transforms=tiled),  # k
            plgpu.SMEM((STAGES, C, BV), dtype, transforms=tiled),  # v
            plgpu.SMEM((DK, BV), dtype, transforms=tiled),  # S_in in bf16/fp16, for q S_in
            plgpu.SMEM((C, BV), dtype, transforms=tiled),  # lam^(C-1-j) v_j, for the update
            plgpu.SMEM((2, C, BV), dtype, transforms=tiled),  # o, two chunks in flight to HBM
            plgpu.SMEM((DK, BV), f32),  # the final state
        ]
        pl.run_scoped(
            lambda *args: kernel(q_ref, k_ref, v_ref, sl_ref, s0_ref, o_ref, sf_ref, args),
            smem,
            (plgpu.Barrier(num_barriers=STAGES),) * 3,
            plgpu.Barrier(num_arrivals=1, num_barriers=STAGES),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((B, T, H, DV), dtype), jax.ShapeDtypeStruct((B, H, P, DK, DV), f32)),
        grid=(NV * P, H, B),
        grid_names=("vs", "heads", "batch"),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, slopes, jnp.zeros((1,), f32) if s0 is None else s0)


def _forward(q, k, v, slopes, s0, scale):
    """o [B, T, H, Dv] and the final state [B, H, Dk, Dv]: segment scan, Mosaic walk, exact relaunch."""
    B, T, H, DK = q.shape
    DV = v.shape[3]
    P = _num_segments(B * H * (DV // BV), T // CHUNK)
    if P > 1:
        # Triton's states-only first pass (k, v read once), then S_in(s) = lam^TSEG S_in(s-1) + S_loc(s-1)
        blocks = triton.BlockSizes.get_default(DK, DV, q.dtype)
        s_loc = triton._segment_states(k, v, slopes, False, blocks, P, T // P,
                                       min(blocks.fwd_bv, triton._pow2(DV)))  # fmt: skip
        lam_seg = jnp.exp(-slopes * float(T // P))[None, :, None, None]
        incoming = [jnp.zeros((B, H, DK, DV), jnp.float32) if s0 is None else s0]
        for seg in range(1, P):
            incoming.append(lam_seg * incoming[-1] + s_loc[:, :, seg - 1])
        s0_walk = jnp.stack(incoming, axis=2)
    else:
        s0_walk = None if s0 is None else s0[:, :, None]
    o, states = _walk(q, k, v, slopes, s0_walk, scale=scale, P=P)
    o, states = (match_varying(x, q, k, v) for x in (o, states))
    flags = jnp.any(~jnp.isfinite(states), axis=(2, 3, 4)).astype(jnp.float32).reshape(B * H)
    o = triton.forward_where_flagged(flags, o, q, k, v, slopes, s0, scale=scale)
    return o, states[:, :, -1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _lightning(q, k, v, slopes, initial_state, cu_seqlens, opts):
    return _forward(q, k, v, slopes, initial_state, opts.scale)


# Under differentiation: the Triton backend's forward (it keeps S_in of every chunk) and backward.
_lightning.defvjp(triton._lightning_fwd, triton._lightning_bwd)


def lightning_attention(q, k, v, slopes, initial_state=None, cu_seqlens=None, *, scale, reverse=False):
    """Mosaic GPU lightning attention (forward; gradients by the Triton backend); see reference.py.

    Raises NotImplementedError where it does not serve (see the module docstring).
    """
    _check_supported(q, k, v, cu_seqlens, reverse)
    triton._check_supported(q, k, v)  # the first pass, the exact relaunch and the gradients are Triton's
    opts = triton.Options(scale=float(scale), reverse=False)
    slopes = match_varying(slopes.astype(jnp.float32), q)
    if initial_state is not None:
        initial_state = match_varying(initial_state.astype(jnp.float32), q)
    return _lightning(q, k, v, slopes, initial_state, None, opts)

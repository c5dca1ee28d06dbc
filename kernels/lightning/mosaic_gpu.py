"""Lightning attention's forward walk and, under differentiation, the backward's G walk and chunk kernel
in Pallas on Mosaic GPU (Hopper), warp-specialised; the rest Triton's.

Same chunked form as triton.py (chunks of C = 64 tokens, lam = exp(-s_h)):

    o_i   = scale * (sum_{j<=i} lam^(i-j) (q_i . k_j) v_j  +  lam^(i+1) q_i S_in)
    S_out = lam^C S_in + sum_j lam^(C-1-j) k_j^T v_j

One program (a CUDA block) owns one (sequence, head, segment) and NW blocks of 64 Dv columns, one per
compute warpgroup (NW = 1 or 2, _plan). Its memory warpgroup streams the segment's q, k, v chunks into
a ring of shared-memory slots by TMA (q and k once for both compute warpgroups), a slot refilled as
soon as every compute warpgroup has released it. A compute warpgroup walks the chunks with its float32
state block S [Dk, 64] as a wgmma accumulator in registers and a bf16 copy of it in shared memory (the
operand of q S_in). Per chunk all of its dots are in flight at once: the update k^T (lam^(C-1-j) v_j),
accumulated in place onto lam^C S; q k^T; q S_in; then P v onto lam^(i+1) q S_in as soon as q k^T is
back. The Triton walk (triton.py) waits for each dot in turn, one walk per SM; here one walk's loads
overlap its dots, and with NW = 2 the SM has a second walk to run while one waits: that is what makes
the Mosaic walk faster at Dk = 128 (benchmarks/RESULTS_mosaic_gpu.md). With NW = 1 the one walk is split
over two compute warpgroups (SPLIT_ROLES): a state warpgroup runs the update chain and hands S_in of each
chunk to an output warpgroup through a ring of shared-memory copies; the output warpgroup runs q k^T,
q S_in and P v. Per chunk the SM then spends the longer chain, not both: b4-t8k forward 0.182 ms against
0.206-0.209 for one warpgroup doing both (H200, copy 3457-3873 GB/s), outputs bit-identical.

Few (sequence, head) pairs are cut into P segments as in triton.py: Triton's states-only first pass
gives each segment's local state, a P-step scan in JAX the state entering each, and the Mosaic walk
runs every segment from its own. The plain forward then walks one Dv block per program, split, with
half the segments of the two-block plan that the storing forward and the G walk keep (_plan).

The backward is Triton's chunk-parallel structure (custom_vjp rules below) with Mosaic kernels in two of
its places: under differentiation (bf16) the walk also stores S_in of every chunk, the G walk here
(_g_walk_kernel: the state update alone, in reverse chunk order) gives G = dL/dS_out of every chunk, and
at Dk = Dv = 128 the chunk kernel here (_chunk_kernel) reads both. fp16 takes Triton's kernels there,
since Triton keeps fp16's chunk states in float32.

What this file does not do itself:
  * Triton's segment passes (the states-only first pass and its backward twin) and the exact
    relaunches below.
  * The non-finite rule inside a chunk (README, "Non-finite values"): a non-finite v_j reaches
    outputs i < j of its chunk in P v (0 * NaN). A non-finite k or v also reaches the final state and
    stays there, so every (sequence, head) pair whose final state is not finite is recomputed by the
    Triton walk, rule included, in place (triton.forward_where_flagged); on finite inputs that launch
    returns at once. A non-finite q reaches only its own row either way.

Serves: an NVIDIA Hopper GPU (wgmma, TMA; compute capability 9.x), bf16 or fp16, Dk = 128 (at Dk = 64
the Triton walk measured faster, so those calls are left to it), Dv a multiple of 64, T a multiple of
64, no cu_seqlens, reverse=False; on one device or inside shard_map (sharded_lightning's per-device
calls, whose outputs it types as varying like its inputs, as triton.py does).
Anything else raises NotImplementedError (the API then tries the next backend). Signature and meaning
as in reference.py.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from shardattn.kernels.lightning import triton
from shardattn.kernels.lightning.varying import match_varying, varying_axes

CHUNK = 64
BV = 64  # Dv columns per program: a [Dk, 64] float32 state is 64 registers per thread at Dk = 128
# shared-memory slots of q, k, v chunks, by compute warpgroups per program (one: 2 slots 0.22 ms, 3 slots
# 0.20 ms on b4-t8k, H200, copy 3804 GB/s; two: 3 slots would not fit in shared memory)
STAGES = {1: 3, 2: 2}
COMPUTE_REGISTERS = 232  # per thread of the compute warpgroup (setmaxnreg); the memory one keeps 40
# A one-warpgroup walk split in two (_walk's split): a state warpgroup and an output warpgroup, their
# registers per thread (setmaxnreg: 232 + 232 + the memory warpgroup's 40 is the most three may take), the
# shared-memory copies of S_in between them and the q, k, v slots, by whether the walk also stores S_in
# to HBM. Measured on b4-t8k (H200, copy 3873 GB/s, forward / storing forward ms,
# benchmarks/results/h200_lightning_mosaic_split_walk_tuning_2026-12-02.json): 2 copies 0.182 / 0.307,
# 3 copies 0.178 / 0.306, 4 slots 0.190, registers 216/248 or 248/216 0.183 / 0.182; one warpgroup doing
# both 0.206 / 0.309. The storing forward gains nothing split; it moves its floor's bytes either way
# (ncu, benchmarks/RESULTS_mosaic_gpu.md, session 13).
SPLIT_ROLES = True
SPLIT_SEGMENTS = True  # _plan: segmented plain forwards take the split walk too (measured: _plan's docstring)
SPLIT_REGISTERS = (232, 232)
SPLIT_STATES = {False: 3, True: 3}
SPLIT_STAGES = {False: 3, True: 3}
# the backward's chunk kernel: shared-memory slots of q, k, v, dO and of S_in, G (2 x 4 x 16 KiB + 2 x 32 KiB
# of 227 KiB at D = 128; a second S_in, G slot does not fit next to two of the others)
CHUNK_SLOTS, STATE_SLOTS = 2, 1
# and its registers per thread of the dq and the dk/dv warpgroup (setmaxnreg): a launch of three warpgroups
# gets 168 each, so with the memory warpgroup's 40 the two may take 464 together, and no more. More for
# the dk/dv warpgroup ran slower: 224/240 1.06x / 1.03x, 216/248 1.12x / 1.06x on b4-t8k / b2-t16k (H200,
# copy 3832 GB/s, benchmarks/results/h200_lightning_mosaic_chunk_kernel_register_splits_2026-12-01.json)
CHUNK_REGISTERS = (232, 232)
LOG2E = 1.4426950408889634
DEFAULT_SMS = 132  # H100 SXM / H200; the device's own count is used when JAX reports it
# The kernels' grid and warpgroup axis names. Mosaic GPU resolves lax.axis_index against the enclosing
# shard_map mesh's axes first, so a kernel axis named like a mesh axis ("heads", as meshes.AXIS_NAMES has)
# became that device's mesh index, read through NVSHMEM (nvshmem_my_pe, seen in the cuda lowering): most
# likely why the walks failed inside shard_map ("NVSHMEM is not supported in XLA", H200, jax 0.11.2).
# Names no mesh is expected to use:
_VS, _HEADS, _BATCH = "shardattn_mgpu_vs", "shardattn_mgpu_heads", "shardattn_mgpu_batch"
_PROGRAMS, _WG = "shardattn_mgpu_programs", "shardattn_mgpu_wg"


def _plgpu():
    try:
        import jax.experimental.pallas as pl
        import jax.experimental.pallas.mosaic_gpu as plgpu
    except Exception as err:  # jaxlib without Mosaic GPU (CPU-only wheels still import it)
        raise NotImplementedError(f"the mosaic_gpu backend needs Pallas's Mosaic GPU: {err}") from err
    return pl, plgpu


def _num_sms():
    return getattr(jax.devices()[0], "core_count", None) or DEFAULT_SMS


def _launch(kernel, *inputs):
    """kernel(*inputs) (a plgpu.kernel), its outputs typed as varying like the inputs: inside shard_map
    plgpu.kernel types them as varying over no mesh axis (see varying.py; outside it a no-op). This runs
    inside the custom_vjp rules, so the cast is never differentiated."""
    arrays = [x for x in inputs if isinstance(x, jax.Array)]
    return tuple(match_varying(o, *arrays) for o in kernel(*inputs))


def _walk_loop(num_chunks, step, carry):
    """lax.fori_loop(0, num_chunks, step, carry), with step 0 taken before the loop when carry (a state
    loaded from an input) is typed as varying over mesh axes: inside shard_map a value loaded from an
    input's ref keeps the input's varying axes, while a wgmma accumulator's (each step's result) has
    none, and the loop's carry types must agree. Outside shard_map this is the plain loop."""
    if not varying_axes(carry):
        return lax.fori_loop(0, num_chunks, step, carry)
    return lax.fori_loop(1, num_chunks, step, step(jnp.int32(0), carry))


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
    if T % CHUNK or T < STAGES[1] * CHUNK:
        raise NotImplementedError(f"the mosaic_gpu backend needs T a multiple of {CHUNK} and at least "
                                  f"{STAGES[1] * CHUNK}, got T={T}")
    if cu_seqlens is not None:
        raise NotImplementedError("the mosaic_gpu backend does not take cu_seqlens (packed sequences)")
    if reverse:
        raise NotImplementedError("the mosaic_gpu backend does not take reverse=True")


def _plan(B, H, DV, num_chunks, split_segments=None):
    """(compute warpgroups per program, segments per sequence) for B x H sequences of num_chunks chunks.

    A program with two compute warpgroups walks two Dv blocks of one (sequence, head, segment), sharing
    its q and k slots: the SM then has a second walk to run while one waits, and reads q, k once. That
    needs enough programs to fill the GPU, from (sequence, head) pairs or from segments (whose first pass
    costs one more read of k, v). Measured on an H200, copy 3797 GB/s (benchmarks/RESULTS_mosaic_gpu.md,
    step 4), forward ms, before the split walk:
    b2-t16k (128 pairs, Dv 128) 0.61 with two warpgroups against 0.80 with one; b1-t32k 0.29 (two, 8
    segments) against 0.32 (one, 4 segments); b1-t128k 1.01 against 1.13; but b4-t8k (64 pairs, whose
    128 one-warpgroup programs fill the GPU unsegmented) 0.20 with one against 0.28 with two and 2
    segments. So: one warpgroup where its programs fill 7/8 of the SMs in one wave without segments,
    else two (when Dv is a multiple of 128) with the most segments that keep one wave.

    split_segments (default SPLIT_SEGMENTS; the plain forward's plan, not the storing forward's or the G
    walk's, which has one chain and nothing to split): where segments are needed anyway, one Dv block
    per program, walked by the split walk (_walk's split), with the most segments that keep one wave.
    Measured on an H200 by GPU time (copy 4282 GB/s by the copy kernel's GPU time,
    benchmarks/results/h200_lightning_mosaic_segment_plans_2026-12-02.json), two blocks and 8 segments
    against one block and 4: b1-t32k forward 0.265 / 0.248 ms, b1-t128k 0.982 / 0.961; with the storing
    forward split too, forward+backward 1.068 / 1.066 and 4.044 / 4.132, so that one keeps two blocks.
    """
    sms = _num_sms()
    one = B * H * (DV // BV)
    split_segments = SPLIT_SEGMENTS if split_segments is None else split_segments
    fills = sms * 7 // 8 <= one <= sms
    nw = 2 if DV % (2 * BV) == 0 and not fills and not (split_segments and SPLIT_ROLES and one < sms) else 1
    items = B * H * (DV // (BV * nw))
    best = 1
    for p in range(1, num_chunks // STAGES[nw] + 1):
        if num_chunks % p == 0 and items * p <= sms:
            best = p
    return nw, best


def _first_pass_blocks(DK, DV, dtype):
    """(Triton block sizes, Dv block) of the forward's first pass over the segments (Triton's states-only
    walk): one place for _forward and local_state, whose equal launches XLA computes once."""
    blocks = triton.BlockSizes.get_default(DK, DV, dtype)
    return blocks, min(blocks.fwd_bv, triton._pow2(DV))


def _g_first_pass_blocks(B, H, T, DK, DV, blocks):
    """(Dk block, Dv block) of the G walk's first pass over the segments: one place for _g_walk and
    state_gradient, as _first_pass_blocks."""
    BK, _, BV, _, _, _ = triton._g_walk_blocks(B, H, T, DK, DV, blocks, split=True)
    return BK, BV


def _mosaic_backward(dtype):
    """Whether the Mosaic forward stores the chunk states and the Mosaic backward kernels serve: where
    Triton keeps them in the input dtype (bf16; fp16's are float32, which could overflow otherwise)."""
    return triton._state_dtype(dtype) == dtype


def _mosaic_training_forward(DK, DV, dtype):
    """Whether under differentiation the Mosaic forward runs (storing S_in), not Triton's: the Triton
    backend's chunk-parallel backward must be on and read states in the input dtype."""
    return triton.BlockSizes.get_default(DK, DV, dtype).bwd_parallel and _mosaic_backward(dtype)


def _iota(shape, dim, layout):
    _, plgpu = _plgpu()
    return plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, shape, dim), layout)


def _transposed(ref):
    _, plgpu = _plgpu()
    return ref.transpose((1, 0)) if hasattr(ref, "transpose") else plgpu.transpose_ref(ref, (1, 0))


def _load(ref, layout):  # jax 0.10 takes the index positionally
    _, plgpu = _plgpu()
    try:
        return plgpu.load(ref, layout=layout, optimized=False)
    except TypeError:
        return plgpu.load(ref, (), layout=layout, optimized=False)


def _stream(issue, freed, stages, num_chunks):
    """The memory warpgroup's loop: issue(c, slot) copies the tiles of step c into a slot; steps 0 to
    stages - 1 go at once, every later one as soon as each compute warpgroup has released its slot."""
    pl, plgpu = _plgpu()
    plgpu.set_max_registers(40, action="decrease")
    for i in range(stages):
        issue(i, i)

    @pl.loop(0, num_chunks - stages)
    def _(c):
        slot = lax.rem(c, stages)
        plgpu.barrier_wait(freed.at[slot])  # every compute warpgroup is done with the slot
        issue(c + stages, slot)


def _walk(q, k, v, slopes, s0, *, scale, P, NW, store_states=False, split=None):
    """The Mosaic walk: o [B, T, H, Dv] and every segment's final state [B, H, P, Dk, Dv] float32;
    segment p (T // P tokens) starts from s0[:, :, p] (zeros when s0 is None). A program has NW compute
    warpgroups (one per Dv block of 64, sharing the q and k slots) and one memory warpgroup.
    store_states: also S_in of every chunk, [H, B * T // C, Dk, Dv] in the input dtype (the layout of
    triton.py's chunk states, which its chunk-parallel backward reads), stored by TMA from the
    shared-memory copy of S that q S_in reads anyway (two of them then, one refilled while the other's
    store is in flight)."""
    pl, plgpu = _plgpu()
    B, T, H, DK = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    C, G, stages = CHUNK, H // HKV, STAGES[NW]
    NV = DV // (BV * NW)  # programs per (sequence, head, segment)
    NC = T // (C * P)  # chunks per segment
    split = (SPLIT_ROLES if split is None else split) and NW == 1
    if split:
        stages = min(SPLIT_STAGES[store_states], NC)
    # shared-memory copies of S per Dv block: split, a ring the output warpgroup reads behind the state one
    NS = (SPLIT_STATES[store_states] if split else 2 if store_states else 1)
    NWG = 2 if split else NW  # compute warpgroups
    dtype, f32 = q.dtype, jnp.float32
    wgmma = plgpu.Layout.WGMMA
    row = plgpu.Layout.WGMMA.reduce(1)
    iota, transposed, load = _iota, _transposed, _load

    def constants(sl_ref, h, *, output, state):
        """A compute warpgroup's per-head constants (causal, intra, q_decay, k_decay, lam_c): for the
        output chain the causal mask, lam^(i-j) and lam^(i+1); for the state chain lam^(C-1-j) and lam^C
        (None for the chain not asked for)."""
        neg = -sl_ref[h] * LOG2E  # log2(lam)
        causal = intra = q_decay = k_decay = lam_c = None
        if output:
            rows = iota((C, C), 0, wgmma)
            cols = iota((C, C), 1, wgmma)
            causal = rows >= cols
            # lam^(i-j) for j <= i; the exponent is masked before exp2, so nothing overflows
            intra = jnp.exp2(jnp.where(causal, (rows - cols).astype(f32) * neg, -jnp.inf))
        r = iota((C,), 0, row).astype(f32)
        if output:
            q_decay = lax.broadcast_in_dim(jnp.exp2((r + 1.0) * neg), (C, BV), [0])  # lam^(i+1)
        if state:
            k_decay = lax.broadcast_in_dim(jnp.exp2((C - 1.0 - r) * neg), (C, BV), [0])  # lam^(C-1-j)
            lam_c = jnp.exp2(neg * C)
        return causal, intra, q_decay, k_decay, lam_c

    def initial_state(s0_ref, b, h, seg, vcols):  # S entering the segment: [Dk, 64] float32, WGMMA layout
        if s0 is None:
            return plgpu.layout_cast(jnp.zeros((DK, BV), f32), wgmma)
        return load(s0_ref.at[b, h, seg, :, vcols], wgmma)

    def kernel(q_ref, k_ref, v_ref, sl_ref, s0_ref, o_ref, sf_ref, st_ref, scoped):
        (q_s, k_s, v_s, s_s, vd_s, o_s), (qb, kb, vb), freed = scoped
        b = lax.axis_index(_BATCH)
        h = lax.axis_index(_HEADS)
        vs = lax.axis_index(_VS)  # (segment, group of NW Dv blocks), Dv fastest
        seg, iv = lax.div(vs, jnp.array(NV, vs.dtype)), lax.rem(vs, jnp.array(NV, vs.dtype))
        hk = lax.div(h, jnp.array(G, h.dtype))
        c0 = seg * NC  # first chunk of this program's segment
        wg = lax.axis_index(_WG)

        def dv_block(w):
            return pl.ds((iv * NW + w) * BV, BV)

        @pl.when(wg < NW)
        def _compute():
            vcols = dv_block(wg)
            # this warpgroup's own buffers (q and k slots are shared)
            v_w, vb_w, s_w, vd_w, o_w = v_s.at[wg], vb.at[wg], s_s.at[wg], vd_s.at[wg], o_s.at[wg]
            plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
            causal, intra, q_decay, k_decay, lam_c = constants(sl_ref, h, output=True, state=True)
            S = initial_state(s0_ref, b, h, seg, vcols)
            def store_state(c, sb):  # S_in of chunk c (of the segment) from s_w[sb] to HBM
                if store_states:
                    plgpu.copy_smem_to_gmem(s_w.at[sb], st_ref.at[h, b * (T // C) + c0 + c, :, vcols])

            s_w.at[0][...] = S.astype(dtype)
            plgpu.commit_smem()
            store_state(0, 0)

            def step(c, S):
                slot = lax.rem(c, stages)
                sb = lax.rem(c, NS)  # s_w[sb] holds S_in of this chunk
                plgpu.barrier_wait(vb_w.at[slot])
                vd_w[...] = (v_w.at[slot][...].astype(f32) * k_decay).astype(dtype)
                plgpu.commit_smem()
                plgpu.barrier_wait(qb.at[slot])
                plgpu.barrier_wait(kb.at[slot])
                kt = transposed(k_s.at[slot])

                def dots(refs):
                    s_acc, o_acc = refs
                    plgpu.wgmma(s_acc, kt, vd_w)  # S_out = lam^C S_in + k^T (decay v)

                    def q_dots(qk_acc, qs_acc):
                        plgpu.wgmma(qk_acc, q_s.at[slot], kt)
                        plgpu.wgmma(qs_acc, q_s.at[slot], s_w.at[sb])
                        qk = plgpu.wgmma_accumulator_load(qk_acc, wait_n=1)  # q S_in may still run
                        # the causal mask is selected, never multiplied: a non-finite q_i or k_j stays
                        # in the rows i' >= j
                        return jnp.where(causal, qk * intra, 0.0).astype(dtype), qs_acc[...]

                    scores, qs = pl.run_scoped(q_dots, plgpu.ACC((C, C), f32), plgpu.ACC((C, BV), f32))
                    o_acc[...] = q_decay * qs
                    plgpu.wgmma(o_acc, scores, v_w.at[slot])

                zeros = plgpu.layout_cast(jnp.zeros((C, BV), f32), wgmma)
                S, o = pl.run_state(dots)((plgpu.ACC.init(lam_c * S), plgpu.ACC.init(zeros)))
                plgpu.barrier_arrive(freed.at[slot])
                ob, nb = lax.rem(c, 2), lax.rem(c + 1, NS)
                # Stores in flight, oldest first: ..., o(c - 2), [S_in(c - 1)], o(c - 1), [S_in(c)]. The
                # ones from o_w[ob] (two chunks ago) and, storing states, from s_w[nb] (S_in(c - 1)) must
                # have read their buffers.
                plgpu.wait_smem_to_gmem(2 if store_states else 1, wait_read_only=True)
                o_w.at[ob][...] = (o * scale).astype(dtype)
                s_w.at[nb][...] = S.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_w.at[ob], o_ref.at[b, pl.ds((c0 + c) * C, C), h, vcols])
                if store_states:  # S_in of the next chunk, if it is this segment's
                    pl.when(c + 1 < NC)(lambda: store_state(c + 1, nb))
                return S

            S = _walk_loop(NC, step, S)
            sf_ref.at[b, h, seg, :, vcols][...] = S  # from registers (no shared-memory buffer for it)
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == NW)
        def _memory():
            def issue(c, slot):
                rows_ = pl.ds((c0 + c) * C, C)
                plgpu.copy_gmem_to_smem(q_ref.at[b, rows_, h], q_s.at[slot], qb.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[b, rows_, hk], k_s.at[slot], kb.at[slot])
                for w in range(NW):
                    v_block = v_ref.at[b, rows_, hk, dv_block(w)]
                    plgpu.copy_gmem_to_smem(v_block, v_s.at[w, slot], vb.at[w, slot])

            _stream(issue, freed, stages, NC)

    def split_kernel(q_ref, k_ref, v_ref, sl_ref, s0_ref, o_ref, sf_ref, st_ref, scoped):
        # NW = 1, the walk's two chains on two warpgroups: the state one (wg 0) walks S_out = lam^C S_in +
        # k^T (lam^(C-1-j) v_j) and hands S_in of every chunk through a ring of NS shared-memory copies
        # (sready / sfree) to the output one (wg 1), which computes o from it; each runs ahead of or
        # behind the other by up to NS - 1 chunks, so per chunk the SM spends the longer chain, not both.
        (q_s, k_s, v_s, s_s, vd_s, o_s), (qb, kb, vb), freed, (sready, sfree) = scoped
        b = lax.axis_index(_BATCH)
        h = lax.axis_index(_HEADS)
        seg = lax.axis_index(_VS)  # (segment, Dv block), Dv fastest
        seg, iv = lax.div(seg, jnp.array(NV, seg.dtype)), lax.rem(seg, jnp.array(NV, seg.dtype))
        hk = lax.div(h, jnp.array(G, h.dtype))
        c0 = seg * NC
        wg = lax.axis_index(_WG)
        vcols = pl.ds(iv * BV, BV)
        v_w, vb_w, s_w, vd_w, o_w = v_s, vb, s_s, vd_s, o_s  # (one Dv block's: per_wg below)

        @pl.when(wg == 0)
        def _state():
            plgpu.set_max_registers(SPLIT_REGISTERS[0], action="increase")
            _, _, _, k_decay, lam_c = constants(sl_ref, h, output=False, state=True)
            S = initial_state(s0_ref, b, h, seg, vcols)

            def publish(c, S):  # S_in of chunk c (of the segment) into s_w[c % NS], and to HBM if stored
                sb = c % NS if isinstance(c, int) else lax.rem(c, NS)
                if not isinstance(c, int):  # (chunk 0's copy is free)

                    @pl.when(c >= NS)
                    def _():
                        plgpu.barrier_wait(sfree.at[sb])  # the output warpgroup is done with S_in(c - NS)

                if store_states:  # and so is the store of S_in(c - NS), the oldest of NS in flight
                    plgpu.wait_smem_to_gmem(NS - 1, wait_read_only=True)
                s_w.at[sb][...] = S.astype(dtype)
                plgpu.commit_smem()
                plgpu.barrier_arrive(sready.at[sb])
                if store_states:
                    plgpu.copy_smem_to_gmem(s_w.at[sb], st_ref.at[h, b * (T // C) + c0 + c, :, vcols])

            publish(0, S)

            def step(c, S):
                slot = lax.rem(c, stages)
                plgpu.barrier_wait(vb_w.at[slot])
                vd_w[...] = (v_w.at[slot][...].astype(f32) * k_decay).astype(dtype)
                plgpu.commit_smem()
                plgpu.barrier_wait(kb.at[slot])

                def update(refs):
                    plgpu.wgmma(refs[0], transposed(k_s.at[slot]), vd_w)

                (S,) = pl.run_state(update)((plgpu.ACC.init(lam_c * S),))
                plgpu.barrier_arrive(freed.at[slot])
                pl.when(c + 1 < NC)(lambda: publish(c + 1, S))
                return S

            S = _walk_loop(NC, step, S)
            sf_ref.at[b, h, seg, :, vcols][...] = S
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _output():
            plgpu.set_max_registers(SPLIT_REGISTERS[1], action="increase")
            causal, intra, q_decay, _, _ = constants(sl_ref, h, output=True, state=False)

            @pl.loop(0, NC)
            def _(c):
                slot, sb, ob = lax.rem(c, stages), lax.rem(c, NS), lax.rem(c, 2)
                plgpu.barrier_wait(qb.at[slot])
                plgpu.barrier_wait(kb.at[slot])

                def dots(refs):
                    (o_acc,) = refs

                    def q_dots(qk_acc, qs_acc):
                        plgpu.wgmma(qk_acc, q_s.at[slot], transposed(k_s.at[slot]))  # needs no state
                        plgpu.barrier_wait(sready.at[sb])
                        plgpu.wgmma(qs_acc, q_s.at[slot], s_w.at[sb])
                        qk = plgpu.wgmma_accumulator_load(qk_acc, wait_n=1)  # q S_in may still run
                        # the causal mask is selected, never multiplied (as in kernel above)
                        return jnp.where(causal, qk * intra, 0.0).astype(dtype), qs_acc[...]

                    scores, qs = pl.run_scoped(q_dots, plgpu.ACC((C, C), f32), plgpu.ACC((C, BV), f32))
                    plgpu.barrier_arrive(sfree.at[sb])
                    o_acc[...] = q_decay * qs
                    plgpu.barrier_wait(vb_w.at[slot])
                    plgpu.wgmma(o_acc, scores, v_w.at[slot])

                zeros = plgpu.layout_cast(jnp.zeros((C, BV), f32), wgmma)
                (o,) = pl.run_state(dots)((plgpu.ACC.init(zeros),))
                plgpu.barrier_arrive(freed.at[slot])
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store from o_w[ob] two chunks ago
                o_w.at[ob][...] = (o * scale).astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_w.at[ob], o_ref.at[b, pl.ds((c0 + c) * C, C), h, vcols])

            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            def issue(c, slot):
                rows_ = pl.ds((c0 + c) * C, C)
                plgpu.copy_gmem_to_smem(q_ref.at[b, rows_, h], q_s.at[slot], qb.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[b, rows_, hk], k_s.at[slot], kb.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, rows_, hk, vcols], v_w.at[slot], vb_w.at[slot])

            _stream(issue, freed, stages, NC)

    def entry(q_ref, k_ref, v_ref, sl_ref, s0_ref, o_ref, sf_ref, st_ref):
        tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        # v, S, o buffers per compute warpgroup's Dv block; split, one block's, unindexed (a ref viewed at a
        # static index inside run_state's body carries the index as a constant, which Mosaic GPU's
        # lowering of run_state's outputs rejects: "Shaped arrays must be represented by ir.Values")
        per_wg = () if split else (NW,)
        smem = [
            plgpu.SMEM((stages, C, DK), dtype, transforms=tiled),  # q
            plgpu.SMEM((stages, C, DK), dtype, transforms=tiled),  # k
            plgpu.SMEM(per_wg + (stages, C, BV), dtype, transforms=tiled),  # v
            plgpu.SMEM(per_wg + (NS, DK, BV), dtype, transforms=tiled),  # S_in in bf16/fp16, for q S_in
            plgpu.SMEM(per_wg + (C, BV), dtype, transforms=tiled),  # lam^(C-1-j) v_j, for the update
            plgpu.SMEM(per_wg + (2, C, BV), dtype, transforms=tiled),  # o, two chunks in flight to HBM
        ]
        body = split_kernel if split else kernel
        # split: the state and the output warpgroup hand S_in over (sready, sfree)
        handover = ((plgpu.Barrier(num_barriers=NS), plgpu.Barrier(num_barriers=NS)),) if split else ()
        pl.run_scoped(
            lambda *args: body(q_ref, k_ref, v_ref, sl_ref, s0_ref, o_ref, sf_ref, st_ref, args),
            smem,
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=per_wg + (stages,))),
            plgpu.Barrier(num_arrivals=NWG, num_barriers=stages),
            *handover,
            collective_axes=_WG,
        )  # fmt: skip

    walk = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((B, T, H, DV), dtype), jax.ShapeDtypeStruct((B, H, P, DK, DV), f32),
                  jax.ShapeDtypeStruct((H, B * T // C, DK, DV) if store_states else (1,), dtype)),
        grid=(NV * P, H, B),
        grid_names=(_VS, _HEADS, _BATCH),
        num_threads=NWG + 1,
        thread_name=_WG,
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
    return _launch(walk, q, k, v, slopes, jnp.zeros((1,), f32) if s0 is None else s0)


def _g_walk_kernel(q, do, slopes, g0, *, scale, P, NW):
    """The backward's G chain, G_in = lam^C G_out + scale sum_i lam^(i+1) q_i^T dO_i, walked from the last
    chunk of each segment to its first: G = dL/dS_out of every chunk [H, B * T // C, Dk, Dv] in the
    input dtype (the layout of triton.py's, which its chunk kernel reads) and the G leaving each segment
    at its first chunk [B, H, P, Dk, Dv] float32. Segment p starts from g0[:, :, p] at its end. The
    forward walk's state update alone, in reverse chunk order, with dO for v, q for k and the decay
    lam^(i+1) for lam^(C-1-j); a program as _walk's (NW compute warpgroups, one memory warpgroup)."""
    pl, plgpu = _plgpu()
    B, T, H, DK = q.shape
    DV = do.shape[3]
    C, stages = CHUNK, STAGES[NW]
    NV = DV // (BV * NW)
    NC = T // (C * P)
    dtype, f32 = q.dtype, jnp.float32
    wgmma = plgpu.Layout.WGMMA
    row = plgpu.Layout.WGMMA.reduce(1)

    def kernel(q_ref, do_ref, sl_ref, g0_ref, gst_ref, gout_ref, scoped):
        (q_s, do_s, dd_s, g_s), (qb, dob), freed = scoped
        b = lax.axis_index(_BATCH)
        h = lax.axis_index(_HEADS)
        vs = lax.axis_index(_VS)
        seg, iv = lax.div(vs, jnp.array(NV, vs.dtype)), lax.rem(vs, jnp.array(NV, vs.dtype))
        c0 = seg * NC
        wg = lax.axis_index(_WG)

        def dv_block(w):
            return pl.ds((iv * NW + w) * BV, BV)

        def chunk(c):  # the chunk of the segment that step c walks: last first
            return NC - 1 - c

        @pl.when(wg < NW)
        def _compute():
            vcols = dv_block(wg)
            do_w, dob_w, dd_w, g_w = do_s.at[wg], dob.at[wg], dd_s.at[wg], g_s.at[wg]
            plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
            neg = -sl_ref[h] * LOG2E
            r = _iota((C,), 0, row).astype(f32)
            q_decay = lax.broadcast_in_dim(jnp.exp2((r + 1.0) * neg) * scale, (C, BV), [0])  # scale lam^(i+1)
            lam_c = jnp.exp2(neg * C)
            G = _load(g0_ref.at[b, h, seg, :, vcols], wgmma)

            def step(c, G):
                slot, gb = lax.rem(c, stages), lax.rem(c, 2)
                # G goes to HBM through shared memory and TMA: stored from registers, the walk ran 1.5-1.75x
                # slower (H200, copy 3764 GB/s, benchmarks/RESULTS_mosaic_gpu.md)
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store from g_w[gb] two chunks ago
                g_w.at[gb][...] = G.astype(dtype)
                plgpu.barrier_wait(dob_w.at[slot])
                dd_w[...] = (do_w.at[slot][...].astype(f32) * q_decay).astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(g_w.at[gb], gst_ref.at[h, b * (T // C) + c0 + chunk(c), :, vcols])
                plgpu.barrier_wait(qb.at[slot])

                def update(acc):
                    plgpu.wgmma(acc, _transposed(q_s.at[slot]), dd_w)

                G = pl.run_state(update)(plgpu.ACC.init(lam_c * G))
                plgpu.barrier_arrive(freed.at[slot])
                return G

            G = _walk_loop(NC, step, G)
            gout_ref.at[b, h, seg, :, vcols][...] = G
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == NW)
        def _memory():
            def issue(c, slot):
                rows_ = pl.ds((c0 + chunk(c)) * C, C)
                plgpu.copy_gmem_to_smem(q_ref.at[b, rows_, h], q_s.at[slot], qb.at[slot])
                for w in range(NW):
                    do_block = do_ref.at[b, rows_, h, dv_block(w)]
                    plgpu.copy_gmem_to_smem(do_block, do_s.at[w, slot], dob.at[w, slot])

            _stream(issue, freed, stages, NC)

    def entry(q_ref, do_ref, sl_ref, g0_ref, gst_ref, gout_ref):
        tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = [
            plgpu.SMEM((stages, C, DK), dtype, transforms=tiled),  # q
            plgpu.SMEM((NW, stages, C, BV), dtype, transforms=tiled),  # dO, per compute warpgroup
            plgpu.SMEM((NW, C, BV), dtype, transforms=tiled),  # scale lam^(i+1) dO_i, for the update
            plgpu.SMEM((NW, 2, DK, BV), dtype, transforms=tiled),  # G, two chunks in flight to HBM
        ]
        pl.run_scoped(
            lambda *args: kernel(q_ref, do_ref, sl_ref, g0_ref, gst_ref, gout_ref, args),
            smem,
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=(NW, stages))),
            plgpu.Barrier(num_arrivals=NW, num_barriers=stages),
            collective_axes=_WG,
        )  # fmt: skip

    walk = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((H, B * T // C, DK, DV), dtype),
                  jax.ShapeDtypeStruct((B, H, P, DK, DV), f32)),
        grid=(NV * P, H, B),
        grid_names=(_VS, _HEADS, _BATCH),
        num_threads=NW + 1,
        thread_name=_WG,
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
    return _launch(walk, q, do, slopes, g0)


def _g_walk(opts, blocks, q, do, slopes, dfinal, cu_seqlens, state_dtype):
    """triton._g_walk's results (G of every chunk, d(initial_state)) by the Mosaic G walk, segments as
    the forward's (_plan; Triton's first pass and the scan in JAX give the G entering each)."""
    B, T, H, DK = q.shape
    DV = do.shape[3]
    NW, P = _plan(B, H, DV, T // CHUNK, split_segments=False)
    BK_first, BV_first = _g_first_pass_blocks(B, H, T, DK, DV, blocks)
    entering = triton.segment_entering_gradients(q, do, slopes, dfinal, opts, blocks, BK_first, BV_first, P,
                                                 T // P)
    g0 = entering if P > 1 else entering[:, :, None]
    gstates, g_out = _g_walk_kernel(q, do, slopes, g0, scale=float(opts.scale), P=P, NW=NW)
    return gstates.astype(state_dtype), g_out[:, :, 0]


def _chunk_kernel(q, k, v, do, slopes, states, gstates, *, scale, num_programs, interpret=None):
    """The backward's chunk kernel (triton.py's bwd_chunk_kernel; its maths in the docstring there) over
    every (chunk slot, head) item, at Dk = Dv = 128: dq [B, T, H, 128] (scaled), dk and dv per query head
    [B, T, H, 128] (float32 under GQA, where the caller sums each group) and two row outputs, per item:
    [items, 2, 64] (the slope term's and dq's row sums) and [items, 3, 64] (the slope term's, dk's and
    dv's), which _chunks sums into d(slopes) and the non-finite flags.

    A persistent grid of num_programs CUDA blocks, block p taking items p, p + num_programs, ... (item =
    slot * H + h: the query heads of one kv chunk side by side, sharing k, v in L2). Three warpgroups:
      * memory: TMA copies of each item's q, k, v, dO (two slots each) and S_in, G (one slot each: two
        more 32 KiB slots do not fit), each slot refilled as soon as all its consumers released it, so
        the next item streams in while this one computes;
      * dq: dO v^T, q k^T (for the slope term only) and dO S_in^T in flight together, <S_in, G> beside
        them, b = mask(dO v^T lam^(i-j)), the in-chunk and the queries' slope terms, then b k
        accumulated onto lam^(i+1) dO S_in^T;
      * dk, dv: the transposed scores k q^T and v dO^T as their own dots (no register transposes), v G^T,
        then b^T q onto lam^(C-1-j) v G^T (dk) in flight with k G, the keys' slope term (as
        v . (k G)), and a^T dO onto lam^(C-1-j) k G (dv).
    The slope terms but the keys' sit in the dq warpgroup, which has fewer dots: beside the dk/dv
    warpgroup's dots they made it spill registers, and the kernel ran 1.21-1.27x longer (H200, copy
    3909 GB/s, benchmarks/RESULTS_mosaic_gpu.md, session 9). dq is stored from registers, dk and dv
    (unless float32) through shared memory and TMA. interpret: Pallas's GPU interpret-mode parameters (CPU
    checks only; the dots are emulated there, see below)."""
    pl, plgpu = _plgpu()
    B, T, H, D = q.shape
    HKV = k.shape[2]
    G = H // HKV
    C = CHUNK
    NCS = T // C  # chunks per sequence
    NCT = B * NCS  # chunk slots
    NITEMS = NCT * H
    NP = int(num_programs)
    dtype, f32 = q.dtype, jnp.float32
    kv_dtype = f32 if G > 1 else dtype
    # dk, dv to HBM through one shared-memory buffer and TMA: 0.88-0.92x the chunk kernel storing them
    # from registers (H200, copy 3841 GB/s); under GQA they are float32, and a float32 buffer does not fit
    staged = kv_dtype == dtype
    scale = float(scale)
    wgmma_l = plgpu.Layout.WGMMA
    row_l = plgpu.Layout.WGMMA.reduce(1)

    def layout_cast(x, layout):  # (interpret mode has no layout_cast; layouts mean nothing there)
        return x if interpret is not None else plgpu.layout_cast(x, layout)

    def iota(shape, dim, layout):
        return _iota(shape, dim, layout) if interpret is None else lax.broadcasted_iota(jnp.int32, shape, dim)

    def bcast(row, ncols):  # [C] row vector -> [C, ncols] (WGMMA layout)
        return lax.broadcast_in_dim(row, (C, ncols), [0])

    # Dots. On the GPU: wgmma into plgpu.ACC accumulators, as mosaic_gpu.py (run_scoped for zeroed
    # accumulators, run_state with ACC.init for initialised ones). Pallas's GPU interpret mode (CPU checks
    # only) has no run_state, no stores into accumulators and no transposed wgmma operands, so there the
    # dots are emulated on loaded values (bf16/fp16 operands, float32 accumulation) and are synchronous;
    # everything else (TMA, barriers, the slot protocol, the elementwise maths) runs as written.
    emulate = interpret is not None

    class _Acc:  # an emulated accumulator (interpret mode)
        def __init__(self, value):
            self.value = value

    def mma(acc, a, b, b_t=False):
        """acc += a @ b (b^T with b_t); a: registers (16-bit) or a shared-memory ref; b: a ref."""
        if emulate:
            av = a[...] if type(a).__name__ == "TransformedRef" else a  # the refs passed are all .at[...]
            bv = b[...]
            acc.value = acc.value + jnp.dot(av, bv.T if b_t else bv, preferred_element_type=f32)
            return
        plgpu.wgmma(acc, a, _transposed(b) if b_t else b)

    def zeroed(body, shapes):
        """body(accs, read) on zeroed accumulators of `shapes`; body's result. read(i, wait_n): the value
        of accumulator i once all but wait_n of the wgmma groups issued are done."""
        if emulate:
            accs = [_Acc(jnp.zeros(shape, f32)) for shape in shapes]
            return body(accs, lambda i, wait_n: accs[i].value)

        def run(*accs):
            def read(i, wait_n):
                return accs[i][...] if wait_n == 0 else plgpu.wgmma_accumulator_load(accs[i], wait_n=wait_n)

            return body(accs, read)

        return pl.run_scoped(run, *[plgpu.ACC(shape, f32) for shape in shapes])

    def stateful(body, inits):
        """body(accs, read) on accumulators initialised to `inits`; their final values (all dots done)."""
        if emulate:
            accs = [_Acc(x) for x in inits]
            body(accs, lambda i, wait_n: accs[i].value)
            return tuple(acc.value for acc in accs)

        def run(refs):
            body(refs, lambda i, wait_n: plgpu.wgmma_accumulator_load(refs[i], wait_n=wait_n))

        return pl.run_state(run)(tuple(plgpu.ACC.init(x) for x in inits))

    def decode(n, pid):
        item = pid + n * NP
        cslot = lax.div(item, jnp.int32(H))
        h = lax.rem(item, jnp.int32(H))
        b = lax.div(cslot, jnp.int32(NCS))
        c = lax.rem(cslot, jnp.int32(NCS))
        hk = lax.div(h, jnp.int32(G))
        return item, cslot, h, hk, b, pl.ds(c * C, C)

    def kernel(q_ref, k_ref, v_ref, do_ref, sl_ref, st_ref, gt_ref,
               dq_ref, dk_ref, dv_ref, r0_ref, r1_ref, scoped):
        (q_s, k_s, v_s, o_s, s_s, g_s, r0_s, r1_s, *stage), full, free = scoped
        qF, kF, vF, oF, sF, gF = full
        qE, kE, vE, oE, sE, gE = free
        pid = lax.axis_index(_PROGRAMS)
        wg = lax.axis_index(_WG)
        n_mine = lax.div(jnp.int32(NITEMS) - pid + jnp.int32(NP - 1), jnp.int32(NP))

        def consts(h):
            neg = -sl_ref[h] * LOG2E  # log2(lam)
            rows = iota((C, C), 0, wgmma_l)
            cols = iota((C, C), 1, wgmma_l)
            r = iota((C,), 0, row_l).astype(f32)
            return neg, rows, cols, r

        def at_step(n):
            """Step n of this program: its item's indices, its slots (q, k, v, dO; S_in, G; row buffer)
            and the decay constants of its head."""
            item, cslot, h, hk, b, rows_ = decode(n, pid)
            slots = (lax.rem(n, jnp.int32(CHUNK_SLOTS)), lax.rem(n, jnp.int32(STATE_SLOTS)),
                     lax.rem(n, jnp.int32(2)))
            return (item, cslot, h, hk, b, rows_), slots, consts(h)

        # ------------------------------------------------------------------ wg 0: dq
        @pl.when(wg == 0)
        def _dq():
            plgpu.set_max_registers(CHUNK_REGISTERS[0], action="increase")

            def step(n, carry):
                (item, cslot, h, hk, b, rows_), (s, ss, buf), (neg, rows, cols, r) = at_step(n)
                causal = rows >= cols  # [i, j]
                intra = jnp.exp2(jnp.where(causal, (rows - cols).astype(f32) * neg, -jnp.inf))
                q_decay = jnp.exp2((r + 1.0) * neg)  # lam^(i+1)
                w0 = (scale * (r + 1.0)) * q_decay

                plgpu.barrier_wait(oF.at[s])
                plgpu.barrier_wait(vF.at[s])
                plgpu.barrier_wait(qF.at[s])
                plgpu.barrier_wait(kF.at[s])
                plgpu.barrier_wait(sF.at[ss])

                def scores(accs, read):
                    mma(accs[0], o_s.at[s], v_s.at[s], b_t=True)  # dO v^T [i, j]
                    mma(accs[2], q_s.at[s], k_s.at[s], b_t=True)  # q k^T [i, j], for the slope term only
                    mma(accs[1], o_s.at[s], s_s.at[ss], b_t=True)  # dO S_in^T [i, Dk]
                    # <S_in, G> while they run, in two halves of 64 rows. The slope terms are summed here,
                    # not in the dk/dv warpgroup, which has most of the dots and spilled registers with them
                    # there; S_in then also has this warpgroup as its only consumer and is released early.
                    plgpu.barrier_wait(gF.at[ss])
                    sg = None
                    for half in range(2):
                        part = pl.ds(half * C, C)
                        sv = s_s.at[ss, part][...].astype(f32)
                        gv = g_s.at[ss, part][...].astype(f32)
                        t = (sv * gv).sum(axis=1)
                        sg = t if sg is None else sg + t
                    dov = read(0, 2)  # q k^T and dO S_in^T may still run
                    bm = jnp.where(causal, dov * intra, 0.0).astype(dtype)
                    # the pairs within the chunk: scale sum_j (i-j) lam^(i-j) (q_i . k_j)(dO_i . v_j). A
                    # non-finite dO v^T entry j > i reaches this row's sum through 0 * NaN; its dO_i or v_j
                    # then also makes dq_i or dk_j non-finite, so the item is flagged and recomputed by
                    # Triton's kernel (_chunks), which applies the rule. Forms that apply it here ran longer
                    # (H200, b4-t8k / b2-t16k): dO v^T selected too, 1.09x / 1.08x (bit-identical outputs,
                    # copy 3798 GB/s); the product selected, 1.16x / 1.15x (copy 3879 GB/s,
                    # benchmarks/results/h200_lightning_mosaic_dev_session11_2026-12-02.json), and with the
                    # lag array computed once at the top of the step as well, 1.17x / 1.15x (copy 3840 GB/s,
                    # benchmarks/results/h200_lightning_mosaic_chunk_kernel_review_mend_2026-12-02.json)
                    a_m = jnp.where(causal, read(2, 1) * intra, 0.0)
                    ds_pairs = scale * ((rows - cols).astype(f32) * a_m * dov).sum(axis=1)
                    return bm, read(1, 0), sg, ds_pairs

                bm, inter, sg_row, ds_pairs = zeroed(scores, [(C, C), (C, D), (C, C)])
                plgpu.barrier_arrive(vE.at[s])
                plgpu.barrier_arrive(sE.at[ss])
                plgpu.barrier_arrive(gE.at[ss])
                # queries from S_in: scale sum_i (i+1) q_i . [lam^(i+1) dO_i S_in^T]; the chunk's
                # l lam^l <S_in, G>; the pairs within it
                qv = q_s.at[s][...].astype(f32)
                ds_row = w0 * (qv * inter).sum(axis=1) + (C * jnp.exp2(neg * C)) * sg_row + ds_pairs

                def dq_dot(accs, read):
                    mma(accs[0], bm, k_s.at[s])  # + b k

                (dq,) = stateful(dq_dot, [bcast(q_decay, D) * inter])
                plgpu.barrier_arrive(kE.at[s])
                plgpu.barrier_arrive(qE.at[s])
                plgpu.barrier_arrive(oE.at[s])
                dq_out = (dq * scale).astype(dtype)
                dq_ref.at[b, rows_, h][...] = dq_out
                chk = dq_out.astype(f32).sum(axis=1)
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # this buffer's copy two items ago
                r0_s.at[buf, 0][...] = ds_row
                r0_s.at[buf, 1][...] = chk
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(r0_s.at[buf], r0_ref.at[item])
                return carry

            lax.fori_loop(0, n_mine, step, jnp.int32(0))
            plgpu.wait_smem_to_gmem(0)

        # ------------------------------------------------------------------ wg 1: dk, dv
        @pl.when(wg == 1)
        def _dkdv():
            plgpu.set_max_registers(CHUNK_REGISTERS[1], action="increase")

            def step(n, carry):
                (item, cslot, h, hk, b, rows_), (s, ss, buf), (neg, rows, cols, r) = at_step(n)
                causal_t = cols >= rows  # [j, i]: i >= j
                intra_t = jnp.exp2(jnp.where(causal_t, (cols - rows).astype(f32) * neg, -jnp.inf))
                key_exp = (C - 1.0) - r
                key_decay = jnp.exp2(key_exp * neg)  # lam^(l-1-j), l = C

                plgpu.barrier_wait(kF.at[s])
                plgpu.barrier_wait(qF.at[s])
                plgpu.barrier_wait(vF.at[s])
                plgpu.barrier_wait(oF.at[s])

                def scores(accs, read):
                    mma(accs[0], k_s.at[s], q_s.at[s], b_t=True)  # k q^T  [j, i]
                    mma(accs[1], v_s.at[s], o_s.at[s], b_t=True)  # v dO^T [j, i]
                    a_raw = read(0, 1)
                    # a^T (selected, never multiplied)
                    a_s = (jnp.where(causal_t, a_raw * intra_t, 0.0) * scale).astype(dtype)
                    dov_t = read(1, 0)
                    b_s = (jnp.where(causal_t, dov_t * intra_t, 0.0) * scale).astype(dtype)
                    return a_s, b_s

                a_s, b_s = zeroed(scores, [(C, C), (C, C)])
                plgpu.barrier_wait(gF.at[ss])

                def dk_inter_dot(accs, read):
                    mma(accs[0], v_s.at[s], g_s.at[ss], b_t=True)  # v G^T [j, Dk]
                    return read(0, 0)

                dki = bcast(key_decay, D) * zeroed(dk_inter_dot, [(C, D)])  # lam^(l-1-j) v_j G^T
                # this buffer's copy two items ago (and, staging, the last item's dv store) has read it
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)

                def dk_dots(accs, read):
                    dk_acc, dvr_acc = accs
                    mma(dk_acc, b_s, q_s.at[s])  # + scale b^T q
                    mma(dvr_acc, k_s.at[s], g_s.at[ss])  # k G [j, Dv]
                    dk = read(0, 1)  # k G may still run
                    dk_out = dk.astype(kv_dtype)
                    if staged:  # (the dv store of the last item has read the buffer: waited above)
                        stage[0][...] = dk_out
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(stage[0], dk_ref.at[b, rows_, h])
                    else:
                        dk_ref.at[b, rows_, h][...] = dk_out
                    r1_s.at[buf, 1][...] = dk_out.astype(f32).sum(axis=1)

                zeros = layout_cast(jnp.zeros((C, D), f32), wgmma_l)
                _, dvr = stateful(dk_dots, [dki, zeros])
                # the keys' slope term sum_j (l-1-j) lam^(l-1-j) k_j . (v_j G^T), as v_j . (k_j G): here, with
                # dk stored, fewer registers are live than beside v G^T
                vv = v_s.at[s][...].astype(f32)
                r1_s.at[buf, 0][...] = (key_exp * key_decay) * (vv * dvr).sum(axis=1)
                plgpu.barrier_arrive(gE.at[ss])
                plgpu.barrier_arrive(kE.at[s])
                plgpu.barrier_arrive(vE.at[s])
                plgpu.barrier_arrive(qE.at[s])

                def dv_dot(accs, read):
                    mma(accs[0], a_s, o_s.at[s])  # + scale a^T dO

                (dv,) = stateful(dv_dot, [bcast(key_decay, D) * dvr])
                plgpu.barrier_arrive(oE.at[s])
                dv_out = dv.astype(kv_dtype)
                if staged:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # dk's store has read the buffer
                    stage[0][...] = dv_out
                else:
                    dv_ref.at[b, rows_, h][...] = dv_out
                r1_s.at[buf, 2][...] = dv_out.astype(f32).sum(axis=1)
                plgpu.commit_smem()
                if staged:
                    plgpu.copy_smem_to_gmem(stage[0], dv_ref.at[b, rows_, h])
                plgpu.copy_smem_to_gmem(r1_s.at[buf], r1_ref.at[item])
                return carry

            lax.fori_loop(0, n_mine, step, jnp.int32(0))
            plgpu.wait_smem_to_gmem(0)

        # ------------------------------------------------------------------ wg 2: memory
        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def step(n, carry):
                item, cslot, h, hk, b, rows_ = decode(n, pid)
                s = lax.rem(n, jnp.int32(CHUNK_SLOTS))
                ss = lax.rem(n, jnp.int32(STATE_SLOTS))
                for src, dst, fb, eb in ((q_ref.at[b, rows_, h], q_s, qF, qE),
                                         (k_ref.at[b, rows_, hk], k_s, kF, kE),
                                         (v_ref.at[b, rows_, hk], v_s, vF, vE),
                                         (do_ref.at[b, rows_, h], o_s, oF, oE)):

                    @pl.when(n >= CHUNK_SLOTS)
                    def _wait(eb=eb):
                        plgpu.barrier_wait(eb.at[s])

                    plgpu.copy_gmem_to_smem(src, dst.at[s], fb.at[s])
                for src, dst, fb, eb in ((st_ref.at[h, cslot], s_s, sF, sE),
                                         (gt_ref.at[h, cslot], g_s, gF, gE)):

                    @pl.when(n >= STATE_SLOTS)
                    def _wait(eb=eb):
                        plgpu.barrier_wait(eb.at[ss])

                    plgpu.copy_gmem_to_smem(src, dst.at[ss], fb.at[ss])
                return carry

            lax.fori_loop(0, n_mine, step, jnp.int32(0))

            # Observe the last releases too (they free nothing; Pallas's interpret mode insists that every
            # phase of a barrier a thread waits on is observed by it; on the GPU this costs the idle tail).
            def drain(n, carry, slots, barriers):
                slot = lax.rem(n, jnp.int32(slots))
                for eb in barriers:
                    plgpu.barrier_wait(eb.at[slot])
                return carry

            for slots, barriers in ((CHUNK_SLOTS, (qE, kE, vE, oE)), (STATE_SLOTS, (sE, gE))):
                lax.fori_loop(jnp.maximum(n_mine - slots, 0), n_mine,
                              lambda n, c, slots=slots, barriers=barriers: drain(n, c, slots, barriers),
                              jnp.int32(0))

    def entry(*refs):
        tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = [
            plgpu.SMEM((CHUNK_SLOTS, C, D), dtype, transforms=tiled),  # q
            plgpu.SMEM((CHUNK_SLOTS, C, D), dtype, transforms=tiled),  # k
            plgpu.SMEM((CHUNK_SLOTS, C, D), dtype, transforms=tiled),  # v
            plgpu.SMEM((CHUNK_SLOTS, C, D), dtype, transforms=tiled),  # dO
            plgpu.SMEM((STATE_SLOTS, D, D), dtype, transforms=tiled),  # S_in
            plgpu.SMEM((STATE_SLOTS, D, D), dtype, transforms=tiled),  # G
            plgpu.SMEM((2, 2, C), f32),  # wg 0 rows: slope, dq check (two items in flight)
            plgpu.SMEM((2, 3, C), f32),  # wg 1 rows: slope, dk check, dv check
        ] + ([plgpu.SMEM((C, D), dtype, transforms=tiled)] if staged else [])  # dk, then dv, to HBM
        full = tuple(plgpu.Barrier(num_barriers=CHUNK_SLOTS) for _ in range(4)) + (
            plgpu.Barrier(num_barriers=STATE_SLOTS), plgpu.Barrier(num_barriers=STATE_SLOTS))
        free = tuple(plgpu.Barrier(num_arrivals=2, num_barriers=CHUNK_SLOTS) for _ in range(4)) + (
            plgpu.Barrier(num_arrivals=1, num_barriers=STATE_SLOTS),  # S_in: wg 0 only (dO S_in^T, <S_in, G>)
            plgpu.Barrier(num_arrivals=2, num_barriers=STATE_SLOTS))  # G: wg 0 (<S_in, G>) and wg 1
        pl.run_scoped(lambda *args: kernel(*refs, args), smem, full, free, collective_axes=_WG)

    out_type = (
        jax.ShapeDtypeStruct((B, T, H, D), dtype),  # dq
        jax.ShapeDtypeStruct((B, T, H, D), kv_dtype),  # dk per query head
        jax.ShapeDtypeStruct((B, T, H, D), kv_dtype),  # dv per query head
        jax.ShapeDtypeStruct((NITEMS, 2, C), f32),  # wg 0 rows
        jax.ShapeDtypeStruct((NITEMS, 3, C), f32),  # wg 1 rows
    )
    launch = plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(NP,),
        grid_names=(_PROGRAMS,),
        num_threads=3,
        thread_name=_WG,
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({} if interpret is None else {"interpret": interpret}),
    )
    return _launch(launch, q, k, v, do, slopes, states, gstates)


def _chunks(opts, blocks, q, k, v, do, slopes, states, gstates, cu_seqlens):
    """triton._chunks's results by the Mosaic chunk kernel (Dk = Dv = 128, states in the input dtype),
    then the items whose outputs are not all finite recomputed exactly by Triton's chunk kernel in place:
    the Mosaic kernel computes the plain products, where a non-finite entry also reaches the outputs
    the non-finite rule keeps it from (the flags find every such item: each of them has a non-finite
    output)."""
    B, T, H, D = q.shape
    nct = B * T // CHUNK
    NP = min(_num_sms(), nct * H)
    dq, dk, dv, r0, r1 = _chunk_kernel(q, k, v, do, slopes, states, gstates, scale=float(opts.scale),
                                       num_programs=NP)
    dslope_part = -(r0[:, 0].sum(-1) + r1[:, 0].sum(-1))  # [slot * H + h]
    flags = jnp.any(~jnp.isfinite(r0[:, 1]), -1) | jnp.any(~jnp.isfinite(r1[:, 1:]), (-2, -1))
    outputs = (dq.reshape(1, B * T, H, D), dk.reshape(1, B * T, H, D), dv.reshape(B * T, H, D),
               dslope_part)  # [slot * H + h], as Triton's
    return triton.chunks_where_flagged(flags.astype(jnp.float32).reshape(nct, H), outputs, opts, q, k, v, do,
                                       slopes, states, gstates)


def _forward(q, k, v, slopes, s0, scale, store_states=False):
    """o [B, T, H, Dv], the final state [B, H, Dk, Dv] and, storing states, S_in of every chunk
    [H, B * T // C, Dk, Dv] in the input dtype (else None): segment scan, Mosaic walk, exact relaunch."""
    B, T, H, DK = q.shape
    DV = v.shape[3]
    # (storing S_in, the split walk did not gain: the two-block plan's walk reads q, k once, and its plan
    # is the one local_state(differentiated=True) takes)
    NW, P = _plan(B, H, DV, T // CHUNK, split_segments=SPLIT_SEGMENTS and not store_states)
    if P > 1:  # Triton's segment scan (its states-only first pass reads k, v once)
        blocks, BV_first = _first_pass_blocks(DK, DV, q.dtype)
        s0_walk = triton.segment_incoming(k, v, slopes, s0, False, blocks, P, T // P, BV_first)
    else:
        s0_walk = None if s0 is None else s0[:, :, None]
    o, states, chunk_states = _walk(q, k, v, slopes, s0_walk, scale=scale, P=P, NW=NW,
                                    store_states=store_states)
    # Only o needs the relaunch: the state update has no mask, so a non-finite k or v reaches the same
    # entries of every later state (and of S_in of every later chunk) here as in the Triton walk.
    flags = jnp.any(~jnp.isfinite(states), axis=(2, 3, 4)).astype(jnp.float32).reshape(B * H)
    o = triton.forward_where_flagged(flags, o, q, k, v, slopes, s0, scale=scale)
    return o, states[:, :, -1], (chunk_states if store_states else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _lightning(q, k, v, slopes, initial_state, cu_seqlens, opts):
    o, final, _ = _forward(q, k, v, slopes, initial_state, opts.scale)
    return o, final


def _lightning_fwd(q, k, v, slopes, initial_state, cu_seqlens, opts):
    # Under differentiation the walk also stores S_in of every chunk, as triton._lightning_fwd does, for
    # the Triton backend's chunk-parallel backward. Triton keeps them in the input dtype only for bf16
    # (float32 for fp16, which could overflow): fp16 takes Triton's forward here.
    if not _mosaic_training_forward(q.shape[3], v.shape[3], q.dtype):
        return triton._lightning_fwd(q, k, v, slopes, initial_state, cu_seqlens, opts)
    o, final, states = _forward(q, k, v, slopes, initial_state, opts.scale, store_states=True)
    return (o, final), (q, k, v, slopes, initial_state, cu_seqlens, states)


def _lightning_bwd(opts, residuals, cotangents):
    # Triton's chunk-parallel backward with the Mosaic G walk and, at Dv = 128, the Mosaic chunk kernel,
    # where the chunk states are in the input dtype (bf16: the Mosaic forward stored them); else Triton's.
    q, v = residuals[0], residuals[2]
    if not _mosaic_backward(q.dtype):
        return triton._lightning_bwd(opts, residuals, cotangents)
    chunks = _chunks if v.shape[3] == q.shape[3] == 128 else None
    return triton._lightning_bwd(opts, residuals, cotangents, g_walk=_g_walk, chunks=chunks)


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def lightning_attention(q, k, v, slopes, initial_state=None, cu_seqlens=None, *, scale, reverse=False):
    """Mosaic GPU lightning attention (forward; gradients by the Triton backend); see reference.py.

    Raises NotImplementedError where it does not serve (see the module docstring).
    """
    _check_supported(q, k, v, cu_seqlens, reverse)
    triton._check_supported(q, k, v)  # the first pass, the exact relaunch and the gradients are Triton's
    opts = triton.Options(scale=float(scale), reverse=False)
    # Replicated slopes / initial states vary like q inside shard_map; autodiff of this cast psums their
    # per-shard gradients (see varying.py), as in triton.py.
    slopes = match_varying(slopes.astype(jnp.float32), q)
    if initial_state is not None:
        initial_state = match_varying(initial_state.astype(jnp.float32), q)
    return _lightning(q, k, v, slopes, initial_state, None, opts)


# ------------------------------------------------------------------ sequence parallelism (reference.py)
# A sequence shard (shardattn.sharded.sequence_shard) takes its local state, and in its backward its G,
# from these, then runs this backend from S_in. Where this backend's walks run segmented, these use the
# very launches of the walks' first passes (Triton's, with the segments of _plan), which XLA then computes
# once (CSE); Triton's own local_state / state_gradient cut segments as Triton's walks do, and without
# these a Mosaic sequence shard read k, v (and q, dO) once more. Where the walks run unsegmented, and for
# fp16's gradients (Triton's backward; and under differentiation Triton's forward), they are Triton's.
# The forward's plan differs under differentiation (_forward: the storing walk takes two blocks per
# program where the plain one is split), so local_state is told which forward it shares a pass with.


def local_state(k, v, slopes, *, reverse=False, differentiated=False):
    """sum_j lam^(T-1-p_j) k_j^T v_j per query head from zero: [B, H, Dk, Dv] float32 (reference.py).
    differentiated: the shard's forward is differentiated (the walk then stores S_in, with its own plan).
    Raises NotImplementedError where this backend's forward does not serve (then Triton's serves)."""
    _check_supported(k, k, v, None, reverse)
    triton._check_supported(k, k, v)
    B, T, _, DK = k.shape
    H, DV = slopes.shape[0], v.shape[3]
    if differentiated and not _mosaic_training_forward(DK, DV, k.dtype):  # Triton's forward runs then
        return triton.local_state(k, v, slopes)
    _, P = _plan(B, H, DV, T // CHUNK, split_segments=SPLIT_SEGMENTS and not differentiated)
    if P == 1:
        return triton.local_state(k, v, slopes)
    blocks, BV_first = _first_pass_blocks(DK, DV, k.dtype)
    TSEG = T // P
    s_seg = triton._segment_states(k, v, jnp.asarray(slopes, jnp.float32), False, blocks, P, TSEG, BV_first)
    after = [T - (s + 1) * TSEG for s in range(P)]  # tokens processed after segment s
    return jnp.sum(triton._segment_weights(slopes, after) * s_seg, axis=2)


def state_gradient(q, do, slopes, *, scale, reverse=False):
    """scale * sum_i lam^(p_i+1) q_i^T dO_i per head: [B, H, Dk, Dv] float32 (reference.py). Raises
    NotImplementedError where this backend's forward does not serve (then Triton's serves)."""
    do = do.astype(q.dtype)
    _check_supported(q, q, do, None, reverse)
    triton._check_supported(q, q, do)
    B, T, H, DK = q.shape
    DV = do.shape[3]
    _, P = _plan(B, H, DV, T // CHUNK, split_segments=False)  # the G walk's
    if P == 1 or not _mosaic_backward(q.dtype):  # fp16: Triton's backward
        return triton.state_gradient(q, do, slopes, scale=scale)
    blocks = triton.BlockSizes.get_default(DK, DV, q.dtype)
    BK_first, BV_first = _g_first_pass_blocks(B, H, T, DK, DV, blocks)
    TSEG = T // P
    g_seg = triton._segment_gradients(q, do, jnp.asarray(slopes, jnp.float32), float(scale), False, blocks,
                                      BK_first, BV_first, P, TSEG)
    before = [s * TSEG for s in range(P)]  # tokens processed before segment s
    return jnp.sum(triton._segment_weights(slopes, before) * g_seg, axis=2)


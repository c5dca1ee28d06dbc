"""The differentiable `attention` of a backend that owns its kernels, built from its two halves.

The contract (reference.py) gives such a backend `forward` (values only) and `backward` (gradients from
a GIVEN o and lse, which a ring passes merged). `differentiable(forward, backward)` is the custom_vjp
that joins them, shared by xla.py and triton.py so that the two cannot drift: residuals q, k, v, bias,
sinks, the integer inputs, o and lse (O(T * D) memory); options and block sizes static.
"""

import functools

import jax

from shardattn.kernels.lightning.varying import match_varying


def _keywords(bias, sinks, ints, dropout_rng):
    q_seg, kv_seg, q_pos, kv_pos, offsets = ints
    return dict(
        bias=bias,
        sinks=sinks,
        q_segment_ids=q_seg,
        kv_segment_ids=kv_seg,
        q_positions=q_pos,
        kv_positions=kv_pos,
        dropout_rng=dropout_rng,
        dropout_offsets=offsets,
    )


def differentiable(forward, backward):
    """attention(q, k, v, *, bias, sinks, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
    dropout_rng, dropout_offsets, options, block_sizes) -> (o, lse), differentiable in q, k, v, bias and
    sinks with lse's cotangent honoured, from the halves

        forward(q, k, v, **keywords, options=..., block_sizes=...) -> (o, lse)
        backward(q, k, v, o, lse, do, dlse, **keywords, options=..., block_sizes=...)
            -> (dq, dk, dv, dbias, dsinks)

    >>> attention = differentiable(forward, backward)  # once, at module level
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
    def call(options, block_sizes, q, k, v, bias, sinks, ints, dropout_rng):
        keywords = _keywords(bias, sinks, ints, dropout_rng)
        return forward(q, k, v, **keywords, options=options, block_sizes=block_sizes)

    def call_fwd(options, block_sizes, q, k, v, bias, sinks, ints, dropout_rng):
        o, lse = call(options, block_sizes, q, k, v, bias, sinks, ints, dropout_rng)
        return (o, lse), (q, k, v, bias, sinks, ints, dropout_rng, o, lse)

    def call_bwd(options, block_sizes, residuals, cotangents):
        q, k, v, bias, sinks, ints, dropout_rng, o, lse = residuals
        do, dlse = cotangents
        dq, dk, dv, dbias, dsinks = backward(
            q, k, v, o, lse, do.astype(q.dtype), dlse, **_keywords(bias, sinks, ints, dropout_rng),
            options=options, block_sizes=block_sizes,
        )  # fmt: skip
        no_grad = jax.tree.map(lambda _: None, ints)  # integer inputs and the rng have no cotangent
        return dq, dk, dv, dbias, dsinks, no_grad, None

    call.defvjp(call_fwd, call_bwd)

    def attention(q, k, v, *, bias, sinks, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                  dropout_rng, dropout_offsets, options, block_sizes):  # fmt: skip
        # Inside shard_map, a replicated input (sinks, a shared bias) gets a per-shard cotangent from the
        # backward: cast it to vary like the rest, so that autodiff of the cast sums those (a psum), and
        # every input varies alike, as the backward's cotangents do. Outside shard_map this is a no-op.
        diff = [x for x in (q, k, v, bias, sinks) if x is not None]
        q, k, v = (match_varying(x, *diff) for x in (q, k, v))
        bias = None if bias is None else match_varying(bias, *diff)
        sinks = None if sinks is None else match_varying(sinks, *diff)
        ints = (q_segment_ids, kv_segment_ids, q_positions, kv_positions, dropout_offsets)
        return call(options, block_sizes, q, k, v, bias, sinks, ints, dropout_rng)

    return attention

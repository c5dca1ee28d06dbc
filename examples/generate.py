#!/usr/bin/env python
"""Generates bytes with a model trained by examples/train_tpu.py: prefill the prompt, then decode.

The hybrid model's two layer kinds keep two kinds of cache:
- lightning layers: one float32 state per sequence, in a slot cache [num_slots, H, D, D], advanced by
  shardattn.lightning_prefill (all prompts packed into one call with cu_seqlens) and then by
  shardattn.lightning_decode, one token per sequence per step (the cache donated: updated in place);
- softmax layers: a key/value cache [B, max_len, Hkv, D] per layer, attended to by shardattn.flash_attention
  with q_positions / kv_positions; entries not yet written get a position after every query, so the causal
  mask hides them (no separate length mask).
Sampling is greedy (`--temperature 0`) or from softmax(logits / temperature), optionally top-k. It prints
the text and the decode rate in tokens per second (the first, compiling step left out).

    python examples/train_tpu.py --mesh none --steps 300 --save /tmp/hybrid     # train, save (orbax)
    python examples/generate.py --checkpoint /tmp/hybrid --prompt "def " --tokens 200 --samples 4
"""

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import train_tpu  # noqa: E402  (puts the checkout on sys.path too)

import shardattn  # noqa: E402
from shardattn.flax import LightningAttention, rotary  # noqa: E402

# Position of cache entries not written yet: after every query, so that causal attention skips them.
UNWRITTEN = 2**30


# --------------------------------------------------------------------------------------------------
# Checkpoints (written by train_tpu.py --save)


def load_checkpoint(path):
    """(Config, model) from a directory written by train_tpu.save_checkpoint (orbax, config.json)."""
    path = pathlib.Path(path).resolve()
    fields = json.loads((path / "config.json").read_text())
    if fields.get("implementation") is not None:
        fields["implementation"] = tuple(fields["implementation"])
    cfg = train_tpu.Config(**fields)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: train_tpu.HybridLM(cfg, rngs=nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    import orbax.checkpoint as ocp

    params = ocp.StandardCheckpointer().restore(path / "params", abstract)
    return cfg, nnx.merge(graphdef, params)


# --------------------------------------------------------------------------------------------------
# The model, step by step, with caches. Mirrors train_tpu.HybridLM / Block and shardattn.flax's layers.


def init_caches(model, batch: int, max_len: int):
    """One cache per layer: lightning [batch, H, D, D] float32 states (slot b = sequence b), softmax
    (k, v) [batch, max_len, Hkv, D] in the compute dtype."""
    caches = []
    for block in model.blocks:
        attn = block.attn
        if isinstance(attn, LightningAttention):
            caches.append(jnp.zeros((batch, attn.num_heads, attn.head_dim, attn.head_dim), jnp.float32))
        else:
            dtype = attn.k_proj.dtype or jnp.float32
            shape = (batch, max_len, attn.num_kv_heads, attn.head_dim)
            caches.append((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
    return caches


def _lightning(attn, x, cache, slot_idx, cu_seqlens):
    """x [B, T, d_model] -> ([B, T, d_model], cache). T > 1: packed prefill of the B rows; T == 1: decode."""
    B, T, _ = x.shape
    heads = lambda y, h: y.reshape(B, T, h, attn.head_dim)
    q = heads(jax.nn.silu(attn.q_proj(x)), attn.num_heads)
    k = heads(jax.nn.silu(attn.k_proj(x)), attn.num_kv_heads)
    v = heads(jax.nn.silu(attn.v_proj(x)), attn.num_kv_heads)
    kwargs = dict(layer_idx=attn.layer_idx, num_layers=attn.num_layers, decay=attn.decay, scale=attn.scale,
                  implementation=attn.implementation)  # fmt: skip
    if T == 1:
        o, cache = shardattn.lightning_decode(q[:, 0], k[:, 0], v[:, 0], cache, slot_idx, **kwargs)
    else:  # the B prompts packed into one sequence of B * T tokens, request b continuing slot b
        pack = lambda y: y.reshape(1, B * T, *y.shape[2:])
        o, cache = shardattn.lightning_prefill(
            pack(q), pack(k), pack(v), cache, slot_idx, cu_seqlens, **kwargs
        )
    o = attn.norm(o.reshape(B, T, attn.num_heads * attn.head_dim))
    return attn.out_proj(o * jax.nn.sigmoid(attn.gate_proj(x))), cache


def _softmax(attn, x, cache, start):
    """x [B, T, d_model] at positions start .. start + T - 1 -> ([B, T, d_model], cache)."""
    B, T, _ = x.shape
    k_cache, v_cache = cache
    positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    q = attn.q_proj(x).reshape(B, T, attn.num_heads, attn.head_dim)
    k = attn.k_proj(x).reshape(B, T, attn.num_kv_heads, attn.head_dim)
    v = attn.v_proj(x).reshape(B, T, attn.num_kv_heads, attn.head_dim)
    if attn.rope_base is not None:
        q, k = rotary(q, positions, attn.rope_base), rotary(k, positions, attn.rope_base)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, axis=1)
    slots = jnp.arange(k_cache.shape[1], dtype=jnp.int32)
    kv_positions = jnp.broadcast_to(jnp.where(slots < start + T, slots, UNWRITTEN), (B, slots.shape[0]))
    o = shardattn.flash_attention(
        q, k_cache, v_cache, q_positions=positions, kv_positions=kv_positions,
        sinks=None if attn.sinks is None else attn.sinks[...], **attn.attention_kwargs,
    )  # fmt: skip
    return attn.out_proj(o.reshape(B, T, attn.num_heads * attn.head_dim)), (k_cache, v_cache)


def forward_cached(model, tokens, caches, start):
    """tokens int32 [B, T] at positions start .. start + T - 1 (every row) -> (logits [B, T, 256] float32,
    caches). T > 1 is a prefill (start 0), T == 1 a decode step."""
    B, T = tokens.shape
    slot_idx = jnp.arange(B, dtype=jnp.int32)
    cu_seqlens = jnp.arange(B + 1, dtype=jnp.int32) * T
    x = model.embed(tokens)
    new_caches = []
    for block, cache in zip(model.blocks, caches, strict=True):
        h = block.attn_norm(x)
        if isinstance(block.attn, LightningAttention):
            a, cache = _lightning(block.attn, h, cache, slot_idx, cu_seqlens)
        else:
            a, cache = _softmax(block.attn, h, cache, start)
        x = x + a
        x = x + block.mlp(block.mlp_norm(x))
        new_caches.append(cache)
    return model.head(model.norm(x)).astype(jnp.float32), new_caches


def make_step(graphdef):
    """jitted step(params, tokens, caches, start) -> (logits, caches), the caches donated."""

    def step(params, tokens, caches, start):
        return forward_cached(nnx.merge(graphdef, params), tokens, caches, start)

    return jax.jit(step, donate_argnums=2)


def sample(logits, key, temperature: float, top_k: int):
    """Next tokens [B] from logits [B, 256]: argmax when temperature is 0."""
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def generate(model, prompt: bytes, num_tokens: int, *, samples=1, temperature=0.0, top_k=0, seed=0):
    """(tokens int32 [samples, len(prompt) + num_tokens], decode tokens/s over all samples)."""
    graphdef, params = nnx.split(model)
    step = make_step(graphdef)
    P = len(prompt)
    tokens = jnp.asarray(np.frombuffer(prompt, np.uint8).astype(np.int32))[None].repeat(samples, axis=0)
    caches = init_caches(model, samples, P + num_tokens)
    logits, caches = step(params, tokens, caches, jnp.int32(0))
    key = jax.random.PRNGKey(seed)
    out = [tokens]
    t0, timed = None, 0
    for i in range(num_tokens):
        key, sub = jax.random.split(key)
        nxt = sample(logits[:, -1], sub, temperature, top_k)[:, None]
        out.append(nxt)
        if i == num_tokens - 1:
            break
        logits, caches = step(params, nxt, caches, jnp.int32(P + i))
        if i == 0:  # the first decode step compiles: time the rest
            logits.block_until_ready()
            t0 = time.perf_counter()
        else:
            timed += 1
    jax.block_until_ready(out[-1])
    rate = timed * samples / (time.perf_counter() - t0) if timed else float("nan")
    return jnp.concatenate(out, axis=1), rate


def main(argv=None):
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    add = parser.add_argument
    add("--checkpoint", required=True, help="directory written by train_tpu.py --save")
    add("--prompt", default="def ", help="text to continue (bytes, UTF-8)")
    add("--tokens", type=int, default=200, help="bytes to generate")
    add("--samples", type=int, default=1, help="sequences decoded together (one cache slot each)")
    add("--temperature", type=float, default=0.0, help="0: greedy")
    add("--top-k", type=int, default=0, help="sample among the k most likely bytes (0: all)")
    add("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    prompt = args.prompt.encode()
    if not prompt:
        parser.error("--prompt must not be empty")
    cfg, model = load_checkpoint(args.checkpoint)
    kinds = "".join("S" if cfg.is_softmax(i) else "L" for i in range(cfg.layers))
    print(f"model: layers {kinds}, d_model {cfg.d_model}, heads {cfg.heads}, {cfg.dtype}; "
          f"{jax.devices()[0].platform}", flush=True)  # fmt: skip
    tokens, rate = generate(model, prompt, args.tokens, samples=args.samples, temperature=args.temperature,
                            top_k=args.top_k, seed=args.seed)  # fmt: skip
    for row in np.asarray(tokens):
        print("-" * 60)
        print(bytes(row.astype(np.uint8).tolist()).decode("utf-8", errors="replace"))
    print("-" * 60)
    print(
        f"decode: {rate:,.1f} tokens/s ({args.samples} sample(s) x {args.tokens} tokens; first step excluded)"
    )
    return tokens


if __name__ == "__main__":
    main()

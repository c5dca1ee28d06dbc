"""Flax NNX layer: MiniMax-01's lightning attention block around shardattn (needs the `flax` extra).

    pip install "shardattn[flax]"
    from shardattn.flax import LightningAttention

Importing `shardattn` alone never imports flax; only this submodule does.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shardattn.attention import flash_attention
from shardattn.decay import decay_slopes
from shardattn.lightning import lightning_attention
from shardattn.sharded import sharded_lightning


class LightningAttention(nnx.Module):
    """Lightning attention block as in MiniMax-01: x [B, T, d_model] -> [B, T, d_model].

    q, k, v = silu(x W_q), silu(x W_k), silu(x W_v)      per head [B, T, H, head_dim]
    o       = lightning_attention(q, k, v)                 decay preset of (layer_idx, num_layers)
    out     = (RMSNorm(o) * sigmoid(x W_gate)) W_out

    MiniMax-01 activates q/k/v with SiLU and uses scale 1.0 (so `scale` defaults to 1.0 for the
    "minimax" decay and to head_dim ** -0.5 otherwise); with no softmax denominator, the output
    RMSNorm is what keeps the activations at a stable size, and the gate lets a layer switch heads off.

    With `mesh`, the attention runs as `shardattn.sharded.sharded_lightning` (batch over `batch_axis`,
    tokens over `seq_axis`, heads over `head_axis`; None means the mesh's "data"/"seq"/"heads" axis if it
    has one; `scan` picks the state scan across sequence shards); without, as the single-device
    `lightning_attention`. `implementation` (backend names) is passed through.

    >>> attn = LightningAttention(512, 8, layer_idx=0, num_layers=24, rngs=nnx.Rngs(0))
    >>> y = attn(x)  # x: [B, T, 512]
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        layer_idx: int,
        num_layers: int,
        head_dim: int | None = None,
        num_kv_heads: int | None = None,
        decay: str = "minimax",
        scale: float | None = None,
        mesh: jax.sharding.Mesh | None = None,
        batch_axis: str | None = None,
        seq_axis: str | None = None,
        head_axis: str | None = None,
        scan: str = "auto",
        implementation=None,
        use_bias: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        head_dim = d_model // num_heads if head_dim is None else head_dim
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_dim < 1:
            raise ValueError(f"{head_dim=} must be >= 1 (d_model={d_model} // num_heads={num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads=} must be divisible by {num_kv_heads=}")
        # Fails now, naming the argument, rather than at the first call inside a jitted step.
        decay_slopes(num_heads, layer_idx, num_layers, decay)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx, self.num_layers, self.decay = layer_idx, num_layers, decay
        self.scale = (1.0 if decay == "minimax" else None) if scale is None else scale
        self.mesh, self.batch_axis, self.seq_axis, self.head_axis = mesh, batch_axis, seq_axis, head_axis
        self.scan = scan
        self.implementation = implementation

        def linear(n_in, n_out):
            return nnx.Linear(
                n_in, n_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )

        self.q_proj = linear(d_model, num_heads * head_dim)
        self.k_proj = linear(d_model, num_kv_heads * head_dim)
        self.v_proj = linear(d_model, num_kv_heads * head_dim)
        self.gate_proj = linear(d_model, num_heads * head_dim)
        self.out_proj = linear(num_heads * head_dim, d_model)
        # One RMSNorm over all heads together, as MiniMax-01 does (a per-head norm would avoid the
        # reduction across a head-sharded axis, but would be a different model).
        self.norm = nnx.RMSNorm(num_heads * head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        """x: [B, T, d_model] -> [B, T, d_model]."""
        B, T, _ = x.shape
        q = jax.nn.silu(self.q_proj(x)).reshape(B, T, self.num_heads, self.head_dim)
        k = jax.nn.silu(self.k_proj(x)).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = jax.nn.silu(self.v_proj(x)).reshape(B, T, self.num_kv_heads, self.head_dim)
        kwargs = dict(
            layer_idx=self.layer_idx, num_layers=self.num_layers, decay=self.decay, scale=self.scale,
            implementation=self.implementation,
        )
        if self.mesh is None:
            o = lightning_attention(q, k, v, **kwargs)
        else:
            o = sharded_lightning(
                q, k, v, mesh=self.mesh, batch_axis=self.batch_axis, seq_axis=self.seq_axis,
                head_axis=self.head_axis, scan=self.scan, **kwargs,
            )
        o = self.norm(o.reshape(B, T, self.num_heads * self.head_dim))
        return self.out_proj(o * jax.nn.sigmoid(self.gate_proj(x)))


def rotary(x, positions, base: float = 10000.0):
    """Rotary position embedding (RoPE, Su et al. 2021) of x [B, T, H, D] (D even) at positions [B, T].

    Rotates the pairs (x[..., i], x[..., i + D/2]) by positions * base^(-i / (D/2)), in float32.
    """
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[..., None] * freq  # [B, T, half]
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class SoftmaxAttention(nnx.Module):
    """Softmax attention block with rotary positions: x [B, T, d_model] -> [B, T, d_model].

    q, k, v = x W_q, x W_k, x W_v                     per head [B, T, H or Hkv, head_dim] (GQA: Hkv heads)
    q, k    = rotary(q, positions), rotary(k, positions)       (rope_base=None: no rotary)
    o       = flash_attention(q, k, v, q_positions=positions, kv_positions=positions, ...)
    out     = o W_out

    `positions` [B, T] (or [T]) int32, default arange(T), place the tokens for both the rotary angles and
    the causal/window masks; with packed sequences pass per-sequence positions and `segment_ids` [B, T].
    `sinks=True` adds learnable attention sinks (one logit per head, initialised to 0). `causal`,
    `sliding_window`, `logits_soft_cap`, `scale` and `implementation` are passed through to
    flash_attention; dropout on the probabilities (`dropout_rate`) applies only to calls given a
    `dropout_rng` (leave it out for evaluation).

    `mesh`, `batch_axis`, `seq_axis`, `head_axis` and `strategy` are reserved for the sharded softmax
    attention (ring / all-gather / ulysses) and raise NotImplementedError until it exists; inside a
    jitted step over sharded arrays, mesh=None leaves the partitioning to XLA.

    >>> attn = SoftmaxAttention(512, 8, num_kv_heads=2, sinks=True, rngs=nnx.Rngs(0))
    >>> y = attn(x)  # x: [B, T, 512]
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        num_kv_heads: int | None = None,
        causal: bool = True,
        sliding_window: int | tuple[int, int] | None = None,
        logits_soft_cap: float | None = None,
        sinks: bool = False,
        dropout_rate: float = 0.0,
        scale: float | None = None,
        rope_base: float | None = 10000.0,
        mesh: jax.sharding.Mesh | None = None,
        batch_axis: str | None = None,
        seq_axis: str | None = None,
        head_axis: str | None = None,
        strategy: str = "auto",
        implementation=None,
        use_bias: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        head_dim = d_model // num_heads if head_dim is None else head_dim
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_dim < 1:
            raise ValueError(f"{head_dim=} must be >= 1 (d_model={d_model} // num_heads={num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads=} must be divisible by {num_kv_heads=}")
        if rope_base is not None and head_dim % 2:
            raise ValueError(f"{head_dim=} must be even for rotary positions (or pass rope_base=None)")
        if mesh is not None:
            raise NotImplementedError(
                "SoftmaxAttention(mesh=...) needs the sharded softmax attention, which shardattn does not "
                "have yet; pass mesh=None (XLA then partitions flash_attention inside a jitted step)"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.mesh, self.batch_axis, self.seq_axis, self.head_axis = mesh, batch_axis, seq_axis, head_axis
        self.strategy = strategy
        self.rope_base = rope_base
        self.dropout_rate = dropout_rate
        self.attention_kwargs = dict(
            causal=causal, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, scale=scale,
            implementation=implementation,
        )  # fmt: skip

        def linear(n_in, n_out):
            return nnx.Linear(n_in, n_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.q_proj = linear(d_model, num_heads * head_dim)
        self.k_proj = linear(d_model, num_kv_heads * head_dim)
        self.v_proj = linear(d_model, num_kv_heads * head_dim)
        self.out_proj = linear(num_heads * head_dim, d_model)
        self.sinks = nnx.Param(jnp.zeros((num_heads,), param_dtype)) if sinks else None

    def __call__(self, x, positions=None, *, segment_ids=None, dropout_rng=None):
        """x: [B, T, d_model], positions: [B, T] or [T] int, segment_ids: [B, T] int -> [B, T, d_model]."""
        B, T, _ = x.shape
        # Default positions go to flash_attention as None, so that a backend sees they are the defaults
        # (cudnn's causal mask is by index).
        if positions is None:
            mask_positions = None
            positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
        else:
            positions = mask_positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (B, T))
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        if self.rope_base is not None:
            q, k = rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base)
        rate = self.dropout_rate if dropout_rng is not None else 0.0
        o = flash_attention(
            q, k, v, q_positions=mask_positions, kv_positions=mask_positions, q_segment_ids=segment_ids,
            kv_segment_ids=segment_ids, sinks=None if self.sinks is None else self.sinks[...],
            dropout_rate=rate, dropout_rng=dropout_rng if rate > 0 else None, **self.attention_kwargs,
        )  # fmt: skip
        return self.out_proj(o.reshape(B, T, self.num_heads * self.head_dim))

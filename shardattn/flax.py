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
from shardattn.meshes.specs import check_axes_used, resolve_axes
from shardattn.meshes.zigzag import LAYOUTS
from shardattn.sharded import SCANS, sharded_lightning
from shardattn.sharded_attention import STRATEGIES, sharded_attention

# learnable_decay: slopes = softplus(p), which is >= 0 for every p but reaches 0 only at p = -inf. A
# preset slope of 0 (the "transnormer" preset's head 0, which does not decay) starts at this floor
# instead: over T tokens it scales that head's oldest terms by exp(-1e-6 T) (0.996 at T = 4096).
LEARNABLE_SLOPE_FLOOR = 1e-6


def inverse_softplus(slopes):
    """p with softplus(p) = slopes (float64 numpy, stable for small slopes): log(expm1(s))."""
    s = np.asarray(slopes, np.float64)
    return s + np.log(-np.expm1(-s))


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
    has one; `scan` picks the state scan across sequence shards; `layout="zigzag"`: x arrives in the
    zigzag order of the sequence axis, as for `SoftmaxAttention(layout="zigzag")`, so a hybrid model
    keeps one token order); without, as the single-device `lightning_attention`. `implementation`
    (backend names) is passed through.

    Defaults differ from `lightning_attention`'s: the layer's `decay` is "minimax" with scale 1.0 (the
    function's: "transnormer" with head_dim ** -0.5). `learnable_decay=True` makes the slopes a
    parameter `slope_param` [num_heads] float32, slopes = softplus(slope_param) >= 0 by construction,
    initialised at the preset (a preset slope of 0 starts at LEARNABLE_SLOPE_FLOOR, 1e-6).

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
        layout: str = "contiguous",
        learnable_decay: bool = False,
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
        preset = decay_slopes(num_heads, layer_idx, num_layers, decay)
        if not isinstance(scan, str) or scan not in SCANS:
            raise ValueError(f"scan={scan!r} must be one of {SCANS}")
        if not isinstance(layout, str) or layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
        if not isinstance(learnable_decay, bool):
            raise TypeError(f"learnable_decay must be a bool, got {type(learnable_decay).__name__}")
        if mesh is None:
            given = {n: a for n, a in (("batch_axis", batch_axis), ("seq_axis", seq_axis),
                                        ("head_axis", head_axis)) if a is not None}  # fmt: skip
            if scan != "auto":
                given["scan"] = scan
            if layout != "contiguous":
                given["layout"] = layout
            if given:
                raise ValueError(f"{given} only apply with a mesh (mesh=None runs on one device)")
        else:
            if not isinstance(mesh, jax.sharding.Mesh):
                raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
            # The same rules as sharded_lightning: names must be in the mesh, and an axis that would
            # serve no role while a role was left at its default is an error.
            axes = resolve_axes(mesh, batch_axis, seq_axis, head_axis)
            if None in (batch_axis, seq_axis, head_axis):
                check_axes_used(mesh, axes)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx, self.num_layers, self.decay = layer_idx, num_layers, decay
        self.scale = (1.0 if decay == "minimax" else None) if scale is None else scale
        self.mesh, self.batch_axis, self.seq_axis, self.head_axis = mesh, batch_axis, seq_axis, head_axis
        self.scan, self.layout = scan, layout
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
        # float32 whatever param_dtype is: slopes are small numbers that bf16 would round coarsely.
        self.learnable_decay = learnable_decay
        if learnable_decay:
            raw = inverse_softplus(np.maximum(preset, LEARNABLE_SLOPE_FLOOR))
            self.slope_param = nnx.Param(jnp.asarray(raw, jnp.float32))

    def slopes(self):
        """The decay slopes [num_heads] float32 this layer uses (>= 0)."""
        if self.learnable_decay:
            return jax.nn.softplus(self.slope_param[...])
        return jnp.asarray(decay_slopes(self.num_heads, self.layer_idx, self.num_layers, self.decay))

    def __call__(self, x):
        """x: [B, T, d_model] -> [B, T, d_model]."""
        B, T, _ = x.shape
        q = jax.nn.silu(self.q_proj(x)).reshape(B, T, self.num_heads, self.head_dim)
        k = jax.nn.silu(self.k_proj(x)).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = jax.nn.silu(self.v_proj(x)).reshape(B, T, self.num_kv_heads, self.head_dim)
        if self.learnable_decay:
            kwargs = dict(slopes=self.slopes())
        else:
            kwargs = dict(layer_idx=self.layer_idx, num_layers=self.num_layers, decay=self.decay)
        kwargs.update(scale=self.scale, implementation=self.implementation)
        if self.mesh is None:
            o = lightning_attention(q, k, v, **kwargs)
        else:
            o = sharded_lightning(
                q, k, v, mesh=self.mesh, batch_axis=self.batch_axis, seq_axis=self.seq_axis,
                head_axis=self.head_axis, scan=self.scan, layout=self.layout, **kwargs,
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

    With `mesh`, the attention runs as `shardattn.sharded_attention` (batch over `batch_axis`, tokens over
    `seq_axis`, heads over `head_axis`, as in LightningAttention; `strategy` "auto" | "ring" | "allgather" |
    "ulysses", `layout` "contiguous" | "zigzag": with zigzag, x must already be in zigzag order and
    `positions` must be the tokens' real positions, e.g. `to_zigzag` of arange(T)); without, as the
    one-device `flash_attention` (inside a jitted step over sharded arrays XLA then partitions it).

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
        layout: str = "contiguous",
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
        if mesh is None and (batch_axis, seq_axis, head_axis) != (None, None, None):
            raise ValueError("batch_axis / seq_axis / head_axis need a mesh")
        if mesh is not None:
            if not isinstance(mesh, jax.sharding.Mesh):
                raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
            resolve_axes(mesh, batch_axis, seq_axis, head_axis)  # names checked now, not at the first call
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.mesh, self.batch_axis, self.seq_axis, self.head_axis = mesh, batch_axis, seq_axis, head_axis
        self.strategy, self.layout = strategy, layout
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
        if self.layout == "zigzag" and positions is None:
            raise ValueError(
                "layout='zigzag' needs the tokens' real positions (e.g. meshes.to_zigzag of arange(T)): "
                "they set the rotary angles and the masks of the reordered tokens"
            )
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
        kwargs = dict(
            q_positions=mask_positions, kv_positions=mask_positions, q_segment_ids=segment_ids,
            kv_segment_ids=segment_ids, sinks=None if self.sinks is None else self.sinks[...],
            dropout_rate=rate, dropout_rng=dropout_rng if rate > 0 else None, **self.attention_kwargs,
        )  # fmt: skip
        if self.mesh is None:
            o = flash_attention(q, k, v, **kwargs)
        else:
            o = sharded_attention(
                q, k, v, mesh=self.mesh, batch_axis=self.batch_axis, seq_axis=self.seq_axis,
                head_axis=self.head_axis, strategy=self.strategy, layout=self.layout, **kwargs,
            )  # fmt: skip
        return self.out_proj(o.reshape(B, T, self.num_heads * self.head_dim))

#!/usr/bin/env python
"""Trains a small byte-level language model of lightning and softmax attention layers on a mesh.

The model is a decoder-only hybrid as in MiniMax-01: every layer is lightning attention
(shardattn.flax.LightningAttention) except every eighth, which is causal softmax attention
(`--softmax-every 8`). The data needs no download: the Python standard library's own source files,
read from this interpreter's stdlib folder in sorted order, as bytes (vocabulary 256); every tenth file
is held out.

Parallelism: one mesh over every device of every host, axes ("data", "seq", "heads") from `--mesh`.
Token batches are sharded over data and seq; lightning layers run sharded over all three axes
(shardattn.sharded.sharded_lightning), softmax layers too (shardattn.sharded_attention; `--layout
zigzag` reorders each token batch once so that the causal softmax work is balanced over the sequence
shards); parameters and AdamW moments are sharded over "data" (FSDP:
each device stores 1/data of every weight and of its AdamW moments; the step all-gathers the weights,
and the gradients are summed over the batch shards back into that layout).

    python examples/train_tpu.py --fake-cpu-devices 8 --mesh 2,2,2 --d-model 64 --seq-len 128  # CPU
    python examples/train_tpu.py --mesh -1,1,1 --dtype bfloat16                   # GPUs of one host
    python examples/train_tpu.py --distributed --mesh -1,1,1 --dtype bfloat16     # each TPU pod host

See examples/TRAINING.md.
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# Runs from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from shardattn.flax import LightningAttention, SoftmaxAttention  # noqa: E402
from shardattn.lightning import resolve_implementations  # noqa: E402
from shardattn.meshes import to_zigzag  # noqa: E402

VOCAB = 256  # bytes
SEPARATOR = 0  # NUL never occurs in source text; it marks the boundary between two files


@dataclasses.dataclass(frozen=True)
class Config:
    layers: int = 8
    d_model: int = 256
    heads: int = 4
    softmax_every: int = 8  # MiniMax-01: seven lightning layers, then one softmax layer
    mlp_ratio: int = 4
    dtype: str = "float32"  # compute dtype; parameters and optimizer state stay float32
    scan: str = "auto"  # lightning state scan across sequence shards: ring | tree | allgather | auto
    implementation: tuple[str, ...] | None = None  # lightning backends to try; None: the platform's best
    layout: str = "contiguous"  # token order on the sequence shards: contiguous | zigzag (see HybridLM)

    def is_softmax(self, layer_idx: int) -> bool:
        return self.softmax_every > 0 and (layer_idx + 1) % self.softmax_every == 0


# --------------------------------------------------------------------------------------------------
# Data: the standard library's source, as bytes


def stdlib_files() -> list[pathlib.Path]:
    """The .py files of this interpreter's standard library, in a fixed order (sorted relative paths)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}  # installed packages are not the stdlib
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(max_bytes: int = 32 << 20, heldout_every: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(train, heldout) uint8 byte streams; files joined by SEPARATOR, every `heldout_every`-th held out.

    Files are taken in order until `max_bytes` have been read, so a smaller corpus is a prefix of a larger
    one and every host of a pod reads exactly the same bytes.
    """
    train, heldout, total = [], [], 0
    for i, path in enumerate(stdlib_files()):
        data = path.read_bytes() + bytes([SEPARATOR])
        (heldout if i % heldout_every == heldout_every - 1 else train).append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not heldout:
        raise ValueError(f"max_bytes={max_bytes} is too small to hold out any file")
    as_array = lambda parts: np.frombuffer(b"".join(parts), dtype=np.uint8)
    return as_array(train), as_array(heldout)


def batch_starts(data: np.ndarray, batch: int, seq_len: int, seed: int, step: int) -> np.ndarray:
    """Start offsets [batch] of the random windows of one global batch.

    The generator is seeded by (seed, step), so every host computes the same global batch without
    talking to the others, and a batch does not depend on what was drawn before it. Drawing the offsets
    costs nothing; only the windows a host's devices hold are then read (`window_block`).
    """
    if len(data) <= seq_len + 1:
        raise ValueError(f"seq_len={seq_len} needs more than {len(data)} bytes of data")
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, len(data) - seq_len - 1, size=batch)


def window_block(data: np.ndarray, starts: np.ndarray, seq_len: int, index, *, target: bool) -> np.ndarray:
    """The block `index` (a tuple of two slices: rows, token columns) of the [batch, seq_len] inputs
    (target=False) or targets (target=True, shifted by one) whose rows start at `starts`."""
    rows, cols = index
    first, stop, _ = cols.indices(seq_len)
    shift = 1 if target else 0
    return np.stack([data[s + first + shift : s + stop + shift] for s in starts[rows]]).astype(np.int32)


def sample_batch(data: np.ndarray, batch: int, seq_len: int, seed: int, step: int):
    """(inputs, targets) int32 [batch, seq_len]: the whole global batch on one host (tests, one device)."""
    starts = batch_starts(data, batch, seq_len, seed, step)
    full = (slice(None), slice(0, seq_len))
    return tuple(window_block(data, starts, seq_len, full, target=t) for t in (False, True))


def global_batch(data: np.ndarray, batch: int, seq_len: int, seed: int, step: int, sharding):
    """(inputs, targets) as global jax.Arrays laid out as `sharding` (None: one device).

    Each process builds only the blocks its own devices hold (`jax.make_array_from_callback` asks for
    exactly those), so no host materialises the global batch on a multi-host mesh.
    """
    if sharding is None:
        return tuple(jnp.asarray(x) for x in sample_batch(data, batch, seq_len, seed, step))
    starts = batch_starts(data, batch, seq_len, seed, step)
    return tuple(
        jax.make_array_from_callback(
            (batch, seq_len),
            sharding,
            lambda index, t=target: window_block(data, starts, seq_len, index, target=t),
        )
        for target in (False, True)
    )


# --------------------------------------------------------------------------------------------------
# Model


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        linear = lambda n_in, n_out: nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, rngs=rngs)
        self.gate, self.up = linear(d_model, hidden), linear(d_model, hidden)
        self.down = linear(hidden, d_model)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    """Pre-norm residual block: attention (lightning or softmax), then a SwiGLU MLP."""

    def __init__(self, cfg: Config, layer_idx: int, *, mesh, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.attn_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        if cfg.is_softmax(layer_idx):
            # Causal softmax attention with rotary positions (lightning layers know order through their
            # decay; softmax layers need positions, as in MiniMax-01), sharded like the lightning layers
            # through shardattn.sharded_attention (strategy "auto": ring, all-gather or Ulysses by shape).
            self.attn = SoftmaxAttention(
                cfg.d_model, cfg.heads, causal=True, mesh=mesh, layout=self.layout(cfg, mesh), dtype=dtype,
                rngs=rngs,
            )  # fmt: skip
        else:
            # The decay preset takes the layer's index among all layers, as MiniMax-01 does: deeper
            # layers decay more slowly and so see further back.
            self.attn = LightningAttention(
                cfg.d_model, cfg.heads, layer_idx=layer_idx, num_layers=cfg.layers, decay="minimax",
                mesh=mesh, scan=cfg.scan, layout=self.layout(cfg, mesh), implementation=cfg.implementation,
                dtype=dtype, rngs=rngs,
            )
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_ratio * cfg.d_model, dtype=dtype, rngs=rngs)
        self.softmax = cfg.is_softmax(layer_idx)

    @staticmethod
    def layout(cfg: Config, mesh) -> str:
        # Without a mesh (one device, e.g. generate.py) there is nothing to balance: contiguous.
        return cfg.layout if mesh is not None else "contiguous"

    def __call__(self, x, positions=None):
        """x [B, T, d_model] in the model's layout; positions [1, T]: the tokens' real positions (zigzag)."""
        h = self.attn_norm(x)
        x = x + (self.attn(h, positions) if self.softmax else self.attn(h))
        return x + self.mlp(self.mlp_norm(x))


class HybridLM(nnx.Module):
    """Byte-level decoder: tokens int32 [B, T] -> logits float32 [B, T, 256].

    With `cfg.layout == "zigzag"` (and a mesh) tokens and logits are in the zigzag order of the mesh's
    sequence axis (`shardattn.meshes.to_zigzag`, applied once to tokens and targets in the loss): every
    sequence shard then holds one early and one late chunk, so causal softmax layers do equal work on
    every shard; lightning layers take the same order (sharded_lightning(layout="zigzag")).
    """

    def __init__(self, cfg: Config, *, mesh=None, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.embed = nnx.Embed(VOCAB, cfg.d_model, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, i, mesh=mesh, rngs=rngs) for i in range(cfg.layers)])
        self.norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, VOCAB, use_bias=False, dtype=dtype, rngs=rngs)
        self.zigzag = Block.layout(cfg, mesh) == "zigzag"
        self.mesh = mesh

    def __call__(self, tokens):
        x = self.embed(tokens)
        # Default positions (None) for the contiguous layout; the real positions in zigzag order else.
        T = tokens.shape[1]
        positions = to_zigzag(jnp.arange(T, dtype=jnp.int32)[None], self.mesh) if self.zigzag else None
        for block in self.blocks:
            x = block(x, positions)
        return self.head(self.norm(x)).astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# Mesh and sharding


def parse_mesh(spec: str, devices=None):
    """'data,seq,heads' sizes (one may be -1: the rest of the devices) -> Mesh; 'none' -> None."""
    if spec.strip().lower() == "none":
        return None
    from shardattn.meshes import make_mesh

    sizes = [int(s) for s in spec.split(",")]
    if len(sizes) != 3:
        raise ValueError(f"--mesh {spec!r} must be three sizes data,seq,heads (e.g. 2,2,2 or -1,1,1)")
    data, seq, heads = sizes
    try:
        return make_mesh(data=data, seq=seq, heads=heads, devices=devices)
    except ValueError as err:  # name the flag and the processes, not only the device count
        raise ValueError(
            f"--mesh {spec!r} does not fit the {jax.device_count()} devices of {jax.process_count()} "
            f"process(es) ({jax.local_device_count()} on this one): {err}"
        ) from None


def fsdp_spec(shape, data_size: int) -> P:
    """FSDP layout: the largest dimension divisible by the data-axis size is sharded over "data".

    The rule depends only on the shape, so a parameter and its two AdamW moments get the same layout.
    Arrays with no such dimension (scalars, odd sizes) are replicated.
    """
    if data_size > 1:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % data_size == 0:
                return P(*(["data" if d == dim else None for d in range(len(shape))]))
    return P()


def tree_shardings(tree, mesh):
    """NamedShardings (fsdp_spec) for every array of `tree` (arrays or ShapeDtypeStructs); None on no mesh."""
    if mesh is None:
        return None
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh.shape["data"])), tree)


def batch_sharding(mesh):
    """Token arrays [B, T]: batch over "data", tokens over "seq" (replicated over "heads")."""
    return None if mesh is None else NamedSharding(mesh, P("data", "seq"))


def to_global(x: np.ndarray, sharding):
    """A host array that every process holds in full -> a global jax.Array laid out as `sharding`.

    Each process copies only the pieces its own devices hold, so this works on multi-host pods.
    """
    if sharding is None:
        return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


# --------------------------------------------------------------------------------------------------
# Training


def make_optimizer(lr: float, steps: int, weight_decay: float = 0.1):
    warmup = max(1, steps // 20)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr / 10)
    # No weight decay on norm scales (the only vectors here): decaying them shrinks every activation.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=decay_mask),
    )


def init_state(cfg: Config, mesh, optimizer, seed: int):
    """(graphdef, params, opt_state): parameters and optimizer state created directly in their FSDP
    layout (under jit with out_shardings), so no device ever holds a full unsharded copy."""
    create = lambda: HybridLM(cfg, mesh=mesh, rngs=nnx.Rngs(seed))
    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    params = jax.jit(lambda: nnx.state(create()), out_shardings=tree_shardings(abstract, mesh))()
    abstract_opt = jax.eval_shape(optimizer.init, params)
    opt_state = jax.jit(optimizer.init, out_shardings=tree_shardings(abstract_opt, mesh))(params)
    return graphdef, params, opt_state


def make_loss_fn(graphdef, mesh):
    def loss_fn(params, inputs, targets):
        if mesh is not None:
            # FSDP, made explicit: all-gather every weight for the step instead of leaving XLA to pick a
            # layout per matmul. In the backward pass the gradients are summed over the batch shards and
            # each device keeps its slice (the CPU compiler emits all-reduce + slice for this, seen in the
            # HLO; a reduce-scatter would move half the bytes).
            replicated = NamedSharding(mesh, P())
            params = jax.tree.map(lambda p: jax.lax.with_sharding_constraint(p, replicated), params)
        model = nnx.merge(graphdef, params)
        if model.zigzag:  # the token batch in zigzag order, once (the mean loss does not see the order)
            inputs, targets = to_zigzag(inputs, mesh), to_zigzag(targets, mesh)
        logits = model(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    return loss_fn


def make_steps(graphdef, optimizer, mesh, params, opt_state):
    """Jitted (train_step, eval_step). train_step(params, opt_state, inputs, targets) ->
    (params, opt_state, loss); eval_step(params, inputs, targets) -> loss. Layouts are pinned so that
    parameters and optimizer state come out sharded exactly as they went in."""
    loss_fn = make_loss_fn(graphdef, mesh)

    def train_step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if mesh is None:
        return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(loss_fn)
    p_sh, o_sh, b_sh = tree_shardings(params, mesh), tree_shardings(opt_state, mesh), batch_sharding(mesh)
    scalar = NamedSharding(mesh, P())
    train_jit = jax.jit(
        train_step,
        in_shardings=(p_sh, o_sh, b_sh, b_sh),
        out_shardings=(p_sh, o_sh, scalar),
        donate_argnums=(0, 1),
    )
    eval_jit = jax.jit(loss_fn, in_shardings=(p_sh, b_sh, b_sh), out_shardings=scalar)
    return train_jit, eval_jit


def check_divisible(args, mesh) -> None:
    """Fails early, naming the flag, where a mesh axis does not divide what it shards."""
    if args.d_model % args.heads:
        raise ValueError(f"--d-model {args.d_model} must be divisible by --heads {args.heads}")
    if mesh is None:
        return
    for flag, value, axis in (("--batch", args.batch, "data"), ("--seq-len", args.seq_len, "seq"),
                              ("--heads", args.heads, "heads")):  # fmt: skip
        if value % mesh.shape[axis]:
            size = mesh.shape[axis]
            raise ValueError(f"{flag} {value} must be divisible by the mesh's {axis} axis ({size})")
    if args.layout == "zigzag" and args.seq_len % (2 * mesh.shape["seq"]):
        raise ValueError(
            f"--seq-len {args.seq_len} must be divisible by 2 x the mesh's seq axis ({mesh.shape['seq']}) "
            "for --layout zigzag"
        )


def progress_bar(done: int, total: int, width: int = 24) -> str:
    filled = round(width * done / total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def train(args, log=print) -> list[dict]:
    """Runs the training loop of `args` (see parse_args); returns one record per logged interval:
    {"step", "loss" (mean train loss over the interval), "heldout", "tokens_per_s", "losses" (per step)}."""
    cfg = Config(
        layers=args.layers, d_model=args.d_model, heads=args.heads, softmax_every=args.softmax_every,
        dtype=args.dtype,
        scan=args.scan,
        implementation=tuple(args.implementation.split(",")) if args.implementation else None,
        layout=args.layout,
    )
    mesh = parse_mesh(args.mesh)
    check_divisible(args, mesh)
    is_main = jax.process_index() == 0
    log = log if is_main else (lambda *a, **k: None)
    train_data, heldout_data = load_corpus(int(args.data_mb * (1 << 20)))
    optimizer = make_optimizer(args.lr, args.steps)
    graphdef, params, opt_state = init_state(cfg, mesh, optimizer, args.seed)
    train_step, eval_step = make_steps(graphdef, optimizer, mesh, params, opt_state)
    b_sh = batch_sharding(mesh)

    n_params = sum(x.size for x in jax.tree.leaves(params))
    backends = ", ".join(resolve_implementations(cfg.implementation))
    layer_kinds = "".join("S" if cfg.is_softmax(i) else "L" for i in range(cfg.layers))
    log(
        f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"mesh {dict(mesh.shape) if mesh is not None else 'none (one device)'}\n"
        f"model: {n_params / 1e6:.2f}M parameters, layers {layer_kinds} (L lightning, S softmax), "
        f"d_model {cfg.d_model}, heads {cfg.heads}, {cfg.dtype}; batch {args.batch} x {args.seq_len} tokens\n"
        f"lightning backends, first that serves: {backends}; sequence-shard state scan: {cfg.scan}\n"
        f"data: {len(train_data) / 1e6:.2f} MB train, {len(heldout_data) / 1e6:.2f} MB held out "
        f"(Python {sys.version_info.major}.{sys.version_info.minor} stdlib)"
    )
    batch = lambda data, seed, step: global_batch(data, args.batch, args.seq_len, seed, step, b_sh)
    # A fixed held-out set (seed + 1 keeps it apart from the training draws).
    eval_batches = [batch(heldout_data, args.seed + 1, i) for i in range(args.eval_batches)]
    heldout_loss = lambda: float(np.mean([float(eval_step(params, *b)) for b in eval_batches]))

    log_every = args.log_every or max(1, args.steps // 20)
    history, pending, t_start = [], [], None
    for step in range(1, args.steps + 1):
        params, opt_state, loss = train_step(params, opt_state, *batch(train_data, args.seed, step))
        pending.append(loss)
        if step == 1:
            # The first step compiles; time only what comes after it.
            loss.block_until_ready()
            t_start, t_steps = time.perf_counter(), 0
            log(f"step 1 (compiled): loss {float(loss):.4f}")
        else:
            t_steps += 1
        if step % log_every == 0 or step == args.steps:
            losses = [float(x) for x in jax.device_get(pending)]
            elapsed = time.perf_counter() - t_start
            tok_s = t_steps * args.batch * args.seq_len / elapsed if t_steps else float("nan")
            record = dict(step=step, loss=float(np.mean(losses)), losses=losses, tokens_per_s=tok_s)
            record["heldout"] = heldout_loss()
            history.append(record)
            log(
                f"{progress_bar(step, args.steps)} step {step:>{len(str(args.steps))}}/{args.steps}  "
                f"loss {record['loss']:.4f}  held-out {record['heldout']:.4f}  {tok_s:,.0f} tok/s"
            )
            pending = []
            t_start, t_steps = time.perf_counter(), 0
    if args.save:
        save_checkpoint(args.save, cfg, params)
        log(f"saved parameters to {args.save}")
    return history


def save_checkpoint(path, cfg: Config, params) -> None:
    """Writes `params` (an nnx.State, any sharding) with orbax to path/params and `cfg` to path/config.json:
    what examples/generate.py restores. Every process calls it (orbax writes each shard once)."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "params", params, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        (path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))


def parse_args(argv=None):
    formatter = argparse.RawDescriptionHelpFormatter  # keeps the docstring's example commands readable
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    add = parser.add_argument
    add("--steps", type=int, default=300)
    add("--seq-len", type=int, default=256)
    add("--batch", type=int, default=16, help="global batch (sequences per step, all hosts together)")
    add("--layers", type=int, default=8)
    add("--d-model", type=int, default=256)
    add("--heads", type=int, default=4)
    add("--softmax-every", type=int, default=8, help="every n-th layer is softmax attention (0: none)")
    add("--mesh", default="-1,1,1", help="data,seq,heads mesh sizes; -1 = the rest; 'none' = one device")
    add("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    add("--scan", default="auto", choices=["auto", "ring", "tree", "allgather"], help="lightning state scan")
    add("--layout", default="contiguous", choices=["contiguous", "zigzag"],
        help="token order on the sequence shards; zigzag balances causal softmax work (reordered once)")
    add("--implementation", default="", help="lightning backends to try, e.g. triton,xla (default: best)")
    add("--lr", type=float, default=3e-3)
    add("--data-mb", type=float, default=32, help="megabytes of stdlib source to read")
    add("--eval-batches", type=int, default=4)
    add("--log-every", type=int, default=0, help="0: steps // 20")
    add("--fake-cpu-devices", type=int, default=0, help="run on N fake CPU devices")
    add("--distributed", action="store_true",
        help="multi-host: call jax.distributed.initialize() first (implied by --coordinator)")
    add("--coordinator", default="", help="HOST:PORT of process 0 (multi-process runs outside a TPU pod, "
        "SLURM or Open MPI, whose coordinator JAX finds by itself)")
    add("--num-processes", type=int, default=0, help="number of processes (with --coordinator)")
    add("--process-id", type=int, default=-1, help="this process's id, 0 .. N-1 (with --coordinator)")
    add("--seed", type=int, default=0)
    add("--metrics-out", default="", help="write the logged records as JSON here (process 0)")
    add("--save", default="", help="write the final parameters here (orbax) for examples/generate.py")
    return parser.parse_args(argv)


def setup_runtime(args) -> None:
    """Things that must happen before JAX starts its backends: fake CPU devices, multi-process set-up."""
    if args.fake_cpu_devices:
        from shardattn.meshes import use_fake_cpu_devices

        jax.config.update("jax_platforms", "cpu")
        use_fake_cpu_devices(args.fake_cpu_devices)
    explicit = bool(args.coordinator)
    if explicit != (args.num_processes > 0) or explicit != (args.process_id >= 0):
        raise ValueError(
            "--coordinator, --num-processes and --process-id go together (all three or none), got "
            f"{args.coordinator=}, {args.num_processes=}, {args.process_id=}"
        )
    if explicit and not 0 <= args.process_id < args.num_processes:
        n = args.num_processes
        raise ValueError(f"--process-id {args.process_id} must be in [0, {n}) (--num-processes {n})")
    if not (explicit or args.distributed or os.environ.get("SHARDATTN_DISTRIBUTED") == "1"):
        return
    if args.fake_cpu_devices or jax.config.jax_platforms == "cpu":
        # CPU processes exchange collectives through gloo (JAX's CPU default does not cross processes).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
        )
    else:
        # On a Cloud TPU pod slice JAX finds the coordinator and this host's id by itself; on GPU
        # clusters it reads SLURM/Open MPI, or the JAX_COORDINATOR_ADDRESS/... environment variables.
        jax.distributed.initialize()


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_runtime(args)
    history = train(args)
    if args.metrics_out and jax.process_index() == 0:
        pathlib.Path(args.metrics_out).write_text(json.dumps(history))
    if jax.process_index() == 0 and history:
        final = history[-1]
        first_loss = history[0]["losses"][0]
        # The median over logged intervals keeps one slow interval (a host hiccup) out of the figure.
        rates = [h["tokens_per_s"] for h in history if math.isfinite(h["tokens_per_s"])]
        rate = f"{np.median(rates):,.0f} tok/s (median of {len(rates)} intervals)" if rates else "no timing"
        print(
            f"done: loss {first_loss:.3f} -> {final['loss']:.3f}, held-out {final['heldout']:.3f} "
            f"({final['heldout'] / math.log(2):.3f} bits/byte); {rate}"
        )


if __name__ == "__main__":
    main()

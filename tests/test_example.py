"""examples/train_tpu.py on the 8 fake CPU devices: the loss falls, parameters and optimizer state stay
sharded over "data", and a sharded step computes the same loss and gradients as a one-device step."""

import dataclasses
import importlib.util
import pathlib

import jax
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_tpu.py"


def _load_example():
    # examples/ is not a package; load the script as a module to call its functions directly.
    spec = importlib.util.spec_from_file_location("train_tpu", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ex = _load_example()

# Two layers, the second softmax: both attention kinds in the smallest model.
TINY = ex.Config(layers=2, d_model=32, heads=2, softmax_every=2)


def _rel_rms(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b**2)), 1e-30)


def test_corpus_is_deterministic_and_split():
    train_a, heldout_a = ex.load_corpus(1 << 20)
    train_b, heldout_b = ex.load_corpus(1 << 20)
    np.testing.assert_array_equal(train_a, train_b)
    np.testing.assert_array_equal(heldout_a, heldout_b)
    assert len(train_a) + len(heldout_a) >= 1 << 20
    assert 0.02 < len(heldout_a) / len(train_a) < 0.5  # every tenth file, give or take file sizes
    # Held-out text must not be a slice of the training text (whole files are held out).
    probe = heldout_a[1000:1200].tobytes()
    assert probe not in train_a.tobytes()
    inputs, targets = ex.sample_batch(train_a, 3, 17, seed=5, step=2)
    assert inputs.shape == targets.shape == (3, 17) and inputs.dtype == np.int32
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    np.testing.assert_array_equal(inputs, ex.sample_batch(train_a, 3, 17, seed=5, step=2)[0])


def test_fsdp_spec():
    assert ex.fsdp_spec((32, 128), 2) == jax.sharding.PartitionSpec(None, "data")
    assert ex.fsdp_spec((256, 32), 2) == jax.sharding.PartitionSpec("data", None)
    assert ex.fsdp_spec((3, 5), 2) == jax.sharding.PartitionSpec()  # nothing divisible: replicated
    assert ex.fsdp_spec((64, 64), 1) == jax.sharding.PartitionSpec()


def test_loss_falls_on_mesh():
    args = ex.parse_args(
        ["--mesh", "2,4,1", "--layers", "2", "--softmax-every", "2", "--d-model", "32", "--heads", "2",
         "--seq-len", "64", "--batch", "8", "--steps", "30", "--log-every", "10", "--eval-batches", "1",
         "--data-mb", "1", "--lr", "1e-2"]
    )  # fmt: skip
    history = ex.train(args, log=lambda *a, **k: None)
    losses = np.concatenate([h["losses"] for h in history])
    assert len(losses) == 30 and np.all(np.isfinite(losses))
    # Uniform guessing over 256 bytes costs ln 256 = 5.55 nats; 30 steps must learn at least the byte
    # frequencies of Python source.
    assert losses[0] > 5.0
    assert losses[-5:].mean() < losses[0] - 1.5, losses
    # Held-out files, never trained on, improve too: well below uniform, and still falling.
    heldout = [h["heldout"] for h in history]
    assert heldout[-1] < 3.5 and heldout[-1] < heldout[0] - 0.25, heldout


def test_sharded_step_matches_one_device():
    mesh = ex.parse_mesh("2,2,2")  # batch, sequence and heads all split in two
    optimizer = ex.make_optimizer(1e-3, steps=10)
    graphdef_m, params_m, opt_m = ex.init_state(TINY, mesh, optimizer, seed=3)
    graphdef_1, params_1, opt_1 = ex.init_state(TINY, None, optimizer, seed=3)
    # Initialisation does not depend on the layout (partitionable threefry).
    for a, b in zip(jax.tree.leaves(params_m), jax.tree.leaves(params_1), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    train_data, _ = ex.load_corpus(1 << 20)
    inputs, targets = ex.sample_batch(train_data, 4, 32, seed=0, step=1)
    b_sh = ex.batch_sharding(mesh)
    batch_m = (ex.to_global(inputs, b_sh), ex.to_global(targets, b_sh))
    batch_1 = (ex.to_global(inputs, None), ex.to_global(targets, None))

    loss_m, grads_m = jax.jit(jax.value_and_grad(ex.make_loss_fn(graphdef_m, mesh)))(params_m, *batch_m)
    loss_1, grads_1 = jax.jit(jax.value_and_grad(ex.make_loss_fn(graphdef_1, None)))(params_1, *batch_1)
    # Sequence sharding reorders the sums of the lightning state scan: float32 tolerance, not equality.
    np.testing.assert_allclose(float(loss_m), float(loss_1), rtol=1e-5)
    for path, g_m in jax.tree_util.tree_leaves_with_path(grads_m):
        g_1 = dict(jax.tree_util.tree_leaves_with_path(grads_1))[path]
        assert _rel_rms(g_m, g_1) < 1e-4, jax.tree_util.keystr(path)

    # The jitted training step: same loss, and parameters and both AdamW moments come out sharded over
    # "data" (each device holds half of every large weight), not replicated.
    step_m, _ = ex.make_steps(graphdef_m, optimizer, mesh, params_m, opt_m)
    step_1, _ = ex.make_steps(graphdef_1, optimizer, None, params_1, opt_1)
    new_params, new_opt, step_loss_m = step_m(params_m, opt_m, *batch_m)
    _, _, step_loss_1 = step_1(params_1, opt_1, *batch_1)
    np.testing.assert_allclose(float(step_loss_m), float(step_loss_1), rtol=1e-5)
    np.testing.assert_allclose(float(step_loss_m), float(loss_1), rtol=1e-5)
    for tree in (new_params, new_opt):
        big = [x for x in jax.tree.leaves(tree) if x.size >= 32 * 32]
        assert big
        for x in big:
            assert "data" in x.sharding.spec, x.sharding
            shard = x.addressable_shards[0].data
            assert shard.size * 2 == x.size, (shard.shape, x.shape)


def test_zigzag_layout_equals_contiguous():
    # --layout zigzag reorders the token batch once; softmax layers run in zigzag order with the real
    # positions, lightning layers in the same order (sharded_lightning layout="zigzag"): the same model,
    # the same loss and gradients.
    mesh = ex.parse_mesh("2,4,1")
    optimizer = ex.make_optimizer(1e-3, steps=10)
    zig = dataclasses.replace(TINY, layout="zigzag")
    graphdef_z, params_z, _ = ex.init_state(zig, mesh, optimizer, seed=5)
    graphdef_c, params_c, _ = ex.init_state(TINY, mesh, optimizer, seed=5)
    train_data, _ = ex.load_corpus(1 << 20)
    inputs, targets = ex.sample_batch(train_data, 2, 32, seed=0, step=2)
    b_sh = ex.batch_sharding(mesh)
    batch = (ex.to_global(inputs, b_sh), ex.to_global(targets, b_sh))
    loss_z, grads_z = jax.jit(jax.value_and_grad(ex.make_loss_fn(graphdef_z, mesh)))(params_z, *batch)
    loss_c, grads_c = jax.jit(jax.value_and_grad(ex.make_loss_fn(graphdef_c, mesh)))(params_c, *batch)
    np.testing.assert_allclose(float(loss_z), float(loss_c), rtol=1e-5)
    for path, g_z in jax.tree_util.tree_leaves_with_path(grads_z):
        g_c = dict(jax.tree_util.tree_leaves_with_path(grads_c))[path]
        assert _rel_rms(g_z, g_c) < 1e-4, jax.tree_util.keystr(path)
    # The model really ran zigzag: its softmax layer's sharded_attention got the zigzag layout.
    model = ex.nnx.merge(graphdef_z, params_z)
    assert model.zigzag and [block.attn.layout for block in model.blocks] == ["zigzag", "zigzag"]


@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["MHA", "GQA4/2"])
def test_flax_layer_is_the_minimax_lightning_block(num_kv_heads):
    from flax import nnx

    from shardattn import decay_slopes, lightning_attention
    from shardattn.flax import LightningAttention

    B, T, D, H, Dh = 2, 40, 32, 4, 8
    layer = LightningAttention(D, H, num_kv_heads=num_kv_heads, layer_idx=1, num_layers=3, rngs=nnx.Rngs(0))
    assert layer.scale == 1.0  # MiniMax-01 uses no 1/sqrt(d) with its decay
    x = jax.random.normal(jax.random.PRNGKey(1), (B, T, D))

    # The block written out by hand, with the float32 token-by-token reference backend.
    w = lambda proj: np.asarray(proj.kernel[...], np.float64)
    xn = np.asarray(x, np.float64)
    silu = lambda a: a / (1 + np.exp(-a))
    q = silu(xn @ w(layer.q_proj)).reshape(B, T, H, Dh)
    k = silu(xn @ w(layer.k_proj)).reshape(B, T, num_kv_heads, Dh)
    v = silu(xn @ w(layer.v_proj)).reshape(B, T, num_kv_heads, Dh)
    f32 = lambda a: jax.numpy.asarray(a, jax.numpy.float32)
    o = lightning_attention(
        f32(q), f32(k), f32(v), slopes=decay_slopes(H, 1, 3, "minimax"), scale=1.0, implementation="reference"
    )
    o = np.asarray(o, np.float64).reshape(B, T, H * Dh)
    o = o / np.sqrt(np.mean(o**2, axis=-1, keepdims=True) + 1e-6) * np.asarray(layer.norm.scale[...])
    gate = 1 / (1 + np.exp(-(xn @ w(layer.gate_proj))))
    expected = (o * gate) @ w(layer.out_proj)

    got = np.asarray(layer(x))
    assert got.shape == (B, T, D)
    assert _rel_rms(got, expected) < 1e-4


def test_flax_layer_checks_arguments():
    from flax import nnx

    from shardattn.flax import LightningAttention

    with pytest.raises(ValueError, match="layer_idx"):
        LightningAttention(32, 4, layer_idx=3, num_layers=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads"):
        LightningAttention(32, 4, num_kv_heads=3, layer_idx=0, num_layers=3, rngs=nnx.Rngs(0))
    layer = LightningAttention(32, 4, layer_idx=0, num_layers=3, decay="transnormer", rngs=nnx.Rngs(0))
    assert layer.scale is None  # lightning_attention's default, head_dim ** -0.5


def test_importing_shardattn_does_not_import_flax():
    import subprocess
    import sys

    code = "import sys, shardattn; sys.exit('flax' in sys.modules)"
    root = EXAMPLE.parent.parent
    assert subprocess.run([sys.executable, "-c", code], cwd=root, timeout=120).returncode == 0


def test_mesh_that_does_not_fit_the_devices_names_the_flag():
    with pytest.raises(ValueError, match=r"--mesh '3,1,1' does not fit the 8 devices of 1 process"):
        ex.parse_mesh("3,1,1")
    args = ex.parse_args(["--coordinator", "127.0.0.1:1234"])
    with pytest.raises(ValueError, match="go together"):
        ex.setup_runtime(args)

"""shardattn.flax.LightningAttention: arguments checked at construction, and the learnable decay."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, rel_rms, tolerance
from jax.sharding import Mesh

nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

from shardattn import decay_slopes  # noqa: E402
from shardattn.flax import LEARNABLE_SLOPE_FLOOR, LightningAttention  # noqa: E402
from shardattn.meshes import make_mesh  # noqa: E402

D, H = 16, 4
X = jax.random.normal(jax.random.PRNGKey(1), (2, 24, D))


def layer(**kw):
    return LightningAttention(D, H, **({"layer_idx": 1, "num_layers": 3} | kw), rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(scan="bogus"), ValueError, "scan='bogus' must be one of"),
        (dict(mesh=make_mesh(seq=8), seq_axis="sequence"), ValueError, "'sequence' is not an axis"),
        (dict(mesh=make_mesh(seq=8), head_axis="seq"), ValueError, "only one role"),
        (dict(mesh=Mesh(np.array(jax.devices()), ("sp",))), ValueError, r"\('sp',\) would serve no role"),
        (dict(seq_axis="seq"), ValueError, "only apply with a mesh"),
        (dict(scan="ring"), ValueError, "only apply with a mesh"),
        (dict(mesh="seq"), TypeError, "jax.sharding.Mesh"),
        (dict(learnable_decay=1), TypeError, "learnable_decay must be a bool"),
    ],
    ids=["scan", "axis-name", "axis-roles", "unused-axis", "axis-without-mesh", "scan-without-mesh",
         "mesh-type", "learnable-type"],
)  # fmt: skip
def test_construction_checks_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        layer(**kwargs)
    layer(mesh=Mesh(np.array(jax.devices()), ("sp",)), seq_axis="sp")  # named: fine


@pytest.mark.parametrize("decay", ["minimax", "transnormer"])
def test_learnable_decay_starts_at_the_preset(decay):
    fixed, learnable = layer(decay=decay), layer(decay=decay, learnable_decay=True)
    preset = decay_slopes(H, 1, 3, decay)
    # Zero slopes (transnormer head 0) start at the floor, the others at the preset.
    np.testing.assert_allclose(learnable.slopes(), np.maximum(preset, LEARNABLE_SLOPE_FLOOR), rtol=1e-6)
    np.testing.assert_array_equal(fixed.slopes(), preset)
    # Same weights (the slope parameter draws no random numbers), same output; at T = 24 the floor
    # changes head 0's weights by at most exp(-24e-6), well inside the float32 tolerance.
    assert_close("layer output", learnable(X), fixed(X), tolerance(jnp.float32))


def test_learnable_decay_gets_exact_gradients_and_stays_nonnegative():
    layers = {impl: layer(learnable_decay=True, implementation=impl) for impl in ("xla", "reference")}

    def loss(model):
        y = model(X)
        return jnp.sum(y * jnp.cos(3.0 * y))

    grads = {impl: nnx.grad(loss)(m).slope_param[...] for impl, m in layers.items()}
    g = np.asarray(grads["xla"])
    assert np.all(np.isfinite(g)) and np.all(g != 0), g
    # The XLA backend's slope gradient through the layer against the float32 token-by-token reference.
    assert rel_rms(g, grads["reference"]) <= tolerance(jnp.float32, grad=True), (g, grads["reference"])

    # A large SGD step: the raw parameter moves by -lr * grad, far past the point where a plain slope
    # parameter would turn negative; softplus keeps the slopes >= 0 and the layer finite.
    model = layers["xla"]
    before = np.asarray(model.slopes())
    optimizer = nnx.Optimizer(model, optax.sgd(1e3 / np.abs(g).min()), wrt=nnx.Param)
    optimizer.update(model, nnx.grad(loss)(model))
    after = np.asarray(model.slopes())
    assert np.all(after >= 0) and np.all(np.isfinite(after)), after
    assert np.all(np.sign(after - before) == -np.sign(g)), (before, after, g)  # moved against the gradient
    assert np.any(before - after > before * 0.5)  # a real step, not a rounding
    assert np.all(np.isfinite(np.asarray(model(X))))

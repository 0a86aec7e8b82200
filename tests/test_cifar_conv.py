"""cifar_conv.py: the convolutional network of App. D.2 against exact references (float64),
its data pipeline and optimizer, its config checks, and the script end to end.

The network: a tiny instance (16x16x2 images, channels (2, 3, 4): states 8x8x2, 4x4x3,
1x1x4, n = 180 units; weights scaled so the dynamics contract) is compared with dense linear
algebra: the connectivity Jacobian K = dG/ds from autodiff, d_beta s* = (I - DK)^{-1} D g and
RBP's delta = (I - DK^T)^{-1} D g by dense solves, and gradients by autodiff through long
unrolled relaxations. Tolerances are far below what a sign or factor-of-2 error would produce.

The data pipeline (TFDS on mock data, Fashion-MNIST-32, augmentation, the batches of an
epoch) and the optimizer (per-layer learning rates, coupled weight decay, cosine schedule);
the input machinery of harness.py it runs on is tested in tests/test_harness.py.

End to end on TFDS mock data (CIFAR cannot be downloaded here): metrics, checkpoint, resume,
top-5 for CIFAR-100, two fake CPU devices, bad input. Training runs in subprocesses (float32,
as users run it; fake devices need their own process), on a reduced-width network with short
relaxations.
"""
import functools
import gzip
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

import cifar_conv as cc
import common
import harness
from configs import cifar10 as cifar10_config
from configs import cifar100 as cifar100_config
from helpers import (assert_trees_close, dbeta_s_dense, dense_all, flatten,
                     rbp_delta_dense, read_rows, run_script, sample, without_count, write_idx)


# ======================================================================================
# The network against exact references (float64)
# ======================================================================================

conv_grads = without_count(cc.network_grads)  # the network's gradient (without the count)

BATCH = 3
# The tiny float64 problems run in milliseconds; compiling them is what costs time. LLVM's
# optimisation passes dominate those compiles on a CPU, so the tests switch them off.
JIT = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def get_config():
  """A tiny configs/cifar10.py-style config."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.network = 'conv'
  c.image_size = 16
  c.in_channels = 2
  c.num_classes = 10
  c.channels = (2, 3, 4)
  c.alpha = 60.0
  c.tied = False
  c.layer_updates = 'synchronous'
  c.free_dtype = 'float32'
  c.t_free = 100
  c.t_nudge = 100
  c.tol = 0.0
  c.algorithm = 'hep_exact'
  c.n_points = 2
  c.beta = 0.05
  c.continuous_steps_per_point = 60
  c.continuous_periods = 5
  c.continuous_average = 'hold_end'
  c.homeo_coef = 0.0
  c.homeo_draws = 5
  c.batch_size = BATCH
  return c


def _with(config, **kw):
  """A copy of the config with some fields changed."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.update(**kw)
  return c


@functools.lru_cache(maxsize=None)
def _params(alpha, tied, small, seed):
  config = tiny_config(alpha, tied, 'synchronous', small)
  params = JIT(lambda k: cc.init_params(k, config))(jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  params['forward'] = [dict(p, b=jnp.asarray(0.3 * rng.standard_normal(p['b'].shape)))
                       for p in params['forward']]
  x = jnp.asarray(rng.standard_normal(
      (BATCH, config.image_size, config.image_size, config.in_channels)))
  return params, x


def tiny_config(alpha=60.0, tied=False, layer_updates='synchronous', small=False, **kw):
  """small=True: 8x8 images, channels (3, 4), states 4x4x3 and 1x1x4 (n = 52 units);
  otherwise 16x16 images, channels (2, 3, 4), states 8x8x2, 4x4x3, 1x1x4 (n = 180)."""
  config = _with(get_config(), alpha=alpha, tied=tied, layer_updates=layer_updates, **kw)
  if small:
    config.image_size, config.channels = 8, (3, 4)
  return config


def tiny(alpha=60.0, tied=False, layer_updates='synchronous', small=False, seed=0, **kw):
  """(config, params, x, labels), with random biases so that the state is not trivial. At
  LeCun scale these tiny networks contract (spectral radius of DK about 0.4)."""
  config = tiny_config(alpha, tied, layer_updates, small, seed=seed, **kw)
  params, x = _params(alpha, tied, small, seed)
  labels = jnp.asarray((np.arange(BATCH) * 3) % config.num_classes)
  return config, params, x, labels


def one(tree, i):
  return tuple(a[i:i + 1] for a in tree)


def conv_dense(config, params, x_drive, labels, u_free):
  """(K, d, g) of every sample of the conv network (helpers.dense_all; traceable)."""
  return dense_all(cc.activate, lambda s, x_drive: cc.drives(config, params, s, x_drive),
                   lambda s, y: cc.loss_grad_s(params, s, y), x_drive, labels, u_free)


def np_tree(tree):
  """Results as numpy arrays: checks on the host, no eager JAX ops (each would compile)."""
  return jax.tree_util.tree_map(np.asarray, tree)


def unflatten_batch(vectors, like):
  """Per-sample flat vectors (batch, n) -> a state tuple shaped like `like`."""
  out, start = [], 0
  for a in like:
    size = int(np.prod(a.shape[1:]))
    out.append(np.asarray(vectors)[:, start:start + size].reshape(a.shape))
    start += size
  return tuple(out)


@functools.lru_cache(maxsize=None)
def network(alpha=60.0, tied=False, layer_updates='synchronous', small=False):
  """Everything the tests compare, computed once per network (one compile): the free fixed
  point, exact d_beta s*, RBP's delta and the dense per-sample (K, d, g) (synchronous only:
  K does not depend on the update order)."""
  config, params, x, labels = tiny(alpha, tied, layer_updates, small)

  @JIT
  def solve(params, x):
    x_drive = cc.input_drive(params, x)
    u_free, res, _ = cc.free_relaxation(config, params, x_drive)
    relax = cc.nudged_relaxation(config, params, x_drive, labels, u_free)
    field = common.tree_sub(cc.drives(config, params, cc.activate(u_free), x_drive), u_free)
    return (u_free, res, jnp.sqrt(common.per_sample_sq_norm(field)),
            common.exact_dbeta(relax), cc.rbp_error(config, params, x_drive, labels, u_free),
            conv_dense(config, params, x_drive, labels, u_free)
            if layer_updates == 'synchronous' else None)
  u_free, res, field, exact, delta, kdg = np_tree(solve(params, x))
  assert float(res) < -10, f'tiny network did not converge: log10 residual {float(res)}'
  assert np.max(field) < 1e-10  # a fixed point of the synchronous dynamics
  dense_all = kdg and [tuple(a[i] for a in kdg) for i in range(BATCH)]
  return config, params, x, labels, u_free, exact, delta, dense_all


def np_flat(tree):
  return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree_util.tree_leaves(tree)])


def tree_cosine(a, b):
  fa, fb = np_flat(a), np_flat(b)
  return float(fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb)))


# ------------------------------------------------------------------------ shapes, init

def test_state_shapes_follow_app_d2_and_bad_sizes_raise():
  c = get_config()
  c.image_size, c.in_channels, c.channels = 32, 3, (128, 256, 512, 512)
  assert cc.state_shapes(c) == ((16, 16, 128), (8, 8, 256), (4, 4, 512), (1, 1, 512))
  assert cc.state_shapes(get_config()) == ((8, 8, 2), (4, 4, 3), (1, 1, 4))
  # The network's arrays have those shapes (traced only, nothing is computed).
  params = jax.eval_shape(lambda k: cc.init_params(k, c), jax.random.PRNGKey(0))
  assert [p['w'].shape for p in params['forward']] == [
      (3, 3, 3, 128), (3, 3, 128, 256), (3, 3, 256, 512), (3, 3, 512, 512)]
  assert [p['w'].shape for p in params['backward']] == [
      (3, 3, 128, 256), (3, 3, 256, 512), (3, 3, 512, 512)]
  assert params['readout']['w'].shape == (512, 10)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  u = cc.zeros_state(c, 2)
  out = jax.eval_shape(lambda p, x, u: (cc.input_drive(p, x),
                                        cc.drives(c, p, cc.activate(u), cc.input_drive(p, x))),
                       params, x, u)
  assert out[0].shape == u[0].shape
  assert [g.shape for g in out[1]] == [a.shape for a in u]
  for size, channels in ((30, (128, 256, 512, 512)), (8, (2, 3, 4)), (4, (2, 3))):
    c.image_size, c.channels = size, channels
    with pytest.raises(ValueError, match=f'image_size={size} does not fit {len(channels)} '
                       'layers'):  # check_config makes it a ConfigError (see below)
      cc.state_shapes(c)


def test_init_rotates_the_backward_kernels_and_tied_has_none():
  c = _with(get_config(), image_size=8, channels=(16, 32))
  configs = [_with(c, alpha=0.0), _with(c, alpha=60.0), _with(c, tied=True)]

  @JIT
  def init(key):
    params = [cc.init_params(key, config) for config in configs]
    return params, [cc.weight_angles(p) for p in params]
  (p0, p60, tied), (angle0, angle60, angle_tied) = init(jax.random.PRNGKey(0))
  np.testing.assert_allclose(p0['backward'][0]['w'], p0['forward'][1]['w'], atol=1e-7)
  assert float(angle0[0]) < 1e-2
  assert abs(float(angle60[0]) - 60.0) < 4.0
  w = np.asarray(p60['forward'][1]['w'])
  assert np.var(w) == pytest.approx(1.0 / (3 * 3 * 16), rel=0.1)  # LeCun: 1 / fan_in
  assert np.abs(w).max() < 2 * np.sqrt(1.0 / (3 * 3 * 16)) / 0.87962566  # truncated at 2 std
  assert not np.any(np.asarray(p60['forward'][1]['b']))
  assert tied['backward'] == [] and [float(a) for a in angle_tied] == [0.0]


# ------------------------------------------------------------------ activation, pooling

def test_sigma_is_the_silu_like_activation():
  x = np.linspace(-6, 6, 25)
  expected = (x / 2) / (1 + np.exp(-x)) + (1 - x / 2) / (1 + np.exp(-x + 2))
  np.testing.assert_allclose(cc.sigma(jnp.asarray(x)), expected, rtol=1e-13, atol=1e-15)


def naive_pool(x):
  b, h, w, c = x.shape
  out = np.zeros((b, h // 2, w // 2, c), x.dtype)
  for n, i, j, k in itertools.product(range(b), range(h // 2), range(w // 2), range(c)):
    window = x[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, k].ravel()
    p = np.exp(window - window.max())
    out[n, i, j, k] = np.sum(p * window) / p.sum()
  return out


def test_softmax_pool_mean_max_and_loop_reference():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 4, 3))
  const = np.repeat(np.repeat(x[:, ::2, ::2], 2, axis=1), 2, axis=2)
  # Large inputs with distinct values (gaps >= 100): max pooling, without overflow.
  big = 100.0 * rng.permutation(x.size).reshape(x.shape)
  pooled, pooled_const, pooled_big = JIT(lambda *a: [cc.softmax_pool(b) for b in a])(
      x, const, big)
  np.testing.assert_allclose(pooled, naive_pool(x), rtol=1e-13)
  np.testing.assert_allclose(pooled_const, x[:, ::2, ::2], rtol=1e-13)  # constant: the mean
  assert np.all(np.isfinite(pooled_big))
  np.testing.assert_allclose(pooled_big, big.reshape(2, 3, 2, 2, 2, 3).max(axis=(2, 4)),
                             rtol=1e-13)
  # ... and not the max for O(1) inputs (a soft max), and above the mean.
  max_pool = x.reshape(2, 3, 2, 2, 2, 3).max(axis=(2, 4))
  mean_pool = x.reshape(2, 3, 2, 2, 2, 3).mean(axis=(2, 4))
  assert np.abs(pooled - max_pool).max() > 0.1
  assert np.all(pooled >= mean_pool - 1e-12) and np.all(pooled <= max_pool + 1e-12)


def test_conv_is_the_plain_convolution_for_both_paddings_and_complex_states():
  rng = np.random.default_rng(4)
  s = jnp.asarray(rng.standard_normal((2, 6, 6, 3)) + 1j * rng.standard_normal((2, 6, 6, 3)))
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 5)))
  assert cc.patch_convs() == (jax.default_backend() == 'cpu')
  for padding in ('SAME', 'VALID'):
    got, got_real, as_patches, as_conv = JIT(lambda s, w: (
        cc.conv(s, w, padding), cc.conv(s.real, w, padding),
        cc.real_conv(s.real, w, padding, as_patches=True),
        cc.real_conv(s.real, w, padding, as_patches=False)))(s, w)
    # Reference: the convolution written out as sums over the kernel, complex arithmetic.
    pad = 1 if padding == 'SAME' else 0
    sp = np.pad(np.asarray(s), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h = sp.shape[1] - 2
    expected = sum(np.einsum('bhwc,co->bhwo', sp[:, a:a + h, b:b + h], np.asarray(w)[a, b])
                   for a in range(3) for b in range(3))
    assert got.shape == (2, h, h, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_real, expected.real, rtol=1e-12, atol=1e-12)
    # Both ways of computing it (patch matrix on CPU, lax.conv elsewhere).
    np.testing.assert_allclose(as_patches, expected.real, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(as_conv, expected.real, rtol=1e-12, atol=1e-12)


def test_softmax_pool_is_holomorphic():
  rng = np.random.default_rng(1)
  x, v, w = (jnp.asarray(rng.standard_normal((2, 4, 4, 3))) for _ in range(3))
  eps = 1e-20

  @JIT
  def run(x, v, w):
    y0, jv = jax.jvp(cc.softmax_pool, (x,), (v,))
    yc = cc.softmax_pool(x + 1j * eps * v)
    z, vc = x + 0.4j * w, v.astype(jnp.complex128)
    t1 = jax.jvp(cc.softmax_pool, (z,), (vc,))[1]
    t2 = jax.jvp(cc.softmax_pool, (z,), (1j * vc,))[1]
    f = lambda a: jnp.sum(cc.softmax_pool(a) * w[:, ::2, ::2])
    return y0, jv, yc, t1, t2, jax.grad(f, holomorphic=True)(x.astype(jnp.complex128)), \
        jax.grad(f)(x)
  y0, jv, yc, t1, t2, g_complex, g_real = run(x, v, w)
  # Complex step: P(x + i eps v) = P(x) + i eps J v + O(eps^2) (a conjugation flips the sign).
  np.testing.assert_allclose(yc.real, y0, rtol=1e-14)
  np.testing.assert_allclose(yc.imag / eps, jv, rtol=1e-12, atol=1e-14)
  # Cauchy-Riemann away from the real axis: the derivative along i v is i times that along v.
  np.testing.assert_allclose(t2, 1j * t1, rtol=1e-12, atol=1e-14)
  # A holomorphic gradient runs and equals the real one on the real axis.
  np.testing.assert_allclose(g_complex.real, g_real, rtol=1e-12, atol=1e-14)
  assert np.abs(g_complex.imag).max() < 1e-14


def test_drives_are_holomorphic_and_tied_drives_are_an_energy_gradient():
  config, params, x, _ = tiny(small=True)
  _, tied_params, _, _ = tiny(tied=True, small=True)
  rng = np.random.default_rng(2)
  shapes = cc.state_shapes(config)
  s = tuple(jnp.asarray(rng.standard_normal((BATCH, *sh))) for sh in shapes)
  v = tuple(jnp.asarray(rng.standard_normal((BATCH, *sh))) for sh in shapes)
  pads = cc.paddings(len(shapes))
  eps = 1e-20

  def phi(params, s):  # Phi(s) = sum_l s_l . (P(conv(s_{l-1}, w_l)) + b_l), s_0 = x
    below = (x, *s[:-1])
    return sum(jnp.sum(sl * (cc.softmax_pool(cc.conv(below[l], fw['w'], pads[l])) + fw['b']))
               for l, (sl, fw) in enumerate(zip(s, params['forward'])))

  @JIT
  def run(params, tied_params, s, v):
    x_drive = cc.input_drive(params, x)
    gc = cc.drives(config, params, tuple(a + 1j * eps * b for a, b in zip(s, v)),
                   x_drive.astype(jnp.complex128))
    g0, jv = jax.jvp(lambda z: cc.drives(config, params, z, x_drive), (s,), (v,))
    z = tuple(a + 0.3j * b for a, b in zip(s, v))
    vc = tuple(b.astype(jnp.complex128) for b in v)
    g = lambda q: cc.drives(config, params, q, x_drive.astype(jnp.complex128))
    t1 = jax.jvp(g, (z,), (vc,))[1]
    t2 = jax.jvp(g, (z,), (tuple(1j * b for b in vc),))[1]
    tied = cc.drives(config, tied_params, s, cc.input_drive(tied_params, x))
    return gc, g0, jv, t1, t2, tied, jax.grad(phi, argnums=1)(tied_params, s)
  gc, g0, jv, t1, t2, tied, energy_grad = run(params, tied_params, s, v)
  # The top-down VJP of a complex state must be the transpose, not the adjoint: the complex
  # step catches any conjugation in the backward module or the complex convolution.
  for a, b, c in zip(gc, jv, g0):
    np.testing.assert_allclose(a.real, c, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(a.imag / eps, b, rtol=1e-12, atol=1e-13)
  # Finite imaginary parts: Cauchy-Riemann for the whole G.
  for a, b in zip(t1, t2):
    np.testing.assert_allclose(b, 1j * a, rtol=1e-12, atol=1e-13)
  # Tied kernels: G = grad Phi, an energy-based model.
  for a, b in zip(tied, energy_grad):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------- fixed points

@pytest.mark.parametrize('layer_updates', ['synchronous', 'sequential'])
def test_relaxation_reaches_a_fixed_point(layer_updates):
  # network() asserts log10 ||F|| < -10 for the last update and ||G(s*) - u*|| < 1e-10.
  _, _, _, _, u_free, *_ = network(layer_updates=layer_updates)
  assert min(np.abs(a).max() for a in u_free) > 0.1  # a non-trivial state


def test_sequential_order_updates_odd_layers_then_even_layers_from_fresh_values():
  config, params, x, _ = tiny()
  rng = np.random.default_rng(3)
  u0 = tuple(jnp.asarray(rng.standard_normal(a.shape)) for a in cc.zeros_state(config, BATCH))

  @JIT
  def run(params, u0):
    x_drive = cc.input_drive(params, x)
    sync = cc.make_step(config, params, x_drive)
    seq = cc.make_step(_with(config, layer_updates='sequential'), params, x_drive)
    half = sync(u0)
    mixed = (half[0], u0[1], half[2])  # layers 1 and 3 (0-based 0 and 2) first
    return seq(u0), (half[0], sync(mixed)[1], half[2]), half
  got, expected, half = run(params, u0)
  for a, b in zip(got, expected):
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
  assert np.abs(got[1] - half[1]).max() > 1e-3


def test_t_counts_synchronous_steps_in_both_orders():
  """T_free = 7: 7 synchronous steps, or ceil(7 / 2) = 4 red-black ones (as in the MLP)."""
  config, params, x, _ = tiny(t_free=7)
  steps = JIT(lambda p: [cc.free_relaxation(_with(config, layer_updates=order), p,
                                            cc.input_drive(p, x))[2]
                         for order in ('synchronous', 'sequential')])(params)
  assert [np.asarray(a).tolist() for a in steps] == [[7] * BATCH, [4] * BATCH]
  assert cc.steps_for(_with(config, layer_updates='sequential'), 8) == 4


def test_update_orders_reach_the_same_fixed_point_and_the_same_dbeta():
  _, _, _, _, u_sync, exact_sync, delta_sync, _ = network()
  _, _, _, _, u_seq, exact_seq, delta_seq, _ = network(layer_updates='sequential')
  for a, b in zip(u_sync + exact_sync + delta_sync, u_seq + exact_seq + delta_seq):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_half_precision_free_phase_returns_a_full_precision_state_near_the_fixed_point():
  config, params, x, _, u_free, *_ = network()
  dtypes = ('bfloat16', 'float16')
  out = JIT(lambda p, x: [cc.free_relaxation(_with(config, free_dtype=dtype), p,
                                             cc.input_drive(p, x)) for dtype in dtypes])(
                                                 params, x)
  for dtype, (u_half, res, _) in zip(dtypes, out):
    tol = 0.05 if dtype == 'bfloat16' else 0.01
    for a, b in zip(u_half, u_free):
      assert a.dtype == b.dtype
      np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max())
    assert -5 < float(res) < 0  # half-precision noise, measured in full precision
  assert cc.resolve_free_dtype(_with(config, free_dtype='auto')) == (
      jnp.bfloat16 if jax.default_backend() == 'gpu' else None)
  assert cc.resolve_free_dtype(_with(config, free_dtype='float32')) is None
  assert cc.resolve_free_dtype(_with(config, free_dtype='float16')) == jnp.float16
  # An unknown dtype is refused by check_config, before anything runs.
  full = cifar10_config.get_config()
  full.free_dtype = 'float8'
  with pytest.raises(harness.ConfigError, match="unknown free_dtype 'float8'"):
    cc.check_config(full, num_local_devices=1)


# ------------------------------------------------------------- EP vs RBP (Eqs. 5, 10)

def test_tied_kernels_make_k_symmetric_and_hep_equal_rbp():
  _, _, _, _, _, exact, delta, dense_all = network(tied=True, small=True)
  for i, (k, _, _) in enumerate(dense_all):
    np.testing.assert_allclose(k, k.T, atol=1e-13)
    assert np.abs(k).max() > 0.1
    np.testing.assert_allclose(sample(exact, i), sample(delta, i), rtol=1e-9, atol=1e-12)
    assert np.linalg.norm(sample(delta, i)) > 1e-3


def test_untied_dbeta_and_rbp_delta_equal_the_dense_solves():
  _, _, _, _, _, exact, delta, dense_all = network()
  for i, (k, d, g) in enumerate(dense_all):
    assert np.abs(k - k.T).max() > 0.1 * np.abs(k).max()
    np.testing.assert_allclose(sample(exact, i), dbeta_s_dense(k, d, g), rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(sample(delta, i), rbp_delta_dense(k, d, g), rtol=1e-9,
                               atol=1e-12)
    # ... and the asymmetry is real: hEP and RBP disagree here.
    assert np.linalg.norm(sample(exact, i) - sample(delta, i)) > 0.02 * np.linalg.norm(
        sample(delta, i))


def test_cauchy_estimates_converge_to_the_exact_dbeta():
  config, params, x, labels, u_free, exact, _, _ = network(small=True)
  cases = ((1e-3, 2), (0.4, 2), (0.4, 4), (0.2, 4))

  @JIT
  def errors(params, u_free, exact):
    relax = cc.nudged_relaxation(config, params, cc.input_drive(params, x), labels, u_free)
    s0, exact = cc.activate(u_free), flatten(exact)
    def error(beta, n):
      estimate = flatten(common.cauchy_estimate(relax, s0, beta, n))
      return jnp.linalg.norm(estimate - exact) / jnp.linalg.norm(exact)
    return [error(beta, n) for beta, n in cases]
  error = dict(zip(cases, map(float, errors(params, u_free, exact))))
  assert error[1e-3, 2] < 1e-5  # O(beta^2)
  assert error[0.4, 2] > 1e-3
  assert error[0.4, 4] < 0.1 * error[0.4, 2]  # complex N = 4: O(beta^4) ...
  assert 16 * 0.6 < error[0.4, 4] / error[0.2, 4] < 16 * 1.6  # ... s*(beta) is holomorphic


# ------------------------------------------------------------------------ gradients

def unrolled_free_loss_grads(config, params, x, labels, steps):
  """Reverse-mode autodiff through `steps` synchronous free steps from zeros (a scan): the
  implicit-function gradient of the loss at the fixed point, readout frozen (traceable)."""
  def loss(p):
    p = {**p, 'readout': jax.lax.stop_gradient(p['readout'])}
    x_drive = cc.input_drive(p, x)
    u, _ = jax.lax.scan(lambda u, _: (cc.drives(config, p, cc.activate(u), x_drive), None),
                        cc.zeros_state(config, BATCH), None, length=steps)
    return cc.readout_loss(p, cc.sigma(u[-1]), labels)[0]
  return jax.grad(loss)(params)


def network_part(tree):
  return {k: tree[k] for k in ('forward', 'backward')}


def test_gradients_of_exact_hep_and_rbp_equal_the_dense_and_implicit_references():
  config, params, x, labels, u_free, exact, delta, dense_all = network()
  dense_dbeta = unflatten_batch(np.stack([dbeta_s_dense(*q) for q in dense_all]),
                                u_free)
  dense_delta = unflatten_batch(np.stack([rbp_delta_dense(*q) for q in dense_all]),
                                u_free)

  @JIT
  def run(params, errors):
    s_free = cc.activate(u_free)
    grads = jax.vmap(lambda e: conv_grads(config, params, x, s_free, e))(errors)
    return ([jax.tree_util.tree_map(lambda a: a[i], grads) for i in range(4)],
            unrolled_free_loss_grads(config, params, x, labels, 120))
  errors = jax.tree_util.tree_map(lambda *a: np.stack(a), exact, dense_dbeta, delta,
                                  dense_delta)
  (hep, hep_dense, rbp, rbp_dense), true = np_tree(run(params, errors))
  # hEP exact: (dG/dtheta)^T d_beta s*, and RBP, each against its dense solve.
  assert_trees_close(hep, hep_dense, 1e-9)
  assert_trees_close(rbp, rbp_dense, 1e-9)
  # RBP is the true gradient: autodiff through 120 unrolled steps of the free dynamics.
  assert_trees_close(network_part(rbp), network_part(true), 1e-8)
  assert not np.any(rbp['readout']['w'])
  # The untied hEP gradient is biased, but along the gradient, not against it.
  assert 0 < tree_cosine(network_part(hep), network_part(true)) < 1 - 1e-6


def test_tied_exact_hep_gradient_is_the_true_gradient():
  config, params, x, labels, u_free, exact, _, _ = network(tied=True, small=True)
  hep, true = np_tree(JIT(lambda p: (conv_grads(config, p, x, cc.activate(u_free), exact),
                                     unrolled_free_loss_grads(config, p, x, labels, 120)))(
                                         params))
  assert hep['backward'] == [] and len(hep['forward']) == 2
  assert_trees_close(network_part(hep), network_part(true), 1e-8)


@pytest.mark.parametrize('layer_updates', ['synchronous', 'sequential'])
def test_bptt_equals_autodiff_and_converges_to_rbp(layer_updates):
  config, params, x, labels, u_free, _, delta, _ = network(small=True)
  config = _with(config, layer_updates=layer_updates)  # same fixed point for both orders

  def unrolled(p):  # T_nudge = 3 (synchronous) steps by hand, from the free fixed point
    p = {**p, 'readout': jax.lax.stop_gradient(p['readout'])}
    step = cc.make_step(config, p, cc.input_drive(p, x))
    u = u_free
    for _ in range(cc.steps_for(config, 3)):  # 3, or 2 sequential ones
      u = step(u)
    return cc.readout_loss(p, cc.sigma(u[-1]), labels)[0]

  @JIT
  def run(p):
    return (cc.bptt_grads(_with(config, t_nudge=3), p, x, labels, u_free),
            jax.grad(unrolled)(p), cc.bptt_grads(config, p, x, labels, u_free),
            conv_grads(config, p, x, cc.activate(u_free), delta))
  short, by_hand, long, rbp = np_tree(run(params))
  assert_trees_close(short, by_hand, 1e-12)
  assert_trees_close(network_part(long), network_part(rbp), 1e-8)


# ------------------------------------------------------------------ homeostatic loss

def test_homeostatic_estimator_and_its_gradient_match_the_dense_jacobian():
  config, params, x, labels = tiny(small=True)
  config.homeo_draws, config.homeo_coef = 1000, 2.0  # 1000 draws: the mean is within ~1.5 %

  @JIT
  def run(params):
    noise = cc.homeostatic_noise(config, jax.random.PRNGKey(3), jnp.arange(BATCH))
    x_drive = cc.input_drive(params, x)
    u_free, res, _ = cc.free_relaxation(config, params, x_drive)
    s = cc.activate(u_free)

    def exact_loss(p):  # mean over samples of (||J||^2 - tr J^2) / n, dense J = dF/ds
      x_drive = cc.input_drive(p, x)
      def per_sample(i):
        field = lambda z: common.tree_sub(cc.drives(config, p, z, x_drive[i:i + 1]), z)
        return common.homeostatic_loss_exact(common.flat_jacobian(field, one(s, i)))
      return sum(per_sample(i) for i in range(BATCH)) / BATCH
    k = conv_dense(config, params, x_drive, labels, u_free)[0][0]
    return (noise, res, k, jax.value_and_grad(exact_loss)(params),
            cc.homeostatic_grads(config, params, x, s, noise))
  noise, res, k, (exact, exact_grad), (value, grads) = np_tree(run(params))
  assert [e.shape for e in noise] == [(1000, BATCH, 4, 4, 3), (1000, BATCH, 1, 1, 4)]
  assert float(res) < -10
  a = (k - k.T) / 2
  assert common.homeostatic_loss_exact(k - np.eye(len(k))) == pytest.approx(
      2 * np.sum(a ** 2) / len(k), rel=1e-12)
  assert float(value) == pytest.approx(float(exact), rel=0.05)
  assert float(exact) > 1e-2
  assert not np.any(grads['readout']['w'])  # only the network is touched
  g, e = np_flat(network_part(grads)), np_flat(network_part(exact_grad))
  assert np.linalg.norm(g - 2.0 * e) / np.linalg.norm(2.0 * e) < 0.1


def test_homeostatic_noise_is_drawn_per_sample():
  config = get_config()
  whole, first, second = np_tree(JIT(lambda key: [
      cc.homeostatic_noise(config, key, ids)
      for ids in (jnp.arange(6), jnp.arange(3), jnp.arange(3) + 3)])(jax.random.PRNGKey(0)))
  for w, a, b in zip(whole, first, second):
    assert w.shape == (config.homeo_draws, 6, *a.shape[2:])
    np.testing.assert_array_equal(w, np.concatenate([a, b], axis=1))


# -------------------------------------------------------------------- symmetry measure

def test_symmetry_estimate_matches_the_dense_measure():
  untied, tied = network(small=True), network(tied=True, small=True)

  @JIT
  def run(untied_params, tied_params):
    return [cc.symmetry_estimate(config, p, cc.activate(u), cc.input_drive(p, x),
                                 jax.random.PRNGKey(0), 400)
            for (config, _, x, _, u, *_), p in ((untied, untied_params), (tied, tied_params))]
  estimates = run(untied[1], tied[1])
  for net, estimate in zip((untied, tied), estimates):
    expected = [float(common.symmetry_measure(k - np.eye(len(k)))) for k, _, _ in net[-1]]
    assert estimate.shape == (BATCH,)
    if net is tied:
      np.testing.assert_allclose(estimate, 1.0, atol=1e-12)
      np.testing.assert_allclose(expected, 1.0, atol=1e-12)
    else:
      assert max(expected) < 0.95
      np.testing.assert_allclose(estimate, expected, rtol=0.03)


# ------------------------------------------------------------ the estimator dispatch

def test_compute_grads_assembles_every_algorithm():
  config, params, x, labels = tiny(small=True, t_free=50, t_nudge=50)
  key, ids = jax.random.PRNGKey(7), jnp.arange(BATCH)
  runs = {'hep_exact': dict(homeo_coef=3.0), 'rbp': {}, 'bptt': {},
          'hep': dict(n_points=4, beta=0.05),
          'hep_continuous': dict(n_points=4, beta=0.05, continuous_steps_per_point=50,
                                 continuous_periods=6)}
  configs = {name: _with(config, algorithm=name, **kw) for name, kw in runs.items()}
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(5)
  direction = treedef.unflatten([jnp.asarray(rng.standard_normal(a.shape)) for a in leaves])
  direction['readout'] = jax.tree_util.tree_map(np.zeros_like, direction['readout'])

  @JIT
  def run(params):
    x_drive = cc.input_drive(params, x)
    u_free, _, _ = cc.free_relaxation(config, params, x_drive)
    s_free = cc.activate(u_free)
    exact = common.exact_dbeta(cc.nudged_relaxation(config, params, x_drive, labels, u_free))
    readout = jax.grad(lambda p: cc.readout_loss(p, s_free[-1], labels)[0])(params)
    # The homeostatic loss with the noise of (key, sample_ids) and its derivative along a
    # random direction of the parameters (forward mode: independent of the reverse pass).
    noise = cc.homeostatic_noise(configs['hep_exact'], key, ids)
    homeo_loss = lambda p: common.homeostatic_loss(
        lambda z, xd: cc.drives(config, p, z, xd), s_free, cc.input_drive(p, x), noise)
    references = dict(
        exact=jax.tree_util.tree_map(jnp.add, conv_grads(config, params, x, s_free, exact),
                                     readout),
        homeo=jax.jvp(homeo_loss, (params,), (direction,)),
        readout_metrics=cc.readout_loss(params, s_free[-1], labels))
    return {name: cc.compute_grads(c, params, x, labels, key, ids)
            for name, c in configs.items()}, references
  out, ref = np_tree(run(params))
  exact = ref['exact']  # (dG/dtheta)^T d_beta s* + the readout gradient

  # hep_exact (with homeostasis): the exact estimate + the readout + lambda * d L_homeo.
  grads, metrics = out['hep_exact']
  loss, acc = ref['readout_metrics']
  assert float(metrics['loss']) == pytest.approx(float(loss), rel=1e-12)
  assert set(metrics) == {'loss', 'accuracy', 'top5_accuracy', 'log10_residual', 'homeo_loss',
                          'dropped_samples', 'free_steps', 'free_steps_max'}
  assert float(metrics['free_steps']) == int(metrics['free_steps_max']) == 50  # tol = 0
  assert int(metrics['dropped_samples']) == 0
  assert float(metrics['log10_residual']) < -10
  assert 1 >= float(acc['top5_accuracy']) >= float(acc['accuracy']) >= 0
  value, slope = ref['homeo']
  assert float(metrics['homeo_loss']) == pytest.approx(float(value), rel=1e-10)
  added = jax.tree_util.tree_map(np.subtract, grads, exact)
  assert np.abs(np_flat(added['readout'])).max() < 1e-12
  along = np_flat(added) @ np_flat(direction)
  assert float(along) == pytest.approx(3.0 * float(slope), rel=1e-8)
  assert abs(float(slope)) > 1e-4
  # RBP (adjoint fixed point) and BPTT over T_nudge steps agree, and differ from hEP (untied).
  rbp, metrics = out['rbp']
  assert 'homeo_loss' not in metrics
  assert_trees_close(network_part(out['bptt'][0]), network_part(rbp), 1e-8)
  assert_trees_close(rbp['readout'], exact['readout'], 1e-12)
  assert tree_cosine(network_part(rbp), network_part(exact)) < 1 - 1e-6
  # Cauchy N = 4 (complex) and continuous time approximate the exact estimate.
  assert_trees_close(out['hep'][0], exact, 1e-5)
  continuous, metrics = out['hep_continuous']
  assert 'log10_residual' not in metrics
  assert tree_cosine(continuous, exact) > 0.99


def test_early_stopping_changes_the_estimate_only_by_the_residual_it_stops_at():
  """tol > 0 stops the free phase once every sample's update is below tol: the gradient
  then differs from the converged one by about tol (the distance left to the fixed point),
  and the metrics say how many steps the samples needed."""
  config, params, x, labels = tiny(small=True, t_free=300, t_nudge=60, homeo_coef=0.0)
  key, ids = jax.random.PRNGKey(7), jnp.arange(BATCH)
  tols = (0.0, 1e-3, 1e-6)
  run = JIT(lambda p: [cc.compute_grads(_with(config, tol=tol), p, x, labels, key, ids)
                       for tol in tols])
  (reference, ref_metrics), *early = np_tree(run(params))
  assert float(ref_metrics['log10_residual']) < -12
  assert float(ref_metrics['free_steps']) == int(ref_metrics['free_steps_max']) == 300
  errors = []
  for tol, (grads, metrics) in zip(tols[1:], early):
    assert float(metrics['log10_residual']) < np.log10(tol)
    mean, most = float(metrics['free_steps']), int(metrics['free_steps_max'])
    assert 1 < mean <= most < 300
    errors.append(np.abs(np_flat(grads) - np_flat(reference)).max()
                  / np.abs(np_flat(reference)).max())
  assert errors[0] < 10 * 1e-3 and errors[1] < 10 * 1e-6
  assert errors[0] > 1e-6  # the tolerance does show: tol 1e-3 is a visible change


def data_config(**overrides):
  c = cifar10_config.get_config()
  c.update(overrides)
  c.num_classes = cc.DATASETS[c.dataset]['num_classes'] if c.dataset in cc.DATASETS else 10
  return c


def opt_config(**overrides):
  c = ml_collections.ConfigDict(dict(optimizer='sgd', learning_rate=0.1, momentum=0.0,
                                     weight_decay=0.0, readout_wd_factor=2.0,
                                     lr_factors=(25.0, 15.0, 10.0, 8.0, 5.0)))
  c.update(overrides)
  return c


# ======================================================================================
# Loading
# ======================================================================================

@pytest.fixture
def mock_tfds(monkeypatch):
  """TFDS with random data; the preparation checks pass (mock_data fakes the preparation)."""
  monkeypatch.setattr(harness, 'preparation_problem', lambda name, data_dir, url: None)
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


@pytest.mark.parametrize('dataset', ['cifar10', 'cifar100'])
def test_tfds_load_shapes(mock_tfds, dataset):
  data = cc.load_data(data_config(dataset=dataset))
  for split in (data.train, data.test):
    x, y = split.images, split.labels
    assert len(split) == 24
    assert x.shape == (24, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (24,) and y.dtype == np.int32
    assert 0 <= y.min() and y.max() < cc.DATASETS[dataset]['num_classes']
    bx, by = split.read(np.array([5, 0, 5]))  # gathers rows, in the order asked
    np.testing.assert_array_equal(bx, x[[5, 0, 5]])
    np.testing.assert_array_equal(by, y[[5, 0, 5]])
  assert cc.DATASETS[dataset]['num_classes'] == {'cifar10': 10, 'cifar100': 100}[dataset]
  # The train step's input: per-channel (x / 255 - mean) / std with the data set's constants.
  info = cc.DATASETS[dataset]
  np.testing.assert_allclose(
      cc.preprocess(data_config(dataset=dataset), data.train.images[:2]),
      (data.train.images[:2] / 255 - np.array(info['mean'])) / np.array(info['std']),
      rtol=1e-5, atol=1e-6)


def test_subset_sizes(mock_tfds):
  data = cc.load_data(data_config(train_size=10, test_size=5))
  assert len(data.train) == len(data.train.images) == len(data.train.labels) == 10
  assert len(data.test) == len(data.test.images) == 5
  with pytest.raises(harness.ConfigError, match='train_size=30 but only 24'):
    cc.load_data(data_config(train_size=30))  # allowed for CIFAR, more than the mock has


@pytest.mark.parametrize('overrides, match', [
    (dict(train_size=50001), 'train_size must be <= 50000'),
    (dict(train_size=-1), 'train_size must be >= 0'),
    (dict(test_size=10001), 'test_size must be <= 10000'),
    (dict(dataset='fashion_mnist', train_size=60001), 'train_size must be <= 60000'),
    (dict(dataset='imagenet'), "unknown dataset 'imagenet'.*cifar10, cifar100, fashion_mnist"),
])
def test_bad_data_config(overrides, match):
  with pytest.raises(harness.ConfigError, match=match):  # checked before anything is loaded
    cc.check_config(data_config(**overrides), num_local_devices=1)


def test_fail_fast_without_tensorflow(tmp_path, monkeypatch):
  """Nothing prepared in the folder and no TensorFlow to prepare it: one line, no download."""
  monkeypatch.setattr(harness, 'tensorflow_installed', lambda: False)
  monkeypatch.setattr(harness, 'url_reachable',
                      lambda *a, **k: pytest.fail('no download check without TensorFlow'))
  with pytest.raises(harness.ConfigError, match='cifar10 is not prepared in .*; preparing it '
                     'needs TensorFlow') as e:
    cc.load_data(data_config(tfds_data_dir=str(tmp_path / 'none')))
  assert 'tfds_data_dir' in str(e.value) and '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'none' / 'cifar10')


def test_fail_fast_without_internet(tmp_path, monkeypatch, silent_server):
  """With TensorFlow present, an unreachable download host fails within the timeout."""
  monkeypatch.setattr(harness, 'tensorflow_installed', lambda: True)
  monkeypatch.setitem(cc.DATASETS['cifar100'], 'url', silent_server)
  start = time.time()
  with pytest.raises(harness.ConfigError, match='cannot be reached') as e:
    cc.load_data(data_config(dataset='cifar100', tfds_data_dir=str(tmp_path / 'none')))
  assert time.time() - start < 10
  assert silent_server in str(e.value) and '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'none' / 'cifar100')


@pytest.fixture
def fmnist_dir(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (('train', 12), ('t10k', 7)):
    write_idx(tmp_path / f'{split}-images-idx3-ubyte.gz', rng.integers(1, 256, (n, 28, 28)))
    write_idx(tmp_path / f'{split}-labels-idx1-ubyte.gz', rng.integers(0, 10, n))
  return tmp_path


def test_fashion_mnist_32(fmnist_dir):
  data = cc.load_data(data_config(dataset='fashion_mnist', data_dir=str(fmnist_dir)))
  raw = harness.read_idx(fmnist_dir / 'train-images-idx3-ubyte.gz')
  x, y = data.train.images, data.train.labels
  assert x.shape == (12, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int32
  assert data.test.images.shape == (7, 32, 32, 3) and len(data.test) == 7
  assert cc.DATASETS['fashion_mnist']['std'] == (1.5 * 0.3530,) * 3  # its own constants
  np.testing.assert_array_equal(x[:, 2:30, 2:30, 1], raw)
  assert (x[..., 0] == x[..., 2]).all() and (x[..., 0] == x[..., 1]).all()
  border = np.ones((32, 32), bool)
  border[2:30, 2:30] = False
  assert (x[:, border] == 0).all()
  data = cc.load_data(data_config(dataset='fashion_mnist', data_dir=str(fmnist_dir),
                                  train_size=5))
  assert len(data.train) == len(data.train.images) == 5
  with pytest.raises(harness.ConfigError, match='only 12 train images'):
    cc.load_data(data_config(dataset='fashion_mnist', data_dir=str(fmnist_dir),
                             train_size=13))


def corrupt_truncated(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def corrupt_garbage(path):
  path.write_bytes(b'this is not gzip at all' * 10)


def corrupt_bad_stream(path):
  data = bytearray(path.read_bytes())
  data[20:40] = b'\xff' * 20  # inside the deflate stream
  path.write_bytes(bytes(data))


def corrupt_short_payload(path):  # valid gzip, header announces more images than it holds
  with gzip.open(path, 'rb') as f:
    data = f.read()
  with gzip.open(path, 'wb') as f:
    f.write(data[:-100])


def corrupt_header(path):
  with gzip.open(path, 'wb') as f:
    f.write(b'\x00\x00')


@pytest.mark.parametrize('corrupt', [corrupt_truncated, corrupt_garbage, corrupt_bad_stream,
                                     corrupt_short_payload, corrupt_header])
def test_fashion_mnist_corrupt(fmnist_dir, corrupt):
  corrupt(fmnist_dir / 'train-images-idx3-ubyte.gz')
  with pytest.raises(harness.ConfigError, match='train-images-idx3-ubyte.gz is damaged or not '
                     'a gzipped uint8 IDX file') as e:
    cc.load_data(data_config(dataset='fashion_mnist', data_dir=str(fmnist_dir)))
  assert '\n' not in str(e.value)


def test_fashion_mnist_missing(tmp_path):
  with pytest.raises(harness.ConfigError, match='IDX files missing'):
    cc.load_data(data_config(dataset='fashion_mnist', data_dir=str(tmp_path)))


# ======================================================================================
# Augmentation and normalisation
# ======================================================================================

augment = jax.jit(cc.augment)


def candidates(image):
  """All 2 x 25 flips and crops of one image, keyed by (flip, dy, dx)."""
  out = {}
  for flip in (False, True):
    padded = np.pad(image[:, ::-1] if flip else image, ((2, 2), (2, 2), (0, 0)))
    for dy in range(5):
      for dx in range(5):
        out[flip, dy, dx] = padded[dy:dy + 32, dx:dx + 32]
  return out


def test_augment_is_a_flip_and_crop_of_the_padded_image():
  rng = np.random.default_rng(0)
  image = rng.integers(1, 256, (32, 32, 3)).astype(np.uint8)  # no zero pixel of its own
  n = 400
  out = np.asarray(augment(jax.random.PRNGKey(0), np.repeat(image[None], n, 0),
                           jnp.arange(n)))
  assert out.dtype == np.uint8 and out.shape == (n, 32, 32, 3)
  found = []
  for augmented in out:
    matches = [k for k, c in candidates(image).items() if np.array_equal(c, augmented)]
    assert len(matches) == 1
    found.append(matches[0])
    flip, dy, dx = matches[0]
    zero_rows = np.nonzero((augmented == 0).all(axis=(1, 2)))[0]
    assert len(zero_rows) == abs(dy - 2)  # the black border of the shifted window
    assert (augmented == 0).any() == ((dy, dx) != (2, 2))
  assert {(dy, dx) for _, dy, dx in found} == {(a, b) for a in range(5) for b in range(5)}
  assert 0.4 < np.mean([f for f, _, _ in found]) < 0.6


def test_augment_per_sample_deterministic_and_split_invariant():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)
  ids = jnp.arange(100, 116)
  key = jax.random.PRNGKey(3)
  whole = np.asarray(augment(key, images, ids))
  np.testing.assert_array_equal(whole, augment(key, images, ids))
  halves = np.concatenate([augment(key, images[:8], ids[:8]), augment(key, images[8:], ids[8:])])
  np.testing.assert_array_equal(whole, halves)
  # The randomness belongs to the id, not to the position in the batch.
  perm = rng.permutation(16)
  np.testing.assert_array_equal(whole[perm], augment(key, images[perm], ids[perm]))
  # Identical images get different flips/crops; another key gives other draws.
  same = np.asarray(augment(key, np.repeat(images[:1], 16, 0), ids))
  assert len({s.tobytes() for s in same}) > 8
  assert not np.array_equal(whole, augment(jax.random.PRNGKey(4), images, ids))


def test_augment_float_and_normalize():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  key, ids = jax.random.PRNGKey(0), jnp.arange(4)
  as_float = augment(key, images.astype(np.float32), ids)
  assert as_float.dtype == jnp.float32
  np.testing.assert_array_equal(as_float, np.asarray(augment(key, images, ids), np.float32))
  for info in cc.DATASETS.values():
    x = jax.jit(lambda im, info=info: cc.normalize(im, info['mean'], info['std']))(images)
    assert x.dtype == jnp.float32
    expected = (images / 255.0 - np.asarray(info['mean'])) / np.asarray(info['std'])
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cc.DATASETS['cifar10']['std'],
                             [0.30345, 0.2991, 0.3015], rtol=1e-12)


# ======================================================================================
# Host-side iteration
# ======================================================================================

def test_epoch_batches():
  """An epoch of a MemorySplit as the train loop reads it (one process)."""
  x = np.arange(103 * 4, dtype=np.uint8).reshape(103, 2, 2, 1)
  y = np.arange(103, dtype=np.int32)
  split = harness.MemorySplit(x, y)
  epoch = lambda e, threads=1: list(harness.read_batches(
      split, harness.process_batch_indices(len(split), 10, seed=0, epoch=e), threads))
  batches = epoch(1)
  assert len(batches) == 10  # the last 3 images are dropped
  seen = np.concatenate([b[1] for b in batches])
  assert len(set(seen.tolist())) == 100
  for bx, by in batches:
    assert bx.dtype == np.uint8 and by.dtype == np.int32
    np.testing.assert_array_equal(bx, x[by])
  again = np.concatenate([b[1] for b in epoch(1, threads=3)])
  other = np.concatenate([b[1] for b in epoch(2)])
  np.testing.assert_array_equal(seen, again)
  assert not np.array_equal(seen, other)
  np.testing.assert_array_equal(
      seen, np.random.default_rng([0, 1]).permutation(103)[:100])


# ======================================================================================
# Optimizer
# ======================================================================================

def tiny_params(num_layers, tied=False, dtype=np.float64):
  """The parameter tree of the network with L layers, every leaf a different constant
  (tied: no backward kernels, an empty 'backward' list as init_params makes it)."""
  counter = iter(range(1, 100))
  leaf = lambda shape: np.full(shape, 0.1 * next(counter), dtype)
  params = {'forward': [{'w': leaf((3, 2)), 'b': leaf(2)} for _ in range(num_layers)],
            'readout': {'w': leaf((2, 4)), 'b': leaf(4)}, 'backward': []}
  if not tied:
    params['backward'] = [{'w': leaf((2, 3))} for _ in range(num_layers - 1)]
  return params


def expected_factors(params, lr_factors):
  """lr factor of every leaf by the rule of the paper, written out independently."""
  num_layers = len(params['forward'])
  out = {'forward': [{k: lr_factors[l] for k in p} for l, p in enumerate(params['forward'])],
         'readout': {k: lr_factors[num_layers] for k in params['readout']}}
  if 'backward' in params:
    out['backward'] = [{k: lr_factors[l + 1] for k in p}
                       for l, p in enumerate(params['backward'])]
  return out


OPTIMIZER_CASES = [(4, False, (25.0, 15.0, 10.0, 8.0, 5.0)), (3, False, (25.0, 15.0, 10.0, 5.0)),
                   (2, False, (3.0, 2.0, 0.5)), (3, True, (25.0, 15.0, 10.0, 5.0)),
                   (2, True, (3.0, 2.0, 0.5))]


@pytest.mark.parametrize('num_layers, tied, lr_factors', OPTIMIZER_CASES)
def test_layer_groups_and_factors(num_layers, tied, lr_factors):
  params = tiny_params(num_layers, tied)
  groups = cc.layer_groups(params)
  assert jax.tree_util.tree_structure(groups) == jax.tree_util.tree_structure(params)
  names = cc.group_names(num_layers)
  assert groups['forward'][0]['w'] == names[0] == 'in-1'
  assert groups['readout']['b'] == 'readout' and names[-2].endswith('-out')
  factors = expected_factors(params, lr_factors)
  lr, wd, wd_ro = 0.1, 1e-2, 2.0
  zero = jax.tree_util.tree_map(np.zeros_like, params)
  one = jax.tree_util.tree_map(np.ones_like, params)

  def first_update(grads, weight_decay):
    config = opt_config(lr_factors=lr_factors, weight_decay=weight_decay,
                        readout_wd_factor=wd_ro)
    optimizer = cc.make_optimizer(config, steps_total=100)
    return optimizer.update(grads, optimizer.init(params), params)[0]

  # Zero gradient: the update is the weight decay alone, with the readout's factor 2.
  decay = first_update(zero, wd)
  wd_factor = jax.tree_util.tree_map(lambda _: 1.0, params)
  wd_factor['readout'] = {'w': wd_ro, 'b': wd_ro}
  expected = jax.tree_util.tree_map(lambda f, g, p: -lr * f * wd * g * p,
                                    factors, wd_factor, params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12),
                         decay, expected)
  # Unit gradient without decay: -lr * factor on every leaf.
  unit = first_update(one, 0.0)
  jax.tree_util.tree_map(
      lambda u, f: np.testing.assert_allclose(u, np.full_like(u, -lr * f), rtol=1e-12),
      unit, factors)


def test_layer_groups_refuse_unknown_trees():
  params = tiny_params(3)
  with pytest.raises(ValueError, match='3 backward entries for 3 forward layers'):
    cc.layer_groups({**params, 'backward': params['backward'] + params['backward'][:1]})
  with pytest.raises(ValueError, match=r"outside the known groups: \['extra'\]"):
    cc.layer_groups({**params, 'extra': {'w': np.zeros(2)}})


@pytest.mark.parametrize('overrides, match', [
    (dict(channels=(8, 8, 8)), 'lr_factors needs 4 entries .in-1, each pair of layers, '
     'readout. for 3 layers'),
    (dict(lr_factors=(25.0, 15.0, 0.0, 8.0, 5.0)), 'lr_factors must be positive'),
    (dict(optimizer='rmsprop'), 'unknown optimizer'),
    (dict(momentum=1.0), 'momentum must be <= 0.999'),
    (dict(learning_rate=0.0), 'learning_rate must be > 0'),
    (dict(weight_decay=-1.0), 'weight_decay must be >= 0'),
    (dict(readout_wd_factor=float('nan')), 'readout_wd_factor must be finite'),
])
def test_bad_optimizer_config(overrides, match):
  with pytest.raises(harness.ConfigError, match=match):
    cc.check_config(data_config(**overrides), num_local_devices=1)


def cosine(lr, step, total):
  return lr * 0.5 * (1 + np.cos(np.pi * min(step, total) / total))


def test_momentum_weight_decay_and_cosine_over_steps():
  """Two steps and the end of the schedule against the numpy formulas (torch SGD)."""
  params = tiny_params(2)
  lr_factors, lr, wd, mom, total = (3.0, 2.0, 0.5), 0.1, 1e-2, 0.9, 5
  factors = expected_factors(params, lr_factors)
  wd_factor = jax.tree_util.tree_map(lambda _: 1.0, params)
  wd_factor['readout'] = {'w': 2.0, 'b': 2.0}
  optimizer = cc.make_optimizer(
      opt_config(lr_factors=lr_factors, weight_decay=wd, momentum=mom), steps_total=total)
  rng = np.random.default_rng(0)
  state = optimizer.init(params)
  p = params
  ref_p = params
  ref_buf = jax.tree_util.tree_map(np.zeros_like, params)
  for step in range(total + 1):
    grads = jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape), params)
    updates, state = optimizer.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    ref_buf = jax.tree_util.tree_map(lambda b, g, q, w: mom * b + g + wd * w * q,
                                     ref_buf, grads, ref_p, wd_factor)
    ref_p = jax.tree_util.tree_map(lambda q, b, f: q - cosine(lr, step, total) * f * b,
                                   ref_p, ref_buf, factors)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), p, ref_p)
    if step == total:  # the schedule has reached zero: no more change
      assert all(np.all(u == 0) for u in jax.tree_util.tree_leaves(updates))
  schedule = optax.cosine_decay_schedule(lr, decay_steps=total)
  assert float(schedule(total)) == 0.0 and float(schedule(0)) == lr


def test_adam_keeps_factors_and_schedule():
  params = tiny_params(2)
  lr_factors = (3.0, 2.0, 0.5)
  optimizer = cc.make_optimizer(opt_config(optimizer='adam', lr_factors=lr_factors,
                                           learning_rate=1e-3), steps_total=10)
  grads = jax.tree_util.tree_map(lambda a: -2.0 * np.ones_like(a), params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  # First Adam step: g / (|g| + eps) = sign(g), times lr * factor.
  jax.tree_util.tree_map(
      lambda u, f: np.testing.assert_allclose(u, np.full_like(u, 1e-3 * f), rtol=1e-6),
      updates, expected_factors(params, lr_factors))


def test_optimizer_under_jit_float32():
  params = tiny_params(4, dtype=np.float32)
  optimizer = cc.make_optimizer(opt_config(momentum=0.9, weight_decay=1e-4), steps_total=10)
  state = optimizer.init(params)

  @jax.jit
  def step(p, s, g):
    u, s = optimizer.update(g, s, p)
    return optax.apply_updates(p, u), s
  grads = jax.tree_util.tree_map(np.ones_like, params)
  for _ in range(3):
    params, state = step(params, state, grads)
  assert all(a.dtype == jnp.float32 and np.isfinite(a).all()
             for a in jax.tree_util.tree_leaves(params))


# ======================================================================================
# End to end, config checks
# ======================================================================================

# The config overrides of a short run of a reduced-width network with short relaxations.
CIFAR_SMALL_CONFIG = dict(channels=(4, 8, 8, 8), t_free=12, t_nudge=6, train_size=32,
                          test_size=16, batch_size=16, eval_batch_size=8, diag_batch_size=4,
                          diag_symmetry_probes=2, homeo_draws=2, log_every_steps=1)

RUN_ON_MOCK_DATA = '''
import json, sys
import tensorflow_datasets as tfds
from absl import logging
import cifar_conv
import harness
from configs import cifar10, cifar100
logging.set_verbosity(logging.INFO)  # the progress lines, as under app.run
# mock_data fakes the preparation; skip the download checks (TensorFlow, internet).
harness.preparation_problem = lambda name, data_dir, url: None
save = harness.Workdir.save

def save_then_die(self, epoch, row, state):  # as a kill right after a checkpoint
  save(self, epoch, row, state)
  raise KeyboardInterrupt

for name, workdir, overrides, killed in json.loads(sys.argv[1]):
  config = {'cifar10': cifar10, 'cifar100': cifar100}[name].get_config()
  config.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
  harness.Workdir.save = save_then_die if killed else save
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    try:
      rows = cifar_conv.train_and_evaluate(config, workdir)
      print('ROW', json.dumps(rows[-1]))
    except KeyboardInterrupt:
      print('KILLED')
    except harness.ConfigError as e:
      print('REFUSED', e)
'''


def run_on_mock_data(runs, env=None):
  out = run_script('-c', [RUN_ON_MOCK_DATA, json.dumps(runs)], env)
  assert out.returncode == 0, out.stderr[-3000:]
  return out, [json.loads(l[4:]) for l in out.stdout.splitlines() if l.startswith('ROW ')]


@pytest.mark.slow
def test_mock_cifar100_trains_writes_metrics_and_a_checkpoint_and_resumes(tmp_path):
  """hEP N = 2 with homeostasis on CIFAR-100's pipeline (TFDS mock data): killed after its
  first checkpoint, resumed, and refused as another run where num_epochs changes."""
  hundred = str(tmp_path / 'c100')
  two = dict(CIFAR_SMALL_CONFIG, num_epochs=2, algorithm='hep', n_points=2)
  out, _ = run_on_mock_data([('cifar100', hundred, two, True)])  # killed after epoch 1
  assert 'workdir: ' in out.stderr and 'step 2/2' in out.stderr and 'KILLED' in out.stdout
  assert [r['epoch'] for r in read_rows(hundred)] == [1]
  # The killed run resumes after its epoch-1 checkpoint, on another log interval (a field a
  # resumed run may change); a longer run is another run (num_epochs fixes the cosine
  # schedule). (Bit-identity of a resume: tests/test_harness.py.)
  out, (row,) = run_on_mock_data([('cifar100', hundred, dict(two, log_every_steps=2), False),
                                  ('cifar100', hundred, dict(two, num_epochs=3), False)])
  assert 'resuming' in out.stderr and 'epoch 1  step' not in out.stderr
  assert f'after {CIFAR_SMALL_CONFIG["t_free"]} steps (max {CIFAR_SMALL_CONFIG["t_free"]})' in out.stderr
  assert 'REFUSED' in out.stdout and 'different config (num_epochs)' in out.stdout
  rows = read_rows(hundred)
  assert [r['epoch'] for r in rows] == [1, 2] and rows[1] == row
  for key in ('train_loss', 'train_accuracy', 'train_top5_accuracy', 'test_error',
              'test_top5_error', 'images_per_s', 'epoch_time_s', 'log10_residual',
              'dropped_samples', 'free_steps', 'free_steps_max', 'train_homeo_loss',
              'diag/symmetry', 'diag/cosine_exact', 'diag/cosine_estimate', 'diag/weight_angle',
              'diag/homeo_loss'):
    assert key in row, key
  assert row['free_steps'] == row['free_steps_max'] == CIFAR_SMALL_CONFIG['t_free']  # tol 0
  assert np.isfinite(row['train_loss']) and 0 <= row['test_top5_error'] <= row['test_error']
  assert len(row['diag/cosine_exact']) == len(row['diag/cosine_estimate']) == 4
  assert len(row['diag/weight_angle']) == 3 and 0.5 < row['diag/symmetry'] <= 1
  assert 'params_sha1' not in row  # one process: nothing to compare
  with open(os.path.join(hundred, 'config.json')) as f:
    saved = json.load(f)
  assert saved['dataset'] == 'cifar100' and saved['channels'] == [4, 8, 8, 8]


@pytest.mark.parametrize('overrides, message', [
    (dict(num_classes=100), 'num_classes=100 but cifar10 has 10 classes'),
    (dict(image_size=28), 'images are 32x32x3'),
    (dict(channels=(128,)), 'channels must be a tuple of >= 2 positive integers'),
    (dict(channels=()), 'channels must be a tuple of >= 2 positive integers'),
    (dict(channels=(8, 0, 8, 8)), 'channels must be a tuple of >= 2 positive integers'),
    (dict(channels=(8, 8, 8, 8, 8), lr_factors=(1.0,) * 6), 'does not fit 5 layers'),
    (dict(free_dtype='float8'), 'unknown free_dtype'),
    (dict(layer_updates='alternating'), 'unknown layer_updates'),
    (dict(learning_rate=float('nan')), 'learning_rate must be finite'),
    (dict(batch_size=255), 'not divisible by the 2 devices'),
    (dict(dataset='imagenet'), 'unknown dataset'),
])
def test_bad_config_is_a_one_line_error(overrides, message):
  config = cifar10_config.get_config()
  config.update(overrides)
  with pytest.raises(harness.ConfigError, match=message) as error:
    cc.check_config(config, num_local_devices=2)
  assert '\n' not in str(error.value)


def test_both_configs_pass_and_differ_only_in_the_data_set():
  ten, hundred = cifar10_config.get_config(), cifar100_config.get_config()
  for config in (ten, hundred):
    assert cc.check_config(config, 1) == 1
  differ = sorted(k for k in ten if ten[k] != hundred[k])
  assert differ == ['dataset', 'max_train_loss', 'num_classes']


def test_hep_with_no_points_runs_as_hep_exact_and_the_config_is_left_as_it_is():
  config = cifar10_config.get_config()
  assert cc.estimator(config) == config.algorithm == 'hep_exact'
  config.update(dict(algorithm='hep', n_points=0))
  assert cc.check_config(config, 1) == 1
  assert (config.algorithm, config.n_points) == ('hep', 0)  # the run config says what was asked
  assert cc.estimator(config) == 'hep_exact'
  config.n_points = 2
  assert cc.estimator(config) == 'hep'
  config.update(dict(algorithm='hep_continuous', n_points=1))
  with pytest.raises(harness.ConfigError, match='hep_continuous needs n_points >= 2, got 1'):
    cc.check_config(config, 1)


@pytest.mark.slow
def test_the_user_command_fails_fast_without_the_data(tmp_path):
  """The user's command where the download cannot be reached (tests/offline_run.py closes
  the address): one line naming the data set and the way out, nothing written."""
  out = run_script('tests/offline_run.py', ['cifar_conv.py', '--config=configs/cifar10.py',
                                            f'--config.tfds_data_dir={tmp_path}/none',
                                            f'--workdir={tmp_path}/w'], timeout=300)
  assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f'cifar_conv.py: error: cifar10 is not prepared in {tmp_path}/none'), last
  assert 'cannot be reached' in last and 'tfds_data_dir' in last, last
  assert not os.path.exists(tmp_path / 'w')

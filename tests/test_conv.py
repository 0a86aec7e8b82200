"""The convolutional network of App. D.2 (cifar_conv.py) against exact references (float64).

A tiny instance (16x16x2 images, channels (2, 3, 4): states 8x8x2, 4x4x3, 1x1x4, n = 180
units; weights scaled so the dynamics contract) is compared with dense linear algebra: the
connectivity Jacobian K = dG/ds from autodiff, d_beta s* = (I - DK)^{-1} D g and RBP's
delta = (I - DK^T)^{-1} D g by dense solves, and gradients by autodiff through long unrolled
relaxations. Tolerances are far below what a sign or factor-of-2 error would produce.
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import common
import harness
import reference
import cifar_conv as cc
from configs import cifar10 as cifar10_config


def net_grads(*args):
  """The network gradient (without its count of dropped samples)."""
  return cc.network_grads(*args)[0]

BATCH = 3
# The tiny float64 problems run in milliseconds; compiling them is what costs time. LLVM's
# optimisation passes dominate those compiles on a CPU, so the tests switch them off.
JIT = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def get_config():
  """A tiny configs/cifar10.py-style config."""
  c = ml_collections.ConfigDict()
  c.seed = 0
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


def flat(tree, i):
  """Sample i of a state tuple as one numpy vector."""
  return np.concatenate([np.ravel(np.asarray(a[i])) for a in tree])


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


def dense(params, x_drive, labels, u_free):
  """K = dG/ds, d = sigma'(u*), g = dL/ds (zero below the top), all samples (traceable)."""
  def per_sample(x_drive, labels, u):
    u_i = tuple(a[None] for a in u)
    s_i = cc.activate(u_i)
    k = common.flat_jacobian(lambda s: cc.drives(params, s, x_drive[None]), s_i)
    ones = jax.tree_util.tree_map(jnp.ones_like, u_i)
    d = reference.flatten(jax.jvp(cc.activate, (u_i,), (ones,))[1])
    g = reference.flatten((*(jnp.zeros_like(s) for s in s_i[:-1]),
                           cc.loss_grad_s(params, s_i[-1], labels[None])))
    return k, d, g
  return jax.vmap(per_sample)(x_drive, labels, u_free)


@functools.lru_cache(maxsize=None)
def network(alpha=60.0, tied=False, layer_updates='synchronous', small=False):
  """Everything the tests compare, computed once per network (one compile): the free fixed
  point, exact d_beta s*, RBP's delta and the dense per-sample (K, d, g) (synchronous only:
  K does not depend on the update order)."""
  config, params, x, labels = tiny(alpha, tied, layer_updates, small)

  @JIT
  def solve(params, x):
    x_drive = cc.input_drive(params, x)
    u_free, res = cc.free_relaxation(config, params, x_drive)
    relax = cc.nudged_relaxation(config, params, x_drive, labels, u_free)
    field = common.tree_sub(cc.drives(params, cc.activate(u_free), x_drive), u_free)
    return (u_free, res, jnp.sqrt(common.per_sample_sq_norm(field)),
            common.exact_dbeta(relax), cc.rbp_error(config, params, x_drive, labels, u_free),
            dense(params, x_drive, labels, u_free) if layer_updates == 'synchronous' else None)
  u_free, res, field, exact, delta, kdg = np_tree(solve(params, x))
  assert float(res) < -10, f'tiny network did not converge: log10 residual {float(res)}'
  assert np.max(field) < 1e-10  # a fixed point of the synchronous dynamics
  dense_all = kdg and [tuple(a[i] for a in kdg) for i in range(BATCH)]
  return config, params, x, labels, u_free, exact, delta, dense_all


def assert_trees_close(a, b, rtol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max() + 1e-15)


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
                                        cc.drives(p, cc.activate(u), cc.input_drive(p, x))),
                       params, x, u)
  assert out[0].shape == u[0].shape
  assert [g.shape for g in out[1]] == [a.shape for a in u]
  for size, channels in ((30, (128, 256, 512, 512)), (8, (2, 3, 4)), (4, (2, 3))):
    c.image_size, c.channels = size, channels
    with pytest.raises(ValueError, match=f'image_size={size} does not fit {len(channels)} '
                       'layers'):  # check_config makes it a ConfigError (test_cifar_script)
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
  for padding in ('SAME', 'VALID'):
    got, got_real = JIT(lambda s, w: (cc.conv(s, w, padding), cc.conv(s.real, w, padding)))(s, w)
    # Reference: the convolution written out as sums over the kernel, complex arithmetic.
    pad = 1 if padding == 'SAME' else 0
    sp = np.pad(np.asarray(s), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h = sp.shape[1] - 2
    expected = sum(np.einsum('bhwc,co->bhwo', sp[:, a:a + h, b:b + h], np.asarray(w)[a, b])
                   for a in range(3) for b in range(3))
    assert got.shape == (2, h, h, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_real, expected.real, rtol=1e-12, atol=1e-12)


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
    gc = cc.drives(params, tuple(a + 1j * eps * b for a, b in zip(s, v)),
                   x_drive.astype(jnp.complex128))
    g0, jv = jax.jvp(lambda z: cc.drives(params, z, x_drive), (s,), (v,))
    z = tuple(a + 0.3j * b for a, b in zip(s, v))
    vc = tuple(b.astype(jnp.complex128) for b in v)
    g = lambda q: cc.drives(params, q, x_drive.astype(jnp.complex128))
    t1 = jax.jvp(g, (z,), (vc,))[1]
    t2 = jax.jvp(g, (z,), (tuple(1j * b for b in vc),))[1]
    tied = cc.drives(tied_params, s, cc.input_drive(tied_params, x))
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
  for dtype, (u_half, res) in zip(dtypes, out):
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
    np.testing.assert_allclose(flat(exact, i), flat(delta, i), rtol=1e-9, atol=1e-12)
    assert np.linalg.norm(flat(delta, i)) > 1e-3


def test_untied_dbeta_and_rbp_delta_equal_the_dense_solves():
  _, _, _, _, _, exact, delta, dense_all = network()
  for i, (k, d, g) in enumerate(dense_all):
    assert np.abs(k - k.T).max() > 0.1 * np.abs(k).max()
    np.testing.assert_allclose(flat(exact, i), reference.dbeta_s_dense(k, d, g), rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(flat(delta, i), reference.rbp_delta_dense(k, d, g), rtol=1e-9,
                               atol=1e-12)
    # ... and the asymmetry is real: hEP and RBP disagree here.
    assert np.linalg.norm(flat(exact, i) - flat(delta, i)) > 0.02 * np.linalg.norm(
        flat(delta, i))


def test_cauchy_estimates_converge_to_the_exact_dbeta():
  config, params, x, labels, u_free, exact, _, _ = network(small=True)
  cases = ((1e-3, 2), (0.4, 2), (0.4, 4), (0.2, 4))

  @JIT
  def errors(params, u_free, exact):
    relax = cc.nudged_relaxation(config, params, cc.input_drive(params, x), labels, u_free)
    s0, exact = cc.activate(u_free), reference.flatten(exact)
    def error(beta, n):
      estimate = reference.flatten(common.cauchy_estimate(relax, s0, beta, n))
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
    u, _ = jax.lax.scan(lambda u, _: (cc.drives(p, cc.activate(u), x_drive), None),
                        cc.zeros_state(config, BATCH), None, length=steps)
    return cc.readout_loss(p, cc.sigma(u[-1]), labels)[0]
  return jax.grad(loss)(params)


def network_part(tree):
  return {k: tree[k] for k in ('forward', 'backward')}


def test_gradients_of_exact_hep_and_rbp_equal_the_dense_and_implicit_references():
  config, params, x, labels, u_free, exact, delta, dense_all = network()
  dense_dbeta = unflatten_batch(np.stack([reference.dbeta_s_dense(*q) for q in dense_all]),
                                u_free)
  dense_delta = unflatten_batch(np.stack([reference.rbp_delta_dense(*q) for q in dense_all]),
                                u_free)

  @JIT
  def run(params, errors):
    s_free = cc.activate(u_free)
    grads = jax.vmap(lambda e: net_grads(params, x, s_free, e))(errors)
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
  hep, true = np_tree(JIT(lambda p: (net_grads(p, x, cc.activate(u_free), exact),
                                     unrolled_free_loss_grads(config, p, x, labels, 120)))(
                                         params))
  assert hep['backward'] == [] and len(hep['forward']) == 2
  assert_trees_close(network_part(hep), network_part(true), 1e-8)


@pytest.mark.parametrize('layer_updates', ['synchronous', 'sequential'])
def test_bptt_equals_autodiff_and_converges_to_rbp(layer_updates):
  config, params, x, labels, u_free, _, delta, _ = network(small=True)
  config = _with(config, layer_updates=layer_updates)  # same fixed point for both orders

  def unrolled(p):  # T_nudge = 3 steps by hand, from the free fixed point
    p = {**p, 'readout': jax.lax.stop_gradient(p['readout'])}
    step = cc.make_step(config, p, cc.input_drive(p, x))
    u = u_free
    for _ in range(3):
      u = step(u)
    return cc.readout_loss(p, cc.sigma(u[-1]), labels)[0]

  @JIT
  def run(p):
    return (cc.bptt_grads(_with(config, t_nudge=3), p, x, labels, u_free),
            jax.grad(unrolled)(p), cc.bptt_grads(config, p, x, labels, u_free),
            net_grads(p, x, cc.activate(u_free), delta))
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
    u_free, res = cc.free_relaxation(config, params, x_drive)
    s = cc.activate(u_free)

    def exact_loss(p):  # mean over samples of (||J||^2 - tr J^2) / n, dense J = dF/ds
      x_drive = cc.input_drive(p, x)
      def per_sample(i):
        field = lambda z: common.tree_sub(cc.drives(p, z, x_drive[i:i + 1]), z)
        return common.homeostatic_loss_exact(common.flat_jacobian(field, one(s, i)))
      return sum(per_sample(i) for i in range(BATCH)) / BATCH
    k = dense(params, x_drive, labels, u_free)[0][0]
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
    return [cc.symmetry_estimate(p, cc.activate(u), cc.input_drive(p, x),
                                 jax.random.PRNGKey(0), 400)
            for (_, _, x, _, u, *_), p in ((untied, untied_params), (tied, tied_params))]
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
    u_free, _ = cc.free_relaxation(config, params, x_drive)
    s_free = cc.activate(u_free)
    exact = common.exact_dbeta(cc.nudged_relaxation(config, params, x_drive, labels, u_free))
    readout = jax.grad(lambda p: cc.readout_loss(p, s_free[-1], labels)[0])(params)
    # The homeostatic loss with the noise of (key, sample_ids) and its derivative along a
    # random direction of the parameters (forward mode: independent of the reverse pass).
    noise = cc.homeostatic_noise(configs['hep_exact'], key, ids)
    homeo_loss = lambda p: common.homeostatic_loss(
        lambda z: cc.drives(p, z, cc.input_drive(p, x)), s_free, noise)
    references = dict(
        exact=jax.tree_util.tree_map(jnp.add, net_grads(params, x, s_free, exact),
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
                          'dropped_samples'}
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

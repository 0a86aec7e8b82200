"""The estimators of common.py against exact linear algebra on a tiny network (float64).

Every reference is computed independently: dense Jacobians with jnp.linalg.solve, autodiff
through long unrolled dynamics, separate relaxations. Tolerances are far below what a sign
or factor-of-2 error would produce.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
import fmnist_mlp as m
from tiny import BATCH, dense, exact_and_rbp, free_fixed_point, sample, tie, tiny_mlp


# ------------------------------------------------------------------------ fixed point

@pytest.mark.parametrize('layer_updates', ['synchronous', 'alternating'])
def test_relaxation_reaches_a_fixed_point_and_matches_a_python_loop(layer_updates):
  config, params, x, _ = tiny_mlp(layer_updates=layer_updates)
  x_drive = m.input_drive(params, x)
  u_free = free_fixed_point(config, params, x)
  field = common.tree_sub(m.drives(params, m.activate(u_free), x_drive), u_free)
  assert np.max(np.sqrt(common.per_sample_sq_norm(field))) < 1e-10

  step = m.make_step(config, params, x_drive)
  u = m.zeros_state(config, BATCH)
  for _ in range(7):
    u = step(u)
  looped, _ = common.fixed_point(step, m.zeros_state(config, BATCH), 7)
  for a, b in zip(u, looped):
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


def test_early_stopping_stops_at_the_tolerance():
  config, params, x, _ = tiny_mlp()
  step = m.make_step(config, params, m.input_drive(params, x))
  u0 = m.zeros_state(config, BATCH)
  _, full = common.fixed_point(step, u0, 400)
  _, early = common.fixed_point(step, u0, 400, tol=1e-4)
  assert -5 <= float(early) < -4 and float(full) < -10


def test_alternating_updates_follow_one_chain_of_the_synchronous_dynamics_exactly():
  """k alternating steps == the synchronous trajectory's odd layers at 2k-1, even at 2k."""
  config, params, x, labels = tiny_mlp(hidden=(6, 5, 4))
  x_drive = m.input_drive(params, x)
  sync = m.make_step(config, params, x_drive)
  config.layer_updates = 'alternating'
  alt = m.make_step(config, params, x_drive)
  trajectory = [m.zeros_state(config, BATCH)]
  for _ in range(12):
    trajectory.append(sync(trajectory[-1]))
  u = m.zeros_state(config, BATCH)
  for k in range(1, 7):
    u = alt(u)
    for l in range(4):
      expected = trajectory[2 * k - 1 if l % 2 == 0 else 2 * k][l]
      np.testing.assert_allclose(u[l], expected, rtol=1e-12, atol=1e-12)
  assert np.abs(trajectory[12][0] - trajectory[11][0]).max() > 1e-3  # not yet converged


# ---------------------------------------------------------------- d_beta s* estimators

def test_exact_dbeta_equals_the_dense_solve():
  config, params, x, labels = tiny_mlp()
  u_free = free_fixed_point(config, params, x)
  relax = m.nudged_relaxation(config, params, m.input_drive(params, x), labels, u_free)
  exact = common.exact_dbeta(relax)
  for i in range(BATCH):
    k, d, g = dense(config, params, x, labels, u_free, i)
    reference = common.dbeta_s_dense(k, d, g)
    np.testing.assert_allclose(sample(exact, i), reference, rtol=1e-9, atol=1e-12)
    assert np.linalg.norm(reference) > 1e-3


@pytest.mark.parametrize('layer_updates', ['synchronous', 'alternating'])
def test_cauchy_estimate_converges_with_n_as_predicted(layer_updates):
  config, params, x, labels = tiny_mlp(layer_updates=layer_updates)
  u_free = free_fixed_point(config, params, x)
  relax = m.nudged_relaxation(config, params, m.input_drive(params, x), labels, u_free)
  exact = common.flatten(common.exact_dbeta(relax))
  s0 = m.activate(u_free)

  @functools.lru_cache(maxsize=None)
  def estimator(n):
    return jax.jit(lambda beta: common.flatten(common.cauchy_estimate(relax, s0, beta, n)))

  def error(n, beta):
    estimate = estimator(n)(beta)
    return float(jnp.linalg.norm(estimate - exact) / jnp.linalg.norm(exact))

  # Every N is consistent: the bias vanishes as |beta| -> 0.
  for n in (1, 2, 3, 4, 6):
    assert error(n, 1e-3) < 2e-3
  # The bias shrinks like |beta|^N: halving |beta| divides it by about 2^N.
  for n in (1, 2, 3, 4):
    ratio = error(n, 0.4) / error(n, 0.2)
    assert 2 ** n * 0.6 < ratio < 2 ** n * 1.6, (n, ratio)
  # At |beta| = 0.5, more points are far better (Table 1: N=4, 6 fix the finite nudge).
  assert error(2, 0.5) < 0.2 * error(1, 0.5)
  assert error(4, 0.5) < 0.2 * error(2, 0.5)
  assert error(6, 0.5) < 0.4 * error(4, 0.5)


def test_cauchy_with_one_point_is_classic_ep_and_two_points_the_symmetric_difference():
  config, params, x, labels = tiny_mlp()
  u_free = free_fixed_point(config, params, x)
  relax = m.nudged_relaxation(config, params, m.input_drive(params, x), labels, u_free)
  s0 = m.activate(u_free)
  beta = 0.3
  plus, minus = relax(jnp.asarray(beta)), relax(jnp.asarray(-beta))
  one = common.cauchy_estimate(relax, s0, beta, 1)
  two = common.cauchy_estimate(relax, s0, beta, 2)
  for l in range(3):
    np.testing.assert_allclose(one[l], (plus[l] - s0[l]) / beta, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(two[l], (plus[l] - minus[l]) / (2 * beta), rtol=1e-10,
                               atol=1e-12)


def test_cauchy_points_use_conjugate_symmetry():
  for n, relaxed in ((1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4)):
    betas, phases, weights = common.cauchy_points(0.5, n)
    assert len(betas) == relaxed == math.ceil((n + 1) / 2)
    assert np.isclose(weights.sum(), n)  # every point on the circle counted once
    np.testing.assert_allclose(betas, 0.5 * phases, atol=1e-7)
    assert (np.iscomplexobj(betas)) == (n >= 3)


def test_continuous_time_estimate_converges_to_the_cauchy_estimate():
  config, params, x, labels = tiny_mlp()
  x_drive = m.input_drive(params, x)
  u_free = free_fixed_point(config, params, x)
  relax = m.nudged_relaxation(config, params, x_drive, labels, u_free)
  beta, n = 0.5, 4
  cauchy = common.flatten(common.cauchy_estimate(relax, m.activate(u_free), beta, n))
  # Eq. 9's limit for N points: the mean over the circle, s*_0 + O(|beta|^N).
  circle = [relax(jnp.asarray(beta * np.exp(2j * np.pi * k / n))) for k in range(n)]
  s_mean = common.flatten(jax.tree_util.tree_map(lambda *a: sum(a).real / n, *circle))
  assert float(jnp.linalg.norm(s_mean - common.flatten(m.activate(u_free)))) < 1e-2
  step = m.make_step(config, params, x_drive, labels)

  def errors(steps_per_point, periods):
    s_bar, e_bar = common.continuous_time_estimate(
        step, m.zeros_state(config, BATCH), m.activate, beta, n, steps_per_point, periods)
    return (float(jnp.linalg.norm(common.flatten(e_bar) - cauchy) / jnp.linalg.norm(cauchy)),
            float(jnp.linalg.norm(common.flatten(s_bar) - s_mean) / jnp.linalg.norm(s_mean)))

  # Two errors: the transient from zeros, which fades like 1 / periods, and the lag of the
  # state behind each switch of beta, which fades like 1 / steps_per_point (Eq. 7 assumes
  # the system is at equilibrium all along). Both vanish together.
  (e_short, s_short), (e_long, s_long) = errors(100, 2), errors(800, 16)
  assert e_long < e_short / 6 and s_long < s_short / 6, (e_short, e_long, s_short, s_long)
  assert e_long < 0.005 and s_long < 0.0005
  assert errors(400, 16)[0] < 0.7 * errors(400, 2)[0]  # more periods help at a fixed pace
  assert errors(60, 16)[0] > 2 * errors(400, 16)[0]  # a fast signal leaves a lag bias


# ------------------------------------------------------------------- EP vs RBP (Eq. 5, 10)

def test_tied_weights_make_k_symmetric_and_hep_equal_rbp():
  config, params, x, labels = tiny_mlp()
  params = tie(params)
  u_free, exact, delta = exact_and_rbp(config, params, x, labels)
  for i in range(BATCH):
    k, d, g = dense(config, params, x, labels, u_free, i)
    np.testing.assert_allclose(k, k.T, atol=1e-14)
    np.testing.assert_allclose(sample(exact, i), sample(delta, i), rtol=1e-8, atol=1e-12)
    assert common.symmetry_measure(k - jnp.eye(len(k))) == pytest.approx(1.0, abs=1e-12)


def test_untied_weights_obey_the_exact_form_of_eq_10():
  config, params, x, labels = tiny_mlp(alpha=80.0)
  u_free, exact, delta = exact_and_rbp(config, params, x, labels)
  for i in range(BATCH):
    k, d, g = dense(config, params, x, labels, u_free, i)
    np.testing.assert_allclose(sample(delta, i), common.rbp_delta_dense(k, d, g), rtol=1e-9,
                               atol=1e-12)
    n = len(k)
    predicted = jnp.linalg.solve(jnp.eye(n) - d[:, None] * k,
                                 (jnp.eye(n) - d[:, None] * k.T) @ sample(delta, i))
    np.testing.assert_allclose(sample(exact, i), predicted, rtol=1e-8, atol=1e-12)
    # ... and the asymmetry is real: hEP and RBP disagree here.
    assert np.linalg.norm(sample(exact, i) - sample(delta, i)) > 0.05 * np.linalg.norm(
        sample(delta, i))


# ------------------------------------------------------------------------- gradients

def _unrolled_loss_grads(config, params, x, labels, steps):
  """Autodiff through `steps` synchronous free steps from zeros: the implicit gradient."""
  def loss(p):
    p = {**p, 'readout': jax.lax.stop_gradient(p['readout'])}
    step = lambda u: m.drives(p, m.activate(u), m.input_drive(p, x))
    u = m.zeros_state(config, BATCH)
    for _ in range(steps):
      u = step(u)
    return m.readout_loss(p, m.sigma(u[-1]), labels)[0]
  return jax.grad(loss)(params)


def _assert_trees_close(a, b, rtol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max() + 1e-15)


def test_rbp_gradient_equals_the_implicit_function_gradient():
  config, params, x, labels = tiny_mlp(alpha=70.0)
  x_drive = m.input_drive(params, x)
  u_free = free_fixed_point(config, params, x)
  delta = m.rbp_error(config, params, x_drive, labels, u_free)
  rbp = m.network_grads(params, x, m.activate(u_free), delta)
  # Reference 1: Eq. 4 with a dense solve per sample, through the same parameter VJP.
  dense_delta = [dense(config, params, x, labels, u_free, i) for i in range(BATCH)]
  dense_delta = np.stack([common.rbp_delta_dense(*q) for q in dense_delta])
  splits = np.cumsum(config.hidden_sizes)
  dense_delta = tuple(jnp.asarray(a) for a in np.split(dense_delta, splits, axis=1))
  _assert_trees_close(rbp, m.network_grads(params, x, m.activate(u_free), dense_delta), 1e-9)
  # Reference 2: reverse-mode autodiff through 600 unrolled steps of the dynamics.
  unrolled = _unrolled_loss_grads(config, params, x, labels, 600)
  _assert_trees_close({k: rbp[k] for k in ('forward', 'backward')},
                      {k: unrolled[k] for k in ('forward', 'backward')}, 1e-8)


def test_hep_gradient_differs_from_the_true_one_only_through_asymmetry():
  config, params, x, labels = tiny_mlp()
  for p, should_match in ((tie(params), True), (params, False)):
    x_drive = m.input_drive(p, x)
    u_free = free_fixed_point(config, p, x)
    exact = common.exact_dbeta(m.nudged_relaxation(config, p, x_drive, labels, u_free))
    hep = m.network_grads(p, x, m.activate(u_free), exact)
    true = _unrolled_loss_grads(config, p, x, labels, 600)
    hep_w, true_w = hep['forward'][0]['w'], true['forward'][0]['w']
    close = np.allclose(hep_w, true_w, rtol=1e-8, atol=1e-10 * np.abs(true_w).max())
    assert close == should_match
    # Same sign convention: the estimate points along the gradient, never against it.
    assert float(jnp.vdot(hep_w, true_w)) > 0


@pytest.mark.parametrize('layer_updates', ['synchronous', 'alternating'])
def test_bptt_equals_autodiff_and_converges_to_rbp(layer_updates):
  config, params, x, labels = tiny_mlp(alpha=70.0, layer_updates=layer_updates, t_nudge=3)
  x_drive = m.input_drive(params, x)
  u_free = free_fixed_point(config, params, x)
  short = m.bptt_grads(config, params, x, labels, u_free)

  def unrolled(p):  # T_nudge = 3 steps by hand, from the free fixed point
    p = {**p, 'readout': jax.lax.stop_gradient(p['readout'])}
    step = m.make_step(config, p, m.input_drive(p, x))
    u = u_free
    for _ in range(m.steps_for(config, 3)):
      u = step(u)
    return m.readout_loss(p, m.sigma(u[-1]), labels)[0]
  _assert_trees_close(short, jax.grad(unrolled)(params), 1e-12)
  if layer_updates == 'synchronous':  # BPTT over T steps from u* = RBP with T iterations
    delta = m.rbp_error(config, params, x_drive, labels, u_free)
    _assert_trees_close({k: short[k] for k in ('forward', 'backward')},
                        {k: m.network_grads(params, x, m.activate(u_free), delta)[k]
                         for k in ('forward', 'backward')}, 1e-9)
  config.t_nudge = 400
  long = m.bptt_grads(config, params, x, labels, u_free)
  delta = m.rbp_error(config, params, x_drive, labels, u_free)
  rbp = m.network_grads(params, x, m.activate(u_free), delta)
  _assert_trees_close({k: long[k] for k in ('forward', 'backward')},
                      {k: rbp[k] for k in ('forward', 'backward')}, 1e-8)


# ------------------------------------------------------------------ homeostatic loss

def _exact_homeo(config, params, x, labels, u_free):
  values = []
  for i in range(BATCH):
    k, _, _ = dense(config, params, x, labels, u_free, i)
    values.append(common.homeostatic_loss_exact(k - jnp.eye(len(k))))
  return float(np.mean(values))


def test_homeostatic_estimator_is_unbiased_for_the_exact_asymmetry():
  config, params, x, labels = tiny_mlp(alpha=90.0)
  x_drive = m.input_drive(params, x)
  u_free = free_fixed_point(config, params, x)
  s = m.activate(u_free)
  exact = _exact_homeo(config, params, x, labels, u_free)
  # 2 ||A||^2 / n, A the skew part of K: the expected value the docstring promises.
  k, _, _ = dense(config, params, x, labels, u_free, 0)
  a = (k - k.T) / 2
  assert common.homeostatic_loss_exact(k - jnp.eye(len(k))) == pytest.approx(
      2 * float(jnp.sum(a ** 2)) / len(k), rel=1e-12)
  config.homeo_draws = 4000
  noise = m.homeostatic_noise(config, jax.random.PRNGKey(3), jnp.arange(BATCH))
  estimate = float(common.homeostatic_loss(lambda z: m.drives(params, z, x_drive), s, noise))
  assert estimate == pytest.approx(exact, rel=0.05)
  assert exact > 1e-3


def test_homeostatic_gradient_descent_lowers_the_asymmetry():
  config, params, x, labels = tiny_mlp(alpha=90.0)
  config.homeo_coef, config.homeo_draws = 1.0, 5

  @jax.jit
  def descend(params, t):
    u_free, _ = m.free_relaxation(config, params, m.input_drive(params, x))
    noise = m.homeostatic_noise(config, jax.random.fold_in(jax.random.PRNGKey(0), t),
                                jnp.arange(BATCH))
    _, grads = m.homeostatic_grads(config, params, x, m.activate(u_free), noise)
    return jax.tree_util.tree_map(lambda p, g: p - 2.0 * g, params, grads), grads

  before = _exact_homeo(config, params, x, labels, free_fixed_point(config, params, x))
  for t in range(60):
    params, grads = descend(params, t)
    assert not np.any(np.asarray(grads['readout']['w']))  # only the network is touched
  after = _exact_homeo(config, params, x, labels, free_fixed_point(config, params, x))
  assert after < 0.5 * before, (before, after)


def test_mlp_jacobian_is_the_weights_so_homeostasis_is_weight_alignment():
  """G is affine in s: K = dG/ds is the block matrix of the weights, the same at every state,
  and the exact homeostatic loss 2||A||^2/n is sum_l ||B_l - W_{l+1}^T||_F^2 / n."""
  config, params, x, labels = tiny_mlp(alpha=50.0)
  u_free = free_fixed_point(config, params, x)
  k0, d0, _ = dense(config, params, x, labels, u_free, 0)
  k1, d1, _ = dense(config, params, x, labels, u_free, 1)  # another image, another state
  assert np.abs(d0 - d1).max() > 1e-2
  np.testing.assert_allclose(k0, k1, atol=1e-14)
  alignment = sum(float(jnp.sum((b['w'] - params['forward'][l + 1]['w'].T) ** 2))
                  for l, b in enumerate(params['backward']))
  n = len(k0)
  assert common.homeostatic_loss_exact(k0 - jnp.eye(n)) == pytest.approx(alignment / n,
                                                                          rel=1e-12)

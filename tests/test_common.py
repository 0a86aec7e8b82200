"""common.py: the estimators against exact linear algebra on the tiny MLP (float64).

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
from helpers import (BATCH, assert_trees_close, dbeta_s_dense, exact_and_rbp, flatten,
                     free_fixed_point, mlp_dense, rbp_delta_dense, sample, tie, tiny_mlp,
                     without_count)

mlp_grads = without_count(m.network_grads)  # the MLP's gradient (without the dropped count)


# ------------------------------------------------------------------------ fixed point

@pytest.mark.parametrize('layer_updates', ['synchronous', 'sequential'])
def test_relaxation_reaches_a_fixed_point_and_matches_a_python_loop(layer_updates):
  config, params, x, _ = tiny_mlp(layer_updates=layer_updates)
  x_drive = m.input_drive(params, x)
  u_free = free_fixed_point(config, params, x)
  field = common.tree_sub(m.drives(config, params, m.activate(u_free), x_drive), u_free)
  assert np.max(np.sqrt(common.per_sample_sq_norm(field))) < 1e-10

  step = m.make_step(config, params, x_drive)
  u = m.zeros_state(config, BATCH)
  for _ in range(7):
    u = step(u)
  looped = common.fixed_point(step, m.zeros_state(config, BATCH), 7)[0]
  for a, b in zip(u, looped):
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


def test_early_stopping_stops_at_the_tolerance():
  config, params, x, _ = tiny_mlp()
  step = m.make_step(config, params, m.input_drive(params, x))
  u0 = m.zeros_state(config, BATCH)
  _, full, full_steps = common.fixed_point(step, u0, 400)
  _, early, steps = common.fixed_point(step, u0, 400, tol=1e-4)
  assert -5 <= float(early) < -4 and float(full) < -10
  assert np.all(np.asarray(full_steps) == 400)
  # Each sample's count: the steps up to its first update below tol (a Python loop).
  u, needed = u0, np.zeros(BATCH, int)
  for t in range(1, 401):
    new = step(u)
    norms = np.sqrt(np.asarray(common.per_sample_sq_norm(common.tree_sub(new, u))))
    needed = np.where((needed == 0) & (norms <= 1e-4), t, needed)
    u = new
    if np.all(needed):
      break
  np.testing.assert_array_equal(np.asarray(steps), needed)
  assert np.asarray(steps).max() == t and len(set(needed)) > 1  # samples differ


def test_sequential_updates_follow_one_chain_of_the_synchronous_dynamics_exactly():
  """k sequential steps == the synchronous trajectory's odd layers at 2k-1, even at 2k."""
  config, params, x, labels = tiny_mlp(hidden=(6, 5, 4))
  x_drive = m.input_drive(params, x)
  sync = m.make_step(config, params, x_drive)
  config.layer_updates = 'sequential'
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

@pytest.mark.parametrize('layer_updates', ['synchronous', 'sequential'])
def test_exact_dbeta_equals_the_dense_solve(layer_updates):
  """Both update orders, 'sequential' (the default chain) included, give (I - DK)^{-1} D g."""
  config, params, x, labels = tiny_mlp(layer_updates=layer_updates)
  u_free = free_fixed_point(config, params, x)
  relax = m.nudged_relaxation(config, params, m.input_drive(params, x), labels, u_free)
  exact = common.exact_dbeta(relax)
  for i in range(BATCH):
    k, d, g = mlp_dense(config, params, x, labels, u_free, i)
    reference = dbeta_s_dense(k, d, g)
    np.testing.assert_allclose(sample(exact, i), reference, rtol=1e-9, atol=1e-12)
    assert np.linalg.norm(reference) > 1e-3


@pytest.mark.parametrize('layer_updates', ['synchronous', 'sequential'])
def test_cauchy_estimate_converges_with_n_as_predicted(layer_updates):
  config, params, x, labels = tiny_mlp(layer_updates=layer_updates)
  u_free = free_fixed_point(config, params, x)
  relax = m.nudged_relaxation(config, params, m.input_drive(params, x), labels, u_free)
  exact = flatten(common.exact_dbeta(relax))
  s0 = m.activate(u_free)

  @functools.lru_cache(maxsize=None)
  def estimator(n):
    return jax.jit(lambda beta: flatten(common.cauchy_estimate(relax, s0, beta, n)))

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


def test_cauchy_points_are_the_upper_half_of_the_circle_written_out():
  """The relaxed points and their weights, against the circle written out by hand."""
  r = 0.5
  w = lambda k, n: r * complex(math.cos(2 * math.pi * k / n), math.sin(2 * math.pi * k / n))
  expected = {1: ([r], [1]), 2: ([r, -r], [1, 1]), 3: ([r, w(1, 3)], [1, 2]),
              4: ([r, 0.5j, -r], [1, 2, 1]), 5: ([r, w(1, 5), w(2, 5)], [1, 2, 2]),
              6: ([r, w(1, 6), w(2, 6), -r], [1, 2, 2, 1])}
  for n, (betas, weights) in expected.items():
    got_betas, _, got_weights = common.cauchy_points(r, n)
    np.testing.assert_allclose(got_betas, betas, atol=1e-12)
    np.testing.assert_array_equal(got_weights, weights)
    assert np.iscomplexobj(got_betas) == (n >= 3)


@pytest.mark.parametrize('n', [1, 2, 3, 4, 5, 6])
def test_cauchy_estimate_equals_the_full_circle_sum(n):
  """Eq. 22 over ALL N points (no conjugate symmetry), for a holomorphic s*(beta) known in
  closed form: exp(c beta). Also the bias bound: |estimate - c| <= |c r|^N c / (N+1)! * e."""
  c, r = jnp.asarray([0.7, -1.3, 2.1]), 0.3
  relax = lambda beta: {'s': jnp.exp(c * beta)[None]}  # one "sample" with three units
  estimate = common.cauchy_estimate(relax, relax(0.0), r, n)['s'][0]
  circle = sum(np.exp(np.asarray(c) * r * np.exp(2j * np.pi * k / n)) *
               np.exp(-2j * np.pi * k / n) for k in range(n)) / (n * r)
  if n == 1:  # the one-sided EP estimate subtracts s*(0)
    circle = (np.exp(np.asarray(c) * r) - 1) / r
  np.testing.assert_allclose(estimate, circle.real, rtol=1e-12, atol=1e-14)
  bound = np.abs(np.asarray(c)) ** (n + 1) * r ** n / math.factorial(n + 1) * np.e
  assert np.all(np.abs(np.asarray(estimate) - np.asarray(c)) <= bound)
  assert np.all(np.abs(np.asarray(estimate) - np.asarray(c)) > 1e-3 * bound)  # bias is real


def test_continuous_time_estimate_converges_to_the_cauchy_estimate():
  config, params, x, labels = tiny_mlp()
  x_drive = m.input_drive(params, x)
  u_free = free_fixed_point(config, params, x)
  relax = m.nudged_relaxation(config, params, x_drive, labels, u_free)
  beta, n = 0.5, 4
  cauchy = flatten(common.cauchy_estimate(relax, m.activate(u_free), beta, n))
  # Eq. 9's limit for N points: the mean over the circle, s*_0 + O(|beta|^N).
  circle = [relax(jnp.asarray(beta * np.exp(2j * np.pi * k / n))) for k in range(n)]
  s_mean = flatten(jax.tree_util.tree_map(lambda *a: sum(a).real / n, *circle))
  assert float(jnp.linalg.norm(s_mean - flatten(m.activate(u_free)))) < 1e-2
  step = m.make_step(config, params, x_drive, labels)

  def errors(steps_per_point, periods):
    s_bar, e_bar = common.continuous_time_estimate(
        step, m.zeros_state(config, BATCH), m.activate, beta, n, steps_per_point, periods)
    return (float(jnp.linalg.norm(flatten(e_bar) - cauchy) / jnp.linalg.norm(cauchy)),
            float(jnp.linalg.norm(flatten(s_bar) - s_mean) / jnp.linalg.norm(s_mean)))

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
    k, d, g = mlp_dense(config, params, x, labels, u_free, i)
    np.testing.assert_allclose(k, k.T, atol=1e-14)
    np.testing.assert_allclose(sample(exact, i), sample(delta, i), rtol=1e-8, atol=1e-12)
    assert common.symmetry_measure(k - jnp.eye(len(k))) == pytest.approx(1.0, abs=1e-12)


def test_untied_weights_obey_the_exact_form_of_eq_10():
  config, params, x, labels = tiny_mlp(alpha=80.0)
  u_free, exact, delta = exact_and_rbp(config, params, x, labels)
  for i in range(BATCH):
    k, d, g = mlp_dense(config, params, x, labels, u_free, i)
    np.testing.assert_allclose(sample(delta, i), rbp_delta_dense(k, d, g), rtol=1e-9,
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
  """Autodiff through `steps` synchronous free steps from zeros: the implicit gradient.
  (A loop of fixed length: reverse mode differentiates every step, as unrolled.)"""
  def loss(p):
    p = {**p, 'readout': jax.lax.stop_gradient(p['readout'])}
    step = lambda u: m.drives(config, p, m.activate(u), m.input_drive(p, x))
    u = jax.lax.fori_loop(0, steps, lambda _, u: step(u), m.zeros_state(config, BATCH))
    return m.readout_loss(p, m.sigma(u[-1]), labels)[0]
  return jax.jit(jax.grad(loss))(params)


def test_rbp_gradient_equals_the_implicit_function_gradient():
  config, params, x, labels = tiny_mlp(alpha=70.0)
  x_drive = m.input_drive(params, x)
  u_free = free_fixed_point(config, params, x)
  delta = m.rbp_error(config, params, x_drive, labels, u_free)
  rbp = mlp_grads(config, params, x, m.activate(u_free), delta)
  # Reference 1: Eq. 4 with a dense solve per sample, through the same parameter VJP.
  dense_delta = [mlp_dense(config, params, x, labels, u_free, i) for i in range(BATCH)]
  dense_delta = np.stack([rbp_delta_dense(*q) for q in dense_delta])
  splits = np.cumsum(config.hidden_sizes)
  dense_delta = tuple(jnp.asarray(a) for a in np.split(dense_delta, splits, axis=1))
  assert_trees_close(rbp, mlp_grads(config, params, x, m.activate(u_free), dense_delta), 1e-9)
  # Reference 2: reverse-mode autodiff through 600 unrolled steps of the dynamics.
  unrolled = _unrolled_loss_grads(config, params, x, labels, 600)
  assert_trees_close({k: rbp[k] for k in ('forward', 'backward')},
                     {k: unrolled[k] for k in ('forward', 'backward')}, 1e-8)


def test_hep_gradient_differs_from_the_true_one_only_through_asymmetry():
  config, params, x, labels = tiny_mlp()
  for p, should_match in ((tie(params), True), (params, False)):
    x_drive = m.input_drive(p, x)
    u_free = free_fixed_point(config, p, x)
    exact = common.exact_dbeta(m.nudged_relaxation(config, p, x_drive, labels, u_free))
    hep = mlp_grads(config, p, x, m.activate(u_free), exact)
    true = _unrolled_loss_grads(config, p, x, labels, 600)
    hep_w, true_w = hep['forward'][0]['w'], true['forward'][0]['w']
    close = np.allclose(hep_w, true_w, rtol=1e-8, atol=1e-10 * np.abs(true_w).max())
    assert close == should_match
    # Same sign convention: the estimate points along the gradient, never against it.
    assert float(jnp.vdot(hep_w, true_w)) > 0


@pytest.mark.parametrize('layer_updates', ['synchronous', 'sequential'])
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
  assert_trees_close(short, jax.grad(unrolled)(params), 1e-12)
  if layer_updates == 'synchronous':  # BPTT over T steps from u* = RBP with T iterations
    delta = m.rbp_error(config, params, x_drive, labels, u_free)
    assert_trees_close({k: short[k] for k in ('forward', 'backward')},
                       {k: mlp_grads(config, params, x, m.activate(u_free), delta)[k]
                        for k in ('forward', 'backward')}, 1e-9)
  config.t_nudge = 400
  long = m.bptt_grads(config, params, x, labels, u_free)
  delta = m.rbp_error(config, params, x_drive, labels, u_free)
  rbp = mlp_grads(config, params, x, m.activate(u_free), delta)
  assert_trees_close({k: long[k] for k in ('forward', 'backward')},
                     {k: rbp[k] for k in ('forward', 'backward')}, 1e-8)


# ------------------------------------------------------------------ homeostatic loss

def _exact_homeo(config, params, x, labels, u_free):
  values = []
  for i in range(BATCH):
    k, _, _ = mlp_dense(config, params, x, labels, u_free, i)
    values.append(common.homeostatic_loss_exact(k - jnp.eye(len(k))))
  return float(np.mean(values))


def test_homeostatic_estimator_is_unbiased_for_the_exact_asymmetry():
  config, params, x, labels = tiny_mlp(alpha=90.0)
  x_drive = m.input_drive(params, x)
  u_free = free_fixed_point(config, params, x)
  s = m.activate(u_free)
  exact = _exact_homeo(config, params, x, labels, u_free)
  # 2 ||A||^2 / n, A the skew part of K: the expected value the docstring promises.
  k, _, _ = mlp_dense(config, params, x, labels, u_free, 0)
  a = (k - k.T) / 2
  assert common.homeostatic_loss_exact(k - jnp.eye(len(k))) == pytest.approx(
      2 * float(jnp.sum(a ** 2)) / len(k), rel=1e-12)
  config.homeo_draws = 4000
  noise = m.homeostatic_noise(config, jax.random.PRNGKey(3), jnp.arange(BATCH))
  estimate = float(common.homeostatic_loss(lambda z, xd: m.drives(config, params, z, xd), s, x_drive,
                                            noise))
  assert estimate == pytest.approx(exact, rel=0.05)
  assert exact > 1e-3


def test_homeostatic_gradient_descent_lowers_the_asymmetry():
  config, params, x, labels = tiny_mlp(alpha=90.0)
  config.homeo_coef, config.homeo_draws = 1.0, 5

  @jax.jit
  def descend(params, t):
    u_free, _, _ = m.free_relaxation(config, params, m.input_drive(params, x))
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
  k0, d0, _ = mlp_dense(config, params, x, labels, u_free, 0)
  k1, d1, _ = mlp_dense(config, params, x, labels, u_free, 1)  # another image, another state
  assert np.abs(d0 - d1).max() > 1e-2
  np.testing.assert_allclose(k0, k1, atol=1e-14)
  alignment = sum(float(jnp.sum((b['w'] - params['forward'][l + 1]['w'].T) ** 2))
                  for l, b in enumerate(params['backward']))
  n = len(k0)
  assert common.homeostatic_loss_exact(k0 - jnp.eye(n)) == pytest.approx(alignment / n,
                                                                          rel=1e-12)


# ------------------------------------------- continuous time, hold-end sampling (Table 1)
# common.hold_end_estimate: no free phase, beta(t) held steps_per_point steps at each of the
# N points, only the state at the end of each hold averaged (the authors' "cont." runs).

_HOLD_STEPS, _HOLD_PERIODS = 300, 2  # 300 steps per point equilibrate the tiny network


@functools.lru_cache(maxsize=None)
def _hold_end_setup(layer_updates):
  """(config, params, x, labels, u_free, step, jitted (beta, N) -> (u_bar, e_bar))."""
  config, params, x, labels = tiny_mlp(layer_updates=layer_updates)
  x_drive = m.input_drive(params, x)
  u_free = free_fixed_point(config, params, x)
  step = m.make_step(config, params, x_drive, labels)
  u0 = m.zeros_state(config, BATCH)
  estimate = jax.jit(
      lambda beta, n: common.hold_end_estimate(step, u0, m.activate, beta, n, _HOLD_STEPS,
                                               _HOLD_PERIODS), static_argnums=1)
  return config, params, x, labels, u_free, step, estimate


def _rel(a, b):
  """||a - b|| / ||b|| over all leaves of two pytrees."""
  a, b = flatten(a), flatten(b)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize('layer_updates', ['synchronous', 'sequential'])
def test_hold_end_estimate_equals_the_n_point_cauchy_estimate(layer_updates):
  """Equilibrated holds: e_bar IS Eq. 22 at the free fixed point, u_bar the mean of u*(beta_k)."""
  config, params, x, labels, u_free, step, estimate = _hold_end_setup(layer_updates)
  relax = m.nudged_relaxation(config, params, m.input_drive(params, x), labels, u_free)
  s0 = m.activate(u_free)
  # The nudged fixed points u*(beta), relaxed separately from u_free (pre-activation).
  nudged = jax.jit(lambda b: common.fixed_point(
      lambda u: step(u, b), tuple(a.astype(jnp.complex128) for a in u_free), 400)[0])
  for n in (2, 3, 4):
    u_bar, e_bar = estimate(0.5, n)
    assert all(a.dtype == jnp.float64 for a in (*u_bar, *e_bar))
    cauchy = common.cauchy_estimate(relax, s0, 0.5, n)
    assert _rel(e_bar, cauchy) < 1e-8, (n, _rel(e_bar, cauchy))
    circle = [nudged(b) for b in 0.5 * np.exp(2j * np.pi * np.arange(n) / n)]
    circle_mean = tuple(sum(u[l] for u in circle).real / n for l in range(len(u_free)))
    assert _rel(u_bar, circle_mean) < 1e-10, (n, _rel(u_bar, circle_mean))


def test_hold_end_u_bar_is_the_free_fixed_point_up_to_order_beta_to_the_n():
  """u_bar - u* = O(|beta|^N) (discrete mean value property); averaging every step instead
  (common.continuous_time_estimate, a literal Eq. 8-9) keeps the transient and the lags."""
  config, params, x, labels, u_free, step, estimate = _hold_end_setup('synchronous')
  for n in (2, 4):
    ratio = _rel(estimate(0.4, n)[0], u_free) / _rel(estimate(0.2, n)[0], u_free)
    assert 2 ** n * 0.6 < ratio < 2 ** n * 1.6, (n, ratio)
  # Same schedule (N = 4, |beta| = 0.2), averaged every step from t = 0: the transient from
  # zeros and the lag after each switch stay in the average (seen: 1.4e-5 vs 1.2e-3).
  s0 = m.activate(u_free)
  u_bar, _ = estimate(0.2, 4)
  s_every, _ = common.continuous_time_estimate(step, m.zeros_state(config, BATCH), m.activate,
                                               0.2, 4, _HOLD_STEPS, _HOLD_PERIODS)
  hold_error, every_error = _rel(m.activate(u_bar), s0), _rel(s_every, s0)
  assert hold_error < 1e-4 and hold_error < 0.05 * every_error, (hold_error, every_error)


def test_hold_end_estimate_is_d_beta_s_star_for_a_small_nudge():
  """Sign and factor: small |beta| gives the exact d_beta s*, and the same gradient."""
  config, params, x, labels, u_free, _, estimate = _hold_end_setup('synchronous')
  relax = m.nudged_relaxation(config, params, m.input_drive(params, x), labels, u_free)
  exact = common.exact_dbeta(relax)
  true_grads = mlp_grads(config, params, x, m.activate(u_free), exact)
  for n in (2, 4):
    u_bar, e_bar = estimate(1e-3, n)
    assert _rel(e_bar, exact) < 1e-5, (n, _rel(e_bar, exact))
    # What the training scripts do with it: the VJP of the drive at sigma(u_bar).
    grads = mlp_grads(config, params, x, m.activate(u_bar), e_bar)
    assert _rel(grads, true_grads) < 1e-5, (n, _rel(grads, true_grads))
  with pytest.raises(ValueError, match='N >= 2'):
    common.hold_end_estimate(None, u_free, m.activate, 0.5, 1, 10, 1)


# -------------------------------------------------------------------------- cosine

@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('scale', [1e-8, 1e8])
def test_per_sample_cosine_is_scale_invariant(dtype, scale):
  rng = np.random.default_rng(0)
  a = (rng.normal(size=(5, 300)).astype(dtype), rng.normal(size=(5, 7, 3)).astype(dtype))
  b = tuple(v + 0.7 * rng.normal(size=v.shape).astype(dtype) for v in a)
  b = (b[0], -b[1])  # some cosines of each sign
  base = np.asarray(common.per_sample_cosine(a, b))
  assert np.all(np.abs(base) > 0.05) and np.all(np.abs(base) < 0.99)
  scaled = common.per_sample_cosine(tuple(dtype(scale) * v for v in a),
                                    tuple(dtype(scale) * v for v in b))
  assert scaled.dtype == dtype
  np.testing.assert_allclose(np.asarray(scaled), base, atol=1e-6 if dtype == np.float32 else 1e-13)

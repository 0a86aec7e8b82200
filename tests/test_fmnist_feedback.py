"""fmnist_feedback.py: the network of Fig. 4e, against exact references, and end to end.

The in-process tests run in float64 on a tiny instance (784 - 6 - 5 - 10, weights scaled
down so the dynamics contract). References are independent of the script's estimators:
dense Jacobians with jnp.linalg.solve, autodiff through long unrolled synchronous dynamics.
The end-to-end test trains in subprocesses (float32) on small synthetic IDX files.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
import fmnist_feedback
import fmnist_mlp as mlp
from configs import fmnist_feedback as feedback_config
from helpers import (BATCH, MLP_SMALL_ARGS, TWO_DEVICES, assert_trees_close, dbeta_s_dense,
                     dense_all, flatten, rbp_delta_dense, read_rows, run_script, sample,
                     without_count)
import helpers

# fmnist_mlp's functions run this network where the config names it (network='feedback').
assert 'feedback' in mlp.NETWORKS and fmnist_feedback.SCRIPT == 'fmnist_feedback.py'
feedback_grads = without_count(mlp.network_grads)  # its gradient (without the count)


def tiny_net(scale=0.6, seed=0, hidden=(6, 5), layer_updates='synchronous', t_free=400,
             t_nudge=400):
  """(config, params, x, labels) of a small feedback network (float64, numpy-drawn).

  Weights are N(0, 1 / fan_in) times `scale` (0.6: the dynamics contract in ~100 steps),
  biases N(0, 0.3^2), the readout half the usual scale; the structure is init_params'.
  """
  config = feedback_config.get_config()
  config.hidden_sizes = hidden
  config.layer_updates = layer_updates
  config.t_free, config.t_nudge = t_free, t_nudge
  rng = np.random.default_rng(seed)
  weight = lambda n_in, n_out, s: jnp.asarray(s * rng.normal(size=(n_in, n_out)) / np.sqrt(n_in))
  sizes = (784, *hidden, 10)
  params = {'forward': [{'w': weight(n_in, n_out, scale), 'b': jnp.asarray(0.3 * rng.normal(
                size=n_out))} for n_in, n_out in zip(sizes[:-1], sizes[1:])],
            'feedback': {'w': weight(10, hidden[0], scale)},
            'readout': {'w': weight(10, 10, 0.5), 'b': jnp.zeros(10)}}
  x = jnp.asarray(rng.uniform(size=(BATCH, 784)))
  return config, params, x, jnp.arange(BATCH) % 10


free_fixed_point = helpers.free_fixed_point
CONFIG = feedback_config.get_config()  # the network's name, for the functions below


@jax.jit
def feedback_dense(params, x, labels, u_free):
  """(K, d, g) of every sample of the feedback network (helpers.dense_all, batched)."""
  return dense_all(mlp.activate, lambda s, x_drive: mlp.drives(CONFIG, params, s, x_drive),
                   lambda s, y: mlp.loss_grad_s(params, s, y), mlp.input_drive(params, x),
                   labels, u_free)


def stack_layers(config, vectors):
  """Per-sample flat vectors (batch, n) -> the state's tuple of layers."""
  splits = np.cumsum(config.hidden_sizes)
  return tuple(jnp.asarray(a) for a in np.split(np.asarray(vectors), splits, axis=1))


def network_only(tree):
  return {k: tree[k] for k in ('forward', 'feedback')}


# ------------------------------------------------------------------ the architecture

def test_initialisation_and_the_connectivity_of_fig_4e():
  config = feedback_config.get_config()
  params = jax.jit(lambda key: fmnist_feedback.init_params(key, config))(jax.random.PRNGKey(0))
  shapes = jax.tree_util.tree_map(np.shape, params)
  assert shapes == {'forward': [{'w': (784, 256), 'b': (256,)}, {'w': (256, 256), 'b': (256,)},
                                {'w': (256, 10), 'b': (10,)}],
                    'feedback': {'w': (10, 256)},
                    'readout': {'w': (10, 10), 'b': (10,)}}
  assert not any(np.any(p['b']) for p in params['forward'])
  # LeCun normal: variance 1 / fan_in, the feedback's fan-in being the 10 output units.
  assert np.var(params['feedback']['w']) == pytest.approx(1 / 10, rel=0.1)
  assert np.var(params['forward'][1]['w']) == pytest.approx(1 / 256, rel=0.05)


def test_the_jacobian_has_no_reciprocal_entry_and_homeostasis_is_the_loop_weight_norm():
  """K = dG/ds is the cycle's weights; the homeostatic loss is ||K||^2 / n (module doc)."""
  config, params, x, labels = tiny_net()
  u_free = free_fixed_point(config, params, x)
  k = feedback_dense(params, x, labels, u_free)[0][0]
  n1, n2, n = 6, 5, 21
  fw, fb = params['forward'], params['feedback']['w']
  expected = np.zeros((n, n))
  expected[n1:n1 + n2, :n1] = fw[1]['w'].T  # layer 2 <- layer 1
  expected[n1 + n2:, n1:n1 + n2] = fw[2]['w'].T  # output <- layer 2
  expected[:n1, n1 + n2:] = fb.T  # layer 1 <- output (the feedback)
  np.testing.assert_allclose(k, expected, rtol=1e-13, atol=1e-15)
  assert not np.any(k * k.T)  # no pair of units is connected both ways
  jac = k - jnp.eye(n)
  norm2 = float(np.sum(fw[1]['w'] ** 2) + np.sum(fw[2]['w'] ** 2) + np.sum(fb ** 2))
  assert float(common.homeostatic_loss_exact(jac)) == pytest.approx(norm2 / n, rel=1e-12)
  sym, skew = np.sqrt(n + norm2 / 2), np.sqrt(norm2 / 2)
  assert float(common.symmetry_measure(jac)) == pytest.approx(sym / (sym + skew), rel=1e-12)
  # The Hutchinson estimate the training uses is unbiased for it.
  config.homeo_draws = 2000  # per sample; J is the same for all 4 samples here

  @jax.jit
  def estimate(p):
    noise = mlp.homeostatic_noise(config, jax.random.PRNGKey(3), jnp.arange(BATCH))
    x_drive = mlp.input_drive(p, x)
    return common.homeostatic_loss(lambda s, xd: mlp.drives(config, p, s, xd),
                                   mlp.activate(u_free), x_drive, noise)
  assert float(estimate(params)) == pytest.approx(norm2 / n, rel=0.05)


# ------------------------------------------------------------------ layer update order

@pytest.mark.parametrize('hidden', [(6, 5), (6, 5, 4)])
def test_sequential_updates_follow_one_chain_of_the_synchronous_dynamics_exactly(hidden):
  """k sweeps from zeros == the synchronous trajectory's layer l at time C (k - 1) + l."""
  config, params, x, _ = tiny_net(scale=2.0, hidden=hidden)  # slow: far from converged
  cycle = len(hidden) + 1
  x_drive = mlp.input_drive(params, x)
  sync = mlp.make_step(config, params, x_drive)
  config.layer_updates = 'sequential'
  seq = mlp.make_step(config, params, x_drive)
  sweeps = 6
  trajectory = [mlp.zeros_state(config, BATCH)]
  for _ in range(cycle * sweeps):
    trajectory.append(sync(trajectory[-1]))
  u = mlp.zeros_state(config, BATCH)
  for k in range(1, sweeps + 1):
    u = seq(u)
    for l in range(cycle):
      time = cycle * (k - 1) + l + 1
      np.testing.assert_allclose(u[l], trajectory[time][l], rtol=1e-12, atol=1e-12)
      # ... and not a neighbouring time (the chains are different trajectories), by far
      # more than the tolerance above.
      assert np.abs(u[l] - trajectory[time - 1][l]).max() > 1e-6
  assert np.abs(trajectory[-1][0] - trajectory[-2][0]).max() > 1e-5  # not yet converged
  assert mlp.steps_for(config, 150) == -(-150 // cycle)  # ceil(T / C): 50 for Fig. 4e
  assert mlp.steps_for(config, 20) == -(-20 // cycle)
  config.layer_updates = 'synchronous'
  assert mlp.steps_for(config, 150) == 150


def test_both_update_orders_reach_the_same_free_and_nudged_fixed_points():
  config, params, x, labels = tiny_net()
  x_drive = mlp.input_drive(params, x)
  states = {}
  for order in ('synchronous', 'sequential'):
    config.layer_updates = order
    u_free = free_fixed_point(config, params, x)
    field = common.tree_sub(mlp.drives(config, params, mlp.activate(u_free), x_drive), u_free)
    assert np.max(np.sqrt(common.per_sample_sq_norm(field))) < 1e-10
    relax = mlp.nudged_relaxation(config, params, x_drive, labels, u_free)
    nudged = relax(jnp.asarray(0.3))
    states[order] = (flatten(mlp.activate(u_free)), flatten(nudged))
  for a, b in zip(states['synchronous'], states['sequential']):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  free, nudged = states['sequential']
  assert np.abs(nudged - free).max() > 1e-3  # the nudge moved the fixed point


# ------------------------------------------------------------ error vectors and gradients

@pytest.mark.parametrize('layer_updates', ['synchronous', 'sequential'])
def test_exact_dbeta_equals_the_dense_solve(layer_updates):
  config, params, x, labels = tiny_net(layer_updates=layer_updates)
  u_free = free_fixed_point(config, params, x)
  x_drive = mlp.input_drive(params, x)
  relax = mlp.nudged_relaxation(config, params, x_drive, labels, u_free)
  exact = common.exact_dbeta(relax)
  for i, (k, d, g) in enumerate(zip(*feedback_dense(params, x, labels, u_free))):
    reference = dbeta_s_dense(k, d, g)
    np.testing.assert_allclose(sample(exact, i), reference, rtol=1e-9, atol=1e-12)
    assert np.linalg.norm(reference[:11]) > 1e-3  # the error reaches the hidden layers


def _unrolled_loss_grads(config, params, x, labels, steps):
  """Reverse-mode autodiff through `steps` synchronous free steps from zeros (a plain loop
  of the drives, no common.py): at convergence, the implicit-function gradient."""
  def loss(p):
    p = {**p, 'readout': jax.lax.stop_gradient(p['readout'])}
    step = lambda _, u: mlp.drives(config, p, mlp.activate(u), mlp.input_drive(p, x))
    u = jax.lax.fori_loop(0, steps, step, mlp.zeros_state(config, BATCH))
    return mlp.readout_loss(p, mlp.sigma(u[-1]), labels)[0]
  return jax.jit(jax.grad(loss))(params)


def test_rbp_gradient_is_the_implicit_gradient_and_hep_obeys_eq_10():
  config, params, x, labels = tiny_net()
  x_drive = mlp.input_drive(params, x)
  u_free = free_fixed_point(config, params, x)
  s_free = mlp.activate(u_free)
  delta = mlp.rbp_error(config, params, x_drive, labels, u_free)
  exact = common.exact_dbeta(
      mlp.nudged_relaxation(config, params, x_drive, labels, u_free))
  dense_delta = []
  for i, (k, d, g) in enumerate(zip(*feedback_dense(params, x, labels, u_free))):
    dense_delta.append(rbp_delta_dense(k, d, g))
    np.testing.assert_allclose(sample(delta, i), dense_delta[-1], rtol=1e-9, atol=1e-12)
    # Exact form of Eq. 10: d_beta s* = (I - DK)^{-1} (I - DK^T) delta ...
    n = len(k)
    predicted = jnp.linalg.solve(jnp.eye(n) - d[:, None] * k,
                                 (jnp.eye(n) - d[:, None] * k.T) @ dense_delta[-1])
    np.testing.assert_allclose(sample(exact, i), predicted, rtol=1e-8, atol=1e-12)
    # ... and without any reciprocal weight the two error vectors really differ.
    assert np.linalg.norm(sample(exact, i) - dense_delta[-1]) > 0.2 * np.linalg.norm(
        dense_delta[-1])
  rbp = feedback_grads(config, params, x, s_free, delta)
  assert_trees_close(rbp, feedback_grads(config, params, x, s_free, stack_layers(config, dense_delta)),
                     1e-9)
  unrolled = _unrolled_loss_grads(config, params, x, labels, 600)
  assert_trees_close(network_only(rbp), network_only(unrolled), 1e-8)


def test_every_algorithm_gives_its_reference_gradient():
  """compute_grads end to end (float64) for every estimator against its exact reference."""
  config, params, x, labels = tiny_net()
  u_free = free_fixed_point(config, params, x)
  s_free = mlp.activate(u_free)
  vectors = feedback_dense(params, x, labels, u_free)
  true = feedback_grads(config, params, x, s_free, stack_layers(
      config, jax.vmap(rbp_delta_dense)(*vectors)))
  hep = feedback_grads(config, params, x, s_free, stack_layers(
      config, jax.vmap(dbeta_s_dense)(*vectors)))
  readout = jax.grad(lambda p: mlp.readout_loss(p, s_free[-1], labels)[0])(params)['readout']

  def grads(layer_updates='sequential', **overrides):
    c, _, _, _ = tiny_net(layer_updates=layer_updates)
    c.update(overrides)
    c.homeo_coef = 0.0
    g, metrics = jax.jit(lambda p: mlp.compute_grads(c, p, x, labels, jax.random.PRNGKey(0),
                                                     jnp.arange(BATCH)))(params)
    assert np.isfinite(float(metrics['loss']))
    return g

  # hep_continuous evaluates everything at the time-averaged state, not at s*_0 (Eq. 9),
  # hence its looser tolerances.
  for name, got, reference, rtol, readout_rtol in [
      ('hep_exact', grads(algorithm='hep_exact'), hep, 1e-8, 1e-10),
      ('hep N=4', grads(algorithm='hep', n_points=4, beta=0.05), hep, 1e-5, 1e-10),
      ('rbp', grads(algorithm='rbp'), true, 1e-8, 1e-10),
      ('bptt sequential', grads(algorithm='bptt'), true, 1e-8, 1e-10),
      ('bptt synchronous', grads('synchronous', algorithm='bptt'), true, 1e-8, 1e-10),
      ('hep_continuous', grads(algorithm='hep_continuous', n_points=4, beta=0.05,
                               continuous_steps_per_point=300, continuous_periods=8), hep,
       0.05, 1e-3),
  ]:
    try:
      assert_trees_close(network_only(got), network_only(reference), rtol)
    except AssertionError as e:
      raise AssertionError(name) from e
    np.testing.assert_allclose(got['readout']['w'], readout['w'], rtol=readout_rtol,
                               err_msg=name)
  # hEP and the true gradient genuinely differ here, so the checks above can tell them apart.
  w_hep, w_true = hep['forward'][1]['w'], true['forward'][1]['w']
  assert np.linalg.norm(w_hep - w_true) > 0.2 * np.linalg.norm(w_true)


# ------------------------------------------------------------------ homeostasis

def test_homeostatic_descent_raises_the_symmetry_and_the_alignment_with_rbp():
  """Pure descent on lambda * L_homeo (the script's gradient) shrinks the loop weights:
  the symmetry measure of J rises, and d_beta s* comes closer to RBP's delta."""
  config, params, x, labels = tiny_net(scale=1.0)
  config.homeo_coef, config.homeo_draws = 1.0, 5

  @jax.jit
  def measure(p):
    x_drive = mlp.input_drive(p, x)
    u, _, _ = mlp.free_relaxation(config, p, x_drive)
    exact = common.exact_dbeta(mlp.nudged_relaxation(config, p, x_drive, labels, u))
    delta = mlp.rbp_error(config, p, x_drive, labels, u)
    s0 = tuple(a[:1] for a in mlp.activate(u))
    field = lambda z: common.tree_sub(mlp.drives(config, p, z, x_drive[:1]), z)
    jac = common.flat_jacobian(field, s0)
    return common.symmetry_measure(jac), jnp.mean(common.per_sample_cosine(exact, delta))

  @jax.jit
  def descend(p, t):
    u, _, _ = mlp.free_relaxation(config, p, mlp.input_drive(p, x))
    noise = mlp.homeostatic_noise(config, jax.random.fold_in(jax.random.PRNGKey(1), t),
                                  jnp.arange(BATCH))
    _, g = mlp.homeostatic_grads(config, p, x, mlp.activate(u), noise)
    return jax.tree_util.tree_map(lambda a, b: a - 0.05 * b, p, g), g

  sym_before, cos_before = measure(params)
  for t in range(200):
    params, g = descend(params, t)
  # Only the weights inside the cycle are touched (the input drive never enters J).
  assert not np.any(g['readout']['w']) and not np.any(g['forward'][0]['w'])
  sym_after, cos_after = measure(params)
  assert float(sym_after) > float(sym_before) + 0.05, (sym_before, sym_after)
  assert float(cos_after) > float(cos_before) + 0.1, (cos_before, cos_after)


# ----------------------------------------------------------------- bad input

# The table of bad fields shared with fmnist_mlp.py is in tests/test_fmnist_mlp.py.
@pytest.mark.parametrize('overrides, message', [
    (dict(hidden_sizes=(32,)), 'needs >= 2 layers'),
])
def test_bad_config_is_a_one_line_error(overrides, message):
  config = feedback_config.get_config()
  config.update(overrides)
  with pytest.raises(mlp.ConfigError, match=message) as error:
    mlp.check_config(config, num_local_devices=2)
  assert '\n' not in str(error.value)


# ----------------------------------------------------------------- end to end

def run_feedback(args, env=None):
  return run_script('fmnist_feedback.py', args, env)



@pytest.mark.slow
def test_training_writes_metrics_and_a_checkpoint_and_resumes(idx_dir, tmp_path):
  """Epoch 1 on two fake CPU devices (pmap, pmean, lockstep), epoch 2 resumed on one."""
  workdir = str(tmp_path / 'run')
  args = [f'--workdir={workdir}', f'--config.data_dir={idx_dir}', *MLP_SMALL_ARGS]
  first = run_feedback([*args, '--config.num_epochs=1'],
                       env={'XLA_FLAGS': TWO_DEVICES})
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'step 2/2' in first.stderr and 'angle n/a' in first.stderr  # the progress display
  rows = read_rows(workdir)
  assert [r['epoch'] for r in rows] == [1]
  row = rows[0]
  for key in ('train_loss', 'train_accuracy', 'test_error', 'epoch_time_s', 'log10_residual',
              'train_homeo_loss', 'diag/symmetry', 'diag/cosine_exact', 'diag/homeo_loss',
              'diag/homeo_loss_exact'):
    assert key in row, key
  assert np.isfinite(row['train_loss']) and 0 <= row['test_error'] <= 100
  assert row['diag/weight_angle'] is None  # undefined here, never a number
  assert len(row['diag/cosine_exact']) == 3 and 0.5 < row['diag/symmetry'] < 1
  assert 'diag/cosine_estimate' not in row  # hep_exact has no estimate besides the exact one
  assert os.path.exists(os.path.join(workdir, 'checkpoint.npz'))
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert saved['hidden_sizes'] == [32, 16] and saved['algorithm'] == 'hep_exact'
  assert saved['homeo_coef'] == 0.1 and saved['layer_updates'] == 'sequential'

  second = run_feedback([*args, '--config.num_epochs=2'])
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'resuming' in second.stderr and 'epoch 1  step' not in second.stderr
  rows2 = read_rows(workdir)
  assert [r['epoch'] for r in rows2] == [1, 2] and rows2[0] == rows[0]
  assert rows2[1]['diag/weight_angle'] is None

  changed = run_feedback([*args, '--config.num_epochs=3', '--config.homeo_coef=0'])
  assert changed.returncode == 1 and 'different config (homeo_coef)' in changed.stderr

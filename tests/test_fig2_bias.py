"""fig2_bias.py: Eq. 11, the |beta| sweep, the continuous-time trace, and an end-to-end run.

In-process tests run in float64 on the tiny 784-6-5-10 MLP of helpers.py; the references are
independent (dense Jacobians and solves, common.continuous_time_estimate). The end-to-end
run is a subprocess on small IDX files.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
import fig2_bias
import fmnist_mlp as m
import harness
from configs import fig2_bias as fig2_config
from configs import fmnist_mlp as mlp_config
from helpers import (BATCH, dbeta_s_dense, free_fixed_point, mlp_dense, rbp_delta_dense,
                     run_script, sample, tie, tiny_mlp, write_fashion_mnist_lookalike)


def save_checkpoint(folder, config, epoch, state):
  """A workdir with a checkpoint, as fmnist_mlp.py's training leaves it."""
  run = harness.Workdir(folder, config, m.RESUMABLE_FIELDS)
  run.start()
  run.save(epoch, {'epoch': epoch}, state)


def antisymmetrically_perturbed(params, eps, seed=7):
  """Tied weights, then w_f += eps P and w_b = (w_f - eps P)^T: K = K_sym + eps (skew)."""
  params = tie(params)
  forward, backward = [dict(p) for p in params['forward']], []
  for l in range(len(params['backward'])):
    w = forward[l + 1]['w']
    p = jax.random.normal(jax.random.PRNGKey(seed + l), w.shape) * jnp.std(w)
    forward[l + 1] = dict(forward[l + 1], w=w + eps * p)
    backward.append({'w': (w - eps * p).T})
  return dict(params, forward=forward, backward=backward)


def numpy_cosine(a, b):
  return float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))


# ------------------------------------------------------------------------------ Eq. 11

def test_eq_11_residual_is_second_order_in_the_asymmetry():
  """D^{-1/2} d_beta s* = (I - 2 S^{-1} A) D^{-1/2} delta + O(||A||^2) (math-conventions 8).

  Halving the skew perturbation quarters the residual, while the first-order difference
  between d_beta s* and delta only halves: a wrong factor 2 or sign in the correction term
  would leave a first-order residual that halves too.
  """
  config, params, x, labels = tiny_mlp(scale=0.45)
  residuals, first_order, skew = [], [], []
  for eps in (0.1, 0.05, 0.025):
    p = antisymmetrically_perturbed(params, eps)
    u_free = free_fixed_point(config, p, x)
    x_drive = m.input_drive(p, x)
    exact = common.exact_dbeta(m.nudged_relaxation(config, p, x_drive, labels, u_free))
    delta = m.rbp_error(config, p, x_drive, labels, u_free)
    r2 = f2 = a2 = 0.0
    for i in range(BATCH):
      k, d, _ = mlp_dense(config, p, x, labels, u_free, i)
      h = np.sqrt(np.asarray(d))
      jac = h[:, None] * np.asarray(k) * h[None, :] - np.eye(len(h))  # J = M - I
      s, a = (jac + jac.T) / 2, (jac - jac.T) / 2
      dbs, dlt = sample(exact, i) / h, sample(delta, i) / h
      np.testing.assert_allclose(dbs, np.linalg.solve(jac, jac.T @ dlt), rtol=1e-8,
                                 atol=1e-12)  # the exact form (Eq. 10) holds
      r2 += np.sum((dbs - (dlt - 2 * np.linalg.solve(s, a @ dlt))) ** 2)
      f2 += np.sum((dbs - dlt) ** 2)
      a2 += np.sum(a ** 2)
    residuals.append(np.sqrt(r2))
    first_order.append(np.sqrt(f2))
    skew.append(np.sqrt(a2))
  for j in range(2):
    assert skew[j] / skew[j + 1] == pytest.approx(2.0, rel=0.05)  # A itself halves
    assert 1.8 < first_order[j] / first_order[j + 1] < 2.2, first_order
    assert 3.5 < residuals[j] / residuals[j + 1] < 4.5, residuals
  assert residuals[-1] < 0.05 * first_order[-1]


# ---------------------------------------------------------------------- Fig. 2a-b sweep

def _sweep(params, config, x, labels, betas, n_points):
  return fig2_bias.sweep(config, params, x, labels, betas, n_points)


def test_sweep_at_tiny_beta_matches_the_exact_cosine_from_dense_solves():
  config, params, x, labels = tiny_mlp(alpha=80.0)
  n_points = (1, 2, 3, 4, 6)
  out = _sweep(params, config, x, labels, [1e-4, 0.5], n_points)
  u_free = free_fixed_point(config, params, x)
  splits = np.cumsum(config.hidden_sizes)
  for i in range(BATCH):
    k, d, g = mlp_dense(config, params, x, labels, u_free, i)
    ref_exact = np.split(np.asarray(dbeta_s_dense(k, d, g)), splits)
    ref_delta = np.split(np.asarray(rbp_delta_dense(k, d, g)), splits)
    reference = [numpy_cosine(a, b) for a, b in zip(ref_exact, ref_delta)]
    reference.append(numpy_cosine(np.concatenate(ref_exact), np.concatenate(ref_delta)))
    np.testing.assert_allclose(out['exact'][i], reference, atol=1e-9)
    for j, n in enumerate(n_points):
      np.testing.assert_allclose(out['estimates'][j, 0, i], reference,
                                 atol=2e-3 if n == 1 else 1e-6)
  # The asymmetry bias is there (cosines well below 1) and a finite nudge moves N = 1 away.
  assert out['exact'][:, 0].min() < 0.9
  assert np.abs(out['estimates'][0, 1] - out['exact']).max() > 0.02
  assert (out['residual'] < 1e-10).all()


def test_tied_sweep_gives_cosine_one_for_every_n_of_at_least_two():
  config, params, x, labels = tiny_mlp()
  n_points = (1, 2, 3, 4, 6)
  out = _sweep(tie(params), config, x, labels, [1e-3, 1e-1], n_points)
  np.testing.assert_allclose(out['exact'], 1.0, atol=1e-12)
  for j, n in enumerate(n_points):
    deviation = np.abs(out['estimates'][j, 0] - 1.0).max()
    if n >= 2:
      assert deviation < 1e-9, (n, deviation)
    else:  # classic EP keeps an O(|beta|) bias, visible at these precisions
      assert deviation > 1e-8, deviation
  # At |beta| = 0.1 the bias shrinks with N (O(|beta|^N)).
  far = [np.abs(out['estimates'][j, 1] - 1.0).max() for j in range(len(n_points))]
  assert far[0] > 10 * far[1] > 100 * far[3], far


# ----------------------------------------------------------------- Fig. 2e-f continuous

def test_continuous_trajectory_records_the_running_estimates_of_common():
  config, params, x, labels = tiny_mlp(alpha=70.0, layer_updates='sequential')
  x_drive = m.input_drive(params, x)
  u_free = free_fixed_point(config, params, x)
  s_free = m.activate(u_free)
  exact = common.exact_dbeta(m.nudged_relaxation(config, params, x_drive, labels, u_free))
  beta, n, per_point, periods = 0.5, 4, 30, 3
  units = ((0, 2), (1, 4), (2, 7))
  keep = jnp.asarray([True, True, False, True])
  history, s_bar, e_bar = fig2_bias.continuous_trajectory(
      config, params, x, labels, beta, n, per_point, periods, s_free, exact, keep, 1, units)
  ref_s, ref_e = common.continuous_time_estimate(
      m.make_step(config, params, x_drive, labels), m.zeros_state(config, BATCH), m.activate,
      beta, n, per_point, periods)
  for a, b in zip((*s_bar, *e_bar), (*ref_s, *ref_e)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
  total = n * per_point * periods
  assert history['s_error'].shape == (total,) and history['s_bar'].shape == (total, 3)
  np.testing.assert_allclose(history['s_bar'][-1], [ref_s[l][1, i] for l, i in units],
                             rtol=1e-12)
  np.testing.assert_allclose(history['e_bar'][-1], [ref_e[l][1, i] for l, i in units],
                             rtol=1e-12)
  # Median over the kept samples (0, 1, 3) of the per-sample relative error.
  errors = [np.linalg.norm(sample(ref_e, i) - sample(exact, i)) / np.linalg.norm(
      sample(exact, i)) for i in (0, 1, 3)]
  np.testing.assert_allclose(history['e_error'][-1], np.median(errors), rtol=1e-10)
  # beta(t) holds each of the N points for per_point updates, in order.
  k = np.arange(total) // per_point % n
  np.testing.assert_allclose(history['beta_re'] + 1j * history['beta_im'],
                             beta * np.exp(2j * np.pi * k / n), atol=1e-12)
  # The running estimates converge: the transient from zeros fades like 1 / periods.
  assert history['e_error'][-1] < 0.45 * history['e_error'][n * per_point - 1]
  assert history['s_error'][-1] < 0.45 * history['s_error'][n * per_point - 1]


# ------------------------------------------------------------------- bad input, smoke run

@pytest.mark.parametrize('overrides, message', [
    (dict(sweep_betas=(0.1, 0.0)), 'sweep_betas'),
    (dict(sweep_n_points=(0, 2)), 'sweep_n_points must be a tuple of >= 1 positive'),
    (dict(dist_depths=()), 'dist_depths'),
    (dict(dist_depth_panel_alpha=45.0), 'dist_depth_panel_alpha'),
    (dict(continuous_n_points=1), 'continuous_n_points must be >= 2'),
    (dict(continuous_beta=-0.5), 'continuous_beta'),
    (dict(batch_size=0), 'batch_size must be >= 1'),
    (dict(trace_sample=200), 'trace_sample'),
    (dict(layer_updates='random'), 'unknown layer_updates'),
    (dict(checkpoint_dir='/nonexistent'), 'no checkpoint.npz'),
    (dict(sweep_alphas=()), 'nothing to sweep'),
])
def test_bad_config_is_a_one_line_error(overrides, message):
  config = fig2_config.get_config()
  config.update(overrides)
  with pytest.raises(fig2_bias.ConfigError, match=message) as error:
    fig2_bias.check_config(config)
  assert '\n' not in str(error.value)


def test_a_checkpoint_of_another_network_is_a_one_line_error(tmp_path):
  net = mlp_config.get_config()
  net.hidden_sizes = (8,)
  params = m.init_params(jax.random.PRNGKey(0), net)
  state = (params, m.make_optimizer(net, None).init(params))
  net.hidden_sizes = (8, 8)  # the recorded config does not match the arrays
  save_checkpoint(str(tmp_path), net, 1, jax.device_get(state))
  config = fig2_config.get_config()
  config.checkpoint_dir = str(tmp_path)
  with pytest.raises(fig2_bias.ConfigError, match='does not hold fmnist_mlp.py MLP parameters'):
    fig2_bias.check_config(config)


def run_fig2(args, code=None):
  """fig2_bias.py args..., or the program `code` with those arguments."""
  return run_script('fig2_bias.py', args) if code is None else run_script('-c', [code, *args])


@pytest.mark.slow
def test_cli_errors_are_one_line_before_any_compute(tmp_path):
  out = run_fig2([f'--workdir={tmp_path}/a', '--config.sweep_n_points=(1,0)'])
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith('fig2_bias.py: error: sweep_n_points')
  out = run_fig2([f'--workdir={tmp_path}/b', f'--config.data_dir={tmp_path}/none'])
  assert out.returncode == 1 and 'IDX files missing' in out.stderr.strip().splitlines()[-1]
  out = run_fig2([f'--workdir={tmp_path}/c', '--config=configs/fmnist_mlp.py'])
  assert out.returncode == 1 and 'not a fig2_bias config' in out.stderr
  # Without matplotlib, asking for figures fails at once, naming the way out.
  hide = ('import runpy, sys; sys.modules["matplotlib"] = None; '
          'sys.argv[0] = "fig2_bias.py"; runpy.run_path("fig2_bias.py", run_name="__main__")')
  out = run_fig2([f'--workdir={tmp_path}/d'], code=hide)
  assert out.returncode == 1
  assert 'matplotlib' in out.stderr.strip().splitlines()[-1]
  assert not any(os.path.exists(tmp_path / w) for w in 'abcd')


@pytest.mark.slow
def test_smoke_run_writes_every_output(tmp_path):
  data = tmp_path / 'idx'
  data.mkdir()
  write_fashion_mnist_lookalike(data, num_train=40, num_test=10)
  # A "trained" network: the checkpoint format of fmnist_mlp.py.
  run_dir = tmp_path / 'train_run'
  run_dir.mkdir()
  net = fig2_bias.network_config(fig2_config.get_config(), (8, 8), alpha=45.0)
  params = m.init_params(jax.random.PRNGKey(1), net)
  state = jax.device_get((params, m.make_optimizer(net, None).init(params)))
  save_checkpoint(str(run_dir), net, 3,  # float32, as training runs write it
                  jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), state))
  workdir = tmp_path / 'out'
  args = [f'--workdir={workdir}', f'--config.data_dir={data}', '--config.batch_size=6',
          '--config.hidden_sizes=(8,8)', '--config.t_free=300', '--config.t_nudge=300',
          '--config.sweep_betas=(0.001,0.3)', '--config.sweep_n_points=(1,2,4)',
          '--config.dist_alphas=(0.0,90.0)', '--config.dist_depth_panel_alpha=90.0',
          '--config.dist_depths=(1,2)', '--config.dist_width=8',
          '--config.continuous_steps_per_point=8', '--config.continuous_periods=2',
          '--config.trace_sample=2', f'--config.checkpoint_dir={run_dir}']
  out = run_fig2(args)
  assert out.returncode == 0, out.stderr[-3000:]
  files = set(os.listdir(workdir))
  assert {'config.json', 'fig2.json', 'sweep.csv', 'cosines.csv', 'continuous.csv',
          'fig2ab_sweep.png', 'fig2cd_distributions.png', 'fig2ef_continuous.png'} <= files
  for name in files:
    if name.endswith('.png'):
      with open(workdir / name, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(workdir / 'fig2.json') as f:
    summary = json.load(f)
  assert set(summary['sweep']) == {'alpha0', 'alpha90', 'trained'}
  assert summary['how']['seed'] == 0 and summary['how']['batch_size'] == 6
  assert summary['how']['dtype'] == 'float64'
  commit = summary['how']['commit']  # the producing commit, as the sweep's .meta.json
  assert commit == 'unknown' or len(commit.split('-')[0]) == 40, commit
  tied = summary['sweep']['alpha0']
  assert tied['layers'] == ['h1', 'h2', 'out', 'all']
  assert tied['exact']['median'] == pytest.approx([1.0] * 4, abs=1e-9)
  assert len(tied['estimates']['4']) == 2
  assert set(summary['distributions']) == {'depth1_alpha0', 'depth1_alpha90', 'depth2_alpha0',
                                           'depth2_alpha90'}
  assert len(summary['continuous']['end_of_period']['e_error']) == 2
  with open(workdir / 'sweep.csv') as f:
    rows = f.read().strip().splitlines()
  # (3 N x 2 betas + exact) x 4 columns per network state, 3 states, plus the header.
  assert len(rows) == 1 + 3 * (3 * 2 + 1) * 4
  with open(workdir / 'continuous.csv') as f:
    assert len(f.read().strip().splitlines()) == 1 + 4 * 4 * 2  # 8 synchronous = 4 updates

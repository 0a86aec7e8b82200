r"""Fig. 2: the two biases of generalized EP, separated (Laborieux & Zenke, 2023, Section 3).

    python fig2_bias.py --config=configs/fig2_bias.py --workdir=results/fig2
    python fig2_bias.py --workdir=runs/fig2 --config.checkpoint_dir=runs/mlp  # + a trained net

Generalized hEP estimates d_beta s*, the derivative of the activated fixed point with respect
to the teaching amplitude, and uses it where the true gradient uses RBP's delta (Eq. 4). Two
things separate the estimate from delta:

* the finite nudge: the N-point Cauchy estimate (Eq. 7, App. D.1) misses d_beta s* by
  O(|beta|^N), classic EP (N = 1) by O(|beta|); this bias vanishes as |beta| -> 0 or N grows;
* the asymmetry of K = dG/ds: even the exact d_beta s* differs from delta,
  d_beta s* = (I - DK)^{-1} (I - DK^T) delta (Eq. 10), -2 S^{-1} A delta to first order
  (Eq. 11); this bias does not depend on beta or N at all.

On one batch of Fashion-MNIST images and the MLP of fmnist_mlp.py (imported, not copied):

  a-b  per-sample cosine(delta, estimate) over the whole state against |beta|, for N = 1, 2,
       4, 6 and for the exact d_beta s*, with tied weights (alpha = 0) and independent ones
       (alpha = 90 degrees): median over the batch, band = interquartile range;
  c-d  distribution over samples of the per-layer cosine(delta, exact d_beta s*) for several
       angles alpha (c) and numbers of hidden layers (d), as ridgelines of a Gaussian KDE;
  e-f  continuous-time hEP (Eqs. 8-9, App. C.1): from zeros, under the rotating beta(t),
       traces of one neuron per layer, and the running averages that estimate s*_0 (Eq. 9)
       and d_beta s* (Eq. 8), converging over the periods.

Networks are at initialisation (fmnist_mlp.init_params, seed `seed`, backward weights at
angle alpha from the transposed forward ones; the same seed gives the same forward weights
at every angle), plus the checkpoint of a training run when `checkpoint_dir` is set. The
workdir receives config.json, fig2.json (summary numbers and how they were obtained),
sweep.csv, cosines.csv, continuous.csv and the PNG panels.

Precision: float64 by default (`x64`); see configs/fig2_bias.py.
"""
import csv
import functools
import json
import os
import platform
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

import common
import fmnist_mlp
import harness
from configs import fmnist_mlp as mlp_config

FLAGS = flags.FLAGS
ConfigError = harness.ConfigError
SCRIPT = os.path.basename(__file__)
tree_map = jax.tree_util.tree_map


# ======================================================================================
# Config checks (one-line errors before any compute)
# ======================================================================================

# Each field's rule for harness.check_fields: the choices, or (type, low, high, above).
FIELDS = {
    'data_source': ('auto', 'idx', 'tfds'), 'layer_updates': ('sequential', 'synchronous'),
    **{name: (int, 1) for name in ('batch_size', 't_free', 't_nudge', 'dist_width',
                                   'continuous_steps_per_point', 'continuous_periods')},
    'continuous_n_points': (int, 2), 'continuous_beta': (float, None, None, 0),
    'max_residual': (float, 0),  # 0 = automatic
}


def check_config(config):
  """Raises ConfigError on bad input; returns the trained parameters of checkpoint_dir."""
  c = config
  if 'sweep_betas' not in c:
    raise ConfigError('this is not a fig2_bias config; use --config=configs/fig2_bias.py')
  harness.check_fields(c, FIELDS)
  for name in ('hidden_sizes', 'sweep_n_points', 'dist_depths'):
    harness.check_int_tuple(c, name, 1)
  harness.check_number(c, 'trace_sample', int, 0, c.batch_size - 1)
  if not c.sweep_betas or min(c.sweep_betas) <= 0:
    raise ConfigError(f'sweep_betas must be teaching amplitudes |beta| > 0, got {c.sweep_betas}')
  if not c.dist_alphas:
    raise ConfigError('dist_alphas needs at least one angle')
  if not c.sweep_alphas and not c.checkpoint_dir:
    raise ConfigError('sweep_alphas is empty and there is no checkpoint_dir: nothing to sweep')
  if c.dist_depth_panel_alpha not in c.dist_alphas:
    raise ConfigError(f'dist_depth_panel_alpha={c.dist_depth_panel_alpha} must be one of '
                      f'dist_alphas {tuple(c.dist_alphas)}')
  if c.figures:
    try:
      import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise ConfigError('the figures need matplotlib (pip install matplotlib), or run with '
                        '--config.figures=False') from e
  return load_trained(c.checkpoint_dir) if c.checkpoint_dir else None


def load_trained(workdir):
  """Parameters of a fmnist_mlp.py run's checkpoint (an .npz, never a pickle), checked to be
  the MLP's, with the training run's config."""
  path = os.path.join(workdir, harness.CHECKPOINT)
  ckpt = harness.read_checkpoint(path)  # one-line ConfigError if damaged
  if ckpt is None:
    raise ConfigError(f'no {harness.CHECKPOINT} in checkpoint_dir {workdir}')
  net = mlp_config.get_config()
  try:
    net.update({k: (tuple(v) if isinstance(v, list) else v)
                for k, v in ckpt['config'].items() if k in net})
    fmnist_mlp.check_config(net, num_local_devices=1)
    params = fmnist_mlp.init_params(jax.random.PRNGKey(0), net)
    template = (params, fmnist_mlp.make_optimizer(net, None).init(params))
    params = harness.restore_checkpoint(ckpt, template)[0]
  except (ConfigError, TypeError, KeyError, ValueError) as e:
    raise ConfigError(f'{path} does not hold fmnist_mlp.py MLP parameters ({e})') from e
  return {'params': params, 'epoch': ckpt['epoch'], 'hidden_sizes': tuple(net.hidden_sizes),
          'config': net, 'training_config': ckpt['config']}


# ======================================================================================
# Networks, data and the two error vectors at the free fixed point
# ======================================================================================

def network_config(config, hidden_sizes, alpha=0.0):
  """The fmnist_mlp config of one network, with this analysis's dynamics settings."""
  net = network_config_from_key((tuple(int(h) for h in hidden_sizes), config.layer_updates,
                                 config.t_free, config.t_nudge))
  net.alpha = float(alpha)
  return net


def init_network(config, hidden_sizes, alpha):
  net = network_config(config, hidden_sizes, alpha)
  return net, fmnist_mlp.init_params(jax.random.PRNGKey(config.seed), net)


def load_batch(config, dtype):
  """`batch_size` training images drawn with the seed: x in [0, 1] and the labels."""
  train = fmnist_mlp.load_data(config).train
  if config.batch_size > len(train):
    raise ConfigError(f'batch_size={config.batch_size} exceeds the {len(train)} training images')
  idx = np.sort(np.random.default_rng(config.seed).choice(len(train), config.batch_size,
                                                          replace=False))
  images, labels = train.read(idx)
  return jnp.asarray(images, dtype) / 255.0, jnp.asarray(labels), idx


def max_residual(config):
  if config.max_residual:
    return config.max_residual
  return 1e-6 if config.x64 else 1e-4


def fixed_point_errors(net, params, x, labels):
  """At the free fixed point: u*, each sample's last-update norm, exact d_beta s*, delta.

  The per-sample residual is ||step(u*) - u*|| for one more free step; exact d_beta s* is
  forward-mode autodiff through the nudged relaxation (common.exact_dbeta), delta the RBP
  adjoint fixed point (fmnist_mlp.rbp_error).
  """
  x_drive = fmnist_mlp.input_drive(params, x)
  u_free, _, _ = fmnist_mlp.free_relaxation(net, params, x_drive)
  step = fmnist_mlp.make_step(net, params, x_drive)
  residual = jnp.sqrt(common.per_sample_sq_norm(common.tree_sub(step(u_free), u_free)))
  relax = fmnist_mlp.nudged_relaxation(net, params, x_drive, labels, u_free)
  return {'u_free': u_free, 'residual': residual, 'exact': common.exact_dbeta(relax),
          'delta': fmnist_mlp.rbp_error(net, params, x_drive, labels, u_free)}


def dynamics_key(net):
  """What the compiled functions depend on (not alpha: it only enters the parameters)."""
  return (tuple(net.hidden_sizes), net.layer_updates, net.t_free, net.t_nudge)


def network_config_from_key(key):
  hidden, layer_updates, t_free, t_nudge = key
  net = mlp_config.get_config()
  net.update(dict(hidden_sizes=hidden, layer_updates=layer_updates, t_free=t_free,
                  t_nudge=t_nudge, tol=0.0))
  return net


@functools.lru_cache(maxsize=None)
def _compiled_errors(key):
  """fixed_point_errors, compiled once per network shape and dynamics."""
  return jax.jit(functools.partial(fixed_point_errors, network_config_from_key(key)))


def layer_cosines(a, b):
  """(batch, L + 1): per-sample cosine of each layer's vectors, then of the whole state."""
  columns = [common.per_sample_cosine((x,), (y,)) for x, y in zip(a, b)]
  return jnp.stack(columns + [common.per_sample_cosine(a, b)], axis=1)


def relative_errors(a, b):
  """||a_i - b_i|| / ||b_i|| for every sample i (whole state)."""
  return jnp.sqrt(common.per_sample_sq_norm(common.tree_sub(a, b)) /
                  common.per_sample_sq_norm(b))


def layer_names(num_layers):
  return [f'h{l + 1}' for l in range(num_layers - 1)] + ['out', 'all']


# ======================================================================================
# Fig. 2a-b: the finite-nudge bias against |beta|
# ======================================================================================

def cauchy_estimate(net, n_points, params, x, labels, u_free, beta_abs):
  """The N-point Cauchy estimate of d_beta s* at |beta|, nudged from the free fixed point."""
  x_drive = fmnist_mlp.input_drive(params, x)
  relax = fmnist_mlp.nudged_relaxation(net, params, x_drive, labels, u_free)
  return common.cauchy_estimate(relax, fmnist_mlp.activate(u_free), beta_abs, n_points)


def estimate_cosines(net, n_points, params, x, labels, u_free, delta, beta_abs):
  """layer_cosines(estimate, delta) for the N-point Cauchy estimate at |beta|."""
  return layer_cosines(cauchy_estimate(net, n_points, params, x, labels, u_free, beta_abs),
                       delta)


@functools.lru_cache(maxsize=None)
def _compiled_estimate(key, n_points):
  return jax.jit(functools.partial(estimate_cosines, network_config_from_key(key), n_points))


def sweep(net, params, x, labels, betas, n_points_list):
  """Cosines with delta: estimates (len(N), len(betas), batch, L+1), exact (batch, L+1).

  Also returns the per-sample free-phase residual. |beta| is traced, so each N compiles once.
  """
  key = dynamics_key(net)
  base = _compiled_errors(key)(params, x, labels)
  estimates = np.stack([
      np.stack([np.asarray(_compiled_estimate(key, n)(params, x, labels, base['u_free'],
                                                      base['delta'], beta))
                for beta in betas])
      for n in n_points_list])
  exact = np.asarray(layer_cosines(base['exact'], base['delta']))
  return {'estimates': estimates, 'exact': exact, 'residual': np.asarray(base['residual'])}


# ======================================================================================
# Fig. 2c-d: the asymmetry bias, distribution over samples
# ======================================================================================

def distributions(config, x, labels):
  """{(depth, alpha): (per-sample per-layer cosine(delta, exact) (batch, L+1), residual)}."""
  out = {}
  for depth in config.dist_depths:
    for alpha in config.dist_alphas:
      net, params = init_network(config, (config.dist_width,) * depth, alpha)
      base = _compiled_errors(dynamics_key(net))(params, x, labels)
      out[(depth, float(alpha))] = (np.asarray(layer_cosines(base['exact'], base['delta'])),
                                    np.asarray(base['residual']))
      logging.info('depth %d  alpha %.0f: median cosines %s', depth, alpha,
                   np.round(np.median(out[(depth, float(alpha))][0], axis=0), 3))
  return out


# ======================================================================================
# Fig. 2e-f: continuous-time hEP, traced
# ======================================================================================

def continuous_trajectory(net, params, x, labels, beta_abs, n_points, steps_per_point,
                          periods, s_free, exact, keep, trace_sample, trace_units):
  """Continuous-time hEP from zeros (Eqs. 8-9), with its history.

  common.continuous_time_estimate (beta(t) held `steps_per_point` steps at each of the N
  points |beta| e^{2 i pi k / N}, running averages from t = 0), recording after every
  step: Re s(t) of the traced units of sample `trace_sample`, the running estimates
  s_bar(t) (Eq. 9) and e_bar(t) (Eq. 8) of those units, and the medians over the samples
  where `keep` is true of the per-sample relative errors ||s_bar - s*_0|| / ||s*_0||,
  ||e_bar - d_beta s*|| / ||d_beta s*|| and of the cosine (e_bar, d_beta s*).
  `steps_per_point` counts make_step updates.

  Returns (history dict of arrays over time, final s_bar, final e_bar).
  """
  x_drive = fmnist_mlp.input_drive(params, x)
  step = fmnist_mlp.make_step(net, params, x_drive, labels)
  pick = lambda tree: jnp.stack([tree[l][trace_sample, i] for l, i in trace_units])
  median = lambda v: jnp.nanmedian(jnp.where(keep, v, jnp.nan))
  rel_error = lambda a, b: median(relative_errors(a, b))

  def record(beta, s, s_bar, e_bar):
    return {'beta_re': jnp.real(beta), 'beta_im': jnp.imag(beta),
            's': pick(tree_map(jnp.real, s)), 's_bar': pick(s_bar), 'e_bar': pick(e_bar),
            's_error': rel_error(s_bar, s_free), 'e_error': rel_error(e_bar, exact),
            'e_cosine': median(common.per_sample_cosine(e_bar, exact))}

  s_bar, e_bar, history = common.continuous_time_estimate(
      step, fmnist_mlp.zeros_state(net, x.shape[0]), fmnist_mlp.activate, beta_abs,
      n_points, steps_per_point, periods, record=record)
  return history, s_bar, e_bar


def continuous_analysis(config, x, labels):
  """Fig. 2e-f on the network of angle continuous_alpha."""
  net, params = init_network(config, config.hidden_sizes, config.continuous_alpha)
  base = _compiled_errors(dynamics_key(net))(params, x, labels)
  s_free, exact = fmnist_mlp.activate(base['u_free']), base['exact']
  keep = np.asarray(base['residual']) <= max_residual(config)
  # One unit per layer: the one whose exact d_beta s* is largest for the traced sample.
  trace_units = tuple((l, int(jnp.argmax(jnp.abs(e[config.trace_sample]))))
                      for l, e in enumerate(exact))
  per_point = fmnist_mlp.steps_for(net, config.continuous_steps_per_point)
  n, beta = config.continuous_n_points, config.continuous_beta
  run = jax.jit(lambda p, x, y, s0, e, k: continuous_trajectory(
      net, p, x, y, beta, n, per_point, config.continuous_periods, s0, e, k,
      config.trace_sample, trace_units)[0])
  history = jax.device_get(run(params, x, labels, s_free, exact, jnp.asarray(keep)))
  # The limit of the running average for an equilibrated system: the N-point Cauchy
  # estimate at the same |beta| (its own O(|beta|^N) bias), from the free fixed point.
  cauchy = jax.jit(functools.partial(cauchy_estimate, net, n))(params, x, labels,
                                                               base['u_free'], beta)
  cauchy_error = float(np.median(np.asarray(relative_errors(cauchy, exact))[keep]))
  pick = lambda tree: np.array([float(tree[l][config.trace_sample, i]) for l, i in trace_units])
  return {'history': {k: np.asarray(v) for k, v in history.items()},
          'trace_units': trace_units, 'steps_per_point': per_point,
          'num_layers': len(exact), 's_free_units': pick(s_free), 'exact_units': pick(exact),
          'cauchy_error': cauchy_error, 'excluded': int((~keep).sum())}


# ======================================================================================
# Outputs: JSON, CSV, figures
# ======================================================================================

def summarize(cosines, keep):
  """Median, quartiles and mean over the kept samples of a (batch, L+1) array, per column."""
  c = cosines[keep]
  return {'median': np.median(c, 0).tolist(), 'q25': np.percentile(c, 25, 0).tolist(),
          'q75': np.percentile(c, 75, 0).tolist(), 'mean': c.mean(0).tolist()}


def write_csv(path, header, rows):
  """Floats with 9 significant digits."""
  fmt = lambda v: f'{v:.9g}' if isinstance(v, (float, np.floating)) else v
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows([fmt(v) for v in row] for row in rows)


def kde(values, grid):
  """Gaussian kernel density, Scott's bandwidth floored at 0.005 (a spike stays a spike)."""
  values = np.asarray(values, np.float64)
  bw = max(1.06 * values.std() * len(values) ** -0.2, 0.005)
  z = (grid[:, None] - values[None, :]) / bw
  return np.exp(-0.5 * z ** 2).sum(1) / (len(values) * bw * np.sqrt(2 * np.pi))


HIDDEN_COLORS = ('#1b9e77', '#d95f02', '#e6ab02', '#66a61e', '#a6761d')
OUT_COLOR = '#7570b3'
N_COLORS = {1: '0.55', 2: '#c51b8a', 3: '#ae017e', 4: '#7a0177', 5: '#49006a', 6: '#f768a1'}


def layer_color(l, num_layers):
  """The output layer has one colour, hidden layer l (from the input) another, everywhere."""
  return OUT_COLOR if l == num_layers - 1 else HIDDEN_COLORS[l % len(HIDDEN_COLORS)]


def pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def ridgelines(ax, rows, title):
  """One ridge per row (label, [per-layer cosine arrays]); each KDE scaled to its peak."""
  grid = np.linspace(-1.0, 1.0, 801)
  labelled = set()
  for r, (label, columns) in enumerate(rows):
    base = len(rows) - 1 - r
    names = layer_names(len(columns))[:-1]
    for l, values in enumerate(columns):
      d = kde(values, grid)
      color = layer_color(l, len(columns))
      ax.fill_between(grid, base, base + 0.85 * d / d.max(), color=color, alpha=0.3, lw=0)
      ax.plot(grid, base + 0.85 * d / d.max(), color=color, lw=1.2,
              label=None if names[l] in labelled else names[l])
      labelled.add(names[l])
    ax.axhline(base, color='0.8', lw=0.6)
  ax.set_yticks(np.arange(len(rows))[::-1] + 0.3)
  ax.set_yticklabels([label for label, _ in rows])
  ax.set_ylim(-0.1, len(rows) + 0.25)
  ax.set_xlim(-1.0, 1.05)
  ax.set_xlabel(r'cosine($\delta$, exact $d_\beta s^*$) per sample')
  ax.set_title(title, loc='left', fontsize=10)
  handles, labels = ax.get_legend_handles_labels()
  order = sorted(range(len(labels)), key=lambda i: (labels[i] == 'out', labels[i]))
  ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8,
            loc='upper left', frameon=False, ncol=len(labels))


def plot_sweep(path, states, betas, n_points_list):
  """a, b (and the trained network): median cosine against |beta|; then, for the tied
  network, 1 - cosine on a log scale, where the finite-nudge bias shows its power law."""
  plt = pyplot()
  tied = [s for s in states if s['alpha'] == 0]
  fig, axes = plt.subplots(1, len(states) + len(tied[:1]),
                           figsize=(4.2 * (len(states) + len(tied[:1])), 3.6), squeeze=False)
  for ax, state in zip(axes[0], states):
    keep = state['keep']
    for i, n in enumerate(n_points_list):
      c = state['sweep']['estimates'][i][:, keep, -1]
      color = N_COLORS.get(n)
      ax.plot(betas, np.median(c, 1), 'o-', ms=3, color=color,
              label='classic EP (N=1)' if n == 1 else f'hEP N={n}')
      ax.fill_between(betas, np.percentile(c, 25, 1), np.percentile(c, 75, 1), color=color,
                      alpha=0.15, lw=0)
    exact = np.median(state['sweep']['exact'][keep, -1])
    ax.axhline(exact, color='k', ls='--', lw=1, label=r'exact $d_\beta s^*$')
    ax.set_xscale('log')
    ax.set_xlabel(r'teaching amplitude $|\beta|$')
    ax.set_title(state['title'], loc='left', fontsize=10)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(r'cosine($\delta$, estimate), whole state')
  axes[0][0].legend(fontsize=8, loc='lower left')
  if tied:
    ax, state = axes[0][-1], tied[0]
    for i, n in enumerate(n_points_list):
      c = state['sweep']['estimates'][i][:, state['keep'], -1]
      ax.plot(betas, np.maximum(np.median(1 - c, 1), 1e-17), 'o-', ms=3,
              color=N_COLORS.get(n), label=f'N={n}')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_ylim(1e-17, 1)
    ax.set_xlabel(r'teaching amplitude $|\beta|$')
    ax.set_ylabel('median of 1 - cosine')
    ax.set_title('tied weights, log scale: bias ~ $|\\beta|^N$, so 1 - cos ~ $|\\beta|^{2N}$',
                 loc='left', fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def plot_distributions(path, config, dist, trained):
  plt = pyplot()
  threshold = max_residual(config)
  kept = lambda c, r: [c[r <= threshold, l] for l in range(c.shape[1] - 1)]
  depth_c = len(config.hidden_sizes) if len(config.hidden_sizes) in config.dist_depths \
      else config.dist_depths[-1]
  panels = [
      (f'c  {depth_c} hidden layer(s) of {config.dist_width}, angle alpha',
       [(f'{alpha:.0f}°', kept(*dist[(depth_c, float(alpha))])) for alpha in config.dist_alphas]),
      (f'd  alpha = {config.dist_depth_panel_alpha:.0f}°, number of hidden layers',
       [(f'{d} hidden', kept(*dist[(d, float(config.dist_depth_panel_alpha))]))
        for d in config.dist_depths])]
  if trained is not None:
    panels.append((f"trained network (epoch {trained['epoch']})",
                   [('trained', kept(trained['cosines'], trained['residual']))]))
  fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.9), squeeze=False)
  for ax, (title, rows) in zip(axes[0], panels):
    ridgelines(ax, rows, title)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def plot_continuous(path, config, cont):
  plt = pyplot()
  h = cont['history']
  period = config.continuous_n_points * cont['steps_per_point']
  t = (np.arange(len(h['s_error'])) + 1) / period
  num_layers = cont['num_layers']
  names = layer_names(num_layers)
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
  ax = axes[0]
  for j, (l, i) in enumerate(cont['trace_units']):
    color = layer_color(l, num_layers)
    ax.plot(t, h['s'][:, j], color=color, lw=0.6, alpha=0.6)
    ax.plot(t, h['s_bar'][:, j], color=color, lw=2, label=f'{names[l]} unit {i}')
    ax.axhline(cont['s_free_units'][j], color=color, ls='--', lw=1)
  top = max(h['s'].max(), 0.0)
  ax.set_ylim(top=top + 0.25 * (top - min(h['s'].min(), 1.0)))
  ax.set_xlabel('time (periods of the teaching signal)')
  ax.set_ylabel(r'Re $s(t)$ (thin), running mean (thick)')
  ax.set_title(r'e  running mean $\to$ free fixed point $s^*_0$ (dashed), Eq. 9',
               loc='left', fontsize=9)
  ax.legend(fontsize=8, loc='upper center', ncol=3, frameon=False)
  ax = axes[1]
  for j, (l, i) in enumerate(cont['trace_units']):
    color = layer_color(l, num_layers)
    scale = abs(cont['exact_units'][j])
    ax.plot(t, h['e_bar'][:, j] / scale, color=color, lw=1.5,
            label=fr'{names[l]} unit {i} ($|d_\beta s^*|$ = {scale:.2g})')
    ax.axhline(np.sign(cont['exact_units'][j]), color=color, ls='--', lw=1)
  ax.set_ylim(-3, 3)
  ax.set_xlabel('time (periods of the teaching signal)')
  ax.set_ylabel(r'running estimate / $|d_\beta s^*|$')
  ax.set_title(r'f  running estimate $\to d_\beta s^*$ (dashed), Eq. 8', loc='left',
               fontsize=9)
  ax.legend(fontsize=8, loc='lower right')
  ax = axes[2]
  ends = np.arange(period - 1, len(t), period)
  for key, color, ls, label in (
      ('s_error', '#1f78b4', '-', r'$\|\bar s - s^*_0\| / \|s^*_0\|$'),
      ('e_error', '#e31a1c', '-', r'$\|\bar e - d_\beta s^*\| / \|d_\beta s^*\|$'),
      ('e_cosine', '#e31a1c', ':', r'1 - cosine($\bar e$, $d_\beta s^*$)')):
    values = 1 - h[key] if key == 'e_cosine' else h[key]
    ax.plot(t, values, color=color, ls=ls, lw=0.8, label=label)
    ax.plot(t[ends], values[ends], 'o', color=color, ms=3)
  ax.axhline(cont['cauchy_error'], color='k', ls='--', lw=1,
             label=f'{config.continuous_n_points}-point Cauchy estimate (its bias)')
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlabel('time (periods); dots: ends of periods')
  ax.set_title('median over the batch', loc='left', fontsize=9)
  ax.legend(fontsize=7, loc='lower left')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


# ======================================================================================
# Main
# ======================================================================================

def run(config, workdir):
  """The whole analysis; returns the summary written to fig2.json."""
  t0, c0 = time.time(), time.process_time()
  commit = harness.git_commit(os.path.dirname(os.path.abspath(__file__)))  # the code run
  trained = check_config(config)  # one-line ConfigError before any compute
  jax.config.update('jax_enable_x64', bool(config.x64))
  dtype = jnp.float64 if config.x64 else jnp.float32
  x, labels, idx = load_batch(config, dtype)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json(indent=2))
  threshold = max_residual(config)
  betas = [float(b) for b in config.sweep_betas]
  n_points_list = [int(n) for n in config.sweep_n_points]
  cast = lambda p: tree_map(lambda a: jnp.asarray(a, dtype), p)

  # Fig. 2a-b.
  states = []
  for panel, alpha in zip('ab' + ' ' * len(config.sweep_alphas), config.sweep_alphas):
    net, params = init_network(config, config.hidden_sizes, alpha)
    title = f'{panel}  ' + ('tied weights, alpha = 0°' if alpha == 0 else
                            f'alpha = {alpha:.0f}°') + ' (initialisation)'
    states.append({'name': f'alpha{alpha:g}', 'title': title, 'net': net, 'params': params,
                   'alpha': float(alpha)})
  if trained is not None:
    net = network_config(config, trained['hidden_sizes'])
    states.append({'name': 'trained', 'title': f"trained network (epoch {trained['epoch']})",
                   'net': net, 'params': cast(trained['params']), 'alpha': None})
  for state in states:
    state['sweep'] = sweep(state['net'], state['params'], x, labels, betas, n_points_list)
    state['keep'] = state['sweep']['residual'] <= threshold
    logging.info('%s: exact median cosine %.4f, %d samples left out', state['name'],
                 np.median(state['sweep']['exact'][state['keep'], -1]),
                 int((~state['keep']).sum()))

  # Fig. 2c-d.
  dist = distributions(config, x, labels)
  if trained is not None:
    trained.update(cosines=states[-1]['sweep']['exact'], residual=states[-1]['sweep']['residual'])

  # Fig. 2e-f.
  cont = continuous_analysis(config, x, labels)

  # Numbers.
  summary = {
      'how': {'command': ' '.join(['python', os.path.basename(sys.argv[0]), *sys.argv[1:]]),
              'seed': config.seed, 'batch_size': config.batch_size,
              'train_indices_first': idx[:8].tolist(),
              'dtype': 'float64' if config.x64 else 'float32',
              'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores '
                         f'({jax.devices()[0].platform}), {platform.platform()}',
              'jax': jax.__version__, 'commit': commit, 'wall_s': None, 'cpu_s': None,
              'max_residual': threshold,
              'checkpoint_dir': config.checkpoint_dir or None,
              'checkpoint_training_config': trained and trained['training_config']},
      'cosine': 'per-sample cosine similarity; columns are the layers (h1.., out) and the '
                'whole state (all); statistics over the samples whose free phase converged',
      'sweep': {}, 'distributions': {}, 'continuous': {}}
  sweep_rows, cosine_rows = [], []
  for state in states:
    s, keep = state['sweep'], state['keep']
    names = layer_names(len(state['net'].hidden_sizes) + 1)
    entry = {'layers': names, 'betas': betas, 'n_points': n_points_list,
             'samples_left_out': int((~keep).sum()), 'exact': summarize(s['exact'], keep),
             'estimates': {str(n): [summarize(s['estimates'][i, b], keep)
                                    for b in range(len(betas))]
                           for i, n in enumerate(n_points_list)}}
    summary['sweep'][state['name']] = entry
    for i, n in enumerate([*n_points_list, 0]):
      for b, beta in enumerate(betas if n else [0.0]):
        stats = summarize(s['estimates'][i, b] if n else s['exact'], keep)
        for l, name in enumerate(names):
          sweep_rows.append([state['name'], n, beta, name, stats['median'][l], stats['q25'][l],
                             stats['q75'][l], stats['mean'][l], int(keep.sum())])
  for (depth, alpha), (cos, residual) in dist.items():
    keep = residual <= threshold
    names = layer_names(depth + 1)
    summary['distributions'][f'depth{depth}_alpha{alpha:g}'] = dict(
        depth=depth, alpha=alpha, layers=names, samples_left_out=int((~keep).sum()),
        **summarize(cos, keep))
    for i in range(len(cos)):
      for l, name in enumerate(names):
        cosine_rows.append([f'depth{depth}_alpha{alpha:g}', depth, alpha, i, name, cos[i, l],
                            bool(keep[i])])
  if trained is not None:
    for i in range(len(trained['cosines'])):
      for l, name in enumerate(layer_names(len(trained['hidden_sizes']) + 1)):
        cosine_rows.append(['trained', len(trained['hidden_sizes']), '', i, name,
                            trained['cosines'][i, l],
                            bool(trained['residual'][i] <= threshold)])
  h = cont['history']
  period = config.continuous_n_points * cont['steps_per_point']
  ends = np.arange(1, config.continuous_periods + 1) * period - 1
  summary['continuous'] = {
      'alpha': config.continuous_alpha, 'beta': config.continuous_beta,
      'n_points': config.continuous_n_points, 'updates_per_point': cont['steps_per_point'],
      'periods': config.continuous_periods, 'samples_left_out': cont['excluded'],
      'traced_units': [[names_l, i] for names_l, i in cont['trace_units']],
      'end_of_period': {'s_error': h['s_error'][ends].tolist(),
                        'e_error': h['e_error'][ends].tolist(),
                        'e_cosine': h['e_cosine'][ends].tolist()},
      'cauchy_estimate_error': cont['cauchy_error']}
  units = [f'{layer_names(cont["num_layers"])[l]}_{i}' for l, i in cont['trace_units']]
  write_csv(os.path.join(workdir, 'sweep.csv'),
            ['state', 'n_points', 'beta', 'layer', 'median', 'q25', 'q75', 'mean', 'samples'],
            sweep_rows)
  write_csv(os.path.join(workdir, 'cosines.csv'),
            ['network', 'depth', 'alpha', 'sample', 'layer', 'cosine', 'converged'],
            cosine_rows)
  write_csv(os.path.join(workdir, 'continuous.csv'),
            ['update', 'period', 'beta_re', 'beta_im', 's_error', 'e_error', 'e_cosine',
             *[f's_{u}' for u in units], *[f's_bar_{u}' for u in units],
             *[f'e_bar_{u}' for u in units]],
            [[t + 1, (t + 1) / period, h['beta_re'][t], h['beta_im'][t], h['s_error'][t],
              h['e_error'][t], h['e_cosine'][t], *h['s'][t], *h['s_bar'][t], *h['e_bar'][t]]
             for t in range(len(h['s_error']))])

  if config.figures:
    plot_sweep(os.path.join(workdir, 'fig2ab_sweep.png'), states, betas, n_points_list)
    plot_distributions(os.path.join(workdir, 'fig2cd_distributions.png'), config, dist,
                       trained)
    plot_continuous(os.path.join(workdir, 'fig2ef_continuous.png'), config, cont)
  summary['how']['wall_s'] = round(time.time() - t0, 1)
  summary['how']['cpu_s'] = round(time.process_time() - c0, 1)
  with open(os.path.join(workdir, 'fig2.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  if not FLAGS.workdir:
    sys.exit(f'{SCRIPT}: error: --workdir is required')
  try:
    summary = run(FLAGS.config, FLAGS.workdir)
  except ConfigError as e:
    sys.exit(f'{SCRIPT}: error: {e}')
  for name, entry in summary['sweep'].items():
    logging.info('%s: median whole-state cosine of the exact d_beta s* with delta: %.4f',
                 name, entry['exact']['median'][-1])
  logging.info('outputs in %s (%.0f s)', FLAGS.workdir, summary['how']['wall_s'])


if __name__ == '__main__':
  # Defined here, not at import, as in fmnist_mlp.py: tests import this module next to it.
  config_flags.DEFINE_config_file('config', 'configs/fig2_bias.py', 'Analysis configuration.')
  flags.DEFINE_string('workdir', None, 'Where to write the numbers and the figures.')
  app.run(main, flags_parser=harness.parse_flags(SCRIPT))

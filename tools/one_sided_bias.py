r"""How biased is classic EP's one-sided estimate at a large nudge, and does its sign matter?

    python tools/one_sided_bias.py                                  # at initialisation
    python tools/one_sided_bias.py --checkpoint_dir=runs/sweep/table1/hep1_beta0.5_seed0

Table 1's N = 1 cell at |beta| = 0.5 is far worse than every other cell. This measures, on
one batch of training images and at the given parameters (a fmnist_mlp.py checkpoint, or
the initialisation of the default config), the one-sided estimate

    e(beta) = (s*(beta) - s*_0) / beta            (common.cauchy_estimate with N = 1)

against the exact d_beta s* (forward mode, as `hep_exact`), for beta = +|beta| (the
training runs' nudge: + beta dL/ds_out is added to the output drive, which moves the output
*up* the loss) and beta = -|beta| (towards the target, the sign of Scellier & Bengio's
classic EP), next to the two-point estimate. Per estimate it prints

* the cosine and the norm ratio of the parameter gradient (dG/dtheta)^T e (all network
  weights; the readout's own gradient is exact in every run and left out) against the
  one from the exact d_beta s*;
* the median per-sample norm ratio ||e|| / ||d_beta s*|| over the correctly and the
  wrongly classified samples of the batch: a nudge that saturates the output shrinks the
  error vectors of the samples with a large loss most, which reweights the batch even where
  each sample's direction is right;
* the per-layer median cosine with d_beta s*;
* with --truncation, the one-sided estimate after T_nudge steps of each update order
  (sequential, synchronous) against the same estimate after 400 synchronous steps (median
  relative error over the batch), which tells whether the runs' short nudged phase or the
  update order changes the estimate.

A measurement, not a test: it prints numbers and changes nothing.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import fig2_bias  # pylint: disable=g-import-not-at-top,wrong-import-position
import fmnist_mlp  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import fmnist_mlp as mlp_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def load_params(checkpoint_dir):
  """(config, params, epoch) of a checkpoint's run, or of the default config at init."""
  if not checkpoint_dir:
    config = mlp_config.get_config()
    fmnist_mlp.check_config(config, 1)
    return config, fmnist_mlp.init_params(jax.random.PRNGKey(config.seed), config), 0
  try:
    trained = fig2_bias.load_trained(checkpoint_dir)
  except fmnist_mlp.ConfigError as e:
    raise SystemExit(f'one_sided_bias.py: error: {e}') from e
  return trained['config'], trained['params'], trained['epoch']


def flat_network_grads(config, params, x, s_free, error):
  grads, _ = fmnist_mlp.network_grads(config, params, x, s_free, error)
  grads = {k: v for k, v in grads.items() if k != 'readout'}
  return jnp.concatenate([g.ravel() for g in jax.tree_util.tree_leaves(grads)])


def measure(config, params, x, labels, beta_abs):
  x_drive = fmnist_mlp.input_drive(params, x)
  u_free, _, _ = fmnist_mlp.free_relaxation(config, params, x_drive)
  s_free = fmnist_mlp.activate(u_free)
  relax = fmnist_mlp.nudged_relaxation(config, params, x_drive, labels, u_free)
  exact = common.exact_dbeta(relax)
  logits = fmnist_mlp.readout_logits(params, s_free[-1])
  correct = jnp.argmax(logits, -1) == labels
  reference = flat_network_grads(config, params, x, s_free, exact)
  estimates = {
      f'N = 1, beta = +{beta_abs:g} (training runs)': common.cauchy_estimate(
          relax, s_free, beta_abs, 1),
      f'N = 1, beta = -{beta_abs:g} (towards target)': common.cauchy_estimate(
          relax, s_free, -beta_abs, 1),
      f'N = 2, |beta| = {beta_abs:g}': common.cauchy_estimate(relax, s_free, beta_abs, 2),
  }
  rows = {}
  for name, e in estimates.items():
    g = flat_network_grads(config, params, x, s_free, e)
    ratio = jnp.sqrt(common.per_sample_sq_norm(e) / common.per_sample_sq_norm(exact))
    rows[name] = {
        'grad_cosine': float(g @ reference / (jnp.linalg.norm(g) * jnp.linalg.norm(reference))),
        'grad_norm_ratio': float(jnp.linalg.norm(g) / jnp.linalg.norm(reference)),
        'ratio_correct': float(jnp.median(ratio[correct])) if correct.any() else float('nan'),
        'ratio_wrong': float(jnp.median(ratio[~correct])) if (~correct).any() else float('nan'),
        'layer_cosines': [float(jnp.median(common.per_sample_cosine((a,), (b,))))
                          for a, b in zip(e, exact)],
    }
  return rows, float(correct.mean())


def truncation(config, params, x, labels, beta, long_steps=400):
  """{(order, steps): median relative error of e(beta) against 400 synchronous steps}."""
  estimates = {}
  x_drive = fmnist_mlp.input_drive(params, x)
  for order in ('sequential', 'synchronous'):
    for steps in (config.t_nudge, long_steps):
      c = config.copy_and_resolve_references()
      c.layer_updates, c.t_nudge, c.t_free = order, steps, max(config.t_free, long_steps)
      u_free, _, _ = fmnist_mlp.free_relaxation(c, params, x_drive)
      relax = fmnist_mlp.nudged_relaxation(c, params, x_drive, labels, u_free)
      estimates[order, steps] = common.cauchy_estimate(relax, fmnist_mlp.activate(u_free),
                                                       beta, 1)
  reference = estimates['synchronous', long_steps]
  error = lambda e: float(jnp.median(jnp.sqrt(
      common.per_sample_sq_norm(common.tree_sub(e, reference))
      / common.per_sample_sq_norm(reference))))
  return {k: error(v) for k, v in estimates.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--checkpoint_dir', default='', help='a fmnist_mlp.py workdir (default: init)')
  p.add_argument('--betas', default='0.05,0.5', help='comma-separated |beta| values')
  p.add_argument('--batch_size', type=int, default=500)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--truncation', action='store_true',
                 help='also compare T_nudge steps of both update orders with 400 steps')
  args = p.parse_args(argv)
  config, params, epoch = load_params(args.checkpoint_dir)
  train = fmnist_mlp.load_data(config).train
  idx = np.sort(np.random.default_rng(args.seed).choice(len(train), args.batch_size,
                                                        replace=False))
  images, labels = train.read(idx)
  x, y = jnp.asarray(images, jnp.float32) / 255.0, jnp.asarray(labels)
  where = args.checkpoint_dir or 'initialisation'
  print(f'# {where} (epoch {epoch}; trained with {config.algorithm}, N = {config.n_points}, '
        f'|beta| = {config.beta:g}), {args.batch_size} training images, seed {args.seed}')
  for beta_abs in (float(b) for b in args.betas.split(',')):
    rows, accuracy = measure(config, params, x, y, beta_abs)
    print(f'\n|beta| = {beta_abs:g}  (batch accuracy at the free fixed point '
          f'{100 * accuracy:.1f} %)')
    print(f'{"estimate":38s} {"grad cos":>8s} {"grad |g|/|g*|":>13s} '
          f'{"||e||/||e*|| right":>18s} {"wrong":>6s}  layer cosines')
    for name, r in rows.items():
      print(f'{name:38s} {r["grad_cosine"]:8.4f} {r["grad_norm_ratio"]:13.3f} '
            f'{r["ratio_correct"]:18.3f} {r["ratio_wrong"]:6.3f}  '
            + ' / '.join(f'{c:.3f}' for c in r['layer_cosines']))
    if args.truncation:
      for beta in (beta_abs, -beta_abs):
        errors = truncation(config, params, x, y, beta)
        print(f'one-sided e({beta:+g}) against 400 synchronous steps: ' + ', '.join(
            f'{order} {steps} steps {err:.3f}' for (order, steps), err in errors.items()))
  return 0


if __name__ == '__main__':
  sys.exit(main())

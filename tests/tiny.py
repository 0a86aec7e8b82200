"""A tiny instance of the Fashion-MNIST MLP (784 - 6 - 5 - 10) for exact-reference tests."""
import jax
import jax.numpy as jnp
import numpy as np

import common
import reference as dense_ref
import fmnist_mlp
from configs import fmnist_mlp as mlp_config

BATCH = 4


def tiny_mlp(alpha=60.0, scale=0.6, seed=0, layer_updates='synchronous', t_free=400,
             t_nudge=400, hidden=(6, 5)):
  """(config, params, x, labels): weights scaled down so the dynamics contract quickly."""
  config = mlp_config.get_config()
  config.hidden_sizes = hidden
  config.alpha = alpha
  config.layer_updates = layer_updates
  config.t_free, config.t_nudge = t_free, t_nudge
  params = fmnist_mlp.init_params(jax.random.PRNGKey(seed), config)
  params = jax.tree_util.tree_map(lambda w: scale * w, params)
  params['forward'] = [
      dict(p, b=0.3 * jax.random.normal(jax.random.PRNGKey(seed + l), p['b'].shape))
      for l, p in enumerate(params['forward'])]
  # A gentler readout keeps s*(beta) holomorphic well beyond |beta| = 0.5.
  params['readout'] = jax.tree_util.tree_map(
      lambda w: 0.5 * w, fmnist_mlp.init_params(jax.random.PRNGKey(seed), config)['readout'])
  x = jax.random.uniform(jax.random.PRNGKey(seed + 100), (BATCH, 784), jnp.float64)
  labels = jnp.arange(BATCH) % 10
  return config, params, x, labels


def tie(params):
  """Backward weights := transposed forward weights (alpha = 0): K is symmetric."""
  params = dict(params)
  params['backward'] = [{'w': params['forward'][l + 1]['w'].T}
                        for l in range(len(params['backward']))]
  return params


def free_fixed_point(config, params, x):
  u, res = fmnist_mlp.free_relaxation(config, params, fmnist_mlp.input_drive(params, x))
  assert float(res) < -10, f'tiny network did not converge: log10 residual {float(res)}'
  return u


def exact_and_rbp(config, params, x, labels):
  """(u_free, exact d_beta s*, RBP's delta) of the network at its free fixed point."""
  x_drive = fmnist_mlp.input_drive(params, x)
  u_free = free_fixed_point(config, params, x)
  relax = fmnist_mlp.nudged_relaxation(config, params, x_drive, labels, u_free)
  delta = fmnist_mlp.rbp_error(config, params, x_drive, labels, u_free)
  return u_free, common.exact_dbeta(relax), delta


def dense(config, params, x, labels, u_free, i):
  """K = dG/ds, d = sigma'(u*), g = dL/ds for sample i, from dense autodiff."""
  x_drive = fmnist_mlp.input_drive(params, x)[i:i + 1]
  u_i = tuple(a[i:i + 1] for a in u_free)
  s_i = fmnist_mlp.activate(u_i)
  k = common.flat_jacobian(lambda s: fmnist_mlp.drives(params, s, x_drive), s_i)
  ones = jax.tree_util.tree_map(jnp.ones_like, u_i)
  d = dense_ref.flatten(jax.jvp(fmnist_mlp.activate, (u_i,), (ones,))[1])
  g = dense_ref.flatten((*(jnp.zeros_like(s) for s in s_i[:-1]),
                      fmnist_mlp.loss_grad_s(params, s_i[-1], labels[i:i + 1])))
  return k, d, g


def sample(tree, i):
  return np.asarray(dense_ref.flatten(tuple(a[i] for a in tree)))

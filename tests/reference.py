"""Exact references that only the tests use: dense solves on tiny networks."""
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


def flatten(tree):
  return ravel_pytree(tree)[0]


def dbeta_s_dense(k, d, g):
  """d_beta s* = (I - D K)^{-1} D g by a dense solve (K = dG/ds, d = sigma'(u*), g = dL/ds)."""
  n = k.shape[0]
  return jnp.linalg.solve(jnp.eye(n) - d[:, None] * k, d * g)


def rbp_delta_dense(k, d, g):
  """delta = -J_u^{-T} dL/du = (I - D K^T)^{-1} D g by a dense solve (Eq. 4)."""
  n = k.shape[0]
  return jnp.linalg.solve(jnp.eye(n) - d[:, None] * k.T, d * g)

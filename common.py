"""The math every experiment shares: generalized holomorphic EP (Laborieux & Zenke, 2023).

Read alongside the paper (equation numbers below are the paper's). Everything here is
independent of the architecture: a network is handed in as functions of its state.

Conventions
-----------
* A *state* is a pytree of arrays whose leaves all carry a leading batch axis.
* The experiments use the discrete dynamics of App. D.2,
      u <- step(u) = G(sigma(u)) + beta * dL/ds_out,   i.e. F(u) = step(u) - u,
  where s = sigma(u) is the *activated* state and L the (summed) loss.
* The Jacobian whose symmetry matters is taken with respect to s: K = dG/ds, and
  J = dF/ds = K - I (tied weights make it symmetric, which is what makes EP exact).
* hEP estimates d_beta s* (the derivative of the activated fixed point); RBP's neuronal
  error delta (Eq. 4) lives in u-space. Both plug into the same parameter VJP,
  (dG/dtheta)^T e, to give a gradient estimate. With tied weights d_beta s* == delta exactly
  (Eq. 5); otherwise d_beta s* = (I - DK)^{-1} (I - DK^T) delta (exact form of Eq. 10),
  with D = diag(sigma'(u*)).

The dense Jacobian diagnostics at the bottom are for small networks; the exact references
the tests compare against (dense solves) live in tests/helpers.py.
"""
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

tree_map = jax.tree_util.tree_map


# ----------------------------------------------------------------------------- helpers

def tree_add(a, b):
  return tree_map(jnp.add, a, b)


def tree_sub(a, b):
  return tree_map(jnp.subtract, a, b)


def per_sample_sq_norm(tree):
  """Sum over everything but the leading (batch) axis of |x|^2, summed over leaves."""
  leaves = jax.tree_util.tree_leaves(tree)
  return sum(jnp.sum(jnp.abs(x.reshape(x.shape[0], -1)) ** 2, axis=1) for x in leaves)


def per_sample_dot(a, b):
  """<a_i, b_i> for every sample i, summed over leaves (real parts)."""
  terms = tree_map(lambda x, y: jnp.sum((x * y).reshape(x.shape[0], -1).real, axis=1), a, b)
  return sum(jax.tree_util.tree_leaves(terms))


def per_sample_cosine(a, b):
  """Cosine similarity between a_i and b_i for every sample i (over all leaves given); 0 where
  either vector is zero."""
  norms = jnp.sqrt(per_sample_sq_norm(a) * per_sample_sq_norm(b))
  return jnp.where(norms > 0, per_sample_dot(a, b) / jnp.where(norms > 0, norms, 1), 0.0)


def units_per_sample(tree):
  """n, the number of state units of one sample."""
  return sum(math.prod(x.shape[1:]) for x in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------- layered networks

class Network(NamedTuple):
  """What defines a network on the layered dynamics of App. D.2; everything else (the
  dynamics, the estimators, training, diagnostics) is shared. A script keeps its networks in
  a table NETWORKS by name, and `config.network` picks one (a sibling script adds its own).

  init_params(key, config) -> params; layer_drive(params, s, x_drive, l) -> G_l(s), the new
  u of layer l from the activated state s; update_groups(num_layers) -> the groups of layers
  the 'sequential' order computes together, in turn, from the latest values;
  weight_angles(params) -> degrees per backward weight (Fig. 3a-b), or None where no weight
  has a transposed partner; check_config(config) -> a ConfigError for fields this network
  cannot take (None: no check of its own).
  """
  init_params: Callable
  layer_drive: Callable
  update_groups: Callable
  weight_angles: Optional[Callable]
  check_config: Optional[Callable] = None


def odd_then_even(num_layers):
  """The 'sequential' order of reciprocal networks: layers 1, 3, 5, ... (0-based 0, 2, ...),
  then layers 2, 4, ..., each from the values just computed (red-black)."""
  return [list(range(0, num_layers, 2)), list(range(1, num_layers, 2))]


def layered_step(new_u, sigma, num_layers, groups=None):
  """The discrete step of App. D.2 on a state (u_1, ..., u_L): step(u, beta=None) sets every
  u_l to new_u(s, l, beta), the drive of layer l (nudged by beta) from the activated s.

  groups=None: every layer from the previous state at once (synchronous, App. D.2). A list
  of groups of layers (e.g. odd_then_even): the groups in turn, each from the values just
  computed (sequential). Each layer is updated once per step either way.
  """
  def synchronous(u, beta=None):
    s = tuple(sigma(x) for x in u)
    return tuple(new_u(s, l, beta) for l in range(num_layers))

  def sequential(u, beta=None):
    u, s = list(u), [sigma(x) for x in u]
    for group in groups:
      for l in group:
        u[l] = new_u(s, l, beta)
      for l in group:
        s[l] = sigma(u[l])
    return tuple(u)

  return synchronous if groups is None else sequential


def steps_of(num_steps, groups=None):
  """How many steps of layered_step cover `num_steps` synchronous steps (the paper's unit):
  as many without groups, ceil(num_steps / len(groups)) with them (one sequential step
  computes each of the len(groups) groups once, after the one before it)."""
  return num_steps if groups is None else -(-num_steps // len(groups))


# ------------------------------------------------------------------ fixed-point iteration

def fixed_point(step, u0, num_steps, tol=0.0):
  """Relax the discrete dynamics u <- u + F(u) = step(u) (Eq. 1; Eq. 2 at convergence).

  Runs `num_steps` steps with `lax.fori_loop` (compile time does not grow with the number
  of steps). With `tol > 0` it stops early, through `lax.while_loop`, once every sample's
  ||F(u)|| is below `tol`; the default `tol=0` always runs exactly `num_steps` steps and is
  reverse-mode differentiable (BPTT). Early stopping changes a result only by what the
  remaining steps would have moved it: every sample ends with ||F|| < tol (or at num_steps).

  Returns `(u, log10_residual, steps)`. The residual is the largest per-sample norm of the
  last update, ||F(u_{T-1})|| = ||u_T - u_{T-1}|| (all leaves together). A run that has
  reached its fixed point has a residual at the level of floating-point noise; NaN or a
  large value means the dynamics did not converge. `steps` (int32, per sample) counts the
  steps up to and including the first whose update was below `tol` (all `num_steps` when
  tol = 0 or when it was never reached); the batch ran max(steps).
  """
  if num_steps < 1:
    raise ValueError(f'fixed_point needs num_steps >= 1, got {num_steps}')
  batch = jax.tree_util.tree_leaves(u0)[0].shape[0]

  def residuals(new, old):
    return jnp.sqrt(per_sample_sq_norm(tree_sub(new, old))).astype(jnp.float32)

  if tol > 0:
    def cond(carry):
      i, _, res, _ = carry
      return (i < num_steps) & jnp.any(res > tol)

    def body(carry):
      i, u, res, steps = carry
      new = step(u)
      return i + 1, new, residuals(new, u), steps + (res > tol)

    big = jnp.full((batch,), jnp.inf, jnp.float32)
    _, u, res, steps = jax.lax.while_loop(cond, body, (0, u0, big, jnp.zeros(batch, jnp.int32)))
  else:
    u = jax.lax.fori_loop(0, num_steps - 1, lambda _, u: step(u), u0)
    new = step(u)
    u, res, steps = new, residuals(new, u), jnp.full((batch,), num_steps, jnp.int32)
  return u, jnp.log10(jnp.max(res) + 1e-30), steps


# ------------------------------------------------------------- estimators of d_beta s*

def cauchy_points(beta_abs, n_points):
  """The teaching amplitudes that are actually relaxed, and the weight of each (App. D.1).

  The N points are beta_k = |beta| e^{2 i pi k / N}. For real parameters the fixed point
  obeys s*(conj beta) = conj s*(beta), so only k = 0..floor(N/2) are relaxed and the
  conjugate partners are counted twice. N = 1 and N = 2 need real betas only (+|beta|, and
  -|beta| for N = 2) and stay in real arithmetic; N >= 3 is complex.

  Returns (betas, phases, weights): the k-th term of Eq. 22 is
  weights[k] * Re[(s*(betas[k]) - s*_0) * conj(phases[k])] / (N |beta|).
  """
  if n_points < 1:
    raise ValueError(f'the Cauchy estimate needs N >= 1 points, got {n_points}')
  k = np.arange(n_points // 2 + 1)
  phases = np.exp(2j * np.pi * k / n_points)
  # Conjugate partners (k and N - k) count twice; k = 0 and k = N/2 are their own partner.
  weights = np.where((k == 0) | (2 * k == n_points), 1.0, 2.0)
  betas = beta_abs * (phases.real if n_points <= 2 else phases)
  return betas, phases, weights


def cauchy_estimate(relax, s0, beta_abs, n_points):
  """Cauchy-integral estimate of d_beta s* with N points (Eq. 7, App. D.1 Eq. 22).

      d_beta s* ~= 1/(N |beta|) sum_k (s*(beta_k) - s*_0) e^{-2 i pi k / N}

  `relax(beta)` returns the activated nudged fixed point s*(beta) (a pytree), relaxed from
  the free fixed point; `s0` is the free one, s*(0). Subtracting s*_0 changes nothing for
  N >= 2 (the phases sum to zero) and makes N = 1 the classic one-sided EP estimate
  (s*_beta - s*_0) / beta. The bias is O(|beta|^N / (N+1)!) (App. D.1). All relaxations run
  together, vectorised over beta.
  """
  betas, phases, weights = cauchy_points(beta_abs, n_points)
  nudged = jax.vmap(relax)(jnp.asarray(betas))  # float32 / complex64 unless x64 is on
  coef = weights * np.conj(phases) / (n_points * beta_abs)
  coef = jnp.asarray(coef.real if n_points <= 2 else coef)

  def combine(s_k, s_0):
    terms = (s_k - s_0[None]) * coef.reshape((-1,) + (1,) * s_0.ndim)
    return jnp.sum(terms.real, axis=0).astype(s_0.dtype)

  return tree_map(combine, nudged, s0)


def exact_dbeta(relax):
  """The true d_beta s* at beta = 0 by forward-mode autodiff through the nudged relaxation.

  This is Table 1's "True d_beta u*": `relax` runs T_nudge steps from the free fixed point,
  so the derivative is exact up to the convergence of those steps.
  """
  zero, one = jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32)
  return jax.jvp(relax, (zero,), (one,))[1]


def continuous_time_estimate(step, u0, activate, beta_abs, n_points, steps_per_point,
                             periods, record=None):
  """Continuous-time hEP: no free phase, a rotating teaching signal (Eqs. 8-9, App. C.1, D.3).

  beta(t) steps through the N points |beta| e^{2 i pi k / N}, holding each for
  `steps_per_point` steps of `u <- step(u, beta)`, for `periods` full periods, starting
  from `u0` (the dynamics are never let to settle without a nudge). Running averages over
  the whole run (from t = 0, as in Eq. 8) give

      s_bar  = mean_t s(t)                                 -> s*_0      (Eq. 9)
      e_bar  = mean_t s(t) e^{-2 i pi k(t) / N} / |beta|    -> d_beta s* (Eq. 8)

  The transient from `u0` contributes O(1/periods) to both, and the lag of the state after
  each switch of beta biases e_bar by O(relaxation time / steps_per_point); with an
  equilibrated system the per-period average equals the N-point Cauchy estimate. Paper
  setting: N = 4, 60 steps per point, 5 periods. For drives G that are affine in s (the
  MLPs), averaging dF/dtheta over time (Eq. 9) is the same as evaluating it at s_bar,
  which is what callers do.

  Returns (s_bar, e_bar), both real. With `record(beta, s, s_bar, e_bar) -> pytree`, called
  after every step with the running averages so far, returns (s_bar, e_bar, history): the
  records stacked over time (for plotting the convergence, Fig. 2e-f).
  """
  if n_points < 2:
    raise ValueError(f'the continuous-time estimate needs N >= 2 points, got {n_points}')
  phases = np.exp(2j * np.pi * np.arange(n_points) / n_points)
  if n_points == 2:
    phases = phases.real
  betas, conj_phases = jnp.asarray(beta_abs * phases), jnp.asarray(np.conj(phases))
  total = n_points * steps_per_point * periods

  def averages(s_sum, e_sum, count):
    return (tree_map(lambda x: (x / count).real, s_sum),
            tree_map(lambda x: (x / (count * beta_abs)).real, e_sum))

  def body(carry, t):
    u, s_sum, e_sum = carry
    k = (t // steps_per_point) % n_points
    u = step(u, betas[k])
    s = activate(u)
    s_sum = tree_add(s_sum, s)
    e_sum = tree_map(lambda a, x: a + x * conj_phases[k], e_sum, s)
    out = None if record is None else record(betas[k], s, *averages(s_sum, e_sum, t + 1))
    return (u, s_sum, e_sum), out

  u0 = tree_map(lambda x: x.astype(betas.dtype), u0)
  zeros = tree_map(jnp.zeros_like, activate(u0))
  (_, s_sum, e_sum), history = jax.lax.scan(body, (u0, zeros, zeros), jnp.arange(total))
  s_bar, e_bar = averages(s_sum, e_sum, total)
  return (s_bar, e_bar) if record is None else (s_bar, e_bar, history)


def hold_end_estimate(step, u0, activate, beta_abs, n_points, steps_per_point, periods,
                      record=None):
  """Continuous-time hEP as the authors ran it (Table 1, "cont." row): samples at hold ends.

  Like `continuous_time_estimate`, there is no free phase: starting from `u0` (zeros in the
  experiments), beta(t) holds beta_k = |beta| e^{2 i pi k / N} for `steps_per_point` steps of
  `u <- step(u, beta)`, for k = 0, 1, 2, ... through `periods` full periods
  (q = periods * N holds). Unlike it, only the state at the END of each hold enters the
  averages, so the transient from `u0` and the lag after each switch of beta never do
  (except through whatever is left of them at the hold's end):

      u_bar = (1/q) sum_holds Re u_end                                      (pre-activation)
      e_bar = (1/q) sum_holds Re[sigma(u_end) e^{-2 i pi k / N}] / |beta|

  With equilibrated holds every period contributes the same N fixed points, so
  e_bar = 1/(N |beta|) sum_k s*(beta_k) e^{-2 i pi k / N}, which is exactly the N-point
  Cauchy estimate of Eq. 22 (`cauchy_estimate`, whose subtraction of s*_0 is a no-op for
  N >= 2): d_beta s* + O(|beta|^N). And u_bar is the discrete mean-value average of the
  holomorphic u*(beta) over the N points (Eq. 9 / Eq. 20 with N points),
  u*_0 + O(|beta|^N): a stand-in for the free fixed point without a free phase.

  The parameter gradient is then the VJP of the drive at sigma(u_bar) applied to e_bar
  (plus the readout gradient at sigma(u_bar)); that is the caller's job.

  N = 2 uses the real betas +|beta|, -|beta| and stays in real arithmetic; N >= 3 runs the
  state in complex arithmetic (the complex type matching u0's precision). Paper setting:
  N = 4, 60 steps per point, 5 periods (1200 steps).

  Returns (u_bar, e_bar), both real with u0's dtypes (e_bar has the structure of
  `activate(u0)`). With `record(beta, u_end, u_bar, e_bar) -> pytree`, called at the end of
  every hold with the running averages so far, returns (u_bar, e_bar, history) with the
  records stacked over the q holds.
  """
  if n_points < 2:
    raise ValueError(f'the hold-end estimate needs N >= 2 points, got {n_points}')
  if steps_per_point < 1 or periods < 1:
    raise ValueError(f'need steps_per_point >= 1 and periods >= 1, got {steps_per_point}, '
                     f'{periods}')
  real_dtype = jnp.result_type(*jax.tree_util.tree_leaves(u0))
  phases = np.exp(2j * np.pi * np.arange(n_points) / n_points)
  if n_points == 2:
    dtype = real_dtype
    phases = phases.real
  else:
    dtype = jnp.result_type(real_dtype, jnp.complex64)
  betas = jnp.asarray(beta_abs * phases, dtype)
  conj_phases = jnp.asarray(np.conj(phases), dtype)
  num_holds = n_points * periods

  def averages(u_sum, e_sum, count):
    return (tree_map(lambda x: (x.real / count).astype(real_dtype), u_sum),
            tree_map(lambda x: (x.real / (count * beta_abs)).astype(real_dtype), e_sum))

  def hold(carry, q):
    u, u_sum, e_sum = carry
    k = q % n_points
    beta = betas[k]
    u = jax.lax.fori_loop(0, steps_per_point, lambda _, v: step(v, beta), u)
    u_sum = tree_add(u_sum, u)
    e_sum = tree_map(lambda a, s: a + s * conj_phases[k], e_sum, activate(u))
    out = None if record is None else record(beta, u, *averages(u_sum, e_sum, q + 1))
    return (u, u_sum, e_sum), out

  u0 = tree_map(lambda x: x.astype(dtype), u0)
  u_zeros = tree_map(jnp.zeros_like, u0)
  s_zeros = tree_map(jnp.zeros_like, activate(u0))
  (_, u_sum, e_sum), history = jax.lax.scan(hold, (u0, u_zeros, s_zeros),
                                            jnp.arange(num_holds))
  u_bar, e_bar = averages(u_sum, e_sum, num_holds)
  return (u_bar, e_bar) if record is None else (u_bar, e_bar, history)


def rbp_delta(step, u_star, dl_du, num_steps):
  """RBP's neuronal error delta = -J_F^{-T} dL/du (Eq. 4) by the linear adjoint dynamics.

  Iterates delta <- delta + (J_F^T delta + dL/du) = (dstep/du)^T delta + dL/du from zero
  for `num_steps` steps, with J_F^T through a VJP of the free step at the fixed point
  `u_star` (step(u) = u + F(u)). The fixed point is (I - D K^T)^{-1} D g.
  """
  _, vjp = jax.vjp(step, u_star)
  zeros = tree_map(jnp.zeros_like, dl_du)
  return jax.lax.fori_loop(0, num_steps, lambda _, d: tree_add(vjp(d)[0], dl_du), zeros)


def drop_non_finite_samples(error):
  """Zero the error vector of every sample with a non-finite entry; returns (error, count).

  With N >= 3 points at a large |beta| a sample's complex relaxation can leave the region
  where s*(beta) is holomorphic and return NaN or inf. Such a sample contributes nothing to
  the batch's gradient (as in the authors' code); the count is reported, never hidden.
  """
  leaves = jax.tree_util.tree_leaves(error)
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
                              for x in leaves]), axis=0)
  error = tree_map(lambda x: jnp.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0),
                   error)
  return error, jnp.sum(~finite)


# ---------------------------------------------------------------------- homeostatic loss

def homeostatic_loss(drive, s, x, noise):
  """Jacobian homeostasis (Eq. 12, App. A.2), the Hutchinson estimate of the asymmetry.

      L_homeo = mean_{samples, draws} (||J e||^2 - e^T J^2 e) / n,   e ~ N(0, I),

  with J = dF/ds = dG/ds - I at the state `s` (the free fixed point; pass it through
  `stop_gradient` so the gradient flows to the parameters only), `drive(s, x)` = G(s) for the
  per-sample inputs `x` (a pytree with a leading batch axis, e.g. the input drive; the
  parameters are closed over) and n the number of state units per sample. Since
  e^T J^2 e = (J^T e) . (J e), one JVP (J e) and one VJP (J^T e) per draw suffice; the full
  Jacobian is never formed. Its expected value is (||J||_F^2 - tr(J^2)) / n
  = 2 ||A||_F^2 / n, A = (J - J^T)/2 (the identity in J cancels). This per-unit, sample- and
  draw-averaged normalisation is the one the paper's lambda values (0.1, 1, 10, 15) were
  tuned with.

  `noise` has the structure of `s` with an extra leading axis of draws (5 in the paper). The
  draws run as extra samples: s and x are repeated once per draw, so that J e and J^T e are
  one batched product each (one large batch, rather than a vmap over the draws).
  """
  draws = jax.tree_util.tree_leaves(noise)[0].shape[0]
  repeat = lambda tree: jax.tree_util.tree_map(  # (draws * batch, ...), draw-major as e
      lambda a: jnp.broadcast_to(a, (draws, *a.shape)).reshape(-1, *a.shape[1:]), tree)
  s_rep, x_rep = repeat(s), repeat(x)
  e = jax.tree_util.tree_map(lambda n: n.reshape(-1, *n.shape[2:]), noise)
  field = lambda z: tree_sub(drive(z, x_rep), z)
  je = jax.jvp(field, (s_rep,), (e,))[1]
  jte = jax.vjp(field, s_rep)[1](e)[0]
  return jnp.mean(per_sample_dot(je, tree_sub(je, jte))) / units_per_sample(s)


# ------------------------------------------- dense Jacobian diagnostics (small networks)
# Used by the training scripts' per-epoch diagnostics on a few samples; the exact references
# that only tests need (dense solves) live in tests/helpers.py.

def flat_jacobian(fn, x):
  """Dense Jacobian of a pytree -> pytree map for ONE sample (leading batch axis of size 1)."""
  flat_x, unravel = ravel_pytree(x)
  return jax.jacfwd(lambda v: ravel_pytree(fn(unravel(v)))[0])(flat_x)


def symmetry_measure(jac):
  """||S|| / (||S|| + ||A||) with S, A the symmetric and skew-symmetric parts (Section 3.3)."""
  s, a = jnp.linalg.norm((jac + jac.T) / 2), jnp.linalg.norm((jac - jac.T) / 2)
  return s / (s + a)


def homeostatic_loss_exact(jac):
  """The exact expected value of `homeostatic_loss` for one sample: (||J||^2 - tr J^2) / n."""
  return (jnp.sum(jac ** 2) - jnp.trace(jac @ jac)) / jac.shape[0]

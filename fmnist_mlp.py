r"""Generalized holomorphic EP on a Fashion-MNIST MLP (Laborieux & Zenke, ICLR 2024).

Paper: Table 1, Fig. 3, Fig. 4a-d. Network of App. D.2: 784 - 256 - 256 - 10 with reciprocal
connections whose forward and backward weights are independent (Fig. 1b), so the Jacobian at
the fixed point is not symmetric unless the weights are tied.

    python fmnist_mlp.py --config=configs/fmnist_mlp.py --workdir=runs/mlp
    python fmnist_mlp.py --config=configs/fmnist_mlp.py --config.algorithm=hep_exact

The script reads top to bottom: data, network, gradient estimators, train step, diagnostics,
checkpointing, main loop. The shared math (fixed point, Cauchy estimate, RBP, homeostatic
loss) lives in common.py.

Sign convention (the authors' code; see the README): the nudge ADDS beta * dL/ds_out to the
output layer's drive, where L is the softmax cross-entropy of the readout. Then
(dG/dtheta)^T d_beta s* is the gradient of L itself, descended like any other gradient.
(App. D.2 writes the nudge as +beta w_ro^T (y - softmax), the opposite sign, which would flip
the estimate.)
"""
import gzip
import hashlib
import json
import math
import os
import sys
import time
import zlib

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax

import common

ALGORITHMS = ('hep', 'hep_exact', 'hep_continuous', 'rbp', 'bptt')
NUM_CLASSES = 10
SPLIT_SIZES = {'train': 60000, 'test': 10000}
SCRIPT = os.path.basename(__file__)


class ConfigError(ValueError):
  """Bad input, reported as one line before any compute is spent."""


# ======================================================================================
# Data
# ======================================================================================

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
IDX_FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
             'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}


def read_idx(path):
  """An IDX file (the original MNIST format) as a uint8 array; a damaged file is a ConfigError."""
  try:
    with gzip.open(path, 'rb') as f:
      data = f.read()
    zeros, dtype, ndim = data[0:2], data[2], data[3]
    if zeros != b'\x00\x00' or dtype != 0x08:
      raise ValueError('not a uint8 IDX header')
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
  except (OSError, EOFError, zlib.error, ValueError, IndexError) as e:
    raise ConfigError(f'{path} is damaged or not a gzipped uint8 IDX file '
                      f'({type(e).__name__}: {e})') from e


def load_idx(folder):
  missing = [f for pair in IDX_FILES.values() for f in pair
             if not os.path.exists(os.path.join(folder, f))]
  if missing:
    raise ConfigError(f'Fashion-MNIST IDX files missing in {folder}: {", ".join(missing)}')
  out = {}
  for split, (images, labels) in IDX_FILES.items():
    x = read_idx(os.path.join(folder, images))
    out[split] = (x.reshape(len(x), -1), read_idx(os.path.join(folder, labels)).astype(np.int32))
  return out


def load_tfds(data_dir):
  """Fashion-MNIST from a TFDS data_dir prepared in a random-access format (array_record).

  No download is attempted (download=False): without the prepared files this fails at once
  with one line instead of retrying downloads for minutes on a machine without internet.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  out = {}
  for split in ('train', 'test'):
    try:
      source = tfds.data_source('fashion_mnist', split=split, data_dir=data_dir or None,
                                download=False)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(
          'TFDS fashion_mnist is not prepared (as array_record) in '
          f'{data_dir or "the default TFDS data_dir"}: install the Debian package '
          'dataset-fashion-mnist or point --config.data_dir at the four IDX .gz files '
          f'[{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}]') from e
    examples = [source[i] for i in range(len(source))]
    x = np.stack([np.asarray(e['image'], np.uint8).reshape(-1) for e in examples])
    out[split] = (x, np.asarray([e['label'] for e in examples], np.int32))
  return out


def load_data(config):
  """{'train': (x, y), 'test': (x, y)} with x uint8 (n, 784) and integer labels."""
  folder = config.data_dir or DEBIAN_DIR
  if config.data_source == 'idx' or (config.data_source == 'auto' and
                                     (config.data_dir or os.path.isdir(DEBIAN_DIR))):
    data = load_idx(folder)
  else:
    data = load_tfds(config.tfds_data_dir)
  for split, size in (('train', config.train_size), ('test', config.test_size)):
    if size:
      data[split] = tuple(a[:size] for a in data[split])
  return data


# ======================================================================================
# Network (App. D.2)
# ======================================================================================
# State: a tuple (u_1, ..., u_L) of (batch, n_l) arrays; u_L is the 10-unit output layer.
# Parameters: {'forward': [{'w', 'b'}] * L, 'backward': [{'w'}] * (L - 1), 'readout': {'w', 'b'}}
# forward[l]['w'] maps layer l-1 (the image for l = 0) to layer l; backward[l]['w'] maps
# layer l+1 back to layer l and has no bias. The readout is not part of the dynamics.

def sigma(u):
  """The shifted sigmoid 1 / (1 + e^{-4u + 2}); holomorphic, so it also takes complex u."""
  return jax.nn.sigmoid(4.0 * u - 2.0)


def activate(u):
  return tuple(sigma(x) for x in u)


def dot(s, w):
  """s @ w for a real or complex state and real weights (complex: two real matmuls)."""
  if jnp.iscomplexobj(s):
    return jax.lax.complex(s.real @ w, s.imag @ w)
  return s @ w


def init_params(key, config):
  """LeCun-normal weights, zero biases; backward weights rotated to angle alpha (Fig. 3)."""
  sizes = (784, *config.hidden_sizes, NUM_CLASSES)
  init = jax.nn.initializers.lecun_normal()  # truncated normal, variance 1 / fan_in
  keys = iter(jax.random.split(key, 2 * len(sizes)))
  forward = [{'w': init(next(keys), (n_in, n_out)), 'b': jnp.zeros(n_out)}
             for n_in, n_out in zip(sizes[:-1], sizes[1:])]
  alpha = np.deg2rad(config.alpha)
  backward = [{'w': np.sin(alpha) * init(next(keys), (n_out, n_in))
                    + np.cos(alpha) * forward[l + 1]['w'].T}
              for l, (n_in, n_out) in enumerate(zip(sizes[1:-1], sizes[2:]))]
  readout = {'w': init(next(keys), (NUM_CLASSES, NUM_CLASSES)), 'b': jnp.zeros(NUM_CLASSES)}
  return {'forward': forward, 'backward': backward, 'readout': readout}


def input_drive(params, x):
  """w_in x + b_1: constant during a relaxation, so it is computed once per batch."""
  return x @ params['forward'][0]['w'] + params['forward'][0]['b']


def layer_drive(params, s, x_drive, l):
  """G_l(s): the new u of layer l from its neighbours l-1 and l+1 (App. D.2), no nudge."""
  fw, bw = params['forward'], params['backward']
  g = x_drive if l == 0 else dot(s[l - 1], fw[l]['w']) + fw[l]['b']
  if l + 1 < len(s):
    g = g + dot(s[l + 1], bw[l]['w'])
  return g


def drives(params, s, x_drive):
  """G(s) for all layers: u <- G(sigma(u)) is the free synchronous step of App. D.2."""
  return tuple(layer_drive(params, s, x_drive, l) for l in range(len(s)))


def readout_logits(params, s_out):
  return dot(s_out, params['readout']['w']) + params['readout']['b']


def readout_loss(params, s_out, labels):
  """Mean softmax cross-entropy of the readout, and the accuracy."""
  logits = readout_logits(params, s_out)
  loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, NUM_CLASSES)).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def loss_grad_s(params, s_out, labels):
  """g = dL/ds_out per sample, L the softmax cross-entropy (holomorphic in s_out)."""
  probs = jax.nn.softmax(readout_logits(params, s_out))
  return dot(probs - jax.nn.one_hot(labels, NUM_CLASSES), params['readout']['w'].T)


def make_step(config, params, x_drive, labels=None):
  """step(u, beta) -> next state of u <- G(sigma(u)) + beta dL/ds_out (beta = 0: free).

  Definition 1 holds with dF/dbeta = dL/ds. config.layer_updates picks the update order:

  * 'synchronous': every layer at once from the previous state, exactly App. D.2.
  * 'sequential' (default): layers 1, 3, 5, ... then layers 2, 4, ... from the fresh values.
    Layers only talk to their neighbours, so the synchronous dynamics split into two
    independent interleaved chains (odd layers at even times with even layers at odd times,
    and the reverse). One sequential step advances one chain by two synchronous steps at
    the cost of one: from the same start, it reproduces that chain of the synchronous
    trajectory exactly, and it has the same fixed points. With beta != 0 the nudge couples
    the output layer to its own previous value, which here is taken from its own chain.

  T_free and T_nudge count synchronous steps (the paper's unit); callers run
  steps_for(config, T) steps of the configured order for them.
  """
  num_layers = len(config.hidden_sizes) + 1

  def new_u(s, l, beta):
    g = layer_drive(params, s, x_drive, l)
    if l == num_layers - 1 and beta is not None:
      g = g + beta * loss_grad_s(params, s[-1], labels)
    return g

  def synchronous(u, beta=None):
    s = activate(u)
    return tuple(new_u(s, l, beta) for l in range(num_layers))

  def sequential(u, beta=None):
    u, s = list(u), list(activate(u))
    for first in (0, 1):
      for l in range(first, num_layers, 2):
        u[l] = new_u(s, l, beta)
      for l in range(first, num_layers, 2):
        s[l] = sigma(u[l])
    return tuple(u)

  return synchronous if config.layer_updates == 'synchronous' else sequential


def steps_for(config, num_synchronous_steps):
  """Steps of make_step's update that cover `num_synchronous_steps` synchronous steps."""
  if config.layer_updates == 'synchronous':
    return num_synchronous_steps
  return (num_synchronous_steps + 1) // 2


def zeros_state(config, batch):
  return tuple(jnp.zeros((batch, n)) for n in (*config.hidden_sizes, NUM_CLASSES))


# ======================================================================================
# Neuronal error vectors and gradients (Eqs. 4-9)
# ======================================================================================

def free_relaxation(config, params, x_drive):
  """The free phase: T_free steps from zeros. Returns (u_free, log10 of the last update)."""
  step = make_step(config, params, x_drive)
  u0 = zeros_state(config, x_drive.shape[0])
  return common.fixed_point(step, u0, steps_for(config, config.t_free), config.tol)


def nudged_relaxation(config, params, x_drive, labels, u_free):
  """beta -> s*(beta): T_nudge steps from the free fixed point (complex beta: complex state)."""
  step = make_step(config, params, x_drive, labels)

  def relax(beta):
    u0 = jax.tree_util.tree_map(lambda x: x.astype(jnp.result_type(x, beta)), u_free)
    u, _ = common.fixed_point(lambda u: step(u, beta), u0, steps_for(config, config.t_nudge))
    return activate(u)
  return relax


def continuous_estimate(config, params, x_drive, labels):
  """(s_bar, e_bar) of continuous-time hEP (Eqs. 8-9): no free phase, starts from zeros.

  config.continuous_average picks the discretisation: 'hold_end' (the authors' Table 1
  runs: the state at the end of each hold of beta, averaged in u, s_bar = sigma(u_bar)) or
  'every_step' (Eq. 8 literally: every step's s averaged from t = 0).
  """
  step = make_step(config, params, x_drive, labels)
  u0 = zeros_state(config, x_drive.shape[0])
  args = (activate, config.beta, config.n_points,
          steps_for(config, config.continuous_steps_per_point), config.continuous_periods)
  if config.continuous_average == 'hold_end':
    u_bar, e_bar = common.hold_end_estimate(step, u0, *args)
    return activate(u_bar), e_bar
  return common.continuous_time_estimate(step, u0, *args)


def rbp_error(config, params, x_drive, labels, u_free):
  """RBP's delta (Eq. 4) from the adjoint dynamics, with dL/du = D g on the output layer.

  delta is defined through J_F of the synchronous step u <- G(sigma(u)), so that is the
  step whose VJP is iterated (T_nudge times, as in the authors' code).
  """
  s_free = activate(u_free)
  dl_ds = (*(jnp.zeros_like(s) for s in s_free[:-1]),
           loss_grad_s(params, s_free[-1], labels))
  dl_du = jax.vjp(activate, u_free)[1](dl_ds)[0]
  step = lambda u: drives(params, activate(u), x_drive)
  return common.rbp_delta(step, u_free, dl_du, config.t_nudge)


def network_grads(params, x, s_free, error):
  """(dG/dtheta)^T e at the free fixed point, averaged over the batch (Eqs. 4 and 6).

  Returns (grads, number of samples dropped): a sample whose error vector is not finite
  contributes nothing (common.drop_non_finite_samples).
  """
  error, dropped = common.drop_non_finite_samples(error)
  _, vjp = jax.vjp(lambda p: drives(p, s_free, input_drive(p, x)), params)
  return jax.tree_util.tree_map(lambda g: g / x.shape[0], vjp(error)[0]), dropped


def bptt_grads(config, params, x, labels, u_free):
  """The authors' "RBP/BP" baseline: autodiff through T_nudge steps from the free fixed point."""
  u_start = jax.lax.stop_gradient(u_free)

  def loss(p):
    p = {**p, 'readout': jax.lax.stop_gradient(p['readout'])}
    step = make_step(config, p, input_drive(p, x))
    u, _ = common.fixed_point(step, u_start, steps_for(config, config.t_nudge))
    return readout_loss(p, sigma(u[-1]), labels)[0]
  return jax.grad(loss)(params)


def homeostatic_noise(config, key, sample_ids):
  """e ~ N(0, I), (draws, batch, n) per layer, drawn per sample so device splits agree."""
  num_units = sum((*config.hidden_sizes, NUM_CLASSES))
  draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), (config.homeo_draws, num_units))
  noise = jnp.swapaxes(jax.vmap(draw)(sample_ids), 0, 1)
  splits = np.cumsum(config.hidden_sizes)
  return tuple(jnp.split(noise, splits, axis=-1))


def homeostatic_grads(config, params, x, s_free, noise):
  """Gradient of lambda * L_homeo (Eq. 12), J = dF/ds at the free fixed point held fixed."""
  s_fixed = jax.lax.stop_gradient(s_free)
  loss = lambda p: common.homeostatic_loss(
      lambda s: drives(p, s, input_drive(p, x)), s_fixed, noise)
  value, grads = jax.value_and_grad(loss)(params)
  return value, jax.tree_util.tree_map(lambda g: config.homeo_coef * g, grads)


def compute_grads(config, params, x, labels, key, sample_ids):
  """All gradients of one batch, read top to bottom.

  1. The network's gradient by the configured algorithm. Every algorithm but continuous-time
     hEP first relaxes freely to s*_0; the hEP variants and RBP then plug their neuronal
     error vector e into the same parameter VJP, (dG/dtheta)^T e; BPTT differentiates the
     unrolled dynamics instead.
  2. The readout's own gradient at the free state (it is not part of the dynamics).
  3. The homeostatic gradient (Eq. 12), if homeo_coef > 0.
  """
  x_drive = input_drive(params, x)
  metrics = {}
  if config.algorithm == 'hep_continuous':
    # Eqs. 8-9: no free phase; the time average s_bar stands for the free fixed point.
    s_free, error = continuous_estimate(config, params, x_drive, labels)
    grads, metrics['dropped_samples'] = network_grads(params, x, s_free, error)
  else:
    u_free, metrics['log10_residual'] = free_relaxation(config, params, x_drive)
    s_free = activate(u_free)
    relax = nudged_relaxation(config, params, x_drive, labels, u_free)  # beta -> s*(beta)
    if config.algorithm == 'hep':  # Eq. 7: N-point Cauchy estimate of d_beta s*
      error = common.cauchy_estimate(relax, s_free, config.beta, config.n_points)
      grads, metrics['dropped_samples'] = network_grads(params, x, s_free, error)
    elif config.algorithm == 'hep_exact':  # Table 1's "true d_beta u*" (forward mode)
      grads, metrics['dropped_samples'] = network_grads(params, x, s_free,
                                                        common.exact_dbeta(relax))
    elif config.algorithm == 'rbp':  # Eq. 4: the adjoint fixed point delta
      error = rbp_error(config, params, x_drive, labels, u_free)
      grads, metrics['dropped_samples'] = network_grads(params, x, s_free, error)
    else:  # 'bptt': backpropagation through T_nudge steps from the free fixed point
      grads = bptt_grads(config, params, x, labels, u_free)

  (loss, accuracy), readout_grads = jax.value_and_grad(
      lambda p: readout_loss(p, s_free[-1], labels), has_aux=True)(params)
  grads = jax.tree_util.tree_map(jnp.add, grads, readout_grads)
  metrics.update(loss=loss, accuracy=accuracy)
  if config.homeo_coef > 0:
    noise = homeostatic_noise(config, key, sample_ids)
    metrics['homeo_loss'], homeo = homeostatic_grads(config, params, x, s_free, noise)
    grads = jax.tree_util.tree_map(jnp.add, grads, homeo)
  return grads, metrics


# ======================================================================================
# Training and evaluation steps (jax.pmap over local devices)
# ======================================================================================

def make_optimizer(config):
  if config.optimizer == 'sgd':
    return optax.sgd(config.learning_rate, momentum=config.momentum or None)
  return optax.adam(config.learning_rate)


def make_train_step(config, optimizer):
  """One update. Each device takes its slice of the batch; gradients are averaged (pmean)."""
  base_key = jax.random.PRNGKey(config.seed + 1)

  def train_step(params, opt_state, step, images, labels):
    local = images.shape[0]
    sample_ids = step * config.batch_size + jax.lax.axis_index('batch') * local + jnp.arange(local)
    x = images.astype(jnp.float32) / 255.0
    grads, metrics = compute_grads(config, params, x, labels,
                                   jax.random.fold_in(base_key, step), sample_ids)
    # The only collective of the step (one all-reduce); metrics stay per device.
    grads = jax.lax.pmean(grads, 'batch')
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, metrics

  return jax.pmap(train_step, axis_name='batch', in_axes=(0, 0, None, 0, 0),
                  donate_argnums=(0, 1))


def make_eval_step(config):
  """Number of misclassified test images (free phase + readout), summed over devices."""
  def eval_step(params, images, labels, mask):
    x = images.astype(jnp.float32) / 255.0
    u, _ = free_relaxation(config, params, input_drive(params, x))
    wrong = jnp.argmax(readout_logits(params, sigma(u[-1])), -1) != labels
    return jax.lax.psum(jnp.sum(wrong * mask), 'batch')
  return jax.pmap(eval_step, axis_name='batch')


def evaluate(eval_step, params, data, config, num_devices):
  """Test error in % over the whole split (the last batch is padded and masked)."""
  x, y = data
  per_call = config.eval_batch_size
  wrong = 0
  for start in range(0, len(x), per_call):
    xb, yb = x[start:start + per_call], y[start:start + per_call]
    pad = per_call - len(xb)
    mask = np.concatenate([np.ones(len(xb), np.float32), np.zeros(pad, np.float32)])
    xb, yb = np.pad(xb, ((0, pad), (0, 0))), np.pad(yb, (0, pad))
    shard = lambda a: a.reshape(num_devices, -1, *a.shape[1:])
    wrong += float(eval_step(params, shard(xb), shard(yb), shard(mask))[0])
  return 100.0 * wrong / len(x)


# ======================================================================================
# Diagnostics (one fixed batch per epoch, off the hot path)
# ======================================================================================

def weight_angles(params):
  """Angle in degrees between each backward matrix and the transposed forward one (Fig. 3a-b)."""
  angles = []
  for l, bw in enumerate(params['backward']):
    a, b = bw['w'], params['forward'][l + 1]['w'].T
    cos = jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
    angles.append(jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0))))
  return angles


def make_diagnostics(config):
  """Symmetry, alignment and convergence of the network on one batch (Figs. 3-4)."""

  @jax.jit
  def diagnostics(params, images, labels):
    x = images.astype(jnp.float32) / 255.0
    x_drive = input_drive(params, x)
    u_free, log10_residual = free_relaxation(config, params, x_drive)
    s_free = activate(u_free)
    relax = nudged_relaxation(config, params, x_drive, labels, u_free)
    delta = rbp_error(config, params, x_drive, labels, u_free)
    cos = lambda e: [jnp.mean(common.per_sample_cosine(a, b)) for a, b in zip(e, delta)]
    out = {'log10_residual': log10_residual, 'cosine_exact': cos(common.exact_dbeta(relax))}
    if config.algorithm == 'hep':
      out['cosine_estimate'] = cos(common.cauchy_estimate(relax, s_free, config.beta,
                                                          config.n_points))
    elif config.algorithm == 'hep_continuous':
      out['cosine_estimate'] = cos(continuous_estimate(config, params, x_drive, labels)[1])

    # Dense J = dF/ds = K - I on a few samples: the symmetry measure and the exact value
    # of the homeostatic loss, next to its Hutchinson estimate on the whole batch.
    def one_sample(s, xd):
      one = lambda t: tuple(a[None] for a in t)
      field = lambda z: common.tree_sub(drives(params, z, xd[None]), z)
      jac = common.flat_jacobian(field, one(s))
      return common.symmetry_measure(jac), common.homeostatic_loss_exact(jac)
    m = config.diag_jacobian_samples
    sym, homeo_exact = jax.vmap(one_sample)(tuple(s[:m] for s in s_free), x_drive[:m])
    noise = homeostatic_noise(config, jax.random.PRNGKey(0), jnp.arange(x.shape[0]))
    out.update(
        symmetry=jnp.mean(sym), homeo_loss_exact=jnp.mean(homeo_exact),
        homeo_loss=common.homeostatic_loss(lambda s: drives(params, s, x_drive), s_free, noise),
        weight_angle=weight_angles(params),
        loss=readout_loss(params, s_free[-1], labels)[0])
    return out

  return diagnostics


# ======================================================================================
# Config checks, workdir, checkpoint, metrics
# ======================================================================================

def check_number(config, name, kind, low=None, high=None, above=None):
  """One numeric config field: an int (kind=int) or a number, finite, >= low, <= high, > above."""
  value = config[name]
  is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not is_number or (kind is int and not isinstance(value, int)):
    raise ConfigError(f'{name} must be {"an integer" if kind is int else "a number"}, '
                      f'got {value!r}')
  if not math.isfinite(value):
    raise ConfigError(f'{name} must be finite, got {value}')
  bounds = [f'>= {low}' if low is not None and value < low else None,
            f'<= {high}' if high is not None and value > high else None,
            f'> {above}' if above is not None and value <= above else None]
  broken = [b for b in bounds if b]
  if broken:
    raise ConfigError(f'{name} must be {broken[0]}, got {value}')


def check_choice(config, name, choices):
  if config[name] not in choices:
    raise ConfigError(f'unknown {name} {config[name]!r} (use one of {", ".join(choices)})')


def resolve_config(config, num_local_devices):
  """Checks every field (one-line ConfigError on bad input); returns the number of devices.

  Runs before any data is read or anything is compiled. The one rewrite: hep with N = 0 is
  the exact derivative (the authors' convention), recorded as algorithm 'hep_exact'.
  """
  c = config
  check_choice(c, 'dataset', ('fashion_mnist',))
  check_choice(c, 'data_source', ('auto', 'idx', 'tfds'))
  check_choice(c, 'layer_updates', ('sequential', 'synchronous'))
  check_choice(c, 'algorithm', ALGORITHMS)
  check_choice(c, 'optimizer', ('sgd', 'adam'))
  check_choice(c, 'continuous_average', ('hold_end', 'every_step'))
  sizes = c.hidden_sizes
  if not isinstance(sizes, (tuple, list)) or not sizes or not all(
      isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes):
    raise ConfigError(f'hidden_sizes must be a tuple of positive integers, got {sizes!r}')
  check_number(c, 'seed', int, 0, 2**31 - 1)
  check_number(c, 'train_size', int, 0, SPLIT_SIZES['train'])
  check_number(c, 'test_size', int, 0, SPLIT_SIZES['test'])
  check_number(c, 'alpha', float, 0, 180)
  for name in ('t_free', 't_nudge', 'continuous_steps_per_point', 'continuous_periods',
               'homeo_draws', 'batch_size', 'eval_batch_size', 'num_epochs', 'diag_batch_size'):
    check_number(c, name, int, 1)
  check_number(c, 'diag_jacobian_samples', int, 1, c.diag_batch_size)
  check_number(c, 'tol', float, 0)
  check_number(c, 'n_points', int, 0, 64)
  check_number(c, 'beta', float, above=0)
  check_number(c, 'homeo_coef', float, 0)
  check_number(c, 'learning_rate', float, above=0)
  check_number(c, 'momentum', float, 0, 0.999)
  check_number(c, 'num_devices', int, 0)
  check_number(c, 'log_every_steps', int, 0)
  check_number(c, 'max_log10_residual', float)
  check_number(c, 'max_train_loss', float, above=0)
  if c.algorithm == 'hep' and c.n_points == 0:
    c.algorithm = 'hep_exact'  # the authors' convention: N = 0 is the exact derivative
  if c.algorithm == 'hep_continuous' and c.n_points < 2:
    raise ConfigError(f'hep_continuous needs n_points >= 2, got {c.n_points}')
  num_devices = c.num_devices or num_local_devices
  if num_devices > num_local_devices:
    raise ConfigError(f'num_devices={num_devices} but only {num_local_devices} local devices')
  for name in ('batch_size', 'eval_batch_size'):
    if c[name] % num_devices:
      raise ConfigError(f'{name}={c[name]} is not divisible by the {num_devices} devices')
  return num_devices


# Fields that may differ when a run is resumed: where the data are, how many devices share
# the batch, how often to log, and how long to train. Any other change is a different run.
RESUMABLE_FIELDS = ('num_epochs', 'num_devices', 'log_every_steps', 'data_dir', 'tfds_data_dir')
CHECKPOINT = 'checkpoint.npz'


def run_config(config):
  """The config as plain JSON data, without the fields a resumed run may change."""
  resolved = json.loads(config.to_json())
  return {k: v for k, v in resolved.items() if k not in RESUMABLE_FIELDS}


def default_workdir(config):
  """runs/<script>/<algorithm and its main settings>-<hash of the whole run config>."""
  c = config
  name = {'hep': f'hep{c.n_points}_beta{c.beta:g}', 'hep_continuous':
          f'hepcont{c.n_points}_beta{c.beta:g}'}.get(c.algorithm, c.algorithm)
  digest = hashlib.sha1(json.dumps(run_config(c), sort_keys=True).encode()).hexdigest()[:8]
  return os.path.join('runs', SCRIPT[:-3], f'{name}_homeo{c.homeo_coef:g}_seed{c.seed}-{digest}')


def write_atomic(path, write):
  """write(file) into path.tmp, flushed to disk, then renamed over path: a kill or a full disk
  leaves the previous file intact (and no .tmp behind)."""
  tmp = path + '.tmp'
  try:
    with open(tmp, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path, data):
  write_atomic(path, lambda f: f.write((json.dumps(data, indent=2) + '\n').encode()))


def differing_fields(saved, current):
  return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def prepare_workdir(workdir, config):
  """Creates the workdir, or checks that it holds this run; returns its checkpoint (or None).

  Everything that could refuse the workdir is checked here, before any compute: it must be
  a writable folder; its config.json and its checkpoint (which carries its own config) must
  match this run; its metrics file must be readable. Then config.json is (re)written.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir} is a file, not a folder')
  os.makedirs(workdir, exist_ok=True)
  current = run_config(config)
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    try:
      with open(path) as f:
        saved = json.load(f)
      assert isinstance(saved, dict)
    except (ValueError, AssertionError) as e:
      raise ConfigError(f'{path} is empty or not a JSON config; restore it, or delete it to '
                        'resume from the checkpoint (which carries its own config)') from e
    changed = differing_fields({k: v for k, v in saved.items() if k not in RESUMABLE_FIELDS},
                               current)
    if changed:
      raise ConfigError(f'{workdir} holds a run with a different config ({", ".join(changed)}); '
                        'use another --workdir')
  if os.path.exists(os.path.join(workdir, 'checkpoint.pkl')):
    raise ConfigError(f'{workdir} holds checkpoint.pkl, a pickle from an older version of this '
                      'script; it is never loaded (unpickling can run code): move it away')
  ckpt = read_checkpoint(workdir)
  if ckpt is not None:
    changed = differing_fields(ckpt['config'], current)
    if changed:
      raise ConfigError(f'the checkpoint in {workdir} was made with a different config '
                        f'({", ".join(changed)}); use another --workdir')
  read_metrics(workdir, ckpt['epoch'] if ckpt else 0)  # a damaged file stops us here
  write_json(path, json.loads(config.to_json()))  # also proves the folder is writable
  return ckpt


def save_checkpoint(workdir, config, epoch, state):
  """Host arrays of `state` in an .npz (no pickle), with the epoch, the run config and every
  leaf's path in the pytree as JSON; written atomically."""
  paths, leaves = zip(*[(jax.tree_util.keystr(p), np.asarray(a))
                        for p, a in jax.tree_util.tree_flatten_with_path(state)[0]])
  meta = json.dumps({'epoch': epoch, 'config': run_config(config), 'paths': paths})
  arrays = {f'leaf{i:05d}': a for i, a in enumerate(leaves)}
  write_atomic(os.path.join(workdir, CHECKPOINT),
               lambda f: np.savez(f, meta=np.asarray(meta), **arrays))


def read_checkpoint(workdir):
  """{'epoch', 'config', 'paths', 'leaves'} of the workdir's checkpoint, or None if it has none.

  np.load with allow_pickle=False: a checkpoint from someone else's workdir cannot run code.
  """
  path = os.path.join(workdir, CHECKPOINT)
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      ckpt = json.loads(str(z['meta']))
      ckpt['leaves'] = [z[f'leaf{i:05d}'] for i in range(len(ckpt['paths']))]
    assert isinstance(ckpt['epoch'], int) and isinstance(ckpt['config'], dict)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'{path} is damaged or not a checkpoint of this script '
                      f'({type(e).__name__}); move it away to start the run over') from e
  return ckpt


def restore_state(ckpt, template):
  """The checkpoint's arrays in the pytree structure of `template`, checked leaf by leaf."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(template)
  paths = [jax.tree_util.keystr(p) for p, _ in flat]
  if paths != list(ckpt['paths']) or any(
      np.shape(a) != b.shape or np.result_type(a) != b.dtype
      for (_, a), b in zip(flat, ckpt['leaves'])):
    raise ConfigError('the checkpoint does not hold the parameters of this network')
  return jax.tree_util.tree_unflatten(treedef, ckpt['leaves'])


def read_metrics(workdir, last_epoch):
  """Metrics rows of the epochs up to `last_epoch` (later ones were not checkpointed)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    if last_epoch:
      logging.warning('%s is missing: it will hold only the epochs from %d on', path,
                      last_epoch + 1)
    return []
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      try:
        rows.append(json.loads(line))
        assert isinstance(rows[-1]['epoch'], int)
      except (ValueError, AssertionError, KeyError, TypeError) as e:
        raise ConfigError(f'{path} line {number} is not a metrics row; fix or remove that '
                          'line to resume') from e
  rows = [r for r in rows if r['epoch'] <= last_epoch]
  if len(rows) < last_epoch:
    logging.warning('%s holds %d of the %d checkpointed epochs', path, len(rows), last_epoch)
  return rows


def json_safe(value):
  """Non-finite floats become null: metrics.jsonl stays strict JSON."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_metrics(workdir, rows):
  text = ''.join(json.dumps(json_safe(r), allow_nan=False) + '\n' for r in rows)
  write_atomic(os.path.join(workdir, 'metrics.jsonl'), lambda f: f.write(text.encode()))


def replicate(tree, num_devices):
  """A copy per device along a new leading axis, placed as jax.pmap places its outputs.

  (An uncommitted array, e.g. from jnp.broadcast_to, makes pmap compile the train step a
  second time when its own outputs come back in.)
  """
  devices = jax.local_devices()[:num_devices]
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ('batch',)),
                                        jax.sharding.PartitionSpec('batch'))
  return jax.tree_util.tree_map(
      lambda a: jax.device_put(np.broadcast_to(np.asarray(a), (num_devices, *np.shape(a))),
                               sharding), tree)


def to_python(tree):
  """Device scalars and lists of them -> floats, for JSON."""
  return jax.tree_util.tree_map(lambda v: float(v), jax.device_get(tree))


# ======================================================================================
# Main loop
# ======================================================================================

def train_and_evaluate(config, workdir=None):
  """Trains for config.num_epochs epochs; returns the list of per-epoch metrics.

  Order of work: check the config, the workdir and the data (each bad input is one
  ConfigError line), then compile and train. Every epoch ends with one metrics row and an
  atomic checkpoint; a rerun with the same workdir resumes after the last checkpoint.
  """
  num_devices = resolve_config(config, jax.local_device_count())
  workdir = workdir or default_workdir(config)
  logging.info('workdir: %s', workdir)
  ckpt = prepare_workdir(workdir, config)
  data = load_data(config)
  num_train = len(data['train'][0])
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch < 1:
    raise ConfigError(f'batch_size={config.batch_size} exceeds the {num_train} training images')

  optimizer = make_optimizer(config)
  params = init_params(jax.random.PRNGKey(config.seed), config)
  opt_state = optimizer.init(params)
  start_epoch, history = 1, []
  if ckpt is not None:
    params, opt_state = restore_state(ckpt, (params, opt_state))
    start_epoch, history = ckpt['epoch'] + 1, read_metrics(workdir, ckpt['epoch'])
    logging.info('resuming from %s after epoch %d', workdir, ckpt['epoch'])
  params, opt_state = replicate((params, opt_state), num_devices)

  train_step = make_train_step(config, optimizer)
  eval_step = make_eval_step(config)
  diagnostics = make_diagnostics(config)
  diag_x = data['train'][0][:config.diag_batch_size]
  diag_y = data['train'][1][:config.diag_batch_size]
  shard = lambda a: a.reshape(num_devices, -1, *a.shape[1:])
  # XLA:CPU runs all its devices on one shared thread pool: a device that runs ahead into
  # the next step's all-reduce can starve the others (a rendezvous deadlock on 2 cores).
  lockstep = num_devices > 1 and jax.default_backend() == 'cpu'
  blown_up = lambda loss: not loss <= config.max_train_loss  # NaN counts as blown up

  for epoch in range(start_epoch, config.num_epochs + 1):
    order = np.random.default_rng([config.seed, epoch]).permutation(num_train)
    sums, t0 = {}, time.time()
    for i in range(steps_per_epoch):
      idx = order[i * config.batch_size:(i + 1) * config.batch_size]
      step = np.int32((epoch - 1) * steps_per_epoch + i)
      params, opt_state, metrics = train_step(params, opt_state, step,
                                              shard(data['train'][0][idx]),
                                              shard(data['train'][1][idx]))
      if lockstep:
        jax.block_until_ready(params)
      for k, v in metrics.items():
        sums.setdefault(k, []).append(v)  # one value per device
      if config.log_every_steps and (i + 1) % config.log_every_steps == 0:
        recent = {k: float(np.mean(jax.device_get(v[-config.log_every_steps:])))
                  for k, v in sums.items()}
        elapsed = time.time() - t0
        dropped = int(np.sum(jax.device_get(sums.get('dropped_samples', [0]))))
        logging.info('epoch %d  step %d/%d  loss %.4f  acc %.3f  %.1f ms/step  eta %.0fs%s',
                     epoch, i + 1, steps_per_epoch, recent['loss'], recent['accuracy'],
                     1e3 * elapsed / (i + 1), elapsed / (i + 1) * (steps_per_epoch - i - 1),
                     f'  dropped {dropped} non-finite samples' if dropped else '')
        if blown_up(recent['loss']):
          break
    train = {k: np.asarray(jax.device_get(v)) for k, v in sums.items()}  # (steps, devices)
    epoch_time = time.time() - t0

    row = {'epoch': epoch, 'step': epoch * steps_per_epoch,
           'train_loss': float(train['loss'].mean()),
           'train_accuracy': float(train['accuracy'].mean()),
           'epoch_time_s': epoch_time}
    if 'log10_residual' in train:
      worst = train['log10_residual'].max(axis=1)  # worst sample of each step
      row['log10_residual'] = float(worst.mean())
      row['log10_residual_max'] = float(worst.max())
    if 'homeo_loss' in train:
      row['train_homeo_loss'] = float(train['homeo_loss'].mean())
    if 'dropped_samples' in train:  # non-finite error vectors left out of the gradient
      row['dropped_samples'] = int(train['dropped_samples'].sum())
    host_params = jax.device_get(jax.tree_util.tree_map(lambda a: a[0], params))
    finite_params = all(np.isfinite(a).all() for a in jax.tree_util.tree_leaves(host_params))
    if not finite_params or blown_up(row['train_loss']):
      row['diverged'] = True
      write_metrics(workdir, history + [row])
      kept = (f'the checkpoint still holds epoch {epoch - 1}' if epoch > 1 else
              'no checkpoint was written')
      raise FloatingPointError(
          f'training diverged in epoch {epoch} (training loss {row["train_loss"]:.4g} > '
          f'max_train_loss={config.max_train_loss:g}, or non-finite parameters); {kept}. '
          'Lower the learning rate or check that the dynamics converge.')
    row['test_error'] = evaluate(eval_step, params, data['test'], config, num_devices)
    row.update({'diag/' + k: v for k, v in to_python(diagnostics(host_params, diag_x,
                                                                 diag_y)).items()})
    residual = row.get('log10_residual', row['diag/log10_residual'])
    if not residual <= config.max_log10_residual:  # NaN is not converged
      logging.warning('epoch %d: no fixed point reached (log10 ||F|| = %.2f > %.1f); '
                      'raise t_free or check the dynamics', epoch, residual,
                      config.max_log10_residual)
      row['converged'] = False
    history.append(row)
    write_metrics(workdir, history)
    save_checkpoint(workdir, config, epoch,
                    (host_params, jax.device_get(jax.tree_util.tree_map(lambda a: a[0],
                                                                        opt_state))))
    logging.info(
        'epoch %d  train loss %.4f  acc %.2f%%  test error %.2f%%  symmetry %.3f  '
        'cos %s  angle %s  log10|F| %.1f  %.1fs', epoch, row['train_loss'],
        100 * row['train_accuracy'], row['test_error'], row['diag/symmetry'],
        ' '.join(f'{c:.2f}' for c in row['diag/cosine_exact']),
        ' '.join(f'{a:.1f}' for a in row['diag/weight_angle']), residual, epoch_time)
  return history


def one_line(error):
  return ' '.join(str(error).replace('\\n', ' ').split())


def parse_flags(argv):
  """absl's flag parsing, with a bad --config (missing file, misspelt field, wrong type) as
  one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(f'{SCRIPT}: error: {one_line(e)}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  try:
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except (ConfigError, FloatingPointError) as e:
    sys.exit(f'{SCRIPT}: error: {e}')
  except OSError as e:  # a read-only or full disk: the files written before are intact
    sys.exit(f'{SCRIPT}: error: cannot write the workdir: {one_line(e)}')


if __name__ == '__main__':
  # Defined here, not at import, so that other scripts and tests can import this module
  # (absl refuses a second definition of --config in one process).
  config_flags.DEFINE_config_file('config', 'configs/fmnist_mlp.py',
                                  'Experiment configuration.')
  flags.DEFINE_string('workdir', None, 'Where to write the config, metrics and checkpoint '
                      '(default: runs/<script>/<settings>-<config hash>, printed at start); '
                      'rerunning with the same workdir resumes.')
  app.run(main, flags_parser=parse_flags)

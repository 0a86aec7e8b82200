r"""Generalized holomorphic EP on a Fashion-MNIST MLP (Laborieux & Zenke, ICLR 2024).

Paper: Table 1, Fig. 3, Fig. 4a-d. Network of App. D.2: 784 - 256 - 256 - 10 with reciprocal
connections whose forward and backward weights are independent (Fig. 1b), so the Jacobian at
the fixed point is not symmetric unless the weights are tied.

    python fmnist_mlp.py --config=configs/fmnist_mlp.py --workdir=runs/mlp
    python fmnist_mlp.py --config=configs/fmnist_mlp.py --config.algorithm=hep_exact

The script reads top to bottom beside the paper, in the sections of cifar_conv.py: network,
gradient estimators, train step, diagnostics, data, config checks, main loop. The shared math
(layered dynamics, fixed point, Cauchy estimate, RBP, homeostatic loss) lives in common.py,
the run machinery (workdir, checkpoint, metrics, command line) in harness.py. The network is
the one `config.network` names in NETWORKS: fmnist_feedback.py adds the network of Fig. 4e
there and runs everything else from this file.

Sign convention (the authors' code; see the README): the nudge ADDS beta * dL/ds_out to the
output layer's drive, where L is the softmax cross-entropy of the readout. Then
(dG/dtheta)^T d_beta s* is the gradient of L itself, descended like any other gradient.
(App. D.2 writes the nudge as +beta w_ro^T (y - softmax), the opposite sign, which would flip
the estimate.)
"""
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import harness

ALGORITHMS = ('hep', 'hep_exact', 'hep_continuous', 'rbp', 'bptt')
NUM_CLASSES = 10
SCRIPT = os.path.basename(__file__)
ConfigError = harness.ConfigError


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


def weight_angles(params):
  """Angle in degrees between each backward matrix and the transposed forward one (Fig. 3a-b)."""
  angles = []
  for l, bw in enumerate(params['backward']):
    a, b = bw['w'], params['forward'][l + 1]['w'].T
    cos = jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
    angles.append(jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0))))
  return angles


# The networks a config can name (config.network). The 'sequential' order updates the odd
# layers, then the even ones (common.odd_then_even): layers only talk to their neighbours,
# so the synchronous dynamics split into two independent interleaved chains (odd layers at
# even times with even layers at odd times, and the reverse), and one sequential step
# advances one chain by two synchronous steps at the cost of one: from the same start it
# reproduces that chain of the synchronous trajectory exactly (tested), with the same fixed
# points. With beta != 0 the nudge couples the output layer to its own previous value,
# which is then taken from its own chain.
NETWORKS = {'reciprocal': common.Network(init_params, layer_drive, common.odd_then_even,
                                         weight_angles)}


def network(config):
  return NETWORKS[config.network]


def layer_count(config):
  return len(config.hidden_sizes) + 1


def drives(config, params, s, x_drive):
  """G(s) for all layers: u <- G(sigma(u)) is the free synchronous step of App. D.2."""
  return tuple(network(config).layer_drive(params, s, x_drive, l) for l in range(len(s)))


def readout_logits(params, s_out):
  return dot(s_out, params['readout']['w']) + params['readout']['b']


def readout_loss(params, s_out, labels):
  """(mean softmax cross-entropy, {'accuracy': top-1}) of the readout."""
  logits = readout_logits(params, s_out)
  loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, NUM_CLASSES)).mean()
  return loss, {'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels)}


def loss_grad_s(params, s_out, labels):
  """g = dL/ds_out per sample, L the softmax cross-entropy; holomorphic in s_out
  (jax.nn.softmax takes complex logits: its shift by their max is a constant per sample)."""
  probs = jax.nn.softmax(readout_logits(params, s_out))
  return dot(probs - jax.nn.one_hot(labels, NUM_CLASSES), params['readout']['w'].T)


def update_groups(config):
  """None for synchronous updates, else the network's groups of the 'sequential' order."""
  if config.layer_updates == 'synchronous':
    return None
  return network(config).update_groups(layer_count(config))


def make_step(config, params, x_drive, labels=None):
  """step(u, beta) -> next state of u <- G(sigma(u)) + beta dL/ds_out (beta = None: free).

  Definition 1 holds with dF/dbeta = dL/ds. config.layer_updates picks the update order
  (common.layered_step): 'synchronous', every layer at once from the previous state, exactly
  App. D.2; or 'sequential' (the default here), the network's groups in turn, each from the
  values just computed. T_free and T_nudge count synchronous steps (the paper's unit);
  callers run steps_for(config, T) steps of the configured order for them.
  """
  layer_drive, top = network(config).layer_drive, layer_count(config) - 1

  def new_u(s, l, beta):
    g = layer_drive(params, s, x_drive, l)
    if l == top and beta is not None:
      g = g + beta * loss_grad_s(params, s[-1], labels)
    return g

  return common.layered_step(new_u, sigma, layer_count(config), update_groups(config))


def steps_for(config, num_synchronous_steps):
  """Steps of make_step's update for `num_synchronous_steps` synchronous steps: as many, or
  ceil(T / number of groups) sequential ones (each advances a chain by one step per group)."""
  return common.steps_of(num_synchronous_steps, update_groups(config))


def zeros_state(config, batch, dtype=None):
  """The all-zeros state (dtype None: JAX's default float)."""
  return tuple(jnp.zeros((batch, n), dtype) for n in (*config.hidden_sizes, NUM_CLASSES))


# ======================================================================================
# Neuronal error vectors and gradients (Eqs. 4-9)
# ======================================================================================

def estimator(config):
  """The configured algorithm; 'hep' with N = 0 is the exact derivative (the authors'
  convention)."""
  return 'hep_exact' if config.algorithm == 'hep' and config.n_points == 0 else config.algorithm


def free_relaxation(config, params, x_drive):
  """The free phase: T_free steps from zeros (fewer with tol > 0). Returns (u_free, log10 of
  the last update, steps per sample) as common.fixed_point."""
  step = make_step(config, params, x_drive)
  u0 = zeros_state(config, x_drive.shape[0])
  return common.fixed_point(step, u0, steps_for(config, config.t_free), config.tol)


def nudged_relaxation(config, params, x_drive, labels, u_free):
  """beta -> s*(beta): T_nudge steps from the free fixed point (complex beta: complex state)."""
  step = make_step(config, params, x_drive, labels)

  def relax(beta):
    u0 = jax.tree_util.tree_map(lambda x: x.astype(jnp.result_type(x, beta)), u_free)
    u = common.fixed_point(lambda u: step(u, beta), u0, steps_for(config, config.t_nudge))[0]
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
  step = lambda u: drives(config, params, activate(u), x_drive)
  return common.rbp_delta(step, u_free, dl_du, config.t_nudge)


def network_grads(config, params, x, s_free, error):
  """(dG/dtheta)^T e at the free fixed point, averaged over the batch (Eqs. 4 and 6).

  Returns (grads, number of samples dropped): a sample whose error vector is not finite
  contributes nothing (common.drop_non_finite_samples).
  """
  error, dropped = common.drop_non_finite_samples(error)
  _, vjp = jax.vjp(lambda p: drives(config, p, s_free, input_drive(p, x)), params)
  return jax.tree_util.tree_map(lambda g: g / x.shape[0], vjp(error)[0]), dropped


def bptt_grads(config, params, x, labels, u_free):
  """The authors' "RBP/BP" baseline: autodiff through T_nudge steps from the free fixed point."""
  u_start = jax.lax.stop_gradient(u_free)

  def loss(p):
    p = {**p, 'readout': jax.lax.stop_gradient(p['readout'])}
    step = make_step(config, p, input_drive(p, x))
    u = common.fixed_point(step, u_start, steps_for(config, config.t_nudge))[0]
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
      lambda s, x_drive: drives(config, p, s, x_drive), s_fixed, input_drive(p, x), noise)
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
  algorithm = estimator(config)
  if algorithm == 'hep_continuous':
    # Eqs. 8-9: no free phase; the time average s_bar stands for the free fixed point.
    s_free, error = continuous_estimate(config, params, x_drive, labels)
    grads, metrics['dropped_samples'] = network_grads(config, params, x, s_free, error)
  else:
    u_free, metrics['log10_residual'], _ = free_relaxation(config, params, x_drive)
    s_free = activate(u_free)
    relax = nudged_relaxation(config, params, x_drive, labels, u_free)  # beta -> s*(beta)
    if algorithm == 'hep':  # Eq. 7: N-point Cauchy estimate of d_beta s*
      error = common.cauchy_estimate(relax, s_free, config.beta, config.n_points)
      grads, metrics['dropped_samples'] = network_grads(config, params, x, s_free, error)
    elif algorithm == 'hep_exact':  # Table 1's "true d_beta u*" (forward mode)
      grads, metrics['dropped_samples'] = network_grads(config, params, x, s_free,
                                                        common.exact_dbeta(relax))
    elif algorithm == 'rbp':  # Eq. 4: the adjoint fixed point delta
      error = rbp_error(config, params, x_drive, labels, u_free)
      grads, metrics['dropped_samples'] = network_grads(config, params, x, s_free, error)
    else:  # 'bptt': backpropagation through T_nudge steps from the free fixed point
      grads = bptt_grads(config, params, x, labels, u_free)

  (loss, readout_metrics), readout_grads = jax.value_and_grad(
      lambda p: readout_loss(p, s_free[-1], labels), has_aux=True)(params)
  grads = jax.tree_util.tree_map(jnp.add, grads, readout_grads)
  metrics.update(loss=loss, **readout_metrics)
  if config.homeo_coef > 0:
    noise = homeostatic_noise(config, key, sample_ids)
    metrics['homeo_loss'], homeo = homeostatic_grads(config, params, x, s_free, noise)
    grads = jax.tree_util.tree_map(jnp.add, grads, homeo)
  return grads, metrics


# ======================================================================================
# Training and evaluation steps (jax.pmap over local devices)
# ======================================================================================

def make_optimizer(config, steps_total):
  """Table 3's optimizers: SGD with momentum, or Adam, at a constant learning rate (so
  steps_total, which a schedule would span, is not used)."""
  del steps_total
  if config.optimizer == 'sgd':
    return optax.sgd(config.learning_rate, momentum=config.momentum or None)
  return optax.adam(config.learning_rate)


def preprocess(config, images):
  """Pixels / 255 (the images come flattened): no normalisation, the authors' Fashion-MNIST
  input, whatever the config."""
  del config
  return images.astype(jnp.float32) / 255.0


def make_train_step(config, optimizer):
  """One update. Each device takes its slice of the batch; gradients are averaged (pmean),
  and the metrics reduced so that every device holds those of the whole batch."""
  base_key = jax.random.PRNGKey(config.seed + 1)

  def train_step(params, opt_state, step, images, labels):
    local = images.shape[0]
    sample_ids = step * config.batch_size + jax.lax.axis_index('batch') * local + jnp.arange(local)
    grads, metrics = compute_grads(config, params, preprocess(config, images), labels,
                                   jax.random.fold_in(base_key, step), sample_ids)
    grads = jax.lax.pmean(grads, 'batch')
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, harness.reduce_metrics(metrics)

  return jax.pmap(train_step, axis_name='batch', in_axes=(0, 0, None, 0, 0),
                  donate_argnums=(0, 1))


def make_eval_step(config):
  """Number of misclassified test images (free phase + readout), summed over devices."""
  def eval_step(params, images, labels, mask):
    x = preprocess(config, images)
    u, _, _ = free_relaxation(config, params, input_drive(params, x))
    wrong = jnp.argmax(readout_logits(params, sigma(u[-1])), -1) != labels
    return jax.lax.psum(jnp.sum(wrong * mask), 'batch')
  return jax.pmap(eval_step, axis_name='batch')


def evaluate(eval_step, params, split, config, num_devices):
  """{'test_error': % misclassified over the whole split} (harness.evaluate_counts)."""
  wrong = harness.evaluate_counts(eval_step, params, split, config.eval_batch_size, num_devices)
  return {'test_error': 100.0 * float(wrong) / len(split)}


# ======================================================================================
# Diagnostics (one fixed batch per epoch, off the hot path)
# ======================================================================================

def make_diagnostics(config):
  """Symmetry, alignment and convergence of the network on one batch (Figs. 3-4)."""

  angles = network(config).weight_angles

  @jax.jit
  def diagnostics(params, images, labels):
    x = preprocess(config, images)
    x_drive = input_drive(params, x)
    u_free, log10_residual, _ = free_relaxation(config, params, x_drive)
    s_free = activate(u_free)
    relax = nudged_relaxation(config, params, x_drive, labels, u_free)
    delta = rbp_error(config, params, x_drive, labels, u_free)
    cos = lambda e: [jnp.mean(common.per_sample_cosine(a, b)) for a, b in zip(e, delta)]
    out = {'log10_residual': log10_residual, 'cosine_exact': cos(common.exact_dbeta(relax))}
    if estimator(config) == 'hep':
      out['cosine_estimate'] = cos(common.cauchy_estimate(relax, s_free, config.beta,
                                                          config.n_points))
    elif estimator(config) == 'hep_continuous':
      out['cosine_estimate'] = cos(continuous_estimate(config, params, x_drive, labels)[1])

    # Dense J = dF/ds = K - I on a few samples: the symmetry measure and the exact value
    # of the homeostatic loss, next to its Hutchinson estimate on the whole batch.
    def one_sample(s, xd):
      one = lambda t: tuple(a[None] for a in t)
      field = lambda z: common.tree_sub(drives(config, params, z, xd[None]), z)
      jac = common.flat_jacobian(field, one(s))
      return common.symmetry_measure(jac), common.homeostatic_loss_exact(jac)
    m = config.diag_jacobian_samples
    sym, homeo_exact = jax.vmap(one_sample)(tuple(s[:m] for s in s_free), x_drive[:m])
    noise = homeostatic_noise(config, jax.random.PRNGKey(0), jnp.arange(x.shape[0]))
    out.update(
        symmetry=jnp.mean(sym), homeo_loss_exact=jnp.mean(homeo_exact),
        homeo_loss=common.homeostatic_loss(lambda s, xd: drives(config, params, s, xd), s_free,
                                           x_drive, noise),
        # None (null in the metrics) where no weight has a transposed partner.
        weight_angle=angles(params) if angles else None,
        loss=readout_loss(params, s_free[-1], labels)[0])
    return out

  return diagnostics


# ======================================================================================
# Data
# ======================================================================================
# A split has len() and read(indices) -> (uint8 images (n, 784), int32 labels (n,)):
# Fashion-MNIST is held in memory (harness.MemorySplit); pixels are scaled on the device
# (preprocess).

SPLIT_SIZES = {'train': 60000, 'test': 10000}


def read_prepared_tfds(data_dir):
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
  """harness.Data(train, test) of Fashion-MNIST, images flattened (n, 784), the first
  train_size / test_size of each split (0 = all). config.data_source: 'idx' reads the four
  IDX .gz files in data_dir ('' = the Debian package's folder), 'tfds' a prepared TFDS
  data set in tfds_data_dir, 'auto' the IDX files where they are."""
  if config.data_source == 'idx' or (config.data_source == 'auto' and (
      config.data_dir or os.path.isdir(harness.FASHION_MNIST_DIR))):
    data = harness.load_fashion_mnist(config.data_dir or harness.FASHION_MNIST_DIR)
    data = {split: (x.reshape(len(x), -1), y) for split, (x, y) in data.items()}
  else:
    data = read_prepared_tfds(config.tfds_data_dir)
  return harness.memory_data(config, data)


# ======================================================================================
# Config checks
# ======================================================================================

FIELDS = {  # harness.check_fields: choices, bool, or (kind, low, high, above)
    'dataset': ('fashion_mnist',), 'data_source': ('auto', 'idx', 'tfds'),
    'layer_updates': ('sequential', 'synchronous'), 'algorithm': ALGORITHMS,
    'optimizer': ('sgd', 'adam'), 'continuous_average': ('hold_end', 'every_step'),
    'seed': (int, 0, 2**31 - 1), 'train_size': (int, 0, SPLIT_SIZES['train']),
    'test_size': (int, 0, SPLIT_SIZES['test']),
    **{name: (int, 1) for name in ('t_free', 't_nudge', 'continuous_steps_per_point',
                                   'continuous_periods', 'homeo_draws', 'batch_size',
                                   'eval_batch_size', 'num_epochs', 'diag_batch_size')},
    'tol': (float, 0), 'n_points': (int, 0, 64), 'beta': (float, None, None, 0),
    'homeo_coef': (float, 0), 'learning_rate': (float, None, None, 0),
    'momentum': (float, 0, 0.999), 'num_devices': (int, 0), 'log_every_steps': (int, 0),
    'max_log10_residual': (float,), 'max_train_loss': (float, None, None, 0),
}
# Fields that may differ when a run is resumed: where the data are, how many devices share
# the batch, how often to log, and how long to train (the learning rate is constant, so a
# longer run continues a shorter one; the conv scripts' cosine schedule spans the run).
RESUMABLE_FIELDS = ('num_epochs', 'num_devices', 'log_every_steps', 'data_dir', 'tfds_data_dir')


def check_config(config, num_local_devices):
  """Checks every field (one-line ConfigError on bad input) before any data is read or
  anything is compiled; returns the number of local devices to use. Changes nothing."""
  c = config
  harness.check_choice(c, 'network', tuple(NETWORKS))
  harness.check_fields(c, FIELDS)
  harness.check_int_tuple(c, 'hidden_sizes', 1)
  harness.check_number(c, 'diag_jacobian_samples', int, 1, c.diag_batch_size)
  if 'alpha' in c:  # the backward weights' initial angle (the feedback network has none)
    harness.check_number(c, 'alpha', float, 0, 180)
  if c.algorithm == 'hep_continuous' and c.n_points < 2:
    raise ConfigError(f'hep_continuous needs n_points >= 2, got {c.n_points}')
  if network(c).check_config:
    network(c).check_config(c)
  return harness.check_devices(c, num_local_devices)


def default_workdir(config, script=SCRIPT):
  """runs/<script>/<algorithm and its main settings>-<hash of the whole run config>."""
  c = config
  algorithm = estimator(c)
  name = {'hep': f'hep{c.n_points}_beta{c.beta:g}', 'hep_continuous':
          f'hepcont{c.n_points}_beta{c.beta:g}'}.get(algorithm, algorithm)
  return harness.default_workdir(script, f'{name}_homeo{c.homeo_coef:g}_seed{c.seed}', c,
                                 RESUMABLE_FIELDS)


# ======================================================================================
# Main loop
# ======================================================================================

@harness.releases_workdirs
def train_and_evaluate(config, workdir=None, script=SCRIPT):
  """Trains for config.num_epochs epochs; returns the per-epoch metrics rows. Every check
  passes before anything is written or compiled; every epoch ends with a metrics row and
  an atomic checkpoint, from which a rerun resumes. fmnist_feedback.py runs this loop on its
  network (`script` names the default workdir's folder)."""
  num_devices = check_config(config, jax.local_device_count())
  workdir = harness.Workdir(workdir or default_workdir(config, script), config,
                            RESUMABLE_FIELDS)
  data = harness.check_batches(config, load_data(config))
  workdir.start()
  logging.info('workdir: %s', workdir.path)
  num_train = len(data.train)
  steps_per_epoch = num_train // config.batch_size

  optimizer = make_optimizer(config, config.num_epochs * steps_per_epoch)
  params = network(config).init_params(jax.random.PRNGKey(config.seed), config)
  (params, opt_state), start_epoch = workdir.restore((params, optimizer.init(params)))
  if harness.run_is_complete(workdir.path, start_epoch, config.num_epochs):
    return workdir.history
  params, opt_state = harness.replicate((params, opt_state), num_devices)

  train_step = make_train_step(config, optimizer)
  eval_step = make_eval_step(config)
  diagnostics = make_diagnostics(config)
  diag_x, diag_y = data.train.read(np.arange(config.diag_batch_size))
  # XLA:CPU runs all its devices on one shared thread pool: a device that runs ahead into
  # the next step's all-reduce can starve the others (a rendezvous deadlock on 2 cores).
  lockstep = num_devices > 1 and jax.default_backend() == 'cpu'

  for epoch in range(start_epoch, config.num_epochs + 1):
    indices = harness.process_batch_indices(num_train, config.batch_size, config.seed, epoch)
    batches = harness.prefetch(harness.read_batches(data.train, indices),
                               put=lambda batch: tuple(harness.shard(a, num_devices) for a in batch))
    progress = harness.Progress(epoch, steps_per_epoch, config.batch_size,
                                config.log_every_steps, config.max_train_loss, config.num_epochs)
    for i, (images, labels) in enumerate(batches):
      step = np.int32((epoch - 1) * steps_per_epoch + i)
      params, opt_state, metrics = train_step(params, opt_state, step, images, labels)
      if lockstep:
        jax.block_until_ready(params)
      if not progress.add(metrics):
        break
    batches.close()  # stops the prefetch thread if the epoch ended early

    row = progress.row(step=epoch * steps_per_epoch)
    host_params = harness.unreplicate(params)
    harness.stop_if_diverged(workdir, row, host_params, config.max_train_loss)
    row.update(evaluate(eval_step, params, data.test, config, num_devices))
    row.update({'diag/' + k: v for k, v in
                harness.to_floats(diagnostics(host_params, diag_x, diag_y)).items()})
    residual = harness.flag_unconverged(row, config.max_log10_residual)
    workdir.save(epoch, row, (host_params, harness.unreplicate(opt_state)))
    angles = row['diag/weight_angle']
    logging.info(
        'epoch %d  train loss %.4f  acc %.2f%%  test error %.2f%%  symmetry %.3f  '
        'cos %s  angle %s  log10|F| %.1f  %.1fs', epoch, row['train_loss'],
        100 * row['train_accuracy'], row['test_error'], row['diag/symmetry'],
        ' '.join(f'{c:.2f}' for c in row['diag/cosine_exact']),
        'n/a' if angles is None else ' '.join(f'{a:.1f}' for a in angles), residual,
        row['epoch_time_s'])
  return workdir.history


if __name__ == '__main__':
  harness.run_main(SCRIPT, train_and_evaluate, 'configs/fmnist_mlp.py')

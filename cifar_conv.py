r"""Generalized holomorphic EP on the recurrent convolutional network (Laborieux & Zenke, ICLR 2024).

Paper: Table 2 (CIFAR-10/100; ImageNet 32x32 in imagenet32_conv.py, which imports this file)
and Fig. 4i-l. Network and dynamics of App. D.2 ("Convolutional networks"): four 3x3
convolutional layers with softmax pooling, reciprocal connections whose backward kernels are
independent of the forward ones (so the Jacobian at the fixed point is not symmetric unless
the kernels are tied), hyperparameters of Table 4.

    python cifar_conv.py --config=configs/cifar10.py --workdir=runs/cifar10
    python cifar_conv.py --config=configs/cifar10.py --config.algorithm=hep --config.n_points=2

The script reads top to bottom beside the paper, in the sections of fmnist_mlp.py: network,
gradient estimators, train step, diagnostics, data, config checks, main loop. The shared math
(layered dynamics, fixed point, Cauchy estimate, RBP, homeostatic loss) lives in common.py,
the run machinery (workdir, checkpoint, metrics, processes, command line) in harness.py. The
network is the one `config.network` names in NETWORKS, the data set the one `config.dataset`
names in DATASETS: imagenet32_conv.py adds ImageNet 32x32 there and runs everything else
from this file.

Sign convention (the authors' code; see the README): the nudge ADDS beta * dL/ds_out to the
output layer's drive, where L is the softmax cross-entropy of the readout. Then
(dG/dtheta)^T d_beta s* is the gradient of L itself, descended like any other gradient.
(App. D.2 writes the nudge as +beta w_ro^T (y - softmax), the opposite sign.)

Several processes (multi-host): each drives its local devices and reads only its share of
every global batch (harness.process_batch_indices); the gradient all-reduce and the metrics
span every device of every process; process 0 alone writes the workdir and, at start,
broadcasts its checkpoint. See imagenet32_conv.py for the command lines.
"""
import math
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import harness

ALGORITHMS = ('hep', 'hep_exact', 'hep_continuous', 'rbp', 'bptt')
FREE_DTYPES = ('auto', 'float32', 'bfloat16', 'float16')
SCRIPT = os.path.basename(__file__)

# ======================================================================================
# Network (App. D.2, convolutional)
# ======================================================================================
# State: a tuple (u_1, ..., u_L) of NHWC arrays (batch, H_l, W_l, C_l). Layer l convolves the
# activated layer below (the image for l = 1) with a 3x3 kernel, stride 1, 'SAME' padding
# ('VALID' for the last layer), then softmax-pools 2x2 with stride 2. For 32x32x3 images and
# channels (128, 256, 512, 512): (16,16,128), (8,8,256), (4,4,512), (1,1,512).
#
# Parameters: {'forward': [{'w', 'b'}] * L, 'backward': [{'w'}] * (L - 1), 'readout': {'w', 'b'}}
# forward[l]['w'] (3, 3, C_{l-1}, C_l) maps layer l-1 to layer l; backward[l]['w'] has the shape
# of forward[l+1]['w'] and carries layer l+1 back to layer l through the "backward module"
#     top-down_l(s) = d/ds_l [ s_{l+1} . P(conv(s_l, backward[l]['w'])) ],
# a VJP of the pooled convolution (no bias). config.tied = True: 'backward' is an empty list and
# the forward kernels are used in both directions, so that G(s) = grad_s Phi(s) with
#     Phi(s) = sum_l s_l . (P(conv(s_{l-1}, w_l)) + b_l),   s_0 = x,
# an energy-based model whose K = dG/ds (the Hessian of Phi) is symmetric. The readout
# (C_L -> num_classes) is not part of the dynamics.
#
# Indices in the code are 0-based: layer l of the paper is index l - 1.

def state_shapes(config):
  """((H, W, C) of every layer), from image_size and channels: each layer halves the size by
  its pooling, the last one after a 3x3 VALID conv. ValueError if a size does not halve
  cleanly."""
  size, shapes = config.image_size, []
  for l, c in enumerate(config.channels):
    conv_size = size if l < len(config.channels) - 1 else size - 2  # 3x3 'VALID' on the last
    if conv_size < 2 or conv_size % 2:
      raise ValueError(
          f'image_size={config.image_size} does not fit {len(config.channels)} layers: layer '
          f'{l + 1} would pool a {conv_size}x{conv_size} map (needs an even size >= 2)')
    size = conv_size // 2
    shapes.append((size, size, c))
  return tuple(shapes)


def paddings(num_layers):
  return tuple('VALID' if l == num_layers - 1 else 'SAME' for l in range(num_layers))


def sigma(u):
  """(u/2) sigmoid(u) + (1 - u/2) sigmoid(u - 2) (App. D.2); holomorphic, takes complex u."""
  return 0.5 * u * jax.nn.sigmoid(u) + (1.0 - 0.5 * u) * jax.nn.sigmoid(u - 2.0)


def activate(u):
  return tuple(sigma(x) for x in u)


def softmax_pool(x):
  """Softmax pooling [78], 2x2 windows, stride 2 (NHWC): y = sum_i softmax(x)_i x_i per window.

  The window max of the real part is subtracted inside the exponential (a constant per window
  that cancels in the ratio; no gradient flows through it), so large inputs do not overflow.
  Written by hand (no jax.nn.softmax), it is holomorphic and runs on complex input.
  """
  b, h, w, c = x.shape
  x = x.reshape(b, h // 2, 2, w // 2, 2, c)
  shift = jax.lax.stop_gradient(jnp.max(x.real, axis=(2, 4), keepdims=True))
  e = jnp.exp(x - shift)
  return jnp.sum(e * x, axis=(2, 4)) / jnp.sum(e, axis=(2, 4))


def patch_convs():
  """True on CPU: convolutions are computed as a patch matrix times the kernel.

  XLA:CPU's convolution kernels run this network's shapes far below its matmul rate (the
  reduced network at ~5 % of it; the input gradient of the last layer's small VALID
  convolution ~100x slower than its forward pass), while one matmul over the 3x3 patches
  runs near that rate (README, Performance). On GPUs the convolution libraries are the
  fast path and patches would cost 9x the memory, so lax.conv is kept there. The check is
  the backend's (no flag), made when the step is traced.
  """
  return jax.default_backend() == 'cpu'


def real_conv(s, w, padding, as_patches=None):
  """3x3 convolution, stride 1, NHWC/HWIO, of a real state; as_patches=None: patch_convs()."""
  w = w.astype(s.dtype)
  if not (patch_convs() if as_patches is None else as_patches):
    return jax.lax.conv_general_dilated(s, w, (1, 1), padding,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  kh, kw = w.shape[:2]
  if padding == 'SAME':
    s = jnp.pad(s, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  h, wd = s.shape[1] - kh + 1, s.shape[2] - kw + 1
  patches = jnp.concatenate([s[:, a:a + h, b:b + wd] for a in range(kh) for b in range(kw)],
                            axis=-1)  # (batch, h, wd, kh * kw * C_in), HWIO order
  return patches @ w.reshape(-1, w.shape[-1])


def conv(s, w, padding):
  """3x3 convolution, stride 1, NHWC/HWIO, of a real or complex state with real kernels
  (complex: two real convolutions, like fmnist_mlp.dot)."""
  if jnp.iscomplexobj(s):
    return jax.lax.complex(real_conv(s.real, w, padding), real_conv(s.imag, w, padding))
  return real_conv(s, w, padding)


def init_params(key, config):
  """LeCun-normal kernels, zero biases; backward kernels rotated to angle alpha (degrees):
  w_b <- sin(alpha) w_b + cos(alpha) w_f (alpha = 0: a symmetric start). tied: no backward
  kernels, the forward ones are used both ways."""
  shapes = state_shapes(config)
  sizes = (config.in_channels, *(s[-1] for s in shapes))
  init = jax.nn.initializers.lecun_normal()  # truncated normal, variance 1 / fan_in
  keys = iter(jax.random.split(key, 2 * len(sizes) + 1))
  forward = [{'w': init(next(keys), (3, 3, c_in, c_out)), 'b': jnp.zeros(c_out)}
             for c_in, c_out in zip(sizes[:-1], sizes[1:])]
  backward = []
  if not config.tied:
    alpha = np.deg2rad(config.alpha)
    backward = [{'w': np.sin(alpha) * init(next(keys), forward[l + 1]['w'].shape)
                      + np.cos(alpha) * forward[l + 1]['w']}
                for l in range(len(forward) - 1)]
  readout = {'w': init(next(keys), (sizes[-1], config.num_classes)),
             'b': jnp.zeros(config.num_classes)}
  return {'forward': forward, 'backward': backward, 'readout': readout}


def backward_kernel(params, l):
  """The kernel of the backward module from layer l+1 to layer l (tied: the forward one)."""
  if params['backward']:
    return params['backward'][l]['w']
  return params['forward'][l + 1]['w']


def input_drive(params, x):
  """P(conv(x, w_1)) + b_1 (the image itself, no sigma): constant during a relaxation."""
  num_layers = len(params['forward'])
  fw = params['forward'][0]
  return softmax_pool(conv(x, fw['w'], paddings(num_layers)[0])) + fw['b']


def top_down(s_l, s_up, w_b, padding):
  """The backward module d/ds_l [s_up . P(conv(s_l, w_b))]: a VJP at s_l applied to s_up.

  For complex states this is the transpose (not the adjoint) of the holomorphic Jacobian, as
  the analytic continuation of the real dynamics requires; jax.vjp of a holomorphic function
  does not conjugate (tested).
  """
  _, vjp = jax.vjp(lambda z: softmax_pool(conv(z, w_b, padding)), s_l)
  return vjp(s_up)[0]


def layer_drive(params, s, x_drive, l):
  """G_l(s): the new u of layer l (0-based) from the activated state s, no nudge (App. D.2).

  P(conv(s_{l-1}, w_f_l)) + b_l (x_drive for the first layer) plus, below the top layer, the
  backward module applied to the activated upper state s_{l+1} (the authors' convention; the
  paper writes u_{l+1})."""
  fw = params['forward']
  pads = paddings(len(fw))
  g = x_drive if l == 0 else softmax_pool(conv(s[l - 1], fw[l]['w'], pads[l])) + fw[l]['b']
  if l + 1 < len(s):
    g = g + top_down(s[l], s[l + 1], backward_kernel(params, l), pads[l + 1])
  return g


def weight_angles(params):
  """Angle in degrees between each backward kernel and its forward partner (flattened);
  zeros for tied kernels."""
  if not params['backward']:
    return [jnp.zeros(()) for _ in params['forward'][1:]]
  angles = []
  for l, bw in enumerate(params['backward']):
    a, b = bw['w'].ravel(), params['forward'][l + 1]['w'].ravel()
    cos = jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
    angles.append(jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0))))
  return angles


# The networks a config can name (config.network). The 'sequential' order updates the odd
# layers, then the even ones (red-black, common.odd_then_even). Unlike in the MLP, the
# top-down drive into layer l depends on s_l itself (through the pooling), so the
# synchronous dynamics do not split into independent chains: ceil(T / 2) red-black steps
# stand for T synchronous ones by convention, not exactly (README, "Update order").
NETWORKS = {'conv': common.Network(init_params, layer_drive, common.odd_then_even,
                                   weight_angles)}


def network(config):
  return NETWORKS[config.network]


def layer_count(config):
  return len(config.channels)


def drives(config, params, s, x_drive):
  """G(s) for all layers: u <- G(sigma(u)) is the free synchronous step of App. D.2."""
  return tuple(network(config).layer_drive(params, s, x_drive, l) for l in range(len(s)))


def dot(s, w):
  """s @ w for a real or complex s and real weights (complex: two real matmuls)."""
  if jnp.iscomplexobj(s):
    w = w.astype(s.real.dtype)
    return jax.lax.complex(s.real @ w, s.imag @ w)
  return s @ w.astype(s.dtype)


def readout_logits(params, s_out):
  """Readout of the flattened top state (batch, 1, 1, C_L) -> (batch, num_classes)."""
  return dot(s_out.reshape(s_out.shape[0], -1), params['readout']['w']) + params['readout']['b']


def readout_loss(params, s_out, labels):
  """(mean softmax cross-entropy, {'accuracy': top-1, 'top5_accuracy': top-5}).

  The second output is a dict of metrics; 'top5_accuracy' is there when num_classes > 5.
  """
  logits = readout_logits(params, s_out)
  num_classes = logits.shape[-1]
  loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, num_classes)).mean()
  metrics = {'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels)}
  if num_classes > 5:
    # The label is in the top 5 when fewer than 5 logits beat it (ties count for it).
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    metrics['top5_accuracy'] = jnp.mean(jnp.sum(logits > label_logit, axis=-1) < 5)
  return loss, metrics


def softmax(z):
  """Softmax over the last axis, shifted by the max of the real parts (a constant per sample:
  the same holomorphic function of complex z as jax.nn.softmax, which shifts by the complex
  max; the MLP uses that one)."""
  e = jnp.exp(z - jax.lax.stop_gradient(jnp.max(z.real, axis=-1, keepdims=True)))
  return e / jnp.sum(e, axis=-1, keepdims=True)


def loss_grad_s(params, s_out, labels):
  """g = dL/ds_out per sample, shape of s_out, L the softmax cross-entropy (holomorphic)."""
  logits = readout_logits(params, s_out)
  err = softmax(logits) - jax.nn.one_hot(labels, logits.shape[-1])
  return dot(err, params['readout']['w'].T).reshape(s_out.shape)


def update_groups(config):
  """None for synchronous updates, else the network's groups of the 'sequential' order."""
  if config.layer_updates == 'synchronous':
    return None
  return network(config).update_groups(layer_count(config))


def make_step(config, params, x_drive, labels=None):
  """step(u, beta) -> next state of u <- G(sigma(u)) + beta dL/ds_out (beta = None: free).

  Definition 1 holds with dF/dbeta = dL/ds. config.layer_updates picks the update order
  (common.layered_step): 'synchronous' (the default here), every layer at once from the
  previous state, exactly App. D.2; or 'sequential', the odd layers from the previous state,
  then the even ones from the fresh odd layers (red-black Gauss-Seidel): the same fixed
  points, each layer updated once per step, so a step costs what a synchronous step costs.
  T_free and T_nudge count synchronous steps (the paper's unit); callers run
  steps_for(config, T) steps of the configured order for them. With beta != 0 the output
  layer's nudge uses its value from the previous half-sweep.
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
  ceil(T / 2) red-black ones (NETWORKS)."""
  return common.steps_of(num_synchronous_steps, update_groups(config))


def zeros_state(config, batch, dtype=None):
  """The all-zeros state (dtype None: JAX's default float)."""
  return tuple(jnp.zeros((batch, *shape), dtype) for shape in state_shapes(config))


def resolve_free_dtype(config):
  """The dtype of the free relaxation: 'auto' = bfloat16 on GPU, float32 elsewhere.

  Returns None for full precision ('float32', or 'auto' off GPU): the free phase then runs in
  the dtype of the parameters (float32 in training, float64 in the tests) with no cast.
  """
  name = config.free_dtype
  if name == 'auto':
    name = 'bfloat16' if jax.default_backend() == 'gpu' else 'float32'
  return None if name == 'float32' else jnp.dtype(name)


# ======================================================================================
# Neuronal error vectors and gradients (Eqs. 4-9)
# ======================================================================================

def estimator(config):
  """The configured algorithm; 'hep' with N = 0 is the exact derivative (the authors'
  convention)."""
  return 'hep_exact' if config.algorithm == 'hep' and config.n_points == 0 else config.algorithm


def free_relaxation(config, params, x_drive):
  """The free phase: T_free steps from zeros (fewer with tol > 0). Returns (u_free, log10 of
  the last update, steps per sample) as common.fixed_point.

  With a half-precision free_dtype (App. D.4: "the free phase ... in half precision"), the
  parameters and the input drive are cast once, every step runs in that dtype, and the state
  is carried between steps in the input's dtype (exact: it holds half-precision values), so
  the residual and the returned state are full precision. Nudged phases and the estimators
  always run in full precision.
  """
  half = resolve_free_dtype(config)
  if half is None:
    step = make_step(config, params, x_drive)
  else:
    full = x_drive.dtype
    cast = lambda tree, dt: jax.tree_util.tree_map(lambda a: a.astype(dt), tree)
    step_half = make_step(config, cast(params, half), x_drive.astype(half))
    step = lambda u: cast(step_half(cast(u, half)), full)
  u0 = zeros_state(config, x_drive.shape[0], x_drive.dtype)
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
  'every_step' (Eq. 8 literally: every step's s averaged from t = 0). The parameter gradient
  is then taken at s_bar (G is not affine in s here because of the pooling, so this is the
  first-order approximation of Eq. 9's time average, exact as the estimate converges).
  """
  step = make_step(config, params, x_drive, labels)
  u0 = zeros_state(config, x_drive.shape[0], x_drive.dtype)
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
  """(dG/dtheta)^T e at the free fixed point, averaged over the batch (Eqs. 4 and 6); the
  input convolution enters through input_drive.

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
  """e ~ N(0, I), (draws, batch, H, W, C) per layer, drawn per sample so device splits agree."""
  shapes = state_shapes(config)
  sizes = [math.prod(s) for s in shapes]
  draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), (config.homeo_draws, sum(sizes)))
  noise = jnp.swapaxes(jax.vmap(draw)(sample_ids), 0, 1)  # (draws, batch, n)
  parts = jnp.split(noise, np.cumsum(sizes)[:-1], axis=-1)
  return tuple(p.reshape(*p.shape[:2], *shape) for p, shape in zip(parts, shapes))


def homeostatic_grads(config, params, x, s_free, noise):
  """Gradient of lambda * L_homeo (Eq. 12), J = dF/ds at the free fixed point held fixed.
  Returns (L_homeo, gradient)."""
  s_fixed = jax.lax.stop_gradient(s_free)
  noise = jax.tree_util.tree_map(lambda e, s: e.astype(s.dtype), noise, s_fixed)
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
  Metrics: loss, accuracy (and top5_accuracy for > 5 classes), log10_residual of the free
  phase and its steps per sample (free_steps: the batch mean, free_steps_max: what the batch
  ran; below T_free only with tol > 0), dropped_samples, homeo_loss.
  """
  x_drive = input_drive(params, x)
  metrics = {}
  algorithm = estimator(config)
  if algorithm == 'hep_continuous':
    # Eqs. 8-9: no free phase; the time average s_bar stands for the free fixed point.
    s_free, error = continuous_estimate(config, params, x_drive, labels)
    grads, metrics['dropped_samples'] = network_grads(config, params, x, s_free, error)
  else:
    u_free, metrics['log10_residual'], steps = free_relaxation(config, params, x_drive)
    metrics.update(free_steps=jnp.mean(steps), free_steps_max=jnp.max(steps))
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
# Training and evaluation steps (jax.pmap over the devices of every process)
# ======================================================================================

# A connection's forward and backward weights form one group with one learning-rate factor:
#   in-1: forward[0];  l-(l+1): forward[l], backward[l-1];  readout.

def group_names(num_layers):
  """['in-1', '1-2', ..., '(L-1)-out', 'readout'], in the order of config.lr_factors."""
  node = lambda i: 'in' if i == 0 else 'out' if i == num_layers else str(i)
  return [f'{node(l)}-{node(l + 1)}' for l in range(num_layers)] + ['readout']


def layer_groups(params):
  """A tree like params whose leaves are the group names of group_names(L)."""
  unknown = set(params) - {'forward', 'backward', 'readout'}
  if unknown:
    raise ValueError(f'parameters outside the known groups: {sorted(unknown)}')
  names = group_names(len(params['forward']))
  label = lambda tree, name: jax.tree_util.tree_map(lambda _: name, tree)
  labels = {'forward': [label(p, names[l]) for l, p in enumerate(params['forward'])],
            'readout': label(params['readout'], 'readout')}
  if len(params['backward']) >= len(params['forward']):
    raise ValueError(f'{len(params["backward"])} backward entries for '
                     f'{len(params["forward"])} forward layers')
  labels['backward'] = [label(p, names[l + 1]) for l, p in enumerate(params['backward'])]
  return labels


def make_optimizer(config, steps_total):
  """SGD (or Adam) with coupled weight decay, per-group learning rates and cosine decay.

  Per update, for every parameter p of group g (layer_groups), as optax transformations:
    1. g += weight_decay * wd_factor_g * p: coupled L2 added to the gradient BEFORE the
       momentum, on every parameter, biases included (torch SGD's weight_decay);
       wd_factor_g is config.readout_wd_factor for the readout and 1 elsewhere.
    2. 'sgd': momentum buffer m = momentum * m + g (torch SGD, no dampening);
       'adam': Adam's scaling (the decay above is then Adam's coupled L2, as in torch Adam).
    3. times lr_factors_g (the authors' per-layer multipliers; kept for Adam as well)
       and times -learning_rate * cosine(step): optax.cosine_decay_schedule from
       learning_rate to zero over steps_total updates (0 at step steps_total).
  check_config checks that lr_factors has L + 1 entries for the network's L layers.
  """
  names = group_names(len(config.lr_factors) - 1)
  lr_factors = dict(zip(names, config.lr_factors))
  wd_factors = {name: config.readout_wd_factor if name == 'readout' else 1.0
                for name in names}

  per_group = lambda make: optax.partition({n: make(n) for n in names}, layer_groups)
  if config.optimizer == 'sgd':
    scale = optax.trace(decay=config.momentum) if config.momentum else optax.identity()
  else:
    scale = optax.scale_by_adam()
  return optax.chain(
      per_group(lambda n: optax.add_decayed_weights(config.weight_decay * wd_factors[n])),
      scale,
      per_group(lambda n: optax.scale(lr_factors[n])),
      optax.scale_by_learning_rate(optax.cosine_decay_schedule(
          config.learning_rate, decay_steps=steps_total)),
  )


def preprocess(config, images):
  """(images / 255 - mean) / std per channel, with the data set's constants (DATASETS)."""
  info = DATASETS[config.dataset]
  return normalize(images, info['mean'], info['std'])


def make_train_step(config, optimizer):
  """One update. Each device takes its slice of the global batch, augments and normalises it
  (the randomness of every image follows its global index, so a batch split over devices
  and processes is augmented as a whole one would be); gradients are averaged over every
  device (pmean), and so are the metrics."""
  base_key = jax.random.PRNGKey(config.seed + 1)

  def train_step(params, opt_state, step, images, labels):
    local = images.shape[0]
    sample_ids = step * config.batch_size + jax.lax.axis_index('batch') * local + jnp.arange(local)
    key = jax.random.fold_in(base_key, step)
    if config.augment:
      images = augment(jax.random.fold_in(key, 1), images, sample_ids)
    x = preprocess(config, images)
    grads, metrics = compute_grads(config, params, x, labels, jax.random.fold_in(key, 2),
                                   sample_ids)
    # The collectives of the step: one all-reduce of the gradients, and the scalar metrics.
    grads = jax.lax.pmean(grads, 'batch')
    metrics = harness.reduce_metrics(metrics)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, metrics

  return jax.pmap(train_step, axis_name='batch', in_axes=(0, 0, None, 0, 0),
                  donate_argnums=(0, 1))


def make_eval_step(config):
  """Numbers of top-1 and top-5 misclassified test images (free phase + readout), summed
  over devices."""
  def eval_step(params, images, labels, mask):
    x = preprocess(config, images)
    u, _, _ = free_relaxation(config, params, input_drive(params, x))
    logits = readout_logits(params, sigma(u[-1]))
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    rank = jnp.sum(logits > label_logit, axis=-1)  # classes that beat the label
    wrong = jnp.stack([rank >= 1, rank >= 5]).astype(jnp.float32)
    return jax.lax.psum(jnp.sum(wrong * mask, axis=1), 'batch')
  return jax.pmap(eval_step, axis_name='batch')


def evaluate(eval_step, params, split, config, num_devices):
  """{'test_error', 'test_top5_error'}: top-1 and top-5 error in % over the whole split, its
  blocks read by every process (harness.evaluate_counts)."""
  wrong = harness.evaluate_counts(eval_step, params, split, config.eval_batch_size,
                                  num_devices, config.data_threads)
  top1, top5 = 100.0 * wrong / len(split)
  return {'test_error': float(top1), 'test_top5_error': float(top5)}


# ======================================================================================
# Diagnostics (one fixed batch per epoch, off the hot path)
# ======================================================================================

def symmetry_estimate(config, params, s_free, x_drive, key, num_probes):
  """Per-sample Jacobian symmetry ||S|| / (||S|| + ||A||) of J = dF/ds = K - I (Section 3.3),
  without forming J: ||S||_F^2 = E||S e||^2 and ||A||_F^2 = E||A e||^2 for e ~ N(0, I), with
  S e = (J e + J^T e) / 2 and A e = (J e - J^T e) / 2 from one JVP and one VJP per probe.
  Samples do not interact, so the batched JVP/VJP give every sample's own J. Returns (batch,).
  """
  field = lambda s: common.tree_sub(drives(config, params, s, x_drive), s)
  _, jvp = jax.linearize(field, s_free)
  _, vjp = jax.vjp(field, s_free)
  leaves, treedef = jax.tree_util.tree_flatten(s_free)
  keys = jax.random.split(key, len(leaves))

  def probe(i):
    e = treedef.unflatten([jax.random.normal(jax.random.fold_in(k, i), x.shape, x.dtype)
                           for k, x in zip(keys, leaves)])
    je, jte = jvp(e), vjp(e)[0]
    sym = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, je, jte)
    skew = jax.tree_util.tree_map(lambda a, b: (a - b) / 2, je, jte)
    return common.per_sample_sq_norm(sym), common.per_sample_sq_norm(skew)

  sym2, skew2 = jax.lax.map(probe, jnp.arange(num_probes))
  sym, skew = jnp.sqrt(jnp.mean(sym2, 0)), jnp.sqrt(jnp.mean(skew2, 0))
  return sym / (sym + skew)


def make_diagnostics(config):
  """Symmetry, alignment and convergence of the network on one batch (Fig. 4k-l).

  K = dG/ds depends on the state here (the pooling), so the symmetry measure is estimated
  per sample with random probes (symmetry_estimate), never from a dense Jacobian.
  """

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
    algorithm = estimator(config)
    if algorithm == 'hep':
      out['cosine_estimate'] = cos(common.cauchy_estimate(relax, s_free, config.beta,
                                                          config.n_points))
    elif algorithm == 'hep_continuous':
      out['cosine_estimate'] = cos(continuous_estimate(config, params, x_drive, labels)[1])
    key = jax.random.PRNGKey(0)
    noise = homeostatic_noise(config, key, jnp.arange(x.shape[0]))
    out.update(
        symmetry=jnp.mean(symmetry_estimate(config, params, s_free, x_drive, key,
                                            config.diag_symmetry_probes)),
        homeo_loss=common.homeostatic_loss(lambda s, xd: drives(config, params, s, xd), s_free,
                                           x_drive, noise),
        weight_angle=angles(params),
        loss=readout_loss(params, s_free[-1], labels)[0])
    return out

  return diagnostics


# ======================================================================================
# Data
# ======================================================================================
# A split has len() and read(indices) -> (uint8 images (n, 32, 32, 3), int32 labels): in
# memory here (harness.MemorySplit), read from disk for ImageNet (imagenet32_conv.Split).
# Batches are augmented and normalised on the device, inside the jitted step. Normalisation
# (the authors'): per-channel mean, std times 1.5; CIFAR-100 uses CIFAR-10's constants, as
# the authors do; Fashion-MNIST-32 (a check without internet) its own pixel mean and std.

def load_tfds(name, data_dir, url):
  """{'train': (images, labels), 'test': ...} of a TFDS data set, downloaded (from `url`'s
  source) and prepared (array_record) on first use.

  Reads through tfds data sources (random access, decoded with PIL), so reading prepared
  data needs no TensorFlow. Data prepared earlier by tfds.load (tfrecord format) is read
  with TensorFlow instead.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = harness.tfds_builder(name, data_dir, url)
  out = {}
  for split in ('train', 'test'):
    try:
      source = builder.as_data_source(split=split)
      examples = [source[i] for i in range(len(source))]
      out[split] = (np.stack([np.asarray(e['image'], np.uint8) for e in examples]),
                    np.asarray([e['label'] for e in examples], np.int32))
    except NotImplementedError as e:  # prepared as tfrecord: no random access
      if not harness.tensorflow_installed():
        raise harness.ConfigError(f'{name} in {builder.data_dir} is in tfrecord format, which '
                                  'needs TensorFlow to read: pip install tensorflow-cpu, or '
                                  'prepare it again in another tfds_data_dir') from e
      batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
      out[split] = (batch['image'].astype(np.uint8), batch['label'].astype(np.int32))
  return out


def load_cifar(config):
  """CIFAR-10 or -100 (config.dataset) from TFDS in config.tfds_data_dir ('' = TFDS's)."""
  url = DATASETS[config.dataset]['url']
  return harness.memory_data(config, load_tfds(config.dataset, config.tfds_data_dir, url))


def load_fashion_mnist32(config):
  """Fashion-MNIST from the IDX files in config.data_dir ('' = the Debian package's folder),
  padded to 32 x 32 (2 black pixels per side), the grey channel repeated 3 times."""
  data = harness.load_fashion_mnist(config.data_dir or harness.FASHION_MNIST_DIR)
  data = {split: (np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=-1), y)
          for split, (x, y) in data.items()}
  return harness.memory_data(config, data)


_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = tuple(1.5 * s for s in (0.2023, 0.1994, 0.2010))
# The data sets a config can name (config.dataset): load(config) -> harness.Data(train, test),
# the first train_size / test_size examples of each split; url: what TFDS downloads to
# prepare it (checked before it tries). imagenet32_conv.py adds 'imagenet32'.
DATASETS = {
    'cifar10': dict(load=load_cifar, num_classes=10, mean=_CIFAR_MEAN, std=_CIFAR_STD,
                    train_size=50000, test_size=10000,
                    url='https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'),
    'cifar100': dict(load=load_cifar, num_classes=100, mean=_CIFAR_MEAN, std=_CIFAR_STD,
                     train_size=50000, test_size=10000,
                     url='https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz'),
    'fashion_mnist': dict(load=load_fashion_mnist32, num_classes=10, mean=(0.2860,) * 3,
                          std=(1.5 * 0.3530,) * 3, train_size=60000, test_size=10000),
}
CROP_PAD = 2  # pad 32 x 32 to 36 x 36, then take a random 32 x 32 window


def load_data(config):
  """harness.Data(train, test) of the data set config.dataset names (DATASETS)."""
  return DATASETS[config.dataset]['load'](config)


def augment(key, images, sample_ids):
  """Random horizontal flip and random 32 x 32 crop of the image zero-padded to 36 x 36.

  images: (B, H, W, C) uint8 or float, BEFORE normalize. The padding is zeros of the raw
  image (black pixels), so after normalisation the border is -mean / std, not 0. The
  authors' facts only say "pad to 36 x 36, then random 32 x 32 crop"; this is the
  torchvision convention (RandomCrop(32, padding=2) pads the image with 0 before Normalize).
  Each image's randomness is jax.random.fold_in(key, its sample id): pass global ids
  (e.g. step * batch_size + position in the global batch) and a batch split over devices
  and processes is augmented exactly as on one device. For use inside jit; dtype is kept.
  """
  height, width = images.shape[1:3]

  def one(image, sample_id):
    flip_key, crop_key = jax.random.split(jax.random.fold_in(key, sample_id))
    image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
    dy, dx = jax.random.randint(crop_key, (2,), 0, 2 * CROP_PAD + 1)
    padded = jnp.pad(image, ((CROP_PAD, CROP_PAD), (CROP_PAD, CROP_PAD), (0, 0)))
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), (height, width, image.shape[2]))

  return jax.vmap(one)(images, sample_ids)


def normalize(images, mean, std):
  """(x / 255 - mean) / std per channel, float32; x uint8 (or float in 0..255)."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


# ======================================================================================
# Config checks
# ======================================================================================

FIELDS = {  # harness.check_fields: choices, bool, or (kind, low, high, above)
    'layer_updates': ('synchronous', 'sequential'), 'algorithm': ALGORITHMS,
    'optimizer': ('sgd', 'adam'), 'continuous_average': ('hold_end', 'every_step'),
    'free_dtype': FREE_DTYPES, 'tied': bool, 'augment': bool,
    'image_size': (int, 8), 'in_channels': (int, 1), 'seed': (int, 0, 2**31 - 1),
    'alpha': (float, 0, 180), 'tol': (float, 0), 'n_points': (int, 0, 64),
    'beta': (float, None, None, 0), 'homeo_coef': (float, 0),
    'learning_rate': (float, None, None, 0),
    'momentum': (float, 0, 0.999), 'weight_decay': (float, 0), 'readout_wd_factor': (float, 0),
    'num_devices': (int, 0), 'log_every_steps': (int, 0), 'max_log10_residual': (float,),
    'max_train_loss': (float, None, None, 0),
    **{name: (int, 1) for name in (
        't_free', 't_nudge', 'continuous_steps_per_point', 'continuous_periods', 'homeo_draws',
        'batch_size', 'eval_batch_size', 'num_epochs', 'diag_batch_size',
        'diag_symmetry_probes', 'data_threads')},
}
# Fields that may differ when a run is resumed: where the data are, how many devices and
# processes share the batch, how the processes meet, how often to log. Any other change is a
# different run (num_epochs too: the cosine schedule of the learning rate spans the run).
RESUMABLE_FIELDS = ('num_devices', 'log_every_steps', 'data_dir', 'tfds_data_dir',
                    'data_threads', *harness.PROCESS_FIELDS)


def check_config(config, num_local_devices, num_processes=1):
  """Checks every field (one-line ConfigError on bad input) before any data is read or
  anything is compiled; returns the number of local devices to use. Changes nothing."""
  c = config
  harness.check_choice(c, 'network', tuple(NETWORKS))
  harness.check_choice(c, 'dataset', tuple(DATASETS))
  harness.check_fields(c, FIELDS)
  harness.check_int_tuple(c, 'channels', 2)
  info = DATASETS[c.dataset]
  if c.num_classes != info['num_classes']:
    raise harness.ConfigError(f'num_classes={c.num_classes} but {c.dataset} has '
                              f'{info["num_classes"]} classes')
  if (c.image_size, c.in_channels) != (32, 3):
    raise harness.ConfigError(f'{c.dataset} images are 32x32x3, got image_size={c.image_size}, '
                              f'in_channels={c.in_channels}')
  try:
    state_shapes(c)
  except ValueError as e:
    raise harness.ConfigError(str(e)) from e
  factors = c.lr_factors
  if not isinstance(factors, (tuple, list)) or len(factors) != len(c.channels) + 1:
    raise harness.ConfigError(f'lr_factors needs {len(c.channels) + 1} entries (in-1, each pair '
                              f'of layers, readout) for {len(c.channels)} layers, got {factors!r}')
  if not all(isinstance(f, (int, float)) and not isinstance(f, bool) and np.isfinite(f)
             and f > 0 for f in factors):
    raise harness.ConfigError(f'lr_factors must be positive numbers, got {factors!r}')
  harness.check_number(c, 'train_size', int, 0, info['train_size'])
  harness.check_number(c, 'test_size', int, 0, info['test_size'])
  if c.algorithm == 'hep_continuous' and c.n_points < 2:
    raise harness.ConfigError(f'hep_continuous needs n_points >= 2, got {c.n_points}')
  if network(c).check_config:
    network(c).check_config(c)
  return harness.check_devices(c, num_local_devices, num_processes)


def default_workdir(config, script=SCRIPT):
  """runs/<script>/<dataset>_<algorithm and its main settings>-<hash of the run config>."""
  c = config
  algorithm = estimator(c)
  name = {'hep': f'hep{c.n_points}_beta{c.beta:g}', 'hep_continuous':
          f'hepcont{c.n_points}_beta{c.beta:g}'}.get(algorithm, algorithm)
  return harness.default_workdir(script, f'{c.dataset}_{name}_homeo{c.homeo_coef:g}_seed{c.seed}',
                                 c, RESUMABLE_FIELDS)


# ======================================================================================
# Main loop
# ======================================================================================

@harness.releases_workdirs
def train_and_evaluate(config, workdir=None, script=SCRIPT):
  """Trains for config.num_epochs epochs; returns the per-epoch metrics rows. Every check
  passes before anything is written or compiled (several processes stop together on any
  one's problem); every epoch ends with a metrics row and an atomic checkpoint (process 0),
  from which a rerun resumes. imagenet32_conv.py runs this loop on its data set (`script`
  names the default workdir's folder)."""
  process_index, process_count = harness.start_processes(config)
  path = workdir or default_workdir(config, script)
  num_devices, workdir = harness.all_or_none(lambda: (
      check_config(config, jax.local_device_count(), process_count),
      harness.Workdir(path, config, RESUMABLE_FIELDS, writer=process_index == 0)),
                                             harness.config_digest(config, RESUMABLE_FIELDS))
  data = harness.all_or_none(lambda: harness.check_batches(config, load_data(config)))
  if process_count > 1:
    logging.info('process %d of %d, %d of its devices, %d devices in all', process_index,
                 process_count, num_devices, num_devices * process_count)
  harness.all_or_none(workdir.start)  # the lock of process 0: all stop if another run has it
  logging.info('workdir: %s', workdir.path)
  num_train = len(data.train)
  steps_per_epoch = num_train // config.batch_size

  optimizer = make_optimizer(config, config.num_epochs * steps_per_epoch)
  params = network(config).init_params(jax.random.PRNGKey(config.seed), config)
  (params, opt_state), start_epoch = workdir.restore((params, optimizer.init(params)))
  if process_count > 1:  # process 0's checkpoint (or fresh start) for everyone
    start_epoch, params, opt_state = harness.broadcast((np.int32(start_epoch), params, opt_state))
    start_epoch = int(start_epoch)
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
    # This process's share of every global batch, gathered on background threads and
    # sharded over the local devices while the devices compute.
    indices = harness.process_batch_indices(num_train, config.batch_size, config.seed, epoch,
                                            process_index, process_count)
    batches = harness.prefetch(harness.read_batches(data.train, indices, config.data_threads),
                               put=lambda batch: tuple(harness.shard(a, num_devices) for a in batch))
    progress = harness.Progress(epoch, steps_per_epoch, config.batch_size,
                                config.log_every_steps, config.max_train_loss, config.num_epochs)
    for i, (images, labels) in enumerate(batches):
      step = np.int32((epoch - 1) * steps_per_epoch + i)
      params, opt_state, metrics = train_step(params, opt_state, step, images, labels)
      if lockstep:
        jax.block_until_ready(params)
      if not progress.add(metrics):  # the same numbers in every process: all stop
        break
    batches.close()  # stops the prefetch thread if the epoch ended early

    row = progress.row(step=epoch * steps_per_epoch)
    host_params = harness.unreplicate(params)
    harness.stop_if_diverged(workdir, row, host_params, config.max_train_loss)
    row.update(evaluate(eval_step, params, data.test, config, num_devices))
    row.update({'diag/' + k: v for k, v in
                harness.to_floats(diagnostics(host_params, diag_x, diag_y)).items()})
    residual = harness.flag_unconverged(row, config.max_log10_residual)
    if process_count > 1:  # equal in every process: the replicas never drift apart
      row['params_sha1'] = harness.params_digest(host_params)
    workdir.save(epoch, row, (host_params, harness.unreplicate(opt_state)))
    steps = (f' after {row["free_steps"]:.0f} steps (max {row["free_steps_max"]})'
             if 'free_steps' in row else '')
    logging.info(
        'epoch %d  train loss %.4f  acc %.2f%%  test error %.2f%% (top-5 %.2f%%)  '
        'symmetry %.3f  cos %s  angle %s  log10|F| %.1f%s  %.0f img/s  %.1fs', epoch,
        row['train_loss'], 100 * row['train_accuracy'], row['test_error'],
        row['test_top5_error'], row['diag/symmetry'],
        ' '.join(f'{c:.2f}' for c in row['diag/cosine_exact']),
        ' '.join(f'{a:.1f}' for a in row['diag/weight_angle']), residual, steps,
        row['images_per_s'], row['epoch_time_s'])
    if 'params_sha1' in row:  # every process logs its own replica's digest
      logging.info('epoch %d  params %s', epoch, row['params_sha1'])
  return workdir.history


if __name__ == '__main__':
  harness.run_main(SCRIPT, train_and_evaluate, 'configs/cifar10.py')

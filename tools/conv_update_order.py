r"""Synchronous vs sequential (red-black) layer updates of the conv net, and its step timings.

Not a test: the measurement behind the conv scripts' step counts and default layer_updates.

    python tools/conv_update_order.py --part=paper     # App. D.2 shapes, batch 4, float32
    python tools/conv_update_order.py --part=tiny      # 180-unit float64 net vs dense solves
    python tools/conv_update_order.py --part=timing    # ms per step, compute_grads at batch 16
    python tools/conv_update_order.py --part=trained --workdir=runs/sweep/table2mini/tied_homeo0_seed0
        # a trained run's checkpoint on the first --batch test images of its data set
    python tools/conv_update_order.py --part=samples --workdir=... --batch=256 --t_free=1000 --chunk=50
        # how many of those images are still far from their fixed point after t steps

In the MLP, layers talk only to their neighbours, so the synchronous dynamics split into two
independent chains and the alternating order follows one of them exactly (T steps for the
price of T/2). Here the top-down drive into layer l depends on s_l itself (through the
pooling in the backward module), so that identity does not hold; whether the red-black order
still converges in fewer steps has to be measured.

A step of either order updates every layer once (the same work). For each order the script
records, every `--chunk` steps of the free phase from zeros:
  * `update`: log10 of the largest per-sample norm of the last update u_{t+1} - u_t (all
    layers), what common.fixed_point reports;
  * `field`: log10 of the largest per-sample ||G(sigma(u)) - u||, the synchronous vector field
    at the current state (the same yardstick for both orders);
then hEP's exact d_beta s* (forward mode through T_nudge steps from that order's own free
point), compared with a reference (synchronous, long relaxations; on the tiny net the dense
solve (I - DK)^{-1} D g) by cosine and relative error.

Inputs are synthetic (no CIFAR on this machine): smooth random images (Gaussian noise
low-pass filtered with a 5x5 box, per-channel standardised, divided by 1.5 like the authors'
normalisation). "trained-like" multiplies every forward and backward kernel by 1.5, which
makes the dynamics slower to contract, as training does.
"""
import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_collections
import numpy as np

import cifar_conv as cc
import common
import harness
from configs import cifar10


def paper_config(**kw):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size, c.in_channels, c.num_classes = 32, 3, 10
  c.channels = (128, 256, 512, 512)
  c.alpha, c.tied = 0.0, False
  c.network, c.layer_updates = 'conv', 'synchronous'
  c.free_dtype = 'float32'
  c.t_free, c.t_nudge, c.tol = 250, 40, 0.0
  c.algorithm, c.n_points, c.beta = 'hep_exact', 0, 1.0
  c.continuous_steps_per_point, c.continuous_periods = 60, 5
  c.homeo_coef, c.homeo_draws = 15.0, 5
  c.batch_size = 16
  c.update(kw)
  return c


def images(seed, batch, size=32, channels=3, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, size + 4, size + 4, channels))
  x = sum(x[:, i:i + size, j:j + size] for i in range(5) for j in range(5))  # 5x5 box blur
  x = (x - x.mean(axis=(0, 1, 2))) / x.std(axis=(0, 1, 2)) / 1.5
  return jnp.asarray(x, dtype)


def scaled(params, scale):
  return {**params,
          'forward': [dict(p, w=scale * p['w']) for p in params['forward']],
          'backward': [dict(p, w=scale * p['w']) for p in params['backward']]}


def log10_fields(config, params, u, x_drive):
  """Per sample, log10 of the synchronous field ||G(sigma(u)) - u||."""
  f = common.tree_sub(cc.drives(config, params, cc.activate(u), x_drive), u)
  return jnp.log10(jnp.sqrt(common.per_sample_sq_norm(f)) + 1e-30)


def field_norm(config, params, u, x_drive):
  return jnp.max(log10_fields(config, params, u, x_drive))


def free_trajectory(config, params, x_drive, total, chunk):
  """[(steps, log10 last update, log10 field)] every `chunk` steps from zeros; final u."""
  step = cc.make_step(config, params, x_drive)
  advance = jax.jit(lambda u: common.fixed_point(step, u, chunk))
  measure = jax.jit(lambda u: field_norm(config, params, u, x_drive))
  u = cc.zeros_state(config, x_drive.shape[0], x_drive.dtype)
  rows = []
  for t in range(chunk, total + 1, chunk):
    u, update, _ = advance(u)
    rows.append((t, float(update), float(measure(u))))
  return rows, u


def synchronous_steps(config, steps):
  """The T of a config that runs `steps` steps of its own order: this tool compares the
  orders step for step, while a config's T counts synchronous steps (cc.steps_for)."""
  return steps * len(cc.update_groups(config) or [None])


def exact_dbeta(config, params, x_drive, labels, u_free, t_nudge):
  config = ml_collections.ConfigDict(config.to_dict())
  config.t_nudge = synchronous_steps(config, t_nudge)
  return jax.jit(lambda u: common.exact_dbeta(
      cc.nudged_relaxation(config, params, x_drive, labels, u)))(u_free)


def compare(estimate, ref):
  """(cosine, relative error) over all layers, worst sample; and per-layer cosines (mean)."""
  cos = common.per_sample_cosine(estimate, ref)
  diff = common.tree_sub(estimate, ref)
  rel = jnp.sqrt(common.per_sample_sq_norm(diff) / common.per_sample_sq_norm(ref))
  per_layer = [float(jnp.mean(common.per_sample_cosine((a,), (b,)))) for a, b in zip(estimate, ref)]
  return float(jnp.min(cos)), float(jnp.max(rel)), per_layer


def with_order(config, order):
  c = ml_collections.ConfigDict(config.to_dict())
  c.layer_updates = order
  return c


def run_orders(config, params, x, labels, t_free, t_nudges, chunk, ref_free, ref_nudge, ref=None):
  x_drive = cc.input_drive(params, x)
  if ref is None:
    t0 = time.time()
    _, u_ref = free_trajectory(with_order(config, 'synchronous'), params, x_drive, ref_free,
                               ref_free)
    ref = exact_dbeta(with_order(config, 'synchronous'), params, x_drive, labels, u_ref,
                      ref_nudge)
    print(f'  reference: synchronous, T_free {ref_free}, T_nudge {ref_nudge} '
          f'({time.time() - t0:.0f} s)', flush=True)
  table = {}
  for order in ('synchronous', 'sequential'):
    c = with_order(config, order)
    rows, u = free_trajectory(c, params, x_drive, t_free, chunk)
    table[order] = rows
    for t_nudge in t_nudges:
      e = exact_dbeta(c, params, x_drive, labels, u, t_nudge)
      cos, rel, per_layer = compare(e, ref)
      print(f'  {order:11s} T_free {t_free:4d} T_nudge {t_nudge:4d}: d_beta s* vs reference: '
            f'min cosine {cos:.6f}, max rel. error {rel:.2e}, per-layer mean cosine '
            + ' '.join(f'{v:.4f}' for v in per_layer), flush=True)
  print(f'  free phase from zeros: log10 residuals (max over samples) vs steps '
        f'(a step of either order updates every layer once)')
  print(f'  {"steps":>6s} | {"sync update":>11s} {"sync field":>10s} | '
        f'{"seq update":>10s} {"seq field":>9s}')
  for a, b in zip(table['synchronous'], table['sequential']):
    print(f'  {a[0]:6d} | {a[1]:11.2f} {a[2]:10.2f} | {b[1]:10.2f} {b[2]:9.2f}')
  sys.stdout.flush()
  return ref


def part_paper(args):
  config = paper_config()
  base = cc.init_params(jax.random.PRNGKey(0), config)
  x = images(1, args.batch)
  labels = jnp.arange(args.batch) % 10
  for scale in args.scales:
    name = 'LeCun init' if scale == 1 else f'trained-like (kernels x{scale:g})'
    print(f'\n== paper shapes, batch {args.batch}, float32, {name}, alpha 0 ==', flush=True)
    run_orders(config, scaled(base, scale), x, labels, args.t_free, args.t_nudges, args.chunk,
               args.ref_free, args.ref_nudge)


def load_trained(args):
  """(config, params, x, labels, epoch) of a workdir's checkpoint.npz (read without executing
  anything: its config is JSON) and the first --batch test images of its own data set."""
  ckpt = harness.read_checkpoint(os.path.join(args.workdir, 'checkpoint.npz'))
  if ckpt is None:
    raise SystemExit(f'no checkpoint.npz in {args.workdir}')
  config = cifar10.get_config()  # the fields a checkpoint leaves out (data_dir, ...)
  config.update(ckpt['config'])
  config.data_dir = args.data_dir
  config.test_size, config.free_dtype = args.batch, 'float32'
  params = cc.init_params(jax.random.PRNGKey(0), config)
  params, _ = harness.restore_checkpoint(ckpt, (params, cc.make_optimizer(config, 1).init(params)))
  data = cc.load_data(config)
  x = cc.preprocess(config, jnp.asarray(data.test.images))
  return config, params, x, jnp.asarray(data.test.labels), ckpt['epoch']


def part_trained(args):
  """The free phase of a trained network on the first --batch test images, both orders."""
  config, params, x, labels, epoch = load_trained(args)
  print(f'\n== {args.workdir} after epoch {epoch}: {config.algorithm}, tied '
        f'{config.tied}, lambda {config.homeo_coef:g}, {args.batch} test images ==', flush=True)
  run_orders(config, params, x, labels, args.t_free, args.t_nudges, args.chunk, args.ref_free,
             args.ref_nudge)


def part_samples(args):
  """How many samples of a trained network's free phase (its own layer order, from zeros)
  are still far from their fixed point after t steps, t = --chunk, 2 --chunk, ..., --t_free:
  the spread behind the largest residual that the training rows report."""
  config, params, x, _, epoch = load_trained(args)
  x_drive = cc.input_drive(params, x)
  advance = jax.jit(lambda u: common.fixed_point(cc.make_step(config, params, x_drive), u,
                                                 args.chunk))
  measure = jax.jit(lambda u: log10_fields(config, params, u, x_drive))
  print(f'\n== {args.workdir} after epoch {epoch}: {config.algorithm}, lambda '
        f'{config.homeo_coef:g}, {config.layer_updates}, {args.batch} test images ==')
  print(f'  samples (of {args.batch}) with log10 ||F|| above -4, -3, -2; median and max of it')
  print(f'  {"steps":>6s} |   -4   -3   -2 | median |    max')
  u = cc.zeros_state(config, args.batch, x_drive.dtype)
  for t in range(args.chunk, args.t_free + 1, args.chunk):
    u = advance(u)[0]
    r = np.asarray(measure(u))
    print(f'  {t:6d} | {np.sum(r > -4):4d} {np.sum(r > -3):4d} {np.sum(r > -2):4d} | '
          f'{np.median(r):6.2f} | {r.max():6.2f}', flush=True)


def tiny_net(seed=0, batch=3):
  """(config, params, x, labels) of a tiny float64 net: 16x16x2 images, channels (2, 3, 4),
  alpha 60, LeCun kernels, biases N(0, 0.3^2)."""
  config = paper_config(image_size=16, in_channels=2, channels=(2, 3, 4), alpha=60.0,
                        t_free=100, t_nudge=100, beta=0.05)
  params = cc.init_params(jax.random.PRNGKey(seed), config)
  rng = np.random.default_rng(seed)
  params['forward'] = [dict(p, b=jnp.asarray(0.3 * rng.standard_normal(p['b'].shape)))
                       for p in params['forward']]
  x = jnp.asarray(rng.standard_normal((batch, 16, 16, 2)))
  return config, params, x, jnp.asarray((np.arange(batch) * 3) % 10)


def dense_dbeta_s(config, params, x_drive, labels, u, i):
  """d_beta s* = (I - D K)^{-1} D g of sample i by a dense solve, and the spectral radius of
  D K (K = dG/ds, D = diag sigma'(u*), g = dL/ds on the output layer)."""
  u_i = tuple(a[i:i + 1] for a in u)
  s_i = cc.activate(u_i)
  k = np.asarray(common.flat_jacobian(lambda s: cc.drives(config, params, s, x_drive[i:i + 1]),
                                      s_i))
  ones = jax.tree_util.tree_map(jnp.ones_like, u_i)
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(a)) for a in tree])
  d = flat(jax.jvp(cc.activate, (u_i,), (ones,))[1])
  g = flat((*(jnp.zeros_like(a) for a in s_i[:-1]),
            cc.loss_grad_s(params, s_i[-1], labels[i:i + 1])))
  dk = d[:, None] * k
  return np.linalg.solve(np.eye(len(d)) - dk, d * g), np.abs(np.linalg.eigvals(dk)).max()


def part_tiny(args):
  del args
  jax.config.update('jax_enable_x64', True)
  for scale in (1.0, 1.5):
    config, params, x, labels = tiny_net()
    params = scaled(params, scale)
    x_drive = cc.input_drive(params, x)
    _, u = free_trajectory(config, params, x_drive, 3000, 3000)
    s = cc.activate(u)
    refs = []
    for i in range(x.shape[0]):
      ref_i, rho = dense_dbeta_s(config, params, x_drive, labels, u, i)
      refs.append(ref_i)
      print(f'  (sample {i}: spectral radius of DK {rho:.3f})')
    sizes = np.cumsum([math.prod(a.shape[1:]) for a in s])[:-1]
    ref = tuple(part.reshape(a.shape) for part, a in zip(np.split(np.stack(refs), sizes, 1), s))
    print(f'\n== tiny float64 net (16x16x2, channels (2,3,4)), kernels x{scale}, alpha 60; '
          'reference: dense solve ==', flush=True)
    run_orders(config, params, x, labels, 200, (10, 20, 40, 80), 10, 0, 0, ref=ref)


def timed(fn, *args, repeats=1):
  """(compile seconds, fastest of `repeats` runs in seconds) of jax.jit(fn)(*args)."""
  t0 = time.time()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.time() - t0
  times = []
  for _ in range(repeats):
    t0 = time.time()
    jax.block_until_ready(compiled(*args))
    times.append(time.time() - t0)
  return compile_s, min(times, default=None)


def part_timing(args):
  print(f'backend {jax.default_backend()}, {os.cpu_count()} cpus, load {os.getloadavg()}')
  b = args.batch
  config = paper_config(batch_size=b, t_free=args.t_free, t_nudge=args.t_nudge,
                        homeo_coef=args.homeo)
  params = cc.init_params(jax.random.PRNGKey(0), config)
  x = images(1, b)
  labels = jnp.arange(b) % 10
  key, ids = jax.random.PRNGKey(0), jnp.arange(b)
  x_drive = cc.input_drive(params, x)

  for order in ('synchronous', 'sequential'):
    c = with_order(config, order)
    for t, repeats in ((10, 0), (args.t_free, 0), (20, 2)):
      c.t_free = synchronous_steps(c, t)
      compile_s, run_s = timed(lambda p, xd: cc.free_relaxation(c, p, xd), params, x_drive,
                               repeats=repeats)
      line = f'free relaxation {order:11s} batch {b} T {t:3d}: compile {compile_s:.1f} s'
      if repeats:
        line += f', {1e3 * run_s / t:.0f} ms per step'
      print(line, flush=True)

  # Everything is passed as an argument (closed-over arrays would be constant-folded).
  c = with_order(config, 'synchronous')
  u_free = jax.jit(lambda p, xd: cc.free_relaxation(c, p, xd))(params, x_drive)[0]
  s_free = cc.activate(u_free)
  noise = cc.homeostatic_noise(c, key, ids)
  parts = {
      f'nudged phase, exact d_beta s* (T_nudge {c.t_nudge})': (lambda p, x, y, u: (
          common.exact_dbeta(cc.nudged_relaxation(c, p, cc.input_drive(p, x), y, u))),
          (params, x, labels, u_free)),
      f'homeostatic_grads ({c.homeo_draws} draws)': (lambda p, x, s, e: (
          cc.homeostatic_grads(c, p, x, s, e)), (params, x, s_free, noise)),
      'network_grads': (lambda p, x, s: cc.network_grads(c, p, x, s, s), (params, x, s_free)),
  }
  for name, (fn, fn_args) in parts.items():
    compile_s, run_s = timed(fn, *fn_args)
    print(f'{name}: {run_s:.1f} s, compile {compile_s:.1f} s '
          f'(load {os.getloadavg()[0]:.1f})', flush=True)
  for algorithm in args.algorithms:
    for t_free, t_nudge, repeats in ((10, 4, 0), (args.t_free, args.t_nudge, 1)):
      c = paper_config(batch_size=b, t_free=t_free, t_nudge=t_nudge, homeo_coef=args.homeo,
                       algorithm=algorithm)
      fn = lambda p, x, y, k, i: cc.compute_grads(c, p, x, y, k, i)
      compile_s, run_s = timed(fn, params, x, labels, key, ids, repeats=repeats)
      line = (f'compute_grads {algorithm} batch {b} T_free {t_free} T_nudge {t_nudge} '
              f'homeo {c.homeo_coef:g}: compile {compile_s:.1f} s')
      if repeats:
        line += f', {run_s:.1f} s per step'
      print(line + f' (load {os.getloadavg()[0]:.1f})', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--part', choices=('paper', 'tiny', 'timing', 'trained', 'samples'),
                      required=True)
  parser.add_argument('--workdir', default='',
                      help='trained, samples parts: the run whose checkpoint')
  parser.add_argument('--data_dir', default='',
                      help="trained, samples parts, Fashion-MNIST-32: the IDX folder ('' = the "
                      'Debian one)')
  parser.add_argument('--batch', type=int, default=None)
  parser.add_argument('--t_free', type=int, default=250)
  parser.add_argument('--t_nudge', type=int, default=40)
  parser.add_argument('--chunk', type=int, default=25)
  parser.add_argument('--ref_free', type=int, default=800)
  parser.add_argument('--ref_nudge', type=int, default=200)
  parser.add_argument('--homeo', type=float, default=15.0)
  parser.add_argument('--scales', type=float, nargs='+', default=[1.0, 1.5],
                      help='paper part: kernel scale factors of the instances')
  parser.add_argument('--algorithms', nargs='+', default=['hep_exact'],
                      help='timing part: estimators whose compute_grads is timed')
  parser.add_argument('--t_nudges', type=int, nargs='+', default=[20, 40],
                      help='paper part: T_nudge values compared with the reference')
  args = parser.parse_args()
  if args.batch is None:
    args.batch = 4 if args.part == 'paper' else 16
  {'paper': part_paper, 'tiny': part_tiny, 'timing': part_timing,
   'trained': part_trained, 'samples': part_samples}[args.part](args)


if __name__ == '__main__':
  main()

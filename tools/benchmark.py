r"""Speed and memory of the Fashion-MNIST MLP train step, for every gradient estimator.

    python tools/benchmark.py                      # Table 1 settings, one device
    python tools/benchmark.py --host_devices=2     # also split each batch over 2 CPU devices
    python tools/benchmark.py --only=hep2 --t_free=600

Each measurement runs in a fresh subprocess (clean compile caches and peak memory). For each
estimator it prints: compile seconds (first call minus a steady step), median ms per train
step, samples/s, the matmul GFLOP of one step (counted exactly from the jaxpr, loops
multiplied by their trip counts), the achieved GFLOP/s and its ratio to a large matmul
timed in the same process, and the process's peak resident memory. `--train_run` adds the
peak memory and time of a short real training run of fmnist_mlp.py (one epoch on a slice
of the data, with evaluation on the full test set and the diagnostics).

    python tools/benchmark.py --conv              # the convnet of cifar_conv.py instead
    python tools/benchmark.py --conv --only=reduced_hep_exact --steps=5

`--conv` times cifar_conv.py's train step (augment, free phase, estimator, homeostasis,
optimizer; random CIFAR-shaped images) at the paper's shapes (channels 128/256/512/512,
T 250/40, batch 16) and at the reduced size CPU experiments afford (16/32/32/32, T 60/15,
batch 32), for hEP exact, N = 2 (|beta| 1) and BPTT, all with lambda 15: compile seconds,
ms per train step, images/s, the train step's GFLOP and GFLOP/s; then the free relaxation
alone (jitted free_relaxation): ms per free step, GFLOP per free step, GFLOP/s and its
ratio to the matmul rate; and the peak resident memory. FLOPs are counted exactly from the
jaxpr (matmuls and convolutions, loop bodies times their trip counts). The matmul rate is
the best of 2048^3 float32 products timed in the same process (for --conv alternately with
the relaxation), the machine's peak as XLA reaches it.
"""
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app
from absl import flags

_ONLY = flags.DEFINE_list('only', [], 'Names of the settings to run (default: all).')
_STEPS = flags.DEFINE_integer('steps', 0, 'Timed steps per setting (0: 40, with --conv 2).')
_T_FREE = flags.DEFINE_integer('t_free', 150, 'Free steps.')
_HOST_DEVICES = flags.DEFINE_list('host_devices', ['1'],
                                  'CPU device counts to run with (XLA host platform).')
_TRAIN_RUN = flags.DEFINE_integer('train_run', 0, 'Training images for a real-data run '
                                  'measuring peak memory (0 = skip).')
_WORKER = flags.DEFINE_string('worker', '', 'Internal: run one measurement (JSON).')
_CONV = flags.DEFINE_bool('conv', False, 'Benchmark the convnet (cifar_conv.py) instead.')

SETTINGS = {  # name: config overrides (Table 1 settings otherwise)
    'hep1': dict(algorithm='hep', n_points=1, beta=0.05),
    'hep2': dict(algorithm='hep', n_points=2, beta=0.05),
    'hep4': dict(algorithm='hep', n_points=4, beta=0.5),
    'hep6': dict(algorithm='hep', n_points=6, beta=0.5),
    'hep_exact': dict(algorithm='hep_exact'),
    'hep_continuous': dict(algorithm='hep_continuous', n_points=4, beta=0.5),
    'rbp': dict(algorithm='rbp'),
    'bptt': dict(algorithm='bptt'),
    'hep2_homeo': dict(algorithm='hep', n_points=2, beta=0.05, homeo_coef=1.0),
    'hep2_sync': dict(algorithm='hep', n_points=2, beta=0.05, layer_updates='synchronous'),
}

CONV_SIZES = {  # name: config overrides of configs/cifar10.py
    'paper': dict(channels=(128, 256, 512, 512), t_free=250, t_nudge=40, batch_size=16),
    'reduced': dict(channels=(16, 32, 32, 32), t_free=60, t_nudge=15, batch_size=32),
}
CONV_ALGORITHMS = {
    'hep_exact': dict(algorithm='hep_exact'),
    'hep2': dict(algorithm='hep', n_points=2, beta=1.0),
    'bptt': dict(algorithm='bptt'),
}
CONV_SETTINGS = {f'{size}_{name}': {**CONV_SIZES[size], **CONV_ALGORITHMS[name]}
                 for size in CONV_SIZES for name in CONV_ALGORITHMS}


def dot_flops(jaxpr, convs=False):
  """FLOPs of all dot_generals (and with convs=True all convolutions) in a (closed) jaxpr,
  loop bodies times their trip counts (fori_loop(0, T) is a scan of length T)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (lhs_contract, _), (lhs_batch, _) = eqn.params['dimension_numbers']
      lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
      k = np.prod([lhs.shape[d] for d in lhs_contract])
      factor = 4 if np.issubdtype(lhs.dtype, np.complexfloating) else 1
      total += 2 * factor * int(np.prod(out.shape)) * int(k)
    elif name == 'conv_general_dilated' and convs:
      rhs, out = eqn.invars[1].aval, eqn.outvars[0].aval
      spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, spatial...)
      per_output = np.prod([rhs.shape[d] for d in spec[1:]])  # in channels x kernel
      total += 2 * int(np.prod(out.shape)) * int(per_output)
    multiplier = eqn.params.get('length', 1) if name == 'scan' else 1
    for sub in _subjaxprs(eqn):
      total += multiplier * dot_flops(sub, convs)
  return total


def _subjaxprs(eqn):
  for value in eqn.params.values():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if hasattr(v, 'eqns'):
        yield v
      elif hasattr(v, 'jaxpr') and hasattr(v.jaxpr, 'eqns'):
        yield v.jaxpr


def worker(spec):
  """One measurement in this process; prints a JSON line."""
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={spec["devices"]}')
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import fmnist_mlp as mlp_config  # pylint: disable=g-import-not-at-top
  import fmnist_mlp  # pylint: disable=g-import-not-at-top
  import harness  # pylint: disable=g-import-not-at-top

  config = mlp_config.get_config()
  config.update(spec['overrides'])
  config.num_devices = spec['devices']
  num_devices = fmnist_mlp.check_config(config, jax.local_device_count())

  if spec.get('train_run'):
    config.train_size, config.num_epochs, config.log_every_steps = spec['train_run'], 1, 0
    t0 = time.perf_counter()
    fmnist_mlp.train_and_evaluate(config, spec['workdir'])
    print(json.dumps({'train_run_s': time.perf_counter() - t0,
                      'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return

  rng = np.random.default_rng(0)
  batch = config.batch_size
  images = rng.integers(0, 256, (batch, 784), dtype=np.uint8)
  labels = rng.integers(0, 10, batch).astype(np.int32)
  params = fmnist_mlp.init_params(jax.random.PRNGKey(0), config)
  optimizer = fmnist_mlp.make_optimizer(config, None)
  opt_state = optimizer.init(params)

  per_device = lambda p, x, y: fmnist_mlp.compute_grads(
      config, p, x.astype(jnp.float32) / 255, y, jax.random.PRNGKey(0),
      jnp.arange(x.shape[0]))
  flops = dot_flops(jax.make_jaxpr(per_device)(params, images, labels).jaxpr)

  train_step = fmnist_mlp.make_train_step(config, optimizer)
  params, opt_state = harness.replicate((params, opt_state), num_devices)
  shard = lambda a: a.reshape(num_devices, -1, *a.shape[1:])
  xs, ys = jax.device_put(shard(images)), jax.device_put(shard(labels))

  t0 = time.perf_counter()
  params, opt_state, _ = train_step(params, opt_state, 0, xs, ys)
  jax.block_until_ready(params)
  first = time.perf_counter() - t0
  times = []
  for i in range(spec['steps']):
    t0 = time.perf_counter()
    params, opt_state, _ = train_step(params, opt_state, i + 1, xs, ys)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))

  peak_gflops = matmul_gflops()

  print(json.dumps({
      'compile_s': first - step_s, 'ms_per_step': 1e3 * step_s,
      'samples_per_s': batch / step_s, 'gflop_per_step': flops / 1e9,
      'gflops': flops / step_s / 1e9, 'matmul_gflops': peak_gflops,
      'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def matmul_gflops(repeats=10):
  """The best of `repeats` 2048^3 float32 matmuls, GFLOP/s: the peak as XLA reaches it."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jnp.ones((2048, 2048), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * 2048 ** 3 / best / 1e9


def conv_worker(spec):
  """One convnet measurement in this process; prints a JSON line."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import cifar10  # pylint: disable=g-import-not-at-top
  import cifar_conv  # pylint: disable=g-import-not-at-top
  import harness  # pylint: disable=g-import-not-at-top

  config = cifar10.get_config()
  config.update(spec['overrides'])
  devices = cifar_conv.check_config(config, jax.local_device_count())
  params = cifar_conv.init_params(jax.random.PRNGKey(0), config)
  optimizer = cifar_conv.make_optimizer(config, 1000)
  rng = np.random.default_rng(0)
  b = config.batch_size
  images = rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, config.num_classes, b).astype(np.int32)

  x = cifar_conv.preprocess(config, images)
  per_step = lambda p: cifar_conv.compute_grads(config, p, x, labels, jax.random.PRNGKey(0),
                                                jnp.arange(b))
  train_flops = dot_flops(jax.make_jaxpr(per_step)(params).jaxpr, convs=True)
  relax = jax.jit(lambda p, d: cifar_conv.free_relaxation(config, p, d))
  x_drive = jax.jit(cifar_conv.input_drive)(params, x)
  free_flops = dot_flops(jax.make_jaxpr(relax)(params, x_drive).jaxpr, convs=True) / config.t_free

  step_fn = cifar_conv.make_train_step(config, optimizer)
  state = harness.replicate((params, optimizer.init(params)), devices)
  xs, ys = (a.reshape(devices, -1, *a.shape[1:]) for a in (images, labels))
  t0 = time.perf_counter()
  state = step_fn(*state, np.int32(0), xs, ys)[:2]
  jax.block_until_ready(state)
  first = time.perf_counter() - t0
  times = []
  for i in range(spec['steps']):
    t0 = time.perf_counter()
    state = step_fn(*state, np.int32(i + 1), xs, ys)[:2]
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))

  # The relaxation and the matmul alternately, the best of each: a shared (virtual) machine's
  # speed drifts, and the ratio should compare the two under the same conditions.
  jax.block_until_ready(relax(params, x_drive))
  free_s, peak = float('inf'), 0.0
  for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(relax(params, x_drive))
    free_s = min(free_s, (time.perf_counter() - t0) / config.t_free)
    peak = max(peak, matmul_gflops(repeats=3))
  print(json.dumps({
      'compile_s': first - step_s, 'ms_per_step': 1e3 * step_s, 'images_per_s': b / step_s,
      'gflop_per_step': train_flops / 1e9, 'gflops': train_flops / step_s / 1e9,
      'ms_per_free_step': 1e3 * free_s, 'gflop_per_free_step': free_flops / 1e9,
      'free_gflops': free_flops / free_s / 1e9, 'matmul_gflops': peak,
      'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def conv_main(names):
  """The --conv table."""
  print(f'cifar_conv.py train step, lambda 15, float32, one device ({os.cpu_count()} CPU cores)')
  header = ('setting', 'compile s', 'ms/step', 'img/s', 'GFLOP/step', 'GFLOP/s',
            'ms/free step', 'GFLOP/free', 'free GFLOP/s', 'of matmul', 'peak MB')
  print('{:<18} {:>9} {:>9} {:>6} {:>10} {:>7} {:>12} {:>10} {:>12} {:>9} {:>7}'.format(
      *header))
  for name in names:
    r = run_worker({'conv': True, 'overrides': CONV_SETTINGS[name], 'steps': _STEPS.value or 2})
    print(f'{name:<18} {r["compile_s"]:>9.1f} {r["ms_per_step"]:>9.0f} '
          f'{r["images_per_s"]:>6.1f} {r["gflop_per_step"]:>10.1f} {r["gflops"]:>7.1f} '
          f'{r["ms_per_free_step"]:>12.2f} {r["gflop_per_free_step"]:>10.3f} '
          f'{r["free_gflops"]:>12.1f} {r["free_gflops"] / r["matmul_gflops"]:>9.0%} '
          f'{r["peak_rss_mb"]:>7.0f}   (matmul {r["matmul_gflops"]:.0f} GFLOP/s)', flush=True)


def run_worker(spec):
  out = subprocess.run([sys.executable, __file__, '--worker=' + json.dumps(spec)],
                       capture_output=True, text=True, check=False,
                       cwd=ROOT)
  lines = [l for l in out.stdout.splitlines() if l.startswith('{')]
  if out.returncode or not lines:
    raise RuntimeError(f'benchmark worker failed for {spec}:\n{out.stderr[-3000:]}')
  return json.loads(lines[-1])


def main(argv):
  del argv
  if _WORKER.value:
    spec = json.loads(_WORKER.value)
    conv_worker(spec) if spec.get('conv') else worker(spec)  # pylint: disable=expression-not-assigned
    return
  known = CONV_SETTINGS if _CONV.value else SETTINGS
  names = _ONLY.value or list(known)
  unknown = set(names) - set(known)
  if unknown:
    sys.exit(f'tools/benchmark.py: error: unknown settings {sorted(unknown)}; known: {list(known)}')
  if _CONV.value:
    conv_main(names)
    return
  print(f'Fashion-MNIST MLP train step, batch 50, T_free {_T_FREE.value}, T_nudge 20 '
        f'({os.cpu_count()} CPU cores)')
  header = ('setting', 'devices', 'compile s', 'ms/step', 'samples/s', 'GFLOP/step',
            'GFLOP/s', 'of matmul', 'peak MB')
  print('{:<15} {:>7} {:>9} {:>8} {:>9} {:>10} {:>8} {:>9} {:>8}'.format(*header))
  for devices in map(int, _HOST_DEVICES.value):
    for name in names:
      overrides = dict(SETTINGS[name], t_free=_T_FREE.value)
      r = run_worker({'overrides': overrides, 'devices': devices, 'steps': _STEPS.value or 40})
      print(f'{name:<15} {devices:>7} {r["compile_s"]:>9.2f} {r["ms_per_step"]:>8.1f} '
            f'{r["samples_per_s"]:>9.0f} {r["gflop_per_step"]:>10.3f} {r["gflops"]:>8.1f} '
            f'{r["gflops"] / r["matmul_gflops"]:>8.0%} {r["peak_rss_mb"]:>8.0f}', flush=True)
  if _TRAIN_RUN.value:
    import tempfile  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as workdir:
      r = run_worker({'overrides': dict(SETTINGS['hep2']), 'devices': 1,
                      'train_run': _TRAIN_RUN.value, 'workdir': workdir})
    print(f'training run (hep2, 1 epoch on {_TRAIN_RUN.value} images + full test set): '
          f'{r["train_run_s"]:.1f} s, peak memory {r["peak_rss_mb"]:.0f} MB')


if __name__ == '__main__':
  app.run(main)

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
_STEPS = flags.DEFINE_integer('steps', 40, 'Timed steps per setting.')
_T_FREE = flags.DEFINE_integer('t_free', 150, 'Free steps.')
_HOST_DEVICES = flags.DEFINE_list('host_devices', ['1'],
                                  'CPU device counts to run with (XLA host platform).')
_TRAIN_RUN = flags.DEFINE_integer('train_run', 0, 'Training images for a real-data run '
                                  'measuring peak memory (0 = skip).')
_WORKER = flags.DEFINE_string('worker', '', 'Internal: run one measurement (JSON).')

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


def dot_flops(jaxpr):
  """FLOPs of all dot_generals in a (closed) jaxpr, loop bodies times their trip counts."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (lhs_contract, _), (lhs_batch, _) = eqn.params['dimension_numbers']
      lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
      k = np.prod([lhs.shape[d] for d in lhs_contract])
      factor = 4 if np.issubdtype(lhs.dtype, np.complexfloating) else 1
      total += 2 * factor * int(np.prod(out.shape)) * int(k)
    multiplier = eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1
    for sub in _subjaxprs(eqn):
      total += multiplier * dot_flops(sub)
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
  optimizer = fmnist_mlp.make_optimizer(config)
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

  a = jnp.ones((2048, 2048), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(5):
    out = matmul(a)
  out.block_until_ready()
  peak_gflops = 5 * 2 * 2048 ** 3 / (time.perf_counter() - t0) / 1e9

  print(json.dumps({
      'compile_s': first - step_s, 'ms_per_step': 1e3 * step_s,
      'samples_per_s': batch / step_s, 'gflop_per_step': flops / 1e9,
      'gflops': flops / step_s / 1e9, 'matmul_gflops': peak_gflops,
      'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


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
    worker(json.loads(_WORKER.value))
    return
  names = _ONLY.value or list(SETTINGS)
  unknown = set(names) - set(SETTINGS)
  if unknown:
    sys.exit(f'tools/benchmark.py: error: unknown settings {sorted(unknown)}; known: {list(SETTINGS)}')
  print(f'Fashion-MNIST MLP train step, batch 50, T_free {_T_FREE.value}, T_nudge 20 '
        f'({os.cpu_count()} CPU cores)')
  header = ('setting', 'devices', 'compile s', 'ms/step', 'samples/s', 'GFLOP/step',
            'GFLOP/s', 'of matmul', 'peak MB')
  print('{:<15} {:>7} {:>9} {:>8} {:>9} {:>10} {:>8} {:>9} {:>8}'.format(*header))
  for devices in map(int, _HOST_DEVICES.value):
    for name in names:
      overrides = dict(SETTINGS[name], t_free=_T_FREE.value)
      r = run_worker({'overrides': overrides, 'devices': devices, 'steps': _STEPS.value})
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

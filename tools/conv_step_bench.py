r"""Speed of one train step of the convnet scripts (cifar_conv.py, imagenet32_conv.py).

    python tools/conv_step_bench.py --script=imagenet32_conv --channels=16,32,32,32 \
        --t_free=60 --t_nudge=15 --batch_size=32
    python tools/conv_step_bench.py --script=cifar_conv --algorithm=hep --n_points=2

Builds the scripts' train step (cifar_conv.make_train_step, which imagenet32_conv.py runs
too, with the script's config and data set constants: augment, normalize, free phase,
estimator, homeostasis, optimizer, pmean over the local devices) on random uint8 images and
prints the compile time, the median step time, images/s and the process's peak memory;
then the free relaxation alone (free_relaxation, jitted): ms per synchronous step, and its
compile time at T_free and at T_free / 10 (flat in T: the steps are a loop, not unrolled).
Defaults: the script's config (Table 2/4 settings) with the flags' changes.
"""
import importlib
import os
import resource
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar_conv  # pylint: disable=g-import-not-at-top,wrong-import-position
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_enum('script', 'cifar_conv', ['cifar_conv', 'imagenet32_conv'], 'Which script.')
flags.DEFINE_list('channels', [], 'Channels per layer (default: the config\'s).')
flags.DEFINE_integer('t_free', 0, 'Free steps (0: the config\'s).')
flags.DEFINE_integer('t_nudge', 0, 'Nudged steps (0: the config\'s).')
flags.DEFINE_integer('batch_size', 0, 'Global batch (0: the config\'s).')
flags.DEFINE_string('algorithm', '', 'Estimator (default: the config\'s).')
flags.DEFINE_integer('n_points', 2, 'N of algorithm=hep.')
flags.DEFINE_float('homeo_coef', -1, 'lambda (-1: the config\'s).')
flags.DEFINE_string('free_dtype', '', 'Free-phase dtype (default: the config\'s).')
flags.DEFINE_integer('steps', 5, 'Timed steps.')


def main(argv):
  del argv
  datasets = importlib.import_module(FLAGS.script).DATASETS  # the network is cifar_conv's
  name = {'cifar_conv': 'cifar10', 'imagenet32_conv': 'imagenet32'}[FLAGS.script]
  config = importlib.import_module(f'configs.{name}').get_config()
  changes = dict(channels=tuple(int(c) for c in FLAGS.channels), t_free=FLAGS.t_free,
                 t_nudge=FLAGS.t_nudge, batch_size=FLAGS.batch_size,
                 algorithm=FLAGS.algorithm, homeo_coef=FLAGS.homeo_coef,
                 free_dtype=FLAGS.free_dtype)
  config.update({k: v for k, v in changes.items() if v not in (0, '', (), -1)})
  config.n_points = FLAGS.n_points
  devices = cifar_conv.check_config(config, jax.local_device_count(), datasets=datasets)
  stats = (datasets[config.dataset]['mean'], datasets[config.dataset]['std'])
  params = cifar_conv.init_params(jax.random.PRNGKey(0), config)
  optimizer = cifar_conv.make_optimizer(config, 1000)
  state = harness.replicate((params, optimizer.init(params)), devices)
  step_fn = cifar_conv.make_train_step(config, optimizer, stats)
  rng = np.random.default_rng(0)
  b = config.batch_size
  x = rng.integers(0, 256, (devices, b // devices, 32, 32, 3), dtype=np.uint8)
  y = rng.integers(0, config.num_classes, (devices, b // devices)).astype(np.int32)
  t0 = time.perf_counter()
  state = step_fn(*state, np.int32(0), x, y)[:2]
  jax.block_until_ready(state)
  first = time.perf_counter() - t0
  times = []
  for i in range(FLAGS.steps):
    t0 = time.perf_counter()
    state = step_fn(*state, np.int32(i + 1), x, y)[:2]
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  step = float(np.median(times))
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

  params = jax.tree_util.tree_map(lambda a: a[0], state[0])
  x_drive = cifar_conv.input_drive(params, cifar_conv.normalize(x[0], *stats))
  relax_compile = {}
  for t in (max(1, config.t_free // 10), config.t_free):
    relax = jax.jit(lambda p, d, t=t: cifar_conv.free_relaxation(_with(config, t_free=t), p, d))
    t0 = time.perf_counter()
    compiled = relax.lower(params, x_drive).compile()
    relax_compile[t] = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(params, x_drive))  # the T_free one
  per_step = (time.perf_counter() - t0) / config.t_free
  print(f'{FLAGS.script} {config.algorithm}{config.n_points if config.algorithm == "hep" else ""}'
        f' homeo {config.homeo_coef:g} channels {tuple(config.channels)} T {config.t_free}/'
        f'{config.t_nudge} batch {b} free {config.free_dtype} on {devices} {jax.default_backend()}'
        f' device(s): compile {first - step:.1f} s, {step * 1000:.0f} ms/step, '
        f'{b / step:.1f} img/s, peak {peak:.0f} MB; free relaxation {per_step * 1000:.0f} ms per '
        f'step at batch {b // devices}, compiled in '
        + ', '.join(f'{s:.2f} s (T={t})' for t, s in relax_compile.items()))


def _with(config, **changes):
  copy = config.copy_and_resolve_references()
  copy.update(changes)
  return copy


if __name__ == '__main__':
  app.run(main)

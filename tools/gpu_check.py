r"""The convnet's first GPU run: train-step speed, half precision and memory (tools/gpu_check.sh).

    python tools/gpu_check.py --out=gpu_check            # on one GPU: CIFAR-10's config
    python tools/gpu_check.py --out=/tmp/smoke --cpu_smoke   # a tiny network, on CPU

For CIFAR-10's default (hEP exact + lambda 15, configs/cifar10.py) and hEP N = 2 (|beta| 1),
each with the free phase in float32 and in bfloat16 (App. D.4), at batch 256: compile
seconds, ms per train step, images/s, and the projected wall time of Table 2's 150 epochs
on 50,000 images; then, on one batch, the cosine between the gradient with the bfloat16
free phase and the float32 one (all parameters, and per layer group); then the device's
peak memory. Prints one line per measurement and writes them all to OUT/gpu_check.json.
"""
import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar_conv  # pylint: disable=g-import-not-at-top,wrong-import-position
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import cifar10  # pylint: disable=g-import-not-at-top,wrong-import-position

_OUT = flags.DEFINE_string('out', None, 'Folder for gpu_check.json.', required=True)
_CPU_SMOKE = flags.DEFINE_bool('cpu_smoke', False, 'A tiny network on CPU (tests the tool).')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed train steps per setting.')

SETTINGS = {'hep_exact': dict(algorithm='hep_exact'),
            'hep2': dict(algorithm='hep', n_points=2, beta=1.0)}
EPOCHS, TRAIN_IMAGES = 150, 50_000  # Table 2's run on CIFAR-10


def base_config():
  config = cifar10.get_config()
  if _CPU_SMOKE.value:
    # T_nudge >= the 4 layers, so that the error reaches the input layer's kernel; no
    # homeostatic gradient, whose compile alone would double the smoke run's time.
    config.update(channels=(4, 8, 8, 8), t_free=4, t_nudge=4, batch_size=4, homeo_coef=0.0)
  return config


def time_train_step(config, images, labels):
  """(compile s, median s per step) of cifar_conv's train step on one device."""
  optimizer = cifar_conv.make_optimizer(config, 1000)
  params = cifar_conv.init_params(jax.random.PRNGKey(0), config)
  state = harness.replicate((params, optimizer.init(params)), 1)
  step_fn = cifar_conv.make_train_step(config, optimizer)
  xs, ys = images[None], labels[None]
  t0 = time.perf_counter()
  state = step_fn(*state, np.int32(0), xs, ys)[:2]
  jax.block_until_ready(state)
  first = time.perf_counter() - t0
  times = []
  for i in range(_STEPS.value):
    t0 = time.perf_counter()
    state = step_fn(*state, np.int32(i + 1), xs, ys)[:2]
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  step = float(np.median(times))
  return first - step, step


def gradient_cosines(config, images, labels):
  """Cosine between the gradients with the bfloat16 and the float32 free phase, one batch."""
  params = cifar_conv.init_params(jax.random.PRNGKey(0), config)
  x = cifar_conv.preprocess(config, images)
  key, ids = jax.random.PRNGKey(1), jnp.arange(images.shape[0])
  grads = {}
  for dtype in ('float32', 'bfloat16'):
    c = config.copy_and_resolve_references()
    c.free_dtype = dtype
    grads[dtype] = jax.jit(lambda p, c=c: cifar_conv.compute_grads(c, p, x, labels, key, ids))(
        params)[0]
  flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(tree)])
  cos = lambda a, b: float(flat(a) @ flat(b) / np.linalg.norm(flat(a)) / np.linalg.norm(flat(b)))
  out = {'all': cos(grads['float32'], grads['bfloat16'])}
  for part in ('forward', 'backward'):
    for l, (a, b) in enumerate(zip(grads['float32'][part], grads['bfloat16'][part])):
      out[f'{part}[{l}]'] = cos(a, b)
  return out


def main(argv):
  del argv
  backend = jax.default_backend()
  if backend != 'gpu' and not _CPU_SMOKE.value:
    sys.exit(f'tools/gpu_check.py: error: the backend is {backend}, not gpu (install '
             'jax[cuda12]; --cpu_smoke runs a tiny network on CPU)')
  os.makedirs(_OUT.value, exist_ok=True)
  device = jax.local_devices()[0]
  report = {'device': str(device.device_kind), 'backend': backend, 'jax': jax.__version__,
            'cpu_smoke': _CPU_SMOKE.value, 'runs': {}}
  config = base_config()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (config.batch_size, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, config.num_classes, config.batch_size).astype(np.int32)
  print(f'{device.device_kind}: channels {tuple(config.channels)}, T {config.t_free}/'
        f'{config.t_nudge}, batch {config.batch_size}, lambda {config.homeo_coef:g}', flush=True)

  for name, overrides in SETTINGS.items():
    for dtype in ('float32', 'bfloat16'):
      c = config.copy_and_resolve_references()
      c.update(overrides, free_dtype=dtype)
      compile_s, step_s = time_train_step(c, images, labels)
      images_per_s = c.batch_size / step_s
      run = {'compile_s': compile_s, 'ms_per_step': 1e3 * step_s, 'images_per_s': images_per_s,
             'table2_hours': EPOCHS * TRAIN_IMAGES / images_per_s / 3600}
      report['runs'][f'{name}_{dtype}'] = run
      print(f'{name:9s} free phase {dtype:8s}: compile {compile_s:5.1f} s, '
            f'{run["ms_per_step"]:8.1f} ms/step, {images_per_s:8.1f} img/s, Table 2 '
            f'({EPOCHS} epochs x {TRAIN_IMAGES} images) in {run["table2_hours"]:.1f} h',
            flush=True)

  report['grad_cosine_bf16_vs_f32'] = gradient_cosines(config, images, labels)
  print(f'1 - cosine(bf16 free phase, f32) of the hEP exact + lambda {config.homeo_coef:g} '
        'gradient: ' + ', '.join(
      f'{k} {1 - v:.1e}' for k, v in report['grad_cosine_bf16_vs_f32'].items()), flush=True)
  stats = device.memory_stats() or {}  # None on CPU
  report['peak_bytes_in_use'] = stats.get('peak_bytes_in_use')
  peak = report['peak_bytes_in_use']
  print(f'peak device memory: {peak / 2**30:.2f} GiB' if peak else
        'peak device memory: not reported by this backend', flush=True)
  text = json.dumps(report, indent=1).encode()
  harness.write_atomic(os.path.join(_OUT.value, 'gpu_check.json'), lambda f: f.write(text))


if __name__ == '__main__':
  app.run(main)

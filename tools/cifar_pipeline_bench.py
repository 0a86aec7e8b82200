r"""Throughput of the CIFAR input pipeline alone (no network), in images per second.

    python tools/cifar_pipeline_bench.py                      # Fashion-MNIST-32, 50,000 images
    python tools/cifar_pipeline_bench.py --data=random        # random uint8 images

Stages, each over one epoch of `num_images` at `batch_size` (drop_remainder):
  host       harness.read_batches of harness.process_batch_indices: shuffled gather of
             uint8 rows from the in-memory split (harness.MemorySplit), as the train loop
  prefetch   host + prefetch(jax.device_put) in a background thread
  pipeline   prefetch + the jitted on-device augment + normalize, waited for every batch
  device     the jitted augment + normalize alone, on a batch already on the device
The training step (cifar_conv.py) has to be much slower than `pipeline` for the input never
to be the bottleneck.
"""
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar_conv as pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import cifar10  # pylint: disable=g-import-not-at-top,wrong-import-position
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_enum('data', 'fashion_mnist', ['fashion_mnist', 'random'],
                  'fashion_mnist: the Debian IDX files padded to 32x32x3; random: uint8 noise.')
flags.DEFINE_string('data_dir', '', 'Folder of the Fashion-MNIST IDX files ('' = Debian).')
flags.DEFINE_integer('num_images', 50000, 'Training images in the epoch.')
flags.DEFINE_integer('batch_size', 256, 'Images per batch.')
flags.DEFINE_integer('prefetch', 2, 'Batches prepared ahead by the background thread.')
flags.DEFINE_integer('device_reps', 50, 'Repetitions of the device-only measurement.')


def load_images():
  if FLAGS.data == 'random':
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (FLAGS.num_images, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, FLAGS.num_images).astype(np.int32)), 'cifar10'
  config = cifar10.get_config()
  config.dataset, config.data_dir = 'fashion_mnist', FLAGS.data_dir
  train = pipeline.load_data(config).train
  x, y = train.images, train.labels
  if FLAGS.num_images > len(x):
    raise app.UsageError(f'--num_images={FLAGS.num_images} > the {len(x)} images')
  return (x[:FLAGS.num_images], y[:FLAGS.num_images]), 'fashion_mnist'


def report(stage, num_images, seconds):
  print(f'{stage:9s} {num_images / seconds:12,.0f} images/s  ({num_images} images in '
        f'{seconds:.2f} s)', flush=True)


def main(argv):
  del argv
  t0 = time.time()
  data, dataset = load_images()
  batch = FLAGS.batch_size
  steps = len(data[0]) // batch
  num = steps * batch
  print(f'{FLAGS.data}: {data[0].shape} {data[0].dtype} loaded in {time.time() - t0:.1f} s; '
        f'batch {batch}, {steps} steps; backend {jax.default_backend()}, '
        f'{os.cpu_count()} CPUs', flush=True)
  key = jax.random.PRNGKey(0)
  info = pipeline.DATASETS[dataset]
  split = harness.MemorySplit(*data)

  def epoch_batches(epoch):
    return harness.read_batches(
        split, harness.process_batch_indices(len(split), batch, seed=0, epoch=epoch))

  @jax.jit
  def prepare(images, step):
    ids = step * batch + jnp.arange(images.shape[0])
    return pipeline.normalize(pipeline.augment(key, images, ids), info['mean'], info['std'])

  t = time.time()
  for _ in epoch_batches(1):
    pass
  report('host', num, time.time() - t)

  t = time.time()
  for _ in harness.prefetch(epoch_batches(2), put=jax.device_put, size=FLAGS.prefetch):
    pass
  report('prefetch', num, time.time() - t)

  images = jax.device_put(data[0][:batch])
  prepare(images, 0).block_until_ready()  # compile
  t = time.time()
  for step, (x, _) in enumerate(harness.prefetch(epoch_batches(3), put=jax.device_put,
                                                 size=FLAGS.prefetch)):
    prepare(x, step).block_until_ready()
  report('pipeline', num, time.time() - t)

  t = time.time()
  for step in range(FLAGS.device_reps):
    prepare(images, step).block_until_ready()
  report('device', FLAGS.device_reps * batch, time.time() - t)


if __name__ == '__main__':
  app.run(main)

r"""Throughput of the ImageNet 32x32 input pipeline alone (no network), in images per second.

    python tools/imagenet_pipeline_bench.py                          # prepared data in TFDS's dir
    python tools/imagenet_pipeline_bench.py --fake_dir=/tmp/fake_inet32 # no ImageNet? see below

Reads the prepared TFDS imagenet_resized/32x32 (ArrayRecord) the way imagenet32_conv.py
does, over `num_batches` batches of `batch_size` random training indices, in stages:
  read 1 thread     Split.read of one batch after the other (random access + PNG decode)
  read N threads    harness.read_batches with --threads (what a process of the script runs)
  pipeline          read_batches + prefetch + sharding to the devices, and the jitted
                    on-device augment + normalize waited for every batch
The train step must be much slower per image than `pipeline` for the input never to be
the bottleneck (with several processes, each reads batch_size / processes images).

--fake_dir prepares (once) a data set with the layout, size and file format of
imagenet_resized/32x32 but random 32x32 images (--fake_images training, 2,000 validation),
through TFDS's own builder: for machines without the 3.7 GB download. Needs TensorFlow.
"""
import io
import os
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar_conv  # pylint: disable=g-import-not-at-top,wrong-import-position
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
import imagenet32_conv as script  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import imagenet32 as imagenet32_config  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string('tfds_data_dir', '', 'TFDS data_dir of the prepared data ('' = default).')
flags.DEFINE_string('fake_dir', '', 'Prepare (if needed) and read a fake data set here.')
flags.DEFINE_integer('fake_images', 20000, 'Training images of the fake data set.')
flags.DEFINE_integer('batch_size', 256, 'Images per batch.')
flags.DEFINE_integer('num_batches', 40, 'Batches per stage.')
flags.DEFINE_integer('threads', 8, 'Reading threads (config.data_threads).')


def prepare_fake(data_dir, num_train, num_val=2000):
  """imagenet_resized/32x32 with random images, prepared by TFDS's builder from in-memory
  npz archives in the format of the real download (flat CHW uint8 rows, 1-based labels)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.datasets.imagenet_resized import imagenet_resized_dataset_builder as m  # pylint: disable=g-import-not-at-top

  def npz(n, seed):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)  # 4x4-pixel blocks
    data = np.repeat(np.repeat(blocks, 4, axis=2), 4, axis=3).reshape(n, -1)
    buf = io.BytesIO()
    np.savez(buf, data=data, labels=rng.integers(1, 1001, n))
    buf.seek(0)
    return buf

  def split_generators(self, dl_manager):
    del self, dl_manager
    return [tfds.core.SplitGenerator(name=name, gen_kwargs={'archive': iter([(name, npz(n, i))])})
            for i, (name, n) in enumerate((('train', num_train), ('validation', num_val)))]

  m.Builder._split_generators = split_generators  # pylint: disable=protected-access
  builder = tfds.builder('imagenet_resized/32x32', data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(file_format='array_record')


def rate(run, images):
  t0 = time.perf_counter()
  run()
  return images / (time.perf_counter() - t0)


def main(argv):
  del argv
  data_dir = FLAGS.tfds_data_dir
  if FLAGS.fake_dir:
    prepare_fake(FLAGS.fake_dir, FLAGS.fake_images)
    data_dir = FLAGS.fake_dir
  config = imagenet32_config.get_config()
  config.tfds_data_dir = data_dir
  data = script.load_data(config)
  split = data.train
  b, n = FLAGS.batch_size, FLAGS.num_batches
  rng = np.random.default_rng(0)
  batches = [rng.choice(len(split), b, replace=False) for _ in range(n)]
  images = b * n
  print(f'{len(split)} training images in {data_dir or "the TFDS default"}; '
        f'{n} batches of {b}; {os.cpu_count()} CPUs; jax {jax.__version__} '
        f'on {jax.default_backend()}')
  print(f'read 1 thread      {rate(lambda: [split.read(i) for i in batches], images):9.0f} img/s')
  consume = lambda it: [None for _ in it]
  print(f'read {FLAGS.threads} threads    '
        f'{rate(lambda: consume(harness.read_batches(split, batches, FLAGS.threads)), images):9.0f}'
        ' img/s')
  devices = jax.local_device_count()
  shard = lambda a: harness.shard(a, devices)
  prep = jax.pmap(lambda key, x: cifar_conv.preprocess(
      config, cifar_conv.augment(key, x, jax.numpy.arange(x.shape[0]))), in_axes=(None, 0))
  key = jax.random.PRNGKey(0)
  first = harness.read_batches(split, batches[:1], 1)
  jax.block_until_ready(prep(key, shard(next(first)[0])))  # compile

  def pipeline():
    for x, _ in harness.prefetch(harness.read_batches(split, batches, FLAGS.threads),
                                 put=lambda batch: tuple(shard(a) for a in batch)):
      jax.block_until_ready(prep(key, x))
  print(f'pipeline           {rate(pipeline, images):9.0f} img/s')


if __name__ == '__main__':
  app.run(main)

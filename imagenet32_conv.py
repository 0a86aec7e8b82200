r"""Generalized holomorphic EP on the recurrent convnet, ImageNet 32x32 (Laborieux & Zenke, ICLR 2024).

Paper: Table 2 (ImageNet 32x32 column), App. D.2-D.4. The network, dynamics, estimators and
main loop of cifar_conv.py (imported), with 1000 classes, read from a data set that is never
held in memory, and spread over several processes (machines) with JAX's own multi-process
runtime.

    python imagenet32_conv.py --config=configs/imagenet32.py
    # two machines, one process each (run on both; process_id 0 and 1):
    python imagenet32_conv.py --config=configs/imagenet32.py \
        --config.coordinator_address=host0:12345 --config.num_processes=2 --config.process_id=0
    # under Slurm (srun, one task per node or per GPU), no flags: jax.distributed finds them.

Several processes: each drives its local devices and reads only its share of every batch;
the train step's gradient all-reduce (and its metrics) span every device of every process;
process 0 alone writes the workdir (config, metrics, checkpoint); at start it reads the
checkpoint and broadcasts it, so every process resumes from it (the workdir need not be
shared). If a process dies, the others stop with an error (they do not wait forever):
restart all of them with the same flags and they resume after the last checkpoint.
"""
import os

import jax
import numpy as np

import cifar_conv
import harness

SCRIPT = os.path.basename(__file__)

# ======================================================================================
# Data
# ======================================================================================
# ImageNet 32x32 (TFDS imagenet_resized/32x32: 1,281,167 training and 50,000 validation
# images, 1000 classes) is 3.9 GB of pixels: it is never loaded whole. Each process opens the
# prepared split as a TFDS data source (random access to ArrayRecord files, each example
# decoded on read) and reads only the examples of its own share of every batch, a few
# batches ahead, on data_threads background threads. Every batch is augmented and
# normalised on the device inside the jitted step, as for CIFAR.
#
# Sharding across processes (multi-host runs): every process draws the same permutation of
# the whole split for each epoch (seeded by (seed, epoch)); global batch i is its i-th block
# of batch_size indices, and process p reads the p-th of the block's process_count equal
# slices (harness.process_batch_indices). The shares of one epoch are disjoint, and the
# global batch is the one a single process would train on: the result does not depend on
# how many processes share the run. (This plays the role of tfds.split_for_jax_process,
# with a fresh split every epoch.) The validation split is cut into process_count
# contiguous blocks (harness.process_eval_indices).
#
# Normalisation (the authors' convention): per-channel mean, and std multiplied by 1.5.

class Split:
  """Random access to the first `size` examples of a TFDS data source.

  read(indices) -> (uint8 images (n, 32, 32, 3), int32 labels (n,)), decoded on read, one
  example at a time (harness.read_batches runs several reads in parallel).
  """

  def __init__(self, source, size):
    self.source, self.size = source, size

  def __len__(self):
    return self.size

  def read(self, indices):
    examples = [self.source[int(i)] for i in indices]
    return (np.stack([np.asarray(e['image'], np.uint8) for e in examples]),
            np.asarray([e['label'] for e in examples], np.int32))


def prepare_tfds(config):
  """The TFDS builder; process 0 downloads and prepares the data set if needed."""
  info = cifar_conv.DATASETS[config.dataset]
  return harness.tfds_builder(info['tfds_name'], config.tfds_data_dir, info['url'],
                              prepare=jax.process_index() == 0)


def load_data(config):
  """harness.Data over the prepared data (test = the validation split), read on demand.

  config.train_size / test_size > 0 keep the first n examples of the split.
  """
  # The other processes wait for process 0 to prepare the data (or to fail), then open it.
  builder = harness.all_or_none(lambda: prepare_tfds(config))
  info = cifar_conv.DATASETS[config.dataset]
  out = {}
  for split, tfds_split in (('train', 'train'), ('test', info['test_split'])):
    try:
      source = builder.as_data_source(split=tfds_split)
    except NotImplementedError as e:
      if not builder.is_prepared():  # a process > 0 on a machine without the files
        raise harness.ConfigError(
            f'{info["tfds_name"]} is not prepared in {builder.data_dir} on this machine: put '
            'tfds_data_dir on a folder every process can read, or prepare the data there '
            'first (a one-process run prepares it)') from e
      raise harness.ConfigError(
          f'{info["tfds_name"]} in {builder.data_dir} is in tfrecord format, which has no '
          'random access: prepare it again (array_record) in another tfds_data_dir') from e
    size, available = config[f'{split}_size'], len(source)
    if size > available:
      raise harness.ConfigError(f'{split}_size={size} but only {available} {split} images '
                                'were found')
    out[split] = Split(source, size or available)
  return harness.Data(**out)


# cifar_conv.py's data sets: config.dataset = 'imagenet32' picks this one.
cifar_conv.DATASETS['imagenet32'] = dict(
    load=load_data, tfds_name='imagenet_resized/32x32', test_split='validation',
    num_classes=1000, mean=(0.485, 0.456, 0.406),
    std=tuple(1.5 * s for s in (0.229, 0.224, 0.225)), train_size=1281167, test_size=50000,
    url='http://www.image-net.org/data/downsample/Imagenet32_val_npz.zip')


def train_and_evaluate(config, workdir=None):
  """cifar_conv.train_and_evaluate on ImageNet 32x32 (see there)."""
  return cifar_conv.train_and_evaluate(config, workdir, SCRIPT)


if __name__ == '__main__':
  harness.run_main(SCRIPT, train_and_evaluate, 'configs/imagenet32.py')

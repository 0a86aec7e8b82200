"""Helpers of the end-to-end tests: small IDX data sets and running a script."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA flags of every test process (see conftest.py), and with two fake CPU devices.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
TWO_DEVICES = f'{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=2'

# A short, small run: two training steps of 50, a 60-image test set, tiny diagnostics.
SMALL = ['--config.hidden_sizes=(32,16)', '--config.t_free=30', '--config.t_nudge=8',
         '--config.train_size=100', '--config.test_size=60', '--config.eval_batch_size=20',
         '--config.diag_batch_size=10', '--config.diag_jacobian_samples=2',
         '--config.log_every_steps=1']


def write_idx(path, array):
  """A uint8 IDX file (the MNIST format), gzipped."""
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(
      int(d).to_bytes(4, 'big') for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist_lookalike(folder, num_train=200, num_test=100):
  """The four Fashion-MNIST IDX files with class-dependent random images."""
  rng = np.random.default_rng(0)
  for split, n in (('train', num_train), ('t10k', num_test)):
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 120, (n, 28, 28)) + 12 * labels[:, None, None]
    write_idx(os.path.join(folder, f'{split}-images-idx3-ubyte.gz'), images)
    write_idx(os.path.join(folder, f'{split}-labels-idx1-ubyte.gz'), labels)
  return str(folder)


def run_script(script, args, env=None):
  """Runs `python script args...` from the repository root; returns the CompletedProcess."""
  return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True,
                        text=True, env={**os.environ, **(env or {})}, check=False)


def read_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]

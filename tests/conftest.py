"""Test set-up: the repository root on sys.path, float64 for the in-process tests.

End-to-end tests run the scripts in subprocesses, in float32 as users do. Every test, in
process or not, compiles with XLA's backend optimisation off (TEST_XLA_FLAGS): the tiny
test problems run in milliseconds, and LLVM's passes would otherwise dominate the suite's
time. Benchmarks and users keep the default. Float64 is switched on before helpers imports
the scripts; importing them starts no JAX backend, so the flags set after still apply.
"""
import os
import socket
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
jax.config.update('jax_enable_x64', True)

# pylint: disable=wrong-import-position
from helpers import TEST_XLA_FLAGS, write_fashion_mnist_lookalike

os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {TEST_XLA_FLAGS}'.strip()


@pytest.fixture(scope='session')
def idx_dir(tmp_path_factory):
  """A small Fashion-MNIST look-alike in IDX files (200 training, 100 test images)."""
  return write_fashion_mnist_lookalike(tmp_path_factory.mktemp('idx'))


@pytest.fixture
def silent_server():
  """A TCP port that accepts connections and never answers."""
  server = socket.socket()
  server.bind(('127.0.0.1', 0))
  server.listen(8)
  yield f'http://127.0.0.1:{server.getsockname()[1]}/x.tar.gz'
  server.close()

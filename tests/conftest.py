"""Test set-up: the repository root on sys.path, float64 for the in-process tests.

End-to-end tests run the scripts in subprocesses, in float32 as users do. Every test, in
process or not, compiles with XLA's backend optimisation off (TEST_XLA_FLAGS): the tiny
test problems run in milliseconds, and LLVM's passes would otherwise dominate the suite's
time. Benchmarks and users keep the default.
"""
import os
import sys

from scripts import TEST_XLA_FLAGS  # pylint: disable=g-import-not-at-top

os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {TEST_XLA_FLAGS}'.strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
jax.config.update('jax_enable_x64', True)


@pytest.fixture(scope='session')
def idx_dir(tmp_path_factory):
  """A small Fashion-MNIST look-alike in IDX files (200 training, 100 test images)."""
  from scripts import write_fashion_mnist_lookalike  # pylint: disable=g-import-not-at-top
  return write_fashion_mnist_lookalike(tmp_path_factory.mktemp('idx'))

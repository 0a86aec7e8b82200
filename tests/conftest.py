"""Test set-up: the repository root on sys.path, float64 for the in-process tests.

End-to-end tests run the scripts in subprocesses, in float32 as users do.
"""
import os
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
jax.config.update('jax_enable_x64', True)


@pytest.fixture(scope='session')
def idx_dir(tmp_path_factory):
  """A small Fashion-MNIST look-alike in IDX files (200 training, 100 test images)."""
  from scripts import write_fashion_mnist_lookalike  # pylint: disable=g-import-not-at-top
  return write_fashion_mnist_lookalike(tmp_path_factory.mktemp('idx'))

"""Test set-up: the repository root on sys.path, float64 for the in-process tests, and a
network guard around every test.

End-to-end tests run the scripts in subprocesses, in float32 as users do. Every test, in
process or not, compiles with XLA's backend optimisation off (TEST_XLA_FLAGS): the tiny
test problems run in milliseconds, and LLVM's passes would otherwise dominate the suite's
time. Benchmarks and users keep the default. Float64 is switched on before helpers imports
the scripts; importing them starts no JAX backend, so the flags set after still apply.

No test may reach the network, whatever machine runs it (tests/netguard/sitecustomize.py):
every Python the tests start loads the guard through PYTHONPATH, this process loads it
here, and the autouse fixture `no_network` fails any test during which a connection or a
name lookup left the machine, in this process or in one it started.
"""
import importlib.util
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

NETGUARD_DIR = os.path.realpath(os.path.join(ROOT, 'tests', 'netguard'))
os.environ['PYTHONPATH'] = os.pathsep.join(
    [NETGUARD_DIR, *filter(None, os.environ.get('PYTHONPATH', '').split(os.pathsep))])
netguard = sys.modules.get('sitecustomize')  # already the guard in a process the tests started
if os.path.dirname(os.path.realpath(getattr(netguard, '__file__', '/'))) != NETGUARD_DIR:
  _spec = importlib.util.spec_from_file_location(
      'netguard', os.path.join(NETGUARD_DIR, 'sitecustomize.py'))
  netguard = importlib.util.module_from_spec(_spec)
  _spec.loader.exec_module(netguard)  # installs the guard in this process
sys.modules['netguard'] = netguard


@pytest.fixture(autouse=True)
def no_network(tmp_path_factory):
  """Fails the test if it (or a process it started) tried to leave the machine."""
  log = tmp_path_factory.mktemp('netguard') / 'attempts.txt'
  previous = os.environ.get(netguard.LOG)
  os.environ[netguard.LOG] = str(log)
  yield
  if previous is None:
    del os.environ[netguard.LOG]
  else:
    os.environ[netguard.LOG] = previous
  if log.exists() and log.read_text():
    pytest.fail('the test tried to reach the network:\n' + log.read_text())


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

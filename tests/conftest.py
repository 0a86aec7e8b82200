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
import atexit
import fcntl
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
jax.config.update('jax_enable_x64', True)

# pylint: disable=wrong-import-position
from helpers import MLP_RUN_ARGS, TEST_XLA_FLAGS, run_script, write_fashion_mnist_lookalike

os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {TEST_XLA_FLAGS}'.strip()

# One compilation cache for the whole session: a computation that one test process compiled
# (a script's train step, say) is loaded, not compiled again, by every later process that
# needs the same one (a resumed run, a restarted process). The process that starts the
# session (pytest, or xdist's controller) makes the folder; the processes it starts inherit
# it through the environment. The results are those of a fresh compile.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='hep-tests-jax-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], True)
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

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


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'slow: end to end (a script, a tool or several processes run in '
      'subprocesses); `-m "not slow"` keeps the science and run-machinery unit tests')


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


def once_per_session(tmp_path_factory, name, make):
  """make(folder) -> JSON data, computed once per session even under pytest-xdist: the first
  worker to ask computes it under a file lock in the session's shared temporary folder,
  the others wait for the lock and read what it saved."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # shared by the workers of one session
  folder, done = root / name, root / f'{name}.json'
  with open(root / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      folder.mkdir()
      done.write_text(json.dumps(make(folder)))
  return json.loads(done.read_text())


@pytest.fixture(scope='session')
def mlp_run(tmp_path_factory):
  """One small fmnist_mlp.py run from its command line (float32, one device, 3 epochs,
  helpers.MLP_RUN_ARGS), made once per session: {'workdir', 'log'} (its stderr, with
  JAX_LOG_COMPILES=1). Several tests read it: its rows, checkpoint, compiles, and the
  reference of a resumed run and of a run on two devices."""
  def run(folder):
    data = write_fashion_mnist_lookalike(folder)
    workdir = str(folder / 'run')
    out = run_script('fmnist_mlp.py', [*MLP_RUN_ARGS, f'--config.data_dir={data}',
                                       f'--workdir={workdir}'], env={'JAX_LOG_COMPILES': '1'})
    assert out.returncode == 0, out.stderr[-3000:]
    return {'workdir': workdir, 'data_dir': data, 'log': out.stderr}
  return once_per_session(tmp_path_factory, 'mlp_run', run)


@pytest.fixture
def silent_server():
  """A TCP port that accepts connections and never answers."""
  server = socket.socket()
  server.bind(('127.0.0.1', 0))
  server.listen(8)
  yield f'http://127.0.0.1:{server.getsockname()[1]}/x.tar.gz'
  server.close()

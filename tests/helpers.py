"""What several test files share: running a script, small data sets, run folders, the dense
references, the tiny MLP.

Importing this module imports JAX and the scripts, but starts no backend: conftest.py sets
XLA_FLAGS (from TEST_XLA_FLAGS here) after importing it, before anything runs.
"""
import gzip
import json
import os
import subprocess
import sys

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

import common
import fmnist_mlp
from configs import fmnist_mlp as mlp_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA flags of every test process (see conftest.py), and with two fake CPU devices.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
TWO_DEVICES = f'{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=2'

# ================================================================ scripts, data, run folders

# fmnist_mlp.py / fmnist_feedback.py command-line flags of a short, small run: two training
# steps of 50, a 60-image test set, tiny diagnostics (add --config and the data folder).
MLP_SMALL_ARGS = ['--config.hidden_sizes=(32,16)', '--config.t_free=30', '--config.t_nudge=8',
                  '--config.train_size=100', '--config.test_size=60',
                  '--config.eval_batch_size=20', '--config.diag_batch_size=10',
                  '--config.diag_jacobian_samples=2', '--config.log_every_steps=1']
# The session's shared fmnist_mlp.py run (conftest.mlp_run): 3 epochs of 2 steps with
# homeostasis, from its command line (add --config.data_dir and --workdir).
MLP_RUN_ARGS = ['--config=configs/fmnist_mlp.py', *MLP_SMALL_ARGS, '--config.num_epochs=3',
                '--config.homeo_coef=0.5']


def run_script(script, args, env=None, timeout=None):
  """Runs `python script args...` from the repository root; returns the CompletedProcess.

  script='-c' with the code as the first of args runs a program given as text.
  """
  return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True,
                        text=True, env={**os.environ, **(env or {})}, check=False,
                        timeout=timeout)


_CASES_DRIVER = '''
import importlib, json, os, runpy, sys, tempfile, traceback
script, cases = sys.argv[1], json.loads(sys.argv[2])
importlib.import_module(script[:-3])  # its imports (JAX, the scripts), once for every case
results = []
for args in cases:
  with tempfile.TemporaryFile() as err:
    pid = os.fork()
    if pid == 0:  # the child: `python script *args`, stderr into err
      os.dup2(err.fileno(), 2)
      sys.argv, code = [script, *args], 0
      try:
        runpy.run_path(script, run_name='__main__')
      except SystemExit as e:  # as the interpreter reports it
        code = e.code if isinstance(e.code, int) or e.code is None else 1
        if not isinstance(e.code, int) and e.code is not None:
          print(e.code, file=sys.stderr)
      except BaseException:  # pylint: disable=broad-except
        traceback.print_exc()
        code = 1
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code or 0)
    _, status = os.waitpid(pid, 0)
    err.seek(0)
    results.append((os.waitstatus_to_exitcode(status), err.read().decode(errors='replace')))
print('RESULTS ' + json.dumps(results))
'''


def run_cases(script, cases, env=None):
  """[(exit code, stderr)] of `python script *args` for each list of args in `cases`, from
  one interpreter: it imports the script's modules once, then forks a fresh child per case
  that runs the script's command line (its __main__ block) with those arguments. For the
  command-line cases that stop before any compute (each interpreter costs seconds of
  imports)."""
  out = run_script('-c', [_CASES_DRIVER, script, json.dumps(cases)], env)
  assert out.returncode == 0 and 'RESULTS ' in out.stdout, out.stderr[-3000:]
  return [tuple(r) for r in json.loads(out.stdout.split('RESULTS ', 1)[1])]


def read_rows(workdir):
  """The rows of workdir/metrics.jsonl (strict: every line must be JSON)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


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


def snapshot(folder):
  """{file name: bytes} of every file in a folder: to show that nothing changed."""
  out = {}
  for f in sorted(os.listdir(folder)):
    with open(os.path.join(folder, f), 'rb') as fh:
      out[f] = fh.read()
  return out


class Exploit:
  """Unpickling this creates a file: the proof that a pickle was loaded."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


# ================================================================ exact references, comparisons
# Dense solves on tiny networks, which only the tests use (common.py has the estimators).

def flatten(tree):
  """All leaves of a pytree as one vector (traceable)."""
  return ravel_pytree(tree)[0]


def sample(tree, i):
  """Sample i of a state tuple (batch first) as one numpy vector."""
  return np.concatenate([np.ravel(np.asarray(a[i])) for a in tree])


def dbeta_s_dense(k, d, g):
  """d_beta s* = (I - D K)^{-1} D g by a dense solve (K = dG/ds, d = sigma'(u*), g = dL/ds)."""
  n = k.shape[0]
  return jnp.linalg.solve(jnp.eye(n) - d[:, None] * k, d * g)


def rbp_delta_dense(k, d, g):
  """delta = -J_u^{-T} dL/du = (I - D K^T)^{-1} D g by a dense solve (Eq. 4)."""
  n = k.shape[0]
  return jnp.linalg.solve(jnp.eye(n) - d[:, None] * k.T, d * g)


def dense_one(activate, drives, loss_grad_s, x_drive, labels, u):
  """(K = dG/ds, d = sigma'(u*), g = dL/ds (zero below the top)) of one sample by dense
  autodiff; x_drive, labels and the state u have a batch axis of length 1. A network is
  given by its activate(u), drives(s, x_drive) and loss_grad_s(s_top, labels), parameters
  bound (traceable)."""
  s = activate(u)
  k = common.flat_jacobian(lambda z: drives(z, x_drive), s)
  ones = jax.tree_util.tree_map(jnp.ones_like, u)
  d = flatten(jax.jvp(activate, (u,), (ones,))[1])
  g = flatten((*(jnp.zeros_like(a) for a in s[:-1]), loss_grad_s(s[-1], labels)))
  return k, d, g


def dense_all(activate, drives, loss_grad_s, x_drive, labels, u_free):
  """dense_one of every sample, vmapped: (K, d, g) with a leading batch axis (traceable)."""
  return jax.vmap(lambda x, y, u: dense_one(activate, drives, loss_grad_s, x[None], y[None],
                                            tuple(a[None] for a in u)))(x_drive, labels, u_free)


def assert_trees_close(a, b, rtol):
  """Leaf by leaf, within rtol relative to each leaf's largest entry."""
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max() + 1e-15)


def without_count(network_grads):
  """A script's network_grads(config, params, x, s_free, error) without its count of dropped
  samples."""
  return lambda *args: network_grads(*args)[0]


# ================================================================ the tiny MLP
# A tiny instance of the Fashion-MNIST MLP (784 - 6 - 5 - 10) for exact-reference tests
# (float64: conftest.py enables it).

BATCH = 4


def tiny_mlp(alpha=60.0, scale=0.6, seed=0, layer_updates='synchronous', t_free=400,
             t_nudge=400, hidden=(6, 5)):
  """(config, params, x, labels): weights scaled down so the dynamics contract quickly."""
  config = mlp_config.get_config()
  config.hidden_sizes = hidden
  config.alpha = alpha
  config.layer_updates = layer_updates
  config.t_free, config.t_nudge = t_free, t_nudge
  params = fmnist_mlp.init_params(jax.random.PRNGKey(seed), config)
  params = jax.tree_util.tree_map(lambda w: scale * w, params)
  params['forward'] = [
      dict(p, b=0.3 * jax.random.normal(jax.random.PRNGKey(seed + l), p['b'].shape))
      for l, p in enumerate(params['forward'])]
  # A gentler readout keeps s*(beta) holomorphic well beyond |beta| = 0.5.
  params['readout'] = jax.tree_util.tree_map(
      lambda w: 0.5 * w, fmnist_mlp.init_params(jax.random.PRNGKey(seed), config)['readout'])
  x = jax.random.uniform(jax.random.PRNGKey(seed + 100), (BATCH, 784), jnp.float64)
  labels = jnp.arange(BATCH) % 10
  return config, params, x, labels


def tie(params):
  """Backward weights := transposed forward weights (alpha = 0): K is symmetric."""
  params = dict(params)
  params['backward'] = [{'w': params['forward'][l + 1]['w'].T}
                        for l in range(len(params['backward']))]
  return params


def free_fixed_point(config, params, x):
  """The free fixed point u* of an fmnist_mlp.py network (the one config.network names)."""
  u, res, _ = fmnist_mlp.free_relaxation(config, params, fmnist_mlp.input_drive(params, x))
  assert float(res) < -10, f'tiny network did not converge: log10 residual {float(res)}'
  return u


def exact_and_rbp(config, params, x, labels):
  """(u_free, exact d_beta s*, RBP's delta) of the MLP at its free fixed point."""
  x_drive = fmnist_mlp.input_drive(params, x)
  u_free = free_fixed_point(config, params, x)
  relax = fmnist_mlp.nudged_relaxation(config, params, x_drive, labels, u_free)
  delta = fmnist_mlp.rbp_error(config, params, x_drive, labels, u_free)
  return u_free, common.exact_dbeta(relax), delta


def mlp_dense(config, params, x, labels, u_free, i):
  """(K, d, g) of sample i of the MLP (dense_one)."""
  return dense_one(fmnist_mlp.activate,
                   lambda s, x_drive: fmnist_mlp.drives(config, params, s, x_drive),
                   lambda s, y: fmnist_mlp.loss_grad_s(params, s, y),
                   fmnist_mlp.input_drive(params, x)[i:i + 1], labels[i:i + 1],
                   tuple(a[i:i + 1] for a in u_free))

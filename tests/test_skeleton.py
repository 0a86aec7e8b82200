"""The shared skeleton of the experiment scripts, tried as a hostile user would.

Every case runs against every script that carries the skeleton (fmnist_feedback.py runs
fmnist_mlp.py's; the parts of it that live in harness.py are tried once). Bad input must give one
line (no traceback) before any compute, and leave the files that were there untouched;
checkpoints are never unpickled and refuse a config they were not made with; a run that
blows up (finite or not) stops like a NaN run; a killed run resumes bit-identically.
"""
import errno
import importlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import common
import fmnist_mlp
import harness
import scripts
from scripts import SMALL, read_rows

SCRIPTS = ['fmnist_mlp', 'fmnist_feedback']


def module_and_config(name):
  module = importlib.import_module(name)
  config = importlib.import_module(f'configs.{name}').get_config()
  return module, config


# ------------------------------------------------- every numeric field is checked first

NAN, INF = float('nan'), float('inf')
BAD_FIELDS = [
    (dict(learning_rate=-1.0), 'learning_rate must be > 0'),
    (dict(learning_rate=NAN), 'learning_rate must be finite'),
    (dict(homeo_coef=NAN), 'homeo_coef must be finite'),
    (dict(homeo_coef=-0.1), 'homeo_coef must be >= 0'),
    (dict(beta=INF), 'beta must be finite'),
    (dict(beta=0.0), 'beta must be > 0'),
    (dict(momentum=-0.5), 'momentum must be >= 0'),
    (dict(max_log10_residual=NAN), 'max_log10_residual must be finite'),
    (dict(max_train_loss=NAN), 'max_train_loss must be finite'),
    (dict(train_size=-1), 'train_size must be >= 0'),
    (dict(train_size=100000), 'train_size must be <= 60000'),
    (dict(test_size=10001), 'test_size must be <= 10000'),
    (dict(seed=-1), 'seed must be >= 0'),
    (dict(num_devices=-1), 'num_devices must be >= 0'),
    (dict(hidden_sizes=(64.5,)), 'hidden_sizes must be a tuple of >= 1 positive integers'),
    (dict(hidden_sizes=(64, 0)), 'hidden_sizes must be a tuple of >= 1 positive integers'),
    (dict(n_points=-1), 'n_points must be >= 0'),
    (dict(t_free=0), 't_free must be >= 1'),
    (dict(tol=-1.0), 'tol must be >= 0'),
    (dict(diag_jacobian_samples=99), 'diag_jacobian_samples must be <= 50'),
    (dict(algorithm='eqprop'), 'unknown algorithm'),
    (dict(algorithm='hep_continuous', n_points=1), 'hep_continuous needs n_points >= 2'),
    (dict(continuous_average='sometimes'), 'unknown continuous_average'),
    (dict(layer_updates='alternating'), 'unknown layer_updates'),
    (dict(dataset='cifar10'), 'unknown dataset'),
    (dict(optimizer='rmsprop'), 'unknown optimizer'),
    (dict(batch_size=51), 'not divisible by the 2 devices'),
    (dict(num_devices=4), 'only 2 local devices'),
]


@pytest.mark.parametrize('name', SCRIPTS)
@pytest.mark.parametrize('overrides, message', BAD_FIELDS)
def test_every_bad_field_is_a_one_line_error(name, overrides, message):
  module, config = module_and_config(name)
  config.update(overrides)
  with pytest.raises(module.ConfigError, match=message) as error:
    module.check_config(config, num_local_devices=2)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('name', SCRIPTS)
def test_the_default_config_passes_and_both_share_the_update_order_name(name):
  module, config = module_and_config(name)
  before = config.to_json()
  assert module.check_config(config, num_local_devices=1) == 1
  assert config.layer_updates == 'sequential' and config.to_json() == before


# -------------------------------------------------- bad files: one line, nothing lost

def small_config(name, idx_dir, **overrides):
  _, config = module_and_config(name)
  config.update(dict(data_dir=idx_dir, hidden_sizes=(32, 16), t_free=30, t_nudge=8,
                     train_size=100, test_size=60, eval_batch_size=20, diag_batch_size=10,
                     diag_jacobian_samples=2, num_epochs=1, log_every_steps=0), **overrides)
  return config


def snapshot(folder):
  out = {}
  for f in sorted(os.listdir(folder)):
    with open(os.path.join(folder, f), 'rb') as fh:
      out[f] = fh.read()
  return out


def a_run_with_one_checkpoint(module, config, workdir):
  """A workdir as a finished epoch 1 leaves it (config.json, metrics, checkpoint)."""
  run = harness.Workdir(workdir, config, fmnist_mlp.RESUMABLE_FIELDS)
  run.start()
  params = module.init_params(jax.random.PRNGKey(0), config)
  state = (params, fmnist_mlp.make_optimizer(config).init(params))
  run.save(1, {'epoch': 1, 'train_loss': 2.3}, jax.device_get(state))
  return run


def spoil(path, content):
  with open(path, 'wb') as f:
    f.write(content)


WORKDIR_CASES = {
    'truncated checkpoint': ('checkpoint.npz', 'truncate', 'damaged or not a checkpoint'),
    'garbage checkpoint': ('checkpoint.npz', b'garbage' * 10, 'damaged or not a checkpoint'),
    'empty checkpoint': ('checkpoint.npz', b'', 'damaged or not a checkpoint'),
    'pickled checkpoint': ('checkpoint.npz', 'pickle', 'damaged or not a checkpoint'),
    'invalid config.json': ('config.json', b'{"seed": 0,', 'not a JSON config'),
    'empty config.json': ('config.json', b'', 'not a JSON config'),
    'bad metrics line': ('metrics.jsonl', b'{"epoch": 1}\nnot json\n', 'line 2 is not a metrics'),
}


class Exploit:
  """Unpickling this creates a file: the proof that a pickle was loaded."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


@pytest.mark.parametrize('name', SCRIPTS)
@pytest.mark.parametrize('case', sorted(WORKDIR_CASES))
def test_a_damaged_workdir_is_a_one_line_error_and_stays_as_it_was(name, case, idx_dir,
                                                                    tmp_path):
  module, _ = module_and_config(name)
  config = small_config(name, idx_dir)
  workdir = str(tmp_path / 'run')
  a_run_with_one_checkpoint(module, config, workdir)
  target, content, message = WORKDIR_CASES[case]
  path = os.path.join(workdir, target)
  marker = tmp_path / 'unpickled'
  if content == 'truncate':
    with open(path, 'rb') as f:
      content = f.read()[:1000]
  elif content == 'pickle':
    content = pickle.dumps(Exploit(str(marker)))
  spoil(path, content)
  before = snapshot(workdir)
  with pytest.raises(module.ConfigError, match=message) as error:
    module.train_and_evaluate(config, workdir)
  assert '\n' not in str(error.value)
  assert snapshot(workdir) == before
  assert not marker.exists()


@pytest.mark.parametrize('name', SCRIPTS)
def test_the_checkpoint_carries_its_config_and_refuses_another(name, idx_dir, tmp_path):
  module, _ = module_and_config(name)
  workdir = str(tmp_path / 'run')
  a_run_with_one_checkpoint(module, small_config(name, idx_dir), workdir)
  os.remove(os.path.join(workdir, 'config.json'))  # only the checkpoint knows the config now
  before = snapshot(workdir)
  for change, field in ((dict(learning_rate=0.5), 'learning_rate'),
                        (dict(hidden_sizes=(32, 8)), 'hidden_sizes')):
    with pytest.raises(module.ConfigError, match=f'made with a different config .{field}'):
      module.train_and_evaluate(small_config(name, idx_dir, **change), workdir)
    assert snapshot(workdir) == before


def test_a_failing_disk_keeps_the_previous_checkpoint(idx_dir, tmp_path, monkeypatch):
  config = small_config('fmnist_mlp', idx_dir)
  workdir = str(tmp_path / 'run')
  run = a_run_with_one_checkpoint(fmnist_mlp, config, workdir)
  before = snapshot(workdir)

  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(harness.np, 'savez', full_disk)
  with pytest.raises(OSError):
    run.save(2, {'epoch': 2}, {'w': np.zeros(3)})
  after = snapshot(workdir)  # the row of epoch 2 is written first, then the checkpoint fails
  assert after.pop('metrics.jsonl') != before.pop('metrics.jsonl') and after == before
  monkeypatch.setattr(harness.json, 'dumps', full_disk)
  with pytest.raises(OSError):
    run.write_metrics([{'epoch': 1}])
  assert set(os.listdir(workdir)) == {'checkpoint.npz', 'config.json', 'metrics.jsonl'}  # no .tmp


def test_damaged_data_and_unprepared_tfds_are_one_line_errors(idx_dir, tmp_path):
  name, module = 'fmnist_mlp', fmnist_mlp  # fmnist_feedback.py reads its data with it
  for content in (b'garbage' * 20, None):
    folder = tmp_path / ('garbage' if content else 'truncated')
    folder.mkdir()
    for f in os.listdir(idx_dir):
      with open(os.path.join(idx_dir, f), 'rb') as fh:
        data = fh.read()
      spoil(folder / f, content if content else data[:len(data) // 2])
    with pytest.raises(module.ConfigError, match='damaged or not a gzipped') as error:
      module.load_data(small_config(name, str(folder)))
    assert '\n' not in str(error.value)
  start = time.time()
  with pytest.raises(module.ConfigError, match='not prepared'):
    module.load_data(small_config(name, '', data_source='tfds',
                                  tfds_data_dir=str(tmp_path / 'tfds')))
  assert time.time() - start < 20  # no download retries


# ---------------------------------------------------------------- the command line

CLI_CASES = [
    (['--config.lerning_rate=1'], 'learning_rate'),  # misspelt: names the right field
    (['--config=configs/nope.py'], 'nope.py'),
    (['--config.hidden_sizes=(64.5,)'], 'hidden_sizes must be a tuple of >= 1 positive integers'),
    (['--config.learning_rate=nan'], 'learning_rate must be finite'),
    (['--config.seed=-1'], 'seed must be >= 0'),
    (['--workdir=/proc/no/such/folder'], 'cannot write the workdir'),
]


@pytest.mark.parametrize('name', SCRIPTS)
@pytest.mark.parametrize('args, message', CLI_CASES)
def test_cli_errors_are_one_line_without_traceback(name, args, message, tmp_path):
  workdir = [] if any(a.startswith('--workdir') for a in args) else [f'--workdir={tmp_path}/w']
  out = scripts.run_script(f'{name}.py', [f'--config=configs/{name}.py', *workdir, *args])
  assert out.returncode == 1, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f'{name}.py: error: ') and message in last, last
  assert not os.path.exists(tmp_path / 'w' / 'checkpoint.npz')


def test_workdir_naming_a_file_is_refused(tmp_path):
  path = tmp_path / 'a_file'
  spoil(path, b'keep me')
  out = scripts.run_script('fmnist_mlp.py', [f'--workdir={path}'])
  assert out.returncode == 1 and 'is a file, not a folder' in out.stderr.strip().splitlines()[-1]
  assert path.read_bytes() == b'keep me'


def test_without_workdir_a_default_folder_is_derived_from_the_config(idx_dir, tmp_path):
  module, _ = module_and_config('fmnist_mlp')
  a, b = small_config('fmnist_mlp', idx_dir), small_config('fmnist_mlp', idx_dir, seed=1)
  assert module.default_workdir(a) != module.default_workdir(b)
  longer = small_config('fmnist_mlp', idx_dir, num_epochs=7)  # extending a run: same folder
  assert module.default_workdir(a) == module.default_workdir(longer)
  assert module.default_workdir(a).startswith(os.path.join('runs', 'fmnist_mlp', 'hep2_beta0.05'))


# -------------------------------------------- divergence, resume, metrics, kill -9

@pytest.mark.parametrize('name', SCRIPTS)
def test_a_finite_blow_up_stops_like_a_nan_run(name, idx_dir, tmp_path):
  workdir = tmp_path / 'run'
  out = scripts.run_script(f'{name}.py', [
      f'--config=configs/{name}.py', f'--workdir={workdir}', f'--config.data_dir={idx_dir}',
      *SMALL, '--config.num_epochs=2', '--config.batch_size=20', '--config.learning_rate=1e3',
      '--config.max_train_loss=3.0'])
  assert out.returncode == 1, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert 'diverged in epoch' in last and 'Traceback' not in out.stderr, last
  rows = read_rows(str(workdir))
  assert rows[-1]['diverged']
  if len(rows) == 1:
    assert not (workdir / 'checkpoint.npz').exists() and 'no checkpoint was written' in last


def test_metrics_are_strict_json(tmp_path):
  _, config = module_and_config('fmnist_mlp')
  run = harness.Workdir(str(tmp_path), config, fmnist_mlp.RESUMABLE_FIELDS)
  run.write_metrics([{'epoch': 1, 'a': NAN, 'b': [1.0, INF]}])
  text = (tmp_path / 'metrics.jsonl').read_text()
  assert 'NaN' not in text and 'Infinity' not in text
  assert json.loads(text) == {'epoch': 1, 'a': None, 'b': [1.0, None]}


def checkpoint_arrays(workdir):
  with np.load(os.path.join(workdir, 'checkpoint.npz'), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def test_kill_9_then_resume_is_bit_identical_and_a_lost_metrics_file_is_reported(idx_dir,
                                                                                tmp_path):
  # Three epochs: the kill lands after the first checkpoint, and on a loaded machine the
  # test may see that file late, after a later epoch; only after the last is there
  # nothing left to resume.
  args = ['--config=configs/fmnist_mlp.py', f'--config.data_dir={idx_dir}', *SMALL,
          '--config.num_epochs=3', '--config.homeo_coef=0.5']
  straight = str(tmp_path / 'straight')
  out = scripts.run_script('fmnist_mlp.py', [*args, f'--workdir={straight}'])
  assert out.returncode == 0, out.stderr[-3000:]

  killed = str(tmp_path / 'killed')
  proc = subprocess.Popen([sys.executable, 'fmnist_mlp.py', *args, f'--workdir={killed}'],
                          cwd=scripts.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not os.path.exists(os.path.join(killed, 'checkpoint.npz')) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert checkpoint_arrays(killed)  # the checkpoint on disk is whole
  killed_after = json.loads(str(checkpoint_arrays(killed)['meta']))['epoch']
  os.remove(os.path.join(killed, 'metrics.jsonl'))
  out = scripts.run_script('fmnist_mlp.py', [*args, f'--workdir={killed}'])
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'resuming from {killed} after epoch {killed_after}' in out.stderr
  assert 'metrics.jsonl is missing' in out.stderr
  a, b = checkpoint_arrays(straight), checkpoint_arrays(killed)
  assert a.keys() == b.keys()
  for k in a:
    if k != 'meta':
      np.testing.assert_array_equal(a[k], b[k])
  if killed_after < 3:  # the resumed run wrote the epochs after the kill
    assert [r['epoch'] for r in read_rows(killed)] == list(range(killed_after + 1, 4))


def test_the_train_step_compiles_once(idx_dir, tmp_path):
  out = scripts.run_script('fmnist_mlp.py', [
      '--config=configs/fmnist_mlp.py', f'--workdir={tmp_path}', f'--config.data_dir={idx_dir}',
      *SMALL, '--config.num_epochs=2'], env={'JAX_LOG_COMPILES': '1'})
  assert out.returncode == 0, out.stderr[-3000:]
  # pmap'd functions compile as jit(_fun); the train step is the one that takes the training
  # batch (50 images; evaluation batches are 20).
  compiles = [l for l in out.stderr.splitlines()
              if 'Compiling jit(_fun)' in l and 'uint8[1,50,784]' in l]
  assert len(compiles) == 1, len(compiles)


# -------------------------------------------- one bad sample does not end a long run

def test_a_non_finite_sample_is_dropped_from_the_gradient_and_counted():
  from tiny import BATCH, free_fixed_point, tiny_mlp  # pylint: disable=g-import-not-at-top
  m, _ = module_and_config('fmnist_mlp')
  config, params, x, labels = tiny_mlp()
  u_free = free_fixed_point(config, params, x)
  s_free = m.activate(u_free)
  error = m.rbp_error(config, params, m.input_drive(params, x), labels, u_free)
  poisoned = tuple(e.at[1].set(np.nan if l else np.inf) for l, e in enumerate(error))
  zeroed = tuple(e.at[1].set(0.0) for e in error)
  grads, dropped = m.network_grads(params, x, s_free, poisoned)
  expected, none = m.network_grads(params, x, s_free, zeroed)
  assert int(dropped) == 1 and int(none) == 0
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected)):
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
  full, _ = m.network_grads(params, x, s_free, error)
  assert not np.allclose(full['forward'][1]['w'], grads['forward'][1]['w'])
  assert BATCH > 2  # the other samples still count


@pytest.mark.parametrize('name', SCRIPTS)
def test_training_survives_a_broken_sample_and_reports_it(name, idx_dir, tmp_path,
                                                          monkeypatch):
  module, _ = module_and_config(name)
  real = common.cauchy_estimate

  def breaks_sample_0(*args):  # as a complex relaxation leaving the holomorphic region would
    return tuple(e.at[0].set(np.nan) for e in real(*args))

  monkeypatch.setattr(common, 'cauchy_estimate', breaks_sample_0)
  config = small_config(name, idx_dir, algorithm='hep', n_points=4, beta=0.5, batch_size=20,
                        log_every_steps=1)
  rows = module.train_and_evaluate(config, str(tmp_path / 'run'))
  assert rows[-1]['dropped_samples'] == 100 // 20  # one per step, over the 5 steps
  assert np.isfinite(rows[-1]['train_loss']) and 'diverged' not in rows[-1]

"""fmnist_mlp.py end to end, and the skeleton it shares with fmnist_feedback.py, tried as a
hostile user would.

Data, every algorithm, resume, multi-device. Every case of the skeleton runs against both
scripts that carry it (fmnist_feedback.py runs fmnist_mlp.py's train_and_evaluate; the parts of
it that live in harness.py are tried once, in tests/test_harness.py). Bad input must give one
line (no traceback) before any compute and leave the files that were there untouched; a run
that blows up (finite or not) stops like a NaN run; a killed run resumes bit-identically.

Training runs in subprocesses (float32, as users run it; fake CPU devices need their own
process). Data come from small IDX files (the idx_dir fixture) and the Debian package.
"""
import gzip
import importlib
import json
import os
import pickle
import time

import jax
import numpy as np
import pytest

import common
import fmnist_mlp
import harness
from configs import fmnist_mlp as mlp_config
from helpers import (BATCH, MLP_SMALL_ARGS, Exploit, free_fixed_point, read_rows, run_cases,
                     run_script, snapshot, tiny_mlp)

SCRIPTS = ['fmnist_mlp', 'fmnist_feedback']



def module_and_config(name):
  module = importlib.import_module(name)
  config = importlib.import_module(f'configs.{name}').get_config()
  return module, config


def small_config(name, idx_dir, **overrides):
  _, config = module_and_config(name)
  config.update(dict(data_dir=idx_dir, hidden_sizes=(32, 16), t_free=30, t_nudge=8,
                     train_size=100, test_size=60, eval_batch_size=20, diag_batch_size=10,
                     diag_jacobian_samples=2, num_epochs=1, log_every_steps=0), **overrides)
  return config


def spoil(path, content):
  with open(path, 'wb') as f:
    f.write(content)


# ---------------------------------------------------------------------------- data

def test_idx_files_are_read_exactly(idx_dir):
  config = mlp_config.get_config()
  config.data_dir = idx_dir
  data = fmnist_mlp.load_data(config)
  assert data.train.images.shape == (200, 784) and data.train.images.dtype == np.uint8
  assert data.test.images.shape == (100, 784) and data.test.labels.shape == (100,)
  with gzip.open(os.path.join(idx_dir, 'train-labels-idx1-ubyte.gz')) as f:
    raw = np.frombuffer(f.read()[8:], np.uint8)
  np.testing.assert_array_equal(data.train.labels, raw)


def test_debian_fashion_mnist_is_found_automatically():
  data = fmnist_mlp.load_data(mlp_config.get_config())
  assert data.train.images.shape == (60000, 784) and data.test.images.shape == (10000, 784)
  assert set(np.unique(data.train.labels)) == set(range(10))
  assert data.train.images.max() == 255


def test_tfds_loading_code_runs_on_mock_data():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    data = fmnist_mlp.read_prepared_tfds('')
  assert data['train'][0].shape == (12, 784) and data['train'][0].dtype == np.uint8
  assert data['test'][1].shape == (12,)


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
    fmnist_mlp.check_config(config, num_local_devices=2)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('name', SCRIPTS)
def test_the_default_config_passes_and_both_share_the_update_order_name(name):
  module, config = module_and_config(name)
  before = config.to_json()
  assert fmnist_mlp.check_config(config, num_local_devices=1) == 1
  assert config.layer_updates == 'sequential' and config.to_json() == before


# ------------------------------------------------------- n = 0, missing or damaged data

def test_n_zero_means_the_exact_derivative_and_the_check_changes_nothing():
  config = mlp_config.get_config()
  config.n_points = 0
  before = config.to_json()
  fmnist_mlp.check_config(config, num_local_devices=1)
  assert config.to_json() == before
  assert fmnist_mlp.estimator(config) == 'hep_exact'
  assert os.path.basename(fmnist_mlp.default_workdir(config)).startswith('hep_exact_homeo0_')


def test_missing_data_is_a_one_line_error(tmp_path):
  config = mlp_config.get_config()
  config.data_dir = str(tmp_path)
  with pytest.raises(fmnist_mlp.ConfigError, match='IDX files missing'):
    fmnist_mlp.load_data(config)


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


# --------------------------------------------- a damaged run folder: one line, nothing lost
# (Every kind of damage, against harness.Workdir itself: tests/test_harness.py.)

def a_run_with_one_checkpoint(module, config, workdir):
  """A workdir as a finished epoch 1 leaves it (config.json, metrics, checkpoint)."""
  run = harness.Workdir(workdir, config, fmnist_mlp.RESUMABLE_FIELDS)
  run.start()
  params = module.init_params(jax.random.PRNGKey(0), config)
  state = (params, fmnist_mlp.make_optimizer(config, None).init(params))
  run.save(1, {'epoch': 1, 'train_loss': 2.3}, jax.device_get(state))
  return run


@pytest.mark.parametrize('name', SCRIPTS)
def test_a_pickled_checkpoint_is_a_one_line_error_and_the_workdir_stays_as_it_was(name, idx_dir,
                                                                                   tmp_path):
  module, _ = module_and_config(name)
  config = small_config(name, idx_dir)
  workdir = str(tmp_path / 'run')
  a_run_with_one_checkpoint(module, config, workdir)
  marker = tmp_path / 'unpickled'
  spoil(os.path.join(workdir, 'checkpoint.npz'), pickle.dumps(Exploit(str(marker))))
  before = snapshot(workdir)
  with pytest.raises(module.ConfigError, match='damaged or not a checkpoint') as error:
    module.train_and_evaluate(config, workdir)
  assert '\n' not in str(error.value)
  assert snapshot(workdir) == before
  assert not marker.exists()


# ---------------------------------------------------------------- the command line
# (Bad input on the command line of both scripts: tests/test_harness.py.)

def test_without_workdir_a_default_folder_is_derived_from_the_config(idx_dir, tmp_path):
  module, _ = module_and_config('fmnist_mlp')
  a, b = small_config('fmnist_mlp', idx_dir), small_config('fmnist_mlp', idx_dir, seed=1)
  assert module.default_workdir(a) != module.default_workdir(b)
  longer = small_config('fmnist_mlp', idx_dir, num_epochs=7)  # extending a run: same folder
  assert module.default_workdir(a) == module.default_workdir(longer)
  assert module.default_workdir(a).startswith(os.path.join('runs', 'fmnist_mlp', 'hep2_beta0.05'))


# ----------------------------------------------------------------- training runs

@pytest.mark.slow
def test_every_algorithm_trains(idx_dir, tmp_path):
  """One short epoch per estimator, N = 4 and 6 (complex arithmetic) included."""
  code = f'''
import json, sys
import fmnist_mlp
from configs import fmnist_mlp as mlp_config
# (hEP N = 2 with homeostasis: the session's shared run, conftest.mlp_run.)
runs = [dict(algorithm='hep', n_points=1, beta=0.05),
        dict(algorithm='hep', n_points=4, beta=0.5), dict(algorithm='hep', n_points=6, beta=0.5),
        dict(algorithm='hep_exact', homeo_coef=1.0),
        dict(algorithm='hep_continuous', n_points=4, beta=0.5, continuous_steps_per_point=6,
             continuous_periods=2),
        dict(algorithm='rbp'), dict(algorithm='bptt', optimizer='adam', learning_rate=1e-4)]
for i, run in enumerate(runs):
  config = mlp_config.get_config()
  config.update(dict(data_dir={idx_dir!r}, hidden_sizes=(32, 16), t_free=30, t_nudge=8,
                     train_size=100, test_size=60, eval_batch_size=20, batch_size=20,
                     diag_batch_size=10, diag_jacobian_samples=2, num_epochs=1,
                     log_every_steps=0), **run)
  row = fmnist_mlp.train_and_evaluate(config, {str(tmp_path)!r} + f'/run{{i}}')[-1]
  print(json.dumps(dict(run, **row)))
'''
  out = run_script('-c', [code])
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(l) for l in out.stdout.splitlines() if l.startswith('{')]
  assert len(rows) == 7
  for row in rows:
    assert np.isfinite(row['train_loss']) and 0 <= row['test_error'] <= 100, row
    assert 0.5 < row['diag/symmetry'] <= 1 and len(row['diag/cosine_exact']) == 3
    assert ('diag/cosine_estimate' in row) == (row['algorithm'] in ('hep', 'hep_continuous'))
  assert 'train_homeo_loss' in rows[3] and 'log10_residual' not in rows[4]


@pytest.mark.slow
def test_a_run_writes_its_rows_its_config_and_a_checkpoint(mlp_run):
  """The session's shared run (conftest.mlp_run): 3 epochs from the command line."""
  assert 'step 2/2' in mlp_run['log']  # the progress display
  rows = read_rows(mlp_run['workdir'])
  assert [r['epoch'] for r in rows] == [1, 2, 3]
  for row in rows:
    for key in ('train_loss', 'train_accuracy', 'test_error', 'epoch_time_s', 'log10_residual',
                'train_homeo_loss', 'diag/symmetry', 'diag/cosine_exact',
                'diag/cosine_estimate', 'diag/weight_angle', 'diag/homeo_loss',
                'diag/homeo_loss_exact'):
      assert key in row, key
    assert np.isfinite(row['train_loss']) and 0 <= row['test_error'] <= 100
    assert len(row['diag/cosine_exact']) == 3 and len(row['diag/weight_angle']) == 2
  assert rows[0]['train_loss'] != rows[2]['train_loss']  # it trained
  assert os.path.exists(os.path.join(mlp_run['workdir'], 'checkpoint.npz'))
  with open(os.path.join(mlp_run['workdir'], 'config.json')) as f:
    saved = json.load(f)
  assert saved['hidden_sizes'] == [32, 16] and saved['homeo_coef'] == 0.5


# ---------------------------------------- divergence, compiles
# (kill -9 and resume, SIGTERM, a second run: tests/test_harness.py)

@pytest.mark.slow
@pytest.mark.parametrize('name', SCRIPTS)
def test_a_nan_run_and_a_finite_blow_up_stop_with_one_line(name, idx_dir, tmp_path):
  """A loss that becomes NaN (learning rate 1e38) and one that stays finite but exceeds
  max_train_loss both stop the run: one line, the row marked diverged, the last good
  checkpoint kept (none after epoch 1). Both cases from one interpreter (run_cases)."""
  base = [f'--config=configs/{name}.py', f'--config.data_dir={idx_dir}', *MLP_SMALL_ARGS,
          '--config.num_epochs=2', '--config.batch_size=20']
  nan, finite = tmp_path / 'nan', tmp_path / 'finite'
  results = run_cases(f'{name}.py', [
      [*base, f'--workdir={nan}', '--config.learning_rate=1e38'],
      [*base, f'--workdir={finite}', '--config.learning_rate=1e3', '--config.max_train_loss=3.0']])
  for workdir, (code, err) in zip((nan, finite), results):
    last = err.strip().splitlines()[-1]
    assert code == 1 and 'diverged in epoch' in last and 'Traceback' not in err, err[-2000:]
    rows = read_rows(str(workdir))
    assert rows[-1]['diverged']
    if len(rows) == 1:
      assert not (workdir / 'checkpoint.npz').exists() and 'no checkpoint was written' in last
  assert 'diverged in epoch 1' in results[0][1]  # NaN from the first steps on


@pytest.mark.slow
def test_the_train_step_compiles_once(mlp_run):
  # pmap'd functions compile as jit(_fun); the train step is the one that takes the training
  # batch (50 images; evaluation batches are 20). Three epochs, one compile.
  compiles = [l for l in mlp_run['log'].splitlines()
              if 'Compiling jit(_fun)' in l and 'uint8[1,50,784]' in l]
  assert len(compiles) == 1, len(compiles)


# -------------------------------------------- one bad sample does not end a long run

def test_a_non_finite_sample_is_dropped_from_the_gradient_and_counted():
  m, _ = module_and_config('fmnist_mlp')
  config, params, x, labels = tiny_mlp()
  u_free = free_fixed_point(config, params, x)
  s_free = m.activate(u_free)
  error = m.rbp_error(config, params, m.input_drive(params, x), labels, u_free)
  poisoned = tuple(e.at[1].set(np.nan if l else np.inf) for l, e in enumerate(error))
  zeroed = tuple(e.at[1].set(0.0) for e in error)
  grads, dropped = m.network_grads(config, params, x, s_free, poisoned)
  expected, none = m.network_grads(config, params, x, s_free, zeroed)
  assert int(dropped) == 1 and int(none) == 0
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected)):
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
  full, _ = m.network_grads(config, params, x, s_free, error)
  assert not np.allclose(full['forward'][1]['w'], grads['forward'][1]['w'])
  assert BATCH > 2  # the other samples still count


@pytest.mark.slow
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

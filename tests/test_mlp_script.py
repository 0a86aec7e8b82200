"""fmnist_mlp.py end to end: data, bad input, every algorithm, resume, multi-device.

Training runs in subprocesses (float32, as users run it; fake CPU devices need their own
process). Data come from small IDX files (the idx_dir fixture) and the Debian package.
"""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fmnist_mlp
from configs import fmnist_mlp as mlp_config
import scripts
from scripts import TWO_DEVICES, ROOT, SMALL, read_rows


def run_script(args, env=None):
  return scripts.run_script('fmnist_mlp.py', args, env)


# ---------------------------------------------------------------------------- data

def test_idx_files_are_read_exactly(idx_dir):
  config = mlp_config.get_config()
  config.data_dir = idx_dir
  data = fmnist_mlp.load_data(config)
  assert data['train'][0].shape == (200, 784) and data['train'][0].dtype == np.uint8
  assert data['test'][0].shape == (100, 784) and data['test'][1].shape == (100,)
  with gzip.open(os.path.join(idx_dir, 'train-labels-idx1-ubyte.gz')) as f:
    raw = np.frombuffer(f.read()[8:], np.uint8)
  np.testing.assert_array_equal(data['train'][1], raw)


def test_debian_fashion_mnist_is_found_automatically():
  data = fmnist_mlp.load_data(mlp_config.get_config())
  assert data['train'][0].shape == (60000, 784) and data['test'][0].shape == (10000, 784)
  assert set(np.unique(data['train'][1])) == set(range(10))
  assert data['train'][0].max() == 255


def test_tfds_loading_code_runs_on_mock_data():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    data = fmnist_mlp.load_tfds('')
  assert data['train'][0].shape == (12, 784) and data['train'][0].dtype == np.uint8
  assert data['test'][1].shape == (12,)


# ----------------------------------------------------------------------- bad input

# The table of bad config fields, shared by every script: tests/test_skeleton.py.


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


def test_cli_reports_bad_input_before_compiling(tmp_path):
  out = run_script([f'--workdir={tmp_path}', '--config.n_points=-2'])
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith('fmnist_mlp.py: error: n_points')
  out = run_script([f'--workdir={tmp_path}', f'--config.data_dir={tmp_path}/none'])
  assert out.returncode == 1 and 'IDX files missing' in out.stderr
  assert not os.path.exists(tmp_path / 'checkpoint.npz')


# ----------------------------------------------------------------- training runs

def test_every_algorithm_trains(idx_dir, tmp_path):
  """One short epoch per estimator, N = 4 and 6 (complex arithmetic) included."""
  code = f'''
import json, sys
import fmnist_mlp
from configs import fmnist_mlp as mlp_config
runs = [dict(algorithm='hep', n_points=1, beta=0.05), dict(algorithm='hep', n_points=2),
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
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(l) for l in out.stdout.splitlines() if l.startswith('{')]
  assert len(rows) == 8
  for row in rows:
    assert np.isfinite(row['train_loss']) and 0 <= row['test_error'] <= 100, row
    assert 0.5 < row['diag/symmetry'] <= 1 and len(row['diag/cosine_exact']) == 3
    assert ('diag/cosine_estimate' in row) == (row['algorithm'] in ('hep', 'hep_continuous'))
  assert 'train_homeo_loss' in rows[4] and 'log10_residual' not in rows[5]


def test_training_writes_metrics_and_a_checkpoint_and_resumes(idx_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  args = [f'--workdir={workdir}', f'--config.data_dir={idx_dir}', *SMALL]
  first = run_script([*args, '--config.num_epochs=1'])
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'step 2/2' in first.stderr  # the progress display
  rows = read_rows(workdir)
  assert [r['epoch'] for r in rows] == [1]
  for key in ('train_loss', 'train_accuracy', 'test_error', 'epoch_time_s', 'log10_residual',
              'diag/symmetry', 'diag/cosine_exact', 'diag/cosine_estimate',
              'diag/weight_angle', 'diag/homeo_loss', 'diag/homeo_loss_exact'):
    assert key in rows[0], key
  assert os.path.exists(os.path.join(workdir, 'checkpoint.npz'))
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['hidden_sizes'] == [32, 16]

  second = run_script([*args, '--config.num_epochs=2'])
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'resuming' in second.stderr and 'epoch 1  step' not in second.stderr
  rows2 = read_rows(workdir)
  assert [r['epoch'] for r in rows2] == [1, 2] and rows2[0] == rows[0]

  # (That a resumed run ends bit-identical to an uninterrupted one: test_skeleton.py.)
  changed = run_script([*args, '--config.num_epochs=3', '--config.beta=0.1'])
  assert changed.returncode == 1 and 'different config (beta)' in changed.stderr


def test_two_devices_give_the_same_update_as_one(idx_dir):
  code = '''
import jax, numpy as np
import fmnist_mlp
import harness
from configs import fmnist_mlp as mlp_config
assert jax.local_device_count() == 2
results = []
for devices in (1, 2):
  config = mlp_config.get_config()
  config.update(dict(hidden_sizes=(32, 16), t_free=30, t_nudge=8, homeo_coef=1.0,
                     batch_size=8, num_devices=devices))
  fmnist_mlp.check_config(config, 2)
  params = fmnist_mlp.init_params(jax.random.PRNGKey(0), config)
  optimizer = fmnist_mlp.make_optimizer(config)
  state = harness.replicate((params, optimizer.init(params)), devices)
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (devices, 8 // devices, 784), dtype=np.uint8)
  y = rng.integers(0, 10, (devices, 8 // devices)).astype(np.int32)
  new, _, metrics = fmnist_mlp.make_train_step(config, optimizer)(*state, 3, x, y)
  results.append(jax.tree_util.tree_map(lambda a: np.asarray(a[0]), new))
  assert np.asarray(metrics['loss']).shape == (devices,)
diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(),
                                                         *results))
moved = np.abs(results[0]['forward'][0]['w'] - np.asarray(params['forward'][0]['w'])).max()
print('MAXDIFF', max(diffs), 'MOVED', moved)
'''
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       check=False,
                       env={**os.environ,
                            'XLA_FLAGS': TWO_DEVICES})
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith('MAXDIFF')][0].split()
  assert float(line[1]) < 1e-6 and float(line[3]) > 1e-5, line


def test_two_device_training_run(idx_dir, tmp_path):
  out = run_script([f'--workdir={tmp_path}', f'--config.data_dir={idx_dir}', *SMALL,
                    '--config.num_epochs=1', '--config.batch_size=20'],
                   env={'XLA_FLAGS': TWO_DEVICES})
  assert out.returncode == 0, out.stderr[-3000:]
  assert np.isfinite(read_rows(str(tmp_path))[0]['train_loss'])


def test_divergence_is_reported(idx_dir, tmp_path):
  out = run_script([f'--workdir={tmp_path}', f'--config.data_dir={idx_dir}', *SMALL,
                    '--config.num_epochs=1', '--config.batch_size=20',
                    '--config.learning_rate=1e38'])
  assert out.returncode == 1
  assert 'diverged in epoch 1' in out.stderr.strip().splitlines()[-1]
  assert read_rows(str(tmp_path))[0]['diverged'] and not os.path.exists(
      tmp_path / 'checkpoint.npz')

"""cifar_conv.py end to end on TFDS mock data (CIFAR cannot be downloaded here): metrics,
checkpoint, resume, top-5 for CIFAR-100, two fake CPU devices, bad input.

Training runs in subprocesses (float32, as users run it; fake devices need their own
process), on a reduced-width network with short relaxations.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import cifar_conv
import harness
from configs import cifar10 as cifar10_config
from configs import cifar100 as cifar100_config
from scripts import TWO_DEVICES, ROOT, read_rows

SMALL = dict(channels=(4, 8, 8, 8), t_free=12, t_nudge=6, train_size=32, test_size=16,
             batch_size=16, eval_batch_size=8, diag_batch_size=4, diag_symmetry_probes=2,
             homeo_draws=2, log_every_steps=1)

RUN = '''
import json, sys
import tensorflow_datasets as tfds
from absl import logging
import cifar_conv
import harness
from configs import cifar10, cifar100
logging.set_verbosity(logging.INFO)  # the progress lines, as under app.run
# mock_data fakes the preparation; skip the download checks (TensorFlow, internet).
harness.preparation_problem = lambda name, data_dir, url: None
save = harness.Workdir.save

def save_then_die(self, epoch, row, state):  # as a kill right after a checkpoint
  save(self, epoch, row, state)
  raise KeyboardInterrupt

for name, workdir, overrides, killed in json.loads(sys.argv[1]):
  config = {'cifar10': cifar10, 'cifar100': cifar100}[name].get_config()
  config.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
  harness.Workdir.save = save_then_die if killed else save
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    try:
      rows = cifar_conv.train_and_evaluate(config, workdir)
      print('ROW', json.dumps(rows[-1]))
    except KeyboardInterrupt:
      print('KILLED')
'''


def run(runs, env=None):
  out = subprocess.run([sys.executable, '-c', RUN, json.dumps(runs)], cwd=ROOT,
                       capture_output=True, text=True, check=False,
                       env={**os.environ, **(env or {})})
  assert out.returncode == 0, out.stderr[-3000:]
  return out, [json.loads(l[4:]) for l in out.stdout.splitlines() if l.startswith('ROW ')]


def test_mock_cifar10_and_cifar100_train_write_metrics_and_a_checkpoint_and_resume(tmp_path):
  hundred, ten = str(tmp_path / 'c100'), str(tmp_path / 'c10')
  two = dict(SMALL, num_epochs=2)
  out, (row10,) = run([('cifar100', hundred, two, True),  # killed after its first checkpoint
                       ('cifar10', ten, dict(SMALL, num_epochs=1, algorithm='hep',
                                             n_points=2, homeo_coef=0.0), False)])
  assert 'workdir: ' in out.stderr and 'step 2/2' in out.stderr and 'KILLED' in out.stdout
  assert [r['epoch'] for r in read_rows(hundred)] == [1]
  # The killed run resumes after its epoch-1 checkpoint, on another log interval (a field
  # a resumed run may change). (Bit-identity of a resume: tests/test_skeleton.py.)
  out, (row100,) = run([('cifar100', hundred, dict(two, log_every_steps=2), False)])
  assert 'resuming' in out.stderr and 'epoch 1  step' not in out.stderr
  rows = read_rows(hundred)
  assert [r['epoch'] for r in rows] == [1, 2] and rows[1] == row100
  for row in (row10, row100):
    for key in ('train_loss', 'train_accuracy', 'test_error', 'test_top5_error',
                'images_per_s', 'epoch_time_s', 'log10_residual', 'dropped_samples',
                'diag/symmetry', 'diag/cosine_exact', 'diag/weight_angle', 'diag/homeo_loss'):
      assert key in row, key
    assert np.isfinite(row['train_loss']) and 0 <= row['test_top5_error'] <= row['test_error']
    assert len(row['diag/cosine_exact']) == 4 and len(row['diag/weight_angle']) == 3
    assert 0.5 < row['diag/symmetry'] <= 1
    assert os.path.exists(os.path.join(ten, 'checkpoint.npz'))
    assert 'params_sha1' not in row  # one process: nothing to compare
  assert 'train_top5_accuracy' in row100 and 'train_homeo_loss' in row100
  assert 'diag/cosine_estimate' in row10 and 'train_homeo_loss' not in row10
  with open(os.path.join(hundred, 'config.json')) as f:
    saved = json.load(f)
  assert saved['dataset'] == 'cifar100' and saved['channels'] == [4, 8, 8, 8]
  # A longer run is a different run: num_epochs fixes the cosine schedule.
  longer = subprocess.run([sys.executable, '-c', RUN, json.dumps(
      [('cifar100', hundred, dict(SMALL, num_epochs=3), False)])], cwd=ROOT,
                          capture_output=True, text=True, check=False)
  assert longer.returncode != 0 and 'different config (num_epochs)' in longer.stderr


def test_two_devices_give_the_same_update_as_one():
  code = '''
import jax, numpy as np
import cifar_conv
import harness
from configs import cifar10
assert jax.local_device_count() == 2
info = cifar_conv.DATASETS['cifar10']
results = []
for devices in (1, 2):
  config = cifar10.get_config()
  config.update(dict(channels=(4, 8, 8, 8), t_free=12, t_nudge=6, homeo_draws=2,
                     batch_size=4, num_devices=devices))
  assert cifar_conv.check_config(config, 2) == devices
  params = cifar_conv.init_params(jax.random.PRNGKey(0), config)
  optimizer = cifar_conv.make_optimizer(config, 100)
  state = harness.replicate((params, optimizer.init(params)), devices)
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (devices, 4 // devices, 32, 32, 3), dtype=np.uint8)
  y = rng.integers(0, 10, (devices, 4 // devices)).astype(np.int32)
  new, _, metrics = cifar_conv.make_train_step(config, optimizer, (info['mean'], info['std']))(
      *state, np.int32(3), x, y)
  results.append(jax.tree_util.tree_map(lambda a: np.asarray(a[0]), new))
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


@pytest.mark.parametrize('overrides, message', [
    (dict(num_classes=100), 'num_classes=100 but cifar10 has 10 classes'),
    (dict(image_size=28), 'images are 32x32x3'),
    (dict(channels=(128,)), 'channels must be a tuple of >= 2 positive integers'),
    (dict(channels=()), 'channels must be a tuple of >= 2 positive integers'),
    (dict(channels=(8, 0, 8, 8)), 'channels must be a tuple of >= 2 positive integers'),
    (dict(channels=(8, 8, 8, 8, 8), lr_factors=(1.0,) * 6), 'does not fit 5 layers'),
    (dict(free_dtype='float8'), 'unknown free_dtype'),
    (dict(layer_updates='alternating'), 'unknown layer_updates'),
    (dict(learning_rate=float('nan')), 'learning_rate must be finite'),
    (dict(batch_size=255), 'not divisible by the 2 devices'),
    (dict(dataset='imagenet'), 'unknown dataset'),
])
def test_bad_config_is_a_one_line_error(overrides, message):
  config = cifar10_config.get_config()
  config.update(overrides)
  with pytest.raises(harness.ConfigError, match=message) as error:
    cifar_conv.check_config(config, num_local_devices=2)
  assert '\n' not in str(error.value)


def test_both_configs_pass_and_differ_only_in_the_data_set():
  ten, hundred = cifar10_config.get_config(), cifar100_config.get_config()
  for config in (ten, hundred):
    assert cifar_conv.check_config(config, 1) == 1
  differ = sorted(k for k in ten if ten[k] != hundred[k])
  assert differ == ['dataset', 'max_train_loss', 'num_classes']


def test_hep_with_no_points_runs_as_hep_exact_and_the_config_is_left_as_it_is():
  config = cifar10_config.get_config()
  assert cifar_conv.effective_algorithm(config) == config.algorithm == 'hep_exact'
  config.update(dict(algorithm='hep', n_points=0))
  assert cifar_conv.check_config(config, 1) == 1
  assert (config.algorithm, config.n_points) == ('hep', 0)  # the run config says what was asked
  assert cifar_conv.effective_algorithm(config) == 'hep_exact'
  config.n_points = 2
  assert cifar_conv.effective_algorithm(config) == 'hep'
  config.update(dict(algorithm='hep_continuous', n_points=1))
  with pytest.raises(harness.ConfigError, match='hep_continuous needs n_points >= 2, got 1'):
    cifar_conv.check_config(config, 1)


def test_the_user_command_fails_fast_without_the_data(tmp_path):
  out = subprocess.run([sys.executable, 'cifar_conv.py', '--config=configs/cifar10.py',
                        f'--config.tfds_data_dir={tmp_path}/none', f'--workdir={tmp_path}/w'],
                       cwd=ROOT, capture_output=True, text=True, check=False, timeout=120)
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('cifar_conv.py: error: cifar10 is not prepared'), last

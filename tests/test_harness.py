"""harness.py: the run machinery every script shares, tested once against the module itself.

A hostile user's workdir (damaged, someone else's, a pickle) is refused with one line and
left as it was; writes are atomic; one run at a time holds a workdir; SIGTERM stops a run
resumably; metrics are strict JSON; config fields are checked by table; the input machinery
(download checks, prefetch, ordered reads) and the process shards of an epoch. The scripts'
own use of it is covered by one smoke case each at the bottom.
"""
import errno
import http.server
import json
import os
import pickle
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
import pytest

import harness
import helpers
from helpers import Exploit, run_script, snapshot, write_idx

RESUMABLE = ('num_epochs', 'log_every_steps')


def config(**overrides):
  c = ml_collections.ConfigDict(dict(seed=0, learning_rate=0.1, hidden=(3, 2), name='a',
                                     num_epochs=2, log_every_steps=0, flag=True, batch_size=8,
                                     eval_batch_size=4, num_devices=0), type_safe=False)
  c.update(overrides)
  return c


def state(scale=1.0):
  return ({'w': scale * np.ones((3, 2), np.float32), 'b': [np.zeros(2, np.float32)]},
          {'count': np.int32(3)})


def a_run_after_one_epoch(path, c=None):
  """A workdir as a finished epoch 1 leaves it: config.json, metrics, checkpoint."""
  workdir = harness.Workdir(path, c or config(), RESUMABLE)
  workdir.start()
  workdir.save(1, {'epoch': 1, 'train_loss': 2.3}, state())
  return workdir


# ----------------------------------------------------------------------------- workdir

def test_a_new_workdir_is_written_only_by_start(tmp_path):
  path = str(tmp_path / 'run')
  workdir = harness.Workdir(path, config(), RESUMABLE)
  assert not os.path.exists(path)  # checking writes nothing (a failed start leaves nothing)
  workdir.start()
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['learning_rate'] == 0.1


def test_save_then_resume_restores_every_leaf_and_the_history(tmp_path):
  path = str(tmp_path / 'run')
  a_run_after_one_epoch(path)
  workdir = harness.Workdir(path, config(num_epochs=5), RESUMABLE)  # a resumable field
  restored, start_epoch = workdir.restore(state(scale=0.0))
  assert start_epoch == 2
  np.testing.assert_array_equal(restored[0]['w'], np.ones((3, 2)))
  assert restored[1]['count'] == 3 and restored[1]['count'].dtype == np.int32
  assert workdir.history == [{'epoch': 1, 'train_loss': 2.3}]


def test_a_checkpoint_of_another_network_is_refused(tmp_path):
  path = str(tmp_path / 'run')
  a_run_after_one_epoch(path)
  workdir = harness.Workdir(path, config(), RESUMABLE)
  other = ({'w': np.ones((3, 3), np.float32), 'b': [np.zeros(2, np.float32)]},
           {'count': np.int32(0)})
  with pytest.raises(harness.ConfigError, match='does not hold the parameters'):
    workdir.restore(other)


def test_rows_after_the_checkpoint_are_dropped_on_resume(tmp_path):
  path = str(tmp_path / 'run')
  workdir = a_run_after_one_epoch(path)
  workdir.write_metrics(workdir.history + [{'epoch': 2, 'train_loss': 1.0}])  # then killed
  assert harness.Workdir(path, config(), RESUMABLE).history == [{'epoch': 1, 'train_loss': 2.3}]


WORKDIR_CASES = {
    'truncated checkpoint': ('checkpoint.npz', 'truncate', 'damaged or not a checkpoint'),
    'garbage checkpoint': ('checkpoint.npz', b'garbage' * 10, 'damaged or not a checkpoint'),
    'empty checkpoint': ('checkpoint.npz', b'', 'damaged or not a checkpoint'),
    'pickled checkpoint': ('checkpoint.npz', 'pickle', 'damaged or not a checkpoint'),
    'invalid config.json': ('config.json', b'{"seed": 0,', 'not a JSON config'),
    'empty config.json': ('config.json', b'', 'not a JSON config'),
    'config.json of a list': ('config.json', b'[1, 2]', 'not a JSON config'),
    'config.json of another run': ('config.json', b'{"seed": 1}', 'different config .*seed'),
    'bad metrics line': ('metrics.jsonl', b'{"epoch": 1}\nnot json\n', 'line 2 is not a metrics'),
    'metrics row without epoch': ('metrics.jsonl', b'{"loss": 1}\n', 'line 1 is not a metrics'),
    'metrics of random bytes': ('metrics.jsonl', bytes(range(256)), 'line 1 is not a metrics'),
    'metrics with a repeated epoch': ('metrics.jsonl', b'{"epoch": 1}\n{"epoch": 1}\n',
                                      'line 2 repeats epoch 1'),
}


@pytest.mark.parametrize('case', sorted(WORKDIR_CASES))
def test_a_damaged_workdir_is_a_one_line_error_and_stays_as_it_was(case, tmp_path):
  path = str(tmp_path / 'run')
  a_run_after_one_epoch(path)
  target, content, message = WORKDIR_CASES[case]
  marker = tmp_path / 'unpickled'
  if content == 'truncate':
    content = (tmp_path / 'run' / target).read_bytes()[:200]
  elif content == 'pickle':
    content = pickle.dumps(Exploit(str(marker)))
  (tmp_path / 'run' / target).write_bytes(content)
  before = snapshot(path)
  with pytest.raises(harness.ConfigError, match=message) as error:
    harness.Workdir(path, config(), RESUMABLE)
  assert '\n' not in str(error.value)
  assert snapshot(path) == before
  assert not marker.exists()


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(harness.ConfigError, match='is a file, not a folder'):
    harness.Workdir(str(tmp_path / 'file'), config(), RESUMABLE)


def test_the_checkpoint_carries_its_config_and_refuses_another(tmp_path):
  path = str(tmp_path / 'run')
  a_run_after_one_epoch(path)
  os.remove(os.path.join(path, 'config.json'))  # only the checkpoint knows the config now
  before = snapshot(path)
  for change, field in ((dict(learning_rate=0.5), 'learning_rate'),
                        (dict(hidden=(3, 3)), 'hidden')):
    with pytest.raises(harness.ConfigError, match=f'made with a different config .{field}'):
      harness.Workdir(path, config(**change), RESUMABLE)
    assert snapshot(path) == before
  harness.Workdir(path, config(num_epochs=9, log_every_steps=3), RESUMABLE)  # resumable


def test_a_failing_disk_keeps_the_previous_files(tmp_path, monkeypatch):
  path = str(tmp_path / 'run')
  workdir = a_run_after_one_epoch(path)
  before = snapshot(path)

  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(harness.np, 'savez', full_disk)
  with pytest.raises(OSError):
    workdir.save(2, {'epoch': 2}, state())
  monkeypatch.setattr(harness.json, 'dumps', full_disk)
  with pytest.raises(OSError):
    workdir.write_metrics([{'epoch': 1}])
  # The checkpoint and config are intact and no .tmp is left behind (metrics.jsonl holds the
  # epoch-2 row written before the checkpoint failed; a resume drops it).
  after = snapshot(path)
  assert after['checkpoint.npz'] == before['checkpoint.npz']
  assert after['config.json'] == before['config.json']
  assert not [f for f in after if f.endswith('.tmp')]


def test_a_non_writer_touches_no_file(tmp_path):
  path = str(tmp_path / 'run')
  workdir = harness.Workdir(path, config(), RESUMABLE, writer=False)
  workdir.start()
  workdir.save(1, {'epoch': 1}, state())
  assert not os.path.exists(path)
  assert workdir.history == [{'epoch': 1}]


def test_one_run_holds_a_workdir_and_its_successor_reads_the_newest_files(tmp_path):
  path = str(tmp_path / 'run')
  first = a_run_after_one_epoch(path)  # started: holds the lock
  second = harness.Workdir(path, config(), RESUMABLE)  # checking needs no lock
  before = snapshot(path)
  with pytest.raises(harness.ConfigError, match=(
      f'{re.escape(path)} is in use by another run .pid {os.getpid()} on '
      f'{re.escape(socket.gethostname())}, started 2[0-9-]+ [0-9:]+ UTC.; wait for it')) as refused:
    second.start()
  assert '\n' not in str(refused.value) and snapshot(path) == before  # refused: wrote nothing
  assert harness.read_checkpoint(os.path.join(path, 'checkpoint.npz'))['epoch'] == 1  # reading
  first.save(2, {'epoch': 2}, state(2.0))  # after the second run's check
  first.close()
  second.start()  # checks again: resumes from the newer checkpoint
  assert second.restore(state(0.0))[1] == 3 and [r['epoch'] for r in second.history] == [1, 2]
  second.close()

  @harness.releases_workdirs
  def interrupted_run():
    workdir = harness.Workdir(path, config(), RESUMABLE)
    workdir.start()
    raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt) as interrupted:  # keeps the run's frame alive
    interrupted_run()
  third = harness.Workdir(path, config(), RESUMABLE)
  third.start()  # the decorator released the lock
  third.close()
  del interrupted


def test_metrics_are_strict_json(tmp_path):
  workdir = a_run_after_one_epoch(str(tmp_path / 'run'))
  workdir.write_metrics([{'epoch': 1, 'a': float('nan'), 'b': [1.0, float('inf')]}])
  text = (tmp_path / 'run' / 'metrics.jsonl').read_text()
  assert 'NaN' not in text and 'Infinity' not in text
  assert json.loads(text) == {'epoch': 1, 'a': None, 'b': [1.0, None]}


def test_the_lenient_reader_skips_bad_lines_and_keeps_the_last_row_of_an_epoch(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"epoch": 2, "x": 1}\nnot json\n{"epoch": 1}\n{"epoch": 2, "x": 2}\n[3]\n')
  assert harness.read_rows(str(path)) == [{'epoch': 1}, {'epoch': 2, 'x': 2}]
  assert harness.read_rows(str(tmp_path / 'missing')) == []


def test_the_default_workdir_name_is_settings_then_the_run_config_digest():
  a = harness.default_workdir('x.py', 'name', config(), RESUMABLE)
  assert a.startswith(os.path.join('runs', 'x', 'name-')) and len(a.split('-')[-1]) == 8
  assert harness.default_workdir('x.py', 'name', config(num_epochs=7), RESUMABLE) == a
  assert harness.default_workdir('x.py', 'name', config(seed=1), RESUMABLE) != a


# ----------------------------------------------------------------------------- config checks

SPEC = {'seed': (int, 0, 10), 'learning_rate': (float, None, None, 0), 'name': ('a', 'b'),
        'flag': bool}
FIELD_CASES = [
    (dict(seed=1.5), 'seed must be an integer'),
    (dict(seed=True), 'seed must be an integer'),
    (dict(seed=11), 'seed must be <= 10'),
    (dict(seed=-1), 'seed must be >= 0'),
    (dict(learning_rate=0.0), 'learning_rate must be > 0'),
    (dict(learning_rate=float('inf')), 'learning_rate must be finite'),
    (dict(learning_rate='x'), 'learning_rate must be a number'),
    (dict(name='c'), "unknown name 'c' .use one of a, b"),
    (dict(flag=1), 'flag must be True or False'),
]


@pytest.mark.parametrize('overrides,message', FIELD_CASES)
def test_every_bad_field_is_a_one_line_error(overrides, message):
  with pytest.raises(harness.ConfigError, match=message):
    harness.check_fields(config(**overrides), SPEC)


def test_a_good_config_passes_the_table_bounds_included():
  good = config()
  before = good.to_json()
  for overrides in (dict(seed=0), dict(seed=10), dict(learning_rate=1e-30), dict(name='b'),
                    dict(flag=False)):
    good.update(overrides)
    assert harness.check_fields(good, SPEC) is None  # no ConfigError at a bound
  harness.check_fields(config(), SPEC)
  assert config().to_json() == before  # and nothing changed


def test_the_batch_must_split_over_devices_and_processes():
  assert harness.check_devices(config(), 2) == 2
  assert harness.check_devices(config(num_devices=1), 2) == 1
  with pytest.raises(harness.ConfigError, match='only 2 local devices'):
    harness.check_devices(config(num_devices=4), 2)
  with pytest.raises(harness.ConfigError, match='batch_size=8 is not divisible by the 2 devices '
                     'x 3 processes'):
    harness.check_devices(config(), 2, 3)


def test_a_damaged_idx_file_is_a_one_line_error(tmp_path):
  write_idx(str(tmp_path / 'ok.gz'), np.arange(6).reshape(2, 3))
  np.testing.assert_array_equal(harness.read_idx(str(tmp_path / 'ok.gz')),
                                np.arange(6).reshape(2, 3))
  (tmp_path / 'bad.gz').write_bytes((tmp_path / 'ok.gz').read_bytes()[:12])
  (tmp_path / 'plain').write_bytes(b'\x00\x00\x08\x01\x00\x00\x00\x02ab')
  for name in ('bad.gz', 'plain'):
    with pytest.raises(harness.ConfigError, match='damaged or not a gzipped uint8 IDX') as e:
      harness.read_idx(str(tmp_path / name))
    assert '\n' not in str(e.value)


# ----------------------------------------------------------------------------- metrics

def test_progress_summarises_the_epoch_from_device_0():
  progress = harness.Progress(epoch=3, steps=2, batch_size=4, log_every=0, max_train_loss=5.0)
  for loss, residual, dropped in ((1.0, -3.0, 1), (2.0, -1.0, 0)):
    assert progress.add({'loss': np.array([loss, 99.0]), 'accuracy': np.array([0.5, 0.0]),
                         'log10_residual': np.array([residual, 0.0]),
                         'dropped_samples': np.array([dropped, 7])})
  row = progress.row(step=6)
  assert (row['epoch'], row['step'], row['train_loss'], row['train_accuracy']) == (3, 6, 1.5, 0.5)
  assert (row['log10_residual'], row['log10_residual_max']) == (-2.0, -1.0)
  assert row['dropped_samples'] == 1 and row['images_per_s'] > 0


def test_progress_stops_on_a_blown_up_loss_at_a_log_step():
  progress = harness.Progress(epoch=1, steps=9, batch_size=4, log_every=2, max_train_loss=5.0)
  metric = lambda loss: {'loss': np.array([loss]), 'accuracy': np.array([0.0])}
  assert progress.add(metric(9.0))  # not a log step yet
  assert not progress.add(metric(float('nan')))


def test_divergence_writes_the_row_keeps_the_checkpoint_and_raises(tmp_path):
  path = str(tmp_path / 'run')
  workdir = a_run_after_one_epoch(path)
  checkpoint = snapshot(path)['checkpoint.npz']
  harness.stop_if_diverged(workdir, {'epoch': 2, 'train_loss': 1.0}, state(), 5.0)  # fine
  with pytest.raises(FloatingPointError, match='diverged in epoch 2.*still holds epoch 1'):
    harness.stop_if_diverged(workdir, {'epoch': 2, 'train_loss': 1.0}, state(float('nan')), 5.0)
  rows = harness.read_rows(os.path.join(path, 'metrics.jsonl'))
  assert rows[-1] == {'epoch': 2, 'train_loss': 1.0, 'diverged': True}
  assert snapshot(path)['checkpoint.npz'] == checkpoint


# ----------------------------------------------------------------------------- input machinery
# (The scripts' data pipelines on it: tests/test_cifar_conv.py, tests/test_imagenet32_conv.py.)

def test_url_reachable(silent_server):
  start = time.time()
  assert not harness.url_reachable(silent_server, timeout_s=1.0)  # times out
  with socket.socket() as closed:  # bound, not listening: refuses connections
    closed.bind(('127.0.0.1', 0))
    assert not harness.url_reachable(f'http://127.0.0.1:{closed.getsockname()[1]}/x',
                                     timeout_s=1.0)
  assert time.time() - start < 30  # not TFDS's minutes of retries

  class Handler(http.server.BaseHTTPRequestHandler):

    def do_HEAD(self):  # pylint: disable=invalid-name
      self.send_response(200 if self.path == '/ok' else 404)
      self.end_headers()

    def log_message(self, *args):
      pass

  server = http.server.HTTPServer(('127.0.0.1', 0), Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    url = f'http://127.0.0.1:{server.server_address[1]}'
    assert harness.url_reachable(url + '/ok', timeout_s=2.0)
    assert not harness.url_reachable(url + '/missing', timeout_s=2.0)
  finally:
    server.shutdown()


def test_preparation_problem_without_tensorflow_or_internet(monkeypatch, silent_server):
  """harness.preparation_problem: one line each, in seconds, naming the data set, its folder
  and the way out; None when TensorFlow is there and the download reachable."""
  monkeypatch.setattr(harness, 'tensorflow_installed', lambda: False)
  monkeypatch.setattr(harness, 'url_reachable',
                      lambda *a, **k: pytest.fail('no download check without TensorFlow'))
  problem = harness.preparation_problem('cifar10', '/data/x', silent_server)
  assert problem.startswith('cifar10 is not prepared in /data/x; preparing it needs TensorFlow')
  assert 'tfds_data_dir' in problem and '\n' not in problem
  monkeypatch.undo()

  monkeypatch.setattr(harness, 'tensorflow_installed', lambda: True)
  start = time.time()
  problem = harness.preparation_problem('cifar100', '/data/y', silent_server)
  assert time.time() - start < 10
  assert problem.startswith('cifar100 is not prepared in /data/y and ')
  assert f'{silent_server} cannot be reached' in problem
  assert 'tfds_data_dir' in problem and '\n' not in problem
  monkeypatch.setattr(harness, 'url_reachable', lambda url: url == 'http://ok')
  assert harness.preparation_problem('cifar100', '/data/y', 'http://ok') is None


def test_prefetch():
  items = [np.full(3, i) for i in range(7)]
  out = list(harness.prefetch(iter(items), put=lambda a: a + 100, size=2))
  np.testing.assert_array_equal(out, [a + 100 for a in items])
  on_device = list(harness.prefetch(iter(items)))
  assert all(isinstance(a, jax.Array) for a in on_device)

  def failing():
    yield 1
    raise RuntimeError('broken source')
  with pytest.raises(RuntimeError, match='broken source'):
    list(harness.prefetch(failing(), put=lambda a: a))

  produced = []

  def endless():
    i = 0
    while True:
      produced.append(i)
      yield i
      i += 1
  gen = harness.prefetch(endless(), put=lambda a: a, size=2)
  assert [next(gen) for _ in range(3)] == [0, 1, 2]
  gen.close()  # stops and joins the thread
  count = len(produced)
  time.sleep(0.3)
  assert len(produced) == count <= 3 + 2 + 1


class SlowSplit:
  """read(indices) that takes longer for earlier batches: threads finish out of order."""

  def __len__(self):
    return 100

  def read(self, indices):
    time.sleep(0.02 * (5 - min(int(indices[0]) // 10, 5)))
    return indices * 2, indices


def test_read_batches_keeps_the_order_on_several_threads():
  batches = [np.arange(10 * i, 10 * i + 10) for i in range(8)]
  for threads in (1, 3):
    out = list(harness.read_batches(SlowSplit(), batches, threads))
    assert len(out) == 8
    for (x, y), idx in zip(out, batches):
      np.testing.assert_array_equal(y, idx)
      np.testing.assert_array_equal(x, 2 * idx)


# ----------------------------------------------------------------------------- process shards

@pytest.mark.parametrize('num_examples, batch_size, processes', [(1000, 64, 2), (999, 60, 3),
                                                                  (64, 16, 4)])
def test_process_shards_of_an_epoch_are_disjoint_and_form_the_global_batches(
    num_examples, batch_size, processes):
  shares = [harness.process_batch_indices(num_examples, batch_size, 7, 3, p, processes)
            for p in range(processes)]
  one = harness.process_batch_indices(num_examples, batch_size, 7, 3, 0, 1)
  steps = num_examples // batch_size
  for share in shares:
    assert share.shape == (steps, batch_size // processes)
  # Global batch i = the processes' shares of step i, in process order = one process's batch i.
  np.testing.assert_array_equal(np.concatenate(shares, axis=1), one)
  everything = np.concatenate([s.ravel() for s in shares])
  assert len(set(everything)) == len(everything) == steps * batch_size  # disjoint
  assert set(everything) <= set(range(num_examples))
  other_epoch = harness.process_batch_indices(num_examples, batch_size, 7, 4, 0, 1)
  assert not np.array_equal(other_epoch, one)  # reshuffled every epoch


@pytest.mark.parametrize('num_examples, batch_size, processes', [(50, 8, 2), (20, 6, 3),
                                                                  (7, 8, 4)])
def test_process_eval_blocks_cover_the_split_once_in_equal_numbers_of_calls(
    num_examples, batch_size, processes):
  calls = [harness.process_eval_indices(num_examples, batch_size, p, processes)
           for p in range(processes)]
  assert len({len(c) for c in calls}) == 1  # collectives: every process calls alike
  seen = np.concatenate([idx[mask > 0] for c in calls for idx, mask in c])
  np.testing.assert_array_equal(np.sort(seen), np.arange(num_examples))
  for c in calls:
    for idx, mask in c:
      assert len(idx) == len(mask) == batch_size // processes


# ----------------------------------------------------------------------------- devices

TWO_DEVICE_STEPS = '''
import json, runpy, sys
import jax, numpy as np
import cifar_conv, fmnist_mlp, harness
from configs import cifar10, fmnist_mlp as mlp_config
assert jax.local_device_count() == 2
moved, maxdiff = {}, {}
for name, module, config, images, size in (
    ('mlp', fmnist_mlp, mlp_config.get_config(), (784,), dict(hidden_sizes=(32, 16))),
    ('conv', cifar_conv, cifar10.get_config(), (32, 32, 3), dict(channels=(4, 8, 8, 8)))):
  results = []
  for devices in (1, 2):
    config.update(size, t_free=12, t_nudge=6, homeo_coef=1.0, homeo_draws=2, batch_size=4,
                  num_devices=devices)
    assert module.check_config(config, 2) == devices
    params = module.init_params(jax.random.PRNGKey(0), config)
    optimizer = module.make_optimizer(config, 100)  # the same interface in both scripts
    step = module.make_train_step(config, optimizer)
    state = harness.replicate((params, optimizer.init(params)), devices)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (devices, 4 // devices, *images), dtype=np.uint8)
    y = rng.integers(0, 10, (devices, 4 // devices)).astype(np.int32)
    new, _, metrics = step(*state, np.int32(3), x, y)
    assert np.asarray(metrics['loss']).shape == (devices,)
    results.append(jax.tree_util.tree_map(lambda a: np.asarray(a[0]), new))
  maxdiff[name] = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: float(np.abs(a - b).max()), *results)))
  moved[name] = float(np.abs(results[0]['forward'][0]['w'] - params['forward'][0]['w']).max())
print('STEPS', json.dumps({'maxdiff': maxdiff, 'moved': moved}), flush=True)
sys.argv = ['fmnist_mlp.py', *json.loads(sys.argv[1])]  # then the whole run, command line
runpy.run_path('fmnist_mlp.py', run_name='__main__')
'''


@pytest.mark.slow
def test_two_devices_train_as_one(mlp_run, tmp_path):
  """Two fake CPU devices (pmap over the batch, one pmean of the gradients) against one: one
  train step of the MLP and of the conv net (with homeostasis), then the session's whole
  MLP run (helpers.MLP_RUN_ARGS) from its command line, in one interpreter."""
  workdir = str(tmp_path / 'two')
  args = [*helpers.MLP_RUN_ARGS, f'--config.data_dir={mlp_run["data_dir"]}',
          f'--workdir={workdir}']
  out = run_script('-c', [TWO_DEVICE_STEPS, json.dumps(args)],
                   env={'XLA_FLAGS': helpers.TWO_DEVICES})
  assert out.returncode == 0, out.stderr[-3000:]
  steps = json.loads(out.stdout.split('STEPS ', 1)[1].splitlines()[0])
  for name in ('mlp', 'conv'):  # equal up to float32 rounding, and the step did move
    assert steps['maxdiff'][name] < 1e-6 and steps['moved'][name] > 1e-5, steps
  one, two = (np.load(os.path.join(w, 'checkpoint.npz')) for w in (mlp_run['workdir'], workdir))
  assert sorted(one.files) == sorted(two.files)
  for k in one.files:
    if k != 'meta':
      np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-6, err_msg=k)
  rows_one, rows_two = helpers.read_rows(mlp_run['workdir']), helpers.read_rows(workdir)
  assert [r['epoch'] for r in rows_two] == [1, 2, 3]
  np.testing.assert_allclose([r['train_loss'] for r in rows_two],
                             [r['train_loss'] for r in rows_one], rtol=1e-4)


# ----------------------------------------------------------------------------- every script
# Bad input on each script's command line: one line `<script>: error: ...` (exit status 1,
# no traceback) before any compute, and nothing written. Each script's cases run from one
# interpreter (helpers.run_cases); DATA in an argument is a folder of the IDX look-alikes.

CONFIGS = {'fmnist_mlp.py': 'configs/fmnist_mlp.py',
           'fmnist_feedback.py': 'configs/fmnist_feedback.py',
           'cifar_conv.py': 'configs/cifar10.py', 'imagenet32_conv.py': 'configs/imagenet32.py'}
EVERY_SCRIPT = [  # (arguments, the message's start after '<script>: error: ', or a part of it)
    (['--config.seed=-1'], 'seed must be >= 0, got -1'),
    (['--config.no_such_field=1'], 'no_such_field'),
    (['--config.lerning_rate=1'], 'Did you mean "learning_rate"'),  # misspelt: the right name
    (['--config.learning_rate=nan'], 'learning_rate must be finite'),
    (['--config.seed=1', '--config.seed=2'], '--config.seed given more than once'),
    (['--config=configs/no_such_file.py'], 'the config file configs/no_such_file.py does not exist'),
]
SCRIPT_CASES = {
    'fmnist_mlp.py': [
        (['--config.hidden_sizes=(64.5,)'],
         'hidden_sizes must be a tuple of >= 1 positive integers'),
        (['--config.n_points=-2'], 'n_points must be >= 0'),
        (['--config.data_dir=NONE'], 'Fashion-MNIST IDX files missing in NONE'),
        (['--config.data_dir=DATA', '--config.train_size=100', '--config.batch_size=120'],
         'batch_size=120 exceeds the 100 training images')],
    'fmnist_feedback.py': [
        (['--config.layer_updates=alternating'], 'unknown layer_updates'),
        (['--config.hidden_sizes=(32,)'], 'hidden_sizes needs >= 2 layers')],
    'cifar_conv.py': [
        (['--config.channels=(8,0,8,8)'], 'channels must be a tuple of >= 2 positive integers'),
        (['--config.dataset=fashion_mnist', '--config.data_dir=NONE'],
         'Fashion-MNIST IDX files missing in NONE'),
        (['--config.dataset=fashion_mnist', '--config.data_dir=DATA', '--config.batch_size=256',
          '--config.channels=(4,4,4,4)'], 'batch_size=256 exceeds the 200 training images')],
    'imagenet32_conv.py': [(['--config.train_size=2000000'], 'train_size must be <= 1281167')],
}
# A workdir that cannot be written is found once the data are read (the conv scripts: a
# Fashion-MNIST-32 run; ImageNet cannot be read here); one that names a file, at once.
UNWRITABLE = {'fmnist_mlp.py': [], 'fmnist_feedback.py': [],
              'cifar_conv.py': ['--config.dataset=fashion_mnist', '--config.data_dir=DATA',
                                '--config.channels=(4,4,4,4)', '--config.batch_size=16',
                                '--config.diag_batch_size=4']}


@pytest.mark.slow
@pytest.mark.parametrize('script', sorted(CONFIGS))
def test_bad_input_on_every_command_line_is_one_line_and_writes_nothing(script, idx_dir,
                                                                         tmp_path):
  (tmp_path / 'a_file').write_bytes(b'keep me')
  cases = EVERY_SCRIPT + SCRIPT_CASES[script] + [
      ([f'--workdir={tmp_path / "a_file"}'], 'is a file, not a folder')]
  if script in UNWRITABLE:
    cases.append((['--workdir=/proc/no/such/folder', *UNWRITABLE[script]],
                  'cannot write the workdir'))
  argv = []
  for i, (args, _) in enumerate(cases):
    args = [a.replace('DATA', idx_dir).replace('NONE', str(tmp_path / 'none')) for a in args]
    config = [] if any(a.startswith('--config=') for a in args) else [f'--config={CONFIGS[script]}']
    argv.append([*config, f'--workdir={tmp_path / f"run{i}"}', *args])  # the last one counts
  for (_, message), (code, err) in zip(cases, helpers.run_cases(script, argv)):
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith(f'{script}: error: '), err[-2000:]
    assert message.replace('NONE', str(tmp_path / 'none')) in last, (message, last)
    assert 'Traceback' not in err and "Unable to initialize backend 'tpu'" not in err
  assert sorted(os.listdir(tmp_path)) == ['a_file']  # no run folder was made
  assert (tmp_path / 'a_file').read_bytes() == b'keep me'


# ----------------------------------------------------------------------------- start-up faults

def test_a_finished_run_says_so_and_trains_nothing(caplog):
  caplog.set_level('INFO')
  assert not harness.run_is_complete('w', 1, 3)
  assert not harness.run_is_complete('w', 3, 3) and 'resuming from w after epoch 2' in caplog.text
  assert harness.run_is_complete('w', 4, 3) and 'this run is complete (3 epochs)' in caplog.text
  assert harness.run_is_complete('w', 100, 3)  # a checkpoint past num_epochs: nothing to train


def test_resuming_raises_no_warning(tmp_path):
  import warnings  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'run')
  a_run_after_one_epoch(path)
  template = ({'w': jnp.zeros((3, 2), jnp.float32), 'b': [jnp.zeros(2, jnp.float32)]},
              {'count': jnp.zeros((), jnp.int32)})
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # numpy's DeprecationWarning of np.result_type(jax array)
    harness.Workdir(path, config(), RESUMABLE).restore(template)


def test_progress_lines_give_the_whole_runs_eta(caplog):
  caplog.set_level('INFO')
  progress = harness.Progress(epoch=1, steps=4, batch_size=2, log_every=2, max_train_loss=5.0,
                              num_epochs=10)
  for _ in range(2):
    progress.add({'loss': np.array([1.0]), 'accuracy': np.array([0.5])})
  assert 'step 2/4' in caplog.text and '(run ' in caplog.text and ' h)' in caplog.text


def conv_args(data_dir, **overrides):
  """A tiny cifar_conv.py run on Fashion-MNIST-32 look-alikes."""
  fields = dict(dataset='fashion_mnist', data_dir=data_dir, channels='(4,4,4,4)', t_free=5,
                t_nudge=3, batch_size=16, train_size=64, test_size=32, eval_batch_size=16,
                diag_batch_size=4, num_epochs=1, log_every_steps=0)
  fields.update(overrides)
  return ['--config=configs/cifar10.py', *(f'--config.{k}={v}' for k, v in fields.items())]


# --------------------------------------------------------------- one run per workdir, SIGTERM
# A run paused at a chosen point (tests/paused_run.py: PAUSED on its stdout, then it waits for
# its stdin), so that each interference lands exactly there; the deadlines only guard
# against a hang.

TIMING = ('epoch_time_s', 'images_per_s')


def mlp_args(mlp_run, workdir, *changes):
  """The command line of the session's shared run (conftest.mlp_run) in another workdir,
  with `changes` (--config.field=value) in place of its own values of those fields."""
  changed = {a.split('=', 1)[0] for a in changes}
  return [*(a for a in helpers.MLP_RUN_ARGS if a.split('=', 1)[0] not in changed),
          f'--config.data_dir={mlp_run["data_dir"]}', f'--workdir={workdir}', *changes]


def outcome(workdir):
  """(metrics rows without timing fields, checkpoint arrays) of a finished run."""
  rows = [{k: v for k, v in r.items() if k not in TIMING} for r in helpers.read_rows(workdir)]
  with np.load(os.path.join(workdir, 'checkpoint.npz'), allow_pickle=False) as z:
    return rows, {k: z[k] for k in z.files}


def assert_same_outcome(a, b):
  assert a[0] == b[0] and a[1].keys() == b[1].keys()
  for k in a[1]:
    np.testing.assert_array_equal(a[1][k], b[1][k])


def paused_run(args, pause, stderr_path):
  """tests/paused_run.py with `args`, once it has paused at `pause` (PAUSE_AFTER)."""
  with open(stderr_path, 'w') as err:
    proc = subprocess.Popen([sys.executable, 'tests/paused_run.py', 'fmnist_mlp.py', *args],
                            cwd=helpers.ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                            env={**os.environ, 'PAUSE_AFTER': pause})
  assert select.select([proc.stdout], [], [], 600)[0], 'no pause within 600 s'
  line = proc.stdout.readline()
  assert line == 'PAUSED\n', f'{line!r}: {stderr_path.read_text()[-3000:]}'
  return proc


def exit_code_after(proc, sig):
  """Sends `sig` to a paused run and returns its exit code; if it has not ended within 60 s,
  fails with the run's ignored and caught signals and each of its threads' blocked and
  pending ones (where a signal was lost)."""
  proc.send_signal(sig)
  try:
    return proc.wait(timeout=60)
  except subprocess.TimeoutExpired:
    masks = [' '.join(line.split()) for task in sorted(os.listdir(f'/proc/{proc.pid}/task'))
             for line in open(f'/proc/{proc.pid}/task/{task}/status')
             if line.startswith(('SigBlk', 'SigPnd', 'ShdPnd'))]
    with open(f'/proc/{proc.pid}/status') as f:
      masks = [' '.join(l.split()) for l in f if l.startswith(('SigIgn', 'SigCgt'))] + masks
    proc.kill()
    blocked = sorted(signal.pthread_sigmask(signal.SIG_BLOCK, []))
    pytest.fail(f'{sig.name} did not end the run within 60 s; the test process blocks '
                f'{blocked}; the run (then its threads): {masks[:14]}')


@pytest.mark.slow
def test_a_second_run_on_a_workdir_is_refused_and_the_first_is_unharmed(mlp_run, tmp_path):
  workdir = tmp_path / 'run'
  first = paused_run(mlp_args(mlp_run, workdir), 'save:1', tmp_path / 'first.err')
  before = snapshot(workdir)
  second = run_script('fmnist_mlp.py', mlp_args(mlp_run, workdir))
  assert second.returncode == 1 and 'Traceback' not in second.stderr, second.stderr[-3000:]
  assert second.stderr.strip().splitlines()[-1].startswith(
      f'fmnist_mlp.py: error: {workdir} is in use by another run (pid {first.pid} on '
      f'{socket.gethostname()}, started '), second.stderr[-3000:]
  assert 'step 1/2' not in second.stderr  # stopped before training
  assert snapshot(workdir) == before
  first.stdin.close()  # go on
  assert first.wait(timeout=600) == 0, (tmp_path / 'first.err').read_text()[-3000:]
  assert_same_outcome(outcome(workdir), outcome(mlp_run['workdir']))


@pytest.mark.slow
def test_kill_9_leaves_no_lock_and_a_longer_resume_is_bit_identical(mlp_run, tmp_path):
  """The shared run's command started for 2 epochs, killed right after epoch 1's checkpoint,
  its metrics file lost, then resumed for 3 (the MLP's learning rate is constant, so
  num_epochs may grow): the uninterrupted 3-epoch run's parameters, optimizer state and
  rows, bit for bit."""
  workdir = tmp_path / 'run'
  proc = paused_run(mlp_args(mlp_run, workdir, '--config.num_epochs=2'), 'save:1',
                    tmp_path / 'killed.err')
  proc.kill()
  assert proc.wait(timeout=60) == -signal.SIGKILL
  assert json.loads((workdir / 'lock').read_text())['pid'] == proc.pid  # the file stays
  assert harness.read_checkpoint(str(workdir / 'checkpoint.npz'))['epoch'] == 1  # whole
  os.remove(workdir / 'metrics.jsonl')
  out = run_script('fmnist_mlp.py', mlp_args(mlp_run, workdir))
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'resuming from {workdir} after epoch 1' in out.stderr
  assert 'metrics.jsonl is missing' in out.stderr and 'epoch 1  step' not in out.stderr
  rows, arrays = outcome(workdir)
  straight_rows, straight_arrays = outcome(mlp_run['workdir'])
  assert_same_outcome((rows, arrays), (straight_rows[1:], straight_arrays))
  changed = run_script('fmnist_mlp.py', mlp_args(mlp_run, workdir, '--config.beta=0.1'))
  assert changed.returncode == 1 and 'different config (beta)' in changed.stderr


@pytest.mark.slow
def test_ctrl_c_mid_epoch_ends_with_one_line(mlp_run, tmp_path):
  workdir = tmp_path / 'run'
  proc = paused_run(mlp_args(mlp_run, workdir), 'step:2:1', tmp_path / 'int.err')
  # Python's own handler: a KeyboardInterrupt in the run
  assert exit_code_after(proc, signal.SIGINT) == 130
  err = (tmp_path / 'int.err').read_text()
  assert err.strip().splitlines()[-1] == 'fmnist_mlp.py: interrupted; resume with the same command'
  assert 'Traceback' not in err
  assert harness.read_checkpoint(str(workdir / 'checkpoint.npz'))['epoch'] == 1


@pytest.mark.slow
def test_sigterm_mid_epoch_ends_with_one_line_and_resumes_bit_identically(mlp_run, tmp_path):
  workdir = tmp_path / 'run'
  proc = paused_run(mlp_args(mlp_run, workdir), 'step:2:1', tmp_path / 'term.err')
  assert exit_code_after(proc, signal.SIGTERM) == 143  # not -15: the handler ran
  err = (tmp_path / 'term.err').read_text()
  assert err.strip().splitlines()[-1] == 'fmnist_mlp.py: terminated; resume with the same command'
  assert 'Traceback' not in err
  assert harness.read_checkpoint(str(workdir / 'checkpoint.npz'))['epoch'] == 1
  assert [r['epoch'] for r in helpers.read_rows(workdir)] == [1]
  out = run_script('fmnist_mlp.py', mlp_args(mlp_run, workdir))
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'resuming from {workdir} after epoch 1' in out.stderr
  assert_same_outcome(outcome(workdir), outcome(mlp_run['workdir']))


# ----------------------------------------------------------------------------- several processes

def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(i, port, tmp_path, idx_dir, *extra, workdir=None, pause=None, **overrides):
  """Process i of a two-process cifar_conv.py run on localhost (pause: through
  tests/paused_run.py, which stops there and waits for its stdin)."""
  via = ['tests/paused_run.py'] if pause else []
  return subprocess.Popen(
      [sys.executable, *via, 'cifar_conv.py', *conv_args(idx_dir, **overrides),
       f'--config.coordinator_address=127.0.0.1:{port}', '--config.num_processes=2',
       f'--config.process_id={i}', '--config.process_timeout_s=5',
       f'--workdir={workdir or tmp_path / f"run{i}"}', *extra],
      cwd=helpers.ROOT, stderr=subprocess.PIPE, text=True,
      **(dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, 'PAUSE_AFTER': pause})
         if pause else dict(stdout=subprocess.DEVNULL)))


def last_lines(procs, timeout=120):
  """Each process's exit code and last stderr line; none may hang or dump a stack."""
  out = []
  for proc in procs:
    err = proc.communicate(timeout=timeout)[1]
    assert 'Traceback' not in err and 'Check failure' not in err and 'Fatal' not in err, err[-3000:]
    out.append((proc.returncode, err.strip().splitlines()[-1]))
  return out


@pytest.mark.slow
def test_processes_started_with_different_flags_all_stop_at_once(idx_dir, tmp_path):
  port = free_port()
  procs = [start(0, port, tmp_path, idx_dir), start(1, port, tmp_path, idx_dir, '--config.seed=1')]
  message = ('cifar_conv.py: error: process 1 was started with another config than process 0: '
             'start every process with the same flags')
  assert last_lines(procs) == [(1, message), (1, message)]


@pytest.mark.slow
def test_a_damaged_checkpoint_of_process_0_stops_every_process(idx_dir, tmp_path):
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'checkpoint.npz').write_bytes(b'garbage')
  port = free_port()
  (rc0, line0), (rc1, line1) = last_lines([
      start(0, port, tmp_path, idx_dir, workdir=tmp_path / 'bad'),
      start(1, port, tmp_path, idx_dir)])
  assert rc0 == rc1 == 1
  assert 'is damaged or not a checkpoint' in line0
  assert line1.startswith('cifar_conv.py: error: process 0 stopped: ') and 'is damaged' in line1


@pytest.mark.slow
def test_a_workdir_locked_by_another_run_stops_every_process(idx_dir, tmp_path):
  os.mkdir(tmp_path / 'run0')
  holder = harness.lock_workdir(str(tmp_path / 'run0'))  # this test process holds it
  port = free_port()
  (rc0, line0), (rc1, line1) = last_lines([start(0, port, tmp_path, idx_dir),
                                           start(1, port, tmp_path, idx_dir)])
  holder.close()
  assert rc0 == rc1 == 1
  assert f'is in use by another run (pid {os.getpid()} on ' in line0, line0
  assert line1.startswith('cifar_conv.py: error: process 0 stopped: ') and 'in use' in line1
  assert os.listdir(tmp_path / 'run0') == ['lock']  # the holder's: the run wrote nothing


@pytest.mark.slow
def test_sigterm_stops_a_process_of_a_multi_process_run_with_one_line(idx_dir, tmp_path):
  """jax.distributed's preemption notifier takes SIGTERM over; start_processes hands it back."""
  port = free_port()
  # Both wait after their first training step (after jax.distributed.initialize).
  procs = [start(i, port, tmp_path, idx_dir, pause='step:1:1') for i in (0, 1)]
  try:
    for line in procs[0].stdout:  # the collectives' library prints there too
      if line == 'PAUSED\n':
        break
    procs[0].send_signal(signal.SIGTERM)
    [(rc0, line0)] = last_lines(procs[:1])
    assert (rc0, line0) == (143, 'cifar_conv.py: terminated; resume with the same command')
    procs[1].communicate(timeout=120)
    assert procs[1].returncode != 0  # it lost process 0
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()


@pytest.mark.slow
def test_a_process_without_process_0_stops_after_the_timeout(idx_dir, tmp_path):
  [(rc, line)] = last_lines([start(1, free_port(), tmp_path, idx_dir)], timeout=60)
  assert rc == 1 and 'process 0 is not listening at 127.0.0.1:' in line and 'after 5 s' in line


@pytest.mark.slow
def test_a_bad_or_busy_coordinator_port_is_one_line(idx_dir, tmp_path):
  [(rc, line)] = last_lines([start(0, 'http', tmp_path, idx_dir)])
  assert rc == 1 and 'coordinator_address must be host:port with a port in 1..65535' in line
  with socket.socket() as busy:
    busy.bind(('127.0.0.1', 0))
    busy.listen()
    [(rc, line)] = last_lines([start(0, busy.getsockname()[1], tmp_path, idx_dir)])
  assert rc == 1 and 'of coordinator_address is in use on this machine' in line

"""imagenet32_conv.py: process fields (harness.py), config checks, and end to end on TFDS
mock data in one process and in two processes on localhost (CPU collectives), with a process
killed. (The process shards of an epoch, harness.py alone: tests/test_harness.py.)

ImageNet cannot be downloaded here; tests/imagenet_run.py runs the script's own command line
(harness.run_main) inside tfds.testing.mock_data (fake examples, deterministic per index).
"""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import cifar_conv
import harness
import imagenet32_conv
from configs import imagenet32 as imagenet32_config
from helpers import ROOT, TEST_XLA_FLAGS, TWO_DEVICES, read_rows, run_script


# ----------------------------------------------------------------------- config checks

@pytest.mark.parametrize('overrides, message', [
    (dict(num_classes=10), 'num_classes=10 but imagenet32 has 1000 classes'),
    (dict(dataset='imagenet64'), 'unknown dataset'),
    (dict(data_threads=0), 'data_threads must be >= 1'),
    (dict(train_size=2000000), 'train_size must be <= 1281167'),
    (dict(batch_size=254), 'not divisible by the 2 devices x 2 processes'),
])
def test_bad_config_is_a_one_line_error(overrides, message):
  config = imagenet32_config.get_config()
  config.update(overrides)
  with pytest.raises(harness.ConfigError, match=message) as error:
    cifar_conv.check_config(config, num_local_devices=2, num_processes=2)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('overrides, message', [
    (dict(num_processes=2), 'need coordinator_address'),
    (dict(process_id=0), 'need coordinator_address'),
    (dict(coordinator_address='host0'), 'must be host:port'),
    (dict(coordinator_address='h:1', num_processes=2, process_id=2), 'process_id in 0..'),
    (dict(coordinator_address='h:1', num_processes=0, process_id=0), 'num_processes >= 1'),
    (dict(process_timeout_s=0), 'process_timeout_s must be >= 1'),
])
def test_bad_process_fields_are_refused_before_joining(overrides, message, monkeypatch):
  monkeypatch.setattr(harness.jax.distributed, 'initialize',
                      lambda *a, **k: pytest.fail('initialize must not be reached'))
  config = imagenet32_config.get_config()
  config.update(overrides)
  with pytest.raises(harness.ConfigError, match=message) as error:
    harness.start_processes(config)
  assert '\n' not in str(error.value)


def test_one_process_needs_no_flags_and_slurm_is_detected(monkeypatch):
  for name in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(name, raising=False)
  assert harness.start_processes(imagenet32_config.get_config()) == (0, 1)
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert not harness.cluster_detected()
  monkeypatch.setenv('SLURM_NTASKS', '8')
  assert harness.cluster_detected()
  monkeypatch.delenv('SLURM_NTASKS')
  monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', '2')
  assert harness.cluster_detected()
  config = imagenet32_config.get_config()
  assert cifar_conv.check_config(config, 1, 1) == 1
  assert (config.homeo_coef, config.learning_rate, config.num_epochs) == (10.0, 5e-3, 90)


def test_the_imagenet_config_is_the_cifar10_one_but_for_the_data_set():
  """configs/imagenet32.py derives from configs/cifar10.py: these fields alone differ, and
  it has no data_dir (no IDX files)."""
  from configs import cifar10 as cifar10_config  # pylint: disable=g-import-not-at-top
  ten, inet = cifar10_config.get_config(), imagenet32_config.get_config()
  assert set(ten) - set(inet) == {'data_dir'} and set(inet) <= set(ten)
  differ = sorted(k for k in inet if inet[k] != ten[k])
  assert differ == ['data_threads', 'dataset', 'homeo_coef', 'learning_rate',
                    'log_every_steps', 'max_train_loss', 'num_classes', 'num_epochs']
  # imagenet32_conv.py adds its data set to cifar_conv's table; the rest is cifar_conv.py's.
  assert cifar_conv.DATASETS['imagenet32']['load'] is imagenet32_conv.load_data
  assert cifar_conv.DATASETS['imagenet32']['num_classes'] == 1000


@pytest.mark.slow
def test_the_user_command_fails_fast_without_the_data(tmp_path):
  """The user's command where the download cannot be reached (tests/offline_run.py closes
  the address): one line, nothing written."""
  out = run_script('tests/offline_run.py', ['imagenet32_conv.py', '--config=configs/imagenet32.py',
                                            f'--config.tfds_data_dir={tmp_path}/none',
                                            f'--workdir={tmp_path}/w'], timeout=300)
  assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('imagenet32_conv.py: error: imagenet_resized/32x32 is not prepared in '
                         f'{tmp_path}/none'), last
  assert 'cannot be reached' in last, last
  assert not os.path.exists(tmp_path / 'w')


# ------------------------------------------------ end to end: one process, two processes

# tests/imagenet_run.py's command line of a short run: a reduced-width network, short
# relaxations, two epochs of two global batches of 16.
IMAGENET_SMALL_ARGS = [
    '--config=configs/imagenet32.py', '--config.channels=(4,8,8,8)', '--config.t_free=12',
    '--config.t_nudge=6', '--config.train_size=32', '--config.test_size=20',
    '--config.batch_size=16', '--config.eval_batch_size=8', '--config.diag_batch_size=4',
    '--config.diag_symmetry_probes=2', '--config.homeo_draws=2', '--config.data_threads=2',
    '--config.log_every_steps=1', '--config.num_epochs=2', '--config.homeo_coef=0']


def start(args, xla_flags):
  return subprocess.Popen([sys.executable, 'tests/imagenet_run.py', *IMAGENET_SMALL_ARGS, *args],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, 'XLA_FLAGS': xla_flags})


def finish(proc, timeout=400):
  _, err = proc.communicate(timeout=timeout)
  return proc.returncode, err


def digests(log):
  """{epoch: params digest} from the PARAMS lines of a log (tests/imagenet_run.py)."""
  out = {}
  for line in log.splitlines():
    if line.startswith('PARAMS '):
      _, epoch, digest = line.split()
      out[int(epoch)] = digest
  return out


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_as_one_write_once_survive_a_kill_and_resume(tmp_path):
  # The reference: one process, two devices, two epochs of two global batches of 16.
  one = str(tmp_path / 'one')
  code, err = finish(start([f'--workdir={one}'], TWO_DEVICES))
  assert code == 0, err[-3000:]
  rows = read_rows(one)
  assert [r['epoch'] for r in rows] == [1, 2] and 'step 2/2' in err
  for row in rows:  # top-1 and top-5 over the 20 validation images, train top-5 too
    assert 0 <= row['test_top5_error'] <= row['test_error'] <= 100
    assert 0 <= row['train_top5_accuracy'] <= 1 and np.isfinite(row['train_loss'])
    assert 'diag/symmetry' in row and 'diag/homeo_loss' in row
  assert os.path.exists(os.path.join(one, 'checkpoint.npz'))
  reference = digests(err)
  assert sorted(reference) == [1, 2] and reference[1] != reference[2]
  assert not any('params_sha1' in r for r in rows)  # one process: nothing to compare

  # Two processes, one device each, the same global batches. Process 1 gets a workdir of
  # its own that must never appear: only process 0 writes.
  shared, elsewhere = str(tmp_path / 'two'), str(tmp_path / 'never')
  port = free_port()

  def launch(i):
    return start([f'--workdir={shared if i == 0 else elsewhere}', '--config.num_processes=2',
                  f'--config.coordinator_address=127.0.0.1:{port}', f'--config.process_id={i}',
                  '--config.process_timeout_s=30'], TEST_XLA_FLAGS)

  procs = [launch(0), launch(1)]
  ckpt = os.path.join(shared, 'checkpoint.npz')
  deadline = time.time() + 400
  while not os.path.exists(ckpt) and time.time() < deadline:
    assert procs[0].poll() is None and procs[1].poll() is None, finish(procs[0])[1][-3000:]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)  # a machine dies after the epoch-1 checkpoint
  t_kill = time.time()
  code, err0 = finish(procs[0], timeout=120)  # must not hang
  _, err1 = finish(procs[1])
  assert digests(err1).get(1, reference[1]) == reference[1]  # if it got that far
  assert code != 0 and time.time() - t_kill < 90, err0[-3000:]
  assert ('imagenet32_conv.py: error: process 0 of 2 stopped' in err0 or
          'distributed service detected fatal errors' in err0), err0[-3000:]
  assert [r['epoch'] for r in read_rows(shared)] == [1]
  assert digests(err0)[1] == reference[1]  # epoch 1 of two processes = of one process

  # Restart both: both resume after epoch 1 (process 1 from process 0's broadcast).
  port = free_port()
  procs = [launch(0), launch(1)]
  (code0, err0), (code1, err1) = finish(procs[0]), finish(procs[1])
  assert code0 == 0 and code1 == 0, (err0[-2000:], err1[-2000:])
  for err in (err0, err1):
    assert 'resuming from' in err and 'epoch 1  step' not in err
    assert digests(err) == {2: reference[2]}  # identical in both, and = one process
  rows = read_rows(shared)
  assert [r['epoch'] for r in rows] == [1, 2]
  # Process 0's rows carry its digest: that of one process.
  assert [r['params_sha1'] for r in rows] == [reference[1], reference[2]]
  assert not os.path.exists(elsewhere)
  with np.load(os.path.join(one, 'checkpoint.npz')) as a, np.load(ckpt) as b:
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
      if k != 'meta':
        np.testing.assert_array_equal(a[k], b[k])

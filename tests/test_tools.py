"""The measurement tools under tools/ that the README's GPU section relies on."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import cifar_conv as cc
import harness
from configs import cifar10
from helpers import write_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
  out = tmp_path / 'gpu_check'
  path = os.pathsep.join([os.path.dirname(sys.executable), os.environ['PATH']])  # its `python`
  run = subprocess.run(['bash', 'tools/gpu_check.sh', str(out), '--cpu_smoke'], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, check=False,
                       env={**os.environ, 'PATH': path})
  assert run.returncode == 0, run.stdout + run.stderr
  assert {p.name for p in out.iterdir()} == {'machine.txt', 'tests.txt', 'gpu_check.txt',
                                             'gpu_check.json'}
  assert ' passed' in (out / 'tests.txt').read_text()
  report = json.loads((out / 'gpu_check.json').read_text())
  text = (out / 'gpu_check.txt').read_text()
  assert report['cpu_smoke'] and report['backend'] == 'cpu'
  assert set(report['runs']) == {'hep_exact_float32', 'hep_exact_bfloat16', 'hep2_float32',
                                 'hep2_bfloat16'}
  batch = int(re.search(r', batch (\d+),', text).group(1))
  for run in report['runs'].values():
    # The throughput is the batch over the measured step, the projection Table 2's protocol
    # (150 epochs of CIFAR's 50,000 images), and the report prints what the json holds.
    assert run['images_per_s'] == pytest.approx(batch / (run['ms_per_step'] / 1e3))
    assert run['table2_hours'] == pytest.approx(150 * 50_000 / run['images_per_s'] / 3600)
    assert run['compile_s'] > 0 and f'{run["images_per_s"]:8.1f} img/s' in text
  cosines = report['grad_cosine_bf16_vs_f32']
  # bfloat16 rounds the free state to ~3 digits: close to, but not exactly, the f32 gradient.
  assert 0.9 < cosines['all'] < 1 - 1e-9, cosines
  assert set(cosines) == {'all', 'forward[0]', 'forward[1]', 'forward[2]', 'forward[3]',
                          'backward[0]', 'backward[1]', 'backward[2]'}
  assert 'Table 2' in (out / 'gpu_check.txt').read_text()


@pytest.mark.slow
def test_gpu_check_refuses_a_cpu_backend_without_cpu_smoke(tmp_path):
  run = subprocess.run([sys.executable, 'tools/gpu_check.py', f'--out={tmp_path}'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1] == (
      'tools/gpu_check.py: error: the backend is cpu, not gpu (install jax[cuda12]; '
      '--cpu_smoke runs a tiny network on CPU)')
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_conv_update_order_relaxes_a_trained_checkpoint(tmp_path):
  """--part=trained restores a run's parameters from its checkpoint (not from code) and runs
  both update orders on the first test images of the run's data set; --part=samples counts
  the samples still far from their fixed point."""
  rng = np.random.default_rng(0)
  for split, n in (('train', 4), ('t10k', 3)):
    write_idx(tmp_path / f'{split}-images-idx3-ubyte.gz', rng.integers(0, 256, (n, 28, 28)))
    write_idx(tmp_path / f'{split}-labels-idx1-ubyte.gz', rng.integers(0, 10, n))
  config = cifar10.get_config()
  config.update(dataset='fashion_mnist', data_dir=str(tmp_path), channels=(2, 3, 3, 3),
                t_free=4, t_nudge=4, tied=True, alpha=0.0, homeo_coef=0.0)
  params = cc.init_params(jax.random.PRNGKey(3), config)
  state = (params, cc.make_optimizer(config, 1).init(params))
  workdir = harness.Workdir(str(tmp_path / 'run'), config, cc.RESUMABLE_FIELDS)
  workdir.start()
  single = lambda a: np.asarray(a, np.float32 if np.issubdtype(a.dtype, np.floating) else np.int32)
  workdir.save(2, {'epoch': 2}, jax.tree_util.tree_map(single, state))  # as a float32 run
  run = subprocess.run(
      [sys.executable, 'tools/conv_update_order.py', '--part=trained', f'--workdir={tmp_path}/run',
       f'--data_dir={tmp_path}', '--batch=2', '--t_free=40', '--chunk=20', '--ref_free=60',
       '--ref_nudge=60', '--t_nudges', '30'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stdout + run.stderr
  out = run.stdout
  assert f'{tmp_path}/run after epoch 2: hep_exact, tied True, lambda 0, 2 test images' in out
  rows = [line.split('|') for line in out.splitlines() if line.strip()[:2] in ('20', '40')]
  assert [int(r[0]) for r in rows] == [20, 40]
  # A freshly initialised network contracts fast: both orders reach the float32 floor.
  assert all(float(v) < -4 for v in rows[-1][1].split() + rows[-1][2].split()), out
  cosines = [float(l.split('min cosine ')[1].split(',')[0]) for l in out.splitlines()
             if 'min cosine' in l]
  assert len(cosines) == 2 and min(cosines) > 0.999, out

  # --part=samples: per-sample residuals of the run's own order after every --chunk steps.
  run = subprocess.run(
      [sys.executable, 'tools/conv_update_order.py', '--part=samples', f'--workdir={tmp_path}/run',
       f'--data_dir={tmp_path}', '--batch=3', '--t_free=6', '--chunk=3'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stdout + run.stderr
  out = run.stdout
  assert 'after epoch 2: hep_exact, lambda 0, synchronous, 3 test images' in out, out
  rows = [[c.split() for c in line.split('|')] for line in out.splitlines()
          if line.strip()[:1] in ('3', '6')]
  assert [int(r[0][0]) for r in rows] == [3, 6], out
  for _, counts, median, largest in rows:
    counts = [int(c) for c in counts]
    assert 3 >= counts[0] >= counts[1] >= counts[2] >= 0, out
    assert float(median[0]) <= float(largest[0]), out
  # Three synchronous steps from zeros leave every sample above 1e-4; six steps contract.
  assert rows[0][1][0] == '3' and float(rows[1][3][0]) < float(rows[0][3][0]), out

"""The measurement tools under tools/ that the README's GPU section relies on."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
  out = tmp_path / 'gpu_check'
  run = subprocess.run(['bash', 'tools/gpu_check.sh', str(out), '--cpu_smoke'], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, check=False)
  assert run.returncode == 0, run.stdout + run.stderr
  assert {p.name for p in out.iterdir()} == {'machine.txt', 'tests.txt', 'gpu_check.txt',
                                             'gpu_check.json'}
  assert ' passed' in (out / 'tests.txt').read_text()
  report = json.loads((out / 'gpu_check.json').read_text())
  assert report['cpu_smoke'] and report['backend'] == 'cpu'
  assert set(report['runs']) == {'hep_exact_float32', 'hep_exact_bfloat16', 'hep2_float32',
                                 'hep2_bfloat16'}
  for run in report['runs'].values():
    assert run['images_per_s'] > 0 and run['compile_s'] > 0
    assert run['table2_hours'] == 150 * 50_000 / run['images_per_s'] / 3600
  cosines = report['grad_cosine_bf16_vs_f32']
  # bfloat16 rounds the free state to ~3 digits: close to, but not exactly, the f32 gradient.
  assert 0.9 < cosines['all'] < 1 - 1e-9, cosines
  assert set(cosines) == {'all', 'forward[0]', 'forward[1]', 'forward[2]', 'forward[3]',
                          'backward[0]', 'backward[1]', 'backward[2]'}
  assert 'Table 2' in (out / 'gpu_check.txt').read_text()


def test_gpu_check_refuses_a_cpu_backend_without_cpu_smoke(tmp_path):
  run = subprocess.run(['python', 'tools/gpu_check.py', f'--out={tmp_path}'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1] == (
      'tools/gpu_check.py: error: the backend is cpu, not gpu (install jax[cuda12]; '
      '--cpu_smoke runs a tiny network on CPU)')
  assert not os.listdir(tmp_path)

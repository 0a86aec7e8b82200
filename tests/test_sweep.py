"""sweep.py: the plan, its commands, the done / partial / todo logic and the bookkeeping of a
finished run, with fake training scripts and fake results (nothing is trained)."""
import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags
import pytest

import sweep

ROOT = sweep.ROOT


def test_plan_has_every_cell_once():
  runs = sweep.plan()
  counts = collections.Counter(r.group for r in runs)
  # Table 1: N = 1, 2, 4, 6 x |beta| = 0.05, 0.5, and the true d_beta s* once, plus two
  # more seeds of N = 1 at |beta| = 0.5; the two continuous-time cells; 7 short checks;
  # Fig. 3: 3 angles x 2 algorithms; Fig. 4: 2 lambdas x 3 seeds.
  assert counts == {'table1': 11, 'table1_cont': 2, 'fmnist_checks': 7, 'fig3': 6,
                    'fig4ad': 6, 'fig4eh': 6, 'table2mini': 9, 'table2long': 9}
  assert set(counts) == set(sweep.GROUPS)
  assert len({(r.group, r.name) for r in runs}) == len(runs)
  assert len({sweep.workdir(r, 'runs/sweep') for r in runs}) == len(runs)
  for r in runs:
    fields = dict(r.overrides)
    assert len(fields) == len(r.overrides)  # no field given twice
    if r.group != 'fmnist_checks':
      assert fields['num_epochs'] == {'table1': 50, 'table1_cont': 10, 'fig3': 20,
                                      'fig4ad': 50, 'fig4eh': 50, 'table2mini': 4,
                                      'table2long': 4}[r.group]
  table1 = {r.name: dict(r.overrides) for r in runs if r.group == 'table1'}
  cells = collections.Counter((o.get('n_points'), o.get('beta'), o['seed'])
                              for o in table1.values() if o['algorithm'] == 'hep')
  assert set(cells) == ({(n, b, 0) for n in (1, 2, 4, 6) for b in (0.05, 0.5)}
                        | {(1, 0.5, 1), (1, 0.5, 2)})
  assert max(cells.values()) == 1
  # The continuous-time cells run last of the MLP's (over two hours each on a core).
  mlp = [r for r in runs if r.script != 'cifar_conv.py']
  assert [r.group for r in mlp[-2:]] == ['table1_cont', 'table1_cont']
  # Table 2 in miniature: its five rows with seed 0, then seeds 1-2 of lambda 15 vs 0.
  mini = {r.name: dict(r.overrides) for r in runs if r.group == 'table2mini'}
  assert {(o['algorithm'], o.get('n_points'), o.get('tied', False), o['homeo_coef'], o['seed'])
          for o in mini.values()} == {
              ('hep_exact', None, False, 15, 0), ('hep_exact', None, False, 0, 0),
              ('hep', 2, False, 15, 0), ('bptt', None, False, 15, 0),
              ('hep_exact', None, True, 0, 0), ('hep_exact', None, False, 15, 1),
              ('hep_exact', None, False, 0, 1), ('hep_exact', None, False, 15, 2),
              ('hep_exact', None, False, 0, 2)}
  assert all(o['dataset'] == 'fashion_mnist' for o in mini.values())
  # The long rows: the same nine, at 5x the steps (20,000 images x 4 epochs / batch 32) and
  # the paper's T_free cap.
  long = {r.name: dict(r.overrides) for r in runs if r.group == 'table2long'}
  strip = lambda o: {k: v for k, v in o.items()
                     if k not in ('train_size', 'test_size', 't_free')}
  assert {n: strip(o) for n, o in long.items()} == {n: strip(o) for n, o in mini.items()}
  assert {(o['train_size'], o['test_size'], o['t_free'], o['tol'], o['batch_size'])
          for o in long.values()} == {(20000, 5000, 250, 1e-5, 32)}
  fig4ad = [dict(r.overrides) for r in runs if r.group == 'fig4ad']
  assert all(o['alpha'] == 90 and o['optimizer'] == 'adam' and o['learning_rate'] == 1e-4
             and o['algorithm'] == 'hep_exact' for o in fig4ad)
  assert sorted(o['homeo_coef'] for o in fig4ad) == [0, 0, 0, 1, 1, 1]


def _parse(run, monkeypatch):
  """The run's overrides parsed exactly as the training script's absl flags would."""
  values = flags.FlagValues()
  config_path = os.path.join(ROOT, run.config)
  config_flags.DEFINE_config_file('config', config_path, flag_values=values)
  argv = sweep.command(run, 'runs/sweep', 'python')
  argv = ['prog', f'--config={config_path}', *(a for a in argv if a.startswith('--config.'))]
  monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads the overrides from sys.argv
  values(argv)
  return values.config


@pytest.mark.parametrize('run', sweep.plan(), ids=lambda r: f'{r.group}/{r.name}')
def test_every_override_is_a_field_of_the_target_config(run, monkeypatch):
  assert os.path.exists(os.path.join(ROOT, run.script))
  from importlib import util  # pylint: disable=g-import-not-at-top
  spec = util.spec_from_file_location('cfg', os.path.join(ROOT, run.config))
  module = util.module_from_spec(spec)
  spec.loader.exec_module(module)
  defaults = module.get_config()
  missing = [k for k, _ in run.overrides if k not in defaults]
  assert not missing, (f'{run.config} has no field {missing}: the sweep assumes the training '
                       'script grows it (see CONTINUOUS_OVERRIDES in sweep.py)')
  for k, v in run.overrides:
    assert isinstance(v, type(defaults[k])), (k, v, type(defaults[k]))
  parsed = _parse(run, monkeypatch)
  for k, v in run.overrides:
    assert parsed[k] == v, (k, parsed[k], v)


def _write_metrics(path, epochs, start=1):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    for e in range(start, epochs + 1):
      f.write(json.dumps({'epoch': e, 'test_error': 50.0 - e, 'epoch_time_s': 2.0}) + '\n')


def test_status_done_partial_todo_and_the_listing(tmp_path, capsys):
  results, runs_dir = str(tmp_path / 'results'), str(tmp_path / 'runs')
  by_name = {f'{r.group}/{r.name}': r for r in sweep.plan()}
  done, partial_wd, partial_res, todo = (by_name[k] for k in (
      'fig3/bptt_alpha0_seed0', 'fig3/bptt_alpha45_seed0', 'fig3/bptt_alpha90_seed0', 'fig3/hep_exact_alpha0_seed0'))
  _write_metrics(sweep.result_paths(done, results)[0], 20)
  _write_metrics(os.path.join(sweep.workdir(partial_wd, runs_dir), 'metrics.jsonl'), 7)
  _write_metrics(sweep.result_paths(partial_res, results)[0], 3)
  # An empty workdir (started, nothing written) is still todo.
  os.makedirs(sweep.workdir(todo, runs_dir))
  assert sweep.status(done, results, runs_dir) == ('done', 20, 20)
  assert sweep.status(partial_wd, results, runs_dir) == ('partial', 7, 20)
  assert sweep.status(partial_res, results, runs_dir) == ('partial', 3, 20)
  assert sweep.status(todo, results, runs_dir) == ('todo', 0, 20)
  # A results file with more epochs than asked for is done; a garbled line is skipped.
  with open(sweep.result_paths(partial_res, results)[0], 'a') as f:
    f.write('not json\n' + json.dumps({'epoch': 30}) + '\n')
  assert sweep.status(partial_res, results, runs_dir)[0] == 'done'

  argv = ['--results_dir', results, '--runs_dir', runs_dir, '--only', 'fig3']
  assert sweep.main(argv + ['--list']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 6
  listing = {l.split()[0]: l for l in lines}
  assert ' done ' in listing['fig3/bptt_alpha0_seed0']
  assert ' partial 7/20 ' in listing['fig3/bptt_alpha45_seed0']
  assert ' todo ' in listing['fig3/hep_exact_alpha0_seed0']

  assert sweep.main(argv + ['--dry_run']) == 0
  commands = capsys.readouterr().out.splitlines()
  assert len(commands) == 6
  assert commands[0].startswith('# done: python fmnist_mlp.py')
  assert sum(c.startswith('python ') for c in commands) == 4
  assert '--config.alpha=45.0' in commands[1] and f'--workdir={runs_dir}' in commands[1]


def test_only_selects_groups_and_patterns():
  runs = sweep.plan()
  assert len(sweep.select(runs, 'table1,fig4ad')) == 17
  assert [r.name for r in sweep.select(runs, 'fig4eh/*seed2')] == ['homeo0_seed2',
                                                                   'homeo0.1_seed2']
  with pytest.raises(SystemExit, match='nothing matches'):
    sweep.select(runs, 'table2')


FAKE_TRAINER = """\
import json, os, sys
args = dict(a[2:].split('=', 1) for a in sys.argv[2:])
workdir, epochs = args['workdir'], int(args['config.num_epochs'])
os.makedirs(workdir, exist_ok=True)
path = os.path.join(workdir, 'metrics.jsonl')
rows = open(path).read().splitlines() if os.path.exists(path) else []
with open(path, 'a') as f:
  for e in range(len(rows) + 1, epochs + 1):
    f.write(json.dumps({'epoch': e, 'script': sys.argv[1], 'args': args,
                        'epoch_time_s': 1.5}) + '\\n')
print('trained', workdir, 'nice', os.nice(0))
sys.exit(3 if 'alpha90' in workdir else 0)
"""


def _fake_python(tmp_path):
  path = tmp_path / 'fake_python'
  path.write_text(f'#!{sys.executable}\n' + FAKE_TRAINER)
  path.chmod(0o755)
  return str(path)


def test_run_all_resumes_copies_results_and_writes_the_sidecar(tmp_path, capsys):
  results, runs_dir = str(tmp_path / 'results'), str(tmp_path / 'runs')
  by_name = {f'{r.group}/{r.name}': r for r in sweep.plan()}
  resumed = by_name['fig3/bptt_alpha45_seed0']
  _write_metrics(os.path.join(sweep.workdir(resumed, runs_dir), 'metrics.jsonl'), 5)
  argv = ['--results_dir', results, '--runs_dir', runs_dir, '--only', 'fig3/bptt_*',
          '--jobs', '2', '--nice', '3', '--python', _fake_python(tmp_path), '--poll_s', '0.05']
  assert sweep.main(argv) == 1  # bptt_alpha90's fake trainer fails
  out = capsys.readouterr().out
  assert '[fail]  fig3/bptt_alpha90_seed0: exit 3' in out and 'failed: fig3/bptt_alpha90_seed0' in out
  for name in ('bptt_alpha0_seed0', 'bptt_alpha45_seed0'):
    run = by_name[f'fig3/{name}']
    metrics, meta = sweep.result_paths(run, results)
    rows = [json.loads(l) for l in open(metrics)]
    assert [r['epoch'] for r in rows] == list(range(1, 21))
    assert rows[-1]['args']['config.alpha'] == ('0.0' if name == 'bptt_alpha0_seed0' else '45.0')
    assert rows[-1]['script'] == 'fmnist_mlp.py'
    sidecar = json.load(open(meta))
    assert sidecar['command'].startswith('python fmnist_mlp.py --config=configs/fmnist_mlp.py')
    assert sidecar['commit'] == sweep.git_commit_id()
    assert sidecar['machine']['nproc'] == os.cpu_count()
    assert sidecar['epochs'] == 20 and sidecar['wall_time_s'] >= 0
    assert sidecar['resumed_after_epoch'] == (5 if name == 'bptt_alpha45_seed0' else 0)
    # Every epoch's time, those written before the resume included.
    assert sidecar['train_time_s'] == (5 * 2.0 + 15 * 1.5 if name == 'bptt_alpha45_seed0'
                                       else 30.0)
    log = open(os.path.join(sweep.workdir(run, runs_dir), 'sweep.log')).read()
    assert f'nice {os.nice(0) + 3}' in log  # niced relative to the sweep's own niceness
  assert not os.path.exists(sweep.result_paths(by_name['fig3/bptt_alpha90_seed0'], results)[0])
  # A second sweep finds them done and starts nothing but the failed one.
  assert sweep.main(argv) == 1
  out = capsys.readouterr().out
  assert out.count('[start]') == 1 and 'bptt_alpha90' in out


def test_commit_adds_exactly_the_two_result_files(tmp_path, monkeypatch):
  repo = tmp_path / 'repo'
  repo.mkdir()
  git = lambda *a: subprocess.run(['git', *a], cwd=repo, check=True, capture_output=True,
                                  text=True).stdout
  git('init', '-q')
  git('config', 'user.email', 'test@example.com')
  git('config', 'user.name', 'test')
  (repo / 'other.txt').write_text('a\n')
  git('add', 'other.txt')
  git('commit', '-q', '-m', 'init')
  (repo / 'other.txt').write_text('b\n')
  git('add', 'other.txt')  # staged, but not part of a results commit
  monkeypatch.setattr(sweep, 'ROOT', str(repo))
  run = sweep.plan()[0]
  paths = sweep.result_paths(run, 'results')
  _write_metrics(paths[0], 50)
  with open(paths[1], 'w') as f:
    f.write('{}\n')
  sweep.commit_results(run, paths)
  files = git('show', '--name-only', '--format=%s', 'HEAD').split()
  assert files[:2] == ['Results:', 'table1/hep1_beta0.05_seed0']
  assert sorted(files[2:]) == ['results/table1/hep1_beta0.05_seed0.jsonl',
                               'results/table1/hep1_beta0.05_seed0.meta.json']
  assert 'other.txt' in git('diff', '--cached', '--name-only')


SLOW_TRAINER = """\
import os, sys, time
args = dict(a[2:].split('=', 1) for a in sys.argv[2:])
os.makedirs(args['workdir'], exist_ok=True)
open(os.path.join(args['workdir'], 'pid'), 'w').write(str(os.getpid()))
time.sleep(120)
"""


@pytest.mark.slow
def test_sigterm_stops_the_sweep_and_its_runs_even_with_sigint_ignored(tmp_path):
  """A sweep started with `&` from a script ignores SIGINT; `kill PID` must still stop it."""
  fake = tmp_path / 'slow_python'
  fake.write_text(f'#!{sys.executable}\n' + SLOW_TRAINER)
  fake.chmod(0o755)
  runs_dir = tmp_path / 'runs'
  cmd = [sys.executable, os.path.join(ROOT, 'sweep.py'), '--results_dir', str(tmp_path / 'r'),
         '--runs_dir', str(runs_dir), '--only', 'fig3/bptt_alpha0_seed0', '--python', str(fake),
         '--poll_s', '0.05']
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
  # SIGINT is ignored, as after `&` (the kernel's mask of the sweep says so).
  with open(f'/proc/{proc.pid}/status') as f:
    ignored = int(re.search(r'SigIgn:\s*([0-9a-f]+)', f.read()).group(1), 16)
  assert ignored & (1 << (signal.SIGINT - 1))
  head = []
  for line in proc.stdout:  # the sweep holds its run once it has said so
    head.append(line)
    if line.startswith('[start]'):
      break
  pid_file = runs_dir / 'fig3' / 'bptt_alpha0_seed0' / 'pid'
  deadline = time.time() + 120  # the run is up (the deadline only guards against a hang)
  while not pid_file.exists() or not pid_file.read_text():
    assert time.time() < deadline and proc.poll() is None, ''.join(head)
    time.sleep(0.05)
  child = int(pid_file.read_text())
  proc.terminate()
  out = ''.join(head) + proc.communicate(timeout=60)[0]
  assert proc.returncode == 130, out
  assert 'interrupted; rerun the same command to resume' in out
  with pytest.raises(ProcessLookupError):  # the run was ended (and reaped) too
    os.kill(child, 0)


def test_the_commit_is_dirty_for_code_changes_not_for_results(tmp_path, monkeypatch):
  repo = tmp_path / 'repo'
  (repo / 'results').mkdir(parents=True)
  git = lambda *a: subprocess.run(['git', *a], cwd=repo, check=True, capture_output=True,
                                  text=True).stdout.strip()
  git('init', '-q')
  git('config', 'user.email', 'test@example.com')
  git('config', 'user.name', 'test')
  (repo / 'code.py').write_text('a\n')
  (repo / 'results' / 'r.jsonl').write_text('{}\n')
  git('add', '.')
  git('commit', '-q', '-m', 'init')
  monkeypatch.setattr(sweep, 'ROOT', str(repo))
  head = git('rev-parse', 'HEAD')
  assert sweep.git_commit_id() == head
  (repo / 'results' / 'r.jsonl').write_text('{"epoch": 1}\n')
  assert sweep.git_commit_id() == head
  (repo / 'code.py').write_text('b\n')
  assert sweep.git_commit_id() == head + '-dirty'

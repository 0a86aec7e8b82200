"""plot.py: the sweep's report on fake results (complete, partial, multi-seed and missing runs),
and --runs on fake workdirs and results files of every script."""
import json
import os

import numpy as np
import pytest

from helpers import run_script
import plot
import sweep


def _write(path, epochs, seed=0, homeo=0.0, start=1, mlp=True):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    for e in range(start, epochs + 1):
      row = {'epoch': e, 'test_error': 30.0 - 0.2 * e - seed - 5 * homeo,
             'train_loss': 1.0 / (e + 1), 'diag/symmetry': 0.9 + 0.001 * e * homeo,
             'diag/cosine_exact': [0.8 - 0.01 * e, 0.7, 0.99],
             'diag/weight_angle': [5.0 + e, 30.0 + e] if mlp else None}
      f.write(json.dumps(row) + '\n')
    f.write('garbage line\n')


def _write_conv(path, epochs, seed=0, homeo=0.0, cap_from=None):
  """Rows as cifar_conv.py writes them: four state layers, three kernel angles; from epoch
  cap_from on some batch's free phase ran 250 steps (table2long's T_free)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    for e in range(1, epochs + 1):
      f.write(json.dumps({
          'epoch': e, 'test_error': 80.0 - 10 * e - seed - homeo, 'test_top5_error': 20.0,
          'train_loss': 2.0 / e, 'diag/symmetry': 0.95 + 0.001 * homeo,
          'diag/cosine_exact': [0.8, 0.85, 0.9 + seed / 100, 1.0],
          'diag/weight_angle': [1.0, 2.0, 3.0 * e], 'log10_residual': -5.0 - e / 10,
          'log10_residual_max': -4.5,
          'free_steps': 19.0 + e,
          'free_steps_max': 250 if cap_from and e >= cap_from else 40 + e}) + '\n')


def test_report_and_figures_from_fake_results(tmp_path):
  results = str(tmp_path / 'results')
  runs = {f'{r.group}/{r.name}': r for r in sweep.plan()}
  path = lambda key: sweep.result_paths(runs[key], results)[0]
  _write(path('table1/hep2_beta0.05_seed0'), 50)
  _write(path('table1/hep6_beta0.5_seed0'), 12)  # partial
  _write(path('table1_cont/cont4_beta0.5_seed0'), 10)
  _write(path('fig3/bptt_alpha0_seed0'), 20)
  _write(path('fig3/hep_exact_alpha90_seed0'), 1)  # one point
  for seed in (0, 1, 2):
    _write(path(f'fig4ad/homeo1_seed{seed}'), 50, seed=seed, homeo=1.0)
  for seed in (0, 1):
    _write(path(f'fig4ad/homeo0_seed{seed}'), 50 if seed else 7, seed=seed)
  _write(path('fig4eh/homeo0.1_seed0'), 50, homeo=0.1, mlp=False, start=0)
  with open(sweep.result_paths(runs['table1/hep2_beta0.05_seed0'], results)[1], 'w') as f:
    json.dump({'commit': 'abcdef0123456789-dirty'}, f)
  # Table 1's N = 1, |beta| = 0.5 cell with three seeds: 30 - 10 - seed = 20, 19, 18.
  for name, seed in (('hep1_beta0.5_seed0', 0), ('hep1_beta0.5_seed1', 1),
                     ('hep1_beta0.5_seed2', 2)):
    _write(path(f'table1/{name}'), 50, seed=seed)
  # Table 2 in miniature: the homeostasis pair with 3 / 2 seeds (one partial), BPTT, no N = 2.
  for seed in (0, 1, 2):
    _write_conv(path(f'table2mini/exact_homeo15_seed{seed}'), 4, seed=seed, homeo=15.0)
  _write_conv(path('table2mini/exact_homeo0_seed0'), 4)
  _write_conv(path('table2mini/exact_homeo0_seed1'), 2, seed=1)
  _write_conv(path('table2mini/bptt_homeo15_seed0'), 4, homeo=15.0)
  _write_conv(path('table2mini/tied_homeo0_seed0'), 4)
  _write_conv(path('table2long/exact_homeo0_seed0'), 4)
  _write_conv(path('table2long/tied_homeo0_seed0'), 4, cap_from=3)
  # The short checks: 2 epochs of the synchronous update.
  _write(path('fmnist_checks/synchronous_hep2_seed0'), 2, seed=3)

  assert plot.main(['--results_dir', results]) == 0
  report = open(os.path.join(results, 'fmnist_report.md')).read()
  for name in ('fig3', 'fig4ad', 'fig4eh', 'fig4il_mini', 'table2mini', 'fig4il_long',
               'table2long'):
    assert os.path.getsize(os.path.join(results, 'figures', f'{name}.png')) > 1000
    assert f'figures/{name}.png' in report
  assert '| paper, \\|beta\\| = 0.5 | 38.4 ± 6.2 | 16.3 ± 0.7 |' in report
  assert '20.00 (50 ep)' in report  # 30 - 0.2 * 50, hep2 at |beta| = 0.05
  assert '27.60 (12/50 ep)' in report  # the partial N = 6 cell
  assert '28.00 (10 ep)' in report  # continuous time, 10 epochs planned
  assert f'19.00 ± {np.std([20.0, 19.0, 18.0], ddof=1):.2f} (n=3) (50 ep)' in report
  assert '| table1/exact_seed0 | missing (0/50) |' in report
  assert 'table1/hep1_beta0.05_seed0' in report.split('## Notes')[1].split('\n* ')[2]  # missing
  # Checks: test error after epochs 1 / 2 / 10 (30 - 0.2 e - 3), next to the sequential run.
  assert '| synchronous | 26.8 / 26.6 / – | 0.5 | 0.79 / 0.7 / 0.99 |' in report
  assert '| sequential (default) | 29.8 / 29.6 / 28 |' in report
  assert '| synchronous | missing | | | fmnist_checks/synchronous_exact_seed0 |' in report
  assert '| table1/hep6_beta0.5_seed0 | partial (12/50 epochs) |' in report
  assert '| fig4ad/homeo1_seed0 | done |' in report and 'abcdef012345 |' in report
  # Fig. 4a-d, lambda = 1: final errors 30 - 10 - 5 - seed = 15, 14, 13 -> 14 ± 1/sqrt(3).
  se = np.std([15.0, 14.0, 13.0], ddof=1) / np.sqrt(3)
  assert f'| lambda = 1 | 3 (epochs reached: 50 of 50) | 14 ± {se:.2g} |' in report
  assert '| lambda = 0 | 2 (epochs reached: 7, 50 of 50) |' in report
  assert '| lambda = 0 | 0 | missing |' in report  # Fig. 4e-h without homeostasis

  # Table 2 in miniature: accuracy = 100 - (80 - 40 - seed - 15) = 75, 76, 77 -> 76 ± 1 (std,
  # as the paper's table).
  assert ('| hEP exact d_beta s*, lambda = 15 | 84.3 ± 0.1 | 3 (epochs reached: 4 of 4) | '
          '76 ± 1 | 20 ± 0 | 0.965 ± 0 |') in report
  assert '0.85 ± 0 / 0.91 ± 0.01 / 1 ± 0 | 1 ± 0 / 2 ± 0 / 12 ± 0 |' in report  # per layer
  assert '| -5.4 ± 0 / -4.5 ± 0 | 23 ± 0 / 44 ± 0 | none; none; none |' in report  # cap 100
  # The longer group: its own section, table and figures; a run whose free phase hit the
  # cap of 250 steps in epochs 3-4 is flagged.
  long = report.split('## Table 2 and Fig. 4i-l in miniature, 5x longer')[1]
  assert '2,500 steps' in long and '![fig4il_long](figures/fig4il_long.png)' in long
  # Its test error after each epoch (mean ± SE over the seeds that reached it), and the pair's
  # difference: epoch 1, lambda 0 70, 69 and lambda 15 55, 54, 53; epoch 3, lambda 0 one seed.
  mini = report.split('## Table 2 and Fig. 4i-l in miniature (')[1].split('\n## ')[0]
  se0, se15 = 0.5, np.std([55, 54, 53], ddof=1) / np.sqrt(3)
  assert '| condition | seeds | epoch 1 | epoch 2 | epoch 3 | epoch 4 |' in mini
  assert ('| hEP exact d_beta s*, lambda = 0 | 2 | 69.50 ± 0.50 | 59.50 ± 0.50 | 50.00 | 40.00 |'
          in mini)
  assert f'| hEP exact d_beta s*, lambda = 15 | 3 | 54.00 ± {se15:.2f} |' in mini
  assert (f'| hEP exact: lambda = 0 minus lambda = 15 | | 15.50 ± {np.hypot(se0, se15):.2f} | '
          f'15.50 ± {np.hypot(se0, se15):.2f} | 16.00 | 16.00 |') in mini
  assert '| RBP (BP through T_nudge), lambda = 15 | 1 | 55.00 | 45.00 | 35.00 | 25.00 |' in mini
  assert 'hEP N = 2' not in mini.split('after each epoch')[1]  # no runs: no row
  assert ('| tied (symmetric) network, hEP exact, lambda = 0 | 88.6 ± 0.2 | 1 (epochs '
          'reached: 4 of 4) |') in long and '| 3, 4 |' in long
  assert '| hEP exact d_beta s*, lambda = 15 | 84.3 ± 0.1 | 0 | missing |' in long
  assert '| hEP exact d_beta s*, lambda = 0 | 60.4 ± 0.4 | 2 (epochs reached: 2, 4 of 4) |' in report
  assert '| hEP N = 2, \\|beta\\| = 1, lambda = 15 | 81.4 ± 0.1 | 0 | missing |' in report
  assert '| RBP (BP through T_nudge), lambda = 15 | 87.8 ± 0.3 | 1 (epochs reached: 4 of 4) | 75 |' in report

  out = str(tmp_path / 'elsewhere')
  assert plot.main(['--results_dir', results, '--out_dir', out]) == 0
  assert open(os.path.join(out, 'fmnist_report.md')).read() == report
  assert os.path.exists(os.path.join(out, 'figures', 'fig3.png'))


def test_an_empty_results_folder_gives_a_report_of_missing_runs(tmp_path):
  assert plot.main(['--results_dir', str(tmp_path)]) == 0
  report = open(tmp_path / 'fmnist_report.md').read()
  assert f'{len(sweep.plan())} planned runs have no results yet' in report
  assert '(no fig3 run yet)' in report
  # No empty figure is written, and one left from an earlier report is removed.
  assert not os.listdir(tmp_path / 'figures')
  (tmp_path / 'figures' / 'fig4eh.png').write_bytes(b'old')
  assert plot.main(['--results_dir', str(tmp_path)]) == 0
  assert not os.listdir(tmp_path / 'figures')


# ------------------------------------------------------------------------ --runs: any runs

def _mlp_row(epoch):
  """A row with the keys fmnist_mlp.py writes (homeo_coef > 0, hEP N = 2)."""
  return {'epoch': epoch, 'step': 1200 * epoch, 'train_loss': 1.0 / epoch,
          'train_accuracy': 0.7, 'epoch_time_s': 9.4, 'images_per_s': 6400.0,
          'log10_residual': -5.0, 'log10_residual_max': 0.3, 'dropped_samples': 0,
          'train_homeo_loss': 0.1, 'test_error': 30.0 - epoch,
          'diag/cosine_exact': [0.2, 0.3, 0.97], 'diag/cosine_estimate': [0.2, 0.3, 0.96],
          'diag/homeo_loss': 1.4, 'diag/homeo_loss_exact': 1.5, 'diag/log10_residual': -4.0,
          'diag/loss': 1.5, 'diag/symmetry': 0.6, 'diag/weight_angle': [88.0, 77.0]}


def _feedback_row(epoch):
  """fmnist_feedback.py's row: no weight has a transposed partner."""
  return dict(_mlp_row(epoch), **{'diag/weight_angle': None})


def _conv_row(epoch):
  """cifar_conv.py's row: top-5, free steps, four state layers, three kernel angles."""
  row = dict(_mlp_row(epoch), test_top5_error=5.0 / epoch, train_top5_accuracy=0.9,
             free_steps=17.7 + epoch, free_steps_max=26 + epoch,
             **{'diag/cosine_exact': [0.83, 0.84, 0.89, 1.0],
                'diag/weight_angle': [1.4, 2.4, 8.3]})
  del row['diag/homeo_loss_exact'], row['diag/cosine_estimate']
  return row


def _workdir(path, rows, **config):
  """A workdir as the scripts leave it: config.json (the whole config) and metrics.jsonl."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({'seed': 0, 'channels': [16, 32], 'algorithm': 'hep_exact', 'tol': 1e-05,
               'homeo_coef': 15.0, 'num_epochs': 10, **config}, f, indent=2)
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return str(path)


def _result(path, rows, flags):
  """A committed result <name>.jsonl and its sidecar <name>.meta.json with the command."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  with open(path[:-len('.jsonl')] + '.meta.json', 'w') as f:
    json.dump({'command': 'python cifar_conv.py --config=configs/cifar10.py '
                          f'--workdir=runs/x {flags}', 'commit': 'abc'}, f)
  return path


TEST_ERROR, LOSS, SYMMETRY, ANGLE, COSINE, RESIDUAL, FREE = [t for t, _ in plot.RUN_PANELS]


def test_runs_draws_the_panels_that_each_scripts_rows_carry(tmp_path):
  common = [(LOSS, ['training loss']), (SYMMETRY, ['symmetry'])]
  residual = [(RESIDUAL, ['epoch mean', 'epoch max'])]
  expected = {
      'mlp': [(TEST_ERROR, ['top-1'])] + common + [(ANGLE, ['l1-l2', 'l2-out']),
                                                   (COSINE, ['l1', 'l2', 'out'])] + residual,
      'feedback': [(TEST_ERROR, ['top-1'])] + common + [(COSINE, ['l1', 'l2', 'out'])]
                  + residual,
      'conv': [(TEST_ERROR, ['top-1', 'top-5'])] + common
              + [(ANGLE, ['1-2', '2-3', '3-out']), (COSINE, ['conv1', 'conv2', 'conv3', 'dense'])]
              + residual + [(FREE, ['mean over samples', 'most in a batch'])],
  }
  workdirs = []
  for name, row in (('mlp', _mlp_row), ('feedback', _feedback_row), ('conv', _conv_row)):
    workdirs.append(_workdir(tmp_path / name, [row(e) for e in (1, 2, 3)]))
    out = str(tmp_path / f'{name}.png')
    labels, panels = plot.watch([workdirs[-1]], out)
    assert panels == expected[name]
    assert labels == [f'{name} (epoch 3 of 10)']
    with open(out, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  # All three side by side: the layers, which the nets name differently, are numbered.
  _, panels = plot.watch(workdirs, str(tmp_path / 'all.png'))
  assert dict(panels)[COSINE] == ['#1', '#2', '#3', '#4']
  assert dict(panels)[ANGLE] == ['#1', '#2', '#3']
  assert dict(panels)[TEST_ERROR] == ['top-1', 'top-5']


def test_runs_reads_a_run_still_going_and_skips_bad_lines_with_one_line_each(tmp_path,
                                                                             capsys):
  workdir = _workdir(tmp_path / 'going', [_conv_row(1), _conv_row(2)])
  metrics = os.path.join(workdir, 'metrics.jsonl')
  with open(metrics, 'a') as f:
    f.write('{"epoch": 3, "test_error": 1\n')  # a damaged row
    f.write(json.dumps(_conv_row(3)) + '\n')
    f.write('[4]\n')
    f.write(json.dumps(_conv_row(4))[:40])  # a partial last line
  out = str(tmp_path / 'going.png')
  assert plot.main([f'--runs={workdir}', f'--out={out}']) == 0
  captured = capsys.readouterr()
  assert captured.err.splitlines() == [
      f'plot.py: skipped {metrics} line 3 (not JSON)',
      f'plot.py: skipped {metrics} line 5 (not a metrics row: no integer epoch)',
      f'plot.py: skipped {metrics} line 6 (not JSON)']
  assert captured.out == f'wrote {out}: going (epoch 3 of 10)\n'
  assert os.path.getsize(out) > 1000


def test_runs_legend_names_the_fields_in_which_the_runs_differ(tmp_path):
  a = _workdir(tmp_path / 'runs' / 'a', [_conv_row(1), _conv_row(2)])
  b = _workdir(tmp_path / 'runs' / 'b', [_conv_row(1)], homeo_coef=0.0)
  labels, _ = plot.watch([a, b], str(tmp_path / 'ab.png'))
  assert labels == ['a: homeo_coef=15 (epoch 2 of 10)', 'b: homeo_coef=0 (epoch 1 of 10)']
  # A committed result's config is its command's flags: (16, 32) and 1e-05 there equal the
  # workdir's [16, 32] and 1e-05; both paths end in a/, so the names take one more part.
  result = _result(str(tmp_path / 'results' / 'mini' / 'a.jsonl'), [_conv_row(1)],
                   "'--config.channels=(16, 32)' --config.tol=1e-05 --config.homeo_coef=0.0 "
                   '--config.seed=1 --config.num_epochs=4')
  labels, _ = plot.watch([a, result], str(tmp_path / 'ar.png'))
  assert labels == ['runs/a: seed=0, homeo_coef=15, num_epochs=10 (epoch 2 of 10)',
                    'mini/a: seed=1, homeo_coef=0, num_epochs=4 (epoch 1 of 4)']
  # No more than four fields; a workdir's metrics.jsonl is accepted for its workdir.
  c = _workdir(tmp_path / 'runs' / 'c', [_mlp_row(1)], seed=1, channels=[8], algorithm='hep',
               tol=0.0, homeo_coef=1.0)
  labels, _ = plot.watch([os.path.join(c, 'metrics.jsonl'), a], str(tmp_path / 'ca.png'))
  assert labels == ['c: seed=1, channels=(8), algorithm=hep, tol=0, and 1 more (epoch 1 of 10)',
                    'a: seed=0, channels=(16,32), algorithm=hep_exact, tol=1e-05, and 1 more '
                    '(epoch 2 of 10)']


def test_runs_draws_the_committed_miniature_pair_of_the_readme(tmp_path):
  runs = ','.join(os.path.join(sweep.ROOT, 'results', 'table2mini', f'exact_{n}_seed0.jsonl')
                  for n in ('homeo15', 'homeo0'))
  labels, panels = plot.watch(runs.split(','), str(tmp_path / 'watch.png'))
  assert labels == ['exact_homeo15_seed0: homeo_coef=15 (epoch 4 of 4)',
                    'exact_homeo0_seed0: homeo_coef=0 (epoch 4 of 4)']
  assert [t for t, _ in panels] == [t for t, _ in plot.RUN_PANELS]


def test_runs_default_figure_is_runs_png_in_the_current_folder(tmp_path, monkeypatch):
  workdir = _workdir(tmp_path / 'w', [_mlp_row(1)])
  monkeypatch.chdir(tmp_path)
  assert plot.main([f'--runs={workdir}']) == 0
  assert os.path.getsize(tmp_path / 'runs.png') > 1000
  assert sorted(os.listdir(workdir)) == ['config.json', 'metrics.jsonl']  # nothing written there


def test_runs_an_empty_workdir_is_a_one_line_error(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  out = tmp_path / 'x.png'
  result = run_script('plot.py', [f'--runs={empty}', f'--out={out}'])
  assert result.returncode == 1
  assert result.stderr == (f'plot.py: error: {empty} has no metrics.jsonl (not a workdir, or its '
                           'first epoch has not ended yet)\n')
  assert result.stdout == '' and not out.exists()


def test_runs_leaves_out_a_run_without_rows_beside_one_with_rows(tmp_path, capsys):
  good, empty, started = tmp_path / 'good', tmp_path / 'empty', tmp_path / 'started'
  _workdir(good, [_mlp_row(1)])
  empty.mkdir()
  _workdir(started, [])  # config.json and an empty metrics.jsonl: epoch 1 is under way
  labels, _ = plot.watch([str(empty), str(good), str(started)], str(tmp_path / 'x.png'))
  assert len(labels) == 1 and labels[0].startswith('good')
  assert os.path.getsize(tmp_path / 'x.png') > 1000
  assert capsys.readouterr().err.splitlines() == [
      f'plot.py: left out of the figure: {empty} has no metrics.jsonl (not a workdir, or its '
      'first epoch has not ended yet)',
      f'plot.py: left out of the figure: {started}/metrics.jsonl holds no metrics row yet']
  with pytest.raises(plot.RunsError, match='^none of the runs has a metrics row yet$'):
    plot.watch([str(empty), str(started)], str(tmp_path / 'y.png'))
  assert not (tmp_path / 'y.png').exists()


@pytest.mark.parametrize('args, error', [
    (['--runs={tmp}/missing'], 'no such workdir or results file: {tmp}/missing'),
    (['--runs={tmp}/garbage'], '{tmp}/garbage/metrics.jsonl holds no metrics row yet'),
    (['--runs={tmp}/rowless'], 'the rows carry none of the metrics drawn (test_error,'),
    (['--runs=,'], '--runs names no run'),
    (['--runs={tmp}/w', '--out={tmp}/no/such/folder.png'], 'cannot write {tmp}/no/such/folder.png'),
    (['--runs={tmp}/w', '--out={tmp}/w.unknownformat'], 'cannot write {tmp}/w.unknownformat'),
    (['--runs={tmp}/w', '--out_dir={tmp}'], '--results_dir and --out_dir are for the report'),
    (['--out={tmp}/x.png'], '--out goes with --runs'),
])
def test_runs_bad_input_is_one_line(tmp_path, args, error):
  _workdir(tmp_path / 'w', [_mlp_row(1)])
  _workdir(tmp_path / 'rowless', [{'epoch': 1, 'step': 10}])
  os.makedirs(tmp_path / 'garbage')
  (tmp_path / 'garbage' / 'metrics.jsonl').write_text('not json\n')
  with pytest.raises(SystemExit) as e:
    plot.main([a.format(tmp=tmp_path) for a in args])
  assert e.value.code.startswith('plot.py: error: ' + error.format(tmp=tmp_path))
  assert '\n' not in e.value.code

"""plot_fmnist.py on fake results: complete, partial, multi-seed and missing runs."""
import json
import os

import numpy as np

import plot_fmnist
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


def _write_conv(path, epochs, seed=0, homeo=0.0):
  """Rows as cifar_conv.py writes them: four state layers, three kernel angles."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    for e in range(1, epochs + 1):
      f.write(json.dumps({
          'epoch': e, 'test_error': 80.0 - 10 * e - seed - homeo, 'test_top5_error': 20.0,
          'train_loss': 2.0 / e, 'diag/symmetry': 0.95 + 0.001 * homeo,
          'diag/cosine_exact': [0.8, 0.85, 0.9 + seed / 100, 1.0],
          'diag/weight_angle': [1.0, 2.0, 3.0 * e], 'log10_residual': -5.0 - e / 10,
          'log10_residual_max': -4.5,
          'free_steps': 19.0 + e, 'free_steps_max': 40 + e}) + '\n')


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
  # The short checks: 2 epochs of the synchronous update.
  _write(path('fmnist_checks/synchronous_hep2_seed0'), 2, seed=3)

  assert plot_fmnist.main(['--results_dir', results]) == 0
  report = open(os.path.join(results, 'fmnist_report.md')).read()
  for name in ('fig3', 'fig4ad', 'fig4eh', 'fig4il_mini', 'table2mini'):
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

  # Table 2 in miniature: accuracy = 100 - (80 - 40 - seed - 15) = 75, 76, 77 -> 76 ± 1/sqrt(3).
  se = np.std([75.0, 76.0, 77.0], ddof=1) / np.sqrt(3)
  assert (f'| hEP exact d_beta s*, lambda = 15 | 84.3 ± 0.1 | 3 (epochs reached: 4 of 4) | '
          f'76 ± {se:.2g} | 20 ± 0 | 0.965 ± 0 |') in report
  assert '0.85 ± 0 / 0.91 ± 0.0058 / 1 ± 0 | 1 ± 0 / 2 ± 0 / 12 ± 0 |' in report  # per layer
  assert '| -5.4 ± 0 / -4.5 ± 0 | 23 ± 0 / 44 ± 0 |' in report  # residual, free steps
  assert '| hEP exact d_beta s*, lambda = 0 | 60.4 ± 0.4 | 2 (epochs reached: 2, 4 of 4) |' in report
  assert '| hEP N = 2, \\|beta\\| = 1, lambda = 15 | 81.4 ± 0.1 | 0 | missing |' in report
  assert '| RBP (BP through T_nudge), lambda = 15 | 87.8 ± 0.3 | 1 (epochs reached: 4 of 4) | 75 |' in report

  out = str(tmp_path / 'elsewhere')
  assert plot_fmnist.main(['--results_dir', results, '--out_dir', out]) == 0
  assert open(os.path.join(out, 'fmnist_report.md')).read() == report
  assert os.path.exists(os.path.join(out, 'figures', 'fig3.png'))


def test_an_empty_results_folder_gives_a_report_of_missing_runs(tmp_path):
  assert plot_fmnist.main(['--results_dir', str(tmp_path)]) == 0
  report = open(tmp_path / 'fmnist_report.md').read()
  assert f'{len(sweep.plan())} planned runs have no results yet' in report
  assert '(no fig3 run yet)' in report
  # No empty figure is written, and one left from an earlier report is removed.
  assert not os.listdir(tmp_path / 'figures')
  (tmp_path / 'figures' / 'fig4eh.png').write_bytes(b'old')
  assert plot_fmnist.main(['--results_dir', str(tmp_path)]) == 0
  assert not os.listdir(tmp_path / 'figures')

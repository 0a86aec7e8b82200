r"""Figures and a report for the Fashion-MNIST reproduction (Table 1, Fig. 3, Fig. 4a-h; Table 2
and Fig. 4i-l in miniature).

    python plot_fmnist.py                       # reads results/<group>/<name>.jsonl
    python plot_fmnist.py --results_dir=/tmp/r --out_dir=/tmp/report

Reads the per-epoch metrics that sweep.py copies to results/<group>/<name>.jsonl (the runs
of sweep.plan()) and writes

* <out_dir>/figures/fig3.png: Fig. 3-style panels, top row the "BP" baseline (bptt), bottom
  row hEP with the exact d_beta s*: weight angle per layer, training loss, per-layer cosine
  between the exact d_beta s* and RBP's delta, one colour per initial angle;
* <out_dir>/figures/fig4ad.png, fig4eh.png: Fig. 4-style panels, test error, Jacobian
  symmetry measure and per-layer cosine, with vs without homeostasis, mean over seeds and a
  +-1 standard-error band;
* <out_dir>/figures/fig4il_mini.png: Fig. 4i-l-style panels for the convnet in miniature
  (hEP exact with vs without homeostasis): test error, symmetry measure, weight angle and
  cosine per layer, log10 ||F|| and the free steps actually run;
* <out_dir>/figures/table2mini.png: the five rows of Table 2 in miniature, one colour each;
* <out_dir>/fmnist_report.md: Table 1 (final-epoch test error of every cell, next to the
  paper's values), the Fig. 4 final values, Table 2 in miniature beside the paper's CIFAR-10
  column, and a list of every run with its status.

Missing runs are skipped with a note; partial runs are drawn and reported with the epochs
they reached. A Table 1 cell with several seeds (`<name>_seed0`, `<name>_seed1`, ...) reports
their mean ± std. --out_dir defaults to --results_dir.
"""
import argparse
import collections
import json
import math
import os
import re
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position

# The paper's Table 1 (validation error %, mean +- std over 5 seeds, 50 epochs), copied from
# the paper; keys: (N, |beta|), 'cont' for continuous time, 'exact' for the true d_beta u*.
PAPER_TABLE1 = {
    (1, 0.05): '15.8 ± 0.6', (2, 0.05): '14.6 ± 0.4', (4, 0.05): '14.7 ± 0.7',
    (6, 0.05): '14.5 ± 0.6', ('cont', 0.05): '15.8 ± 0.8', ('exact', None): '14.7 ± 0.6',
    (1, 0.5): '38.4 ± 6.2', (2, 0.5): '16.3 ± 0.7', (4, 0.5): '14.8 ± 0.8',
    (6, 0.5): '14.3 ± 0.6', ('cont', 0.5): '17.3 ± 1.0',
}

MLP_LAYERS = ('l1', 'l2', 'out')
MLP_ANGLES = ('l1-l2', 'l2-out')
CONV_LAYERS = ('conv1', 'conv2', 'conv3', 'dense')  # the states of App. D.2's convnet
CONV_ANGLES = ('1-2', '2-3', '3-out')  # backward kernel vs its forward partner
LINESTYLES = ('-', '--', ':', '-.')

# Figure panels: (metric, axis label, layers); layers = None for a scalar metric, else the
# (index, name) pairs of the layers to draw, one line style each.
SYMMETRY = ('diag/symmetry', 'symmetry ||S|| / (||S|| + ||A||)', None)
COSINE = 'cosine(d_beta s*, delta_RBP)'
RESIDUAL = ('log10_residual', 'log10 ||F||, worst sample of a batch (train mean)', None)
MLP_PANELS = (('test_error', 'test error (%)', None), SYMMETRY,
              ('diag/cosine_exact', COSINE, tuple(enumerate(MLP_LAYERS))))
CONV_PANELS = (('test_error', 'test error (%)', None), SYMMETRY,
               ('diag/weight_angle', 'angle w_b vs w_f (deg)', tuple(enumerate(CONV_ANGLES))),
               ('diag/cosine_exact', COSINE, tuple(enumerate(CONV_LAYERS))),
               RESIDUAL,
               ('free_steps', 'free steps per sample (train mean)', None))
# All five rows of Table 2 at once: per-layer metrics of the first layer only.
TABLE2_PANELS = (('test_error', 'test error (%)', None), SYMMETRY,
                 ('diag/cosine_exact', COSINE + ', conv1', ((0, 'conv1'),)),
                 ('train_loss', 'training loss', None),
                 RESIDUAL,
                 ('free_steps', 'free steps per sample (train mean)', None))


# ------------------------------------------------------------------------------- data

Loaded = collections.namedtuple('Loaded', 'run rows epochs wanted source meta')


def load(results_dir):
  """{'group/name': Loaded} for every planned run that has a results file."""
  loaded = {}
  for run in sweep.plan():
    path, meta_path = sweep.result_paths(run, results_dir)
    if not os.path.exists(path):
      continue
    rows = harness.read_rows(path)
    if not rows:
      continue
    meta = None
    if os.path.exists(meta_path):
      try:
        with open(meta_path) as f:
          meta = json.load(f)
      except ValueError:
        meta = None
    loaded[f'{run.group}/{run.name}'] = Loaded(run, rows, max(r['epoch'] for r in rows),
                                               sweep.num_epochs(run), path, meta)
  return loaded


def seeds_of(loaded, group, name):
  """Every seed of one condition: the runs `group/name_seed<k>`."""
  return [v for k, v in loaded.items()
          if re.fullmatch(rf'{re.escape(group)}/{re.escape(name)}_seed\d+', k)]


def series(rows, key, index=None):
  """(epochs, values) of a metric, NaN where missing or null; `index` picks a layer."""
  epochs, values = [], []
  for row in rows:
    value = row.get(key)
    if index is not None:
      value = value[index] if isinstance(value, list) and index < len(value) else None
    epochs.append(row['epoch'])
    values.append(np.nan if value is None else float(value))
  return np.asarray(epochs), np.asarray(values)


def num_layers(rows, key):
  return max((len(r[key]) for r in rows if isinstance(r.get(key), list)), default=0)


def aggregate(loaded_runs, key, index=None, band='se'):
  """Mean over seeds per epoch, and a band (standard error or std; 0 with one seed)."""
  per_epoch = collections.defaultdict(list)
  for item in loaded_runs:
    for e, v in zip(*series(item.rows, key, index)):
      if np.isfinite(v):
        per_epoch[e].append(v)
  epochs = np.asarray(sorted(per_epoch))
  mean = np.asarray([np.mean(per_epoch[e]) for e in epochs])
  spread = []
  for e in epochs:
    v = per_epoch[e]
    sd = np.std(v, ddof=1) if len(v) > 1 else 0.0
    spread.append(sd / math.sqrt(len(v)) if band == 'se' else sd)
  return epochs, mean, np.asarray(spread)


def final_error(items):
  """'mean' or 'mean ± std (n seeds)' of the final-epoch test errors, with the epochs."""
  values = [i.rows[-1].get('test_error') for i in items]
  values = [v for v in values if v is not None]
  if not values:
    return 'n/a'
  text = f'{np.mean(values):.2f}'
  if len(values) > 1:
    text += f' ± {np.std(values, ddof=1):.2f} (n={len(values)})'
  reached, wanted = min(i.epochs for i in items), items[0].wanted
  text += f' ({reached}/{wanted} ep)' if reached < wanted else f' ({wanted} ep)'
  return text


# ----------------------------------------------------------------------------- figures

def _band(ax, epochs, mean, spread, **kwargs):
  line, = ax.plot(epochs, mean, marker='.', markersize=4, **kwargs)
  if np.any(spread > 0):
    ax.fill_between(epochs, mean - spread, mean + spread, color=line.get_color(), alpha=0.2,
                    linewidth=0)
  return line


def save(fig, path, drawn):
  """Writes the figure if anything was drawn; an empty one is not written (and an older file
  of that name is removed, so no figure outlives its data)."""
  if drawn:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
  elif os.path.exists(path):
    os.remove(path)
  plt.close(fig)
  return drawn


def fig3(loaded, path):
  """2 x 3 panels: rows bptt / hep_exact; weight angle, train loss, per-layer cosine."""
  fig, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
  drawn = 0
  colours = plt.get_cmap('viridis')
  for row, (algorithm, title) in enumerate((('bptt', 'BP through T_nudge (bptt)'),
                                            ('hep_exact', 'hEP, exact d_beta s*'))):
    for i, alpha in enumerate((0, 45, 90)):
      items = [v for v in loaded.values() if v.run.group == 'fig3'
               and dict(v.run.overrides)['algorithm'] == algorithm
               and dict(v.run.overrides)['alpha'] == alpha]
      if not items:
        continue
      drawn += 1
      colour = colours(i / 2.5)
      label = f'alpha0 = {alpha}°'
      for l in range(num_layers(items[0].rows, 'diag/weight_angle')):
        _band(axes[row, 0], *aggregate(items, 'diag/weight_angle', l, band='std'),
              color=colour, linestyle=LINESTYLES[l % 4],
              label=f'{label}, {MLP_ANGLES[l] if l < 2 else l}')
      _band(axes[row, 1], *aggregate(items, 'train_loss', band='std'), color=colour,
            label=label)
      for l in range(num_layers(items[0].rows, 'diag/cosine_exact')):
        _band(axes[row, 2], *aggregate(items, 'diag/cosine_exact', l, band='std'),
              color=colour, linestyle=LINESTYLES[l % 4],
              label=f'{label}, {MLP_LAYERS[l] if l < 3 else l}')
    axes[row, 0].set_ylabel(f'{title}\nangle w_b vs w_f^T (deg)')
    axes[row, 1].set_ylabel('training loss')
    axes[row, 2].set_ylabel('cosine(d_beta s*, delta_RBP)')
    axes[row, 2].axhline(0, color='grey', linewidth=0.5)
  for ax in axes.flat:
    ax.set_xlabel('epoch')
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=6)
  fig.suptitle('Fig. 3: training dynamics vs initial angle (band = ±1 std over seeds '
               'where there are several)')
  return save(fig, path, drawn)


def fig4(loaded, group, conditions, path, title, panels=None):
  """Panels (three to a row; default: test error, symmetry, per-layer cosine), one colour per
  condition; mean ± 1 SE over its seeds. A condition is (run name without _seed<k>, label)."""
  panels = panels or MLP_PANELS
  rows = -(-len(panels) // 3)
  fig, axes = plt.subplots(rows, 3, figsize=(13, 3.8 * rows), squeeze=False)
  axes = axes.ravel()
  drawn = 0
  for c, (name, label) in enumerate(conditions):
    items = seeds_of(loaded, group, name)
    if not items:
      continue
    drawn += 1
    label = f'{label} (n={len(items)})'.replace('\\', '')  # no markdown escapes
    for ax, (key, _, layers) in zip(axes, panels):
      if layers is None:
        _band(ax, *aggregate(items, key), color=f'C{c}', label=label)
        continue
      for l, layer in layers:
        _band(ax, *aggregate(items, key, l), color=f'C{c}', linestyle=LINESTYLES[l % 4],
              label=f'{label}, {layer}' if len(layers) > 1 else label)
  for ax, (_, ylabel, _) in zip(axes, panels):
    ax.set_ylabel(ylabel)
    ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=6 if len(conditions) > 2 else 7)
  for ax in axes[len(panels):]:
    ax.axis('off')
  fig.suptitle(title + ' (mean ± 1 standard error over seeds)')
  return save(fig, path, drawn)


# ------------------------------------------------------------------------------ report

def table1(loaded):
  """Markdown rows of Table 1: the paper's values and ours, per |beta|."""
  def cell(group, name):
    items = seeds_of(loaded, group, name)
    return final_error(items) if items else 'missing'

  columns = [(n, 'table1', lambda b, n=n: f'hep{n}_beta{b:g}') for n in (1, 2, 4, 6)]
  columns.append(('cont', 'table1_cont', lambda b: f'cont4_beta{b:g}'))
  lines = ['| | N = 1 | N = 2 | N = 4 | N = 6 | Continuous-time (N = 4) | True d_beta u* |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  for beta in (0.05, 0.5):
    paper = [PAPER_TABLE1[(n, beta)] for n, _, _ in columns]
    paper.append(PAPER_TABLE1[('exact', None)] if beta == 0.05 else '')
    ours = [cell(group, name(beta)) for _, group, name in columns]
    ours.append(cell('table1', 'exact') if beta == 0.05 else '(does not depend on beta)')
    lines.append(f'| paper, \\|beta\\| = {beta:g} | ' + ' | '.join(paper) + ' |')
    lines.append(f'| ours, \\|beta\\| = {beta:g} | ' + ' | '.join(ours) + ' |')
  return lines


def _fmt(value, digits=3):
  if value is None:
    return 'n/a'
  if isinstance(value, list):
    return ' / '.join(_fmt(v, 2) for v in value)
  return f'{value:.{digits}g}' if isinstance(value, float) else str(value)


def run_table(loaded, results_dir):
  lines = ['| run | status | final test error % | train loss | symmetry | cosine exact (per layer) '
           '| weight angle (deg) | source | commit |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  missing = []
  for run in sweep.plan():
    key = f'{run.group}/{run.name}'
    item = loaded.get(key)
    if item is None:
      missing.append(key)
      lines.append(f'| {key} | missing (0/{sweep.num_epochs(run)}) | | | | | | | |')
      continue
    last = item.rows[-1]
    state = ('done' if item.epochs >= item.wanted
             else f'partial ({item.epochs}/{item.wanted} epochs)')
    commit = (item.meta or {}).get('commit', '')[:12]
    source = os.path.relpath(item.source, results_dir)
    lines.append(f'| {key} | {state} | {_fmt(last.get("test_error"), 4)} | '
                 f'{_fmt(last.get("train_loss"))} | {_fmt(last.get("diag/symmetry"))} | '
                 f'{_fmt(last.get("diag/cosine_exact"))} | {_fmt(last.get("diag/weight_angle"))}'
                 f' | {source} | {commit} |')
  return lines, missing


def mean_se(values):
  """'mean ± SE' over seeds ('value' for one seed; 'n/a' for none)."""
  values = [v for v in values if v is not None]
  if not values:
    return 'n/a'
  if len(values) == 1:
    return f'{values[0]:.3g}'
  se = np.std(values, ddof=1) / math.sqrt(len(values))
  se = 0.0 if se < 1e-9 * max(1.0, abs(np.mean(values))) else se  # float rounding of equals
  return f'{np.mean(values):.3g} ± {se:.2g}'


def accuracy(row):
  return None if row.get('test_error') is None else 100.0 - row['test_error']


def condition_table(loaded, group, conditions, columns, paper=None):
  """One markdown row per condition (run name without _seed<k>, label): its seeds and the
  mean ± SE over them of each column's final-epoch value. A column is (header, metric name or
  function of a row); a per-layer metric gives one mean per layer, joined by /. `paper`: the
  paper's value per condition name, in a column after the label."""
  head = ['condition'] + (['paper'] if paper else []) + ['seeds'] + [h for h, _ in columns]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  for name, label in conditions:
    cells = [label] + ([paper[name]] if paper else [])
    items = seeds_of(loaded, group, name)
    if not items:
      lines.append('| ' + ' | '.join(cells + ['0', 'missing'] + [''] * (len(columns) - 1))
                   + ' |')
      continue
    last = [i.rows[-1] for i in items]
    epochs = ', '.join(map(str, sorted({i.epochs for i in items})))
    cells.append(f'{len(items)} (epochs reached: {epochs} of {items[0].wanted})')
    for _, key in columns:
      value = key if callable(key) else lambda row, key=key: row.get(key)
      values = [value(r) for r in last]
      layers = max((len(v) for v in values if isinstance(v, list)), default=0)
      cells.append(' / '.join(mean_se([v[l] if isinstance(v, list) and l < len(v) else None
                                       for v in values]) for l in range(layers))
                   if layers else mean_se(values))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


MLP_COLUMNS = [('final test error % (mean ± SE)', 'test_error'), ('symmetry', 'diag/symmetry'),
               ('cosine l1 / l2 / out', 'diag/cosine_exact')]


# Pairs of runs that differ in one setting: (what differs, [(label, run key)]).
CHECKS = [
    ('layer updates, hEP N = 2, \\|beta\\| = 0.05',
     [('sequential (default)', 'table1/hep2_beta0.05_seed0'),
      ('synchronous', 'fmnist_checks/synchronous_hep2_seed0')]),
    ('layer updates, true d_beta s*',
     [('sequential (default)', 'table1/exact_seed0'),
      ('synchronous', 'fmnist_checks/synchronous_exact_seed0')]),
    ('layer updates, classic EP N = 1, \\|beta\\| = 0.5',
     [('sequential (default)', 'table1/hep1_beta0.5_seed0'),
      ('synchronous', 'fmnist_checks/synchronous_hep1_beta0.5_seed0'),
      ('sequential, seed 1', 'table1/hep1_beta0.5_seed1'),
      ('synchronous, seed 1', 'fmnist_checks/synchronous_hep1_beta0.5_seed1'),
      ('sequential, seed 2', 'table1/hep1_beta0.5_seed2'),
      ('synchronous, seed 2', 'fmnist_checks/synchronous_hep1_beta0.5_seed2')]),
    ('baselines (true gradient, up to T_nudge truncation)',
     [('RBP, adjoint fixed point', 'fmnist_checks/rbp_seed0'),
      ('BP through T_nudge (bptt)', 'fig3/bptt_alpha0_seed0'),
      ('hEP, true d_beta s*', 'table1/exact_seed0')]),
    ('continuous time, N = 4, \\|beta\\| = 0.5',
     [("hold-end average (the authors')", 'table1_cont/cont4_beta0.5_seed0'),
      ('every-step average (Eq. 8 literally)', 'fmnist_checks/cont4_every_step_beta0.5_seed0')]),
]


def checks_table(loaded):
  lines = ['| check | run | test error % after epoch 1 / 2 / 10 | train loss, epoch 1 | '
           'cosine exact vs delta, epoch 1 (l1 / l2 / out) | source |',
           '| --- | --- | --- | --- | --- | --- |']
  for what, pairs in CHECKS:
    for label, key in pairs:
      item = loaded.get(key)
      if item is None:
        lines.append(f'| {what} | {label} | missing | | | {key} |')
        continue
      by_epoch = {r['epoch']: r for r in item.rows}
      errors = ' / '.join(_fmt(by_epoch[e].get('test_error'), 4) if e in by_epoch else '–'
                          for e in (1, 2, 10))
      first = by_epoch.get(1, {})
      lines.append(f'| {what} | {label} | {errors} | {_fmt(first.get("train_loss"))} | '
                   f'{_fmt(first.get("diag/cosine_exact"))} | {key} |')
  return lines


FIG4 = {
    'fig4ad': ([('homeo0', 'lambda = 0'), ('homeo1', 'lambda = 1')],
               'Fig. 4a-d: reciprocal MLP, alpha0 = 90°, hEP exact, Adam 1e-4'),
    'fig4eh': ([('homeo0', 'lambda = 0'), ('homeo0.1', 'lambda = 0.1')],
               'Fig. 4e-h: output -> layer 1 feedback loop, hEP exact, SGD 1e-2'),
}

# Table 2 in miniature (sweep group table2mini): the rows of Table 2's CIFAR-10 column, with
# the paper's top-1 accuracy (%, mean ± std over 3 seeds, 150 epochs on CIFAR-10), copied
# from the paper. Its "Sym." row is hEP N = 2, |beta| = 1 on the symmetric network of [7];
# ours is the tied network trained with the exact d_beta s*.
TABLE2 = [('exact_homeo0', 'hEP exact d_beta s*, lambda = 0', '60.4 ± 0.4'),
          ('hep2_homeo15', 'hEP N = 2, \\|beta\\| = 1, lambda = 15', '81.4 ± 0.1'),
          ('exact_homeo15', 'hEP exact d_beta s*, lambda = 15', '84.3 ± 0.1'),
          ('bptt_homeo15', 'RBP (BP through T_nudge), lambda = 15', '87.8 ± 0.3'),
          ('tied_homeo0', 'tied (symmetric) network, hEP exact, lambda = 0', '88.6 ± 0.2')]
TABLE2_COLUMNS = [('test accuracy %', accuracy), ('top-5 error %', 'test_top5_error'),
                  ('symmetry', 'diag/symmetry'),
                  ('cosine conv1 / conv2 / conv3 / dense', 'diag/cosine_exact'),
                  ('angle 1-2 / 2-3 / 3-out (deg)', 'diag/weight_angle'),
                  ('log10 \\|\\|F\\|\\| of the worst sample, step mean / epoch max',
                   lambda r: [r.get('log10_residual'), r.get('log10_residual_max')]),
                  ('free steps, mean / max', lambda r: [r.get('free_steps'),
                                                        r.get('free_steps_max')])]
FIG4IL_TITLE = ('Fig. 4i-l in miniature: convnet (16/32/32/32) on Fashion-MNIST-32, hEP exact, '
                'SGD 7e-3, 4,000 images')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--results_dir', default=os.path.join(sweep.ROOT, 'results'))
  p.add_argument('--out_dir', default='', help='report and figures/ (default: results_dir)')
  args = p.parse_args(argv)
  out_dir = args.out_dir or args.results_dir
  figures = os.path.join(out_dir, 'figures')
  os.makedirs(figures, exist_ok=True)
  loaded = load(args.results_dir)
  shown = os.path.relpath(args.results_dir, sweep.ROOT)
  shown = args.results_dir if shown.startswith(os.pardir) else shown

  report = ['# Fashion-MNIST reproduction: Table 1, Fig. 3, Fig. 4a-h', '',
            f'Generated by `plot_fmnist.py` from `{shown}/<group>/<name>.jsonl` (the runs of `sweep.py`; `python sweep.py --list` shows '
            'their commands). Our numbers are single runs (seed 0) unless n is given; the '
            "paper's are means ± std over 5 seeds after 50 epochs. Epochs reached are given "
            'in parentheses. Each results file has a `.meta.json` beside it: command, '
            'producing commit, machine, wall time.', '']
  report += ['## Table 1: final-epoch test error (%)', '', *table1(loaded), '']
  report += ['Test error is on the 10,000 test images (the paper\'s "validation error"). '
             'Continuous-time: N = 4, 60 steps per point, 5 periods, no free phase.', '']

  notes = []
  drawn = fig3(loaded, os.path.join(figures, 'fig3.png'))
  report += ['## Fig. 3: initial angle, BP vs hEP', '',
             '![Fig. 3](figures/fig3.png)' if drawn else '(no fig3 run yet)', '']
  if drawn < 6:
    notes.append(f'Fig. 3: {drawn} of 6 conditions have results.')
  for group, (conditions, title) in FIG4.items():
    drawn = fig4(loaded, group, conditions, os.path.join(figures, f'{group}.png'), title)
    report += [f'## {title}', '', f'![{group}](figures/{group}.png)' if drawn else
               f'(no {group} run yet)', '',
               *condition_table(loaded, group, conditions, MLP_COLUMNS), '']
  pair = [(name, label) for name, label, _ in TABLE2 if name.startswith('exact_')][::-1]
  drawn = fig4(loaded, 'table2mini', pair, os.path.join(figures, 'fig4il_mini.png'),
               FIG4IL_TITLE, CONV_PANELS)
  rows = [(name, label) for name, label, _ in TABLE2]
  drawn_all = fig4(loaded, 'table2mini', rows, os.path.join(figures, 'table2mini.png'),
                   'Table 2 in miniature: its five rows', TABLE2_PANELS)
  report += ['## Table 2 and Fig. 4i-l in miniature (Fashion-MNIST-32)', '',
             'The paper: CIFAR-10 top-1 accuracy (%, n = 3, 150 epochs of 50,000 images, '
             'channels 128/256/512/512). Ours: test accuracy on the first 2,000 test images '
             'of Fashion-MNIST padded to 32x32x3, after the epochs given, with the settings '
             'of `sweep.py` (table2mini). The paper\'s "Sym." row is hEP N = 2 on the '
             'symmetric network; ours is that network trained with the exact d_beta s*.', '',
             *condition_table(loaded, 'table2mini', rows, TABLE2_COLUMNS,
                              paper={name: value for name, _, value in TABLE2}), '',
             '![fig4il_mini](figures/fig4il_mini.png)' if drawn else
             '(no table2mini hEP exact run yet)', '',
             '![table2mini](figures/table2mini.png)' if drawn_all else '', '']
  report += ['## Short checks: update order, baselines, continuous-time averages', '',
             'Early epochs of runs that differ in one setting (seed 0 unless stated, the '
             'Table 1 settings otherwise).', '', *checks_table(loaded), '']
  rows, missing = run_table(loaded, args.results_dir)
  if missing:
    notes.append(f'{len(missing)} planned runs have no results yet (skipped): '
                 + ', '.join(missing) + '.')
  partial = [k for k, v in loaded.items() if v.epochs < v.wanted]
  if partial:
    notes.append('Partial runs (drawn up to the epoch reached): ' + ', '.join(
        f'{k} ({loaded[k].epochs}/{loaded[k].wanted})' for k in partial) + '.')
  report += ['## Notes', ''] + [f'* {n}' for n in notes] + ['']
  report += ['## Every planned run', '', *rows, '']
  path = os.path.join(out_dir, 'fmnist_report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(report))
  print(f'wrote {path} and {figures}/ ({len(loaded)} of {len(sweep.plan())} runs have results)')
  return 0


if __name__ == '__main__':
  sys.exit(main())

r"""Figures of training runs: the Fashion-MNIST reproduction's report (Table 1, Fig. 3,
Fig. 4a-h; Table 2 and Fig. 4i-l in miniature), and the curves of any runs.

    python plot.py                              # the sweep's report: results/<group>/<name>.jsonl
    python plot.py --results_dir=/tmp/r --out_dir=/tmp/report
    python plot.py --runs=runs/a,runs/b --out=curves.png   # any runs, also while they train

**Any runs** (`--runs`, comma-separated): each is a workdir (its metrics.jsonl, and its
config.json for the legend) or a committed result results/<group>/<name>.jsonl (the legend's
config from the command in its <name>.meta.json: the --config file's name and the
--config.field=value flags). One PNG (--out, default runs.png in the current folder; nothing
is written into a workdir or results/ unless --out says so), one colour per run, with the
panels that the rows carry: test error (top-1, top-5), training loss, Jacobian symmetry,
weight angle and cosine per layer, log10 ||F|| and the free steps per sample; so it serves the
MLP, the feedback net and the conv nets alike. The legend names each run by the last
component of its path, the config fields in which the runs differ, and the last epoch. A run
still training is read as far as it goes: a line that is not a metrics row (a partial last
line, a damaged row) is skipped with one line on stderr.

**The sweep's report** (no --runs): reads the per-epoch metrics that sweep.py copies to
results/<group>/<name>.jsonl (the runs of sweep.plan()) and writes

* <out_dir>/figures/fig3.png: Fig. 3-style panels, top row the "BP" baseline (bptt), bottom
  row hEP with the exact d_beta s*: weight angle per layer, training loss, per-layer cosine
  between the exact d_beta s* and RBP's delta, one colour per initial angle;
* <out_dir>/figures/fig4ad.png, fig4eh.png: Fig. 4-style panels, test error, Jacobian
  symmetry measure and per-layer cosine, with vs without homeostasis, mean over seeds and a
  +-1 standard-error band;
* <out_dir>/figures/fig4il_mini.png, fig4il_long.png: Fig. 4i-l-style panels for the convnet
  in miniature, 500 and 2,500 steps (hEP exact with vs without homeostasis): test error,
  symmetry measure, weight angle and cosine per layer, log10 ||F|| and the free steps run;
* <out_dir>/figures/table2mini.png, table2long.png: the five rows of Table 2 in miniature,
  one colour each;
* <out_dir>/fmnist_report.md: Table 1 (final-epoch test error of every cell, next to the
  paper's values), the Fig. 4 final values (mean ± SE, as the paper's bands), Table 2 in
  miniature beside the paper's CIFAR-10 column (mean ± std, as the paper's table) with its
  test error after each epoch (mean ± SE, and the homeostasis pair's difference), and a
  list of every run with its status.

Missing runs are skipped with a note; partial runs are drawn and reported with the epochs
they reached. A Table 1 cell with several seeds (`<name>_seed0`, `<name>_seed1`, ...) reports
their mean ± std. --out_dir defaults to --results_dir.
"""
import argparse
import ast
import collections
import json
import math
import os
import re
import shlex
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
  """(epochs, values) of a metric, NaN where missing, null or not a number; `index` picks a
  layer."""
  epochs, values = [], []
  for row in rows:
    value = row.get(key)
    if index is not None:
      value = value[index] if isinstance(value, list) and index < len(value) else None
    epochs.append(row['epoch'])
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    values.append(float(value) if number else np.nan)
  return np.asarray(epochs), np.asarray(values)


def num_layers(rows, key):
  return max((len(r[key]) for r in rows if isinstance(r.get(key), list)), default=0)


def per_epoch(loaded_runs, key, index=None):
  """{epoch: the finite values of a metric over the runs (seeds) that have one}."""
  values = collections.defaultdict(list)
  for item in loaded_runs:
    for e, v in zip(*series(item.rows, key, index)):
      if np.isfinite(v):
        values[int(e)].append(float(v))
  return values


def aggregate(loaded_runs, key, index=None, band='se'):
  """Mean over seeds per epoch, and a band (standard error or std; 0 with one seed)."""
  values = per_epoch(loaded_runs, key, index)
  epochs = np.asarray(sorted(values))
  mean = np.asarray([np.mean(values[e]) for e in epochs])
  spread = []
  for e in epochs:
    v = values[e]
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


def save(fig, path, drawn, top=1.0):
  """Writes the figure if anything was drawn; an empty one is not written (and an older file
  of that name is removed, so no figure outlives its data). The panels fill the figure up to
  the fraction `top` of its height."""
  if drawn:
    fig.tight_layout(rect=(0, 0, 1, top))
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


def mean_spread(values, spread='se'):
  """'mean ± SE' (spread='se') or 'mean ± std' ('std') over seeds ('value' for one seed;
  'n/a' for none)."""
  values = [v for v in values if v is not None]
  if not values:
    return 'n/a'
  if len(values) == 1:
    return f'{values[0]:.3g}'
  sd = np.std(values, ddof=1) / (math.sqrt(len(values)) if spread == 'se' else 1.0)
  sd = 0.0 if sd < 1e-9 * max(1.0, abs(np.mean(values))) else sd  # float rounding of equals
  return f'{np.mean(values):.3g} ± {sd:.2g}'


class Whole:
  """A condition_table column computed from a run's every row (a text per run), not from
  its last row's value."""

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, loaded_run):
    return self.fn(loaded_run)


def accuracy(row):
  return None if row.get('test_error') is None else 100.0 - row['test_error']


def condition_table(loaded, group, conditions, columns, paper=None, spread='se'):
  """One markdown row per condition (run name without _seed<k>, label): its seeds and the
  mean ± SE (or ± std: spread='std') over them of each column's final-epoch value. A column
  is (header, metric name or function of the runs' rows); a per-layer metric gives one mean
  per layer, joined by /. `paper`: the paper's value per condition name, in a column after
  the label."""
  head = ['condition'] + (['paper'] if paper else []) + ['seeds'] + [h for h, _ in columns]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  for name, label in conditions:
    cells = [label] + ([paper[name]] if paper else [])
    items = seeds_of(loaded, group, name)
    if not items:
      lines.append('| ' + ' | '.join(cells + ['0', 'missing'] + [''] * (len(columns) - 1))
                   + ' |')
      continue
    epochs = ', '.join(map(str, sorted({i.epochs for i in items})))
    cells.append(f'{len(items)} (epochs reached: {epochs} of {items[0].wanted})')
    for _, key in columns:
      if isinstance(key, Whole):  # of all its rows: a text for each run
        cells.append('; '.join(key(i) for i in items))
        continue
      value = key if callable(key) else lambda row, key=key: row.get(key)
      values = [value(i.rows[-1]) for i in items]
      layers = max((len(v) for v in values if isinstance(v, list)), default=0)
      cells.append(' / '.join(mean_spread([v[l] if isinstance(v, list) and l < len(v) else None
                                           for v in values], spread) for l in range(layers))
                   if layers else mean_spread(values, spread))
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

# Table 2 in miniature (sweep groups table2mini and table2long): the rows of Table 2's
# CIFAR-10 column, with the paper's top-1 accuracy (%, mean ± std over 3 seeds, 150 epochs
# on CIFAR-10), copied from the paper. Its "Sym." row is hEP N = 2, |beta| = 1 on the
# symmetric network of [7]; ours is the tied network trained with the exact d_beta s*.
TABLE2 = [('exact_homeo0', 'hEP exact d_beta s*, lambda = 0', '60.4 ± 0.4'),
          ('hep2_homeo15', 'hEP N = 2, \\|beta\\| = 1, lambda = 15', '81.4 ± 0.1'),
          ('exact_homeo15', 'hEP exact d_beta s*, lambda = 15', '84.3 ± 0.1'),
          ('bptt_homeo15', 'RBP (BP through T_nudge), lambda = 15', '87.8 ± 0.3'),
          ('tied_homeo0', 'tied (symmetric) network, hEP exact, lambda = 0', '88.6 ± 0.2')]


def epochs_at_cap(item):
  """The epochs in which some batch's free phase ran all of T_free steps (the run's cap), as
  'none' or e.g. '2, 3, 4': there the free state may be short of its fixed point."""
  cap = dict(item.run.overrides).get('t_free')
  hit = [r['epoch'] for r in item.rows if cap and r.get('free_steps_max', 0) >= cap]
  return ', '.join(map(str, hit)) if hit else 'none'


TABLE2_COLUMNS = [('test accuracy %', accuracy), ('top-5 error %', 'test_top5_error'),
                  ('symmetry', 'diag/symmetry'),
                  ('cosine conv1 / conv2 / conv3 / dense', 'diag/cosine_exact'),
                  ('angle 1-2 / 2-3 / 3-out (deg)', 'diag/weight_angle'),
                  ('log10 \\|\\|F\\|\\| of the worst sample, step mean / epoch max',
                   lambda r: [r.get('log10_residual'), r.get('log10_residual_max')]),
                  ('free steps, mean / max', lambda r: [r.get('free_steps'),
                                                        r.get('free_steps_max')]),
                  ('epochs at the T_free cap, per seed', Whole(epochs_at_cap))]
TABLE2_GROUPS = {  # group: (title, what the runs are, figure name of the lambda pair)
    'table2mini': ('Table 2 and Fig. 4i-l in miniature (Fashion-MNIST-32)',
                   '4,000 training and the first 2,000 test images, 4 epochs (500 steps)',
                   'fig4il_mini'),
    'table2long': ('Table 2 and Fig. 4i-l in miniature, 5x longer (Fashion-MNIST-32)',
                   '20,000 training and the first 5,000 test images, 4 epochs (2,500 '
                   'steps), T_free up to 250', 'fig4il_long'),
}


def epoch_table(loaded, group, conditions, pair=('exact_homeo0', 'exact_homeo15'),
                pair_label='hEP exact: lambda = 0 minus lambda = 15'):
  """Test error after each epoch, mean ± SE over the seeds that reached it, one row per
  condition with runs; then the pair's difference (first minus second) with the SE of a
  difference of two independent means, where both sides have two seeds or more."""
  def mean_se(values):
    se = np.std(values, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else None
    return float(np.mean(values)), se

  text = lambda m, se: f'{m:.2f}' if se is None else f'{m:.2f} ± {se:.2f}'
  stats, steps = {}, {}
  for name, label in conditions:
    items = seeds_of(loaded, group, name)
    errors = per_epoch(items, 'test_error')
    if errors:
      stats[name] = (label, len(items), {e: mean_se(v) for e, v in errors.items()})
      for row in (row for item in items for row in item.rows):
        steps.setdefault(row['epoch'], row.get('step'))
  if not stats:
    return []
  epochs = sorted(set().union(*(by_epoch for _, _, by_epoch in stats.values())))
  head = ['condition', 'seeds'] + [f'epoch {e}' + (f' (step {steps[e]:,})' if steps[e] else '')
                                   for e in epochs]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  for label, n, by_epoch in stats.values():
    lines.append('| ' + ' | '.join([label, str(n)] + [text(*by_epoch[e]) if e in by_epoch else ''
                                                        for e in epochs]) + ' |')
  if all(name in stats for name in pair):
    a, b = stats[pair[0]][2], stats[pair[1]][2]
    cells = []
    for e in epochs:
      if e in a and e in b:
        both = a[e][1] is not None and b[e][1] is not None
        cells.append(text(a[e][0] - b[e][0], math.hypot(a[e][1], b[e][1]) if both else None))
      else:
        cells.append('')
    lines.append(f'| {pair_label} | | ' + ' | '.join(cells) + ' |')
  return ['Test error (%) after each epoch, mean ± SE over the seeds that reached it:', '',
          *lines, '']


def table2_section(loaded, group, figures):
  """Report lines of a Table 2 group (TABLE2_GROUPS): the table beside the paper's CIFAR-10
  column, the lambda pair's Fig. 4i-l panels and all rows' panels (figures/<group>.png)."""
  title, what, pair_figure = TABLE2_GROUPS[group]
  pair = [(name, label) for name, label, _ in TABLE2 if name.startswith('exact_')][::-1]
  drawn = fig4(loaded, group, pair, os.path.join(figures, f'{pair_figure}.png'),
               f'Fig. 4i-l, {group}: convnet (16/32/32/32) on Fashion-MNIST-32, hEP exact',
               CONV_PANELS)
  rows = [(name, label) for name, label, _ in TABLE2]
  drawn_all = fig4(loaded, group, rows, os.path.join(figures, f'{group}.png'),
                   f'Table 2, {group}: its five rows', TABLE2_PANELS)
  return [f'## {title}', '',
          'The paper: CIFAR-10 top-1 accuracy (%, mean ± std over 3 seeds, 150 epochs of '
          f'50,000 images, channels 128/256/512/512). Ours (`sweep.py`, {group}): {what}; '
          'each column the final epoch\'s value, mean ± std over the seeds. The paper\'s '
          '"Sym." row is hEP N = 2 on the symmetric network; ours is that network trained '
          'with the exact d_beta s*.', '',
          *condition_table(loaded, group, rows, TABLE2_COLUMNS, spread='std',
                           paper={name: value for name, _, value in TABLE2}), '',
          *epoch_table(loaded, group, rows),
          f'![{pair_figure}](figures/{pair_figure}.png)' if drawn else
          f'(no {group} hEP exact run yet)', '',
          f'![{group}](figures/{group}.png)' if drawn_all else '', '']


# ---------------------------------------------------------------------------- any runs

PROG = 'plot.py'
DEFAULT_OUT = 'runs.png'


class RunsError(Exception):
  """Bad --runs input, or nothing to draw: one line for the user."""


class NoRowYet(RunsError):
  """A workdir (or metrics file) without a metrics row yet: its first epoch has not ended.
  Beside runs that have rows it is left out with one line; alone it is the error."""


# base: the workdir, or the results file without .jsonl (absolute); rows: harness.read_rows;
# fields: {config field: value} for the legend.
Watched = collections.namedtuple('Watched', 'base rows fields')

# The --runs figure's panels, each drawn where some run's rows carry one of its metrics:
# (title, lines); a line is (metric, its name in the panel's legend), or (metric, None) for a
# per-layer list, one line per layer. Colours tell the runs apart, line styles the lines of a
# panel.
RUN_PANELS = (
    ('test error (%)', (('test_error', 'top-1'), ('test_top5_error', 'top-5'))),
    ('training loss', (('train_loss', 'training loss'),)),
    (SYMMETRY[1], ((SYMMETRY[0], 'symmetry'),)),
    ('angle w_b vs w_f (deg), per layer', (('diag/weight_angle', None),)),
    (COSINE + ', per layer', (('diag/cosine_exact', None),)),
    ('log10 ||F||, worst sample of a batch', (('log10_residual', 'epoch mean'),
                                              ('log10_residual_max', 'epoch max'))),
    ('free steps per sample', (('free_steps', 'mean over samples'),
                               ('free_steps_max', 'most in a batch'))),
)
# Layer names of a per-layer metric by (metric, conv net?), used where the count matches.
LAYER_NAMES = {('diag/cosine_exact', False): MLP_LAYERS, ('diag/cosine_exact', True): CONV_LAYERS,
               ('diag/weight_angle', False): MLP_ANGLES, ('diag/weight_angle', True): CONV_ANGLES}
MOST_FIELDS = 4  # differing config fields named in one legend entry


def _skip(what):
  print(f'{PROG}: skipped {what}', file=sys.stderr)


def config_fields(path):
  """{field: value} for the legend: a workdir's config.json, or from the command in a results
  file's .meta.json the --config file's name (as `config`) and each --config.field=value
  (values as text). {} where the file is missing; one line on stderr where it is damaged."""
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    _skip(f'{path} ({type(e).__name__}: {harness.one_line(e)[:100]})')
    return {}
  if not path.endswith('.meta.json'):
    return data if isinstance(data, dict) else {}
  try:
    words = shlex.split(data['command'])
  except (KeyError, TypeError, AttributeError, ValueError):
    _skip(f'{path} (no readable "command")')
    return {}
  fields = {}
  for word in words:
    if word.startswith('--config='):
      fields['config'] = os.path.splitext(os.path.basename(word[9:].split(':')[0]))[0]
    elif word.startswith('--config.') and '=' in word:
      field, value = word[len('--config.'):].split('=', 1)
      fields[field] = value
  return fields


def read_run(spec):
  """A Watched run: `spec` is a workdir, its metrics.jsonl, or a results file <name>.jsonl
  (with <name>.meta.json beside it). Lines that are not metrics rows are skipped, one line each
  on stderr; a run without rows is a NoRowYet."""
  path = os.path.normpath(spec)
  if os.path.isdir(path):
    metrics, config, base = (os.path.join(path, harness.METRICS),
                             os.path.join(path, 'config.json'), path)
  elif os.path.isfile(path) and os.path.basename(path) == harness.METRICS:
    base = os.path.dirname(path) or '.'
    metrics, config = path, os.path.join(base, 'config.json')
  elif os.path.isfile(path) and path.endswith('.jsonl'):
    base = path[:-len('.jsonl')]
    metrics, config = path, base + '.meta.json'
  elif os.path.exists(path):
    raise RunsError(f'{spec} is neither a workdir nor a metrics file (.jsonl)')
  else:
    raise RunsError(f'no such workdir or results file: {spec}')
  if not os.path.isfile(metrics):
    raise NoRowYet(f'{spec} has no {harness.METRICS} (not a workdir, or its first epoch has '
                   'not ended yet)')
  rows = harness.read_rows(metrics, lambda n, why: _skip(f'{metrics} line {n} ({why})'))
  if not rows:
    raise NoRowYet(f'{metrics} holds no metrics row yet')
  return Watched(os.path.abspath(base), rows, config_fields(config))


def run_names(runs):
  """Each run's name: the last component of its path, or as many more as tell them apart."""
  parts = [r.base.strip(os.sep).split(os.sep) for r in runs]
  for depth in range(1, max(map(len, parts)) + 1):
    names = ['/'.join(p[-depth:]) for p in parts]
    if len(set(names)) == len(names):
      return names
  return names


def value_text(value):
  """A config value as a legend shows it, the same for a config.json value and a flag's text:
  numbers shortest (15.0 and '15' are 15), sequences as (a,b,...)."""
  if isinstance(value, str):
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      return value
    if isinstance(value, str):
      return value
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  if isinstance(value, (list, tuple)):
    return '(' + ','.join(value_text(v) for v in value) + ')'
  return str(value)


def run_labels(runs):
  """Legend entries: each run's name; the config fields (of those every run has) in which the
  runs differ, at most MOST_FIELDS of them; and the last epoch (of num_epochs where known)."""
  texts = [{k: value_text(v) for k, v in r.fields.items()} for r in runs]
  differing = [k for k in texts[0] if all(k in t for t in texts[1:])
               and len({t[k] for t in texts}) > 1]
  labels = []
  for name, run, text in zip(run_names(runs), runs, texts):
    parts = [f'{k}={text[k]}' for k in differing[:MOST_FIELDS]]
    if len(differing) > MOST_FIELDS:
      parts.append(f'and {len(differing) - MOST_FIELDS} more')
    epoch = f'epoch {run.rows[-1]["epoch"]}'
    epoch += f' of {text["num_epochs"]}' if 'num_epochs' in text else ''
    labels.append(f'{name}: ' + ', '.join(parts) + f' ({epoch})' if parts else
                  f'{name} ({epoch})')
  return labels


def layer_names(runs, key):
  """Names of the layers of a per-layer metric: the MLP's or the conv net's (whose rows have
  free_steps) where every run carrying it has that many layers, else #1, #2, ..."""
  named = set()
  for run in runs:
    count = num_layers(run.rows, key)
    if count:
      names = LAYER_NAMES.get((key, any('free_steps' in r for r in run.rows)), ())
      named.add(tuple(names) if len(names) == count else
                tuple(f'#{i + 1}' for i in range(count)))
  if len(named) == 1:
    return list(named.pop())
  return [f'#{i + 1}' for i in range(max(map(len, named), default=0))]


def draw_runs(runs, path):
  """Draws RUN_PANELS where some run has a finite value, one colour per run, into `path`.
  Returns (legend labels, [(panel title, [its line names])])."""
  labels = run_labels(runs)
  panels = []
  for title, lines in RUN_PANELS:
    drawn = []  # (line name, [(run number, epochs, values)])
    for key, what in lines:
      for l, name in enumerate([what] if what else layer_names(runs, key)):
        curves = [(c, *series(run.rows, key, None if what else l)) for c, run in enumerate(runs)]
        curves = [curve for curve in curves if np.isfinite(curve[2]).any()]
        if curves:
          drawn.append((name, curves))
    if drawn:
      panels.append((title, drawn))
  if not panels:
    raise RunsError('the rows carry none of the metrics drawn (' + ', '.join(
        key for _, lines in RUN_PANELS for key, _ in lines) + ')')

  cols = min(3, len(panels))
  rows = -(-len(panels) // cols)
  ncol = 1 if len(runs) == 1 or max(map(len, labels)) > 70 else 2
  legend_h = 0.3 * -(-len(runs) // ncol) + 0.2  # inches
  height = 3.3 * rows + legend_h
  fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, height), squeeze=False)
  axes = axes.ravel()
  for ax, (title, drawn) in zip(axes, panels):
    for i, (_, curves) in enumerate(drawn):
      for c, epochs, values in curves:
        _band(ax, epochs, values, np.zeros_like(values), color=f'C{c % 10}',
              linestyle=LINESTYLES[i % len(LINESTYLES)])
    ax.set_title(title, fontsize=10)
    ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if len(drawn) > 1:  # which line is which: black lines of each style
      ax.legend([matplotlib.lines.Line2D([], [], color='black', linestyle=LINESTYLES[i % 4])
                 for i in range(len(drawn))], [name for name, _ in drawn], fontsize=7)
  for ax in axes[len(panels):]:
    ax.axis('off')
  fig.legend([matplotlib.lines.Line2D([], [], color=f'C{c % 10}', marker='.')
              for c in range(len(runs))], labels, loc='upper center', ncol=ncol, fontsize=9,
             frameon=False)
  try:
    save(fig, path, True, top=1 - legend_h / height)
  except (OSError, ValueError) as e:
    plt.close(fig)
    raise RunsError(f'cannot write {path}: {harness.one_line(e)[:200]}') from e
  return labels, [(title, [name for name, _ in drawn]) for title, drawn in panels]


def watch(specs, out=DEFAULT_OUT):
  """Reads the runs `specs` (read_run) and draws them into `out`; returns draw_runs' result.
  A run without a row yet is left out with one line, unless no run has one."""
  runs, waiting = [], []
  for spec in specs:
    try:
      runs.append(read_run(spec))
    except NoRowYet as e:
      waiting.append(e)
  if not runs:
    raise waiting[0] if len(waiting) == 1 else RunsError('none of the runs has a metrics row yet')
  for e in waiting:
    print(f'{PROG}: left out of the figure: {e}', file=sys.stderr)
  labels, panels = draw_runs(runs, out)
  print(f'wrote {out}: ' + '; '.join(labels))
  return labels, panels


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    sys.exit(f'{PROG}: error: {message}')


def main(argv=None):
  p = _Parser(prog=PROG, description=__doc__.split('\n\n')[0])
  p.add_argument('--results_dir', default='', help='the sweep\'s results (default: results/)')
  p.add_argument('--out_dir', default='', help='report and figures/ (default: results_dir)')
  p.add_argument('--runs', default=None, help='comma-separated workdirs or results files '
                 '(<group>/<name>.jsonl): draw their curves into --out instead of the report')
  p.add_argument('--out', default=None, help=f'the --runs figure (default: {DEFAULT_OUT})')
  args = p.parse_args(argv)
  if args.runs is not None:
    if args.results_dir or args.out_dir:
      p.error('--results_dir and --out_dir are for the report; --runs draws into --out')
    specs = [s.strip() for s in args.runs.split(',') if s.strip()]
    if not specs:
      p.error('--runs names no run')
    try:
      watch(specs, args.out or DEFAULT_OUT)
    except RunsError as e:
      sys.exit(f'{PROG}: error: {e}')
    return 0
  if args.out is not None:
    p.error('--out goes with --runs (the report goes to --out_dir)')
  results_dir = args.results_dir or os.path.join(sweep.ROOT, 'results')
  out_dir = args.out_dir or results_dir
  figures = os.path.join(out_dir, 'figures')
  os.makedirs(figures, exist_ok=True)
  loaded = load(results_dir)
  shown = os.path.relpath(results_dir, sweep.ROOT)
  shown = results_dir if shown.startswith(os.pardir) else shown

  report = ['# Fashion-MNIST reproduction: Table 1, Fig. 3, Fig. 4a-h', '',
            f'Generated by `plot.py` from `{shown}/<group>/<name>.jsonl` (the runs of `sweep.py`; `python sweep.py --list` shows '
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
  for group in TABLE2_GROUPS:
    report += table2_section(loaded, group, figures)
  report += ['## Short checks: update order, baselines, continuous-time averages', '',
             'Early epochs of runs that differ in one setting (seed 0 unless stated, the '
             'Table 1 settings otherwise).', '', *checks_table(loaded), '']
  rows, missing = run_table(loaded, results_dir)
  if missing:
    runs_have = '1 planned run has' if len(missing) == 1 else f'{len(missing)} planned runs have'
    notes.append(f'{runs_have} no results yet (skipped): '
                 + ', '.join(missing) + '.')
  partial = [k for k, v in loaded.items() if v.epochs < v.wanted]
  if partial:
    notes.append('Partial runs (drawn up to the epoch reached): ' + ', '.join(
        f'{k} ({loaded[k].epochs}/{loaded[k].wanted})' for k in partial) + '.')
  if notes:
    report += ['## Notes', ''] + [f'* {n}' for n in notes] + ['']
  report += ['## Every planned run', '', *rows, '']
  path = os.path.join(out_dir, 'fmnist_report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(report))
  print(f'wrote {path} and {figures}/ ({len(loaded)} of {len(sweep.plan())} runs have results)')
  return 0


if __name__ == '__main__':
  sys.exit(main())

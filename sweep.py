r"""Runs the reproduction (Table 1, Fig. 3, Fig. 4a-h; Table 2 in miniature) as one resumable sweep.

    python sweep.py --list                          # the plan and each run's status
    python sweep.py --only=table1 --dry_run         # the commands that would run
    python sweep.py --only=table1 --jobs=2 --nice=10
    python sweep.py --only=fig3,fig4ad --commit     # git-commits each finished run's results

Every run is one command of a training script,

    python <script> --config=configs/<x>.py --workdir=runs/sweep/<group>/<name> \
        --config.<field>=<value> ...

whose workdir keeps the checkpoint: rerunning the same command resumes after the last
finished epoch, so an interrupted sweep just starts again (stop one with Ctrl-C or
`kill PID`: it ends its runs, which lose at most the epoch in progress). A run counts as
done once results/<group>/<name>.jsonl holds num_epochs epochs; done runs are skipped.
When a run finishes, its metrics.jsonl is copied to results/<group>/<name>.jsonl next to
a sidecar <name>.meta.json (command, producing git commit, date, machine, wall time since
the last start, summed epoch time of all epochs), and with --commit exactly those two
files are committed. `python plot.py` then draws the figures and the report from results/;
`python plot.py --runs=runs/sweep/<group>/<name>,...` draws the curves of runs still going.

The plan, in the order the runs start (all seed 0 unless stated; the paper averages 5 seeds
(3 for Fig. 3) and trains 50 epochs everywhere; the epoch counts below are what a CPU budget
allows):

* table1 (50 epochs, SGD 1e-2, alpha 0): the Cauchy estimate with N = 1 (classic EP), 2, 4,
  6 points at |beta| = 0.05 and 0.5 (8 cells), and the true d_beta s* (`hep_exact`, 1 cell:
  it does not depend on |beta|, so the paper's table has it once). 9 runs; plus seeds 1 and
  2 of N = 1 at |beta| = 0.5 (`hep1_beta0.5_seed1`, `_seed2`), started after Fig. 4e-h.
* fmnist_checks: RBP for 1 epoch, the synchronous update for 2 epochs (hEP N = 2 and exact)
  and for 10 epochs of N = 1 at |beta| = 0.5 (seeds 0-2), and, near the end, 1 epoch of
  continuous time with the every-step average of Eq. 8.
* fig4eh (50 epochs): fmnist_feedback.py (its defaults: hep_exact, SGD 1e-2), lambda 0 vs
  0.1, seeds 0-2. 6 runs.
* fig3 (20 epochs): initial angle alpha in {0, 45, 90} x {bptt (the authors' "BP"
  baseline), hep_exact}. 6 runs.
* fig4ad (50 epochs, the paper's): fmnist_mlp.py, alpha 90, hep_exact, Adam 1e-4, lambda
  0 vs 1, seeds 0-2. 6 runs.
* table1_cont (10 epochs): continuous-time hEP as the authors ran it (N = 4, 60 steps per
  point, 5 periods, no free phase, hold-end averages), |beta| = 0.05 and 0.5. 2 runs of
  one to two hours each on one core (61-63 min on an Intel Xeon), so they come last.
  Together with table1 these are the paper's 11 cells of Table 1.
* table2mini (cifar_conv.py, CONV_MINI below: Fashion-MNIST-32, channels 16/32/32/32,
  4,000 training images, 4 epochs): BPTT with lambda 15 (the slowest, so first), hEP exact
  with lambda 15 and without, N = 2 (|beta| 1) with lambda 15, the tied network without;
  then seeds 1-2 of the lambda 15 / 0 pair. 9 runs of 10-46 minutes each on one core.
* table2long (CONV_LONG: the same network, 20,000 training images, 5,000 test images, T_free
  up to 250, 4 epochs = 2,500 steps): hEP exact with lambda 15 and without, seeds 0, 1, 2
  (the pair first), then seed 0 of N = 2 (|beta| 1) with lambda 15, BPTT with lambda 15 and
  the tied network without.
"""
import argparse
import collections
import datetime
import fnmatch
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import harness

ROOT = os.path.dirname(os.path.abspath(__file__))

Run = collections.namedtuple('Run', 'group name script config overrides')
# overrides: tuple of (config field, value) pairs, always including seed and num_epochs.

MLP = ('fmnist_mlp.py', 'configs/fmnist_mlp.py')
FEEDBACK = ('fmnist_feedback.py', 'configs/fmnist_feedback.py')
CONV = ('cifar_conv.py', 'configs/cifar10.py')

# Table 2 in miniature: the convnet of App. D.2 on Fashion-MNIST padded to 32x32x3, sized
# so that a run takes under an hour on one core (the measurement is in results/README.md,
# "Table 2 in miniature"). The free phase stops once every sample's update is below tol
# (at most T_free steps), so the epoch rows report the steps it needed.
CONV_MINI = dict(dataset='fashion_mnist', channels=(16, 32, 32, 32), t_free=100, t_nudge=15,
                 tol=1e-5, batch_size=32, train_size=4000, test_size=2000, eval_batch_size=500,
                 diag_batch_size=16, log_every_steps=50)
CONV_MINI_EPOCHS = 4

# Table 2 in miniature, long enough for the asymmetry to grow: the same network on 5x the
# miniature's optimizer steps (20,000 training images x 4 epochs = 2,500 steps at batch 32,
# the cosine schedule over all of them), 5,000 test images, and the paper's T_free = 250 as
# the cap of the early-stopped free phase, so that the trained nets reach their fixed point.
CONV_LONG = dict(CONV_MINI, t_free=250, train_size=20000, test_size=5000)
CONV_LONG_EPOCHS = 4

# How Table 1's continuous-time cells select the hold-end average (the authors' estimator,
# common.hold_end_estimate) rather than the every-step average of a literal Eq. 8.
CONTINUOUS_OVERRIDES = (('algorithm', 'hep_continuous'), ('continuous_average', 'hold_end'),
                        ('continuous_steps_per_point', 60), ('continuous_periods', 5))


def _run(group, name, target, num_epochs, seed=0, **overrides):
  """One run, named <name>_seed<seed> (every run name ends with its seed)."""
  items = tuple(overrides.items()) + (('seed', seed), ('num_epochs', num_epochs))
  return Run(group, f'{name}_seed{seed}', target[0], target[1], items)


def plan():
  """Every run of the sweep, in the order they are started."""
  runs = []
  for n in (1, 2, 4, 6):
    for beta in (0.05, 0.5):
      runs.append(_run('table1', f'hep{n}_beta{beta:g}', MLP, 50, algorithm='hep', n_points=n,
                       beta=beta))
  runs.append(_run('table1', 'exact', MLP, 50, algorithm='hep_exact'))
  # Short checks that the tables of results/README.md rest on: the other baseline (RBP's adjoint
  # fixed point) and the authors' literal synchronous update, against the sequential default
  # (compare with epochs 1-2 of table1/hep2_beta0.05_seed0 and table1/exact_seed0).
  runs.append(_run('fmnist_checks', 'rbp', MLP, 1, algorithm='rbp'))
  runs.append(_run('fmnist_checks', 'synchronous_hep2', MLP, 2, layer_updates='synchronous'))
  runs.append(_run('fmnist_checks', 'synchronous_exact', MLP, 2, algorithm='hep_exact',
                   layer_updates='synchronous'))
  # Does the update order explain Table 1's N = 1, |beta| = 0.5 cell? (A large one-sided
  # nudge moves the state far from the free fixed point in T_nudge = 20 steps.)
  runs.append(_run('fmnist_checks', 'synchronous_hep1_beta0.5', MLP, 10, algorithm='hep',
                   n_points=1, beta=0.5, layer_updates='synchronous'))
  for homeo in (0.0, 0.1):
    for seed in (0, 1, 2):
      runs.append(_run('fig4eh', f'homeo{homeo:g}', FEEDBACK, 50, seed=seed,
                       homeo_coef=homeo))
  # Table 1's N = 1, |beta| = 0.5 cell (seed 0: 60 % against the paper's 38.4 +- 6.2 %):
  # two more seeds of that cell, and of the 10-epoch synchronous check above.
  for seed in (1, 2):
    runs.append(_run('table1', 'hep1_beta0.5', MLP, 50, seed=seed,
                     algorithm='hep', n_points=1, beta=0.5))
    runs.append(_run('fmnist_checks', 'synchronous_hep1_beta0.5', MLP, 10,
                     seed=seed, algorithm='hep', n_points=1, beta=0.5,
                     layer_updates='synchronous'))
  for algorithm in ('bptt', 'hep_exact'):
    for alpha in (0, 45, 90):
      runs.append(_run('fig3', f'{algorithm}_alpha{alpha}', MLP, 20, algorithm=algorithm,
                       alpha=float(alpha)))
  for homeo in (0.0, 1.0):
    for seed in (0, 1, 2):
      runs.append(_run('fig4ad', f'homeo{homeo:g}', MLP, 50, seed=seed,
                       algorithm='hep_exact', alpha=90.0, optimizer='adam',
                       learning_rate=1e-4, homeo_coef=homeo))
  # Last: each continuous-time epoch costs about 20 of N = 2's (1200 steps per batch), so
  # one of these runs takes over two hours on a core; the figures' runs come first. The
  # every-step average (a literal Eq. 8) for one epoch, next to the hold-end cells.
  runs.append(_run('fmnist_checks', 'cont4_every_step_beta0.5', MLP, 1,
                   **dict(CONTINUOUS_OVERRIDES, continuous_average='every_step'), n_points=4,
                   beta=0.5))
  for beta in (0.05, 0.5):
    runs.append(_run('table1_cont', f'cont4_beta{beta:g}', MLP, 10,
                     **dict(CONTINUOUS_OVERRIDES), n_points=4, beta=beta))
  # Table 2 / Fig. 4i-l in miniature (the rows of Table 2's CIFAR-10 column), seed 0, then
  # seeds 1-2 of the homeostasis pair.
  mini = lambda name, seed=0, **kw: _run('table2mini', name, CONV, CONV_MINI_EPOCHS, seed=seed,
                                         **{**CONV_MINI, **kw})
  runs += [mini('bptt_homeo15', algorithm='bptt', homeo_coef=15.0),  # the slowest first
           mini('exact_homeo15', algorithm='hep_exact', homeo_coef=15.0),
           mini('exact_homeo0', algorithm='hep_exact', homeo_coef=0.0),
           mini('hep2_homeo15', algorithm='hep', n_points=2, beta=1.0, homeo_coef=15.0),
           mini('tied_homeo0', algorithm='hep_exact', tied=True, homeo_coef=0.0)]
  for seed in (1, 2):
    runs += [mini('exact_homeo15', seed, algorithm='hep_exact', homeo_coef=15.0),
             mini('exact_homeo0', seed, algorithm='hep_exact', homeo_coef=0.0)]
  # The same rows at 5x the steps: first the pair that decides whether homeostasis buys
  # accuracy (seeds 0, 1, 2), then seed 0 of Table 2's other rows.
  long = lambda name, seed=0, **kw: _run('table2long', name, CONV, CONV_LONG_EPOCHS, seed=seed,
                                         **{**CONV_LONG, **kw})
  for seed in (0, 1, 2):
    runs += [long('exact_homeo15', seed, algorithm='hep_exact', homeo_coef=15.0),
             long('exact_homeo0', seed, algorithm='hep_exact', homeo_coef=0.0)]
  runs += [long('hep2_homeo15', algorithm='hep', n_points=2, beta=1.0, homeo_coef=15.0),
           long('bptt_homeo15', algorithm='bptt', homeo_coef=15.0),
           long('tied_homeo0', algorithm='hep_exact', tied=True, homeo_coef=0.0)]
  return runs


GROUPS = ('table1', 'fmnist_checks', 'fig4eh', 'fig3', 'fig4ad', 'table1_cont', 'table2mini',
          'table2long')


def select(runs, only):
  """Runs matching --only: comma-separated group names or `group/name` glob patterns."""
  if not only:
    return list(runs)
  patterns = [p.strip() for p in only.split(',') if p.strip()]
  chosen = [r for r in runs
            if any(p == r.group or fnmatch.fnmatchcase(f'{r.group}/{r.name}', p)
                   for p in patterns)]
  unmatched = [p for p in patterns
               if not any(p == r.group or fnmatch.fnmatchcase(f'{r.group}/{r.name}', p)
                          for r in runs)]
  if unmatched:
    raise SystemExit(f'--only: nothing matches {", ".join(unmatched)} (groups: '
                     f'{", ".join(GROUPS)}; or group/name patterns, see --list)')
  return chosen


# ---------------------------------------------------------------------------- status

def num_epochs(run):
  return dict(run.overrides)['num_epochs']


def format_value(value):
  return repr(value) if isinstance(value, float) else str(value)


def command(run, runs_dir, python=sys.executable):
  """The run's command line, to be run from the repository root."""
  path = workdir(run, runs_dir)
  rel = os.path.relpath(path, ROOT)
  return [python, run.script, f'--config={run.config}',
          f'--workdir={path if rel.startswith(os.pardir) else rel}',
          *(f'--config.{k}={format_value(v)}' for k, v in run.overrides)]


def workdir(run, runs_dir):
  """<runs_dir>/<group>/<name>, absolute (a relative runs_dir is under the repository)."""
  return os.path.join(ROOT, runs_dir, run.group, run.name)


def result_paths(run, results_dir):
  base = os.path.join(ROOT, results_dir, run.group, run.name)
  return base + '.jsonl', base + '.meta.json'


def epochs_in(path):
  """The last epoch recorded in a metrics.jsonl file (0 if missing or unreadable)."""
  rows = harness.read_rows(path)
  return rows[-1]['epoch'] if rows else 0


def status(run, results_dir, runs_dir):
  """('done' | 'partial' | 'todo', epochs reached, epochs wanted)."""
  wanted = num_epochs(run)
  copied = epochs_in(result_paths(run, results_dir)[0])
  if copied >= wanted:
    return 'done', copied, wanted
  reached = max(copied, epochs_in(os.path.join(workdir(run, runs_dir), 'metrics.jsonl')))
  return ('partial' if reached else 'todo'), reached, wanted


def status_text(state, reached, wanted):
  return f'partial {reached}/{wanted}' if state == 'partial' else state


# ---------------------------------------------------------------------- provenance

def git(*args, check=True):
  return subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True,
                        check=check).stdout.strip()


def git_commit_id():
  return harness.git_commit(ROOT)


def train_time(rows):
  """The summed `epoch_time_s` of metrics rows: the training time of every epoch, those
  before a restart included (wall_time_s counts only since the last start)."""
  return sum(r['epoch_time_s'] for r in rows if isinstance(r.get('epoch_time_s'), (int, float)))


def finish(run, args, started_commit, started_at, wall_s, start_epoch):
  """Copies a finished run's metrics into results/ with its sidecar; returns the two paths."""
  metrics, meta = result_paths(run, args.results_dir)
  os.makedirs(os.path.dirname(metrics), exist_ok=True)
  shutil.copyfile(os.path.join(workdir(run, args.runs_dir), 'metrics.jsonl'), metrics)
  end_commit = git_commit_id()
  rows = harness.read_rows(metrics)
  sidecar = {
      'command': shlex.join(command(run, args.runs_dir, 'python')),
      'commit': started_commit,
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'started': started_at,
      'machine': harness.machine(),
      'wall_time_s': round(wall_s, 1),
      'train_time_s': round(train_time(rows), 1),
      'epochs': rows[-1]['epoch'] if rows else 0,
      'resumed_after_epoch': start_epoch,
  }
  if end_commit != started_commit:
    sidecar['commit_at_end'] = end_commit
  with open(meta, 'w') as f:
    f.write(json.dumps(sidecar, indent=2) + '\n')
  return metrics, meta


def commit_results(run, paths):
  rel = [os.path.relpath(p, ROOT) for p in paths]
  git('add', '--', *rel)
  git('commit', '-q', '-m', f'Results: {run.group}/{run.name}', '--', *rel)


# ---------------------------------------------------------------------------- runner

def launch(run, args, log):
  cmd = command(run, args.runs_dir, args.python)
  nice = args.nice

  def lower_priority():
    if nice:
      os.nice(nice)
  return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                          preexec_fn=lower_priority)


def run_all(runs, args):
  """Runs the runs that are not done, at most args.jobs at a time. Returns the failures."""
  queue = collections.deque(r for r in runs
                            if status(r, args.results_dir, args.runs_dir)[0] != 'done')
  running, failed = {}, []
  try:
    while queue or running:
      while queue and len(running) < args.jobs:
        run = queue.popleft()
        os.makedirs(workdir(run, args.runs_dir), exist_ok=True)
        log = open(os.path.join(workdir(run, args.runs_dir), 'sweep.log'), 'a')
        start_epoch = status(run, args.results_dir, args.runs_dir)[1]
        started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
        proc = launch(run, args, log)
        running[proc.pid] = (run, proc, log, time.time(), git_commit_id(), started_at,
                             start_epoch)
        print(f'[start] {run.group}/{run.name} (pid {proc.pid}, from epoch {start_epoch}): '
              f'{shlex.join(command(run, args.runs_dir, "python"))}', flush=True)
      time.sleep(args.poll_s)
      for pid in list(running):
        run, proc, log, t0, commit, started_at, start_epoch = running[pid]
        if proc.poll() is None:
          continue
        del running[pid]
        log.close()
        wall = time.time() - t0
        state, reached, wanted = status(run, args.results_dir, args.runs_dir)
        workdir_epochs = epochs_in(os.path.join(workdir(run, args.runs_dir), 'metrics.jsonl'))
        if proc.returncode != 0 or workdir_epochs < wanted:
          failed.append(run)
          print(f'[fail]  {run.group}/{run.name}: exit {proc.returncode}, {workdir_epochs}/'
                f'{wanted} epochs; see {workdir(run, args.runs_dir)}/sweep.log', flush=True)
          continue
        paths = finish(run, args, commit, started_at, wall, start_epoch)
        print(f'[done]  {run.group}/{run.name} in {wall / 60:.1f} min -> {paths[0]}',
              flush=True)
        if args.commit:
          try:
            commit_results(run, paths)
          except subprocess.CalledProcessError as e:
            print(f'[warn]  git commit of {run.group}/{run.name} failed: {e.stderr.strip()}',
                  flush=True)
  except KeyboardInterrupt:
    for run, proc, log, *_ in running.values():
      proc.terminate()  # the scripts checkpoint every epoch: the next sweep resumes them
      proc.wait()
      log.close()
    print('interrupted; rerun the same command to resume', flush=True)
    raise SystemExit(130)
  return failed


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--only', default='', help='comma-separated groups (' + ', '.join(GROUPS) +
                 ') or group/name glob patterns; default: everything')
  p.add_argument('--jobs', type=int, default=1, help='runs at the same time')
  p.add_argument('--nice', type=int, default=0, help='niceness added to every run')
  p.add_argument('--list', action='store_true', help='print the plan with each status')
  p.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  p.add_argument('--commit', action='store_true',
                 help='git add + commit each finished run\'s .jsonl and .meta.json')
  p.add_argument('--results_dir', default='results',
                 help='where finished runs are copied (relative paths: from the repository root)')
  p.add_argument('--runs_dir', default='runs/sweep',
                 help='parent of the workdirs (relative paths: from the repository root)')
  p.add_argument('--python', default=sys.executable)
  p.add_argument('--poll_s', type=float, default=5.0, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.jobs < 1:
    p.error('--jobs must be >= 1')
  return args


def _stop(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def main(argv=None):
  args = parse_args(argv)
  runs = select(plan(), args.only)
  if args.list or args.dry_run:
    for run in runs:
      state = status(run, args.results_dir, args.runs_dir)
      if args.list:
        print(f'{run.group + "/" + run.name:34s} {status_text(*state):16s} '
              f'{run.script} {" ".join(f"{k}={format_value(v)}" for k, v in run.overrides)}')
      else:
        prefix = '# done: ' if state[0] == 'done' else ''
        print(prefix + shlex.join(command(run, args.runs_dir, 'python')))
    return 0
  # `kill PID` stops the sweep like Ctrl-C: its runs are ended and resume on the next sweep.
  # (A sweep started with `&` from a script ignores SIGINT, so SIGTERM is the way to stop it.)
  signal.signal(signal.SIGTERM, _stop)
  failed = run_all(runs, args)
  if failed:
    print('failed: ' + ', '.join(f'{r.group}/{r.name}' for r in failed))
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""The run machinery every experiment script shares (none of it is the paper's science).

    config checks   ConfigError, check_number / check_choice / check_fields, check_devices
    workdir         run_config, default_workdir, Workdir (config.json, metrics.jsonl and an
                    npz checkpoint, written atomically; resume; refuses another run's files;
                    one run at a time: an OS lock), releases_workdirs
    metrics         Progress (per-step metrics -> log lines and the epoch's row), read_rows
    processes       start_processes, all_or_none, broadcast, batch / eval indices
    input           Data, MemorySplit, memory_data, check_batches, read_idx,
                    load_fashion_mnist, read_batches, prefetch, evaluate_counts, TFDS preparation
    command line    parse_flags, run_main (one-line errors and exit codes, Ctrl-C, SIGTERM)

The scripts hand in what differs between them (the fields a resumed run may change, the
script's name): this module never imports a script and never reads an experiment's config
fields beyond the few named here (num_devices, batch sizes, split sizes, the process fields).
"""
import concurrent.futures
import collections
import fcntl
import functools
import gzip
import hashlib
import importlib.util
import json
import logging as std_logging
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
import zlib

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

CHECKPOINT = 'checkpoint.npz'
METRICS = 'metrics.jsonl'
LOCK = 'lock'


class ConfigError(ValueError):
  """Bad input, reported as one line before any compute is spent."""


# ----------------------------------------------------------------------------- config checks

def check_number(config, name, kind, low=None, high=None, above=None):
  """One numeric config field: an int (kind=int) or a number, finite, >= low, <= high, > above."""
  value = config[name]
  is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not is_number or (kind is int and not isinstance(value, int)):
    raise ConfigError(f'{name} must be {"an integer" if kind is int else "a number"}, '
                      f'got {value!r}')
  if not math.isfinite(value):
    raise ConfigError(f'{name} must be finite, got {value}')
  bounds = [f'>= {low}' if low is not None and value < low else None,
            f'<= {high}' if high is not None and value > high else None,
            f'> {above}' if above is not None and value <= above else None]
  broken = [b for b in bounds if b]
  if broken:
    raise ConfigError(f'{name} must be {broken[0]}, got {value}')


def check_choice(config, name, choices):
  if config[name] not in choices:
    raise ConfigError(f'unknown {name} {config[name]!r} (use one of {", ".join(choices)})')


def check_fields(config, spec):
  """Checks the fields of a table: {name: choices (a tuple of str) | bool | (kind, low, high,
  above) with kind int or float and None for no bound}."""
  for name, rule in spec.items():
    if rule is bool:
      if not isinstance(config[name], bool):
        raise ConfigError(f'{name} must be True or False, got {config[name]!r}')
    elif rule[0] in (int, float):
      check_number(config, name, *rule)
    else:
      check_choice(config, name, rule)


def check_int_tuple(config, name, min_len):
  value = config[name]
  if not isinstance(value, (tuple, list)) or len(value) < min_len or not all(
      isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value):
    raise ConfigError(f'{name} must be a tuple of >= {min_len} positive integers, got {value!r}')


def check_devices(config, num_local_devices, num_processes=1):
  """The number of local devices to use (config.num_devices, 0 = all); the global batch
  sizes must split evenly over every device of every process."""
  num_devices = config.num_devices or num_local_devices
  if num_devices > num_local_devices:
    raise ConfigError(f'num_devices={num_devices} but only {num_local_devices} local devices')
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % (num_devices * num_processes):
      where = f'{num_devices} devices' + (f' x {num_processes} processes'
                                          if num_processes > 1 else '')
      raise ConfigError(f'{name}={config[name]} is not divisible by the {where}')
  return num_devices


# ----------------------------------------------------------------------------- workdir

def run_config(config, resumable):
  """The config as plain JSON data, without the fields a resumed run may change."""
  return {k: v for k, v in json.loads(config.to_json()).items() if k not in resumable}


def config_digest(config, resumable):
  """SHA-1 of run_config: equal digests, the same run."""
  return hashlib.sha1(json.dumps(run_config(config, resumable), sort_keys=True).encode()).digest()


def default_workdir(script, name, config, resumable):
  """runs/<script without .py>/<name>-<first 8 hex digits of the run config's digest>."""
  return os.path.join('runs', script[:-3], f'{name}-{config_digest(config, resumable).hex()[:8]}')


def write_atomic(path, write):
  """write(file) into path.tmp, flushed to disk, then renamed over path: a kill or a full disk
  leaves the previous file intact (and no .tmp behind)."""
  tmp = path + '.tmp'
  try:
    with open(tmp, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path, data):
  write_atomic(path, lambda f: f.write((json.dumps(data, indent=2) + '\n').encode()))


def differing_fields(saved, current):
  return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def json_safe(value):
  """Non-finite floats become null: metrics.jsonl stays strict JSON."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def read_checkpoint(path):
  """{'epoch', 'config', 'paths', 'leaves'} of the checkpoint file `path`, or None if there is
  none (also for reading another script's checkpoint, as fig2_bias.py does)."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      ckpt = json.loads(str(z['meta']))
      ckpt['leaves'] = [z[f'leaf{i:05d}'] for i in range(len(ckpt['paths']))]
    assert isinstance(ckpt['epoch'], int) and isinstance(ckpt['config'], dict)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'{path} is damaged or not a checkpoint of this script '
                      f'({type(e).__name__}); move it away to start the run over') from e
  return ckpt


def restore_checkpoint(checkpoint, template):
  """The arrays of a read_checkpoint in the pytree structure of `template`, checked leaf by
  leaf."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(template)
  leaves = checkpoint['leaves']
  if [jax.tree_util.keystr(p) for p, _ in flat] != list(checkpoint['paths']) or any(
      np.shape(a) != b.shape or np.asarray(a).dtype != b.dtype for (_, a), b in zip(flat, leaves)):
    raise ConfigError('the checkpoint does not hold the parameters of this network')
  return jax.tree_util.tree_unflatten(treedef, leaves)


class Workdir:
  """A run's folder: config.json, metrics.jsonl (one strict-JSON row per epoch) and
  checkpoint.npz (the state of the last finished epoch, with the run config it was made with).

  Opening one checks everything that could refuse it (a file in its place, another run's
  config or checkpoint, a damaged metrics file) and writes nothing; start() then takes the
  workdir's lock (see lock_workdir) and writes config.json; close() releases the lock.
  Nothing in it is ever unpickled, so someone else's workdir cannot run code.
  `writer=False` (every process of a multi-process run but process 0) touches no file.
  """

  def __init__(self, path, config, resumable, writer=True):
    self.path, self.writer = path, writer
    self.resumable = resumable
    self.config = json.loads(config.to_json())
    self.run_config = run_config(config, resumable)
    self.checkpoint, self.history = None, []
    self._checked, self._lock = None, None
    if writer:
      self._check()

  def _file(self, name):
    return os.path.join(self.path, name)

  def _files(self):
    """(inode, size, mtime) of each file a check reads, None where missing: a write (always a
    rename of a new file) changes them."""
    def stat(name):
      try:
        s = os.stat(self._file(name))
        return s.st_ino, s.st_size, s.st_mtime_ns
      except FileNotFoundError:
        return None
    return [stat(name) for name in ('config.json', CHECKPOINT, METRICS)]

  def _check(self):
    if os.path.exists(self.path) and not os.path.isdir(self.path):
      raise ConfigError(f'--workdir {self.path} is a file, not a folder')
    self._checked = self._files()
    path = self._file('config.json')
    if os.path.exists(path):
      try:
        with open(path) as f:
          saved = json.load(f)
        assert isinstance(saved, dict)
      except (ValueError, AssertionError) as e:
        raise ConfigError(f'{path} is empty or not a JSON config; restore it, or delete it to '
                          'resume from the checkpoint (which carries its own config)') from e
      changed = differing_fields(
          {k: v for k, v in saved.items() if k not in self.resumable}, self.run_config)
      if changed:
        raise ConfigError(f'{self.path} holds a run with a different config '
                          f'({", ".join(changed)}); use another --workdir')
    self.checkpoint = self._read_checkpoint()
    if self.checkpoint is not None:
      changed = differing_fields(self.checkpoint['config'], self.run_config)
      if changed:
        raise ConfigError(f'the checkpoint in {self.path} was made with a different config '
                          f'({", ".join(changed)}); use another --workdir')
    self.history = self._read_metrics(self.checkpoint['epoch'] if self.checkpoint else 0)

  def _read_checkpoint(self):
    return read_checkpoint(self._file(CHECKPOINT))

  def _read_metrics(self, last_epoch):
    """Metrics rows of the epochs up to `last_epoch` (later ones were not checkpointed)."""
    path = self._file(METRICS)
    if not os.path.exists(path):
      if last_epoch:
        logging.warning('%s is missing: it will hold only the epochs from %d on', path,
                        last_epoch + 1)
      return []
    with open(path, 'rb') as f:
      lines = f.read().split(b'\n')
    rows, seen = [], set()
    for number, line in enumerate(lines, 1):
      if not line and number == len(lines):
        break  # the file ends with a newline
      try:
        rows.append(json.loads(line.decode()))
        assert isinstance(rows[-1]['epoch'], int)
      except (ValueError, AssertionError, KeyError, TypeError) as e:  # UnicodeDecodeError too
        raise ConfigError(f'{path} line {number} is not a metrics row; fix or remove that '
                          'line to resume') from e
      if rows[-1]['epoch'] in seen:
        raise ConfigError(f'{path} line {number} repeats epoch {rows[-1]["epoch"]}; remove one '
                          'of the two rows to resume')
      seen.add(rows[-1]['epoch'])
    rows = [r for r in rows if r['epoch'] <= last_epoch]
    if len(rows) < last_epoch:
      logging.warning('%s holds %d of the %d checkpointed epochs', path, len(rows), last_epoch)
    return rows

  def start(self):
    """Creates the folder, takes its lock (a ConfigError naming the holder if another run
    has it), checks again if another run wrote the files since the check (so that this run
    resumes from the newest checkpoint), then writes config.json (which also proves the
    folder is writable)."""
    if not self.writer:
      return
    os.makedirs(self.path, exist_ok=True)
    self._lock = lock_workdir(self.path)
    _LOCKED.add(self)
    try:
      if self._files() != self._checked:
        self._check()
      write_json(self._file('config.json'), self.config)
    except BaseException:
      self.close()
      raise

  def close(self):
    """Releases the workdir's lock (as the end of the process does, however it ends)."""
    if self._lock is not None:
      self._lock.close()
      self._lock = None
      _LOCKED.discard(self)

  def restore(self, template):
    """(state, first epoch to run): the checkpoint's arrays in the pytree structure of
    `template` (checked leaf by leaf), or `template` itself and 1 for a new run."""
    if self.checkpoint is None:
      return template, 1
    return restore_checkpoint(self.checkpoint, template), self.checkpoint['epoch'] + 1

  def write_metrics(self, rows):
    if self.writer:
      text = ''.join(json.dumps(json_safe(r), allow_nan=False) + '\n' for r in rows)
      write_atomic(self._file(METRICS), lambda f: f.write(text.encode()))

  def save(self, epoch, row, state):
    """Appends the epoch's metrics row, then checkpoints `state` (host arrays) atomically as
    an .npz (no pickle) with the epoch, the run config and every leaf's pytree path."""
    self.history.append(row)
    self.write_metrics(self.history)
    if not self.writer:
      return
    paths, leaves = zip(*[(jax.tree_util.keystr(p), np.asarray(a))
                          for p, a in jax.tree_util.tree_flatten_with_path(state)[0]])
    meta = json.dumps({'epoch': epoch, 'config': self.run_config, 'paths': paths})
    arrays = {f'leaf{i:05d}': a for i, a in enumerate(leaves)}
    write_atomic(self._file(CHECKPOINT), lambda f: np.savez(f, meta=np.asarray(meta), **arrays))


def lock_workdir(path):
  """The open file path/lock, exclusively locked by this process (flock), with the holder's
  pid, host and start time in it: one run per workdir. The OS releases the lock when the file
  is closed or the process ends (kill -9 included), so it is never stale. Another run's
  holding it is a ConfigError that names that run; opening never truncates, so the refused
  run writes nothing. Reading a workdir needs no lock."""
  f = open(os.path.join(path, LOCK), 'a+b')  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      try:
        holder = json.loads(f.read(1000))
        holder = f' (pid {holder["pid"]} on {holder["host"]}, started {holder["started"]})'
      except (ValueError, KeyError, TypeError):
        holder = ''  # it has just taken the lock and not yet written who it is
      raise ConfigError(f'{path} is in use by another run{holder}; wait for it to end or '
                        'stop it, or use another --workdir') from None
    except OSError as e:  # a file system without locks (some NFS or Lustre mounts)
      logging.warning('cannot lock %s (%s): nothing stops a second run in this workdir', path,
                      one_line(e))
    f.truncate(0)
    f.write(json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                        'started': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())})
            .encode() + b'\n')
    f.flush()
  except BaseException:
    f.close()
    raise
  return f


# The Workdirs that hold their lock in this process (weakly: one that is dropped closes its
# lock file, which releases the lock).
_LOCKED = weakref.WeakSet()


def releases_workdirs(train_and_evaluate):
  """Decorates a script's train_and_evaluate: the workdirs it started are closed (their
  locks released) when it returns or raises, so that one process may run in the same
  workdir again (tests and tools/benchmark.py call it several times)."""
  @functools.wraps(train_and_evaluate)
  def run(*args, **kwargs):
    before = weakref.WeakSet(_LOCKED)
    try:
      return train_and_evaluate(*args, **kwargs)
    finally:
      for workdir in [w for w in _LOCKED if w not in before]:
        workdir.close()
  return run


def run_is_complete(path, start_epoch, num_epochs):
  """Logs where the run starts; True (and says so) when it has nothing left to train."""
  if start_epoch > num_epochs:
    logging.info('this run is complete (%d epoch%s) in %s: nothing to train', start_epoch - 1,
                 's' if start_epoch > 2 else '', path)
    return True
  if start_epoch > 1:
    logging.info('resuming from %s after epoch %d', path, start_epoch - 1)
  return False


def read_rows(path, skipped=None):
  """metrics.jsonl rows sorted by epoch, read leniently for reports (unreadable lines skipped,
  the last row of an epoch wins; [] if the file is missing or unreadable). `skipped(line
  number, reason)`, if given, is called for each line left out."""
  by_epoch = {}
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      for number, line in enumerate(f, 1):
        try:
          row = json.loads(line)
        except ValueError:
          if skipped:
            skipped(number, 'not JSON')
          continue
        if isinstance(row, dict) and isinstance(row.get('epoch'), int):
          by_epoch[row['epoch']] = row
        elif skipped:
          skipped(number, 'not a metrics row: no integer epoch')
  except OSError:
    return []
  return [by_epoch[e] for e in sorted(by_epoch)]


def git_commit(root):
  """HEAD's commit of the checkout at `root`, with '-dirty' when tracked files outside
  results/ differ from it ('unknown' outside git)."""
  try:
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(['git', 'diff', '--quiet', 'HEAD', '--', '.', ':(exclude)results'],
                           cwd=root).returncode != 0
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'
  return head + ('-dirty' if dirty else '')


def machine():
  """Platform, core count, Python version and CPU model of this machine."""
  info = {'platform': platform.platform(), 'nproc': os.cpu_count(),
          'python': platform.python_version()}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          info['cpu'] = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  return info


# ----------------------------------------------------------------------------- metrics

def reduce_metrics(metrics, axis_name='batch'):
  """A step's metrics over every device of every process (inside pmap), so that each process
  logs and stops on the same numbers: sums for counts, the worst residual, means otherwise."""
  reduce = {'dropped_samples': jax.lax.psum, 'log10_residual': jax.lax.pmax,
            'free_steps_max': jax.lax.pmax}
  return {k: reduce.get(k, jax.lax.pmean)(v, axis_name) for k, v in metrics.items()}


class Progress:
  """The per-step metrics of one epoch (reduced by reduce_metrics: equal on every device):
  a progress line every `log_every` steps, and the epoch's summary row."""

  def __init__(self, epoch, steps, batch_size, log_every, max_train_loss, num_epochs=None):
    self.epoch, self.steps, self.batch_size = epoch, steps, batch_size
    self.epochs_after = (num_epochs or epoch) - epoch
    self.log_every, self.max_train_loss = log_every, max_train_loss
    self.values, self.start = collections.defaultdict(list), time.time()

  def blown_up(self, loss):
    return not loss <= self.max_train_loss  # NaN counts as blown up

  def add(self, metrics):
    """Records one step's metrics; returns False when the recent loss has blown up."""
    for k, v in metrics.items():
      self.values[k].append(v)
    done = len(self.values['loss'])
    if not self.log_every or done % self.log_every:
      return True
    recent = {k: np.asarray(jax.device_get(v[-self.log_every:]))[:, 0]
              for k, v in self.values.items()}
    elapsed = time.time() - self.start
    dropped = int(recent['dropped_samples'].sum()) if 'dropped_samples' in recent else 0
    loss = float(recent['loss'].mean())
    left = elapsed / done * (self.steps - done)
    run_left = (left + elapsed / done * self.steps * self.epochs_after) / 3600
    logging.info('epoch %d  step %d/%d  loss %.4f  acc %.3f  %.0f img/s  eta %.0fs (run %.1f h)%s',
                 self.epoch, done, self.steps, loss, float(recent['accuracy'].mean()),
                 done * self.batch_size / elapsed, left, run_left,
                 f'  dropped {dropped} non-finite samples' if dropped else '')
    return not self.blown_up(loss)

  def row(self, step):
    """The epoch's training metrics: means over its steps, the residual of the worst sample
    (mean and max over steps), the free steps a sample needed (mean; max: the most any batch
    ran), the dropped samples summed, time and throughput."""
    train = {k: np.asarray(jax.device_get(v))[:, 0] for k, v in self.values.items()}
    elapsed = time.time() - self.start
    row = {'epoch': self.epoch, 'step': step, 'train_loss': float(train['loss'].mean()),
           'train_accuracy': float(train['accuracy'].mean()), 'epoch_time_s': elapsed,
           'images_per_s': len(train['loss']) * self.batch_size / elapsed}
    if 'top5_accuracy' in train:
      row['train_top5_accuracy'] = float(train['top5_accuracy'].mean())
    if 'log10_residual' in train:
      row['log10_residual'] = float(train['log10_residual'].mean())
      row['log10_residual_max'] = float(train['log10_residual'].max())
    if 'free_steps' in train:  # free steps per sample (< T_free only with early stopping)
      row['free_steps'] = float(train['free_steps'].mean())
      row['free_steps_max'] = int(train['free_steps_max'].max())
    if 'homeo_loss' in train:
      row['train_homeo_loss'] = float(train['homeo_loss'].mean())
    if 'dropped_samples' in train:  # non-finite error vectors left out of the gradient
      row['dropped_samples'] = int(train['dropped_samples'].sum())
    return row


def stop_if_diverged(workdir, row, params, max_train_loss):
  """Raises FloatingPointError, after writing the row marked as diverged, when the epoch's
  training loss exceeds max_train_loss (or is NaN) or a parameter is not finite; the
  checkpoint of the last good epoch is kept."""
  finite = all(np.isfinite(a).all() for a in jax.tree_util.tree_leaves(params))
  if finite and row['train_loss'] <= max_train_loss:
    return
  row['diverged'] = True
  workdir.write_metrics(workdir.history + [row])
  epoch = row['epoch']
  kept = (f'the checkpoint still holds epoch {epoch - 1}' if epoch > 1 else
          'no checkpoint was written')
  raise FloatingPointError(
      f'training diverged in epoch {epoch} (training loss {row["train_loss"]:.4g} > '
      f'max_train_loss={max_train_loss:g}, or non-finite parameters); {kept}. '
      'Lower the learning rate or check that the dynamics converge.')


def flag_unconverged(row, max_log10_residual):
  """Marks the row (converged: false) and warns when the free phase missed its fixed point."""
  residual = row.get('log10_residual', row.get('diag/log10_residual'))
  if not residual <= max_log10_residual:  # NaN is not converged
    logging.warning('epoch %d: no fixed point reached (log10 ||F|| = %.2f > %.1f); '
                    'raise t_free or check the dynamics', row['epoch'], residual,
                    max_log10_residual)
    row['converged'] = False
  return residual


def to_floats(tree):
  """Device scalars and lists of them -> Python floats, for JSON."""
  return jax.tree_util.tree_map(float, jax.device_get(tree))


# ----------------------------------------------------------------------------- devices, processes

def replicate(tree, num_devices):
  """A copy per device along a new leading axis, placed as jax.pmap places its outputs.

  (An uncommitted array, e.g. from jnp.broadcast_to, makes pmap compile the train step a
  second time when its own outputs come back in.)
  """
  devices = jax.local_devices()[:num_devices]
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ('batch',)),
                                        jax.sharding.PartitionSpec('batch'))
  return jax.tree_util.tree_map(
      lambda a: jax.device_put(np.broadcast_to(np.asarray(a), (num_devices, *np.shape(a))),
                               sharding), tree)


def unreplicate(tree):
  """Device 0's copy, as host arrays."""
  return jax.device_get(jax.tree_util.tree_map(lambda a: a[0], tree))


def shard(array, num_devices):
  """(batch, ...) -> (num_devices, batch / num_devices, ...) for pmap."""
  return array.reshape(num_devices, -1, *array.shape[1:])


PROCESS_FIELDS = ('coordinator_address', 'num_processes', 'process_id', 'process_timeout_s')


def cluster_detected():
  """Whether this process is one task of several launched by Slurm or Open MPI, which
  jax.distributed.initialize() recognises without arguments."""
  return any(int(os.environ.get(name, '1') or '1') > 1
             for name in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))


def start_processes(config):
  """Joins the run's other processes, if any (jax.distributed); returns (index, count).

  One process needs nothing. Several: coordinator_address, num_processes and process_id
  (the same address and count in every process, ids 0..n-1), or none of them under Slurm /
  Open MPI. Must run before anything touches a device. process_timeout_s bounds both the
  wait for the others at start and how long a silent process is waited for later.
  """
  c = config
  check_fields(c, {'num_processes': (int, 0), 'process_id': (int, -1),
                   'process_timeout_s': (int, 1)})
  if not isinstance(c.coordinator_address, str):
    raise ConfigError(f'coordinator_address must be a string host:port, got '
                      f'{c.coordinator_address!r}')
  if c.coordinator_address:
    host, _, port = c.coordinator_address.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ConfigError(f'coordinator_address must be host:port with a port in 1..65535, got '
                        f'{c.coordinator_address!r}')
    if c.num_processes < 1 or not 0 <= c.process_id < c.num_processes:
      raise ConfigError(f'with coordinator_address, set num_processes >= 1 and process_id in '
                        f'0..num_processes-1 (got {c.num_processes} and {c.process_id})')
    if c.process_id == 0:
      check_port_free(int(port))
    else:
      wait_for_coordinator(host, int(port), c.process_timeout_s)
    where = dict(coordinator_address=c.coordinator_address, num_processes=c.num_processes,
                 process_id=c.process_id)
  elif c.num_processes > 1 or c.process_id >= 0:
    raise ConfigError('num_processes and process_id need coordinator_address (host:port of '
                      'process 0)')
  elif cluster_detected():
    where = {}  # jax.distributed reads the cluster's environment
  else:
    return 0, 1
  if not jax.distributed.is_initialized():
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU-only runs
    try:
      jax.distributed.initialize(**where, initialization_timeout=c.process_timeout_s,
                                 heartbeat_timeout_seconds=c.process_timeout_s)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f'could not join the other processes ({one_line(e)})') from e
    # Its preemption notifier installs a C-level SIGTERM handler that only takes note (Python
    # still reports ours): where run_main set raise_terminated, set it again.
    if signal.getsignal(signal.SIGTERM) is raise_terminated:
      signal.signal(signal.SIGTERM, raise_terminated)
  return jax.process_index(), jax.process_count()


def check_port_free(port):
  """Process 0 serves the coordinator on `port`: refuse one in use before JAX tries (a
  failed bind in its runtime ends the process without a word)."""
  with socket.socket() as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind(('', port))
    except OSError as e:
      raise ConfigError(f'port {port} of coordinator_address is in use on this machine '
                        f'({e.strerror}): choose another one for every process') from e


def wait_for_coordinator(host, port, timeout_s):
  """Processes > 0: wait (at most timeout_s) until process 0 listens at host:port."""
  deadline = time.time() + timeout_s
  while True:
    try:
      socket.create_connection((host, port), timeout=1.0).close()
      return
    except OSError as e:
      if time.time() > deadline:
        raise ConfigError(f'process 0 is not listening at {host}:{port} after {timeout_s} s '
                          f'({e.strerror or e}): start it with the same coordinator_address') from e
      time.sleep(0.2)


def all_or_none(start, digest=b''):
  """Returns start() in every process of a run, or raises a ConfigError in every process:
  where start() raised one, its own; elsewhere 'process P stopped: <its message>'. Also
  when the processes' `digest`s (of their run configs) differ. So no process goes on to wait
  for a failed one in a later collective. One process: start() as it is."""
  try:
    result, error = start(), None
  except ConfigError as e:
    result, error = None, e
  if jax.process_count() == 1:
    if error:
      raise error
    return result
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  text = one_line(error).encode()[:400] if error else b''
  mine = np.zeros(21 + 400, np.uint8)
  mine[0] = error is not None
  mine[1:1 + len(digest[:20])] = np.frombuffer(digest[:20], np.uint8)
  mine[21:21 + len(text)] = np.frombuffer(text, np.uint8)
  everyone = np.asarray(multihost_utils.process_allgather(mine))  # (processes, 421)
  if error:
    raise error
  for p in np.nonzero(everyone[:, 0])[0]:
    raise ConfigError(f'process {p} stopped: '
                      f'{bytes(everyone[p, 21:]).rstrip(bytes(1)).decode(errors="replace")}')
  for p in np.nonzero((everyone[:, 1:21] != everyone[0, 1:21]).any(axis=1))[0]:
    raise ConfigError(f'process {p} was started with another config than process 0: start '
                      'every process with the same flags')
  return result


def broadcast(tree):
  """Process 0's values of `tree` in every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.broadcast_one_to_all(tree)


def process_batch_indices(num_examples, batch_size, seed, epoch, process_index=0,
                          process_count=1):
  """(steps, batch_size // process_count) indices: this process's share of every global batch
  of one epoch, the last partial batch dropped.

  Every process draws the same permutation, np.random.default_rng([seed, epoch]) (a resumed
  run sees the same batches); global batch i is its i-th block of batch_size indices, and
  process p reads the p-th of the block's process_count equal slices. The global batch does
  not depend on how many processes share the run (tfds.split_for_jax_process, with a fresh
  split every epoch).
  """
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  steps = num_examples // batch_size
  blocks = order[:steps * batch_size].reshape(steps, process_count, -1)
  return blocks[:, process_index]


def process_eval_indices(num_examples, batch_size, process_index=0, process_count=1):
  """[(indices, mask)] of this process's contiguous block of a split, in calls of
  batch_size // process_count examples; every process makes the same number of calls, the
  last ones padded (index 0, mask 0)."""
  per_process = -(-num_examples // process_count)
  per_call = batch_size // process_count
  start = process_index * per_process
  block = np.arange(start, min(num_examples, start + per_process))
  calls = []
  for i in range(-(-per_process // per_call)):
    idx = block[i * per_call:(i + 1) * per_call]
    mask = np.concatenate([np.ones(len(idx), np.float32),
                           np.zeros(per_call - len(idx), np.float32)])
    calls.append((np.pad(idx, (0, per_call - len(idx))), mask))
  return calls


def params_digest(params):
  """SHA-1 of the parameters' bytes (first 16 hex digits): equal digests, equal replicas."""
  h = hashlib.sha1()
  for a in jax.tree_util.tree_leaves(params):
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- input

def read_idx(path):
  """A gzipped uint8 IDX file (the MNIST format) as an array; ConfigError if unreadable."""
  try:
    with gzip.open(path, 'rb') as f:
      data = f.read()
    if len(data) < 4 or data[0:3] != b'\x00\x00\x08':
      raise ValueError('not a uint8 IDX header')
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
  except (EOFError, OSError, zlib.error, ValueError, IndexError) as e:  # BadGzipFile: OSError
    raise ConfigError(f'{path} is damaged or not a gzipped uint8 IDX file '
                      f'({type(e).__name__}: {e})') from e


FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'  # the Debian package's IDX files
FASHION_MNIST_FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
                       'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}


def load_fashion_mnist(folder):
  """{'train': (x, y), 'test': (x, y)} from the four Fashion-MNIST IDX .gz files in `folder`:
  x uint8 (n, 28, 28), y int32 (n,)."""
  missing = [f for pair in FASHION_MNIST_FILES.values() for f in pair
             if not os.path.exists(os.path.join(folder, f))]
  if missing:
    raise ConfigError(f'Fashion-MNIST IDX files missing in {folder}: {", ".join(missing)} '
                      '(install the Debian package dataset-fashion-mnist or set '
                      '--config.data_dir)')
  out = {}
  for split, (images, labels) in FASHION_MNIST_FILES.items():
    x, y = (read_idx(os.path.join(folder, f)) for f in (images, labels))
    if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (len(x),):
      raise ConfigError(f'{folder}: {split} images {x.shape} and labels {y.shape} are not '
                        'n x 28 x 28 images with n labels')
    out[split] = (x, y.astype(np.int32))
  return out


Data = collections.namedtuple('Data', 'train test')  # splits: len() and read(indices)


class MemorySplit:
  """A split held in memory: read(indices) -> (images[indices], labels[indices])."""

  def __init__(self, images, labels):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.labels)

  def read(self, indices):
    return self.images[indices], self.labels[indices]


def memory_data(config, arrays):
  """Data of MemorySplits from {'train': (images, labels), 'test': (...)}: the first
  config.train_size / config.test_size examples of each split (0 = all of it)."""
  splits = {}
  for split in ('train', 'test'):
    size, available = config[f'{split}_size'], len(arrays[split][0])
    if size > available:
      raise ConfigError(f'{split}_size={size} but only {available} {split} images were found')
    splits[split] = MemorySplit(*(a[:size or available] for a in arrays[split]))
  return Data(**splits)


def check_batches(config, data):
  """The loaded data, if the training batch and the diagnostics' batch fit its training set."""
  for name in ('batch_size', 'diag_batch_size'):
    if config[name] > len(data.train):
      raise ConfigError(f'{name}={config[name]} exceeds the {len(data.train)} training images')
  return data


def map_ahead(fn, items, threads=1, ahead=2):
  """fn(item) for each item in order, computed up to `ahead` items ahead of the consumer on
  `threads` background threads. Exceptions are raised here; closing the generator (leaving a
  loop early) waits only for the calls in flight."""
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) > ahead:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def read_batches(split, index_batches, threads=1):
  """split.read of each index array in turn, on `threads` threads (decoding releases the GIL)."""
  return map_ahead(split.read, index_batches, threads, 2 * threads)


def prefetch(iterator, put=jax.device_put, size=2):
  """put(item) of each item (e.g. onto the devices) `size` items ahead on a background thread:
  the host prepares the next batches while the devices compute."""
  return map_ahead(put, iterator, 1, size)


def evaluate_counts(eval_step, params, split, batch_size, num_devices, threads=1):
  """The sum over a whole split of what eval_step(params, images, labels, mask) counts (its
  output on the first device; eval_step sums over the devices): each process reads its own
  block of the split in calls of batch_size // process_count examples, the last ones padded
  and masked (process_eval_indices), a few calls ahead on background threads."""
  calls = process_eval_indices(len(split), batch_size, jax.process_index(), jax.process_count())
  batches = prefetch(
      zip(read_batches(split, [idx for idx, _ in calls], threads), (mask for _, mask in calls)),
      put=lambda batch: tuple(shard(a, num_devices) for a in (*batch[0], batch[1])))
  total = np.float64(0)
  for images, labels, mask in batches:
    total = total + np.asarray(eval_step(params, images, labels, mask)[0])
  return total


def url_reachable(url, timeout_s=3.0):
  """Whether an HTTP HEAD of `url` succeeds (status < 400) within timeout_s in total.

  Goes through requests, so HTTP(S)_PROXY settings apply as they do for TFDS's download.
  Runs in a daemon thread, because the name lookup has no timeout of its own.
  """
  import requests  # pylint: disable=g-import-not-at-top  (a TFDS dependency)
  reached = threading.Event()

  def head():
    try:
      if requests.head(url, timeout=timeout_s, allow_redirects=True).status_code < 400:
        reached.set()
    except requests.RequestException:
      pass

  thread = threading.Thread(target=head, daemon=True)
  thread.start()
  thread.join(timeout_s)
  return reached.is_set()


def tensorflow_installed():
  return importlib.util.find_spec('tensorflow') is not None


def preparation_problem(name, data_dir, url):
  """Why TFDS cannot prepare data set `name` here (one line), or None; answers in seconds.

  Without these checks TFDS retries an unreachable download (`url`, what it would fetch)
  for minutes, and TensorFlow, which TFDS needs to prepare the data (not to read it), would
  only be found missing after the download.
  """
  hint = (f'or set --config.tfds_data_dir to a folder holding {name} prepared by TFDS '
          '(array_record format)')
  if not tensorflow_installed():
    return (f'{name} is not prepared in {data_dir}; preparing it needs TensorFlow and '
            f'internet: pip install tensorflow-cpu and rerun with internet, {hint}')
  if not url_reachable(url):
    return (f'{name} is not prepared in {data_dir} and {url} cannot be reached to download '
            f'it (no internet?): rerun with internet, {hint}')
  return None


def tfds_builder(name, data_dir, url, prepare=True):
  """The TFDS builder of data set `name` in data_dir ('' = TFDS's default), downloaded and
  prepared as array_record from `url`'s source (not TFDS's GCS copies, which are tfrecord
  only) unless it is prepared or `prepare` is False; where it cannot be prepared, one line
  within seconds (preparation_problem)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # No file_format here: TFDS refuses one that differs from already prepared data's.
  builder = tfds.builder(name, data_dir=data_dir or None)
  if prepare and not builder.is_prepared():
    problem = preparation_problem(name, builder.data_dir, url)
    if problem:
      raise ConfigError(problem)
    try:
      builder.download_and_prepare(
          file_format='array_record',
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f'preparing {name} in {builder.data_dir} failed '
                        f'[{type(e).__name__}: {str(e).splitlines()[0]}]') from e
  return builder


# ----------------------------------------------------------------------------- command line

def one_line(error):
  return ' '.join(str(error).replace('\\n', ' ').split())


def parse_flags(script):
  """absl's flag parser for `script`, with a bad --config (missing file, misspelt field,
  wrong type) as one line instead of a traceback."""
  def parse(argv):
    fields = [a.split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')]
    twice = sorted({f for f in fields if fields.count(f) > 1})
    if twice:  # ml_collections would concatenate a tuple given twice
      sys.exit(f'{script}: error: {", ".join(twice)} given more than once')
    files = [a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')]
    if files and not os.path.isfile(files[-1].split(':', 1)[0]):
      sys.exit(f'{script}: error: the config file {files[-1]} does not exist')
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except
      sys.exit(f'{script}: error: {one_line(e)}')
  return parse


def define_flags(default_config, workdir_help='Where to write the config, metrics and checkpoint'):
  """--config (an ml_collections file, --config.field=value overrides) and --workdir."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', default_config, 'Experiment configuration.')
  flags.DEFINE_string('workdir', None, f'{workdir_help} (default: runs/<script>/<settings>-'
                      '<config hash>, printed at start); rerunning with the same workdir resumes.')


class Terminated(BaseException):
  """SIGTERM (kill, Slurm, a sweep's stop), raised in the main thread as Ctrl-C raises
  KeyboardInterrupt: the files written before are intact (every write is atomic)."""


def raise_terminated(signum, frame):
  del signum, frame
  signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
  raise Terminated


def run_main(script, train_and_evaluate, default_config):
  """The command line of an experiment script: flags, then train_and_evaluate(config,
  workdir), every expected failure as one line `<script>: error: ...` and exit code 1;
  Ctrl-C and SIGTERM as one line each (exit codes 130 and 143), resumable.

  In a multi-process run any other failure (typically a collective that lost a process that
  died), and an interrupt, end the process at once with os._exit: the orderly shutdown of
  jax.distributed would wait for the other processes (for a dead one, then abort with a
  stack dump).
  """
  define_flags(default_config)
  # Not an error: JAX looks for a TPU first and logs its absence at INFO level.
  std_logging.getLogger('jax._src.xla_bridge').setLevel(std_logging.WARNING)

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError('Too many command-line arguments.')
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
      train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (KeyboardInterrupt, Terminated) as e:  # the files written before are intact
      code, what = (143, 'terminated') if isinstance(e, Terminated) else (130, 'interrupted')
      print(f'{script}: {what}; resume with the same command', file=sys.stderr, flush=True)
      if jax.distributed.is_initialized():
        os._exit(code)  # pylint: disable=protected-access
      sys.exit(code)
    except (ConfigError, FloatingPointError) as e:
      sys.exit(f'{script}: error: {e}')
    except OSError as e:  # a read-only or full disk: the files written before are intact
      sys.exit(f'{script}: error: cannot write the workdir: {one_line(e)}')
    except Exception as e:  # pylint: disable=broad-except
      if jax.process_count() == 1:
        raise
      print(f'{script}: error: process {jax.process_index()} of {jax.process_count()} stopped: '
            f'{one_line(e)[:300]}. If another process died, restart all processes with the '
            'same flags: they resume after the last checkpoint.', file=sys.stderr, flush=True)
      os._exit(1)  # pylint: disable=protected-access

  app.run(main, flags_parser=parse_flags(script))

"""A script's command line, paused once at a chosen point so that a test can act there (start
a second run, kill -9, Ctrl-C, SIGTERM) without guessing at timing:

    PAUSE_AFTER=save:1 python tests/paused_run.py fmnist_mlp.py --config=configs/fmnist_mlp.py ... --workdir=W

PAUSE_AFTER=save:E pauses right after epoch E's checkpoint is written; step:E:K right after
the K-th training step of epoch E (mid-epoch). There it prints PAUSED to stdout and waits
for a line (or the end) on stdin; a helper of test_harness.py. It stands for a run started
from a terminal: Python's own SIGINT handler is in place even where the test runner was
started as a background job of a script (`./.ci/run &`), whose children inherit SIGINT
ignored and would sit through the Ctrl-C test's signal.
"""
import os
import runpy
import select
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # pylint: disable=wrong-import-position

KIND, *AT = os.environ['PAUSE_AFTER'].split(':')
AT = [int(a) for a in AT]


def pause():
  print('PAUSED', flush=True)
  # Wait in short slices, not in one blocking read: the kernel may hand a signal to any of
  # the process's threads (JAX starts many), and a main thread blocked in read() would then
  # never come back to run Python's handler for it.
  while not select.select([sys.stdin], [], [], 0.05)[0]:
    pass
  sys.stdin.readline()


_save, _add = harness.Workdir.save, harness.Progress.add


def save_then_pause(self, epoch, row, state):
  _save(self, epoch, row, state)
  if KIND == 'save' and [epoch] == AT:
    pause()


def add_then_pause(self, metrics):
  going = _add(self, metrics)
  if KIND == 'step' and [self.epoch, len(self.values['loss'])] == AT:
    pause()
  return going


harness.Workdir.save = save_then_pause
harness.Progress.add = add_then_pause

if __name__ == '__main__':
  signal.signal(signal.SIGINT, signal.default_int_handler)
  sys.argv.pop(0)  # the script's own command line, run as its own __main__ (with its defaults)
  runpy.run_path(sys.argv[0], run_name='__main__')

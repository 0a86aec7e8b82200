"""A script's own command line with every download address closed: python tests/offline_run.py
SCRIPT.py --config=... --workdir=...

What a user without the data sees, made the same on every machine: the TFDS download
addresses of cifar_conv.py and imagenet32_conv.py point at a port of this machine that
refuses connections (bound, never listening), and TensorFlow counts as installed, so the
script's pre-check reaches the download and finds it unreachable at once. No connection
leaves the machine, with internet or without. A helper of test_cifar_conv.py and
test_imagenet32_conv.py.
"""
import importlib
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cifar_conv  # pylint: disable=wrong-import-position
import harness  # pylint: disable=wrong-import-position

DEFAULT_CONFIGS = {'cifar_conv.py': 'configs/cifar10.py',
                   'imagenet32_conv.py': 'configs/imagenet32.py'}

if __name__ == '__main__':
  script = sys.argv.pop(1)
  module = importlib.import_module(script[:-3])  # imagenet32_conv adds its data set
  closed = socket.socket()  # held until the process ends: nobody else gets the port
  closed.bind(('127.0.0.1', 0))
  for info in cifar_conv.DATASETS.values():
    if 'url' in info:
      info['url'] = f'http://127.0.0.1:{closed.getsockname()[1]}/unreachable.tar.gz'
  harness.tensorflow_installed = lambda: True
  harness.run_main(module.SCRIPT, module.train_and_evaluate, DEFAULT_CONFIGS[script])

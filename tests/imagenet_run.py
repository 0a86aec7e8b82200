"""imagenet32_conv.py's command line on TFDS mock data (ImageNet cannot be downloaded
here): python tests/imagenet_run.py --config=configs/imagenet32.py --config.x=... --workdir=...

The same command line as the script (harness.run_main with its train_and_evaluate and
default config), inside tfds.testing.mock_data (64 deterministic fake examples per split);
a helper of test_imagenet32_conv.py. Every process also prints `PARAMS <epoch> <digest>`
(harness.params_digest of the parameters it checkpoints, or would: process > 0 writes
nothing) to stderr after each epoch, so that the test can compare the replicas of every
process, and a one-process run, epoch by epoch.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-position

import harness  # pylint: disable=wrong-import-position
import imagenet32_conv  # pylint: disable=wrong-import-position

# mock_data fakes the preparation; skip the download checks (TensorFlow, internet).
harness.preparation_problem = lambda name, data_dir, url: None
_save = harness.Workdir.save


def _save_and_report(self, epoch, row, state):
  _save(self, epoch, row, state)
  print(f'PARAMS {epoch} {harness.params_digest(state[0])}', file=sys.stderr, flush=True)


harness.Workdir.save = _save_and_report

if __name__ == '__main__':
  with tfds.testing.mock_data(num_examples=int(os.environ.get('MOCK_EXAMPLES', '64')),
                              policy=tfds.testing.MockPolicy.USE_CODE):
    harness.run_main(imagenet32_conv.SCRIPT, imagenet32_conv.train_and_evaluate,
                     'configs/imagenet32.py')

"""imagenet32_conv.py's command line on TFDS mock data (ImageNet cannot be downloaded
here): python tests/imagenet_run.py --config=configs/imagenet32.py --config.x=... --workdir=...

The same main() and flags as the script, inside tfds.testing.mock_data (64 deterministic
fake examples per split); a helper of test_imagenet_script.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position
import tensorflow_datasets as tfds  # pylint: disable=wrong-import-position

import imagenet32_conv  # pylint: disable=wrong-import-position

# mock_data fakes the preparation; skip the download checks (TensorFlow, internet).
imagenet32_conv.preparation_problem = lambda name, data_dir: None

if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', 'configs/imagenet32.py', 'Experiment configuration.')
  flags.DEFINE_string('workdir', None, 'Workdir.')
  with tfds.testing.mock_data(num_examples=int(os.environ.get('MOCK_EXAMPLES', '64')),
                              policy=tfds.testing.MockPolicy.USE_CODE):
    app.run(imagenet32_conv.main, flags_parser=imagenet32_conv.parse_flags)

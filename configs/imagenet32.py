"""ImageNet 32x32, the recurrent convnet of App. D.2: defaults = Table 2's hEP row (Table 4).

    python imagenet32_conv.py --config=configs/imagenet32.py

Table 2 (ImageNet 32x32 column; lr 5e-3, 90 epochs, lambda 10 unless stated), one run each:
  hEP exact + homeostasis (this file's defaults)  (no override)
  hEP N = 2, |beta| = 1, + homeostasis            --config.algorithm=hep --config.n_points=2 --config.beta=1.0
  the symmetric (energy-based, "Sym.") network    --config.tied=True --config.homeo_coef=0
  RBP/BP baseline (backprop through T_nudge steps) --config.algorithm=bptt
Several processes (one per machine, or one per GPU): the same command in every process, with
  --config.coordinator_address=HOST0:PORT --config.num_processes=P --config.process_id=I
or none of these under Slurm / Open MPI (see the README). batch_size is the GLOBAL batch.

The fields and their meaning are those of configs/cifar10.py; only these differ.
"""
from configs import cifar10


def get_config():
  c = cifar10.get_config()
  # TFDS imagenet_resized/32x32, downloaded and prepared on first use (3.7 GB; needs internet
  # and tensorflow-cpu), then read by random access (never loaded whole). Validation (50,000
  # images) plays the test split.
  c.dataset = 'imagenet32'
  c.num_classes = 1000
  del c['data_dir']  # no IDX files here
  c.data_threads = 8  # threads per process that read and decode examples
  c.homeo_coef = 10.0  # lambda for ImageNet (Table 4)
  c.learning_rate = 5e-3
  c.num_epochs = 90
  c.log_every_steps = 100
  c.max_train_loss = 30.0  # chance: ln 1000 = 6.9
  return c

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
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Data: TFDS imagenet_resized/32x32, downloaded and prepared on first use (3.7 GB; needs
  # internet and tensorflow-cpu, which requirements.txt installs), then read by random access
  # (never loaded whole). Validation (50,000 images) plays the test split.
  c.dataset = 'imagenet32'
  c.num_classes = 1000
  c.tfds_data_dir = ''  # TFDS data_dir ('' = TFDS default, ~/tensorflow_datasets)
  c.train_size = 0  # use only the first n training images (0 = all)
  c.test_size = 0  # use only the first n validation images (0 = all)
  c.augment = True  # random flip + random 32x32 crop of the image padded to 36x36 (on device)
  c.data_threads = 8  # threads per process that read and decode examples

  # Network (App. D.2): as configs/cifar10.py.
  c.image_size = 32
  c.in_channels = 3
  c.channels = (128, 256, 512, 512)
  c.alpha = 0.0
  c.tied = False

  # Dynamics: as configs/cifar10.py (T counts synchronous steps).
  c.t_free = 250
  c.t_nudge = 40
  c.tol = 0.0
  c.layer_updates = 'synchronous'  # 'synchronous' (App. D.2) | 'sequential' (odd, then even)
  c.free_dtype = 'auto'  # 'auto' = bfloat16 on GPU, float32 on CPU | 'float16' | ...

  # Gradient estimator: as configs/cifar10.py; Table 2's default is the exact d_beta s*.
  c.algorithm = 'hep_exact'
  c.n_points = 2
  c.beta = 1.0
  c.continuous_steps_per_point = 60
  c.continuous_periods = 5
  c.continuous_average = 'hold_end'

  # Jacobian homeostasis (Eq. 12): lambda = 10 for ImageNet (Table 4).
  c.homeo_coef = 10.0
  c.homeo_draws = 5

  # Optimisation (Table 4): SGD momentum 0.9, coupled weight decay (x2 on the readout),
  # cosine decay to zero, per-layer learning-rate factors as for CIFAR.
  c.optimizer = 'sgd'  # 'sgd' | 'adam'
  c.learning_rate = 5e-3
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.readout_wd_factor = 2.0
  c.lr_factors = (25.0, 15.0, 10.0, 8.0, 5.0)
  c.batch_size = 256  # global: split over every device of every process
  c.num_epochs = 90
  c.num_devices = 0  # devices per process (0 = all local devices)
  c.eval_batch_size = 1000

  # Processes (jax.distributed): '' / 0 / -1 = one process, or found from Slurm / Open MPI.
  c.coordinator_address = ''  # host:port of process 0, reachable by every process
  c.num_processes = 0
  c.process_id = -1
  c.process_timeout_s = 300  # wait at most this long for the others to start or to answer

  # Diagnostics, once per epoch on one fixed batch of training images.
  c.diag_batch_size = 64
  c.diag_symmetry_probes = 8
  c.log_every_steps = 100
  c.max_log10_residual = -2.0
  c.max_train_loss = 30.0  # chance: ln 1000 = 6.9
  return c

"""CIFAR-10, the recurrent convnet of App. D.2: defaults = Table 2's hEP row (Table 4).

    python cifar_conv.py --config=configs/cifar10.py

Table 2 (CIFAR-10 column; lr 7e-3, 150 epochs, lambda 15 unless stated), one run each:
  hEP exact + homeostasis (this file's defaults)  (no override)
  hEP N = 2, |beta| = 1, + homeostasis            --config.algorithm=hep --config.n_points=2 --config.beta=1.0
  hEP exact without homeostasis                   --config.homeo_coef=0
  RBP/BP (the authors' baseline: backprop through T_nudge steps) with / without homeostasis
                                                  --config.algorithm=bptt  /  --config.algorithm=bptt --config.homeo_coef=0
  the symmetric (energy-based, "Sym.") network    --config.tied=True --config.homeo_coef=0
Fig. 4i-l (lr 5e-3, 90 epochs, lambda 10 vs 0, seeds 1-3):
  --config.learning_rate=5e-3 --config.num_epochs=90 --config.homeo_coef=10 --config.seed=1
  --config.learning_rate=5e-3 --config.num_epochs=90 --config.homeo_coef=0 --config.seed=1
(The adjoint-fixed-point RBP of Eq. 4 is --config.algorithm=rbp.)
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Data: TFDS, downloaded and prepared on first use (needs internet and tensorflow-cpu,
  # which requirements.txt installs). 'fashion_mnist' = Fashion-MNIST padded to 32x32x3, read
  # from the Debian package's IDX files (or data_dir): a check that needs no download.
  c.dataset = 'cifar10'  # 'cifar10' | 'cifar100' | 'fashion_mnist'
  c.num_classes = 10
  c.tfds_data_dir = ''  # TFDS data_dir ('' = TFDS default, ~/tensorflow_datasets)
  c.data_dir = ''  # only for 'fashion_mnist': the folder of the four IDX .gz files
  c.train_size = 0  # use only the first n training images (0 = all)
  c.test_size = 0  # use only the first n test images (0 = all)
  c.augment = True  # random flip + random 32x32 crop of the image padded to 36x36 (on device)
  c.data_threads = 1  # threads per process that gather (ImageNet: read and decode) examples

  # Network (App. D.2): 3x3 convs + 2x2 softmax pooling, states (16,16,128), (8,8,256),
  # (4,4,512), (1,1,512); backward kernels start at angle alpha (degrees) from the forward
  # ones; tied=True uses the forward kernels both ways (an energy-based network).
  c.network = 'conv'  # cifar_conv.NETWORKS
  c.image_size = 32
  c.in_channels = 3
  c.channels = (128, 256, 512, 512)
  c.alpha = 0.0
  c.tied = False

  # Dynamics: u <- G(sigma(u)) + beta dL/ds_out, free phase from zeros. T_free and T_nudge
  # count SYNCHRONOUS steps, the paper's unit, as in every config: 'sequential' (odd layers,
  # then even ones) runs ceil(T / 2) steps for them. Here that is no exact equivalent (the
  # MLPs' is), so App. D.2's synchronous update is the default.
  c.t_free = 250
  c.t_nudge = 40
  c.tol = 0.0  # > 0: stop a relaxation early once every sample has ||F|| < tol
  c.layer_updates = 'synchronous'  # 'synchronous' (App. D.2) | 'sequential' (odd, then even)
  # The free phase in half precision (App. D.4): 'auto' = bfloat16 on GPU, float32 on CPU;
  # 'float16' as the authors ran it. The nudged phases and estimators stay float32/complex64.
  c.free_dtype = 'auto'

  # Gradient estimator: 'hep_exact' (forward-mode d_beta s*, Table 2's default), 'hep'
  # (Cauchy, N points, |beta|; N = 0 means exact), 'hep_continuous', 'rbp' (Eq. 4), 'bptt'.
  c.algorithm = 'hep_exact'
  c.n_points = 2
  c.beta = 1.0  # Table 2's N = 2 runs
  c.continuous_steps_per_point = 60  # synchronous steps per beta value
  c.continuous_periods = 5
  c.continuous_average = 'hold_end'  # 'hold_end' (the authors') | 'every_step' (Eq. 8)

  # Jacobian homeostasis (Eq. 12): lambda (15 for Table 2; 10 for Fig. 4i-l).
  c.homeo_coef = 15.0
  c.homeo_draws = 5

  # Optimisation (Table 4): SGD momentum 0.9, coupled weight decay (x2 on the readout),
  # cosine decay to zero over the run, per-layer learning-rate factors for (input->1),
  # (1<->2), (2<->3), (3<->out), readout.
  c.optimizer = 'sgd'  # 'sgd' | 'adam'
  c.learning_rate = 7e-3
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.readout_wd_factor = 2.0
  c.lr_factors = (25.0, 15.0, 10.0, 8.0, 5.0)
  c.batch_size = 256  # global: split over every device of every process
  c.num_epochs = 150
  c.num_devices = 0  # devices per process (0 = all local devices); the batch is split across all
  c.eval_batch_size = 1000

  # Processes (jax.distributed): '' / 0 / -1 = one process, or found from Slurm / Open MPI.
  c.coordinator_address = ''  # host:port of process 0, reachable by every process
  c.num_processes = 0
  c.process_id = -1
  c.process_timeout_s = 300  # wait at most this long for the others to start or to answer

  # Diagnostics, once per epoch on one fixed batch of training images.
  c.diag_batch_size = 64
  c.diag_symmetry_probes = 8  # random probes of the stochastic Jacobian symmetry measure
  c.log_every_steps = 20  # progress line within an epoch (0 = none)
  c.max_log10_residual = -2.0  # warn when log10 ||F|| after the free phase exceeds this
  # Stop as diverged when an epoch's mean training loss exceeds this (chance: ln 10 = 2.3),
  # as when the loss or the parameters become NaN; the last good checkpoint is kept.
  c.max_train_loss = 10.0
  return c

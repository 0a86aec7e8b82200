"""Fashion-MNIST MLP (App. D.2): defaults = Table 3, first column (Fig. 3, Table 1).

    python fmnist_mlp.py --config=configs/fmnist_mlp.py --workdir=runs/mlp
    python fmnist_mlp.py --config=configs/fmnist_mlp.py --config.n_points=6 --config.beta=0.5

See the README for the command behind every paper result.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Data: 'auto' reads the four IDX .gz files from `data_dir`, else from the Debian package
  # dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), else TFDS 'fashion_mnist'.
  c.dataset = 'fashion_mnist'
  c.data_source = 'auto'  # 'auto' | 'idx' | 'tfds'
  c.data_dir = ''  # folder holding the IDX files ('' = the Debian folder)
  c.tfds_data_dir = ''  # TFDS data_dir ('' = TFDS default)
  c.train_size = 0  # use only the first n training images (0 = all 60000)
  c.test_size = 0  # use only the first n test images (0 = all 10000)

  # Network: 784 - hidden_sizes - 10, reciprocal layers with independent forward and
  # backward weights; backward weights start at angle `alpha` (degrees) from the forward ones.
  c.network = 'reciprocal'  # fmnist_mlp.NETWORKS ('feedback': fmnist_feedback.py's)
  c.hidden_sizes = (256, 256)
  c.alpha = 0.0  # 0 in Table 1 and Fig. 3's first column; 90 for Fig. 4a-d

  # Dynamics: u <- G(sigma(u)) + beta dL/ds_out, free phase from zeros. T_free and T_nudge
  # count SYNCHRONOUS steps, the paper's unit: with layer_updates='sequential' the run makes
  # ceil(T / 2) sequential steps (each updates every layer once), i.e. 75 and 10 here.
  c.t_free = 150
  c.t_nudge = 20
  c.tol = 0.0  # > 0: stop a relaxation early once every sample has ||F|| < tol
  # 'sequential' updates odd then even layers: the same fixed points and, in the free phase,
  # exactly one of the synchronous dynamics' two chains, at half the cost.
  # 'synchronous' updates every layer at once, as in App. D.2 and the authors' code.
  c.layer_updates = 'sequential'

  # Gradient estimator: 'hep' (Cauchy, N points, |beta|; N=0 means exact, N=1 classic EP),
  # 'hep_exact' (forward-mode d_beta s*), 'hep_continuous' (Eqs. 8-9, no free phase),
  # 'rbp' (adjoint fixed point, Eq. 4), 'bptt' (autodiff through T_nudge steps).
  c.algorithm = 'hep'
  c.n_points = 2
  c.beta = 0.05
  c.continuous_steps_per_point = 60  # synchronous steps per beta value
  c.continuous_periods = 5
  # 'hold_end' (the authors' Table 1 runs): only the state at the end of each hold of beta
  # enters the averages, in u; 'every_step': Eq. 8 literally, every step from t = 0.
  c.continuous_average = 'hold_end'

  # Jacobian homeostasis (Eq. 12): lambda and the number of Gaussian draws per sample.
  c.homeo_coef = 0.0
  c.homeo_draws = 5

  # Optimisation (Table 3): SGD 1e-2 momentum 0.9; Fig. 4a-d uses adam 1e-4, hep_exact and
  # alpha = 90 (the authors' run script starts those runs with independent weights).
  c.optimizer = 'sgd'  # 'sgd' | 'adam'
  c.learning_rate = 1e-2
  c.momentum = 0.9
  c.batch_size = 50
  c.num_epochs = 50
  c.num_devices = 0  # 0 = all local devices; the batch is split across them
  c.eval_batch_size = 1000

  # Diagnostics, once per epoch on one fixed batch of training images.
  c.diag_batch_size = 50
  c.diag_jacobian_samples = 10  # dense Jacobians for the symmetry measure
  c.log_every_steps = 300  # progress line within an epoch (0 = none)
  c.max_log10_residual = -2.0  # warn when log10 ||F|| after the free phase exceeds this
  # Stop as diverged when an epoch's mean training loss exceeds this (chance: ln 10 = 2.3),
  # as when the loss or the parameters become NaN; the last good checkpoint is kept.
  c.max_train_loss = 10.0
  return c

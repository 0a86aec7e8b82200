"""Fig. 2 analysis on the Fashion-MNIST MLP: the finite-nudge bias vs the asymmetry bias.

    python fig2_bias.py --config=configs/fig2_bias.py --workdir=results/fig2
    python fig2_bias.py --config=configs/fig2_bias.py --workdir=runs/fig2_trained \
        --config.checkpoint_dir=runs/mlp        # adds the trained network of a training run

Every network is the 784 - hidden - 10 MLP of fmnist_mlp.py at initialisation (seed `seed`,
backward weights at angle alpha from the transposed forward ones), on one batch of
`batch_size` training images drawn with the same seed.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 64

  # Data, read by fmnist_mlp.load_data: the Debian IDX files, `data_dir`, or TFDS.
  c.data_source = 'auto'  # 'auto' | 'idx' | 'tfds'
  c.data_dir = ''
  c.tfds_data_dir = ''
  c.train_size = 0  # the batch is drawn from the first train_size images (0 = all)
  c.test_size = 0

  # float64 (and complex128) for the whole analysis: at |beta| = 1e-3 the one-sided
  # N = 1 difference loses ~4 of float32's 7 digits, and the tied network's cosines are
  # compared with 1 to many digits. False: float32 / complex64, about twice as fast.
  c.x64 = True

  # Dynamics (fmnist_mlp.make_step). The relaxations are long because a few samples of the
  # network at initialisation sit close to instability and converge slowly; samples whose
  # free phase has not converged (last update > max_residual; 0 = 1e-6 in float64, 1e-4
  # in float32) are left out of every statistic and counted in the outputs.
  c.hidden_sizes = (256, 256)  # panels a, b, e, f
  c.layer_updates = 'sequential'  # same fixed points as 'synchronous', half the cost
  c.t_free = 1000  # synchronous steps of the free phase
  c.t_nudge = 1000  # synchronous steps of each nudged phase and RBP iterations
  c.max_residual = 0.0

  # Optional: the workdir of a fmnist_mlp.py training run; its checkpoint.npz is analysed
  # as one more network state (panels a-b and c).
  c.checkpoint_dir = ''

  # Fig. 2a-b: cosine(delta, Cauchy estimate with N points) against |beta|.
  c.sweep_alphas = (0.0, 90.0)
  c.sweep_betas = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
  c.sweep_n_points = (1, 2, 4, 6)

  # Fig. 2c-d: distribution of per-sample, per-layer cosine(delta, exact d_beta s*).
  c.dist_alphas = (0.0, 30.0, 60.0, 90.0)
  c.dist_depths = (1, 2, 3)  # hidden layers of dist_width units
  c.dist_width = 256
  c.dist_depth_panel_alpha = 60.0  # panel d compares the depths at this angle

  # Fig. 2e-f: continuous-time estimate (Eqs. 8-9) from zeros, no free phase.
  c.continuous_alpha = 90.0
  c.continuous_beta = 0.2  # small enough for the 4-point bias to be negligible
  c.continuous_n_points = 4
  c.continuous_steps_per_point = 60  # synchronous steps per value of beta (App. D.3)
  c.continuous_periods = 10
  c.trace_sample = 0  # the sample whose neurons are traced (one unit per layer)

  c.figures = True  # PNG panels (needs matplotlib)
  return c

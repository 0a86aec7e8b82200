"""Fashion-MNIST with direct output feedback (Fig. 4e-h): defaults = Table 3, first column.

    python fmnist_feedback.py --config=configs/fmnist_feedback.py --workdir=runs/feedback_l0.1
    python fmnist_feedback.py --config=configs/fmnist_feedback.py --workdir=runs/feedback_l0 \
        --config.homeo_coef=0

The fields of configs/fmnist_mlp.py (see there), with the same defaults but two, and without
the backward weights' angle alpha. See the README for the command behind every paper result.
"""
from configs import fmnist_mlp


def get_config():
  c = fmnist_mlp.get_config()
  # Network (Fig. 4e): 784 -> hidden_sizes[0] -> ... -> 10, each with a bias, and the output
  # layer feeding straight back to the first hidden layer (no bias). No reciprocal
  # connection exists, so no weight can be the transpose of another: there is no angle.
  c.network = 'feedback'
  del c['alpha']
  # Dynamics: layer_updates='sequential' updates layer 1, 2, ..., output in turn from the
  # fresh values: the same fixed points and, in the free phase, exactly one of the L chains
  # of the synchronous dynamics (L layers) at 1 / L of the cost. T_free = 150 and
  # T_nudge = 20 synchronous steps are then ceil(T / 3) = 50 and 7 sequential steps.
  c.algorithm = 'hep_exact'  # forward-mode d_beta s*, the paper's setting here
  c.homeo_coef = 0.1  # lambda: 0.1 in Fig. 4e-h; 0 is the comparison run
  return c

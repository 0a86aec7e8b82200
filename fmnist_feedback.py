r"""Homeostasis where weight symmetry is impossible: direct output feedback (Fig. 4e-h).

Laborieux & Zenke, ICLR 2024, Section 4 and Fig. 4e-h. The network of Fig. 4e is a directed
cycle: the image drives layer 1, layer 1 drives layer 2, layer 2 drives the 10-unit output
layer (each with a bias), and the output feeds straight back to layer 1 (no bias):

    x -> [1] -> [2] -> [out]
          ^              |
          +--------------+          784 - 256 - 256 - 10, feedback 10 -> 256

There is no reciprocal connection (no 2 -> 1, no out -> 2), so no weight can be the transpose
of another: K = dG/ds has nonzero blocks only at (2, 1), (out, 2) and (1, out), K and K^T
never overlap, and the Jacobian is not symmetric for any parameters. The homeostatic loss
acts on the Jacobian itself (Eq. 12); the question of Fig. 4e-h is whether it still raises
the Jacobian's symmetry and the alignment of hEP's d_beta s* with RBP's delta. There is no
forward/backward weight angle here, and the metrics say so (null) rather than invent one.

    python fmnist_feedback.py --config=configs/fmnist_feedback.py --workdir=runs/feedback_l0.1
    python fmnist_feedback.py --config=configs/fmnist_feedback.py --workdir=runs/feedback_l0 \
        --config.homeo_coef=0

Only the network is defined here: it joins fmnist_mlp.NETWORKS as 'feedback' (the config's
`network`), and the dynamics, the estimators, the training, the diagnostics and the data are
those of fmnist_mlp.py (with its sign convention). It is the worked example of a new network
(README, "Fork it").

What the homeostatic loss is here. G is affine in s, so J = dF/ds = K - I is the same at
every state, and because the graph is a cycle of length >= 3, tr(K) = tr(K^2) = 0. Eq. 12's
expected value (||J||^2 - tr J^2) / n is then ||K||_F^2 / n: the summed squares of the three
recurrent weight matrices (feedforward l1->l2, l2->out and the feedback), divided by the
number of units. Its gradient shrinks them; the symmetric part of J is dominated by -I, so
the symmetry measure rises as ||K|| falls. (Tested in tests/test_fmnist_feedback.py.)
"""
import os

import jax
import jax.numpy as jnp

import common
import fmnist_mlp as mlp
import harness
from fmnist_mlp import NUM_CLASSES, dot

SCRIPT = os.path.basename(__file__)
ConfigError = harness.ConfigError


# ======================================================================================
# Network (Fig. 4e; dynamics of App. D.2)
# ======================================================================================
# State: a tuple (u_1, ..., u_L) of (batch, n_l) arrays; u_L is the 10-unit output layer.
# Parameters: {'forward': [{'w', 'b'}] * L, 'feedback': {'w'}, 'readout': {'w', 'b'}}
# forward[l]['w'] maps layer l-1 (the image for l = 0) to layer l; feedback['w'] maps the
# output layer straight back to layer 1 and has no bias. Nothing else flows downwards. The
# readout is not part of the dynamics.

def init_params(key, config):
  """LeCun-normal weights (the feedback's fan-in is the 10 output units), zero biases."""
  sizes = (784, *config.hidden_sizes, NUM_CLASSES)
  init = jax.nn.initializers.lecun_normal()  # truncated normal, variance 1 / fan_in
  keys = iter(jax.random.split(key, len(sizes) + 1))
  forward = [{'w': init(next(keys), (n_in, n_out)), 'b': jnp.zeros(n_out)}
             for n_in, n_out in zip(sizes[:-1], sizes[1:])]
  feedback = {'w': init(next(keys), (NUM_CLASSES, sizes[1]))}
  readout = {'w': init(next(keys), (NUM_CLASSES, NUM_CLASSES)), 'b': jnp.zeros(NUM_CLASSES)}
  return {'forward': forward, 'feedback': feedback, 'readout': readout}


def layer_drive(params, s, x_drive, l):
  """G_l(s): the new u of layer l from the one layer that drives it, no nudge.

  Layer 1 hears the image and the output layer (the feedback); every other layer hears only
  the layer below it.
  """
  if l == 0:
    return x_drive + dot(s[-1], params['feedback']['w'])
  return dot(s[l - 1], params['forward'][l]['w']) + params['forward'][l]['b']


def around_the_cycle(num_layers):
  """The 'sequential' update order (fmnist_mlp.make_step): layer 1, then layer 2, ..., then
  the output layer, each from the values just computed.

  Each layer is driven by exactly one other layer (the one before it on the cycle
  1 -> 2 -> ... -> out -> 1; the image is constant), so the synchronous dynamics split into
  C = len(hidden_sizes) + 1 independent chains, one per starting layer: u_out(0) -> u_1(1)
  -> u_2(2) -> ... -> u_out(C) -> u_1(C + 1) -> ... The sequential sweep follows one of them
  exactly: after k sweeps from zeros, layer l (1-based) holds u_l(C (k - 1) + l) of the
  synchronous trajectory, the output layer u_out(C k). One sweep costs one synchronous step
  (each layer is computed once) and advances the chain by C steps, so T synchronous steps
  cost ceil(T / C) sweeps (a third for the network of Fig. 4e; common.steps_of). The
  fixed points are the same. With beta != 0 the nudge couples the output layer to its own
  previous value, which here is that of the previous sweep (C synchronous steps back instead
  of one); the nudged fixed point is unchanged.
  """
  return [[l] for l in range(num_layers)]


def needs_two_hidden_layers(config):
  """With one hidden layer, the feedback out -> 1 would be the reciprocal of 1 -> out."""
  if len(config.hidden_sizes) < 2:
    raise ConfigError('hidden_sizes needs >= 2 layers: with one, the feedback out -> 1 would be '
                      f'the reciprocal of 1 -> out (got {config.hidden_sizes})')


# No weight angle: no weight here has a transposed partner (the metrics record null).
mlp.NETWORKS['feedback'] = common.Network(init_params, layer_drive, around_the_cycle,
                                          weight_angles=None, check_config=needs_two_hidden_layers)


def train_and_evaluate(config, workdir=None):
  """fmnist_mlp's main loop on this network; returns the list of per-epoch metrics."""
  return mlp.train_and_evaluate(config, workdir, SCRIPT)


if __name__ == '__main__':
  harness.run_main(SCRIPT, train_and_evaluate, 'configs/fmnist_feedback.py')

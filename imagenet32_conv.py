r"""Generalized holomorphic EP on the recurrent convnet, ImageNet 32x32 (Laborieux & Zenke, ICLR 2024).

Paper: Table 2 (ImageNet 32x32 column), App. D.2-D.4. The network, dynamics and estimators of
cifar_conv.py with 1000 classes, read from a data set that is not held in memory, and
spread over several processes (machines) with JAX's own multi-process runtime.

    python imagenet32_conv.py --config=configs/imagenet32.py
    # two machines, one process each (run on both; process_id 0 and 1):
    python imagenet32_conv.py --config=configs/imagenet32.py \
        --config.coordinator_address=host0:12345 --config.num_processes=2 --config.process_id=0
    # under Slurm (srun, one task per node or per GPU), no flags: jax.distributed finds them.

The script reads top to bottom like cifar_conv.py: data, network, gradient estimators, train
step, diagnostics, processes and checkpointing, main loop. The shared math (fixed point,
Cauchy estimate, RBP, homeostatic loss) lives in common.py.

Several processes: each drives its local devices and reads only its share of every batch;
the train step's gradient all-reduce (and its metrics) span every device of every process;
process 0 alone writes the workdir (config, metrics, checkpoint); at start it reads the
checkpoint and broadcasts it, so every process resumes from it (the workdir need not be
shared). If a process dies, the others stop with an error (they do not wait forever):
restart all of them with the same flags and they resume after the last checkpoint.

Sign convention (the authors' code; see the README): the nudge ADDS beta * dL/ds_out to the
output layer's drive, where L is the softmax cross-entropy of the readout. Then
(dG/dtheta)^T d_beta s* is the gradient of L itself, descended like any other gradient.
(App. D.2 writes the nudge as +beta w_ro^T (y - softmax), the opposite sign.)
"""
import collections
import concurrent.futures
import hashlib
import importlib.util
import json
import math
import os
import queue
import sys
import threading
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from ml_collections import config_flags
import numpy as np
import optax

import common

ALGORITHMS = ('hep', 'hep_exact', 'hep_continuous', 'rbp', 'bptt')
LAYER_UPDATES = ('synchronous', 'sequential')
FREE_DTYPES = ('auto', 'float32', 'bfloat16', 'float16')
SCRIPT = os.path.basename(__file__)


class ConfigError(ValueError):
  """Bad input, reported as one line before any compute is spent."""


# ======================================================================================
# Data
# ======================================================================================
# ImageNet 32x32 (TFDS imagenet_resized/32x32: 1,281,167 training and 50,000 validation
# images, 1000 classes) is 3.9 GB of pixels: it is never loaded whole. Each process opens the
# prepared split as a TFDS data source (random access to ArrayRecord files, each example
# decoded on read) and reads only the examples of its own share of every batch, a few
# batches ahead, on background threads (epoch_batches + prefetch). Every batch is augmented
# and normalised on the device inside the jitted step (augment, then normalize).
#
# Sharding across processes (multi-host runs): every process draws the same permutation of
# the whole split for each epoch (seeded by (seed, epoch)); global batch i is its i-th block
# of batch_size indices, and process p reads the p-th of the block's process_count equal
# slices (process_batch_indices). The shares of one epoch are disjoint, and the global batch
# is the one a single process would train on: the result does not depend on how many
# processes share the run. (This plays the role of tfds.split_for_jax_process, with a fresh
# split every epoch.) The validation split is cut into process_count contiguous blocks.
#
# Normalisation (the authors' convention): per-channel mean, and std multiplied by 1.5.

DATASETS = {
    'imagenet32': dict(tfds_name='imagenet_resized/32x32', test_split='validation',
                       num_classes=1000, mean=(0.485, 0.456, 0.406),
                       std=tuple(1.5 * s for s in (0.229, 0.224, 0.225)),
                       train_size=1281167, test_size=50000),
}
TFDS_URLS = {  # what TFDS downloads to prepare each data set (checked before it tries)
    'imagenet32': 'http://www.image-net.org/data/downsample/Imagenet32_val_npz.zip',
}
CROP_PAD = 2  # pad 32 x 32 to 36 x 36, then take a random 32 x 32 window


def url_reachable(url, timeout_s=3.0):
  """Whether an HTTP HEAD of `url` succeeds (status < 400) within timeout_s in total.

  Goes through requests, so HTTP(S)_PROXY settings apply as they do for TFDS's download.
  Runs in a daemon thread, because the name lookup has no timeout of its own.
  """
  import requests  # pylint: disable=g-import-not-at-top  (a TFDS dependency)
  reached = threading.Event()

  def head():
    try:
      if requests.head(url, timeout=timeout_s, allow_redirects=True).status_code < 400:
        reached.set()
    except requests.RequestException:
      pass

  thread = threading.Thread(target=head, daemon=True)
  thread.start()
  thread.join(timeout_s)
  return reached.is_set()


def _tensorflow_installed():
  return importlib.util.find_spec('tensorflow') is not None


def preparation_problem(name, data_dir):
  """Why TFDS cannot prepare `name` here (one line), or None; answers within seconds.

  Without these checks TFDS retries an unreachable download for minutes, and TensorFlow,
  which TFDS needs to prepare the data (not to read it), would only be found missing after
  a 3.7 GB download.
  """
  hint = (f'or set --config.tfds_data_dir to a folder holding {name} prepared by TFDS '
          '(array_record format)')
  if not _tensorflow_installed():
    return (f'{name} is not prepared in {data_dir}; preparing it needs TensorFlow and '
            f'internet: pip install tensorflow-cpu and rerun with internet, {hint}')
  if not url_reachable(TFDS_URLS['imagenet32']):
    return (f'{name} is not prepared in {data_dir} and {TFDS_URLS["imagenet32"]} cannot be '
            f'reached to download it (no internet?): rerun with internet, {hint}')
  return None


class Split:
  """Random access to the first `size` examples of a TFDS data source.

  read(indices) -> (uint8 images (n, 32, 32, 3), int32 labels (n,)), decoded on read, one
  example at a time (epoch_batches runs several reads in parallel).
  """

  def __init__(self, source, size):
    self.source, self.size = source, size

  def __len__(self):
    return self.size

  def read(self, indices):
    examples = [self.source[int(i)] for i in indices]
    return (np.stack([np.asarray(e['image'], np.uint8) for e in examples]),
            np.asarray([e['label'] for e in examples], np.int32))


def prepare_tfds(config, process_index):
  """Downloads and prepares the data set (ArrayRecord) if needed, in process 0 only; returns
  the TFDS builder. The other processes wait for it (sync_processes), then open the data."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = DATASETS[config.dataset]['tfds_name']
  # No file_format here: TFDS refuses one that differs from already prepared data's.
  builder = tfds.builder(name, data_dir=config.tfds_data_dir or None)
  if process_index == 0 and not builder.is_prepared():
    problem = preparation_problem(name, builder.data_dir)
    if problem:
      raise ConfigError(problem)
    try:
      builder.download_and_prepare(
          file_format='array_record',
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f'preparing {name} in {builder.data_dir} failed '
                        f'[{type(e).__name__}: {str(e).splitlines()[0]}]') from e
  return builder


def load_data(config, builder):
  """{'train': Split, 'test': Split} over the prepared data (test = the validation split).

  config.train_size / test_size > 0 keep the first n examples of the split.
  """
  info = DATASETS[config.dataset]
  out = {}
  for split, tfds_split in (('train', 'train'), ('test', info['test_split'])):
    try:
      source = builder.as_data_source(split=tfds_split)
    except NotImplementedError as e:
      if not builder.is_prepared():  # a process > 0 on a machine without the files
        raise ConfigError(f'{info["tfds_name"]} is not prepared in {builder.data_dir} on '
                          'this machine: put tfds_data_dir on a folder every process can '
                          'read, or prepare the data there first (a one-process run '
                          'prepares it)') from e
      raise ConfigError(f'{info["tfds_name"]} in {builder.data_dir} is in tfrecord format, '
                        'which has no random access: prepare it again (array_record) in '
                        'another tfds_data_dir') from e
    size, available = config[f'{split}_size'], len(source)
    if size > available:
      raise ConfigError(f'{split}_size={size} but only {available} {split} images were found')
    out[split] = Split(source, size or available)
  return out


def process_batch_indices(num_examples, batch_size, seed, epoch, process_index, process_count):
  """(steps, batch_size // process_count) indices: this process's share of every global
  batch of one epoch (the last partial batch dropped). See the comment at the top of Data."""
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  steps = num_examples // batch_size
  blocks = order[:steps * batch_size].reshape(steps, process_count, -1)
  return blocks[:, process_index]


def process_eval_indices(num_examples, batch_size, process_index, process_count):
  """[(indices, mask)] of this process's contiguous block of the split, in calls of
  batch_size // process_count examples; every process makes the same number of calls, the
  last ones padded (index 0, mask 0)."""
  per_process = -(-num_examples // process_count)
  per_call = batch_size // process_count
  start = process_index * per_process
  block = np.arange(start, min(num_examples, start + per_process))
  calls = []
  for i in range(-(-per_process // per_call)):
    idx = block[i * per_call:(i + 1) * per_call]
    mask = np.concatenate([np.ones(len(idx), np.float32),
                           np.zeros(per_call - len(idx), np.float32)])
    calls.append((np.pad(idx, (0, per_call - len(idx))), mask))
  return calls


def augment(key, images, sample_ids):
  """Random horizontal flip and random 32 x 32 crop of the image zero-padded to 36 x 36.

  images: (B, H, W, C) uint8 or float, BEFORE normalize. The padding is zeros of the raw
  image (black pixels), so after normalisation the border is -mean / std, not 0. The
  authors' facts only say "pad to 36 x 36, then random 32 x 32 crop"; this is the
  torchvision convention (RandomCrop(32, padding=2) pads the image with 0 before Normalize).
  Each image's randomness is jax.random.fold_in(key, its sample id): pass global ids
  (e.g. step * batch_size + position in the global batch) and a batch split over devices
  and processes is augmented exactly as on one device. For use inside jit; dtype is kept.
  """
  height, width = images.shape[1:3]

  def one(image, sample_id):
    flip_key, crop_key = jax.random.split(jax.random.fold_in(key, sample_id))
    image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
    dy, dx = jax.random.randint(crop_key, (2,), 0, 2 * CROP_PAD + 1)
    padded = jnp.pad(image, ((CROP_PAD, CROP_PAD), (CROP_PAD, CROP_PAD), (0, 0)))
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), (height, width, image.shape[2]))

  return jax.vmap(one)(images, sample_ids)


def normalize(images, dataset):
  """(x / 255 - mean) / std per channel, float32; x uint8 (or float in 0..255)."""
  info = DATASETS[dataset]
  mean = jnp.asarray(info['mean'], jnp.float32)
  std = jnp.asarray(info['std'], jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def epoch_batches(split, index_batches, threads):
  """split.read of each index array in turn, decoded on `threads` threads, at most
  2 * threads reads ahead of the consumer (the decoding releases the GIL)."""
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    pending = collections.deque()
    for idx in index_batches:
      pending.append(pool.submit(split.read, idx))
      if len(pending) > 2 * threads:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


_END = object()


class _Raised:

  def __init__(self, error):
    self.error = error


def prefetch(iterator, put=jax.device_put, size=2):
  """Yields put(item) for the items of `iterator`, computed `size` items ahead in a thread.

  `put` moves a batch to the device(s), e.g. jax.device_put, or a function that reshapes
  to (devices, per_device, ...) and calls jax.device_put_sharded; the host gathers and
  copies the next batches while the device runs the current step. Exceptions of the
  iterator or of `put` are raised here; leaving the loop early stops the thread.
  """
  items = queue.Queue(maxsize=size)
  stop = threading.Event()

  def offer(item):
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for item in iterator:
        if not offer(put(item)):
          return
      offer(_END)
    except BaseException as e:  # pylint: disable=broad-except
      offer(_Raised(e))

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = items.get()
      if item is _END:
        return
      if isinstance(item, _Raised):
        raise item.error
      yield item
  finally:
    stop.set()
    thread.join()


# ======================================================================================
# Network (App. D.2, convolutional)
# ======================================================================================
# State: a tuple (u_1, ..., u_L) of NHWC arrays (batch, H_l, W_l, C_l). Layer l convolves the
# activated layer below (the image for l = 1) with a 3x3 kernel, stride 1, 'SAME' padding
# ('VALID' for the last layer), then softmax-pools 2x2 with stride 2. For 32x32x3 images and
# channels (128, 256, 512, 512): (16,16,128), (8,8,256), (4,4,512), (1,1,512).
#
# Parameters: {'forward': [{'w', 'b'}] * L, 'backward': [{'w'}] * (L - 1), 'readout': {'w', 'b'}}
# forward[l]['w'] (3, 3, C_{l-1}, C_l) maps layer l-1 to layer l; backward[l]['w'] has the shape
# of forward[l+1]['w'] and carries layer l+1 back to layer l through the "backward module"
#     top-down_l(s) = d/ds_l [ s_{l+1} . P(conv(s_l, backward[l]['w'])) ],
# a VJP of the pooled convolution (no bias). config.tied = True: 'backward' is an empty list and
# the forward kernels are used in both directions, so that G(s) = grad_s Phi(s) with
#     Phi(s) = sum_l s_l . (P(conv(s_{l-1}, w_l)) + b_l),   s_0 = x,
# an energy-based model whose K = dG/ds (the Hessian of Phi) is symmetric. The readout
# (C_L -> num_classes) is not part of the dynamics.
#
# Indices in the code are 0-based: layer l of the paper is index l - 1.

def state_shapes(config):
  """((H, W, C) of every layer), derived from image_size and channels; ConfigError if the
  image size does not halve cleanly through the poolings (or the last VALID conv)."""
  channels = tuple(config.channels)
  if not channels or min(channels) < 1:
    raise ConfigError(f'channels must be positive channel counts, got {channels}')
  size, shapes = config.image_size, []
  for l, c in enumerate(channels):
    conv_size = size if l < len(channels) - 1 else size - 2  # 3x3 'VALID' on the last layer
    if conv_size < 2 or conv_size % 2:
      raise ConfigError(
          f'image_size={config.image_size} does not fit {len(channels)} layers: layer {l + 1} '
          f'would pool a {conv_size}x{conv_size} map (needs an even size >= 2; each layer '
          'halves the size, the last one after a 3x3 VALID conv)')
    size = conv_size // 2
    shapes.append((size, size, c))
  return tuple(shapes)


def paddings(num_layers):
  return tuple('VALID' if l == num_layers - 1 else 'SAME' for l in range(num_layers))


def sigma(u):
  """(u/2) sigmoid(u) + (1 - u/2) sigmoid(u - 2) (App. D.2); holomorphic, takes complex u."""
  return 0.5 * u * jax.nn.sigmoid(u) + (1.0 - 0.5 * u) * jax.nn.sigmoid(u - 2.0)


def activate(u):
  return tuple(sigma(x) for x in u)


def softmax_pool(x):
  """Softmax pooling [78], 2x2 windows, stride 2 (NHWC): y = sum_i softmax(x)_i x_i per window.

  The window max of the real part is subtracted inside the exponential (a constant per window
  that cancels in the ratio; no gradient flows through it), so large inputs do not overflow.
  Written by hand (no jax.nn.softmax), it is holomorphic and runs on complex input.
  """
  b, h, w, c = x.shape
  x = x.reshape(b, h // 2, 2, w // 2, 2, c)
  shift = jax.lax.stop_gradient(jnp.max(x.real, axis=(2, 4), keepdims=True))
  e = jnp.exp(x - shift)
  return jnp.sum(e * x, axis=(2, 4)) / jnp.sum(e, axis=(2, 4))


def _conv(s, w, padding):
  w = w.astype(s.dtype)
  if padding == 'VALID':
    # The last layer maps a 4x4 map to 2x2. XLA:CPU computes the input gradient of such a
    # small VALID convolution (a 'full' convolution of the 2x2 map, needed by the backward
    # module every step) about 100x slower than the forward pass (370 ms against 4 ms at
    # batch 16, 512 channels). Written as an explicit patch matrix times the kernel, the
    # forward pass and both gradients are plain matrix products.
    kh, kw = w.shape[:2]
    h, wd = s.shape[1] - kh + 1, s.shape[2] - kw + 1
    patches = jnp.concatenate([s[:, a:a + h, b:b + wd] for a in range(kh) for b in range(kw)],
                              axis=-1)  # (batch, h, wd, kh * kw * C_in), HWIO order
    return patches @ w.reshape(-1, w.shape[-1])
  return jax.lax.conv_general_dilated(s, w, (1, 1), padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def conv(s, w, padding):
  """3x3 convolution, stride 1, NHWC/HWIO, of a real or complex state with real kernels
  (complex: two real convolutions, like fmnist_mlp.dot)."""
  if jnp.iscomplexobj(s):
    return jax.lax.complex(_conv(s.real, w, padding), _conv(s.imag, w, padding))
  return _conv(s, w, padding)


def init_params(key, config):
  """LeCun-normal kernels, zero biases; backward kernels rotated to angle alpha (degrees):
  w_b <- sin(alpha) w_b + cos(alpha) w_f (alpha = 0: a symmetric start). tied: no backward
  kernels, the forward ones are used both ways."""
  shapes = state_shapes(config)
  sizes = (config.in_channels, *(s[-1] for s in shapes))
  init = jax.nn.initializers.lecun_normal()  # truncated normal, variance 1 / fan_in
  keys = iter(jax.random.split(key, 2 * len(sizes) + 1))
  forward = [{'w': init(next(keys), (3, 3, c_in, c_out)), 'b': jnp.zeros(c_out)}
             for c_in, c_out in zip(sizes[:-1], sizes[1:])]
  backward = []
  if not config.tied:
    alpha = np.deg2rad(config.alpha)
    backward = [{'w': np.sin(alpha) * init(next(keys), forward[l + 1]['w'].shape)
                      + np.cos(alpha) * forward[l + 1]['w']}
                for l in range(len(forward) - 1)]
  readout = {'w': init(next(keys), (sizes[-1], config.num_classes)),
             'b': jnp.zeros(config.num_classes)}
  return {'forward': forward, 'backward': backward, 'readout': readout}


def backward_kernel(params, l):
  """The kernel of the backward module from layer l+1 to layer l (tied: the forward one)."""
  if params['backward']:
    return params['backward'][l]['w']
  return params['forward'][l + 1]['w']


def input_drive(params, x):
  """P(conv(x, w_1)) + b_1 (the image itself, no sigma): constant during a relaxation."""
  num_layers = len(params['forward'])
  fw = params['forward'][0]
  return softmax_pool(conv(x, fw['w'], paddings(num_layers)[0])) + fw['b']


def top_down(s_l, s_up, w_b, padding):
  """The backward module d/ds_l [s_up . P(conv(s_l, w_b))]: a VJP at s_l applied to s_up.

  For complex states this is the transpose (not the adjoint) of the holomorphic Jacobian, as
  the analytic continuation of the real dynamics requires; jax.vjp of a holomorphic function
  does not conjugate (tested).
  """
  _, vjp = jax.vjp(lambda z: softmax_pool(conv(z, w_b, padding)), s_l)
  return vjp(s_up)[0]


def layer_drive(params, s, x_drive, l):
  """G_l(s): the new u of layer l (0-based) from the activated state s, no nudge (App. D.2).

  P(conv(s_{l-1}, w_f_l)) + b_l (x_drive for the first layer) plus, below the top layer, the
  backward module applied to the activated upper state s_{l+1} (the authors' convention; the
  paper writes u_{l+1})."""
  fw = params['forward']
  pads = paddings(len(fw))
  g = x_drive if l == 0 else softmax_pool(conv(s[l - 1], fw[l]['w'], pads[l])) + fw[l]['b']
  if l + 1 < len(s):
    g = g + top_down(s[l], s[l + 1], backward_kernel(params, l), pads[l + 1])
  return g


def drives(params, s, x_drive):
  """G(s) for all layers: u <- G(sigma(u)) is the free synchronous step of App. D.2."""
  return tuple(layer_drive(params, s, x_drive, l) for l in range(len(s)))


def dot(s, w):
  """s @ w for a real or complex s and real weights (complex: two real matmuls)."""
  if jnp.iscomplexobj(s):
    w = w.astype(s.real.dtype)
    return jax.lax.complex(s.real @ w, s.imag @ w)
  return s @ w.astype(s.dtype)


def readout_logits(params, s_out):
  """Readout of the flattened top state (batch, 1, 1, C_L) -> (batch, num_classes)."""
  return dot(s_out.reshape(s_out.shape[0], -1), params['readout']['w']) + params['readout']['b']


def readout_loss(params, s_out, labels):
  """(mean softmax cross-entropy, {'accuracy': top-1, 'top5_accuracy': top-5}).

  The second output is a dict of metrics; 'top5_accuracy' is there when num_classes > 5.
  """
  logits = readout_logits(params, s_out)
  num_classes = logits.shape[-1]
  loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, num_classes)).mean()
  metrics = {'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels)}
  if num_classes > 5:
    # The label is in the top 5 when fewer than 5 logits beat it (ties count for it).
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    metrics['top5_accuracy'] = jnp.mean(jnp.sum(logits > label_logit, axis=-1) < 5)
  return loss, metrics


def softmax(z):
  """Softmax over the last axis, written by hand so that it is holomorphic (complex z)."""
  e = jnp.exp(z - jax.lax.stop_gradient(jnp.max(z.real, axis=-1, keepdims=True)))
  return e / jnp.sum(e, axis=-1, keepdims=True)


def loss_grad_s(params, s_out, labels):
  """g = dL/ds_out per sample, shape of s_out, L the softmax cross-entropy (holomorphic)."""
  logits = readout_logits(params, s_out)
  err = softmax(logits) - jax.nn.one_hot(labels, logits.shape[-1])
  return dot(err, params['readout']['w'].T).reshape(s_out.shape)


def make_step(config, params, x_drive, labels=None):
  """step(u, beta) -> next state of u <- G(sigma(u)) + beta dL/ds_out (beta = None: free).

  Definition 1 holds with dF/dbeta = dL/ds. config.layer_updates picks the update order:

  * 'synchronous': every layer at once from the previous state, exactly App. D.2.
  * 'sequential': layers 1, 3, 5, ... (0-based indices 0, 2, ...) from the previous state,
    then layers 2, 4, ... from the fresh odd layers (red-black Gauss-Seidel). The same fixed
    points, and each layer is updated once per step, so a step costs what a synchronous step
    costs. Unlike in the MLP, the two orders do NOT follow the same trajectory: the top-down
    drive into layer l depends on s_l itself (through the pooling), so the synchronous
    dynamics do not split into two independent chains. See steps_for for how many steps are
    run for T synchronous ones. With beta != 0 the output layer's nudge uses its value from
    the previous half-sweep.
  """
  num_layers = len(params['forward'])

  def new_u(s, l, beta):
    g = layer_drive(params, s, x_drive, l)
    if l == num_layers - 1 and beta is not None:
      g = g + beta * loss_grad_s(params, s[-1], labels)
    return g

  def synchronous(u, beta=None):
    s = activate(u)
    return tuple(new_u(s, l, beta) for l in range(num_layers))

  def sequential(u, beta=None):
    u, s = list(u), list(activate(u))
    for first in (0, 1):
      for l in range(first, num_layers, 2):
        u[l] = new_u(s, l, beta)
      for l in range(first, num_layers, 2):
        s[l] = sigma(u[l])
    return tuple(u)

  return synchronous if config.layer_updates == 'synchronous' else sequential


def steps_for(config, num_synchronous_steps):
  """Steps of make_step's update that stand for `num_synchronous_steps` synchronous steps
  (T_free, T_nudge and the continuous-time holds count synchronous steps, the paper's unit).

  Both orders run the same number of steps (a sequential step costs a synchronous one).
  Measured (tools/conv_update_order.py): at the paper's shapes with LeCun kernels the dynamics
  contract fast and the sequential order needs about half the steps (float32 floor of ||F||
  after ~12 steps against ~20; d_beta s* with T_nudge 10 as accurate as synchronous 20); but
  with kernels x1.5 (slower, as after training) it gains only ~20 % (log10 ||F|| -2.19 after
  125 sequential steps against -2.93 after 250 synchronous ones; d_beta s* rel. error 5.2e-2
  with 20 sequential steps against 3.7e-2 with 40 synchronous), and on a tiny net near the
  edge of stability (spectral radius of DK 0.98) both orders converge at the same rate. So
  T/2 sequential steps do not stand for T synchronous ones, and no steps are saved.
  """
  del config
  return num_synchronous_steps


def zeros_state(config, batch, dtype=None):
  """The all-zeros state (dtype None: JAX's default float)."""
  return tuple(jnp.zeros((batch, *shape), dtype) for shape in state_shapes(config))


def resolve_free_dtype(config):
  """The dtype of the free relaxation: 'auto' = bfloat16 on GPU, float32 elsewhere.

  Returns None for full precision ('float32', or 'auto' off GPU): the free phase then runs in
  the dtype of the parameters (float32 in training, float64 in the tests) with no cast.
  """
  name = config.free_dtype
  if name not in FREE_DTYPES:
    raise ConfigError(f'unknown free_dtype {name!r} (use one of {", ".join(FREE_DTYPES)})')
  if name == 'auto':
    name = 'bfloat16' if jax.default_backend() == 'gpu' else 'float32'
  return None if name == 'float32' else jnp.dtype(name)


# ======================================================================================
# Neuronal error vectors and gradients (Eqs. 4-9)
# ======================================================================================

def free_relaxation(config, params, x_drive):
  """The free phase: T_free steps from zeros. Returns (u_free, log10 of the last update).

  With a half-precision free_dtype (App. D.4: "the free phase ... in half precision"), the
  parameters and the input drive are cast once, every step runs in that dtype, and the state
  is carried between steps in the input's dtype (exact: it holds half-precision values), so
  the residual and the returned state are full precision. Nudged phases and the estimators
  always run in full precision.
  """
  half = resolve_free_dtype(config)
  if half is None:
    step = make_step(config, params, x_drive)
  else:
    full = x_drive.dtype
    cast = lambda tree, dt: jax.tree_util.tree_map(lambda a: a.astype(dt), tree)
    step_half = make_step(config, cast(params, half), x_drive.astype(half))
    step = lambda u: cast(step_half(cast(u, half)), full)
  u0 = zeros_state(config, x_drive.shape[0], x_drive.dtype)
  return common.fixed_point(step, u0, steps_for(config, config.t_free), config.tol)


def nudged_relaxation(config, params, x_drive, labels, u_free):
  """beta -> s*(beta): T_nudge steps from the free fixed point (complex beta: complex state)."""
  step = make_step(config, params, x_drive, labels)

  def relax(beta):
    u0 = jax.tree_util.tree_map(lambda x: x.astype(jnp.result_type(x, beta)), u_free)
    u, _ = common.fixed_point(lambda u: step(u, beta), u0, steps_for(config, config.t_nudge))
    return activate(u)
  return relax


def continuous_estimate(config, params, x_drive, labels):
  """(s_bar, e_bar) of continuous-time hEP (Eqs. 8-9): no free phase, starts from zeros.

  config.continuous_average picks the discretisation: 'hold_end' (the authors' Table 1
  runs: the state at the end of each hold of beta, averaged in u, s_bar = sigma(u_bar)) or
  'every_step' (Eq. 8 literally: every step's s averaged from t = 0). The parameter gradient
  is then taken at s_bar (G is not affine in s here because of the pooling, so this is the
  first-order approximation of Eq. 9's time average, exact as the estimate converges).
  """
  step = make_step(config, params, x_drive, labels)
  u0 = zeros_state(config, x_drive.shape[0], x_drive.dtype)
  args = (activate, config.beta, config.n_points,
          steps_for(config, config.continuous_steps_per_point), config.continuous_periods)
  if config.continuous_average == 'hold_end':
    u_bar, e_bar = common.hold_end_estimate(step, u0, *args)
    return activate(u_bar), e_bar
  return common.continuous_time_estimate(step, u0, *args)


def rbp_error(config, params, x_drive, labels, u_free):
  """RBP's delta (Eq. 4) from the adjoint dynamics, with dL/du = D g on the output layer.

  delta is defined through J_F of the synchronous step u <- G(sigma(u)), so that is the
  step whose VJP is iterated (T_nudge times, as in the authors' code).
  """
  s_free = activate(u_free)
  dl_ds = (*(jnp.zeros_like(s) for s in s_free[:-1]),
           loss_grad_s(params, s_free[-1], labels))
  dl_du = jax.vjp(activate, u_free)[1](dl_ds)[0]
  step = lambda u: drives(params, activate(u), x_drive)
  return common.rbp_delta(step, u_free, dl_du, config.t_nudge)


def network_grads(params, x, s_free, error):
  """(dG/dtheta)^T e at the free fixed point, averaged over the batch (Eqs. 4 and 6); the
  input convolution enters through input_drive.

  Returns (grads, number of samples dropped): a sample whose error vector is not finite
  contributes nothing (common.drop_non_finite_samples).
  """
  error, dropped = common.drop_non_finite_samples(error)
  _, vjp = jax.vjp(lambda p: drives(p, s_free, input_drive(p, x)), params)
  return jax.tree_util.tree_map(lambda g: g / x.shape[0], vjp(error)[0]), dropped


def bptt_grads(config, params, x, labels, u_free):
  """The authors' "RBP/BP" baseline: autodiff through T_nudge steps from the free fixed point."""
  u_start = jax.lax.stop_gradient(u_free)

  def loss(p):
    p = {**p, 'readout': jax.lax.stop_gradient(p['readout'])}
    step = make_step(config, p, input_drive(p, x))
    u, _ = common.fixed_point(step, u_start, steps_for(config, config.t_nudge))
    return readout_loss(p, sigma(u[-1]), labels)[0]
  return jax.grad(loss)(params)


def homeostatic_noise(config, key, sample_ids):
  """e ~ N(0, I), (draws, batch, H, W, C) per layer, drawn per sample so device splits agree."""
  shapes = state_shapes(config)
  sizes = [math.prod(s) for s in shapes]
  draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), (config.homeo_draws, sum(sizes)))
  noise = jnp.swapaxes(jax.vmap(draw)(sample_ids), 0, 1)  # (draws, batch, n)
  parts = jnp.split(noise, np.cumsum(sizes)[:-1], axis=-1)
  return tuple(p.reshape(*p.shape[:2], *shape) for p, shape in zip(parts, shapes))


def homeostatic_grads(config, params, x, s_free, noise):
  """Gradient of lambda * L_homeo (Eq. 12), J = dF/ds at the free fixed point held fixed.
  Returns (L_homeo, gradient)."""
  s_fixed = jax.lax.stop_gradient(s_free)
  noise = jax.tree_util.tree_map(lambda e, s: e.astype(s.dtype), noise, s_fixed)
  loss = lambda p: common.homeostatic_loss(
      lambda s: drives(p, s, input_drive(p, x)), s_fixed, noise)
  value, grads = jax.value_and_grad(loss)(params)
  return value, jax.tree_util.tree_map(lambda g: config.homeo_coef * g, grads)


def compute_grads(config, params, x, labels, key, sample_ids):
  """All gradients of one batch, read top to bottom.

  1. The network's gradient by the configured algorithm. Every algorithm but continuous-time
     hEP first relaxes freely to s*_0; the hEP variants and RBP then plug their neuronal
     error vector e into the same parameter VJP, (dG/dtheta)^T e; BPTT differentiates the
     unrolled dynamics instead.
  2. The readout's own gradient at the free state (it is not part of the dynamics).
  3. The homeostatic gradient (Eq. 12), if homeo_coef > 0.
  Metrics: loss, accuracy (and top5_accuracy for > 5 classes), log10_residual of the free
  phase, dropped_samples, homeo_loss.
  """
  x_drive = input_drive(params, x)
  metrics = {}
  if config.algorithm == 'hep_continuous':
    # Eqs. 8-9: no free phase; the time average s_bar stands for the free fixed point.
    s_free, error = continuous_estimate(config, params, x_drive, labels)
    grads, metrics['dropped_samples'] = network_grads(params, x, s_free, error)
  else:
    u_free, metrics['log10_residual'] = free_relaxation(config, params, x_drive)
    s_free = activate(u_free)
    relax = nudged_relaxation(config, params, x_drive, labels, u_free)  # beta -> s*(beta)
    if config.algorithm == 'hep':  # Eq. 7: N-point Cauchy estimate of d_beta s*
      error = common.cauchy_estimate(relax, s_free, config.beta, config.n_points)
      grads, metrics['dropped_samples'] = network_grads(params, x, s_free, error)
    elif config.algorithm == 'hep_exact':  # Table 1's "true d_beta u*" (forward mode)
      grads, metrics['dropped_samples'] = network_grads(params, x, s_free,
                                                        common.exact_dbeta(relax))
    elif config.algorithm == 'rbp':  # Eq. 4: the adjoint fixed point delta
      error = rbp_error(config, params, x_drive, labels, u_free)
      grads, metrics['dropped_samples'] = network_grads(params, x, s_free, error)
    else:  # 'bptt': backpropagation through T_nudge steps from the free fixed point
      grads = bptt_grads(config, params, x, labels, u_free)

  (loss, readout_metrics), readout_grads = jax.value_and_grad(
      lambda p: readout_loss(p, s_free[-1], labels), has_aux=True)(params)
  grads = jax.tree_util.tree_map(jnp.add, grads, readout_grads)
  metrics.update(loss=loss, **readout_metrics)
  if config.homeo_coef > 0:
    noise = homeostatic_noise(config, key, sample_ids)
    metrics['homeo_loss'], homeo = homeostatic_grads(config, params, x, s_free, noise)
    grads = jax.tree_util.tree_map(jnp.add, grads, homeo)
  return grads, metrics


# ======================================================================================
# Training and evaluation steps (jax.pmap over the devices of every process)
# ======================================================================================

# Parameters: {'forward': [{'w', 'b'}] * L, 'backward': [{'w'}] * (L - 1) (absent or empty
# when tied), 'readout': {'w', 'b'}}. forward[l] connects layer l-1 (the input for l = 0)
# to layer l; backward[l] connects layer l+1 back to layer l. A connection's forward and
# backward weights form one group with one learning-rate factor:
#   in-1: forward[0];  l-(l+1): forward[l], backward[l-1];  readout.

def group_names(num_layers):
  """['in-1', '1-2', ..., '(L-1)-out', 'readout'], in the order of config.lr_factors."""
  node = lambda i: 'in' if i == 0 else 'out' if i == num_layers else str(i)
  return [f'{node(l)}-{node(l + 1)}' for l in range(num_layers)] + ['readout']


def layer_groups(params):
  """A tree like params whose leaves are the group names of group_names(L)."""
  unknown = set(params) - {'forward', 'backward', 'readout'}
  if unknown:
    raise ValueError(f'parameters outside the known groups: {sorted(unknown)}')
  names = group_names(len(params['forward']))
  label = lambda tree, name: jax.tree_util.tree_map(lambda _: name, tree)
  labels = {'forward': [label(p, names[l]) for l, p in enumerate(params['forward'])],
            'readout': label(params['readout'], 'readout')}
  if 'backward' in params:
    if len(params['backward']) >= len(params['forward']):
      raise ValueError(f'{len(params["backward"])} backward entries for '
                       f'{len(params["forward"])} forward layers')
    labels['backward'] = [label(p, names[l + 1]) for l, p in enumerate(params['backward'])]
  return labels


def make_optimizer(config, steps_total):
  """SGD (or Adam) with coupled weight decay, per-group learning rates and cosine decay.

  Per update, for every parameter p of group g (layer_groups), as optax transformations:
    1. g += weight_decay * wd_factor_g * p: coupled L2 added to the gradient BEFORE the
       momentum, on every parameter, biases included (torch SGD's weight_decay);
       wd_factor_g is config.readout_wd_factor for the readout and 1 elsewhere.
    2. 'sgd': momentum buffer m = momentum * m + g (torch SGD, no dampening);
       'adam': Adam's scaling (the decay above is then Adam's coupled L2, as in torch Adam).
    3. times lr_factors_g (the authors' per-layer multipliers; kept for Adam as well)
       and times -learning_rate * cosine(step): optax.cosine_decay_schedule from
       learning_rate to zero over steps_total updates (0 at step steps_total).
  resolve_config checks that lr_factors has L + 1 entries for the network's L layers.
  """
  names = group_names(len(config.lr_factors) - 1)
  lr_factors = dict(zip(names, config.lr_factors))
  wd_factors = {name: config.readout_wd_factor if name == 'readout' else 1.0
                for name in names}

  per_group = lambda make: optax.partition({n: make(n) for n in names}, layer_groups)
  if config.optimizer == 'sgd':
    scale = optax.trace(decay=config.momentum) if config.momentum else optax.identity()
  else:
    scale = optax.scale_by_adam()
  return optax.chain(
      per_group(lambda n: optax.add_decayed_weights(config.weight_decay * wd_factors[n])),
      scale,
      per_group(lambda n: optax.scale(lr_factors[n])),
      optax.scale_by_learning_rate(optax.cosine_decay_schedule(
          config.learning_rate, decay_steps=steps_total)),
  )


def reduce_metrics(metrics):
  """The step's metrics over every device of every process (so that each process logs and
  stops on the same numbers): sums for counts, the worst residual, means otherwise."""
  reduce = {'dropped_samples': jax.lax.psum, 'log10_residual': jax.lax.pmax}
  return {k: reduce.get(k, jax.lax.pmean)(v, 'batch') for k, v in metrics.items()}


def make_train_step(config, optimizer):
  """One update. Each device takes its slice of the global batch, augments and normalises
  it (the randomness of every image follows its global index, so a split batch is augmented
  as a whole one would be); gradients are averaged over all devices of all processes
  (pmean), and so are the metrics (reduce_metrics)."""
  base_key = jax.random.PRNGKey(config.seed + 1)

  def train_step(params, opt_state, step, images, labels):
    local = images.shape[0]
    sample_ids = step * config.batch_size + jax.lax.axis_index('batch') * local + jnp.arange(local)
    key = jax.random.fold_in(base_key, step)
    if config.augment:
      images = augment(jax.random.fold_in(key, 1), images, sample_ids)
    x = normalize(images, config.dataset)
    grads, metrics = compute_grads(config, params, x, labels, jax.random.fold_in(key, 2),
                                   sample_ids)
    # The collectives of the step: one all-reduce of the gradients, and the scalar metrics.
    grads = jax.lax.pmean(grads, 'batch')
    metrics = reduce_metrics(metrics)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, metrics

  return jax.pmap(train_step, axis_name='batch', in_axes=(0, 0, None, 0, 0),
                  donate_argnums=(0, 1))


def make_eval_step(config):
  """Numbers of top-1 and top-5 misclassified test images (free phase + readout), summed
  over devices."""
  def eval_step(params, images, labels, mask):
    x = normalize(images, config.dataset)
    u, _ = free_relaxation(config, params, input_drive(params, x))
    logits = readout_logits(params, sigma(u[-1]))
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    rank = jnp.sum(logits > label_logit, axis=-1)  # classes that beat the label
    wrong = jnp.stack([rank >= 1, rank >= 5]).astype(jnp.float32)
    return jax.lax.psum(jnp.sum(wrong * mask, axis=1), 'batch')
  return jax.pmap(eval_step, axis_name='batch')


def evaluate(eval_step, params, split, config, num_devices):
  """(top-1, top-5) error in % over the whole split; each process reads its own block
  (process_eval_indices, padded and masked), the counts are summed over all devices."""
  calls = process_eval_indices(len(split), config.eval_batch_size, jax.process_index(),
                               jax.process_count())
  shard = lambda a: a.reshape(num_devices, -1, *a.shape[1:])
  batches = prefetch(zip(epoch_batches(split, [idx for idx, _ in calls], config.data_threads),
                         (mask for _, mask in calls)),
                     put=lambda batch: tuple(shard(a) for a in (*batch[0], batch[1])))
  wrong = np.zeros(2)
  for images, labels, mask in batches:
    wrong += np.asarray(eval_step(params, images, labels, mask)[0])
  return tuple(100.0 * wrong / len(split))


# ======================================================================================
# Diagnostics (one fixed batch per epoch, off the hot path)
# ======================================================================================

def weight_angles(params):
  """Angle in degrees between each backward kernel and its forward partner (flattened);
  zeros for tied kernels."""
  if not params['backward']:
    return [jnp.zeros(()) for _ in params['forward'][1:]]
  angles = []
  for l, bw in enumerate(params['backward']):
    a, b = bw['w'].ravel(), params['forward'][l + 1]['w'].ravel()
    cos = jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
    angles.append(jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0))))
  return angles


def symmetry_estimate(config, params, s_free, x_drive, key, num_probes):
  """Per-sample Jacobian symmetry ||S|| / (||S|| + ||A||) of J = dF/ds = K - I (Section 3.3),
  without forming J: ||S||_F^2 = E||S e||^2 and ||A||_F^2 = E||A e||^2 for e ~ N(0, I), with
  S e = (J e + J^T e) / 2 and A e = (J e - J^T e) / 2 from one JVP and one VJP per probe.
  Samples do not interact, so the batched JVP/VJP give every sample's own J. Returns (batch,).
  """
  del config  # the shapes come from s_free
  field = lambda s: common.tree_sub(drives(params, s, x_drive), s)
  _, jvp = jax.linearize(field, s_free)
  _, vjp = jax.vjp(field, s_free)
  leaves, treedef = jax.tree_util.tree_flatten(s_free)
  keys = jax.random.split(key, len(leaves))

  def probe(i):
    e = treedef.unflatten([jax.random.normal(jax.random.fold_in(k, i), x.shape, x.dtype)
                           for k, x in zip(keys, leaves)])
    je, jte = jvp(e), vjp(e)[0]
    sym = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, je, jte)
    skew = jax.tree_util.tree_map(lambda a, b: (a - b) / 2, je, jte)
    return common.per_sample_sq_norm(sym), common.per_sample_sq_norm(skew)

  sym2, skew2 = jax.lax.map(probe, jnp.arange(num_probes))
  sym, skew = jnp.sqrt(jnp.mean(sym2, 0)), jnp.sqrt(jnp.mean(skew2, 0))
  return sym / (sym + skew)


def make_diagnostics(config):
  """Symmetry, alignment and convergence of the network on one batch (Fig. 4k-l).

  K = dG/ds depends on the state here (the pooling), so the symmetry measure is estimated
  per sample with random probes (symmetry_estimate), never from a dense Jacobian.
  """

  @jax.jit
  def diagnostics(params, images, labels):
    x = normalize(images, config.dataset)
    x_drive = input_drive(params, x)
    u_free, log10_residual = free_relaxation(config, params, x_drive)
    s_free = activate(u_free)
    relax = nudged_relaxation(config, params, x_drive, labels, u_free)
    delta = rbp_error(config, params, x_drive, labels, u_free)
    cos = lambda e: [jnp.mean(common.per_sample_cosine(a, b)) for a, b in zip(e, delta)]
    out = {'log10_residual': log10_residual, 'cosine_exact': cos(common.exact_dbeta(relax))}
    if config.algorithm == 'hep':
      out['cosine_estimate'] = cos(common.cauchy_estimate(relax, s_free, config.beta,
                                                          config.n_points))
    elif config.algorithm == 'hep_continuous':
      out['cosine_estimate'] = cos(continuous_estimate(config, params, x_drive, labels)[1])
    key = jax.random.PRNGKey(0)
    noise = homeostatic_noise(config, key, jnp.arange(x.shape[0]))
    out.update(
        symmetry=jnp.mean(symmetry_estimate(config, params, s_free, x_drive, key,
                                            config.diag_symmetry_probes)),
        homeo_loss=common.homeostatic_loss(lambda s: drives(params, s, x_drive), s_free, noise),
        weight_angle=weight_angles(params),
        loss=readout_loss(params, s_free[-1], labels)[0])
    return out

  return diagnostics


# ======================================================================================
# Config checks, workdir, checkpoint, metrics
# ======================================================================================

def check_number(config, name, kind, low=None, high=None, above=None):
  """One numeric config field: an int (kind=int) or a number, finite, >= low, <= high, > above."""
  value = config[name]
  is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not is_number or (kind is int and not isinstance(value, int)):
    raise ConfigError(f'{name} must be {"an integer" if kind is int else "a number"}, '
                      f'got {value!r}')
  if not math.isfinite(value):
    raise ConfigError(f'{name} must be finite, got {value}')
  bounds = [f'>= {low}' if low is not None and value < low else None,
            f'<= {high}' if high is not None and value > high else None,
            f'> {above}' if above is not None and value <= above else None]
  broken = [b for b in bounds if b]
  if broken:
    raise ConfigError(f'{name} must be {broken[0]}, got {value}')


def check_choice(config, name, choices):
  if config[name] not in choices:
    raise ConfigError(f'unknown {name} {config[name]!r} (use one of {", ".join(choices)})')


def resolve_config(config, num_local_devices, num_processes):
  """Checks every field (one-line ConfigError on bad input); returns the number of devices
  each process uses (all processes alike).

  Runs before any data is read or anything is compiled. The one rewrite: hep with N = 0 is
  the exact derivative (the authors' convention), recorded as algorithm 'hep_exact'.
  """
  c = config
  check_choice(c, 'dataset', tuple(DATASETS))
  check_choice(c, 'layer_updates', LAYER_UPDATES)
  check_choice(c, 'algorithm', ALGORITHMS)
  check_choice(c, 'optimizer', ('sgd', 'adam'))
  check_choice(c, 'continuous_average', ('hold_end', 'every_step'))
  check_choice(c, 'free_dtype', FREE_DTYPES)
  for name in ('tied', 'augment'):
    if not isinstance(c[name], bool):
      raise ConfigError(f'{name} must be True or False, got {c[name]!r}')
  channels = c.channels
  if not isinstance(channels, (tuple, list)) or len(channels) < 2 or not all(
      isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in channels):
    raise ConfigError(f'channels must be a tuple of >= 2 positive integers, got {channels!r}')
  info = DATASETS[c.dataset]
  if c.num_classes != info['num_classes']:
    raise ConfigError(f'num_classes={c.num_classes} but {c.dataset} has '
                      f'{info["num_classes"]} classes')
  check_number(c, 'image_size', int, 8)
  check_number(c, 'in_channels', int, 1)
  if (c.image_size, c.in_channels) != (32, 3):
    raise ConfigError(f'{c.dataset} images are 32x32x3, got image_size={c.image_size}, '
                      f'in_channels={c.in_channels}')
  state_shapes(c)  # the image size must halve cleanly through the layers
  factors = c.lr_factors
  if not isinstance(factors, (tuple, list)) or len(factors) != len(channels) + 1:
    raise ConfigError(f'lr_factors needs {len(channels) + 1} entries (in-1, each pair of '
                      f'layers, readout) for {len(channels)} layers, got {factors!r}')
  if not all(isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f)
             and f > 0 for f in factors):
    raise ConfigError(f'lr_factors must be positive numbers, got {factors!r}')
  check_number(c, 'seed', int, 0, 2**31 - 1)
  check_number(c, 'train_size', int, 0, info['train_size'])
  check_number(c, 'test_size', int, 0, info['test_size'])
  check_number(c, 'alpha', float, 0, 180)
  for name in ('t_free', 't_nudge', 'continuous_steps_per_point', 'continuous_periods',
               'homeo_draws', 'batch_size', 'eval_batch_size', 'num_epochs', 'diag_batch_size',
               'diag_symmetry_probes', 'data_threads'):
    check_number(c, name, int, 1)
  check_number(c, 'tol', float, 0)
  check_number(c, 'n_points', int, 0, 64)
  check_number(c, 'beta', float, above=0)
  check_number(c, 'homeo_coef', float, 0)
  check_number(c, 'learning_rate', float, above=0)
  check_number(c, 'momentum', float, 0, 0.999)
  check_number(c, 'weight_decay', float, 0)
  check_number(c, 'readout_wd_factor', float, 0)
  check_number(c, 'num_devices', int, 0)
  check_number(c, 'log_every_steps', int, 0)
  check_number(c, 'max_log10_residual', float)
  check_number(c, 'max_train_loss', float, above=0)
  if c.algorithm == 'hep' and c.n_points == 0:
    c.algorithm = 'hep_exact'  # the authors' convention: N = 0 is the exact derivative
  if c.algorithm == 'hep_continuous' and c.n_points < 2:
    raise ConfigError(f'hep_continuous needs n_points >= 2, got {c.n_points}')
  num_devices = c.num_devices or num_local_devices
  if num_devices > num_local_devices:
    raise ConfigError(f'num_devices={num_devices} but only {num_local_devices} local devices')
  for name in ('batch_size', 'eval_batch_size'):
    if c[name] % (num_devices * num_processes):
      raise ConfigError(f'{name}={c[name]} is not divisible by the {num_devices} devices x '
                        f'{num_processes} processes')
  return num_devices


def cluster_detected():
  """Whether this process is one task of several launched by Slurm or Open MPI, which
  jax.distributed.initialize() recognises without arguments."""
  return any(int(os.environ.get(name, '1') or '1') > 1
             for name in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))


def start_processes(config):
  """Joins the run's other processes, if any (jax.distributed); returns (index, count).

  One process needs nothing. Several: coordinator_address, num_processes and process_id
  (the same address and count in every process, ids 0..n-1), or none of them under Slurm /
  Open MPI. Must run before anything touches a device. process_timeout_s bounds both the
  wait for the others at start and how long a silent process is waited for later.
  """
  c = config
  check_number(c, 'num_processes', int, 0)
  check_number(c, 'process_id', int, -1)
  check_number(c, 'process_timeout_s', int, 1)
  if not isinstance(c.coordinator_address, str):
    raise ConfigError(f'coordinator_address must be a string host:port, got '
                      f'{c.coordinator_address!r}')
  if c.coordinator_address:
    if ':' not in c.coordinator_address:
      raise ConfigError(f'coordinator_address must be host:port, got {c.coordinator_address!r}')
    if c.num_processes < 1 or not 0 <= c.process_id < c.num_processes:
      raise ConfigError(f'with coordinator_address, set num_processes >= 1 and process_id in '
                        f'0..num_processes-1 (got {c.num_processes} and {c.process_id})')
    where = dict(coordinator_address=c.coordinator_address, num_processes=c.num_processes,
                 process_id=c.process_id)
  elif c.num_processes > 1 or c.process_id >= 0:
    raise ConfigError('num_processes and process_id need coordinator_address (host:port of '
                      'process 0)')
  elif cluster_detected():
    where = {}  # jax.distributed reads the cluster's environment
  else:
    return 0, 1
  if not jax.distributed.is_initialized():
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU-only runs
    try:
      jax.distributed.initialize(**where, initialization_timeout=c.process_timeout_s,
                                 heartbeat_timeout_seconds=c.process_timeout_s)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f'could not join the other processes ({one_line(e)})') from e
  return jax.process_index(), jax.process_count()


def check_same_config(config):
  """Every process must run process 0's config (apart from the fields that say where it
  runs): compares a digest of run_config with process 0's."""
  mine = np.frombuffer(config_digest(config), np.uint8)
  if not np.array_equal(multihost_utils.broadcast_one_to_all(mine), mine):
    raise ConfigError(f'process {jax.process_index()} was started with another config than '
                      'process 0: start every process with the same flags')


# Fields that may differ when a run is resumed: where the data are, how many devices and
# processes share the batch, how the processes meet, how often to log. Any other change is a
# different run (num_epochs too: the cosine schedule of the learning rate spans the run).
RESUMABLE_FIELDS = ('num_devices', 'log_every_steps', 'tfds_data_dir', 'data_threads',
                    'coordinator_address', 'num_processes', 'process_id', 'process_timeout_s')
CHECKPOINT = 'checkpoint.npz'


def run_config(config):
  """The config as plain JSON data, without the fields a resumed run may change."""
  resolved = json.loads(config.to_json())
  return {k: v for k, v in resolved.items() if k not in RESUMABLE_FIELDS}


def config_digest(config):
  """SHA-1 of run_config: equal digests, the same run."""
  return hashlib.sha1(json.dumps(run_config(config), sort_keys=True).encode()).digest()


def default_workdir(config):
  """runs/<script>/<dataset>_<algorithm and its main settings>-<hash of the run config>."""
  c = config
  name = {'hep': f'hep{c.n_points}_beta{c.beta:g}', 'hep_continuous':
          f'hepcont{c.n_points}_beta{c.beta:g}'}.get(c.algorithm, c.algorithm)
  digest = config_digest(c).hex()[:8]
  return os.path.join('runs', SCRIPT[:-3],
                      f'{c.dataset}_{name}_homeo{c.homeo_coef:g}_seed{c.seed}-{digest}')


def write_atomic(path, write):
  """write(file) into path.tmp, flushed to disk, then renamed over path: a kill or a full disk
  leaves the previous file intact (and no .tmp behind)."""
  tmp = path + '.tmp'
  try:
    with open(tmp, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path, data):
  write_atomic(path, lambda f: f.write((json.dumps(data, indent=2) + '\n').encode()))


def differing_fields(saved, current):
  return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def prepare_workdir(workdir, config):
  """Creates the workdir, or checks that it holds this run; returns its checkpoint (or None).

  Everything that could refuse the workdir is checked here, before any compute: it must be
  a writable folder; its config.json and its checkpoint (which carries its own config) must
  match this run; its metrics file must be readable. Then config.json is (re)written.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir} is a file, not a folder')
  os.makedirs(workdir, exist_ok=True)
  current = run_config(config)
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    try:
      with open(path) as f:
        saved = json.load(f)
      assert isinstance(saved, dict)
    except (ValueError, AssertionError) as e:
      raise ConfigError(f'{path} is empty or not a JSON config; restore it, or delete it to '
                        'resume from the checkpoint (which carries its own config)') from e
    changed = differing_fields({k: v for k, v in saved.items() if k not in RESUMABLE_FIELDS},
                               current)
    if changed:
      raise ConfigError(f'{workdir} holds a run with a different config ({", ".join(changed)}); '
                        'use another --workdir')
  if os.path.exists(os.path.join(workdir, 'checkpoint.pkl')):
    raise ConfigError(f'{workdir} holds checkpoint.pkl, a pickle from an older version of this '
                      'script; it is never loaded (unpickling can run code): move it away')
  ckpt = read_checkpoint(workdir)
  if ckpt is not None:
    changed = differing_fields(ckpt['config'], current)
    if changed:
      raise ConfigError(f'the checkpoint in {workdir} was made with a different config '
                        f'({", ".join(changed)}); use another --workdir')
  read_metrics(workdir, ckpt['epoch'] if ckpt else 0)  # a damaged file stops us here
  write_json(path, json.loads(config.to_json()))  # also proves the folder is writable
  return ckpt


def save_checkpoint(workdir, config, epoch, state):
  """Host arrays of `state` in an .npz (no pickle), with the epoch, the run config and every
  leaf's path in the pytree as JSON; written atomically."""
  paths, leaves = zip(*[(jax.tree_util.keystr(p), np.asarray(a))
                        for p, a in jax.tree_util.tree_flatten_with_path(state)[0]])
  meta = json.dumps({'epoch': epoch, 'config': run_config(config), 'paths': paths})
  arrays = {f'leaf{i:05d}': a for i, a in enumerate(leaves)}
  write_atomic(os.path.join(workdir, CHECKPOINT),
               lambda f: np.savez(f, meta=np.asarray(meta), **arrays))


def read_checkpoint(workdir):
  """{'epoch', 'config', 'paths', 'leaves'} of the workdir's checkpoint, or None if it has none.

  np.load with allow_pickle=False: a checkpoint from someone else's workdir cannot run code.
  """
  path = os.path.join(workdir, CHECKPOINT)
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      ckpt = json.loads(str(z['meta']))
      ckpt['leaves'] = [z[f'leaf{i:05d}'] for i in range(len(ckpt['paths']))]
    assert isinstance(ckpt['epoch'], int) and isinstance(ckpt['config'], dict)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'{path} is damaged or not a checkpoint of this script '
                      f'({type(e).__name__}); move it away to start the run over') from e
  return ckpt


def restore_state(ckpt, template):
  """The checkpoint's arrays in the pytree structure of `template`, checked leaf by leaf."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(template)
  paths = [jax.tree_util.keystr(p) for p, _ in flat]
  if paths != list(ckpt['paths']) or any(
      np.shape(a) != b.shape or np.result_type(a) != b.dtype
      for (_, a), b in zip(flat, ckpt['leaves'])):
    raise ConfigError('the checkpoint does not hold the parameters of this network')
  return jax.tree_util.tree_unflatten(treedef, ckpt['leaves'])


def read_metrics(workdir, last_epoch):
  """Metrics rows of the epochs up to `last_epoch` (later ones were not checkpointed)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    if last_epoch:
      logging.warning('%s is missing: it will hold only the epochs from %d on', path,
                      last_epoch + 1)
    return []
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      try:
        rows.append(json.loads(line))
        assert isinstance(rows[-1]['epoch'], int)
      except (ValueError, AssertionError, KeyError, TypeError) as e:
        raise ConfigError(f'{path} line {number} is not a metrics row; fix or remove that '
                          'line to resume') from e
  rows = [r for r in rows if r['epoch'] <= last_epoch]
  if len(rows) < last_epoch:
    logging.warning('%s holds %d of the %d checkpointed epochs', path, len(rows), last_epoch)
  return rows


def json_safe(value):
  """Non-finite floats become null: metrics.jsonl stays strict JSON."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_metrics(workdir, rows):
  text = ''.join(json.dumps(json_safe(r), allow_nan=False) + '\n' for r in rows)
  write_atomic(os.path.join(workdir, 'metrics.jsonl'), lambda f: f.write(text.encode()))


def replicate(tree, num_devices):
  """A copy per device along a new leading axis, placed as jax.pmap places its outputs.

  (An uncommitted array, e.g. from jnp.broadcast_to, makes pmap compile the train step a
  second time when its own outputs come back in.)
  """
  devices = jax.local_devices()[:num_devices]
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ('batch',)),
                                        jax.sharding.PartitionSpec('batch'))
  return jax.tree_util.tree_map(
      lambda a: jax.device_put(np.broadcast_to(np.asarray(a), (num_devices, *np.shape(a))),
                               sharding), tree)


def to_python(tree):
  """Device scalars and lists of them -> floats, for JSON."""
  return jax.tree_util.tree_map(lambda v: float(v), jax.device_get(tree))


# ======================================================================================
# Main loop
# ======================================================================================

def train_and_evaluate(config, workdir=None):
  """Trains for config.num_epochs epochs; returns the list of per-epoch metrics.

  Order of work: join the other processes (if any), check the config, the workdir and the
  data (each bad input is one ConfigError line), then compile and train. Every epoch ends
  with one metrics row and an atomic checkpoint (written by process 0); a rerun with the
  same workdir resumes after the last checkpoint, in every process.
  """
  process_index, process_count = start_processes(config)
  num_devices = resolve_config(config, jax.local_device_count(), process_count)
  writer = process_index == 0  # the only process that touches the workdir
  if process_count > 1:
    check_same_config(config)
    logging.info('process %d of %d, %d of its devices, %d devices in all', process_index,
                 process_count, num_devices, num_devices * process_count)
  workdir = workdir or default_workdir(config)
  ckpt = None
  if writer:
    logging.info('workdir: %s', workdir)
    ckpt = prepare_workdir(workdir, config)
  builder = prepare_tfds(config, process_index)
  if process_count > 1:
    multihost_utils.sync_global_devices('data prepared')
  data = load_data(config, builder)
  num_train = len(data['train'])
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch < 1:
    raise ConfigError(f'batch_size={config.batch_size} exceeds the {num_train} training images')
  if config.diag_batch_size > num_train:
    raise ConfigError(f'diag_batch_size={config.diag_batch_size} exceeds the {num_train} '
                      'training images')

  optimizer = make_optimizer(config, config.num_epochs * steps_per_epoch)
  params = init_params(jax.random.PRNGKey(config.seed), config)
  opt_state = optimizer.init(params)
  start_epoch, history = 1, []
  if ckpt is not None:
    params, opt_state = restore_state(ckpt, (params, opt_state))
    start_epoch, history = ckpt['epoch'] + 1, read_metrics(workdir, ckpt['epoch'])
  if process_count > 1:  # process 0's checkpoint (or fresh start) for everyone
    start_epoch, params, opt_state = multihost_utils.broadcast_one_to_all(
        (np.int32(start_epoch), params, opt_state))
    start_epoch = int(start_epoch)
  if start_epoch > 1:
    logging.info('resuming from %s after epoch %d', workdir, start_epoch - 1)
  params, opt_state = replicate((params, opt_state), num_devices)

  train_step = make_train_step(config, optimizer)
  eval_step = make_eval_step(config)
  diagnostics = make_diagnostics(config)
  diag_x, diag_y = data['train'].read(np.arange(config.diag_batch_size))
  shard = lambda a: a.reshape(num_devices, -1, *a.shape[1:])
  # XLA:CPU runs all its devices on one shared thread pool: a device that runs ahead into
  # the next step's all-reduce can starve the others (a rendezvous deadlock on 2 cores).
  lockstep = num_devices > 1 and jax.default_backend() == 'cpu'
  blown_up = lambda loss: not loss <= config.max_train_loss  # NaN counts as blown up

  for epoch in range(start_epoch, config.num_epochs + 1):
    # This process's share of every global batch, read and decoded on background threads
    # and sharded over the local devices while the devices compute.
    indices = process_batch_indices(num_train, config.batch_size, config.seed, epoch,
                                    process_index, process_count)
    batches = prefetch(epoch_batches(data['train'], indices, config.data_threads),
                       put=lambda batch: tuple(shard(a) for a in batch))
    sums, t0 = {}, time.time()
    for i, (images, labels) in enumerate(batches):
      step = np.int32((epoch - 1) * steps_per_epoch + i)
      params, opt_state, metrics = train_step(params, opt_state, step, images, labels)
      if lockstep:
        jax.block_until_ready(params)
      for k, v in metrics.items():
        sums.setdefault(k, []).append(v)  # reduced over all devices: equal on each
      if config.log_every_steps and (i + 1) % config.log_every_steps == 0:
        recent = {k: np.asarray(jax.device_get(v[-config.log_every_steps:]))[:, 0]
                  for k, v in sums.items()}
        elapsed = time.time() - t0
        dropped = int(recent['dropped_samples'].sum()) if 'dropped_samples' in recent else 0
        recent = {k: float(v.mean()) for k, v in recent.items()}
        logging.info('epoch %d  step %d/%d  loss %.4f  acc %.3f  %.1f img/s  eta %.0fs%s',
                     epoch, i + 1, steps_per_epoch, recent['loss'], recent['accuracy'],
                     (i + 1) * config.batch_size / elapsed,
                     elapsed / (i + 1) * (steps_per_epoch - i - 1),
                     f'  dropped {dropped} non-finite samples' if dropped else '')
        if blown_up(recent['loss']):  # the same numbers in every process: all stop
          break
    batches.close()  # stops the prefetch thread if the epoch ended early
    train = {k: np.asarray(jax.device_get(v))[:, 0] for k, v in sums.items()}  # (steps,)
    epoch_time = time.time() - t0

    row = {'epoch': epoch, 'step': epoch * steps_per_epoch,
           'train_loss': float(train['loss'].mean()),
           'train_accuracy': float(train['accuracy'].mean()),
           'train_top5_accuracy': float(train['top5_accuracy'].mean()),
           'epoch_time_s': epoch_time,
           'images_per_s': len(train['loss']) * config.batch_size / epoch_time}
    if 'log10_residual' in train:  # the worst sample of each step
      row['log10_residual'] = float(train['log10_residual'].mean())
      row['log10_residual_max'] = float(train['log10_residual'].max())
    if 'homeo_loss' in train:
      row['train_homeo_loss'] = float(train['homeo_loss'].mean())
    if 'dropped_samples' in train:  # non-finite error vectors left out of the gradient
      row['dropped_samples'] = int(train['dropped_samples'].sum())
    host_params = jax.device_get(jax.tree_util.tree_map(lambda a: a[0], params))
    finite_params = all(np.isfinite(a).all() for a in jax.tree_util.tree_leaves(host_params))
    if not finite_params or blown_up(row['train_loss']):
      row['diverged'] = True
      if writer:
        write_metrics(workdir, history + [row])
      kept = (f'the checkpoint still holds epoch {epoch - 1}' if epoch > 1 else
              'no checkpoint was written')
      raise FloatingPointError(
          f'training diverged in epoch {epoch} (training loss {row["train_loss"]:.4g} > '
          f'max_train_loss={config.max_train_loss:g}, or non-finite parameters); {kept}. '
          'Lower the learning rate or check that the dynamics converge.')
    row['test_error'], row['test_top5_error'] = evaluate(eval_step, params, data['test'],
                                                         config, num_devices)
    row.update({'diag/' + k: v for k, v in to_python(diagnostics(host_params, diag_x,
                                                                 diag_y)).items()})
    # Identical in every process (the replicas never drift apart); logged by each.
    row['params_sha1'] = params_digest(host_params)
    residual = row.get('log10_residual', row['diag/log10_residual'])
    if not residual <= config.max_log10_residual:  # NaN is not converged
      logging.warning('epoch %d: no fixed point reached (log10 ||F|| = %.2f > %.1f); '
                      'raise t_free or check the dynamics', epoch, residual,
                      config.max_log10_residual)
      row['converged'] = False
    history.append(row)
    if writer:
      write_metrics(workdir, history)
      save_checkpoint(workdir, config, epoch,
                      (host_params, jax.device_get(jax.tree_util.tree_map(lambda a: a[0],
                                                                          opt_state))))
    logging.info(
        'epoch %d  train loss %.4f  acc %.2f%%  val error %.2f%% (top-5 %.2f%%)  '
        'symmetry %.3f  cos %s  angle %s  log10|F| %.1f  %.0f img/s  %.1fs  params %s', epoch,
        row['train_loss'], 100 * row['train_accuracy'], row['test_error'],
        row['test_top5_error'], row['diag/symmetry'],
        ' '.join(f'{c:.2f}' for c in row['diag/cosine_exact']),
        ' '.join(f'{a:.1f}' for a in row['diag/weight_angle']), residual,
        row['images_per_s'], epoch_time, row['params_sha1'])
  return history


def params_digest(params):
  """SHA-1 of the parameters' bytes (first 16 hex digits): equal digests, equal replicas."""
  h = hashlib.sha1()
  for a in jax.tree_util.tree_leaves(params):
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def one_line(error):
  return ' '.join(str(error).replace('\\n', ' ').split())


def parse_flags(argv):
  """absl's flag parsing, with a bad --config (missing file, misspelt field, wrong type) as
  one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(f'{SCRIPT}: error: {one_line(e)}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  try:
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except (ConfigError, FloatingPointError) as e:
    sys.exit(f'{SCRIPT}: error: {e}')
  except OSError as e:  # a read-only or full disk: the files written before are intact
    sys.exit(f'{SCRIPT}: error: cannot write the workdir: {one_line(e)}')
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    # Typically a collective that lost a process that died. os._exit: the orderly shutdown
    # of jax.distributed would wait for the dead process, then abort with a stack dump.
    print(f'{SCRIPT}: error: process {jax.process_index()} of {jax.process_count()} stopped: '
          f'{one_line(e)[:300]}. If another process died, restart all processes with the '
          'same flags: they resume after the last checkpoint.', file=sys.stderr, flush=True)
    os._exit(1)  # pylint: disable=protected-access


if __name__ == '__main__':
  # Defined here, not at import, so that other scripts and tests can import this module
  # (absl refuses a second definition of --config in one process).
  config_flags.DEFINE_config_file('config', 'configs/imagenet32.py', 'Experiment configuration.')
  flags.DEFINE_string('workdir', None, 'Where process 0 writes the config, metrics and '
                      'checkpoint (default: runs/<script>/<settings>-<config hash>, printed at '
                      'start); rerunning with the same workdir resumes.')
  app.run(main, flags_parser=parse_flags)

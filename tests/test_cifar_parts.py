"""cifar_conv.py's data pipeline (TFDS on mock data, Fashion-MNIST-32, augmentation, the
batches of an epoch) and optimizer (per-layer learning rates, coupled weight decay, cosine
schedule); and the input machinery of harness.py it runs on (prefetch, read_batches, the TFDS
preparation checks, url_reachable)."""
import gzip
import http.server
import os
import socket
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

import cifar_conv as cp
import harness
from configs import cifar10 as cifar10_config
from scripts import write_idx


def data_config(**overrides):
  c = cifar10_config.get_config()
  c.update(overrides)
  c.num_classes = cp.DATASETS[c.dataset]['num_classes'] if c.dataset in cp.DATASETS else 10
  return c


def opt_config(**overrides):
  c = ml_collections.ConfigDict(dict(optimizer='sgd', learning_rate=0.1, momentum=0.0,
                                     weight_decay=0.0, readout_wd_factor=2.0,
                                     lr_factors=(25.0, 15.0, 10.0, 8.0, 5.0)))
  c.update(overrides)
  return c


# ======================================================================================
# Loading
# ======================================================================================

@pytest.fixture
def mock_tfds(monkeypatch):
  """TFDS with random data; the preparation checks pass (mock_data fakes the preparation)."""
  monkeypatch.setattr(harness, 'preparation_problem', lambda name, data_dir, url: None)
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


@pytest.mark.parametrize('dataset', ['cifar10', 'cifar100'])
def test_tfds_load_shapes(mock_tfds, dataset):
  data = cp.load_data(data_config(dataset=dataset))
  for split in (data.train, data.test):
    x, y = split.images, split.labels
    assert len(split) == 24
    assert x.shape == (24, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (24,) and y.dtype == np.int32
    assert 0 <= y.min() and y.max() < cp.DATASETS[dataset]['num_classes']
    bx, by = split.read(np.array([5, 0, 5]))  # gathers rows, in the order asked
    np.testing.assert_array_equal(bx, x[[5, 0, 5]])
    np.testing.assert_array_equal(by, y[[5, 0, 5]])
  assert cp.DATASETS[dataset]['num_classes'] == {'cifar10': 10, 'cifar100': 100}[dataset]
  assert (data.mean, data.std) == (cp.DATASETS[dataset]['mean'], cp.DATASETS[dataset]['std'])


def test_subset_sizes(mock_tfds):
  data = cp.load_data(data_config(train_size=10, test_size=5))
  assert len(data.train) == len(data.train.images) == len(data.train.labels) == 10
  assert len(data.test) == len(data.test.images) == 5
  with pytest.raises(harness.ConfigError, match='train_size=30 but only 24'):
    cp.load_data(data_config(train_size=30))  # allowed for CIFAR, more than the mock has


@pytest.mark.parametrize('overrides, match', [
    (dict(train_size=50001), 'train_size must be <= 50000'),
    (dict(train_size=-1), 'train_size must be >= 0'),
    (dict(test_size=10001), 'test_size must be <= 10000'),
    (dict(dataset='fashion_mnist', train_size=60001), 'train_size must be <= 60000'),
    (dict(dataset='imagenet'), "unknown dataset 'imagenet'.*cifar10, cifar100, fashion_mnist"),
])
def test_bad_data_config(overrides, match):
  with pytest.raises(harness.ConfigError, match=match):  # checked before anything is loaded
    cp.check_config(data_config(**overrides), num_local_devices=1)


def test_fail_fast_without_tensorflow(tmp_path):
  """No mock: nothing prepared in the folder, and no TensorFlow here (or no internet)."""
  start = time.time()
  with pytest.raises(harness.ConfigError, match='cifar10 is not prepared in') as e:
    cp.load_data(data_config(tfds_data_dir=str(tmp_path / 'none')))
  assert time.time() - start < 10
  assert 'tfds_data_dir' in str(e.value) and '\n' not in str(e.value)


@pytest.fixture
def silent_server():
  """A TCP port that accepts connections and never answers."""
  server = socket.socket()
  server.bind(('127.0.0.1', 0))
  server.listen(8)
  yield f'http://127.0.0.1:{server.getsockname()[1]}/x.tar.gz'
  server.close()


def test_fail_fast_without_internet(tmp_path, monkeypatch, silent_server):
  """With TensorFlow present, an unreachable download host fails within the timeout."""
  monkeypatch.setattr(harness, 'tensorflow_installed', lambda: True)
  monkeypatch.setitem(cp.DATASETS['cifar100'], 'url', silent_server)
  start = time.time()
  with pytest.raises(harness.ConfigError, match='cannot be reached') as e:
    cp.load_data(data_config(dataset='cifar100', tfds_data_dir=str(tmp_path / 'none')))
  assert time.time() - start < 10
  assert silent_server in str(e.value) and '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'none' / 'cifar100')


def test_url_reachable(silent_server):
  start = time.time()
  assert not harness.url_reachable(silent_server, timeout_s=1.0)  # times out
  assert not harness.url_reachable('http://no-such-host.invalid/x', timeout_s=1.0)
  assert time.time() - start < 4

  class Handler(http.server.BaseHTTPRequestHandler):

    def do_HEAD(self):  # pylint: disable=invalid-name
      self.send_response(200 if self.path == '/ok' else 404)
      self.end_headers()

    def log_message(self, *args):
      pass

  server = http.server.HTTPServer(('127.0.0.1', 0), Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    url = f'http://127.0.0.1:{server.server_address[1]}'
    assert harness.url_reachable(url + '/ok', timeout_s=2.0)
    assert not harness.url_reachable(url + '/missing', timeout_s=2.0)
  finally:
    server.shutdown()


def test_preparation_problem_without_tensorflow_or_internet(monkeypatch, silent_server):
  """harness.preparation_problem: one line each, in seconds, naming the data set, its folder
  and the way out; None when TensorFlow is there and the download reachable."""
  monkeypatch.setattr(harness, 'tensorflow_installed', lambda: False)
  monkeypatch.setattr(harness, 'url_reachable',
                      lambda *a, **k: pytest.fail('no download check without TensorFlow'))
  problem = harness.preparation_problem('cifar10', '/data/x', silent_server)
  assert problem.startswith('cifar10 is not prepared in /data/x; preparing it needs TensorFlow')
  assert 'tfds_data_dir' in problem and '\n' not in problem
  monkeypatch.undo()

  monkeypatch.setattr(harness, 'tensorflow_installed', lambda: True)
  start = time.time()
  problem = harness.preparation_problem('cifar100', '/data/y', silent_server)
  assert time.time() - start < 10
  assert problem.startswith('cifar100 is not prepared in /data/y and ')
  assert f'{silent_server} cannot be reached' in problem
  assert 'tfds_data_dir' in problem and '\n' not in problem
  monkeypatch.setattr(harness, 'url_reachable', lambda url: url == 'http://ok')
  assert harness.preparation_problem('cifar100', '/data/y', 'http://ok') is None


@pytest.fixture
def fmnist_dir(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (('train', 12), ('t10k', 7)):
    write_idx(tmp_path / f'{split}-images-idx3-ubyte.gz', rng.integers(1, 256, (n, 28, 28)))
    write_idx(tmp_path / f'{split}-labels-idx1-ubyte.gz', rng.integers(0, 10, n))
  return tmp_path


def test_fashion_mnist_32(fmnist_dir):
  data = cp.load_data(data_config(dataset='fashion_mnist', data_dir=str(fmnist_dir)))
  raw = harness.read_idx(fmnist_dir / 'train-images-idx3-ubyte.gz')
  x, y = data.train.images, data.train.labels
  assert x.shape == (12, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int32
  assert data.test.images.shape == (7, 32, 32, 3) and len(data.test) == 7
  assert (data.mean, data.std) == (cp.DATASETS['fashion_mnist']['mean'],
                                   cp.DATASETS['fashion_mnist']['std'])
  np.testing.assert_array_equal(x[:, 2:30, 2:30, 1], raw)
  assert (x[..., 0] == x[..., 2]).all() and (x[..., 0] == x[..., 1]).all()
  border = np.ones((32, 32), bool)
  border[2:30, 2:30] = False
  assert (x[:, border] == 0).all()
  data = cp.load_data(data_config(dataset='fashion_mnist', data_dir=str(fmnist_dir),
                                  train_size=5))
  assert len(data.train) == len(data.train.images) == 5
  with pytest.raises(harness.ConfigError, match='only 12 train images'):
    cp.load_data(data_config(dataset='fashion_mnist', data_dir=str(fmnist_dir),
                             train_size=13))


def corrupt_truncated(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def corrupt_garbage(path):
  path.write_bytes(b'this is not gzip at all' * 10)


def corrupt_bad_stream(path):
  data = bytearray(path.read_bytes())
  data[20:40] = b'\xff' * 20  # inside the deflate stream
  path.write_bytes(bytes(data))


def corrupt_short_payload(path):  # valid gzip, header announces more images than it holds
  with gzip.open(path, 'rb') as f:
    data = f.read()
  with gzip.open(path, 'wb') as f:
    f.write(data[:-100])


def corrupt_header(path):
  with gzip.open(path, 'wb') as f:
    f.write(b'\x00\x00')


@pytest.mark.parametrize('corrupt', [corrupt_truncated, corrupt_garbage, corrupt_bad_stream,
                                     corrupt_short_payload, corrupt_header])
def test_fashion_mnist_corrupt(fmnist_dir, corrupt):
  corrupt(fmnist_dir / 'train-images-idx3-ubyte.gz')
  with pytest.raises(harness.ConfigError, match='train-images-idx3-ubyte.gz is damaged or not '
                     'a gzipped uint8 IDX file') as e:
    cp.load_data(data_config(dataset='fashion_mnist', data_dir=str(fmnist_dir)))
  assert '\n' not in str(e.value)


def test_fashion_mnist_missing(tmp_path):
  with pytest.raises(harness.ConfigError, match='IDX files missing'):
    cp.load_data(data_config(dataset='fashion_mnist', data_dir=str(tmp_path)))


# ======================================================================================
# Augmentation and normalisation
# ======================================================================================

augment = jax.jit(cp.augment)


def candidates(image):
  """All 2 x 25 flips and crops of one image, keyed by (flip, dy, dx)."""
  out = {}
  for flip in (False, True):
    padded = np.pad(image[:, ::-1] if flip else image, ((2, 2), (2, 2), (0, 0)))
    for dy in range(5):
      for dx in range(5):
        out[flip, dy, dx] = padded[dy:dy + 32, dx:dx + 32]
  return out


def test_augment_is_a_flip_and_crop_of_the_padded_image():
  rng = np.random.default_rng(0)
  image = rng.integers(1, 256, (32, 32, 3)).astype(np.uint8)  # no zero pixel of its own
  n = 400
  out = np.asarray(augment(jax.random.PRNGKey(0), np.repeat(image[None], n, 0),
                           jnp.arange(n)))
  assert out.dtype == np.uint8 and out.shape == (n, 32, 32, 3)
  found = []
  for sample in out:
    matches = [k for k, c in candidates(image).items() if np.array_equal(c, sample)]
    assert len(matches) == 1
    found.append(matches[0])
    flip, dy, dx = matches[0]
    zero_rows = np.nonzero((sample == 0).all(axis=(1, 2)))[0]
    assert len(zero_rows) == abs(dy - 2)  # the black border of the shifted window
    assert (sample == 0).any() == ((dy, dx) != (2, 2))
  assert {(dy, dx) for _, dy, dx in found} == {(a, b) for a in range(5) for b in range(5)}
  assert 0.4 < np.mean([f for f, _, _ in found]) < 0.6


def test_augment_per_sample_deterministic_and_split_invariant():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)
  ids = jnp.arange(100, 116)
  key = jax.random.PRNGKey(3)
  whole = np.asarray(augment(key, images, ids))
  np.testing.assert_array_equal(whole, augment(key, images, ids))
  halves = np.concatenate([augment(key, images[:8], ids[:8]), augment(key, images[8:], ids[8:])])
  np.testing.assert_array_equal(whole, halves)
  # The randomness belongs to the id, not to the position in the batch.
  perm = rng.permutation(16)
  np.testing.assert_array_equal(whole[perm], augment(key, images[perm], ids[perm]))
  # Identical images get different flips/crops; another key gives other draws.
  same = np.asarray(augment(key, np.repeat(images[:1], 16, 0), ids))
  assert len({s.tobytes() for s in same}) > 8
  assert not np.array_equal(whole, augment(jax.random.PRNGKey(4), images, ids))


def test_augment_float_and_normalize():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  key, ids = jax.random.PRNGKey(0), jnp.arange(4)
  as_float = augment(key, images.astype(np.float32), ids)
  assert as_float.dtype == jnp.float32
  np.testing.assert_array_equal(as_float, np.asarray(augment(key, images, ids), np.float32))
  for info in cp.DATASETS.values():
    x = jax.jit(lambda im, info=info: cp.normalize(im, info['mean'], info['std']))(images)
    assert x.dtype == jnp.float32
    expected = (images / 255.0 - np.asarray(info['mean'])) / np.asarray(info['std'])
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cp.DATASETS['cifar10']['std'],
                             [0.30345, 0.2991, 0.3015], rtol=1e-12)


# ======================================================================================
# Host-side iteration
# ======================================================================================

def test_epoch_batches():
  """An epoch of a MemorySplit as the train loop reads it (one process)."""
  x = np.arange(103 * 4, dtype=np.uint8).reshape(103, 2, 2, 1)
  y = np.arange(103, dtype=np.int32)
  split = cp.MemorySplit(x, y)
  epoch = lambda e, threads=1: list(harness.read_batches(
      split, harness.process_batch_indices(len(split), 10, seed=0, epoch=e), threads))
  batches = epoch(1)
  assert len(batches) == 10  # the last 3 images are dropped
  seen = np.concatenate([b[1] for b in batches])
  assert len(set(seen.tolist())) == 100
  for bx, by in batches:
    assert bx.dtype == np.uint8 and by.dtype == np.int32
    np.testing.assert_array_equal(bx, x[by])
  again = np.concatenate([b[1] for b in epoch(1, threads=3)])
  other = np.concatenate([b[1] for b in epoch(2)])
  np.testing.assert_array_equal(seen, again)
  assert not np.array_equal(seen, other)
  np.testing.assert_array_equal(
      seen, np.random.default_rng([0, 1]).permutation(103)[:100])


def test_prefetch():
  items = [np.full(3, i) for i in range(7)]
  out = list(harness.prefetch(iter(items), put=lambda a: a + 100, size=2))
  np.testing.assert_array_equal(out, [a + 100 for a in items])
  on_device = list(harness.prefetch(iter(items)))
  assert all(isinstance(a, jax.Array) for a in on_device)

  def failing():
    yield 1
    raise RuntimeError('broken source')
  with pytest.raises(RuntimeError, match='broken source'):
    list(harness.prefetch(failing(), put=lambda a: a))

  produced = []

  def endless():
    i = 0
    while True:
      produced.append(i)
      yield i
      i += 1
  gen = harness.prefetch(endless(), put=lambda a: a, size=2)
  assert [next(gen) for _ in range(3)] == [0, 1, 2]
  gen.close()  # stops and joins the thread
  count = len(produced)
  time.sleep(0.3)
  assert len(produced) == count <= 3 + 2 + 1


class SlowSplit:
  """read(indices) that takes longer for earlier batches: threads finish out of order."""

  def __len__(self):
    return 100

  def read(self, indices):
    time.sleep(0.02 * (5 - min(int(indices[0]) // 10, 5)))
    return indices * 2, indices


def test_read_batches_keeps_the_order_on_several_threads():
  batches = [np.arange(10 * i, 10 * i + 10) for i in range(8)]
  for threads in (1, 3):
    out = list(harness.read_batches(SlowSplit(), batches, threads))
    assert len(out) == 8
    for (x, y), idx in zip(out, batches):
      np.testing.assert_array_equal(y, idx)
      np.testing.assert_array_equal(x, 2 * idx)


# ======================================================================================
# Optimizer
# ======================================================================================

def tiny_params(num_layers, tied=False, dtype=np.float64):
  """The parameter tree of the network with L layers, every leaf a different constant
  (tied: no backward kernels, an empty 'backward' list as init_params makes it)."""
  counter = iter(range(1, 100))
  leaf = lambda shape: np.full(shape, 0.1 * next(counter), dtype)
  params = {'forward': [{'w': leaf((3, 2)), 'b': leaf(2)} for _ in range(num_layers)],
            'readout': {'w': leaf((2, 4)), 'b': leaf(4)}, 'backward': []}
  if not tied:
    params['backward'] = [{'w': leaf((2, 3))} for _ in range(num_layers - 1)]
  return params


def expected_factors(params, lr_factors):
  """lr factor of every leaf by the rule of the paper, written out independently."""
  num_layers = len(params['forward'])
  out = {'forward': [{k: lr_factors[l] for k in p} for l, p in enumerate(params['forward'])],
         'readout': {k: lr_factors[num_layers] for k in params['readout']}}
  if 'backward' in params:
    out['backward'] = [{k: lr_factors[l + 1] for k in p}
                       for l, p in enumerate(params['backward'])]
  return out


CASES = [(4, False, (25.0, 15.0, 10.0, 8.0, 5.0)), (3, False, (25.0, 15.0, 10.0, 5.0)),
         (2, False, (3.0, 2.0, 0.5)), (3, True, (25.0, 15.0, 10.0, 5.0)),
         (2, True, (3.0, 2.0, 0.5))]


@pytest.mark.parametrize('num_layers, tied, lr_factors', CASES)
def test_layer_groups_and_factors(num_layers, tied, lr_factors):
  params = tiny_params(num_layers, tied)
  groups = cp.layer_groups(params)
  assert jax.tree_util.tree_structure(groups) == jax.tree_util.tree_structure(params)
  names = cp.group_names(num_layers)
  assert groups['forward'][0]['w'] == names[0] == 'in-1'
  assert groups['readout']['b'] == 'readout' and names[-2].endswith('-out')
  factors = expected_factors(params, lr_factors)
  lr, wd, wd_ro = 0.1, 1e-2, 2.0
  zero = jax.tree_util.tree_map(np.zeros_like, params)
  one = jax.tree_util.tree_map(np.ones_like, params)

  def first_update(grads, weight_decay):
    config = opt_config(lr_factors=lr_factors, weight_decay=weight_decay,
                        readout_wd_factor=wd_ro)
    optimizer = cp.make_optimizer(config, steps_total=100)
    return optimizer.update(grads, optimizer.init(params), params)[0]

  # Zero gradient: the update is the weight decay alone, with the readout's factor 2.
  decay = first_update(zero, wd)
  wd_factor = jax.tree_util.tree_map(lambda _: 1.0, params)
  wd_factor['readout'] = {'w': wd_ro, 'b': wd_ro}
  expected = jax.tree_util.tree_map(lambda f, g, p: -lr * f * wd * g * p,
                                    factors, wd_factor, params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12),
                         decay, expected)
  # Unit gradient without decay: -lr * factor on every leaf.
  unit = first_update(one, 0.0)
  jax.tree_util.tree_map(
      lambda u, f: np.testing.assert_allclose(u, np.full_like(u, -lr * f), rtol=1e-12),
      unit, factors)


def test_layer_groups_refuse_unknown_trees():
  params = tiny_params(3)
  with pytest.raises(ValueError, match='3 backward entries for 3 forward layers'):
    cp.layer_groups({**params, 'backward': params['backward'] + params['backward'][:1]})
  with pytest.raises(ValueError, match=r"outside the known groups: \['extra'\]"):
    cp.layer_groups({**params, 'extra': {'w': np.zeros(2)}})


@pytest.mark.parametrize('overrides, match', [
    (dict(channels=(8, 8, 8)), 'lr_factors needs 4 entries .in-1, each pair of layers, '
     'readout. for 3 layers'),
    (dict(lr_factors=(25.0, 15.0, 0.0, 8.0, 5.0)), 'lr_factors must be positive'),
    (dict(optimizer='rmsprop'), 'unknown optimizer'),
    (dict(momentum=1.0), 'momentum must be <= 0.999'),
    (dict(learning_rate=0.0), 'learning_rate must be > 0'),
    (dict(weight_decay=-1.0), 'weight_decay must be >= 0'),
    (dict(readout_wd_factor=float('nan')), 'readout_wd_factor must be finite'),
])
def test_bad_optimizer_config(overrides, match):
  with pytest.raises(harness.ConfigError, match=match):
    cp.check_config(data_config(**overrides), num_local_devices=1)


def cosine(lr, step, total):
  return lr * 0.5 * (1 + np.cos(np.pi * min(step, total) / total))


def test_momentum_weight_decay_and_cosine_over_steps():
  """Two steps and the end of the schedule against the numpy formulas (torch SGD)."""
  params = tiny_params(2)
  lr_factors, lr, wd, mom, total = (3.0, 2.0, 0.5), 0.1, 1e-2, 0.9, 5
  factors = expected_factors(params, lr_factors)
  wd_factor = jax.tree_util.tree_map(lambda _: 1.0, params)
  wd_factor['readout'] = {'w': 2.0, 'b': 2.0}
  optimizer = cp.make_optimizer(
      opt_config(lr_factors=lr_factors, weight_decay=wd, momentum=mom), steps_total=total)
  rng = np.random.default_rng(0)
  state = optimizer.init(params)
  p = params
  ref_p = params
  ref_buf = jax.tree_util.tree_map(np.zeros_like, params)
  for step in range(total + 1):
    grads = jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape), params)
    updates, state = optimizer.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    ref_buf = jax.tree_util.tree_map(lambda b, g, q, w: mom * b + g + wd * w * q,
                                     ref_buf, grads, ref_p, wd_factor)
    ref_p = jax.tree_util.tree_map(lambda q, b, f: q - cosine(lr, step, total) * f * b,
                                   ref_p, ref_buf, factors)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), p, ref_p)
    if step == total:  # the schedule has reached zero: no more change
      assert all(np.all(u == 0) for u in jax.tree_util.tree_leaves(updates))
  schedule = optax.cosine_decay_schedule(lr, decay_steps=total)
  assert float(schedule(total)) == 0.0 and float(schedule(0)) == lr


def test_adam_keeps_factors_and_schedule():
  params = tiny_params(2)
  lr_factors = (3.0, 2.0, 0.5)
  optimizer = cp.make_optimizer(opt_config(optimizer='adam', lr_factors=lr_factors,
                                           learning_rate=1e-3), steps_total=10)
  grads = jax.tree_util.tree_map(lambda a: -2.0 * np.ones_like(a), params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  # First Adam step: g / (|g| + eps) = sign(g), times lr * factor.
  jax.tree_util.tree_map(
      lambda u, f: np.testing.assert_allclose(u, np.full_like(u, 1e-3 * f), rtol=1e-6),
      updates, expected_factors(params, lr_factors))


def test_optimizer_under_jit_float32():
  params = tiny_params(4, dtype=np.float32)
  optimizer = cp.make_optimizer(opt_config(momentum=0.9, weight_decay=1e-4), steps_total=10)
  state = optimizer.init(params)

  @jax.jit
  def step(p, s, g):
    u, s = optimizer.update(g, s, p)
    return optax.apply_updates(p, u), s
  grads = jax.tree_util.tree_map(np.ones_like, params)
  for _ in range(3):
    params, state = step(params, state, grads)
  assert all(a.dtype == jnp.float32 and np.isfinite(a).all()
             for a in jax.tree_util.tree_leaves(params))

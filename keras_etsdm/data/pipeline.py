"""Deterministic, resumable ``tf.data`` input pipelines of GLOBAL batches.

``tf.data`` is the input pipeline on every Keras backend (``fit`` accepts it on JAX and
TensorFlow alike), so this package imports TensorFlow for data only, never for computation.

Resume exactness. Two kinds of source:

* indexed sources (in-memory arrays, image folders, LSUN LMDB): example ``i`` can be read by its
  index. The stream of example positions is a pure function of ``(seed, step)``: epoch ``e``
  visits the examples in the order ``argsort(stateless_uniform([N], seed=(seed, e)))`` and the
  batch of global step ``s`` holds stream positions ``s·B … s·B + B − 1``; the random flip of
  position ``p`` is seeded by ``(seed + 1, p)``. A run resumed at step ``s`` therefore sees
  exactly the batches an uninterrupted run would, at the cost of skipping less than one epoch.
  (One caveat: an undecodable file is dropped, which shifts later batches by one example; a
  resumed run re-reads the same files, so it stays identical unless the files change.)
* stream sources (TFRecord, TFDS): a seeded shuffle buffer over a repeated, deterministically
  ordered stream; resuming skips ``s`` batches (exact, but reading them costs time).

Class labels: every pipeline takes optional int class labels (``labels=`` per example for
indexed sources, a third ``label`` element of the stream for stream sources) and then yields
``(images [B, H, W, C], labels int32 [B])`` pairs instead of images, which is what a
class-conditional ``DiffusionModel.fit`` takes.

Sharding: the pipelines yield GLOBAL batches; ``tf.distribute`` (``experimental_distribute_
dataset``) and ``keras.distribution.DataParallel`` split each global batch across replicas,
workers and JAX processes.
"""

import numpy as np
import tensorflow as tf

_SHUFFLE_SALT = 0
_FLIP_SALT = 1


def check_batch_size(global_batch_size):
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive integer, got "
                         f"{global_batch_size!r}.")


def _options(dataset):
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def position_stream(num_examples, seed, start_position=0):
    """Infinite dataset of ``(position, example_index)`` int64 pairs in seeded epoch order.

    Args:
        num_examples: N, the number of examples; epoch ``e`` is a permutation of ``0..N−1``.
        seed: int shuffle seed.
        start_position: the first stream position to yield (``start_step · global_batch``).
    """
    if num_examples < 1:
        raise ValueError(f"The dataset is empty (num_examples={num_examples}).")
    n = tf.constant(num_examples, tf.int64)
    first_epoch = start_position // num_examples
    offset = start_position % num_examples

    def epoch(e):
        keys = tf.random.stateless_uniform([num_examples], seed=tf.stack(
            [tf.cast(seed, tf.int64) * 2 + _SHUFFLE_SALT, e]))
        order = tf.argsort(keys, stable=True)
        positions = e * n + tf.range(n, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices((positions, tf.cast(order, tf.int64)))

    stream = tf.data.Dataset.range(first_epoch, 2 ** 62).flat_map(epoch)
    return stream.skip(offset)


def _maybe_flip(image, position, seed, random_flip):
    if not random_flip:
        return image
    flip_seed = tf.stack([tf.cast(seed, tf.int64) * 2 + _FLIP_SALT, position])
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _check_labels(labels, num_examples):
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (num_examples,) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be {num_examples} integer class ids (one per example), "
                         f"got dtype {labels.dtype} and shape {labels.shape}.")
    return tf.constant(labels.astype("int32"))


def array_dataset(images, global_batch_size, seed=0, start_step=0, random_flip=False,
                  labels=None):
    """Global batches from an in-memory array, deterministic in ``(seed, step)``.

    Args:
        images: float ``[N, H, W, C]`` in [−1, 1] (numpy).
        global_batch_size: B, images per training step over all replicas.
        seed: shuffle / flip seed.
        start_step: the first batch yielded is the batch of this global step (resume).
        random_flip: random horizontal flips, seeded per stream position.
        labels: optional int class ids ``[N]``; then batches are ``(images, labels)``.

    Returns:
        ``tf.data.Dataset`` of float32 ``[B, H, W, C]`` (or ``(images, int32 [B])`` pairs),
        infinite.
    """
    check_batch_size(global_batch_size)
    if len(images.shape) != 4:
        raise ValueError(f"array_dataset expects images [N, H, W, C], got shape {images.shape}.")
    table = tf.constant(images, tf.float32)
    label_table = _check_labels(labels, images.shape[0])
    stream = position_stream(images.shape[0], seed, start_step * global_batch_size)

    def load(position, index):
        image = _maybe_flip(tf.gather(table, index), position, seed, random_flip)
        if label_table is None:
            return image
        return image, tf.gather(label_table, index)

    dataset = stream.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(global_batch_size, drop_remainder=True)
    return _options(dataset.prefetch(tf.data.AUTOTUNE))


def indexed_dataset(num_examples, load_fn, image_shape, global_batch_size, seed=0,
                    start_step=0, random_flip=False, num_parallel_calls=None, labels=None):
    """Global batches from a source readable by example index (folders, LMDB).

    Args:
        num_examples: N.
        load_fn: ``load_fn(index int64 scalar tensor) -> (image float32 [H,W,C], ok bool)``
            in graph mode (e.g. a ``tf.numpy_function``); examples with ``ok == False`` are
            dropped (undecodable files).
        image_shape: ``(H, W, C)``, set on the loaded tensors.
        labels: optional int class ids ``[num_examples]`` (by example index).
        Other args as in ``array_dataset``.
    """
    check_batch_size(global_batch_size)
    label_table = _check_labels(labels, num_examples)
    stream = position_stream(num_examples, seed, start_step * global_batch_size)

    def load(position, index):
        image, ok = load_fn(index)
        image = tf.ensure_shape(image, image_shape)
        label = tf.gather(label_table, index) if label_table is not None else tf.constant(0)
        return _maybe_flip(image, position, seed, random_flip), ok, label

    dataset = stream.map(load, num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE,
                         deterministic=True)
    dataset = dataset.filter(lambda image, ok, label: ok)
    if label_table is None:
        dataset = dataset.map(lambda image, ok, label: image)
    else:
        dataset = dataset.map(lambda image, ok, label: (image, label))
    dataset = dataset.batch(global_batch_size, drop_remainder=True)
    return _options(dataset.prefetch(tf.data.AUTOTUNE))


def stream_dataset(dataset, image_shape, global_batch_size, seed=0, start_step=0,
                   random_flip=False, shuffle_buffer=10_000):
    """Global batches from a deterministic stream of ``(image, ok)`` or ``(image, ok, label)``
    (TFRecord, TFDS); with labels the batches are ``(images, int32 labels [B])``.

    The stream is repeated, shuffled with a seeded buffer and batched; a resumed run skips
    ``start_step`` batches so that it continues where it stopped.
    """
    check_batch_size(global_batch_size)
    with_labels = len(dataset.element_spec) == 3
    dataset = dataset.repeat()
    if shuffle_buffer and shuffle_buffer > 1:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if with_labels:
        dataset = dataset.filter(lambda image, ok, label: ok).map(
            lambda image, ok, label: (tf.ensure_shape(image, image_shape),
                                      tf.cast(label, tf.int32)))
        dataset = dataset.enumerate().map(lambda position, pair: (
            _maybe_flip(pair[0], position, seed, random_flip), pair[1]))
    else:
        dataset = dataset.filter(lambda image, ok: ok).map(
            lambda image, ok: tf.ensure_shape(image, image_shape))
        dataset = dataset.enumerate().map(
            lambda position, image: _maybe_flip(image, position, seed, random_flip))
    dataset = dataset.batch(global_batch_size, drop_remainder=True).skip(start_step)
    return _options(dataset.prefetch(tf.data.AUTOTUNE))

"""Image files on disk → resumable global-batch pipelines (see ``pipeline``).

Sources: a folder of images (recursive), TFRecord files of encoded images, the LSUN LMDB
databases as distributed by the LSUN authors (key → WebP/JPEG bytes), and TFDS datasets when
``tensorflow_datasets`` is installed and the data is already prepared (never downloaded).

Every image is decoded with Pillow, converted to the configured channel count (``L`` for 1,
``RGB`` for 3), centre-cropped to a square and resized to ``image_size`` (box-filter halving
while the image is at least twice the target, then bicubic: the guided-diffusion recipe) and
scaled to [−1, 1]. A file that cannot be decoded is skipped, counted in ``DECODE_STATS`` and
reported (the first few by name) — never fatal.
"""

import io
import logging
import os
import threading

import numpy as np
import tensorflow as tf

from keras_etsdm.data import pipeline

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_HOW_TO_GET = {
    "lsun": "LSUN: download e.g. church_outdoor_train_lmdb.zip with the LSUN authors' "
            "download.py (https://github.com/fyu/lsun) and unzip it; point the path at the "
            "*_lmdb directory holding data.mdb.",
    "ffhq": "FFHQ: download images1024x1024 (or thumbnails) from "
            "https://github.com/NVlabs/ffhq-dataset and point the path at the folder.",
    "celebahq": "CelebA-HQ: build it with the progressive_growing_of_gans scripts (or a "
                "prepared image folder) and point the path at the folder.",
    "afhq": "AFHQ: download from https://github.com/clovaai/stargan-v2 (afhq.zip) and point the "
            "path at e.g. afhq/train.",
}


class DecodeStats:
    """Thread-safe counter of undecodable images (decoding runs in tf.data worker threads)."""

    def __init__(self, report_first=5):
        self._lock = threading.Lock()
        self.skipped = 0
        self.report_first = report_first

    def record(self, what, error):
        with self._lock:
            self.skipped += 1
            count = self.skipped
        if count <= self.report_first:
            logging.warning("Skipping undecodable image %s (%s: %s); %d skipped so far.",
                            what, type(error).__name__, error, count)

    def reset(self):
        with self._lock:
            self.skipped = 0


DECODE_STATS = DecodeStats()


def _missing(path, dataset_hint=None):
    hint = _HOW_TO_GET.get(dataset_hint or "", "")
    return FileNotFoundError(f"Data path {path!r} does not exist. {hint}".strip())


def _check_channels(channels):
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB) for image files, got "
                         f"{channels}.")


def prepare_image(pil_image, image_size, channels):
    """PIL image → float32 ``[image_size, image_size, channels]`` in [−1, 1].

    Centre crop to a square after a box-filter downscale + bicubic resize of the short side.
    """
    from PIL import Image

    image = pil_image.convert("L" if channels == 1 else "RGB")
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(max(image_size, round(s * scale)) for s in image.size),
                         resample=Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[..., None]
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    array = array[top:top + image_size, left:left + image_size]
    return array / 127.5 - 1.0


def decode_bytes(data, image_size, channels, what="image"):
    """Encoded bytes → ``(float32 [S, S, C] in [−1, 1], ok)``; bad data → zeros, ``ok=False``."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(data))) as pil_image:
            pil_image.load()
            return prepare_image(pil_image, image_size, channels), True
    except Exception as error:  # any decoder failure: skip the file, count it
        DECODE_STATS.record(what, error)
        return np.zeros((image_size, image_size, channels), np.float32), False


def _numpy_loader(read_fn, image_size, channels):
    """Wrap ``read_fn(index) -> (bytes, description)`` into a graph ``load_fn`` for tf.data."""

    def load_numpy(index):
        try:
            data, what = read_fn(int(index))
        except Exception as error:
            DECODE_STATS.record(f"#{int(index)}", error)
            return np.zeros((image_size, image_size, channels), np.float32), np.bool_(False)
        image, ok = decode_bytes(data, image_size, channels, what)
        return image.astype(np.float32), np.bool_(ok)

    def load_fn(index):
        image, ok = tf.numpy_function(load_numpy, [index], (tf.float32, tf.bool),
                                      stateful=False)
        return image, ok

    return load_fn


def list_image_files(path, dataset_hint=None):
    """All image files under ``path`` (recursive), sorted (a deterministic index)."""
    if not os.path.isdir(path):
        raise _missing(path, dataset_hint)
    files = []
    for root, dirs, names in os.walk(path, followlinks=True):
        dirs.sort()
        files.extend(os.path.join(root, n) for n in sorted(names)
                     if n.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) found under {path!r}.")
    return files


def folder_dataset(path, image_size, channels, global_batch_size, seed=0, start_step=0,
                   random_flip=True, dataset_hint=None):
    """Global batches from a folder of images (png/jpg/webp/…, searched recursively).

    Returns ``tf.data.Dataset`` of float32 ``[B, image_size, image_size, channels]``.
    """
    _check_channels(channels)
    files = list_image_files(path, dataset_hint)

    def read(index):
        with open(files[index], "rb") as f:
            return f.read(), files[index]

    return pipeline.indexed_dataset(len(files), _numpy_loader(read, image_size, channels),
                                    (image_size, image_size, channels), global_batch_size,
                                    seed=seed, start_step=start_step, random_flip=random_flip)


_LMDB_ENVS = {}
_LMDB_LOCK = threading.Lock()


def _lmdb_env(path):
    """One read-only LMDB handle per (path, process): lmdb refuses to open an environment twice
    in a process, and handles do not survive a fork."""
    import lmdb

    key = (os.path.abspath(path), os.getpid())
    with _LMDB_LOCK:
        if key not in _LMDB_ENVS:
            _LMDB_ENVS[key] = lmdb.open(path, readonly=True, lock=False, readahead=False,
                                        meminit=False, max_readers=126,
                                        subdir=os.path.isdir(path))
        return _LMDB_ENVS[key]


class _LmdbReader:
    """Reads LSUN-layout LMDB records (key → encoded image) by index of the sorted keys."""

    def __init__(self, path):
        self.path = path
        with _lmdb_env(path).begin(write=False) as txn:
            self.keys = [key for key, _ in txn.cursor()]

    def read(self, index):
        key = self.keys[index]
        with _lmdb_env(self.path).begin(write=False) as txn:
            value = txn.get(key)
        if value is None:
            raise KeyError(f"key {key!r} vanished from {self.path}")
        return value, f"{self.path}[{key.decode(errors='replace')}]"


def lsun_lmdb_dataset(path, image_size, channels, global_batch_size, seed=0, start_step=0,
                      random_flip=True, dataset_hint="lsun"):
    """Global batches from an LSUN LMDB directory (``…_lmdb`` holding ``data.mdb``).

    Reading the key list of a large category (e.g. 3 M bedrooms) takes a minute at start-up.
    """
    _check_channels(channels)
    if not os.path.exists(path):
        raise _missing(path, dataset_hint)
    reader = _LmdbReader(path)
    if not reader.keys:
        raise ValueError(f"The LMDB database {path!r} holds no records.")
    return pipeline.indexed_dataset(len(reader.keys),
                                    _numpy_loader(reader.read, image_size, channels),
                                    (image_size, image_size, channels), global_batch_size,
                                    seed=seed, start_step=start_step, random_flip=random_flip)


def tfrecord_dataset(pattern, image_size, channels, global_batch_size, seed=0, start_step=0,
                     random_flip=True, image_key="image", shuffle_buffer=10_000,
                     dataset_hint=None):
    """Global batches from TFRecord files of ``tf.train.Example`` with encoded image bytes.

    Args:
        pattern: a file, a glob pattern or a directory of ``*.tfrecord*`` files.
        image_key: the Example feature holding the encoded image (PNG/JPEG/WebP bytes).
    """
    _check_channels(channels)
    if os.path.isdir(pattern):
        files = sorted(tf.io.gfile.glob(os.path.join(pattern, "*.tfrecord*")))
    else:
        files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        if not os.path.exists(os.path.dirname(pattern) or "."):
            raise _missing(pattern, dataset_hint)
        raise ValueError(f"No TFRecord files match {pattern!r}.")
    feature = {image_key: tf.io.FixedLenFeature([], tf.string)}

    def decode_numpy(data):
        image, ok = decode_bytes(data, image_size, channels, "TFRecord record")
        return image.astype(np.float32), np.bool_(ok)

    def parse(record):
        data = tf.io.parse_single_example(record, feature)[image_key]
        return tuple(tf.numpy_function(decode_numpy, [data], (tf.float32, tf.bool),
                                       stateful=False))

    records = tf.data.TFRecordDataset(files)
    images = records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return pipeline.stream_dataset(images, (image_size, image_size, channels),
                                   global_batch_size, seed=seed, start_step=start_step,
                                   random_flip=random_flip, shuffle_buffer=shuffle_buffer)


def tfds_dataset(name, image_size, channels, global_batch_size, seed=0, start_step=0,
                 random_flip=True, split="train", data_dir=None, image_key="image",
                 shuffle_buffer=10_000):
    """Global batches from an already-prepared TFDS dataset (never downloads)."""
    _check_channels(channels)
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError("source='tfds' needs the tensorflow_datasets package "
                          "(pip install tensorflow-datasets) and prepared data.") from error
    builder = tfds.builder(name, data_dir=data_dir)
    try:
        data = builder.as_dataset(split=split, shuffle_files=False)
    except Exception as error:
        raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared under "
                                f"{data_dir or '~/tensorflow_datasets'}; prepare it with "
                                f"`tfds build {name}` on a machine with network access.") from error

    def prepare(example):
        image = tf.cast(example[image_key], tf.float32)
        if image.shape[-1] != channels:
            if channels == 3 and image.shape[-1] == 1:
                image = tf.image.grayscale_to_rgb(image)
            elif channels == 1 and image.shape[-1] == 3:
                image = tf.image.rgb_to_grayscale(image)
            else:
                raise ValueError(f"TFDS {name!r} images have {image.shape[-1]} channels; "
                                 f"expected {channels}.")
        side = tf.minimum(tf.shape(image)[0], tf.shape(image)[1])
        image = tf.image.resize_with_crop_or_pad(image, side, side)
        image = tf.image.resize(image, (image_size, image_size), method="bicubic",
                                antialias=True)
        return tf.clip_by_value(image, 0.0, 255.0) / 127.5 - 1.0, tf.constant(True)

    images = data.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return pipeline.stream_dataset(images, (image_size, image_size, channels),
                                   global_batch_size, seed=seed, start_step=start_step,
                                   random_flip=random_flip, shuffle_buffer=shuffle_buffer)

"""Image files on disk → resumable global-batch pipelines (see ``pipeline``).

Sources: a folder of images (recursive), TFRecord files of encoded images, the LSUN LMDB
databases as distributed by the LSUN authors (key → WebP/JPEG bytes), and TFDS datasets when
``tensorflow_datasets`` is installed and the data is already prepared (never downloaded).

Every image is decoded with Pillow, converted to the configured channel count (``L`` for 1,
``RGB`` for 3), centre-cropped to a square and resized to ``image_size`` (box-filter halving
while the image is at least twice the target, then bicubic: the guided-diffusion recipe) and
scaled to [−1, 1]. A file that cannot be decoded is skipped, counted in ``DECODE_STATS`` and
reported (the first few by name) — never fatal.

Class labels (for class-conditional models): a folder in the ImageNet layout (one sub-folder per
class, ``class_labels=True``; the sorted sub-folder names are the classes, ids in that order), an
int64 TFRecord feature (``label_key``), or a TFDS dataset's ``label`` feature.
"""

import io
import json
import logging
import os
import threading

import numpy as np
import tensorflow as tf

from keras_etsdm.data import pipeline
from keras_etsdm.io_utils import atomic_write_text

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


def class_folders(path, files):
    """ImageNet layout: ``(class_names, labels)`` from the first sub-folder of each file.

    ``class_names`` are the sorted names of the sub-folders of ``path`` that hold images;
    ``labels[i]`` is the id (index in ``class_names``) of ``files[i]``.
    """
    names = []
    for file in files:
        parts = os.path.relpath(file, path).split(os.sep)
        if len(parts) < 2:
            raise ValueError(f"Class-conditional folder data needs one sub-folder per class "
                             f"(ImageNet layout: {path}/<class>/<image>), but {file!r} lies "
                             f"directly in {path!r}.")
        names.append(parts[0])
    class_names = sorted(set(names))
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.asarray([index[name] for name in names], np.int32)
    return class_names, labels


def check_class_list(class_names, class_list_path, source):
    """Compare ``class_names`` with the list saved at ``class_list_path`` (JSON), or save it.

    A resumed or evaluated run must map class ids to the same classes as the run that trained:
    a folder layout that disagrees with the saved list is an error, not a silent relabelling.
    """
    if not class_list_path:
        return
    if os.path.isfile(class_list_path):
        with open(class_list_path) as f:
            saved = json.load(f)
        if list(saved) != list(class_names):
            added = sorted(set(class_names) - set(saved))
            missing = sorted(set(saved) - set(class_names))
            raise ValueError(
                f"The classes of {source!r} disagree with the saved class list "
                f"{class_list_path} ({len(class_names)} vs {len(saved)} classes; new: "
                f"{added[:5]}, missing: {missing[:5]}): class ids would change meaning. Use "
                f"the original data layout or a new work directory.")
        return
    atomic_write_text(class_list_path, json.dumps(list(class_names), indent=1))


def folder_dataset(path, image_size, channels, global_batch_size, seed=0, start_step=0,
                   random_flip=True, dataset_hint=None, class_labels=False,
                   class_list_path=None, num_classes=None):
    """Global batches from a folder of images (png/jpg/webp/…, searched recursively).

    Args:
        class_labels: read class labels from the ImageNet layout (``path/<class>/…``); the
            class list is checked against / written to ``class_list_path`` (JSON).
        num_classes: if given, the number of class folders must equal it.

    Returns ``tf.data.Dataset`` of float32 ``[B, image_size, image_size, channels]``, or
    ``(images, int32 labels [B])`` pairs with ``class_labels``.
    """
    _check_channels(channels)
    files = list_image_files(path, dataset_hint)
    labels = None
    if class_labels:
        class_names, labels = class_folders(path, files)
        if num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"{path!r} has {len(class_names)} class folders but the model has "
                             f"num_classes={num_classes}.")
        check_class_list(class_names, class_list_path, path)

    def read(index):
        with open(files[index], "rb") as f:
            return f.read(), files[index]

    return pipeline.indexed_dataset(len(files), _numpy_loader(read, image_size, channels),
                                    (image_size, image_size, channels), global_batch_size,
                                    seed=seed, start_step=start_step, random_flip=random_flip,
                                    labels=labels)


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


def _check_label_feature(path, label_key, image_key):
    """Fail early, naming the file, when the first record lacks an int64 ``label_key``."""
    for record in tf.data.TFRecordDataset([path]).take(1):
        example = tf.train.Example.FromString(record.numpy())
        features = example.features.feature
        if label_key not in features or features[label_key].WhichOneof("kind") != "int64_list":
            present = sorted(features.keys())
            raise ValueError(f"TFRecord {path!r} has no int64 class-label feature "
                             f"{label_key!r} (features: {present}); set "
                             f"make_dataset.label_key to the feature holding the label.")
        if image_key not in features:
            raise ValueError(f"TFRecord {path!r} has no image feature {image_key!r} "
                             f"(features: {sorted(features.keys())}); set make_dataset.image_key.")


def tfrecord_dataset(pattern, image_size, channels, global_batch_size, seed=0, start_step=0,
                     random_flip=True, image_key="image", shuffle_buffer=10_000,
                     dataset_hint=None, label_key=None, num_classes=None):
    """Global batches from TFRecord files of ``tf.train.Example`` with encoded image bytes.

    Args:
        pattern: a file, a glob pattern or a directory of ``*.tfrecord*`` files.
        image_key: the Example feature holding the encoded image (PNG/JPEG/WebP bytes).
        label_key: an int64 feature with the class id; batches are then ``(images, labels)``.
        num_classes: with ``label_key``: ids must lie in ``[0, num_classes)`` (checked per
            record while reading).
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
    if label_key:
        _check_label_feature(files[0], label_key, image_key)
        feature[label_key] = tf.io.FixedLenFeature([], tf.int64)

    def decode_numpy(data):
        image, ok = decode_bytes(data, image_size, channels, "TFRecord record")
        return image.astype(np.float32), np.bool_(ok)

    def parse(record):
        example = tf.io.parse_single_example(record, feature)
        image, ok = tf.numpy_function(decode_numpy, [example[image_key]],
                                      (tf.float32, tf.bool), stateful=False)
        if not label_key:
            return image, ok
        label = example[label_key]
        if num_classes is not None:
            check = tf.debugging.assert_less(
                label, tf.constant(num_classes, tf.int64),
                message=f"TFRecord class label {label_key!r} out of range [0, {num_classes})")
            with tf.control_dependencies([check]):
                label = tf.identity(label)
        return image, ok, label

    records = tf.data.TFRecordDataset(files)
    images = records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return pipeline.stream_dataset(images, (image_size, image_size, channels),
                                   global_batch_size, seed=seed, start_step=start_step,
                                   random_flip=random_flip, shuffle_buffer=shuffle_buffer)


def tfds_dataset(name, image_size, channels, global_batch_size, seed=0, start_step=0,
                 random_flip=True, split="train", data_dir=None, image_key="image",
                 shuffle_buffer=10_000, label_key=None):
    """Global batches from an already-prepared TFDS dataset (never downloads).

    ``label_key`` (e.g. ``"label"``): batches are ``(images, labels)`` for conditional models.
    """
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
        image = tf.clip_by_value(image, 0.0, 255.0) / 127.5 - 1.0
        if label_key:
            return image, tf.constant(True), tf.cast(example[label_key], tf.int64)
        return image, tf.constant(True)

    images = data.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return pipeline.stream_dataset(images, (image_size, image_size, channels),
                                   global_batch_size, seed=seed, start_step=start_step,
                                   random_flip=random_flip, shuffle_buffer=shuffle_buffer)

"""Embedded datasets and the resumable tf.data pipelines (no model: fast)."""

import io
import os

import numpy as np
import pytest

from keras_etsdm import data
from keras_etsdm.data import files as data_files


def batches(dataset, n):
    it = iter(dataset)
    return [next(it).numpy() for _ in range(n)]


def test_mnist_embedded_shape_range_and_padding():
    images, labels = data.load_mnist(32, with_labels=True)
    assert images.shape == (5000, 32, 32, 1) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() == 1.0
    # 28x28 centred: 2-pixel border of background (-1) on each side.
    assert np.all(images[:, :2] == -1.0) and np.all(images[:, -2:] == -1.0)
    assert np.all(images[:, :, :2] == -1.0) and np.all(images[:, :, -2:] == -1.0)
    assert np.bincount(labels).tolist() == [500] * 10
    raw = data.load_mnist(28)
    np.testing.assert_array_equal(raw[:, :, :, 0], images[:, 2:30, 2:30, 0])


def test_digits_embedded_exact_scaling():
    from sklearn.datasets import load_digits

    images = data.load_digits(8)
    expected = load_digits().images / 8.0 - 1.0
    assert images.shape == (1797, 8, 8, 1)
    np.testing.assert_allclose(images[..., 0], expected, atol=1e-7)


def test_embedded_bad_size_is_a_clear_error():
    with pytest.raises(ValueError, match="image_size must be an integer >= 28"):
        data.load_mnist(16)
    with pytest.raises(ValueError, match="Unknown embedded dataset"):
        data.load_embedded("cifar", 32)


def test_array_dataset_epoch_is_a_permutation_and_deterministic():
    images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    got = np.concatenate(batches(data.array_dataset(images, 5, seed=3), 4)).ravel()
    # Two epochs of 10: each a permutation, the two differ, same seed gives the same stream.
    assert sorted(got[:10]) == list(range(10)) and sorted(got[10:]) == list(range(10))
    assert not np.array_equal(got[:10], got[10:])
    again = np.concatenate(batches(data.array_dataset(images, 5, seed=3), 4)).ravel()
    np.testing.assert_array_equal(got, again)
    other = np.concatenate(batches(data.array_dataset(images, 5, seed=4), 4)).ravel()
    assert not np.array_equal(got, other)


@pytest.mark.parametrize("batch,start", [(4, 3), (3, 7)])
def test_array_dataset_resume_matches_uninterrupted(batch, start):
    images = data.load_synthetic(11, image_size=4, channels=2, seed=1)
    full = batches(data.array_dataset(images, batch, seed=5, random_flip=True), start + 3)
    resumed = batches(data.array_dataset(images, batch, seed=5, random_flip=True,
                                         start_step=start), 3)
    for a, b in zip(full[start:], resumed):
        np.testing.assert_array_equal(a, b)


def test_random_flip_flips_some_and_only_horizontally():
    images = data.load_synthetic(64, image_size=6, channels=1, seed=2)
    plain = np.concatenate(batches(data.array_dataset(images, 64, seed=0), 1))
    flipped = np.concatenate(batches(data.array_dataset(images, 64, seed=0, random_flip=True),
                                     1))
    same = np.all(plain == flipped, axis=(1, 2, 3))
    mirrored = np.all(plain[:, :, ::-1] == flipped, axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 10 < mirrored.sum() < 54  # about half


def test_make_dataset_embedded_and_channel_mismatch():
    ds = data.make_dataset(8, 8, 1, source="embedded", name="digits", start_step=2)
    batch = next(iter(ds)).numpy()
    assert batch.shape == (8, 8, 8, 1) and batch.dtype == np.float32
    with pytest.raises(ValueError, match="1 channel.*channels=3"):
        data.make_dataset(8, 8, 3, source="embedded", name="digits")
    with pytest.raises(ValueError, match="Unknown data source"):
        data.make_dataset(8, 8, 1, source="ftp")
    with pytest.raises(ValueError, match="global_batch_size must be a positive integer"):
        data.make_dataset(0, 8, 1, name="digits")


def _write_images(folder, count, size=(12, 10), mode="RGB", ext="png", seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        channels = 3 if mode == "RGB" else 1
        array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
        image = Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode)
        path = os.path.join(folder, f"img_{i:03d}.{ext}")
        image.save(path)
        paths.append(path)
    return paths


def test_prepare_image_center_crop_resize_scale():
    from PIL import Image

    # A 40x20 image: black margins outside the centre 20x20 square (plus 4 px so bicubic
    # ringing at the edge stays outside) -> the centre crop is all white.
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, 6:34] = 255
    out = data_files.prepare_image(Image.fromarray(array), 8, 3)
    assert out.shape == (8, 8, 3)
    np.testing.assert_allclose(out, 1.0, atol=1e-6)
    grey = data_files.prepare_image(Image.fromarray(array), 8, 1)
    assert grey.shape == (8, 8, 1)


def test_folder_dataset_recursive_skips_and_counts_bad_files(tmp_path):
    _write_images(str(tmp_path / "a"), 3)
    _write_images(str(tmp_path / "b" / "c"), 2, ext="jpg", seed=1)
    (tmp_path / "b" / "broken.png").write_bytes(b"not an image at all")
    (tmp_path / "notes.txt").write_text("ignored")
    assert len(data.list_image_files(str(tmp_path))) == 6
    data.DECODE_STATS.reset()
    ds = data.make_dataset(5, 8, 3, source="folder", path=str(tmp_path), random_flip=True)
    got = batches(ds, 2)
    assert all(b.shape == (5, 8, 8, 3) for b in got)
    assert all(b.min() >= -1.0 and b.max() <= 1.0 for b in got)
    assert data.DECODE_STATS.skipped >= 1  # the broken file, once per epoch read so far


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*ffhq-dataset"):
        data.make_dataset(4, 8, 3, source="folder", path=str(tmp_path / "nope"),
                          dataset_hint="ffhq")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No image files"):
        data.make_dataset(4, 8, 3, source="folder", path=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="needs a data path"):
        data.make_dataset(4, 8, 3, source="folder", path=None)
    with pytest.raises(ValueError, match="channels must be 1 .* or 3"):
        data.make_dataset(4, 8, 4, source="folder", path=str(tmp_path))


def _png_bytes(seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(9, 9, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_tfrecord_dataset_and_resume(tmp_path):
    import tensorflow as tf

    path = str(tmp_path / "train.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for i in range(7):
            payload = _png_bytes(i) if i != 3 else b"garbage"
            example = tf.train.Example(features=tf.train.Features(feature={
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[payload]))}))
            writer.write(example.SerializeToString())
    data.DECODE_STATS.reset()
    full = batches(data.make_dataset(4, 8, 3, source="tfrecord", path=str(tmp_path), seed=1,
                                     shuffle_buffer=5), 4)
    assert data.DECODE_STATS.skipped >= 1
    resumed = batches(data.make_dataset(4, 8, 3, source="tfrecord", path=str(tmp_path), seed=1,
                                        shuffle_buffer=5, start_step=2), 2)
    for a, b in zip(full[2:], resumed):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="No TFRecord files"):
        data.make_dataset(4, 8, 3, source="tfrecord", path=str(tmp_path / "*.nothing"))


def test_lsun_lmdb_dataset(tmp_path):
    import lmdb

    path = str(tmp_path / "church_outdoor_train_lmdb")
    env = lmdb.open(path, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(6):
            txn.put(f"{i:040x}".encode(), _png_bytes(10 + i))
    env.close()
    ds = data.make_dataset(3, 8, 3, source="lmdb", path=path, seed=2, start_step=1)
    batch = next(iter(ds)).numpy()
    assert batch.shape == (3, 8, 8, 3)
    full = batches(data.make_dataset(3, 8, 3, source="lmdb", path=path, seed=2), 2)
    np.testing.assert_array_equal(full[1], batch)
    with pytest.raises(FileNotFoundError, match="fyu/lsun"):
        data.make_dataset(3, 8, 3, source="lmdb", path=str(tmp_path / "missing_lmdb"))

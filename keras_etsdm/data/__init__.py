"""Training data: embedded datasets (no download) and ``tf.data`` pipelines over files.

``make_dataset`` is the one entry point the training driver (and gin) uses; it returns an
infinite, deterministic ``tf.data.Dataset`` of GLOBAL batches ``[B, S, S, C]`` in [−1, 1] that
starts at the batch of a given global step (exact resume; see ``pipeline``); for
class-conditional models the batches are ``(images, labels)`` pairs.
"""

from keras_etsdm.data.embedded import (LABELLED, load_digits, load_embedded, load_mnist,
                                       load_synthetic)
from keras_etsdm.data.files import (DECODE_STATS, check_class_list, class_folders,
                                    folder_dataset, list_image_files, lsun_lmdb_dataset,
                                    tfds_dataset, tfrecord_dataset)
from keras_etsdm.data.pipeline import array_dataset, indexed_dataset, stream_dataset

__all__ = [
    "make_dataset", "SOURCES", "LABELLED", "load_digits", "load_embedded", "load_mnist",
    "load_synthetic", "DECODE_STATS", "check_class_list", "class_folders", "folder_dataset",
    "list_image_files", "lsun_lmdb_dataset", "tfds_dataset", "tfrecord_dataset", "array_dataset",
    "indexed_dataset", "stream_dataset",
]

SOURCES = ("embedded", "folder", "tfrecord", "lmdb", "tfds")


def make_dataset(global_batch_size, image_size, channels, source="embedded", name="mnist",
                 path=None, seed=0, start_step=0, random_flip=False, dataset_hint=None,
                 num_classes=None, class_list_path=None, label_key=None, **source_kwargs):
    """Build the training input pipeline.

    Args:
        global_batch_size: images per training step over all replicas.
        image_size, channels: the model's input (S, C); files are cropped/resized to S.
        source: ``"embedded"`` (``name`` in mnist / digits / synthetic), ``"folder"`` (``path``
            = a directory of images), ``"tfrecord"`` (``path`` = file / glob / directory),
            ``"lmdb"`` (``path`` = an LSUN ``*_lmdb`` directory), ``"tfds"`` (``name`` = a
            prepared TFDS dataset; ``path`` = its data_dir, optional).
        seed: shuffle and flip seed.
        start_step: first global step the pipeline serves (resume).
        random_flip: random horizontal flips (off for digits, on for natural images).
        dataset_hint: ``"lsun"``, ``"ffhq"``, ``"celebahq"``, ``"afhq"``: names how to obtain the
            data in the missing-path error.
        num_classes: set for a class-conditional model: the pipeline then yields
            ``(images, labels)``. Labels come from the embedded datasets' own labels (MNIST,
            digits: 10 classes), the ImageNet folder layout (one sub-folder per class), the
            TFRecord feature ``label_key`` (default ``"label"``) or the TFDS feature
            ``label_key`` (default ``"label"``). LSUN LMDB and the synthetic set have none.
        class_list_path: folder data: the class-name list (JSON) written on first use and
            checked on later ones (bin/train: ``<workdir>/classes.json``).
        label_key: feature name of the class label (TFRecord, TFDS).
        **source_kwargs: passed to the source (e.g. ``image_key``, ``shuffle_buffer``).

    Returns:
        infinite ``tf.data.Dataset`` of float32 ``[global_batch_size, S, S, C]``, or of
        ``(images, int32 labels [global_batch_size])`` when ``num_classes`` is set.
    """
    common = dict(global_batch_size=global_batch_size, seed=seed, start_step=start_step,
                  random_flip=random_flip)
    conditional = num_classes is not None
    if source == "embedded":
        labels = None
        if conditional:
            if name not in LABELLED:
                raise ValueError(f"Embedded dataset {name!r} has no class labels; a "
                                 f"class-conditional model needs one of {sorted(LABELLED)}.")
            images, labels = load_embedded(name, image_size, with_labels=True, **source_kwargs)
            _check_label_range(labels, num_classes, f"embedded:{name}")
        else:
            images = load_embedded(name, image_size, **source_kwargs)
        if images.shape[-1] != channels:
            raise ValueError(f"Embedded dataset {name!r} has {images.shape[-1]} channel(s) but "
                             f"the model expects channels={channels}.")
        return array_dataset(images, labels=labels, **common)
    if source in ("folder", "lmdb", "tfrecord") and not path:
        raise ValueError(f"source={source!r} needs a data path (set the DATA_PATH macro / "
                         f"make_dataset.path).")
    if source == "folder":
        return folder_dataset(path, image_size, channels, dataset_hint=dataset_hint,
                              class_labels=conditional, class_list_path=class_list_path,
                              num_classes=num_classes, **common, **source_kwargs)
    if source == "lmdb":
        if conditional:
            raise ValueError("LSUN LMDB data has no class labels; train a class-conditional "
                             "model on an image folder (one sub-folder per class), TFRecords "
                             "with a label feature, TFDS or an embedded dataset.")
        return lsun_lmdb_dataset(path, image_size, channels, dataset_hint=dataset_hint or "lsun",
                                 **common, **source_kwargs)
    if source == "tfrecord":
        return tfrecord_dataset(path, image_size, channels, dataset_hint=dataset_hint,
                                label_key=(label_key or "label") if conditional else None,
                                num_classes=num_classes, **common, **source_kwargs)
    if source == "tfds":
        return tfds_dataset(name, image_size, channels, data_dir=path,
                            label_key=(label_key or "label") if conditional else None,
                            **common, **source_kwargs)
    raise ValueError(f"Unknown data source {source!r}; expected one of {SOURCES}.")


def _check_label_range(labels, num_classes, source):
    high = int(labels.max()) if labels.size else -1
    if int(labels.min()) < 0 or high >= num_classes:
        raise ValueError(f"{source} has class labels up to {high} but the model has "
                         f"num_classes={num_classes} (ids 0..{num_classes - 1}).")

"""Pluggable feature extractors for FD / FID, KID and classifier scores.

An extractor is called on uint8 images ``[B, H, W, C]`` in [0, 255] and returns a dict with
``features`` ``[B, D]`` (for FD / KID) and ``logits`` ``[B, K]`` or None (for IS). Its ``name``
goes into every statistics file and result, so numbers from different extractors are never
compared by accident.

* ``InceptionExtractor``: Inception-v3 (pool_3, 2048-d; logits 1008) from a LOCAL path, for
  the standard FID. Nothing is downloaded: a missing path raises an error saying what to get.
  Runs on TensorFlow (a TF-Hub module / SavedModel is TensorFlow by nature) whatever the Keras
  backend is.
* ``ClassifierExtractor``: the project's small digit classifier (``classifier.py``), a Keras
  model that runs on any backend; its name is ``classifier_<name>`` and its FD is reported as
  "FD (classifier_<name>)".
"""

import os

import numpy as np

from keras_etsdm.evaluation.classifier import load_classifier

INCEPTION_DOWNLOAD_HELP = (
    "Download tensorflow-gan's Inception-v3 module once on a machine with internet access and "
    "point --inception_path at the extracted directory (the one containing saved_model.pb):\n"
    "  https://www.kaggle.com/models/tensorflow/tfgan/tensorFlow1/eval-inception/1 "
    "(formerly https://tfhub.dev/tensorflow/tfgan/eval/inception/1; append "
    "'?tf-hub-format=compressed' to the tfhub.dev URL to get a .tar.gz)\n"
    "  mkdir -p ~/models/tfgan_inception && tar -xzf inception_1.tar.gz -C "
    "~/models/tfgan_inception\n"
    "Any TF2 SavedModel that maps float images in [-1, 1] of size 299x299x3 to a dict with "
    "'pool_3' (and optionally 'logits') works too. Without Inception, use the offline "
    "extractor --extractor=classifier_mnist32 (or classifier_digits8) and report FD, not FID.")


class FeatureExtractor:
    """Interface: ``name``, ``feature_dim`` and ``__call__(images_uint8) -> dict``."""

    name = "abstract"
    feature_dim = None

    def __call__(self, images_uint8):
        raise NotImplementedError


def _check_batch(images):
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"Extractors take uint8 images in [0, 255], got dtype {images.dtype}.")
    if images.ndim != 4:
        raise ValueError(f"Images must have shape [B, H, W, C], got {images.shape}.")
    return images


class ClassifierExtractor(FeatureExtractor):
    """Penultimate features (64-d, times the classifier's fixed ``feature_scale``) and logits
    of a project digit classifier.

    Args:
        name: "digits8" or "mnist32" (committed weights in keras_etsdm/assets).
        directory: alternative folder holding ``classifier_<name>.weights.h5`` and ``.json``.

    Images whose size differs from the classifier's are zero-padded (centred, background 0)
    when smaller — the convention of the embedded data — and rejected when larger.
    """

    def __init__(self, name="mnist32", directory=None):
        self.classifier_name = name
        self.model, self.info = load_classifier(name, directory)
        self.image_size = int(self.info["image_size"])
        self.name = f"classifier_{name}"
        self.feature_dim = int(self.model.output["features"].shape[-1])
        if "feature_scale" not in self.info:
            raise ValueError(f"Classifier {name!r}: its .json has no 'feature_scale'; retrain it "
                             f"with bin/train_classifier (which records the scale).")
        self.feature_scale = float(self.info["feature_scale"])

    def _fit_size(self, images):
        size = self.image_size
        h, w = images.shape[1:3]
        if images.shape[-1] != 1:
            raise ValueError(f"{self.name} takes 1-channel (grey) images, got "
                             f"{images.shape[-1]} channels.")
        if (h, w) == (size, size):
            return images
        if h > size or w > size:
            raise ValueError(f"{self.name} takes images of at most {size}x{size}, got {h}x{w}.")
        top, left = (size - h) // 2, (size - w) // 2
        return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))

    def __call__(self, images_uint8):
        images = self._fit_size(_check_batch(images_uint8))
        out = self.model.predict_on_batch(images.astype(np.float32))
        return {"features": np.asarray(out["features"], np.float32) * self.feature_scale,
                "logits": np.asarray(out["logits"], np.float32)}


class InceptionExtractor(FeatureExtractor):
    """Inception-v3 pool_3 features and logits from a local TF-Hub module or SavedModel.

    Args:
        path: directory of the tfgan Inception module (or any TF SavedModel, see
            ``INCEPTION_DOWNLOAD_HELP``). Required: nothing is downloaded.
        feature_key, logits_key: output names (tfgan module: "pool_3", "logits");
            ``logits_key=None`` disables the classifier score.
        image_size: the network's input size (299); images are resized bilinearly.

    Preprocessing follows score_sde / tfgan: uint8 → float (x − 127.5) / 127.5, bilinear
    resize to 299×299, grey images tiled to 3 channels.
    """

    name = "inception_v3"

    def __init__(self, path, feature_key="pool_3", logits_key="logits", image_size=299):
        if not path:
            raise ValueError("InceptionExtractor needs a local path (no download at run time).\n"
                             + INCEPTION_DOWNLOAD_HELP)
        path = os.path.expanduser(path)
        if not os.path.isdir(path) or not (
                os.path.exists(os.path.join(path, "saved_model.pb"))
                or os.path.exists(os.path.join(path, "saved_model.pbtxt"))):
            raise FileNotFoundError(f"No Inception-v3 SavedModel / TF-Hub module found at "
                                    f"{path!r} (expected a directory containing "
                                    f"saved_model.pb).\n" + INCEPTION_DOWNLOAD_HELP)
        import tensorflow as tf
        import tensorflow_hub as hub

        self.path = path
        self.feature_key = feature_key
        self.logits_key = logits_key
        self.image_size = int(image_size)
        module = hub.load(path)
        if callable(module):
            fn = module
        elif hasattr(module, "signatures") and "serving_default" in module.signatures:
            signature = module.signatures["serving_default"]
            input_name = list(signature.structured_input_signature[1].keys())[0]
            fn = lambda images: signature(**{input_name: images})  # noqa: E731
        else:
            raise ValueError(f"The SavedModel at {path!r} is neither callable nor has a "
                             f"'serving_default' signature.")
        self._module = module  # keeps the variables alive

        @tf.function(reduce_retracing=True)
        def run(images_uint8):
            images = (tf.cast(images_uint8, tf.float32) - 127.5) / 127.5
            if images.shape[-1] == 1:
                images = tf.tile(images, [1, 1, 1, 3])
            images = tf.image.resize(images, [self.image_size, self.image_size],
                                     method="bilinear")
            return fn(images)

        self._run = run
        self._tf = tf

    def __call__(self, images_uint8):
        images = _check_batch(images_uint8)
        if images.shape[-1] not in (1, 3):
            raise ValueError(f"Inception takes 1- or 3-channel images, got {images.shape[-1]}.")
        out = self._run(self._tf.constant(images))
        if not isinstance(out, dict):
            features, logits = out, None
        else:
            if self.feature_key not in out:
                raise KeyError(f"The model at {self.path!r} has outputs {sorted(out)}; "
                               f"feature_key={self.feature_key!r} is not among them.")
            features = out[self.feature_key]
            logits = out.get(self.logits_key) if self.logits_key else None
        features = np.asarray(features, np.float32).reshape(len(images), -1)
        if logits is not None:
            logits = np.asarray(logits, np.float32).reshape(len(images), -1)
        self.feature_dim = features.shape[1]
        return {"features": features, "logits": logits}


EXTRACTORS = ("inception", "classifier_digits8", "classifier_mnist32")


def make_extractor(name, inception_path=None, classifier_dir=None):
    """Build an extractor by name: "inception" (needs ``inception_path``) or
    "classifier_<digits8|mnist32>"."""
    if name in ("inception", "inception_v3"):
        return InceptionExtractor(inception_path)
    if name.startswith("classifier_"):
        return ClassifierExtractor(name[len("classifier_"):], classifier_dir)
    raise ValueError(f"Unknown feature extractor {name!r}; expected one of {EXTRACTORS}.")

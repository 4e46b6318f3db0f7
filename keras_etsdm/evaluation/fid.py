"""Sample-quality metrics: Fréchet distance (FID / FD), kernel distance (KID) and classifier
score (IS), computed with tensorflow-gan's evaluation maths, plus reference statistics files.

Conventions that keep numbers comparable (the usual traps with FID):
- Extractors are fed **uint8 images in [0, 255]**, shape ``[N, H, W, C]``; model samples in
  [−1, 1] are quantised with ``to_uint8`` first, exactly like stored real images.
- Statistics are accumulated over **every** image, including a last partial batch.
- The covariance is the unbiased one (divide by N − 1), as in tfgan's
  ``frechet_classifier_distance_from_activations``, so FD from cached statistics equals FD from
  the raw activations.
- Every number is written with its provenance (``make_result_record``): sample count, sampler,
  steps, seed, EMA-or-raw weights, extractor, reference file.

The maths run on TensorFlow (tfgan is TensorFlow code) whatever the Keras backend is; inputs
and outputs are numpy.
"""

import datetime
import io
import json
import os

import numpy as np

from keras_etsdm.evaluation.tfgan import load_tfgan_eval
from keras_etsdm.io_utils import atomic_write_bytes, sha256_file, write_json

STATS_FORMAT_VERSION = 1


def iterate_batches(array, batch_size):
    """Yield consecutive slices of ``array`` of ``batch_size`` rows; the last one may be shorter.

    Never drops the remainder (a classic source of FID that depends on the batch size).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    for start in range(0, len(array), batch_size):
        yield array[start:start + batch_size]


# ----- streaming statistics ------------------------------------------------------------------
class ActivationStatistics:
    """Running mean and covariance of feature vectors, in float64, batch by batch.

    Batches are merged with the pairwise formula of Chan et al. (mean and the centred
    second-moment matrix M2), which stays accurate when the mean is large compared with the
    spread, unlike accumulating ``Σ x xᵀ``.

    Attributes after updates:
        count: number of vectors seen.
        mean: ``[D]`` float64.
        covariance: ``[D, D]`` float64, unbiased (``M2 / (count − 1)``).
    """

    def __init__(self, dim=None):
        self.dim = dim
        self.count = 0
        self._mean = None
        self._m2 = None

    def update(self, activations):
        """Add a batch ``[B, D]`` of activations (any float dtype; B may be 1)."""
        batch = np.asarray(activations, dtype=np.float64)
        if batch.ndim != 2:
            raise ValueError(f"Activations must have shape [B, D], got {batch.shape}.")
        if batch.shape[0] == 0:
            return self
        if self.dim is None:
            self.dim = batch.shape[1]
        if batch.shape[1] != self.dim:
            raise ValueError(f"Activation dimension changed: expected {self.dim}, got "
                             f"{batch.shape[1]}.")
        if not np.all(np.isfinite(batch)):
            raise ValueError("Activations contain NaN or Inf.")
        n_b = batch.shape[0]
        mean_b = batch.mean(axis=0)
        centred = batch - mean_b
        m2_b = centred.T @ centred
        if self.count == 0:
            self.count, self._mean, self._m2 = n_b, mean_b, m2_b
            return self
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n
        return self

    @property
    def mean(self):
        if self.count == 0:
            raise ValueError("ActivationStatistics: no activations were added.")
        return self._mean

    @property
    def covariance(self):
        if self.count < 2:
            raise ValueError(f"A covariance needs at least 2 activations, got {self.count}.")
        return self._m2 / (self.count - 1)


# ----- metrics (tensorflow-gan) -----------------------------------------------------------------
def _tf():
    import tensorflow as tf  # tfgan's maths are TensorFlow ops; see the module docstring.
    return tf


def frechet_distance(mean1, cov1, mean2, cov2):
    """Fréchet distance between Gaussians N(mean1, cov1) and N(mean2, cov2).

    ``‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})``, with tfgan's ``trace_sqrt_product`` (the same
    routine its FID uses) in float64. Inputs: means ``[D]``, covariances ``[D, D]``. Returns a
    python float (can be slightly negative, ~1e-10, for identical inputs).
    """
    mean1, mean2 = np.asarray(mean1, np.float64), np.asarray(mean2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mean1.shape != mean2.shape or mean1.ndim != 1:
        raise ValueError(f"Means must be vectors of the same length, got {mean1.shape} and "
                         f"{mean2.shape}.")
    dim = mean1.shape[0]
    if cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
        raise ValueError(f"Covariances must be [{dim}, {dim}], got {cov1.shape} and "
                         f"{cov2.shape}.")
    tf = _tf()
    tfgan_eval = load_tfgan_eval()
    trace_sqrt = tfgan_eval.classifier_metrics.trace_sqrt_product(tf.constant(cov1),
                                                                  tf.constant(cov2))
    value = (np.sum((mean1 - mean2) ** 2) + np.trace(cov1) + np.trace(cov2)
             - 2.0 * float(trace_sqrt))
    return float(value)


def frechet_distance_from_activations(activations1, activations2):
    """FD between two sets of activations ``[N1, D]`` and ``[N2, D]`` (tfgan, float64)."""
    tf = _tf()
    a1 = tf.constant(np.asarray(activations1, np.float64))
    a2 = tf.constant(np.asarray(activations2, np.float64))
    return float(load_tfgan_eval().frechet_classifier_distance_from_activations(a1, a2))


def frechet_distance_to_statistics(stats, reference):
    """FD between an ``ActivationStatistics`` and a ``ReferenceStatistics`` (or two of either)."""
    return frechet_distance(stats.mean, stats.covariance, reference.mean, reference.covariance)


def kernel_distance(activations1, activations2, max_block_size=1024):
    """KID (unbiased polynomial-kernel MMD², Bińkowski et al.) and its standard error (tfgan).

    Inputs ``[N1, D]`` and ``[N2, D]`` in random order (the block estimator assumes it).
    Returns ``(kid, std)`` as python floats.
    """
    tf = _tf()
    a1 = np.asarray(activations1, np.float64)
    a2 = np.asarray(activations2, np.float64)
    if a1.ndim != 2 or a2.ndim != 2 or a1.shape[1] != a2.shape[1]:
        raise ValueError(f"KID needs activations [N1, D] and [N2, D], got {a1.shape} and "
                         f"{a2.shape}.")
    if min(len(a1), len(a2)) < 2:
        raise ValueError("KID needs at least 2 activations on each side.")
    kid, std = load_tfgan_eval().kernel_classifier_distance_and_std_from_activations(
        tf.constant(a1), tf.constant(a2), max_block_size=max_block_size)
    return float(kid), float(std)


def classifier_score(logits):
    """Inception score / classifier score ``exp E_x KL(p(y|x) ‖ p(y))`` from logits ``[N, K]``."""
    tf = _tf()
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"Logits must have shape [N, K], got {logits.shape}.")
    return float(load_tfgan_eval().classifier_score_from_logits(tf.constant(logits)))


# ----- extraction over a whole image set ---------------------------------------------------------
def extract_activations(images_uint8, extractor, batch_size=250):
    """Run ``extractor`` over all images (last partial batch included).

    Args:
        images_uint8: ``[N, H, W, C]`` uint8.
        extractor: a ``features.FeatureExtractor``.
    Returns:
        dict with ``features [N, D]`` float32 and ``logits [N, K]`` float32 (or None).
    """
    images_uint8 = np.asarray(images_uint8)
    check_uint8_images(images_uint8)
    features, logits = [], []
    for batch in iterate_batches(images_uint8, batch_size):
        out = extractor(batch)
        features.append(np.asarray(out["features"], np.float32))
        if out.get("logits") is not None:
            logits.append(np.asarray(out["logits"], np.float32))
    result = {"features": np.concatenate(features, axis=0),
              "logits": np.concatenate(logits, axis=0) if logits else None}
    if result["features"].shape[0] != images_uint8.shape[0]:
        raise RuntimeError("Internal error: the extractor returned a different number of rows "
                           "than images given.")
    return result


def check_uint8_images(images):
    if images.dtype != np.uint8:
        raise ValueError(f"Feature extractors take uint8 images in [0, 255] (got dtype "
                         f"{images.dtype}); convert model samples with to_uint8().")
    if images.ndim != 4:
        raise ValueError(f"Images must have shape [N, H, W, C], got {images.shape}.")
    if images.shape[0] == 0:
        raise ValueError("No images given.")


# ----- reference statistics files ----------------------------------------------------------------
class ReferenceStatistics:
    """Mean / covariance (and optionally a random subset of activations for KID) of a data set."""

    def __init__(self, mean, covariance, count, extractor, activations=None, metadata=None):
        self.mean = np.asarray(mean, np.float64)
        self.covariance = np.asarray(covariance, np.float64)
        self.count = int(count)
        self.extractor = str(extractor)
        self.activations = None if activations is None else np.asarray(activations, np.float32)
        self.metadata = dict(metadata or {})

    @classmethod
    def from_activations(cls, activations, extractor, metadata=None, max_kid_activations=10000,
                         seed=0):
        stats = ActivationStatistics().update(activations)
        return cls.from_running(stats, extractor, activations, metadata, max_kid_activations, seed)

    @classmethod
    def from_running(cls, stats, extractor, activations=None, metadata=None,
                     max_kid_activations=10000, seed=0):
        kept = None
        if activations is not None and max_kid_activations:
            activations = np.asarray(activations, np.float32)
            if len(activations) > max_kid_activations:
                rng = np.random.default_rng(seed)
                index = np.sort(rng.choice(len(activations), max_kid_activations, replace=False))
                activations = activations[index]
            # Shuffle with a fixed seed: tfgan's KID block estimator assumes random order.
            kept = activations[np.random.default_rng(seed + 1).permutation(len(activations))]
        return cls(stats.mean, stats.covariance, stats.count, extractor, kept, metadata)

    def save(self, path):
        """Write an ``.npz`` atomically (a crash never leaves a half-written file)."""
        arrays = {"mean": self.mean, "covariance": self.covariance,
                  "count": np.int64(self.count), "extractor": np.str_(self.extractor),
                  "format_version": np.int64(STATS_FORMAT_VERSION),
                  "metadata_json": np.str_(json.dumps(self.metadata, sort_keys=True))}
        if self.activations is not None:
            arrays["activations"] = self.activations
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    @classmethod
    def load(cls, path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"Reference statistics file {path!r} does not exist; create "
                                    f"it with `bin/eval --compute_stats --stats_path={path}`.")
        with np.load(path, allow_pickle=False) as data:
            missing = {"mean", "covariance", "count", "extractor"} - set(data.files)
            if missing:
                raise ValueError(f"{path!r} is not a reference statistics file (missing "
                                 f"{sorted(missing)}).")
            return cls(data["mean"], data["covariance"], int(data["count"]),
                       str(data["extractor"]),
                       data["activations"] if "activations" in data.files else None,
                       json.loads(str(data["metadata_json"])) if "metadata_json" in data.files
                       else {})


def compute_reference_statistics(images_uint8, extractor, batch_size=250,
                                 max_kid_activations=10000, metadata=None, seed=0):
    """Statistics of a set of real images with ``extractor`` (no image left out).

    Args:
        images_uint8: ``[N, H, W, C]`` uint8 images (N ≥ 2).
        extractor: a ``features.FeatureExtractor``.
        max_kid_activations: how many activations (a seeded random subset) to keep for KID.
    Returns:
        ``ReferenceStatistics`` with count N.
    """
    out = extract_activations(images_uint8, extractor, batch_size)
    meta = {"num_images": int(len(images_uint8)), "image_shape": list(images_uint8.shape[1:]),
            "batch_size": int(batch_size)}
    meta.update(metadata or {})
    return ReferenceStatistics.from_activations(out["features"], extractor.name, meta,
                                                max_kid_activations, seed)


def evaluate_images(images_uint8, extractor, reference, batch_size=250, kid_block_size=1024,
                    labels=None):
    """FD (always), KID (when the reference kept activations) and IS (when logits exist).

    ``labels`` (int ``[N]``, the classes the samples were generated for): with a project digit
    classifier as extractor, also ``class_agreement`` (fraction with ``argmax logits ==
    label``) and ``class_agreement_per_class`` (class id → fraction; the null class excluded).

    Returns a dict of metric name → float, with names carrying the extractor: ``fd``, ``kid``,
    ``kid_std``, ``classifier_score``.
    """
    if reference.extractor != extractor.name:
        raise ValueError(f"The reference statistics were computed with extractor "
                         f"{reference.extractor!r}, but samples are being embedded with "
                         f"{extractor.name!r}; FD across extractors is meaningless.")
    out = extract_activations(images_uint8, extractor, batch_size)
    stats = ActivationStatistics().update(out["features"])
    metrics = {"fd": frechet_distance_to_statistics(stats, reference)}
    if reference.activations is not None and len(out["features"]) >= 2:
        # tfgan's block estimator assumes random order; samples may come sorted by class.
        shuffled = out["features"][np.random.default_rng(0).permutation(len(out["features"]))]
        kid, kid_std = kernel_distance(reference.activations, shuffled, kid_block_size)
        metrics["kid"], metrics["kid_std"] = kid, kid_std
    if out["logits"] is not None:
        metrics["classifier_score"] = classifier_score(out["logits"])
        if labels is not None and extractor.name.startswith("classifier_"):
            metrics.update(class_agreement(out["logits"], labels))
    return metrics


def class_agreement(logits, labels):
    """How often a classifier assigns the requested class.

    Args:
        logits: ``[N, K]`` classifier logits of the samples.
        labels: int ``[N]`` requested classes; ids ``>= K`` (the null class) are left out.
    Returns:
        ``{"class_agreement": float, "class_agreement_per_class": {id: float}}``.
    """
    labels = np.asarray(labels).reshape(-1)
    predicted = np.argmax(np.asarray(logits), axis=-1)
    if predicted.shape[0] != labels.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {predicted.shape[0]} samples.")
    keep = labels < np.asarray(logits).shape[-1]
    if not np.any(keep):
        return {}
    hits = predicted[keep] == labels[keep]
    per_class = {int(c): float(np.mean(hits[labels[keep] == c]))
                 for c in np.unique(labels[keep])}
    return {"class_agreement": float(np.mean(hits)), "class_agreement_per_class": per_class}


# ----- results with provenance -----------------------------------------------------------------
_REQUIRED_RESULT_FIELDS = ("num_samples", "sampler", "steps", "seed", "weights", "extractor",
                           "reference_file", "metrics")


def make_result_record(*, metrics, num_samples, sampler, steps, seed, weights, extractor,
                       reference_file, sampler_config=None, workdir=None, checkpoint=None,
                       extra=None):
    """A JSON-able dict with every number's provenance.

    Args:
        metrics: dict name → float (e.g. from ``evaluate_images``).
        num_samples: how many samples were drawn.
        sampler: sampler name (e.g. "ddim"); sampler_config: its full configuration.
        steps: number of sampler steps (NFE for DPM-Solver).
        seed: the sampling seed.
        weights: "ema" or "raw".
        extractor: feature extractor name (FD is "FID" only with Inception-v3).
        reference_file: path of the reference statistics.
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}.")
    record = {
        # Per-class metrics are {class id: value} dicts (ids as JSON keys: strings).
        "metrics": {k: {str(c): float(x) for c, x in v.items()} if isinstance(v, dict)
                    else float(v) for k, v in metrics.items()},
        "num_samples": int(num_samples), "sampler": str(sampler), "steps": int(steps),
        "seed": int(seed), "weights": weights, "extractor": str(extractor),
        "reference_file": None if reference_file is None else os.path.abspath(reference_file),
        "reference_sha256": _sha256(reference_file),
        "sampler_config": sampler_config, "workdir": workdir, "checkpoint": checkpoint,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    record.update(extra or {})
    return record


def write_result_json(path, record):
    """Write a result record atomically; refuses records that lack provenance fields."""
    missing = [k for k in _REQUIRED_RESULT_FIELDS if k not in record]
    if missing:
        raise ValueError(f"Result record lacks {missing}; build it with make_result_record().")
    write_json(path, record, indent=2, sort_keys=True)
    return path


def _sha256(path):
    if path is None or not os.path.exists(path):
        return None
    return sha256_file(path)



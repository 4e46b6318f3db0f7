"""Evaluation: FD / FID, KID and IS (tensorflow-gan maths), offline feature extractors, the
Lipschitz-in-t diagnostic (the E-TSDM vs DDPM experiment harness is benchmarks/comparison.py)."""

from keras_etsdm.evaluation.fid import (ActivationStatistics, ReferenceStatistics,
                                        classifier_score, compute_reference_statistics,
                                        evaluate_images, frechet_distance,
                                        frechet_distance_from_activations, kernel_distance,
                                        make_result_record, write_result_json)
from keras_etsdm.evaluation.features import (ClassifierExtractor, InceptionExtractor,
                                             make_extractor)
from keras_etsdm.evaluation.tfgan import load_tfgan_eval

__all__ = [
    "ActivationStatistics", "ReferenceStatistics", "classifier_score",
    "compute_reference_statistics", "evaluate_images", "frechet_distance",
    "frechet_distance_from_activations", "kernel_distance", "make_result_record",
    "write_result_json", "ClassifierExtractor", "InceptionExtractor", "make_extractor",
    "load_tfgan_eval",
]

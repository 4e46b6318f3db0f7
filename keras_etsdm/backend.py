"""The few backend-specific pieces, each behind a backend-neutral function.

Nothing else in the package imports tensorflow, jax or torch directly for computation.
"""

import keras
import numpy as np


def backend_name():
    return keras.backend.backend()


def replica_id():
    """Index of the current replica under ``tf.distribute`` (a scalar tensor or 0).

    JAX data parallelism (``keras.distribution``) draws random numbers for the GLOBAL batch, so
    its shards already differ; TensorFlow runs ``train_step`` once per replica with mirrored
    seed state, so each replica must fold its own index into the seed.
    """
    if backend_name() != "tensorflow":
        return 0
    import tensorflow as tf

    if not tf.distribute.has_strategy():
        return 0
    context = tf.distribute.get_replica_context()
    if context is None:
        return 0
    return context.replica_id_in_sync_group


class ReplicaSeedGenerator(keras.random.SeedGenerator):
    """A ``keras.random.SeedGenerator`` whose draws differ between ``tf.distribute`` replicas.

    The state advances identically on every replica (so checkpoints stay consistent); the
    replica index is added to the second seed word of each draw.
    """

    def next(self, ordered=True):
        seed = super().next(ordered=ordered)
        rid = replica_id()
        if isinstance(rid, int) and rid == 0:
            return seed
        offset = keras.ops.stack([keras.ops.zeros((), seed.dtype),
                                  keras.ops.cast(rid, seed.dtype) * 1_000_003])
        return seed + offset


def to_numpy(x):
    """Any backend tensor (or nested python numbers) → numpy array."""
    return np.asarray(keras.ops.convert_to_numpy(x))

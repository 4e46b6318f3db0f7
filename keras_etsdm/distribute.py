"""Device set-up for data-parallel training, per backend, in one place.

``setup_distribution(mode)`` must run before the model is built. It returns a ``Distribution``
handle with the replica count, a ``scope()`` to build and compile the model in, and whether
this process is the chief (the one that writes checkpoints, logs and grids).

* TensorFlow: ``tf.distribute.MirroredStrategy`` over the local devices (GPUs, or the logical
  CPU devices that tests create), ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` names a
  cluster. ``fit`` splits each global batch across replicas; the model draws noise with
  ``ReplicaSeedGenerator``, so replicas draw different t and ε, and its loss is a
  ``keras.losses.Loss`` object, so ``fit`` scales it by the replica count.
* JAX: ``keras.distribution.DataParallel`` over all devices (local, or global after
  ``jax.distributed.initialize`` when ``KERAS_DISTRIBUTION_NUM_PROCESSES`` /
  ``JAX_COORDINATOR_ADDRESS`` say there are several processes). The jitted step works on the
  global batch sharded on its first axis, so random draws are for the global batch.

``mode``: ``"auto"`` (several devices → data parallel, one → plain), ``"none"`` (default device
only), ``"mirrored"`` / ``"data_parallel"`` (force), ``"multi_worker"`` (TF_CONFIG / multi-
process JAX).
"""

import contextlib
import json
import logging
import os

import keras

MODES = ("auto", "none", "mirrored", "data_parallel", "multi_worker")


class Distribution:
    """What the training driver needs to know about the device layout."""

    def __init__(self, kind, num_replicas, strategy=None, is_chief=True, num_processes=1):
        self.kind = kind
        self.num_replicas = num_replicas
        self.strategy = strategy
        self.is_chief = is_chief
        self.num_processes = num_processes

    def scope(self):
        """Context to build and compile the model in (the tf.distribute strategy scope)."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def process_local(self):
        """Context for work that one process does alone (the chief's checkpoints).

        Under multi-process JAX a new variable goes to the global device mesh, and placing it
        there is a collective across processes: work on the chief alone that creates one
        (Keras' ``save_weights`` builds a throwaway optimizer) would wait for the other
        processes forever. Inside, the global Keras distribution is unset, so new arrays stay
        on this process. Elsewhere a no-op.
        """
        if self.kind != "data_parallel" or self.num_processes < 2:
            yield
            return
        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(None)
        try:
            yield
        finally:
            keras.distribution.set_distribution(previous)

    def check_global_batch(self, global_batch_size):
        """Raise unless the global batch splits evenly across the replicas."""
        if global_batch_size % self.num_replicas:
            raise ValueError(
                f"The global batch size {global_batch_size} does not divide evenly across "
                f"{self.num_replicas} replicas ({self.kind}); use a multiple of "
                f"{self.num_replicas}.")
        return global_batch_size // self.num_replicas

    def __repr__(self):
        return (f"Distribution(kind={self.kind!r}, num_replicas={self.num_replicas}, "
                f"num_processes={self.num_processes}, is_chief={self.is_chief})")


def _tf_config_cluster():
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON: {error}") from error
    return config


def _setup_tensorflow(mode):
    import tensorflow as tf

    tf_config = _tf_config_cluster()
    if mode == "multi_worker" or (mode == "auto" and tf_config and
                                  sum(len(v) for v in tf_config.get("cluster", {}).values()) > 1):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        _fix_keras_multi_worker_logs()
        task = (tf_config or {}).get("task", {})
        is_chief = task.get("type", "worker") in ("chief", "worker") and task.get("index", 0) == 0
        if "chief" in (tf_config or {}).get("cluster", {}):
            is_chief = task.get("type") == "chief"
        return Distribution("multi_worker_mirrored", strategy.num_replicas_in_sync, strategy,
                            is_chief=is_chief,
                            num_processes=strategy.extended._num_workers
                            if hasattr(strategy.extended, "_num_workers") else 1)
    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus or tf.config.list_logical_devices("CPU")
    if mode == "none" or (mode == "auto" and len(devices) < 2):
        return Distribution("single", 1)
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
    return Distribution("mirrored", strategy.num_replicas_in_sync, strategy)


def _fix_keras_multi_worker_logs():
    """Let Keras 3 ``fit`` run under a multi-worker ``MultiWorkerMirroredStrategy``.

    Keras reduces the per-replica logs of every step (metric results: scalars) with
    ``strategy.reduce("MEAN", value, axis=0)`` when the strategy spans several workers, which
    fails for scalars ("Invalid reduction dimension 0 for input with 0 dimensions",
    tensorflow/tensorflow#72388; Keras 3.15, TF 2.21). Scalars are reduced over the replicas
    with ``axis=None`` instead (the same mean over replicas that one worker's replicas get);
    everything else as Keras does. Idempotent; a no-op if Keras' internals have moved (the
    multi-worker test then fails loudly).
    """
    try:
        from keras.src.backend.tensorflow import trainer
        is_multi_worker = trainer._collective_all_reduce_multi_worker
        original = trainer.reduce_per_replica
    except (ImportError, AttributeError):
        return
    if getattr(original, "_etsdm_scalar_safe", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not is_multi_worker(strategy):
            return original(values, strategy, reduction)

        def reduce(value):
            if strategy.experimental_local_results(value)[0].shape.rank == 0:
                return strategy.reduce("MEAN", value, axis=None)
            return original(value, strategy, reduction)

        return keras.tree.map_structure(reduce, values)

    reduce_per_replica._etsdm_scalar_safe = True
    trainer.reduce_per_replica = reduce_per_replica


def _setup_jax(mode):
    import jax

    multi_process = (mode == "multi_worker"
                     or int(os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "1")) > 1
                     or bool(os.environ.get("JAX_COORDINATOR_ADDRESS")))
    # Not ``jax.process_count()``: that starts the XLA backend, after which
    # ``jax.distributed.initialize`` refuses to run.
    if multi_process and not jax.distributed.is_initialized():
        keras.distribution.initialize()  # → jax.distributed.initialize from the environment
    devices = keras.distribution.list_devices()
    if mode == "none" or (mode == "auto" and len(devices) < 2):
        return Distribution("single", 1)
    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)
    return Distribution("data_parallel", len(devices), is_chief=jax.process_index() == 0,
                        num_processes=jax.process_count())


def setup_distribution(mode="auto"):
    """Configure data parallelism for this process; call before building the model.

    Returns:
        ``Distribution``.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown distribution mode {mode!r}; expected one of {MODES}.")
    backend = keras.backend.backend()
    if backend == "tensorflow":
        dist = _setup_tensorflow(mode)
    elif backend == "jax":
        dist = _setup_jax(mode)
    else:
        if mode not in ("auto", "none"):
            raise ValueError(f"Distribution mode {mode!r} is not supported on the {backend} "
                             f"backend; use 'none'.")
        dist = Distribution("single", 1)
    logging.info("Devices: %s", dist)
    return dist


def set_virtual_cpu_devices(count):
    """Split the host CPU into ``count`` devices (tests); must run before backend start-up.

    JAX reads ``XLA_FLAGS`` when it initialises; TensorFlow needs logical devices configured
    before its runtime starts. Call this at the very top of a fresh process.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    flag = f"--xla_force_host_platform_device_count={count}"
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + flag).strip()
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)])


def cross_replica_sum(values):
    """Sum a list of tensors over ``tf.distribute`` replicas (identity elsewhere).

    Keras applies gradient clipping per replica, BEFORE its all-reduce; a correct global-norm
    clip needs the summed gradient's norm, which this gives inside a replica context.
    """
    if keras.backend.backend() != "tensorflow":
        return values
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if not tf.distribute.has_strategy() or context is None or context.num_replicas_in_sync == 1:
        return values
    return context.all_reduce(tf.distribute.ReduceOp.SUM, values)

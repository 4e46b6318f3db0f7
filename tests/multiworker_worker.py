"""One process of tests/test_multiworker.py: multi-process data-parallel training on one machine.

Usage::

    multiworker_worker.py worker OUT_DIR      # one process of the 2-process cluster
    multiworker_worker.py reference OUT_DIR   # the same training in one process

``worker``: the cluster comes from the environment that the test sets, as a cluster manager
would (TensorFlow: ``TF_CONFIG``; JAX: ``KERAS_DISTRIBUTION_JOB_ADDRESSES`` /
``_NUM_PROCESSES`` / ``_PROCESS_ID``), and ``training.train`` runs with
``distribution="multi_worker"``. Each process has one CPU device and its own work directory
``OUT_DIR/worker<index>``, so that what the non-chief writes can be checked.

``reference``: one process with as many replicas as the cluster has in all where that matters:
TensorFlow ``MirroredStrategy`` over 2 logical CPU devices (each replica draws its own noise
from its replica id, so the reference needs the same 2 replica ids), JAX one device
(``DataParallel`` draws for the global batch, so the device count does not matter).

The run is that of tests/distribute_worker.py (the same one-level U-Net). Each process writes
``OUT_DIR/<name>.npz`` after training (the chief's loss curve is also in its metrics.jsonl).
"""

import faulthandler
import os
import signal
import sys

# The test sends SIGUSR1 to a process that overran its time: its stacks then show where.
faulthandler.register(signal.SIGUSR1, all_threads=True)

role, out_dir = sys.argv[1], sys.argv[2]

import functools  # noqa: E402
import json  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

BACKEND = keras.backend.backend()
if role == "reference" and BACKEND == "tensorflow":
    from keras_etsdm import distribute  # noqa: E402  (starts no TensorFlow runtime)

    distribute.set_virtual_cpu_devices(2)  # before the TensorFlow runtime starts

from keras_etsdm import folding, optimizers, training  # noqa: E402
from keras_etsdm.data import make_dataset  # noqa: E402

STEPS = 3


def task_index():
    """This process's index in the cluster (0 is the chief)."""
    if BACKEND == "tensorflow":
        return int(json.loads(os.environ["TF_CONFIG"])["task"]["index"])
    return int(os.environ["KERAS_DISTRIBUTION_PROCESS_ID"])


def run(mode, workdir):
    """Train a tiny U-Net (tests/distribute_worker.py's: one resolution level, a third less
    to compile than two) for STEPS steps in ``workdir``."""
    network = functools.partial(folding.build_network, base_channels=8, channel_mult=(1,),
                                num_res_blocks=1, attention_resolutions=(), dropout=0.1)
    return training.train(
        workdir, max_steps=STEPS, distribution=mode, batch_size=8, log_every=1,
        checkpoint_every=0, sample_every=0, handle_signals=False,
        jit_compile=BACKEND == "jax",
        model_fn=functools.partial(training.build_model, image_size=8, channels=1,
                                   network_fn=network, ema_decay=0.9, seed=3),
        dataset_fn=functools.partial(make_dataset, source="embedded", name="digits"),
        optimizer_fn=functools.partial(optimizers.make_optimizer, learning_rate=1e-3,
                                       grad_clip_norm=1.0))


def device_layout(model):
    """How this process's replicas sit in the cluster: total replicas, local ones, ids."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        strategy = model.distribute_strategy
        # Replica ids pick each replica's noise stream (backend.ReplicaSeedGenerator).
        ids = strategy.run(lambda: tf.distribute.get_replica_context().replica_id_in_sync_group)
        local_ids = [int(v) for v in strategy.experimental_local_results(ids)]
        return {"replicas": strategy.num_replicas_in_sync, "local_replica_ids": local_ids}
    import jax

    return {"replicas": len(jax.devices()), "local_replica_ids": [jax.process_index()],
            "process_count": jax.process_count(), "local_devices": jax.local_device_count()}


def main():
    if role == "worker":
        name, mode = f"worker{task_index()}", "multi_worker"
    else:
        name, mode = "reference", "mirrored" if BACKEND == "tensorflow" else "none"
    workdir = os.path.join(out_dir, name)
    result = run(mode, workdir)
    model = result.model
    # Replicated on every device; on JAX a global array that also has a local copy.
    weights = [np.asarray(keras.ops.convert_to_numpy(w.value)) for w in model.weights]
    saved = {
        "steps": [step for step, _ in result.history],
        "losses": [loss for _, loss in result.history],
        "grad_norm": float(keras.ops.convert_to_numpy(model.optimizer.grad_norm)),
        "final_step": result.step,
        "num_weights": len(weights),
        **{f"w{i}": w for i, w in enumerate(weights)},
        **device_layout(model),
    }
    path = os.path.join(out_dir, f"{name}.npz")
    np.savez(path + ".tmp.npz", **saved)
    os.replace(path + ".tmp.npz", path)  # the test reads it while the process may still run
    print(f"multiworker_worker {name} done", flush=True)


if __name__ == "__main__":
    main()

"""Run in a FRESH process by tests/test_distribute.py: virtual CPU devices must be configured
before the backend starts. Trains the same tiny model on one device and data-parallel on N and
writes the results to an .npz (usage: distribute_worker.py N MODE OUT_DIR)."""

import os
import sys

count, parallel_mode, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={count}").strip()

import functools  # noqa: E402
import json  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)])

from keras_etsdm import checkpoint, folding, optimizers, training  # noqa: E402
from keras_etsdm.data import make_dataset  # noqa: E402

STEPS = 3


def run(mode, workdir):
    # One U-Net level (as tests/multiworker_worker.py): each run compiles its train step, and
    # how replicas split a batch and reduce its loss and gradient does not depend on the depth.
    network = functools.partial(folding.build_network, base_channels=8, channel_mult=(1,),
                                num_res_blocks=1, attention_resolutions=(), dropout=0.1)
    result = training.train(
        workdir, max_steps=STEPS, distribution=mode, batch_size=8, log_every=1,
        checkpoint_every=0, sample_every=0, handle_signals=False,
        jit_compile=keras.backend.backend() == "jax",
        model_fn=functools.partial(training.build_model, image_size=8, channels=1,
                                   network_fn=network, ema_decay=0.9, seed=3),
        dataset_fn=functools.partial(make_dataset, source="embedded", name="digits"),
        optimizer_fn=functools.partial(optimizers.make_optimizer, learning_rate=1e-3,
                                       grad_clip_norm=1.0))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    model = result.model
    weights = [np.asarray(keras.ops.convert_to_numpy(w.value)) for w in model.weights]
    return records, weights, model


single_records, single_weights, _ = run("none", os.path.join(out_dir, "single"))
parallel_records, parallel_weights, model = run(parallel_mode, os.path.join(out_dir, "parallel"))
replicas = -1
replica_noise_differs = -1
if keras.backend.backend() == "tensorflow":
    strategy = model.distribute_strategy
    replicas = strategy.num_replicas_in_sync
    x = tf.zeros((4, 8, 8, 1))
    per_replica = strategy.run(lambda images: model(images)["noise"], args=(x,))
    noises = [np.asarray(v) for v in strategy.experimental_local_results(per_replica)]
    replica_noise_differs = int(not np.allclose(noises[0], noises[1]))
else:
    import jax

    replicas = len(jax.devices())
reloaded = checkpoint.load_checkpoint(os.path.join(out_dir, "parallel"))
np.savez(os.path.join(out_dir, "result.npz"),
         single_loss=[r["loss"] for r in single_records],
         parallel_loss=[r["loss"] for r in parallel_records],
         single_grad_norm=[r["grad_norm"] for r in single_records],
         parallel_grad_norm=[r["grad_norm"] for r in parallel_records],
         replicas=replicas, replica_noise_differs=replica_noise_differs,
         reloaded_step=reloaded.checkpoint_step,
         **{f"single_w{i}": w for i, w in enumerate(single_weights)},
         **{f"parallel_w{i}": w for i, w in enumerate(parallel_weights)},
         num_weights=len(single_weights))
print("distribute_worker done")

"""Training-step speed of two Winograd kernel gradients, paired in one process (a screen).

    KERAS_BACKEND=jax python benchmarks/results/avx2/winograd/kernel_gradient_pair.py --rounds 15

Builds the DDPM CIFAR-10 U-Net twice (same weights) with Winograd in training
(winograd.IN_TRAINING): model A with the library's kernel gradient (16 matmuls over the
transformed tiles), model B with one of temp_probe.py's variants (``--variant per_tap``: 9
matmuls of shifted inputs; ``forward_order``: the library's gradient before its backward
transform of the input was reordered, which XLA merged with the forward's);
then times one train_on_batch of each per round, in a random order per round. Prints per-round
seconds, medians and the paired ratio A ÷ B with a 95 % bootstrap interval.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, HERE)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", choices=("per_tap", "forward_order"), default="per_tap",
                   help="model B's kernel gradient (temp_probe.py's patches)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from keras_etsdm import cpu_tuning

    cpu_tuning.reexec_with_huge_page_malloc()
    cpu_tuning.tune_xla_for_cpu()
    import numpy as np
    import keras
    import harness
    from keras_etsdm import DiffusionModel, build_unet, winograd
    from keras_etsdm.optimizers import make_optimizer
    from small_conv import NETWORKS
    import temp_probe

    winograd.IN_TRAINING = True
    x = np.clip(np.random.default_rng(0).standard_normal((8, 32, 32, 3)), -1, 1)
    x = x.astype("float32")
    models, first = {}, {}
    original = winograd.conv3x3_same
    for name in ("A", "B"):
        if name == "B":
            getattr(temp_probe, f"patch_{args.variant}_kernel_gradient")(winograd)
        keras.utils.set_random_seed(0)
        network = build_unet(image_size=32, channels=3, **NETWORKS["cifar10"])
        model = DiffusionModel(network, seed=0)
        model.compile(optimizer=make_optimizer(learning_rate=2e-4, grad_clip_norm=1.0),
                      jit_compile=True)
        start = time.perf_counter()
        model.train_on_batch(x)  # traced now, with this kernel gradient
        first[name] = time.perf_counter() - start
        model.train_on_batch(x)  # warm-up
        models[name] = model
    winograd.conv3x3_same = original
    rng = np.random.default_rng(args.seed)
    times = {"A": [], "B": []}
    for _ in range(args.rounds):
        for name in rng.permutation(["A", "B"]):
            start = time.perf_counter()
            models[name].train_on_batch(x)
            times[name].append(time.perf_counter() - start)
    a, b = np.asarray(times["A"]), np.asarray(times["B"])
    ci = harness.paired_ratio_ci(a, b)
    result = {"machine": harness.machine_description(), "variant_b": args.variant,
              "first_call_s": first,
              "seconds": times,
              "median_s": {"A": float(np.median(a)), "B": float(np.median(b))},
              "ratio_a_over_b": ci}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

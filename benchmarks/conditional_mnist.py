#!/usr/bin/env python
"""Does a class-conditional E-TSDM model trained on the embedded MNIST draw the digit it is
asked for? Classifier agreement, FD / KID / IS and a per-class grid for each guidance scale w.

    # 1. train (the default.gin model and budget + class embedding, ~35-60 min on 2 cores):
    KERAS_BACKEND=tensorflow bin/train --gin_file=mnist_cond.gin --workdir=runs/mnist_cond \\
        --gin.train.max_steps=6000
    # 2. score it (~10 min):
    KERAS_BACKEND=tensorflow python benchmarks/conditional_mnist.py --workdir=runs/mnist_cond \\
        --output_dir=benchmarks/results/conditional_mnist

For every w in --scales: N samples (labels i mod 10, so every digit N/10 times) with DDIM-20
from the EMA weights, the same starting noise for every w (seed), scored by the project's
offline ``mnist32`` classifier: agreement of its argmax with the requested label (overall with
a Wilson 95 % interval, and per class), FD and KID of its features, and its classifier score
(IS). Writes results.json (every number, machine, timings), results.md and grid_w<w>.png (one
row per digit).

The FD reference is the 5,000 embedded training images (no held-out MNIST ships with a
package here); the classifier trained on 4,000 of them (its 1,000-image held-out split scores
96.2 %). So FD here compares arms, it is no held-out quality figure.
"""

import json
import math
import os
import sys
import time

from absl import app, flags

flags.DEFINE_string("workdir", "runs/mnist_cond", "Training work directory of the model.")
flags.DEFINE_string("output_dir", "benchmarks/results/conditional_mnist", "Report directory.")
flags.DEFINE_list("scales", ["0", "0.5", "1", "2", "4"], "Guidance scales w.")
flags.DEFINE_integer("num_samples", 1000, "Samples per w (a multiple of 10).")
flags.DEFINE_string("sampler", "ddim", "Sampler name.")
flags.DEFINE_integer("steps", 20, "Sampler steps.")
flags.DEFINE_integer("seed", 0, "Seed of the starting noise (the same for every w).")
flags.DEFINE_integer("batch_size", 250, "Samples per compiled call.")
FLAGS = flags.FLAGS

NUM_CLASSES = 10


def wilson_interval(hits, n, z=1.96):
    """95 % Wilson score interval of a binomial proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def cpu_isa():
    """The SIMD extensions that matter for these kernels, from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return "unknown ISA"
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(flag for flag in wanted if flag in flags) or "no AVX2"


def class_grid(images_uint8, labels, per_row=10):
    """One row per class: the first ``per_row`` samples of each label, as one uint8 image."""
    import numpy as np

    from keras_etsdm.io_utils import image_grid

    rows = []
    for c in range(NUM_CLASSES):
        rows.append(images_uint8[labels == c][:per_row])
    picked = np.concatenate(rows, axis=0).astype(np.float32) / 127.5 - 1.0
    return image_grid(picked, columns=per_row)


def main(argv):
    del argv
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import keras

    from benchmarks.harness import machine_description
    from keras_etsdm import cli
    from keras_etsdm.checkpoint import load_model
    from keras_etsdm.evaluation import evaluate, fid
    from keras_etsdm.evaluation.features import make_extractor
    from keras_etsdm.io_utils import save_png, to_uint8
    from keras_etsdm.samplers import build_sampler, sampling

    os.makedirs(FLAGS.output_dir, exist_ok=True)
    started = time.time()
    extractor = make_extractor("classifier_mnist32")
    reference_images = evaluate.load_reference_images("embedded:mnist", 32)
    reference = fid.compute_reference_statistics(reference_images, extractor,
                                                 metadata={"data": "embedded:mnist"})
    model = load_model(workdir=FLAGS.workdir, use_ema=True)
    if not model.conditional:
        raise SystemExit(f"{FLAGS.workdir} holds an unconditional model.")
    sampler = build_sampler(FLAGS.sampler, model.schedule, FLAGS.steps)
    labels, n = cli.parse_labels("balanced", FLAGS.num_samples, model.num_classes)
    with open(os.path.join(FLAGS.workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    results = {
        "machine": f"{machine_description()}; ISA: {cpu_isa()}",
        "backend": keras.backend.backend(),
        "workdir": os.path.abspath(FLAGS.workdir),
        "checkpoint_step": getattr(model, "checkpoint_step", None),
        "last_logged_loss": records[-1].get("loss") if records else None,
        # Step time only (no compile, checkpoint or grid time): sum of logged s/step × steps.
        "train_step_minutes": sum(
            r["seconds_per_step"] * (r["step"] - (records[i - 1]["step"] if i else 0))
            for i, r in enumerate(records) if "seconds_per_step" in r) / 60.0,
        "sampler": {"name": FLAGS.sampler, "steps": FLAGS.steps,
                    "config": {k: v for k, v in sampler.get_config().items() if k != "schedule"}},
        "num_samples": n, "seed": FLAGS.seed, "weights": "ema",
        "extractor": extractor.name, "reference": "embedded:mnist (the 5,000 training images)",
        "reference_count": reference.count, "scales": {},
    }
    for text in FLAGS.scales:
        w = float(text)
        t0 = time.time()
        images = to_uint8(sampling.generate(model, sampler, n, FLAGS.batch_size,
                                                FLAGS.seed, labels=labels, guidance_scale=w))
        sample_seconds = time.time() - t0
        metrics = fid.evaluate_images(images, extractor, reference, labels=labels)
        hits = int(round(metrics["class_agreement"] * n))
        low, high = wilson_interval(hits, n)
        metrics["class_agreement_95ci"] = [low, high]
        metrics["sample_seconds"] = sample_seconds
        metrics["nfe_per_sample"] = sampler.num_iterations * (2 if w else 1)
        results["scales"][text] = metrics
        save_png(os.path.join(FLAGS.output_dir, f"grid_w{text}.png"), class_grid(images, labels))
        print(f"w={w:g}: agreement {metrics['class_agreement']:.3f} [{low:.3f}, {high:.3f}]  "
              f"FD {metrics['fd']:.2f}  KID {metrics['kid']:.4f}  "
              f"IS {metrics['classifier_score']:.3f}  ({sample_seconds:.0f} s)", flush=True)
    results["total_seconds"] = time.time() - started
    with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    lines = [f"Conditional E-TSDM on the embedded MNIST: {FLAGS.workdir} (checkpoint step "
             f"{results['checkpoint_step']}), {FLAGS.sampler.upper()}-{FLAGS.steps} from the EMA "
             f"weights, N = {n} per w (labels i mod 10), noise seed {FLAGS.seed}; "
             f"{results['machine']}; {results['backend']}.", "",
             "| w | agreement (95 % CI) | worst class | FD | KID | IS | NFE/sample |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for text, m in results["scales"].items():
        per = m["class_agreement_per_class"]
        worst = min(per, key=per.get)
        lines.append(f"| {text} | {m['class_agreement']:.3f} ({m['class_agreement_95ci'][0]:.3f}"
                     f"–{m['class_agreement_95ci'][1]:.3f}) | {worst}: {per[worst]:.2f} | "
                     f"{m['fd']:.2f} | {m['kid']:.4f} | {m['classifier_score']:.3f} | "
                     f"{m['nfe_per_sample']} |")
    lines += ["", "Per-class agreement:", "",
              "| w | " + " | ".join(str(c) for c in range(NUM_CLASSES)) + " |",
              "|---:|" + "---:|" * NUM_CLASSES]
    for text, m in results["scales"].items():
        per = m["class_agreement_per_class"]
        lines.append(f"| {text} | " + " | ".join(f"{per[c]:.2f}" for c in range(NUM_CLASSES))
                     + " |")
    with open(os.path.join(FLAGS.output_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)

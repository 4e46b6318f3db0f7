"""The Winograd form's transforms as matmuls (the library now: the output transforms and the
backward pass's input transform; the forward pass's input transform stays additions) against the
elementwise ones before (commit f306f3f): speed of the CIFAR-10 U-Net's training step and forward
pass, paired.

    python benchmarks/results/avx2/winograd_transforms/transform_pair.py --backend jax --rounds 15

Two worker processes, started as ``benchmarks/small_conv.py``'s are (bin/'s malloc tunables and
XLA flags, no persistent compilation cache), both with Winograd in training steps
(``winograd.IN_TRAINING``): "matmul" runs the library as it is (or ``--variant``);
"elementwise" replaces ``winograd.conv3x3_same`` with that of ``keras_etsdm/winograd.py`` at
f306f3f (read with ``git show``, not committed here), whose transforms were additions over the
tiles. Prints the first
call of each task in each worker (trace + compile + run; in-process, so a compile screen only:
``first_call.py`` measures fresh processes) and per task the medians and the paired ratio
elementwise ÷ matmul of the time with a 95 % bootstrap interval, over rounds in a random order.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

OLD_COMMIT = "f306f3f"


def _old_winograd():
    source = subprocess.run(["git", "-C", ROOT, "show", f"{OLD_COMMIT}:keras_etsdm/winograd.py"],
                            check=True, capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "winograd_elementwise.py")
    with open(path, "w") as f:
        f.write(source)
    return _module_from(path)


def _module_from(path):
    spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(args):
    import numpy as np
    import keras

    import harness
    from keras_etsdm import DiffusionModel, build_unet, winograd
    from keras_etsdm import backend as etsdm_backend
    from keras_etsdm.optimizers import make_optimizer
    from small_conv import NETWORKS

    winograd.IN_TRAINING = True
    if args.form == "elementwise":
        winograd.conv3x3_same = _old_winograd().conv3x3_same
    elif args.variant:
        winograd.conv3x3_same = _module_from(args.variant).conv3x3_same
    jit = True
    keras.utils.set_random_seed(0)
    network = build_unet(image_size=32, channels=3, **NETWORKS["cifar10"])
    network.jit_compile = jit
    model = DiffusionModel(network, seed=0)  # bin/train's optimizer
    model.compile(optimizer=make_optimizer(learning_rate=2e-4, grad_clip_norm=1.0),
                  jit_compile=jit)
    etsdm_backend.release_build_memory()
    rng = np.random.default_rng(0)
    x = np.clip(rng.standard_normal((8, 32, 32, 3)), -1, 1).astype("float32")
    t = rng.integers(0, 1000, size=(8,)).astype("float32")
    calls = {"forward": lambda: network.predict_on_batch({"x": x, "t": t}),
             "train": lambda: model.train_on_batch(x)}

    def measure(request):
        start = time.perf_counter()
        calls[request["task"]]()
        return {"seconds": time.perf_counter() - start}

    harness.worker_loop({"measure": measure})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="jax", choices=("jax", "tensorflow"))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--tasks", default="train,forward")
    p.add_argument("--variant", default=None,
                   help="a screen: the matmul side runs conv3x3_same from this winograd.py "
                        "variant instead of the library's")
    p.add_argument("--json", default=None)
    p.add_argument("--form", choices=("matmul", "elementwise"), help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import numpy as np

    import harness

    forms = ("elementwise", "matmul")
    workers = {}
    result = {"machine": harness.machine_description(), "backend": args.backend,
              "variant": args.variant,
              "rounds": args.rounds, "old_commit": OLD_COMMIT, "tasks": {}}
    print(result["machine"], flush=True)
    try:
        for form in forms:
            argv = [sys.executable, os.path.abspath(__file__), "--worker", "--form", form,
                    "--backend", args.backend] + (["--variant", args.variant] if args.variant
                                                  else [])
            workers[form] = harness.Worker(form, argv, malloc="hugetlb",
                                           env={"KERAS_BACKEND": args.backend},
                                           cold_compile=True)
        for i, task in enumerate(t.strip() for t in args.tasks.split(",") if t.strip()):
            first = {f: w.request("measure", task=task)["seconds"] for f, w in workers.items()}
            for w in workers.values():  # warm-up
                w.request("measure", task=task)
            rounds = harness.interleave(list(workers.values()), "measure", args.rounds,
                                        orders=harness.round_orders(list(forms), args.rounds,
                                                                    seed=i),
                                        task=task)
            seconds = {f: [r["seconds"] for r in rs] for f, rs in rounds.items()}
            ci = harness.paired_ratio_ci(seconds["elementwise"], seconds["matmul"])
            result["tasks"][task] = {"first_call_s": first, "seconds": seconds,
                                     "median_s": {f: float(np.median(s))
                                                  for f, s in seconds.items()},
                                     "elementwise_over_matmul": ci}
            print(f"{task}: first call elementwise {first['elementwise']:.1f} s, matmul "
                  f"{first['matmul']:.1f} s; median {1e3 * np.median(seconds['elementwise']):.0f}"
                  f" vs {1e3 * np.median(seconds['matmul']):.0f} ms, elementwise ÷ matmul "
                  f"{ci['ratio']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]", flush=True)
    finally:
        for w in workers.values():
            w.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

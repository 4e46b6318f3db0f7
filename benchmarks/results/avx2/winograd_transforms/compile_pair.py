"""The training step's compile, three forms alternated in ONE process: direct convolutions, the
Winograd form with elementwise transforms (commit f306f3f) and "matmul", the library's form now
(its output transforms and the backward pass's input transform as matmuls; the forward pass's
input transform still additions).

    KERAS_BACKEND=jax python benchmarks/results/avx2/winograd_transforms/compile_pair.py --rounds 6

Fresh processes (``benchmarks/first_call.py``) differ by more than the forms do on a machine
whose speed swings, so here one process (started as bin/ starts: malloc tunables, XLA flags, no
persistent compilation cache) builds the DDPM CIFAR-10 U-Net with bin/train's optimizer once,
then per round, in a random order, makes a new train function for each form
(``model.make_train_function(force=True)``: traced, lowered and compiled anew) and times its
first ``train_on_batch`` (trace + lower + XLA compile + one step; the phases from JAX's
monitoring events) and a second one. Prints per-round values, medians, and paired ratios with a
95 % bootstrap interval.
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

FORMS = ("direct", "elementwise", "matmul")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", default=None,
                   help="a screen: a fourth form, \"variant\", running conv3x3_same from this "
                        "winograd.py variant")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    forms = FORMS + (("variant",) if args.variant else ())
    sys.path.insert(0, os.path.join(ROOT, "bin"))
    import _startup

    os.environ["KERAS_ETSDM_COMPILATION_CACHE"] = "0"  # every compile here is a real one
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    _startup.tune_process()
    import jax
    import jax.monitoring
    import numpy as np
    import keras

    import harness
    from first_call import _PhaseSums
    from keras_etsdm import DiffusionModel, build_unet, winograd
    from keras_etsdm import backend as etsdm_backend
    from keras_etsdm.optimizers import make_optimizer
    from small_conv import NETWORKS
    from transform_pair import _module_from, _old_winograd

    assert not jax.config.jax_compilation_cache_dir, "the persistent compilation cache is on"
    convs = {"direct": winograd.conv3x3_same, "elementwise": _old_winograd().conv3x3_same,
             "matmul": winograd.conv3x3_same}
    if args.variant:
        convs["variant"] = _module_from(args.variant).conv3x3_same
    recorder = _PhaseSums()
    jax.monitoring.register_event_duration_secs_listener(recorder)
    keras.utils.set_random_seed(0)
    network = build_unet(image_size=32, channels=3, **NETWORKS["cifar10"])
    model = DiffusionModel(network, seed=0)
    model.compile(optimizer=make_optimizer(learning_rate=2e-4, grad_clip_norm=1.0),
                  jit_compile=True)
    etsdm_backend.release_build_memory()
    x = np.clip(np.random.default_rng(0).standard_normal((8, 32, 32, 3)), -1, 1)
    x = x.astype("float32")
    machine = harness.machine_description()
    print(machine, flush=True)
    rows = {form: [] for form in forms}
    for order in harness.round_orders(list(forms), args.rounds, seed=args.seed):
        for form in order:
            winograd.IN_TRAINING = form != "direct"
            winograd.conv3x3_same = convs[form]
            model.make_train_function(force=True)
            recorder.take()
            start = time.perf_counter()
            model.train_on_batch(x)
            first = time.perf_counter() - start
            phases = recorder.take()
            start = time.perf_counter()
            model.train_on_batch(x)
            second = time.perf_counter() - start
            row = {"first_call_s": first, "second_call_s": second,
                   **{k: phases.get(k, 0.0) for k in ("trace", "lower", "xla_compile")}}
            rows[form].append(row)
            print(form, json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)
    result = {"machine": machine, "rounds": args.rounds, "seed": args.seed,
              "variant": args.variant, "rows": rows, "medians": {}, "ratios": {}}
    for form in forms:
        result["medians"][form] = {k: float(np.median([r[k] for r in rows[form]]))
                                   for k in rows[form][0]}
    pairs = [("matmul", "elementwise"), ("matmul", "direct"), ("elementwise", "direct")]
    if args.variant:
        pairs += [("variant", "matmul"), ("variant", "elementwise"), ("variant", "direct")]
    for a, b in pairs:
        result["ratios"][f"{a}/{b}"] = {
            k: harness.paired_ratio_ci([r[k] for r in rows[a]], [r[k] for r in rows[b]])
            for k in ("first_call_s", "xla_compile", "trace", "second_call_s")}
    for form, med in result["medians"].items():
        print(f"median {form}: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
    for name, ratios in result["ratios"].items():
        print(f"{name}: " + ", ".join(f"{k} {c['ratio']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"
                                      for k, c in ratios.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

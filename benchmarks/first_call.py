"""First call of the training step in a NEW process, with and without the compilation cache.

Issue 19 item 5: the first call of the compiled training step (tracing + XLA compilation + one
step) on the DDPM CIFAR-10 U-Net (35.7 M parameters, batch 8, as ``vs_diffusers.py``), per
Keras backend. Every measurement is a fresh Python process started the way the ``bin/`` entry
points start (huge-page malloc, the XLA CPU flags of ``keras_etsdm/cpu_tuning.py``), so nothing
is warm but the OS page cache. Per backend and round, three processes in a row:

  off    the persistent compilation cache turned off (``KERAS_ETSDM_COMPILATION_CACHE=0``);
  cold   the cache on, in a new empty directory (compiles and writes the entries);
  warm   the cache on, the directory the ``cold`` process filled (what a second ``bin/train``,
         a resume, or ``bin/sample`` after training sees).

Reported per process: import seconds (``import keras_etsdm``), build seconds (network +
``DiffusionModel`` + ``compile``), first-call and second-call seconds of ``train_on_batch``,
peak RSS; medians over rounds. On JAX the JSON also splits the build's and the first call's
compile work into JAX's phases (``build_phases_s`` / ``first_call_phases_s``: seconds and counts
of tracing to a jaxpr, lowering to StableHLO and XLA's backend compile, from JAX's monitoring
events).

    python benchmarks/first_call.py --rounds 3 --json benchmarks/results/first_call/first_call.json
    python benchmarks/first_call.py --base_channels 32 --rounds 1      # smoke test
    python benchmarks/first_call.py --backends tensorflow --jit_compile auto --modes off
        # bin/train's choice (TensorFlow without XLA on AVX-512: nothing to cache)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_START = time.perf_counter()

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

MODES = ("off", "cold", "warm")
OPTIMIZERS = ("adam", "clipped_adam", "clipped_adam_unfused")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="jax,tensorflow")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--base_channels", type=int, default=128)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--jit_compile", choices=("true", "false", "auto"), default="true",
                   help="auto: what bin/train uses (keras_etsdm.backend."
                        "default_train_jit_compile)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="adam: Keras's Adam 2e-4; clipped_adam: bin/train's "
                        "(optimizers.make_optimizer: Adam 2e-4, global-norm clipping at 1.0, "
                        "TensorFlow's fused update); clipped_adam_unfused: the same with "
                        "Keras's per-operation update (fused=False)")
    p.add_argument("--winograd_training", default="auto",
                   help="train(winograd_training=...) in the worker: auto (the default, "
                        "bin/train's per-ISA choice), 0 (direct convolutions in the training "
                        "step), 1 (Winograd at every size) or N ≥ 8 (Winograd at outputs up to "
                        "N×N)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"Comma-separated subset of {', '.join(MODES)}.")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def modes_of(args):
    """The --modes in MODES order (warm needs cold before it in the same round)."""
    asked = {m.strip() for m in args.modes.split(",") if m.strip()}
    unknown = asked - set(MODES)
    if unknown or not asked:
        raise SystemExit(f"--modes: {args.modes!r} is not a subset of {', '.join(MODES)}.")
    if "warm" in asked and "cold" not in asked:
        raise SystemExit("--modes: 'warm' reads the cache 'cold' fills; give both.")
    return [m for m in MODES if m in asked]


def worker(args):
    """One process: time import, build, first and second training call; print one JSON line."""
    t0 = time.perf_counter()
    import keras

    from keras_etsdm import DiffusionModel, backend, build_unet, winograd
    phases = _jax_phase_recorder()
    winograd.IN_TRAINING, winograd.TRAINING_MAX_SIZE = winograd.training_setting(
        harness.winograd_training_value(args.winograd_training))
    t1 = time.perf_counter()
    jit_compile = (backend.default_train_jit_compile() if args.jit_compile == "auto"
                   else args.jit_compile == "true")
    keras.utils.set_random_seed(0)
    network = build_unet(image_size=args.image_size, channels=3,
                         base_channels=args.base_channels, channel_mult=(1, 2, 2, 2),
                         num_res_blocks=2, attention_resolutions=(16,), dropout=0.1, num_heads=1)
    model = DiffusionModel(network, ema_decay=0.9999, seed=0)
    # Default XLA on both backends (what the cache holds); bin/train's 'auto' skips XLA for
    # TensorFlow on AVX-512 CPUs (--jit_compile auto measures that path).
    if args.optimizer == "adam":
        optimizer = keras.optimizers.Adam(2e-4)
    else:
        from keras_etsdm.optimizers import make_optimizer

        optimizer = make_optimizer(learning_rate=2e-4, grad_clip_norm=1.0,
                                   fused=args.optimizer == "clipped_adam")
    model.compile(optimizer=optimizer, jit_compile=jit_compile)
    rng = np.random.default_rng(0)
    x = np.clip(rng.standard_normal((args.batch, args.image_size, args.image_size, 3)), -1, 1)
    x = x.astype(np.float32)
    build_phases = phases.take()
    t2 = time.perf_counter()
    model.train_on_batch(x)
    t3 = time.perf_counter()
    first_call_phases = phases.take()
    model.train_on_batch(x)
    t4 = time.perf_counter()
    print("RESULT " + json.dumps({
        "backend": keras.backend.backend(), "interpreter_s": t0 - _START, "import_s": t1 - t0,
        "build_s": t2 - t1, "first_call_s": t3 - t2, "second_call_s": t4 - t3,
        "jit_compile": jit_compile, "optimizer": args.optimizer,
        "winograd_training": args.winograd_training, "build_phases_s": build_phases,
        "first_call_phases_s": first_call_phases,
        "peak_rss_mib": harness.peak_rss_mib()}), flush=True)


class _PhaseSums:
    """Seconds per JAX compile phase since the last ``take`` (JAX's monitoring events)."""

    NAMES = {"/jax/core/compile/jaxpr_trace_duration": "trace",
             "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
             "/jax/core/compile/backend_compile_duration": "xla_compile"}

    def __init__(self):
        self.sums = {}

    def __call__(self, event, duration, **_):
        name = self.NAMES.get(event)
        if name is not None:
            self.sums[name] = self.sums.get(name, 0.0) + duration
            self.sums[name + "_count"] = self.sums.get(name + "_count", 0) + 1

    def take(self):
        sums, self.sums = self.sums, {}
        return sums


def _jax_phase_recorder():
    """A ``_PhaseSums`` listening to JAX's compile events (stays empty on other backends):
    where a first call's seconds go — tracing to a jaxpr, lowering to StableHLO, XLA's compile."""
    import keras

    recorder = _PhaseSums()
    if keras.backend.backend() == "jax":
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(recorder)
    return recorder


def run_process(args, backend, cache_root):
    """A fresh worker process for ``backend``; cache_root None = cache off. Returns its dict."""
    tuning = harness._cpu_tuning()
    cache = harness._compilation_cache()
    env = harness.without_compilation_cache(dict(os.environ, KERAS_BACKEND=backend))
    env = harness.malloc_environ(env, "hugetlb")
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2"})
    env = tuning.jax_xla_environ(env) or env
    if cache_root is not None:
        env = cache.cache_environ(env, backend, cache_root)
    argv = [sys.executable, os.path.abspath(__file__), "--worker",
            "--base_channels", str(args.base_channels), "--image_size", str(args.image_size),
            "--batch", str(args.batch), "--jit_compile", args.jit_compile,
            "--optimizer", args.optimizer, "--winograd_training", args.winograd_training]
    start = time.perf_counter()
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"worker ({backend}, cache {cache_root}) failed with code "
                           f"{out.returncode}:\n{out.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_wall_s"] = wall
    if cache_root is not None:
        size = sum(os.path.getsize(os.path.join(d, f))
                   for d, _, files in os.walk(cache_root) for f in files)
        result["cache_mib"] = size / 2**20
    return result


def report(results, args, header):
    keys = ("import_s", "build_s", "first_call_s", "second_call_s", "peak_rss_mib")
    lines = [header, "",
             f"DDPM CIFAR-10 U-Net (base_channels {args.base_channels}, "
             f"{args.image_size}×{args.image_size}), batch {args.batch}, float32, "
             f"`train_on_batch` with jit_compile={args.jit_compile}, optimizer "
             f"{args.optimizer}, winograd_training {args.winograd_training}; "
             f"{args.rounds} round(s), "
             f"each a fresh process per mode ({' → '.join(modes_of(args))}). Medians over "
             f"rounds; the last column lists the first call of every round.", "",
             "| backend | XLA | cache | import s | build s | first call s | second call s | "
             "peak RSS MiB | cache MiB | first calls per round |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for backend, modes in results.items():
        for mode in modes_of(args):
            rows = modes[mode]
            med = {k: float(np.median([r[k] for r in rows])) for k in keys}
            cache = (f"{np.median([r['cache_mib'] for r in rows]):.0f}"
                     if "cache_mib" in rows[0] else "—")
            per_round = ", ".join(f"{r['first_call_s']:.1f}" for r in rows)
            xla = "yes" if rows[0].get("jit_compile", True) else "no"
            lines.append(f"| {backend} | {xla} | {mode} | {med['import_s']:.1f} | {med['build_s']:.1f} "
                         f"| {med['first_call_s']:.1f} | {med['second_call_s']:.2f} | "
                         f"{med['peak_rss_mib']:.0f} | {cache} | {per_round} |")
    return "\n".join(lines) + "\n"


def main(args):
    roof = harness.numpy_matmul_roof(2048, 5)
    header = harness.cpu_header(roof)
    print(header, flush=True)
    results = {}
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        results[backend] = {m: [] for m in modes_of(args)}
        for r in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="xla-cache-") as root:
                for mode in modes_of(args):
                    res = run_process(args, backend, None if mode == "off" else root)
                    results[backend][mode].append(res)
                    print(f"  {backend:<10} round {r} {mode:<4}: first call "
                          f"{res['first_call_s']:6.1f} s, build {res['build_s']:5.1f} s, "
                          f"import {res['import_s']:4.1f} s, second {res['second_call_s']:.2f} s",
                          flush=True)
    md = report(results, args, header)
    print("\n" + md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    if args.json:
        harness.write_json_atomic(args.json, {"args": vars(args), "cpu_header": header,
                                              "roof": roof, "results": results,
                                              "markdown": md})


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.worker:
        worker(parsed)
    else:
        main(parsed)

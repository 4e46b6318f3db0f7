#!/usr/bin/env python
"""Where the training process's memory goes (issue 19 item 5: peak RSS against diffusers').

    python benchmarks/memory.py \
        --configs jax,tensorflow,jax@default,tensorflow@default,jax@cache#1,jax@cache#2 \
        --output_dir benchmarks/results/memory

Each configuration runs in a fresh process (``<backend>[@hugetlb|@default][@cache][@keep]``, see
``run_config``; malloc ``hugetlb`` is the glibc huge-page tunable the bin/ entry points set,
``default`` plain glibc; JAX gets the bin/ start-up XLA flag either way) and trains the DDPM CIFAR-10 U-Net of ``vs_diffusers.py`` (35.7 M
parameters, batch 8, float32, EMA, Adam, the library's ``train.jit_compile='auto'`` choice)
with ``train_on_batch``, reading ``/proc/self/status`` after each stage:

* ``python``: interpreter + numpy;
* ``import``: + Keras, the backend and keras_etsdm;
* ``built``: + the network, the ``DiffusionModel`` (EMA copy) and ``compile``;
* ``first step``: + the first training step (tracing / compilation, optimizer slots);
* ``steps``: + ``--steps`` more steps.

``--task ddim`` measures sampling instead: "first step" is the first ``DDIMSampler`` call
(``--sample_steps`` steps, batch ``--batch``, as ``vs_diffusers.py --tasks ddim`` runs it;
tracing and compiling the loop) and "steps" ``--steps`` more calls.

VmRSS is the resident set after the stage, VmHWM the peak so far (what ``ru_maxrss`` reports).
``@cache`` runs use the persistent compilation cache (``keras_etsdm/compilation_cache.py``) in
``--cache_dir``: the first fills it, a second loads the compiled step instead of compiling it.
The state every framework must hold is listed beside them: weights, Adam's two slots, the EMA
copy and one gradient, 4 bytes per parameter each.
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

STAGES = ("python", "import", "built", "first step", "steps")


def status_mib():
    """``{"rss": VmRSS, "hwm": VmHWM}`` of this process in MiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key[2:].lower()] = int(rest.split()[0]) / 1024.0
    return values


def build_training_model(base_channels=128, optimizer=None, jit_compile=None):
    """``(model, jit_compile)``: the DDPM CIFAR-10 U-Net (``base_channels`` 128: 35.7 M
    parameters) in a ``DiffusionModel`` with EMA, compiled with ``optimizer`` (default Keras's
    Adam 2e-4) and ``jit_compile`` (default the library's ``train.jit_compile='auto'``
    choice)."""
    import keras

    from keras_etsdm import DiffusionModel, build_unet
    from keras_etsdm import backend as etsdm_backend

    keras.utils.set_random_seed(0)
    network = build_unet(image_size=32, channels=3, base_channels=base_channels,
                         channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                         attention_resolutions=(16,), dropout=0.1, num_heads=1)
    model = DiffusionModel(network, ema_decay=0.9999, seed=0)
    jit = etsdm_backend.default_train_jit_compile() if jit_compile is None else jit_compile
    model.compile(optimizer=optimizer or keras.optimizers.Adam(2e-4), jit_compile=jit)
    return model, jit


def worker(args):
    import numpy as np

    stages = {"python": status_mib()}
    import keras

    from keras_etsdm import cpu_tuning
    from keras_etsdm import backend as etsdm_backend

    stages["import"] = status_mib()
    model, jit = build_training_model(args.base_channels)
    network = model.network
    etsdm_backend.RELEASE_COMPILER_MEMORY = args.release_compiler_memory
    if args.release:  # as training.train does after building
        etsdm_backend.release_build_memory()
    stages["built"] = status_mib()
    rng = np.random.default_rng(0)
    data = np.clip(rng.standard_normal((args.batch, 32, 32, 3)), -1, 1).astype(np.float32)
    if args.task == "ddim":
        from keras_etsdm.samplers import DDIMSampler

        sampler = DDIMSampler(num_steps=args.sample_steps, schedule=model.schedule)
        noise = rng.standard_normal((args.batch, 32, 32, 3)).astype(np.float32)

        def step():
            keras.ops.convert_to_numpy(sampler.sample(model, noise))
    else:
        def step():
            model.train_on_batch(data)  # returns the loss as a number: the step has finished
    step()
    stages["first step"] = status_mib()
    if args.trim_after_first_step:
        cpu_tuning.trim_heap()
        stages["trimmed"] = status_mib()
    for _ in range(args.steps):
        step()
    stages["steps"] = status_mib()
    print("RESULT " + json.dumps({"stages": stages, "params": int(network.count_params()),
                                  "jit_compile": jit, "backend": keras.backend.backend(),
                                  "xla_flags": os.environ.get("XLA_FLAGS", ""),
                                  "release_build_memory": args.release,
                                  "trim_after_first_step": args.trim_after_first_step,
                                  "release_compiler_memory": args.release_compiler_memory,
                                  "task": args.task, "sample_steps": args.sample_steps,
                                  "jax_sync_dispatch":
                                      cpu_tuning.jax_dispatches_synchronously()}))


def run_config(config, args):
    """One fresh process for ``<backend>[@hugetlb|@default][@cache][@release|@keep][@trim]
    [@keepcompiler][@async][#label]``:
    ``@cache`` turns the persistent compilation cache on in ``--cache_dir`` (as the bin/ entry
    points do; the first such run fills it, later ones load from it); ``@keep`` skips
    ``backend.release_build_memory`` after building, which ``training.train`` calls and every
    other configuration (``@release`` says so explicitly) calls too; ``@trim`` returns the C
    heap's free memory to the OS once after the first step (``cpu_tuning.trim_heap``);
    ``@keepcompiler`` runs the first step without giving the compiler's freed memory back
    (``backend.RELEASE_COMPILER_MEMORY = False``; by default the library does it between
    compiling and running on JAX, ``backend.compile_then_release``, and after the first call on
    TensorFlow, ``backend.run_then_release``); ``@async`` keeps JAX's asynchronous
    CPU dispatch (``KERAS_ETSDM_JAX_SYNC_DISPATCH=0``; the start-up tuning makes it synchronous
    on AVX-512, ``cpu_tuning`` item 5); ``#label`` only names a repeat."""
    from harness import _compilation_cache, _cpu_tuning, malloc_environ

    backend, *options = config.partition("#")[0].split("@")
    unknown = set(options) - {"hugetlb", "default", "cache", "release", "keep", "trim",
                              "keepcompiler", "async"}
    if unknown:
        raise SystemExit(f"{config}: unknown options {sorted(unknown)}; expected "
                         f"<backend>[@hugetlb|@default][@cache][@release|@keep][@trim]"
                         f"[@keepcompiler][@async][#label].")
    malloc = "default" if "default" in options else "hugetlb"
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    if "async" in options:
        env[_cpu_tuning().SYNC_DISPATCH_VARIABLE] = "0"
    env = malloc_environ(env, malloc)
    env = _cpu_tuning().jax_xla_environ(env) or env  # reads KERAS_BACKEND
    if "cache" in options:
        env = _compilation_cache().cache_environ(env, backend, root=args.cache_dir) or env
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--steps={args.steps}",
           f"--release={'keep' not in options}",
           f"--trim_after_first_step={'trim' in options}",
           f"--release_compiler_memory={'keepcompiler' not in options}",
           f"--batch={args.batch}", f"--base_channels={args.base_channels}",
           f"--task={args.task}", f"--sample_steps={args.sample_steps}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["glibc_tunables"] = env.get("GLIBC_TUNABLES", "")
            return result
    raise SystemExit(f"{config} failed ({out.returncode}):\n{out.stderr[-3000:]}")


def render(machine, args, results):
    task = ("Training" if args.task == "train"
            else f"DDIM-sampling ({args.sample_steps} steps per call)")
    flags = "" if args.task == "train" else f" --task ddim --sample_steps {args.sample_steps}"
    lines = [f"# {task} process memory, DDPM CIFAR-10 U-Net", "",
             f"Machine: {machine}. `python benchmarks/memory.py --configs {','.join(results)} "
             f"--steps {args.steps} --batch {args.batch}{flags}` (fresh process per "
             "configuration; MiB from /proc/self/status after each stage; peak = VmHWM).", ""]
    params = next(iter(results.values()))["params"]
    lines += [f"Parameters {params:,}: weights, Adam m and v, EMA copy and one gradient at 4 "
              f"bytes each = {5 * 4 * params / 2**20:.0f} MiB that any framework holds.", "",
              "| configuration | XLA step | build memory released | "
              + " | ".join(f"RSS {s}" for s in STAGES) + " | first-step peak | peak |",
              "|---|---|---|" + "---:|" * (len(STAGES) + 2)]
    for name, r in results.items():
        lines.append(f"| {name} | {r['jit_compile']} | {r['release_build_memory']} | "
                     + " | ".join(f"{r['stages'][s]['rss']:.0f}" for s in STAGES)
                     + f" | {r['stages']['first step']['hwm']:.0f}"
                     + f" | {r['stages']['steps']['hwm']:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="jax,tensorflow",
                   help="comma-separated <backend>[@hugetlb|@default][@cache][@release|@keep]"
                        "[@trim][@keepcompiler][#label]")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--task", choices=("train", "ddim"), default="train",
                   help="what each process runs: training steps, or DDIM sampling calls")
    p.add_argument("--sample_steps", type=int, default=10, help="DDIM steps per call (--task ddim)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--base_channels", type=int, default=128)
    p.add_argument("--cache_dir", default=os.path.join("runs", "memory_xla_cache"),
                   help="compilation cache root of the @cache configurations")
    p.add_argument("--output_dir", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--release", default="True", help=argparse.SUPPRESS)
    p.add_argument("--trim_after_first_step", default="False", help=argparse.SUPPRESS)
    p.add_argument("--release_compiler_memory", default="True", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.release = args.release == "True"
        args.trim_after_first_step = args.trim_after_first_step == "True"
        args.release_compiler_memory = args.release_compiler_memory == "True"
        worker(args)
        return
    import harness

    machine = harness.machine_description()
    results = {}
    for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
        results[config] = run_config(config, args)
        s = results[config]["stages"]
        print(f"{config}: " + ", ".join(f"{k} {v['rss']:.0f}" for k, v in s.items())
              + f"; peak {s['steps']['hwm']:.0f} MiB", flush=True)
    text = render(machine, args, results)
    print("\n" + text)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "memory.md"), "w") as f:
            f.write(text)
        harness.write_json_atomic(os.path.join(args.output_dir, "memory.json"),
                                  {"machine": machine, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()

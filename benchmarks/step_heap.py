#!/usr/bin/env python
"""Is a JAX training step's block of temporaries freed before the next step allocates its own?
(issue 19 item 5: why JAX's peak RSS varies from process to process.)

    python benchmarks/step_heap.py --configs sync#1,async#1,sync#2,async#2 --steps 16 \
        --output_dir benchmarks/results/sync_dispatch

Each configuration runs in a fresh process with the bin/ start-up tuning (``sync``: as it is,
which on AVX2 and AVX-512 CPUs includes synchronous CPU dispatch, ``cpu_tuning`` item 5;
``async``: with ``KERAS_ETSDM_JAX_SYNC_DISPATCH=0``) and trains the DDPM CIFAR-10 U-Net of
``memory.py``
(batch 8, bin/train's Adam with global-norm clipping) with ``train_on_batch``. Right after each
step returns (its loss is on the host) it reads glibc's ``mallinfo2``: heap bytes in use plus
mmap'ed bytes (MiB), the main arena's size, and ``VmHWM`` from ``/proc/self/status``. XLA's
buffer assignment puts the step's temporaries in one block (605 MiB for this network), so a
step whose in-use figure is more than ``--held_mib`` above the process's lowest reading
returned before that block was freed. Needs glibc ≥ 2.33 (``mallinfo2``) and JAX.

Slow growth of the resident set while the heap stays the same size (``huge`` / ``nohuge``: the
bin/ tuning with / without glibc's huge-page tunable, which since 2026-12-06 the tuning leaves
out for these processes; ``--pause_s`` idles between groups of steps, as a ``vs_diffusers.py``
worker does while the others run):

    python benchmarks/step_heap.py --configs huge#1 --steps 90 --pause_s 25 &
    python benchmarks/step_heap.py --configs nohuge#1 --steps 90 --pause_s 25

Each step also records ``VmRSS`` and ``AnonHugePages`` (``/proc/self/smaps_rollup``).
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def heap_mib():
    """``{"in_use": heap + mmap'ed bytes in use, "arena": main heap size}`` in MiB (glibc)."""
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {"in_use": (info.uordblks + info.hblkhd) / 2**20, "arena": info.arena / 2**20}


def resident_mib():
    """``{"peak": VmHWM, "rss": VmRSS, "anon_huge": AnonHugePages}`` in MiB: the peak and
    current resident set and how much of it is anonymous memory on transparent huge pages
    (which khugepaged also makes, in the background, out of ``madvise``'d ranges with holes)."""
    from harness import proc_mib

    return {"peak": proc_mib("VmHWM"), "rss": proc_mib("VmRSS"),
            "anon_huge": proc_mib("AnonHugePages", "/proc/self/smaps_rollup")}


def worker(args):
    import keras
    import numpy as np

    from keras_etsdm import DiffusionModel, build_unet, cpu_tuning
    from keras_etsdm import backend as etsdm_backend
    from keras_etsdm.optimizers import make_optimizer

    keras.utils.set_random_seed(0)
    network = build_unet(image_size=32, channels=3, base_channels=128,
                         channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                         attention_resolutions=(16,), dropout=0.1, num_heads=1)
    model = DiffusionModel(network, ema_decay=0.9999, seed=0)
    model.compile(optimizer=make_optimizer(learning_rate=2e-4, grad_clip_norm=1.0),
                  jit_compile=etsdm_backend.default_train_jit_compile())
    etsdm_backend.release_build_memory()  # as training.train does after building
    data = np.clip(np.random.default_rng(0).standard_normal((8, 32, 32, 3)), -1, 1)
    data = data.astype(np.float32)
    steps = []
    for index in range(args.steps + 1):
        start = time.perf_counter()
        model.train_on_batch(data)  # returns the loss as a number: the step has finished
        seconds = time.perf_counter() - start
        steps.append({"seconds": seconds, "time_s": time.perf_counter(), **heap_mib(),
                      **resident_mib()})
        if args.pause_s and index % args.steps_per_pause == 0:
            time.sleep(args.pause_s)  # idle, as a benchmark worker waits for its next turn
    print("RESULT " + json.dumps({
        "steps": steps,
        "sync_dispatch": cpu_tuning.jax_dispatches_synchronously(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "xla_flags": os.environ.get("XLA_FLAGS", "")}))


def run_config(config, args):
    """One fresh process for ``sync|async[#label]``."""
    from harness import _cpu_tuning, malloc_environ

    mode = config.partition("#")[0]
    if mode not in ("sync", "async", "huge", "nohuge"):
        raise SystemExit(f"{config}: expected sync, async, huge or nohuge, each with an "
                         f"optional #label.")
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2")
    if mode == "async":
        env[_cpu_tuning().SYNC_DISPATCH_VARIABLE] = "0"
    if mode in ("huge", "nohuge"):  # the bin/ tuning with / without the huge-page tunable
        env["GLIBC_TUNABLES"] = f"glibc.malloc.hugetlb={int(mode == 'huge')}"
    env = malloc_environ(env, "hugetlb")
    env = _cpu_tuning().jax_xla_environ(env) or env
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--steps={args.steps}",
           f"--pause_s={args.pause_s}", f"--steps_per_pause={args.steps_per_pause}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"{config} failed ({out.returncode}):\n{out.stderr[-3000:]}")


def summarize(result, held_mib):
    """Steps that returned with the temporaries still allocated, heap growth after the first
    step, peak RSS and the median step time (first step, which compiles, left out)."""
    import numpy as np

    steps = result["steps"]
    floor = min(s["in_use"] for s in steps)
    held = [s["in_use"] - floor > held_mib for s in steps[1:]]
    return {"held": int(sum(held)), "steps": len(held),
            "arena_growth_mib": steps[-1]["arena"] - steps[0]["arena"],
            "rss_growth_mib": steps[-1]["rss"] - steps[0]["rss"],
            "anon_huge_growth_mib": steps[-1]["anon_huge"] - steps[0]["anon_huge"],
            "peak_mib": steps[-1]["peak"], "peak_after_first_mib": steps[0]["peak"],
            "median_step_s": float(np.median([s["seconds"] for s in steps[1:]]))}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="sync,async")
    p.add_argument("--steps", type=int, default=16, help="steps after the first")
    p.add_argument("--held_mib", type=float, default=256.0,
                   help="in use this far above the process's lowest reading = block still held")
    p.add_argument("--pause_s", type=float, default=0.0,
                   help="sleep this long after the first step and after every "
                        "--steps_per_pause steps (a benchmark worker's wait for its turn)")
    p.add_argument("--steps_per_pause", type=int, default=3)
    p.add_argument("--output_dir", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from harness import machine_description

    machine = machine_description()
    print(machine, flush=True)
    rows = []
    for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
        result = run_config(config, args)
        row = {"config": config, **summarize(result, args.held_mib), "raw": result}
        rows.append(row)
        print(f"{config:>10}: sync dispatch {result['sync_dispatch']}, returned with the block "
              f"held after {row['held']} of {row['steps']} steps, heap grew "
              f"{row['arena_growth_mib']:.0f} MiB after the first step (resident set "
              f"{row['rss_growth_mib']:+.0f} MiB, of it on huge pages "
              f"{row['anon_huge_growth_mib']:+.0f}), peak "
              f"{row['peak_after_first_mib']:.0f} -> {row['peak_mib']:.0f} MiB, median step "
              f"{row['median_step_s']:.3f} s", flush=True)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "step_heap.json"), "w") as f:
            json.dump({"machine": machine, "command": " ".join(sys.argv), "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()

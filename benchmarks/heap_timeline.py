#!/usr/bin/env python
"""Where a training process's memory goes during its first step, over time (issue 19 item 5).

    python benchmarks/heap_timeline.py --configs tensorflow@keepcompiler,tensorflow \
        --output_dir benchmarks/results/avx2/tf_release/timeline

Each configuration (``<backend>[@keepcompiler][@default][#label]``) is a fresh process started as
``memory.py`` starts its workers (glibc's huge-page tunable unless ``@default``; JAX's start-up
XLA flags) that builds the DDPM CIFAR-10 U-Net of ``memory.py`` (35.7 M parameters, batch 8,
Keras's Adam, the library's ``train.jit_compile='auto'`` choice) and runs ``--steps`` steps of
``train_on_batch``. A thread reads, every ``--interval_s``, ``VmRSS`` and glibc's ``mallinfo2``:
the arenas' size, the bytes in use in them, the bytes free in them (freed, still resident) and
the bytes in ``mmap``'ed blocks. The worker marks its stages (import, built, first step, steps)
with their seconds since start; ``@keepcompiler`` runs the first step without the library's
heap trim (``backend.RELEASE_COMPILER_MEMORY = False``). Needs glibc ≥ 2.33 (``mallinfo2``).
With ``TF_CPP_VMODULE=device_compiler=2,xla_compiler=1,cpu_compiler=1`` TensorFlow's log
(stderr, kept in ``<label>.log`` under ``--output_dir``) dates its XLA compile's phases.
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

COLUMNS = ("s", "rss", "arena", "in_use", "free", "mmap")  # seconds, then MiB


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def worker(args):
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    start = time.time()
    rows, marks = [], []

    def rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))

    def sample():
        while True:
            info = libc.mallinfo2()
            rows.append((round(time.time() - start, 2), round(rss()), info.arena >> 20,
                         info.uordblks >> 20, info.fordblks >> 20, info.hblkhd >> 20))
            time.sleep(args.interval_s)

    def mark(stage):
        marks.append({"stage": stage, "s": round(time.time() - start, 2), "rss": round(rss())})
        print(f"MARK {marks[-1]}", flush=True)

    threading.Thread(target=sample, daemon=True).start()
    import keras
    import numpy as np

    from keras_etsdm import backend as etsdm_backend
    from memory import build_training_model

    mark("import")
    model, jit = build_training_model(args.base_channels)
    etsdm_backend.release_build_memory()  # as training.train does
    etsdm_backend.RELEASE_COMPILER_MEMORY = args.release_compiler_memory == "True"
    mark("built")
    data = np.clip(np.random.default_rng(0).standard_normal((args.batch, 32, 32, 3)), -1, 1)
    data = data.astype(np.float32)
    model.train_on_batch(data)
    mark("first step")
    for _ in range(args.steps):
        model.train_on_batch(data)
    mark("steps")
    time.sleep(2 * args.interval_s)
    print("RESULT " + json.dumps({"columns": COLUMNS, "rows": rows, "marks": marks,
                                  "backend": keras.backend.backend(), "jit_compile": jit,
                                  "release_compiler_memory": args.release_compiler_memory,
                                  "start_epoch_s": start}))


def run_config(config, args):
    from harness import _cpu_tuning, malloc_environ

    label = config.partition("#")[2] or config
    backend, *options = config.partition("#")[0].split("@")
    if set(options) - {"keepcompiler", "default"}:
        raise SystemExit(f"{config}: expected <backend>[@keepcompiler][@default][#label].")
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env = malloc_environ(env, "default" if "default" in options else "hugetlb")
    env = _cpu_tuning().jax_xla_environ(env) or env
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--steps={args.steps}",
           f"--batch={args.batch}", f"--base_channels={args.base_channels}",
           f"--interval_s={args.interval_s}",
           f"--release_compiler_memory={'keepcompiler' not in options}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if args.output_dir:
        with open(os.path.join(args.output_dir, f"{label}.log"), "w") as f:
            f.write(out.stderr)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["glibc_tunables"] = env.get("GLIBC_TUNABLES", "")
            return label, result
    raise SystemExit(f"{config} failed ({out.returncode}):\n{out.stderr[-3000:]}")


def condensed(result, every_s=2.5):
    """Rows every ``every_s`` seconds, plus the peak-RSS row and one row at each stage mark."""
    rows = result["rows"]
    peak = max(rows, key=lambda r: r[1])
    keep, last = [], None
    for row in rows:
        if last is None or row[0] - last >= every_s or row is peak:
            keep.append(row)
            last = row[0]
    lines = ["| s | RSS | arenas | in use | free in arenas | mmap'ed |",
             "|---:|---:|---:|---:|---:|---:|"]
    marks = {m["s"]: m["stage"] for m in result["marks"]}
    for row in keep:
        stage = next((name for s, name in marks.items() if abs(s - row[0]) < every_s / 2), "")
        note = (" ← peak" if row is peak else "") + (f" ({stage})" if stage else "")
        lines.append(f"| {row[0]:.1f}{note} | " + " | ".join(str(v) for v in row[1:]) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="tensorflow@keepcompiler,tensorflow")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--base_channels", type=int, default=128)
    p.add_argument("--interval_s", type=float, default=0.05)
    p.add_argument("--output_dir", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--release_compiler_memory", default="True", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    import harness

    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    machine = harness.machine_description()
    text = [f"# Memory over time, first training step\n\nMachine: {machine}. `python "
            f"benchmarks/heap_timeline.py --configs {args.configs} --steps {args.steps}` "
            f"(MiB; `mallinfo2` every {args.interval_s} s).\n"]
    results = {}
    for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
        label, result = run_config(config, args)
        results[label] = result
        marks = ", ".join(f"{m['stage']} {m['s']:.1f} s / {m['rss']} MiB"
                          for m in result["marks"])
        text.append(f"## {label} (XLA {result['jit_compile']}, heap trim after compiling "
                    f"{result['release_compiler_memory']}; GLIBC_TUNABLES "
                    f"{result['glibc_tunables'] or '(none)'})\n\nStages: {marks}.\n\n"
                    + condensed(result) + "\n")
        print(text[-1], flush=True)
    if args.output_dir:
        with open(os.path.join(args.output_dir, "timeline.md"), "w") as f:
            f.write("\n".join(text))
        harness.write_json_atomic(os.path.join(args.output_dir, "timeline.json"),
                                  {"machine": machine, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()

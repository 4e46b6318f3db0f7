"""Is a training-speed goal reachable on this CPU at all? Its ceilings, against the goals.

Measures two ceilings of the machine it runs on:

- the **vector-unit peak**: multiply-adds per second of a register-only loop on every core
  (``fma_peak.c``, built here with gcc for the widest ISA the CPU has): float32 FMA and, on
  AVX512-BF16 CPUs, ``vdpbf16ps``. No float32 (bf16) kernel can run faster.
- the **best large GEMM**: numpy's float32 ``n×n @ n×n`` (BLAS, all cores) at several n, the
  rate the best-tuned matrix kernel on this machine reaches; on AVX512-BF16 CPUs also
  TensorFlow's bf16 GEMM (oneDNN), the ceiling of a bf16 mixed-precision step.

Then, for each ``vs_diffusers.py`` result given with ``--results`` (its JSON), it turns issue
19's goals — training ≥ 1.3× eager diffusers, sampling per NFE ≥ 1.0× the best diffusers
variant — into the model GFLOP/s a Keras backend would have to sustain (training FLOPs = 3 × the
forward's, a sampler step = one forward, counted by XLA as in that run) and states it as a
fraction of both ceilings, beside what every framework in that run achieved. A goal that needs
the whole step — GroupNorm, SiLU, attention, Adam, EMA included — to run at the best GEMM's rate
or above is out of reach for any implementation that does the model's FLOPs (a Winograd or FFT
convolution does fewer; none of the frameworks compared uses one on this CPU).

    R=benchmarks/results/vs_diffusers_avx512
    python benchmarks/roof.py --results $R/train_30_rounds.json,$R/sample_jax_tf.json
    python benchmarks/roof.py --results A.json,B.json --json out.json --markdown out.md

Run it on a quiet machine: both probes use every core.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PEAK_SOURCE = os.path.join(HERE, "fma_peak.c")
GOAL_VS_EAGER = 1.3  # issue 19: training on the fastest Keras backend ≥ 1.3× eager diffusers


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default="",
                   help="comma-separated vs_diffusers.py JSON files with a train, ddim or dpm "
                        "task")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats of every probe")
    p.add_argument("--iterations", type=int, default=100_000_000,
                   help="loop iterations of the vector-unit probe per thread (16 FMAs each)")
    p.add_argument("--gemm_sizes", default="1024,2048,4096", help="numpy GEMM sizes n")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    return p.parse_args(argv)


def build_peak_probe(flags, workdir):
    """Compile ``fma_peak.c`` for this CPU; (path, ISA name, bf16 available)."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise SystemExit("roof.py needs a C compiler (gcc or cc on PATH) to build the "
                         "vector-unit probe fma_peak.c; install gcc (e.g. apt-get install gcc).")
    if "avx512f" in flags:
        isa, march = "avx512f", ["-mavx512f", "-mfma"]
        bf16 = "avx512_bf16" in flags
        if bf16:
            march.append("-mavx512bf16")
    elif "avx2" in flags and "fma" in flags:
        isa, march, bf16 = "avx2+fma", ["-mavx2", "-mfma"], False
    else:
        raise SystemExit(f"roof.py's probe targets AVX2+FMA or AVX-512 x86 CPUs; this one has "
                         f"neither (flags: {' '.join(sorted(flags)) or 'unknown'}).")
    binary = os.path.join(workdir, "fma_peak")
    subprocess.run([compiler, "-O3", *march, "-pthread", PEAK_SOURCE, "-o", binary],
                   check=True)
    return binary, isa, bf16


def run_peak(binary, threads, iterations, kind, repeats):
    values = []
    for _ in range(repeats):
        out = subprocess.run([binary, str(threads), str(iterations), kind], check=True,
                             capture_output=True, text=True).stdout
        values.append(float(out.strip()))
    return {**harness.summarize(np.asarray(values)), "values": values, "threads": threads}


def load_results(paths):
    """The vs_diffusers JSONs, checked before anything is timed. A run without a JAX worker has
    no XLA FLOP count; it takes the count of another given run of the same network."""
    results = {}
    for path in paths:
        try:
            with open(path) as f:
                results[path] = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--results: cannot read {path} as a vs_diffusers.py JSON ({e})")
        if not set(results[path].get("tasks", [])) & {"train", "ddim", "dpm"}:
            raise SystemExit(f"{path}: no train, ddim or dpm task in this vs_diffusers result")
    counts = {r["network"]: r["forward_flops_per_image"] for r in results.values()
              if r.get("forward_flops_per_image")}
    for path, result in results.items():
        if not result.get("forward_flops_per_image"):
            if result.get("network") not in counts:
                raise SystemExit(f"{path}: no forward FLOP count (the run had no JAX worker) and "
                                 f"no other given result of the network {result.get('network')!r} "
                                 f"has one; add such a result to --results")
            result["forward_flops_per_image"] = counts[result["network"]]
    return results


def tensorflow_bf16_gemm(n, repeats):
    """bf16 ``n×n @ n×n`` GFLOP/s in TensorFlow (oneDNN, AVX512-BF16 kernels), float32 output
    accumulation as in mixed precision; numpy has no bf16 GEMM."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    a = tf.cast(tf.random.stateless_normal((n, n), seed=(0, 0)), tf.bfloat16)
    b = tf.cast(tf.random.stateless_normal((n, n), seed=(0, 1)), tf.bfloat16)
    matmul = tf.function(tf.linalg.matmul)
    matmul(a, b).numpy()  # trace and warm up
    times = np.asarray(harness.time_repeated(lambda: matmul(a, b).numpy(), repeats))
    return {**harness.summarize(harness.matmul_flops(n) / times / 1e9), "n": int(n),
            "repeats": int(repeats)}


# model FLOPs per image of one unit of each vs_diffusers task, in forward passes: a training step
# is forward + backward ≈ 3 forwards; a sampler step (NFE) is one forward
TASK_FORWARDS = {"train": 3.0, "ddim": 1.0, "dpm": 1.0}
TASK_UNITS = {"train": "img/s", "ddim": "NFE·img/s", "dpm": "NFE·img/s"}


def task_runs(path, result):
    """Per task of one vs_diffusers result: the median rate and model GFLOP/s of every framework,
    and issue 19's goal for the task as a rate (train: 1.3× eager diffusers; sampling: 1.0× the
    best diffusers variant)."""
    precision = result.get("args", {}).get("precision", "float32")
    runs = []
    for task in result["tasks"]:
        if task not in TASK_FORWARDS:
            continue
        flops = TASK_FORWARDS[task] * float(result["forward_flops_per_image"])
        rows = {}
        for row in result["rows"]:
            if row["task"] == task:
                rate = float(row["images_per_s"]["median"])
                rows[row["framework"]] = {"rate": rate, "gflops": rate * flops / 1e9}
        if task == "train":
            if "diffusers" not in rows:
                raise SystemExit(f"{path}: no eager 'diffusers' training row to take the goal "
                                 f"from")
            goal_text, goal_rate = (f"{GOAL_VS_EAGER}× eager diffusers",
                                    GOAL_VS_EAGER * rows["diffusers"]["rate"])
        else:
            peers = {n: r for n, r in rows.items() if n.startswith("diffusers")}
            if not peers:
                raise SystemExit(f"{path}: no diffusers row for the {task} task")
            best = max(peers, key=lambda n: peers[n]["rate"])
            goal_text, goal_rate = f"1.0× best peer ({best})", peers[best]["rate"]
        runs.append({"path": path, "task": task, "precision": precision,
                     "flops_per_unit": flops, "rows": rows, "goal_text": goal_text,
                     "goal_rate": goal_rate, "goal_gflops": goal_rate * flops / 1e9})
    if not runs:
        raise SystemExit(f"{path}: none of the tasks {sorted(TASK_FORWARDS)} in this result")
    return runs


def main(args):
    results = load_results([p.strip() for p in args.results.split(",") if p.strip()])
    flags = harness._cpu_tuning().cpu_isa_flags()
    threads = os.cpu_count() or 1
    machine = harness.machine_description()
    print(f"machine: {machine}", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        binary, isa, has_bf16 = build_peak_probe(flags, workdir)
        peaks = {"fp32": run_peak(binary, threads, args.iterations, "fp32", args.repeats),
                 "fp32_one_core": run_peak(binary, 1, args.iterations, "fp32", args.repeats)}
        if has_bf16:
            peaks["bf16"] = run_peak(binary, threads, args.iterations, "bf16", args.repeats)
    sizes = [int(n) for n in args.gemm_sizes.split(",") if n.strip()]
    gemm = {n: harness.numpy_matmul_roof(n, args.repeats) for n in sizes}
    best_gemm = max(g["median"] for g in gemm.values())
    fp32_peak = peaks["fp32"]["median"]
    gemm_bf16 = {n: tensorflow_bf16_gemm(n, args.repeats) for n in sizes} if has_bf16 else {}
    best_gemm_bf16 = max((g["median"] for g in gemm_bf16.values()), default=None)

    lines = [f"CPU: {harness.cpu_description()}; probe ISA {isa}; machine at start: {machine}", ""]
    lines.append(f"Vector-unit peak (`fma_peak.c`, {args.repeats} repeats, median [min, max]):")
    for name, p in peaks.items():
        lines.append(f"- {name} on {p['threads']} thread(s): {p['median']:.1f} GFLOP/s "
                     f"[{p['min']:.1f}, {p['max']:.1f}]")
    lines.append("")
    lines.append("numpy float32 GEMM (BLAS, all cores; median [min, max]):")
    for n, g in gemm.items():
        lines.append(f"- n = {n}: {g['median']:.1f} GFLOP/s [{g['min']:.1f}, {g['max']:.1f}] "
                     f"= {g['median'] / fp32_peak:.0%} of the float32 peak")
    if gemm_bf16:
        lines.append("")
        lines.append("TensorFlow bf16 GEMM (oneDNN, all cores; median [min, max]):")
        for n, g in gemm_bf16.items():
            lines.append(f"- n = {n}: {g['median']:.1f} GFLOP/s [{g['min']:.1f}, {g['max']:.1f}] "
                         f"= {g['median'] / peaks['bf16']['median']:.0%} of the bf16 peak")
    lines.append("")

    analyses = []
    for path, result in results.items():
        for run in task_runs(path, result):
            bf16_run = run["precision"] == "bf16" and has_bf16
            peak = peaks["bf16"]["median"] if bf16_run else fp32_peak
            gemm_rate = best_gemm_bf16 if bf16_run else best_gemm
            kind = "bf16" if bf16_run else "float32"
            unit, flops = TASK_UNITS[run["task"]], run["flops_per_unit"]
            analyses.append({**run, "gemm_used": gemm_rate, "peak_used": peak,
                             "goal_fraction_of_best_gemm": run["goal_gflops"] / gemm_rate,
                             "goal_fraction_of_peak": run["goal_gflops"] / peak,
                             "ceiling_at_best_gemm": gemm_rate * 1e9 / flops,
                             "ceiling_at_peak": peak * 1e9 / flops})
            per = "per image" if unit == "img/s" else "per image and NFE"
            lines.append(f"`{os.path.relpath(path)}`, {run['task']} ({kind}; "
                         f"{flops / 1e9:.2f} GFLOP {per}):")
            lines.append("")
            lines.append(f"| framework | {unit} | model GFLOP/s | % best {kind} GEMM | "
                         f"% {kind} vector peak |")
            lines.append("|---|---:|---:|---:|---:|")
            for name, row in [*run["rows"].items(),
                              (f"goal: {run['goal_text']}",
                               {"rate": run["goal_rate"], "gflops": run["goal_gflops"]})]:
                lines.append(f"| {name} | {row['rate']:.2f} | {row['gflops']:.1f} | "
                             f"{row['gflops'] / gemm_rate:.0%} | {row['gflops'] / peak:.0%} |")
            lines.append("")
            lines.append(f"Ceilings at these FLOPs: {gemm_rate * 1e9 / flops:.2f} {unit} if all of "
                         f"it ran at the best {kind} GEMM's rate, {peak * 1e9 / flops:.2f} at the "
                         f"{kind} vector-unit peak.")
            lines.append("")
    text = "\n".join(lines)
    print(text, flush=True)
    result = {"machine": machine, "cpu": harness.cpu_description(), "probe_isa": isa,
              "peaks": peaks, "gemm": {str(n): g for n, g in gemm.items()},
              "best_gemm_gflops": best_gemm,
              "gemm_bf16": {str(n): g for n, g in gemm_bf16.items()},
              "best_gemm_bf16_gflops": best_gemm_bf16, "goal_vs_eager": GOAL_VS_EAGER,
              "analyses": analyses, "markdown": text}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main(parse_args())

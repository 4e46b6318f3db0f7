"""Seconds per training step of the README's first command, ``bin/train`` on the embedded
default (gin/default.gin), on each Keras backend.

    python benchmarks/bin_train_speed.py --steps 150 --rounds 2 \
        --output_dir benchmarks/results/bin_train_speed

Each round runs ``bin/train`` once per backend (order alternating between rounds) in a fresh
work directory, exactly as a user starts it (same flags, the bin/ start-up tuning included)
except that grids and held-out evaluations are off and one checkpoint is written at the end,
so the figure is the training step with its input pipeline, logging and progress line.
``seconds_per_step`` comes from the run's own ``metrics.jsonl`` (mean over each ``log_every``
window); the first ``--skip`` windows (compilation, warm-up) are dropped; the start-up time is
the wall clock from launch to the first logged window. Prints and writes ``speed.md`` /
``speed.json`` with the machine (CPU model, ISA flags, cores, numpy matmul GFLOP/s).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(backend, steps, log_every, workdir):
    """One ``bin/train`` run. ``backend`` is a Keras backend, optionally followed by extra gin
    bindings after ``@`` (a variant), e.g. ``tensorflow@train.jit_compile=False``."""
    backend, *bindings = backend.split("@")
    cmd = [sys.executable, os.path.join(REPO, "bin", "train"), f"--workdir={workdir}",
           f"--gin.train.max_steps={steps}", "--gin.train.sample_every=0",
           "--gin.train.eval_every=0", f"--gin.train.log_every={log_every}",
           f"--gin.train.checkpoint_every={steps}"] + [f"--gin.{b}" for b in bindings]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    first_log = None
    while proc.poll() is None:
        if first_log is None and os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            first_log = time.perf_counter() - start
        time.sleep(0.2)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bin/train on {backend} failed ({proc.returncode}):\n"
                         f"{proc.stderr.read()[-3000:]}")
    with open(metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    per_step = [r["seconds_per_step"] for r in records if "seconds_per_step" in r]
    return {"startup_to_first_log_s": first_log, "wall_s": total,
            "seconds_per_step_windows": per_step}


def render(machine, matmul, args, runs, backends):
    """The markdown report and the summary rows of measured ``runs`` (re-renderable)."""
    rows = {}
    lines = ["# bin/train on the embedded default: seconds per step",
             "",
             (f"Machine: {machine}; numpy float32 matmul (2048³) {matmul:.0f} GFLOP/s. "
              f"`python benchmarks/bin_train_speed.py --steps {args.steps} --rounds "
              f"{args.rounds}` ({args.log_every}-step windows of `metrics.jsonl`, first "
              f"{args.skip} dropped, all rounds pooled)."),
             "",
             "| backend | median s/step | IQR | windows | per-round medians | first log after (s) |",
             "|---|---:|---:|---:|---|---|"]
    for backend in backends:
        windows = np.concatenate([np.asarray(x["seconds_per_step_windows"][args.skip:])
                                  for x in runs[backend]])
        summary = harness.summarize(windows)
        per_round = [float(np.median(x["seconds_per_step_windows"][args.skip:]))
                     for x in runs[backend]]
        starts = [x["startup_to_first_log_s"] for x in runs[backend]]
        rows[backend] = {"seconds_per_step": summary, "per_round_median": per_round,
                         "startup_to_first_log_s": starts}
        lines.append(f"| {backend} | {summary['median']:.3f} | {summary['iqr']:.3f} | "
                     f"{summary['n']} | {', '.join(f'{v:.3f}' for v in per_round)} | "
                     f"{', '.join(f'{v:.0f}' for v in starts)} |")
    # Every other variant against the first one, paired by round (run back to back).
    a = backends[0]
    for b in backends[1:]:
        ratios = np.asarray(rows[b]["per_round_median"]) / np.asarray(rows[a]["per_round_median"])
        low, high = bootstrap_interval(ratios)
        per_round = ", ".join(f"{r:.3f}" for r in ratios)
        lines += ["", (f"Paired per round (same round, back to back): {b} ÷ {a} seconds per "
                       f"step = {per_round}; median {np.median(ratios):.3f}, bootstrap 95 % "
                       f"interval of the mean over rounds [{low:.3f}, {high:.3f}] "
                       f"(n = {len(ratios)} rounds, 10,000 resamples).")]
        entry = {"backends": [b, a], "per_round": ratios.tolist(), "bootstrap_95": [low, high]}
        if len(backends) == 2:
            rows["paired_ratio"] = entry
        else:
            rows.setdefault("paired_ratios", []).append(entry)
    return "\n".join(lines) + "\n", rows


def split_variants(text):
    """``--backends`` split at top-level commas, so that a binding such as
    ``tensorflow@build_network.channel_mult=(1,2,2)`` stays one variant."""
    variants, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            variants.append(current)
            current = ""
        else:
            current += char
    variants.append(current)
    return [v.strip() for v in variants if v.strip()]


def bootstrap_interval(values, resamples=10000, seed=0):
    """Percentile bootstrap 95 % interval of the mean of ``values``."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="tensorflow,jax",
                   help="comma-separated Keras backends, each optionally with extra gin bindings "
                        "after '@' (e.g. tensorflow@train.jit_compile=False); commas inside "
                        "brackets belong to a binding; variants after the first are compared "
                        "with it")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip", type=int, default=2, help="first log windows dropped (warm-up)")
    p.add_argument("--output_dir", default=None)
    p.add_argument("--report_from", default=None,
                   help="only re-render the report of a saved speed.json (no runs)")
    args = p.parse_args()
    backends = split_variants(args.backends)
    if args.report_from:
        with open(args.report_from) as f:
            saved = json.load(f)
        saved_args = argparse.Namespace(**saved["args"])
        text, _ = render(saved["machine"], saved["numpy_matmul_gflops"], saved_args,
                         saved["runs"], list(saved["runs"]))
        print(text)
        if args.output_dir:
            with open(os.path.join(args.output_dir, "speed.md"), "w") as f:
                f.write(text)
        return
    machine = harness.machine_description()
    matmul = harness.numpy_matmul_gflops(2048, repeats=5)
    print(f"machine: {machine}; numpy float32 matmul (2048^3): {matmul:.0f} GFLOP/s", flush=True)
    runs = {b: [] for b in backends}
    for r in range(args.rounds):
        order = backends if r % 2 == 0 else backends[::-1]
        for backend in order:
            with tempfile.TemporaryDirectory() as tmp:
                result = run_once(backend, args.steps, args.log_every, os.path.join(tmp, "run"))
            runs[backend].append(result)
            windows = result["seconds_per_step_windows"][args.skip:]
            print(f"  round {r + 1} {backend}: median {np.median(windows):.3f} s/step over "
                  f"{len(windows)} windows of {args.log_every} steps; first log after "
                  f"{result['startup_to_first_log_s']:.0f} s", flush=True)
    text, rows = render(machine, matmul, args, runs, backends)
    print("\n" + text)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "speed.md"), "w") as f:
            f.write(text)
        harness.write_json_atomic(os.path.join(args.output_dir, "speed.json"), {
            "machine": machine, "numpy_matmul_gflops": matmul, "args": vars(args),
            "results": rows, "runs": runs})


if __name__ == "__main__":
    main()

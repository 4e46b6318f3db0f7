"""Held-out quality against time, from the ``metrics.jsonl`` of ``bin/train`` runs.

    python benchmarks/heldout_curve.py --workdirs=runs/a,runs/b --names=etsdm-s0,ddpm-s0 \
        --output_dir=benchmarks/results/heldout_baseline

For every run: the evaluations ``bin/train`` logged (``train.eval_every``: FD / KID of N
samples against the MNIST test set, judge ``classifier_mnist32_heldout``) against the step and
against minutes of training, i.e. the summed step time of the logged intervals (``seconds_per_step``
× steps; the first interval includes compilation) and, separately, the minutes spent in the
evaluations themselves. Writes ``curve.csv``, ``curve.md`` and ``curve.png`` (FD against
training minutes) into ``--output_dir``; copies nothing else.
"""

import csv
import io
import json
import os
import sys

from absl import app, flags

flags.DEFINE_list("workdirs", None, "bin/train work directories.", required=True)
flags.DEFINE_list("names", None, "One name per work directory (default: the directory names).")
flags.DEFINE_string("output_dir", None, "Where to write curve.csv / .md / .png.", required=True)
flags.DEFINE_string("machine", None, "CPU description for the table (default: probed).")
FLAGS = flags.FLAGS


def read_curve(workdir):
    """Rows ``{step, train_minutes, eval_minutes, fd, kid, kid_std, num_samples, sampler}``."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a bin/train work directory.")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    rows, train_seconds, eval_seconds, last_step = [], 0.0, 0.0, 0
    for record in records:
        if "loss" in record:
            train_seconds += record["seconds_per_step"] * (record["step"] - last_step)
            last_step = record["step"]
        if "eval/fd" in record:
            eval_seconds += record["eval_seconds"]
            rows.append({"step": record["step"], "train_minutes": train_seconds / 60,
                         "eval_minutes": eval_seconds / 60, "fd": record["eval/fd"],
                         "kid": record.get("eval/kid"), "kid_std": record.get("eval/kid_std"),
                         "num_samples": record["eval_num_samples"],
                         "sampler": f"{record['eval_sampler']}-{record['eval_nfe']}"})
    return rows


def main(argv):
    del argv
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from benchmarks.harness import machine_description

    names = FLAGS.names or [os.path.basename(os.path.normpath(w)) for w in FLAGS.workdirs]
    if len(names) != len(FLAGS.workdirs):
        raise app.UsageError("--names needs one entry per --workdirs entry.")
    curves = {name: read_curve(w) for name, w in zip(names, FLAGS.workdirs)}
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    fields = ["run", "step", "train_minutes", "eval_minutes", "fd", "kid", "kid_std",
              "num_samples", "sampler"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fields)
    writer.writeheader()
    for name, rows in curves.items():
        for row in rows:
            writer.writerow({"run": name, **row})
    with open(os.path.join(FLAGS.output_dir, "curve.csv"), "w") as f:
        f.write(buffer.getvalue())
    machine = FLAGS.machine or machine_description()
    lines = [f"Machine: {machine}", "",
             "| run | step | training min | eval min | FD | KID | N | sampler |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, rows in curves.items():
        for r in rows:
            kid = "" if r["kid"] is None else f"{r['kid']:.4f} ± {r['kid_std']:.4f}"
            lines.append(f"| {name} | {r['step']} | {r['train_minutes']:.1f} | "
                         f"{r['eval_minutes']:.1f} | {r['fd']:.2f} | {kid} | "
                         f"{r['num_samples']} | {r['sampler']} |")
    with open(os.path.join(FLAGS.output_dir, "curve.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for name, rows in curves.items():
        ax.plot([r["train_minutes"] for r in rows], [r["fd"] for r in rows], "o-", label=name)
    ax.set_xlabel("minutes of training steps (2-core CPU)")
    ax.set_ylabel("held-out FD (MNIST test set)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(FLAGS.output_dir, "curve.png"))


if __name__ == "__main__":
    app.run(main)

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

FLAGS = flags.FLAGS


def define_flags():
    """Flags of the command line only, so that other scripts can import this module."""
    flags.DEFINE_list("workdirs", None, "bin/train work directories.", required=True)
    flags.DEFINE_list("names", None, "One name per work directory (default: directory names).")
    flags.DEFINE_string("output_dir", None, "Where to write curve.csv / .md / .png.",
                        required=True)
    flags.DEFINE_string("machine", None, "CPU description for the table (default: probed).")


def read_curve(workdir):
    """Rows ``{step, train_minutes, eval_minutes, fd, kid, kid_std, num_samples, sampler}`` of a
    ``bin/train`` work directory, or of a copy of its ``metrics.jsonl`` (a ``.jsonl`` path)."""
    path = workdir if workdir.endswith(".jsonl") else os.path.join(workdir, "metrics.jsonl")
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


def fd_at_budget(rows, budget_minutes):
    """The last evaluation within ``budget_minutes`` of training (None when none is)."""
    within = [r for r in rows if r["train_minutes"] <= budget_minutes + 1e-9]
    return within[-1] if within else None


def write_curves(curves, output_dir, machine=None, budget_minutes=None, recipes=None):
    """Write ``curve.csv``, ``curve.md`` (all evaluations; with ``budget_minutes`` also one row
    per run: the last evaluation within that many minutes of training) and ``curve.png`` (FD
    against training minutes, log scale; runs named ``<recipe>-seed<k>`` share a colour).

    Args:
        curves: ``{run name: read_curve(workdir)}``.
        recipes: optional ``{recipe: [gin bindings]}`` listed above the tables.
    """
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from benchmarks.harness import machine_description

    os.makedirs(output_dir, exist_ok=True)
    fields = ["run", "step", "train_minutes", "eval_minutes", "fd", "kid", "kid_std",
              "num_samples", "sampler"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fields)
    writer.writeheader()
    for name, rows in curves.items():
        for row in rows:
            writer.writerow({"run": name, **row})
    with open(os.path.join(output_dir, "curve.csv"), "w") as f:
        f.write(buffer.getvalue())
    lines = [f"Machine: {machine or machine_description()}", ""]
    for recipe, bindings in (recipes or {}).items():
        lines.append(f"- `{recipe}`: gin/default.gin" + "".join(f"; `{b}`" for b in bindings))
    if recipes:
        lines.append("")
    if budget_minutes is not None:
        lines += [f"Last evaluation within {budget_minutes:g} minutes of training steps:", "",
                  "| run | step | training min | FD | KID |", "|---|---:|---:|---:|---:|"]
        for name, rows in curves.items():
            r = fd_at_budget(rows, budget_minutes)
            lines.append(f"| {name} | – | – | – | – |" if r is None else
                         f"| {name} | {r['step']} | {r['train_minutes']:.1f} | {r['fd']:.2f} | "
                         f"{r['kid']:.4f} |")
        lines.append("")
    lines += ["| run | step | training min | eval min | FD | KID | N | sampler |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, rows in curves.items():
        for r in rows:
            kid = "" if r["kid"] is None else f"{r['kid']:.4f} ± {r['kid_std']:.4f}"
            lines.append(f"| {name} | {r['step']} | {r['train_minutes']:.1f} | "
                         f"{r['eval_minutes']:.1f} | {r['fd']:.2f} | {kid} | "
                         f"{r['num_samples']} | {r['sampler']} |")
    with open(os.path.join(output_dir, "curve.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    colours, styles = {}, ["o-", "s--", "^:", "d-."]
    for name, rows in curves.items():
        recipe, _, seed = name.rpartition("-seed")
        recipe = recipe or name
        colour = colours.setdefault(recipe, f"C{len(colours) % 10}")
        style = styles[int(seed) % len(styles)] if seed.isdigit() else "o-"
        ax.plot([r["train_minutes"] for r in rows], [r["fd"] for r in rows], style,
                color=colour, label=name, markersize=4)
    if budget_minutes is not None:
        ax.axvline(budget_minutes, color="grey", lw=0.8)
    ax.set_xlabel("minutes of training steps (2-core CPU)")
    ax.set_ylabel("held-out FD (MNIST test set)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "curve.png"))


def main(argv):
    del argv
    names = FLAGS.names or [os.path.basename(os.path.normpath(w)) for w in FLAGS.workdirs]
    if len(names) != len(FLAGS.workdirs):
        raise app.UsageError("--names needs one entry per --workdirs entry.")
    curves = {name: read_curve(w) for name, w in zip(names, FLAGS.workdirs)}
    write_curves(curves, FLAGS.output_dir, machine=FLAGS.machine)


if __name__ == "__main__":
    define_flags()
    app.run(main)

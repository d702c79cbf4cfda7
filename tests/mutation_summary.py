"""Kill rate per module of the last ``mutmut run`` (``make mutate`` prints it), and the mutants that were not killed.

    python tests/mutation_summary.py            # after mutmut run, from the project root

A mutant counts as killed when a test failed on it or it timed out (an endless loop the tests stopped);
``survived`` and ``no tests`` (no fast test runs the mutated function) count against the rate.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict

KILLED = {"killed", "timeout", "caught by type check"}
#: mutmut's names: handclip.metrics.rank.x_function__mutmut_3 or handclip.module.xǁClassǁmethod__mutmut_3
NAME = re.compile(r"^\s*(?P<module>[\w.]+?)\.x(?:_|ǁ)(?P<function>\S+?)__mutmut_\d+: (?P<status>.+)$")


def main() -> int:
    lines = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], check=True,
                           capture_output=True, text=True).stdout.splitlines()
    counts: dict[str, Counter] = defaultdict(Counter)
    left: list[tuple[str, str]] = []
    for line in lines:
        match = NAME.match(line)
        if not match:
            continue
        status = match["status"].strip()
        counts[match["module"]][status] += 1
        if status not in KILLED and status != "skipped":
            left.append((line.strip().rsplit(": ", 1)[0], status))
    if not counts:
        print("no mutation results: run `make mutate` (mutmut run) first", file=sys.stderr)
        return 1
    print(f"{'module':42} {'mutants':>7} {'killed':>7} {'survived':>8} {'no tests':>8} {'rate':>6}")
    for module in sorted(counts):
        c = counts[module]
        total = sum(n for status, n in c.items() if status != "skipped")
        killed = sum(c[s] for s in KILLED)
        print(f"{module:42} {total:7} {killed:7} {c['survived']:8} {c['no tests']:8} {killed / total:6.1%}")
    print(f"\nnot killed ({len(left)}; `python -m mutmut show NAME` shows one):")
    for name, status in left:
        print(f"  {name}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run twistd with experiment modules loaded first: what a proposed change to
lgmt-proxy is worth, measured before anyone edits the proxy itself.

    python bench/experiments/run_with.py turn_flush pool_lifo -- -n --pidfile= lgmt-proxy ...

bench/run.py does this for ``--compare-experiment turn_flush,pool_lifo``
(the experiment build runs as "lgmt_b" in the same rounds as the real one).
Each module here monkeypatches one thing at import time; none of them is
meant to be shipped as is.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def main() -> None:
    args = sys.argv[1:]
    split = args.index("--") if "--" in args else len(args)
    names, rest = args[:split], args[split + 1 :]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    for name in names:
        importlib.import_module(name)
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *rest]
    run()


if __name__ == "__main__":
    main()

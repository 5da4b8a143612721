"""Client authentication cost against the number of consumers (issue 13).

    .venv/bin/python bench/auth.py

Times `ClientAuth.authenticate` for a Bearer token (a hit and a miss) and a
Basic one with 10 and with 10,000 consumers, in process (no sockets): the
digest lookup should cost the same for both. Not a test (no wall-clock
assertions); part of the evidence in docs/security.md.
"""

from __future__ import annotations

import base64
import hashlib
import timeit

from lgmt_proxy.clientauth import ClientAuth, Consumer


def build(n: int) -> ClientAuth:
    return ClientAuth(
        tuple(Consumer(f"c{i}", hashlib.sha256(b"token-%08d" % i).digest(), ()) for i in range(n))
    )


def main() -> None:
    rows = []
    for n in (10, 10000):
        auth = build(n)
        last = n - 1
        cases = {
            "bearer hit": [b"Bearer token-%08d" % last],
            "bearer miss": [b"Bearer not-a-token-at-all"],
            "basic hit": [b"Basic " + base64.b64encode(b"c%d:token-%08d" % (last, last))],
        }
        for name, values in cases.items():
            runs = 20000
            seconds = min(
                timeit.repeat(lambda v=values, a=auth: a.authenticate(v), number=runs, repeat=5)
            )
            rows.append((n, name, seconds / runs * 1e6))
    print(f"{'consumers':>10}  {'case':<12} {'us/call':>8}")
    for n, name, us in rows:
        print(f"{n:>10}  {name:<12} {us:>8.2f}")


if __name__ == "__main__":
    main()

"""The PostgreSQL misses alone: the retry's latency and 8 clients, against both floors.

    python benchmarks/misses.py [ROUNDS] [PER_ROUND] [CLIENTS]

A shorter loop than ``run.py --only postgres,concurrency`` for trying a change:
the same functions, with the concurrency curve cut to the given client counts
(default 8).
"""

from __future__ import annotations

import sys

import run
import suite_pg


def main(argv: list[str]) -> int:
    rounds = int(argv[0]) if argv else 10
    per_round = int(argv[1]) if len(argv) > 1 else 300
    clients = [int(c) for c in argv[2].split(",")] if len(argv) > 2 else [8]
    rows = suite_pg.postgres(rounds, per_round)
    conc = suite_pg.concurrency(max(2, rounds // 3), 150, clients)
    rows += [r for r in conc if "same project" in r.name]
    print(run.table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

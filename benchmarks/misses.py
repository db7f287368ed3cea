"""The PostgreSQL misses alone: the retry's latency and 8 clients, against both floors.

    python benchmarks/misses.py [ROUNDS] [PER_ROUND] [CLIENTS] [events-by-sequence]

A shorter loop than ``run.py --only postgres,concurrency`` for trying a change:
the same functions, with the concurrency curve cut to the given client counts
(default 8).
"""

from __future__ import annotations

import os
import sys

import run
import suite_pg

# The experiment: the library's one-step retry with its events numbered from a
# sequence instead of the project's row (so neither gap-free nor in commit order:
# what the contract costs under concurrency, not a candidate to ship).
_PROJECT_ROW = (
    "es AS (UPDATE {s}.projects SET event_seq = event_seq + (SELECT count(*) FROM ek)\n"
    "    WHERE id = %(p)s AND EXISTS (SELECT FROM g) RETURNING event_seq),"
)
_SEQUENCE = "es AS (SELECT nextval({order}) * 4 + 1000000000003 AS event_seq FROM g),"


def patch(variant: str) -> None:
    """Make the storages built from now on run ``variant`` of the one-step retry."""
    from deepwork_retry.storage import _postgres_sql as q

    if variant != "events-by-sequence":
        raise ValueError(variant)
    original = q._retry_events_ctes

    def by_sequence(move: object) -> str:
        text = original(move)  # type: ignore[arg-type]
        if _PROJECT_ROW not in text:
            raise RuntimeError("the retry's event numbering changed: update the experiment")
        return text.replace(_PROJECT_ROW, _SEQUENCE)

    q._retry_events_ctes = by_sequence


def main(argv: list[str]) -> int:
    rounds = int(argv[0]) if argv else 10
    per_round = int(argv[1]) if len(argv) > 1 else 300
    clients = [int(c) for c in argv[2].split(",")] if len(argv) > 2 else [8]
    if len(argv) > 3:  # the client processes (spawned) read it and patch themselves
        os.environ["DEEPWORK_BENCH_VARIANT"] = argv[3]
        patch(argv[3])
    rows = suite_pg.postgres(rounds, per_round)
    conc = suite_pg.concurrency(max(2, rounds // 3), 150, clients)
    rows += [r for r in conc if "same project" in r.name]
    print(run.table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

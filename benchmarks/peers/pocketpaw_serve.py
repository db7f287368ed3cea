"""Starts pocketpaw's API server (what ``pocketpaw serve`` runs); in the peer's own virtualenv.

    HOME=<scratch> python pocketpaw_serve.py PORT

Two differences from ``pocketpaw serve``, both to measure the retry rather
than something else: the per-client request limiter of its dashboard
middleware (10 requests/s, bursts of 30, per client address) is lifted, since
every benchmark request comes from 127.0.0.1; and the daily update check (an
outbound request) is not started. Binds 127.0.0.1 only.
"""

from __future__ import annotations

import sys

from pocketpaw.api.serve import run_api_server
from pocketpaw.security import rate_limiter

rate_limiter.api_limiter.rate = 1e9
rate_limiter.api_limiter.capacity = 10**9

if __name__ == "__main__":
    run_api_server(host="127.0.0.1", port=int(sys.argv[1]))

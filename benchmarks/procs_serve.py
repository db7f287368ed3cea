"""N uvicorn processes, each on its own socket bound to one port with ``SO_REUSEPORT``.

    python procs_serve.py FACTORY WORKERS PORT

``FACTORY`` is a name in ``procs_app.py``. Unlike ``uvicorn --workers N``
(one listening socket shared by the workers, so that the worker that wakes
first may accept every connection a client opens at once), the kernel spreads
the connections over the sockets by their addresses. The settings are those
the group gives ``uvicorn`` on the command line. The processes stop with
the group's SIGTERM (the benchmark stops the process group).
"""

from __future__ import annotations

import multiprocessing
import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepwork_retry.web._http import MAX_HEADER_BYTES as H11_MAX  # as the demo server


def serve(factory: str, port: int) -> None:
    import uvicorn

    # IPPROTO_TCP: asyncio then sets TCP_NODELAY on each accepted connection.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    config = uvicorn.Config(
        f"procs_app:{factory}",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="info",
        access_log=True,
        h11_max_incomplete_event_size=H11_MAX,
    )
    uvicorn.Server(config).run(sockets=[sock])


def main() -> int:
    factory, workers, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=serve, args=(factory, port)) for _ in range(workers)]
    for proc in procs:
        proc.start()

    def stop(signum: int, frame: object) -> None:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for proc in procs:
        proc.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())

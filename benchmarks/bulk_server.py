"""The API over an existing store, on uvicorn: ``python bulk_server.py KIND PORT TOKEN WHERE``.

KIND is ``sqlite`` (WHERE is the file, opened as the demo does:
``AsyncSQLiteStorage(path)``, WAL, ``synchronous=FULL``) or ``postgres`` (WHERE is
``DSN SCHEMA``: ``AsyncPostgresStorage`` opened in the server's event loop).
The store is filled beforehand by the benchmark; the server only serves the
Starlette adapter under ``/api/deep-work`` (access log off). It prints
``ready`` once set up.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvicorn

from deepwork_retry._async.services import AsyncRetryService
from deepwork_retry.auth import Principal, StaticTokens
from deepwork_retry.web.starlette import create_app


def main() -> int:
    kind, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    tokens = StaticTokens()
    tokens.add(token, Principal(id="bench"))
    storage: Any
    if kind == "sqlite":
        from deepwork_retry.storage.sqlite import AsyncSQLiteStorage

        storage = AsyncSQLiteStorage(sys.argv[4])
    else:
        from deepwork_retry.storage.postgres import AsyncPostgresStorage

        storage = AsyncPostgresStorage(sys.argv[4], schema=sys.argv[5], min_size=1, max_size=2)
    service = AsyncRetryService(storage)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        await storage.open()
        try:
            yield
        finally:
            await storage.close()

    app = create_app(service, tokens, lifespan=lifespan)
    gc.collect()
    gc.freeze()
    print("ready", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The retry endpoint in a FastAPI application.

    pip install 'deepwork-retry[fastapi]' uvicorn
    python examples/fastapi_app.py          # then paste the printed curl

Tokens come from DEEPWORK_TOKENS ("token=principal;..."); without it a random
token is made and printed. Storage is in memory, with one blocked task.
"""

from __future__ import annotations

import uvicorn
from example_setup import AsyncPrintDispatcher, blocked_demo, port, print_curl, tokens
from fastapi import FastAPI

from deepwork_retry import AsyncRetryService
from deepwork_retry.storage.memory import AsyncMemoryStorage
from deepwork_retry.web.fastapi import mount

table, TOKEN = tokens()
service = AsyncRetryService(AsyncMemoryStorage(blocked_demo()), AsyncPrintDispatcher())

app = FastAPI(title="Example")
mount(app, service, table)

if __name__ == "__main__":
    print_curl(TOKEN)
    uvicorn.run(app, host="127.0.0.1", port=port())

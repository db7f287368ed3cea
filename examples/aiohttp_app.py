"""The retry endpoint in an aiohttp application.

    pip install 'deepwork-retry[aiohttp]'
    python examples/aiohttp_app.py          # then paste the printed curl

Tokens come from DEEPWORK_TOKENS ("token=principal;..."); without it a random
token is made and printed. Storage is in memory, with one blocked task.
"""

from __future__ import annotations

from aiohttp import web
from example_setup import AsyncPrintDispatcher, blocked_demo, port, print_curl, tokens

from deepwork_retry import AsyncRetryService
from deepwork_retry.storage.memory import AsyncMemoryStorage
from deepwork_retry.web.aiohttp import mount

table, TOKEN = tokens()
service = AsyncRetryService(AsyncMemoryStorage(blocked_demo()), AsyncPrintDispatcher())

app = web.Application()
mount(app, service, table)

if __name__ == "__main__":
    print_curl(TOKEN)
    web.run_app(app, host="127.0.0.1", port=port())

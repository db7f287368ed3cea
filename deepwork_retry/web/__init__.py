"""Web adapters: the retry API mounted in Starlette, FastAPI, Flask, Django or aiohttp.

Each framework has its own module (``deepwork_retry.web.starlette``,
``.fastapi``, ``.flask``, ``.django``, ``.aiohttp``), imported only when asked
for; this package itself imports no framework.
"""

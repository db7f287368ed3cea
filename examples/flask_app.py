"""The retry endpoint in a Flask application.

    pip install 'deepwork-retry[flask]'
    python examples/flask_app.py            # then paste the printed curl

Tokens come from DEEPWORK_TOKENS ("token=principal;..."); without it a random
token is made and printed. Storage is in memory, with one blocked task.
"""

from __future__ import annotations

from example_setup import PrintDispatcher, blocked_demo, port, print_curl, tokens
from flask import Flask

from deepwork_retry import RetryService
from deepwork_retry.web.flask import mount

table, TOKEN = tokens()
service = RetryService(blocked_demo(), PrintDispatcher())

app = Flask(__name__)
mount(app, service, table)

if __name__ == "__main__":
    print_curl(TOKEN)
    app.run(host="127.0.0.1", port=port())

"""``python -m deepwork_retry`` runs the ``deepwork-retry`` command."""

from __future__ import annotations

import sys

from deepwork_retry.cli import main

sys.exit(main())

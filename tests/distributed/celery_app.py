"""The Celery application the tests run as a real worker: ``celery -A celery_app worker``.

Configured by the environment variables described in :mod:`dist_support`.
"""

from __future__ import annotations

import os

from celery import Celery
from dist_support import HEARTBEAT, TASK_NAME, executor_from_env, host_work

from deepwork_retry import ExecutorService
from deepwork_retry.dispatch.celery import CeleryDispatcher, deepwork_task

QUEUE = os.environ["DEEPWORK_TEST_QUEUE"]

if os.environ.get("DEEPWORK_TEST_SPANS"):  # telemetry tests only: the others need no SDK
    from otel_support import instrument_from_env

    instrument_from_env()

app = Celery("deepwork_test", broker=os.environ["DEEPWORK_TEST_BROKER"])
app.conf.update(
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=1,
    worker_enable_remote_control=False,
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
)


def make_executor() -> ExecutorService:
    return executor_from_env(CeleryDispatcher(app, task_name=TASK_NAME, queue=QUEUE))


execute = deepwork_task(app, make_executor, name=TASK_NAME, heartbeat_interval=HEARTBEAT)(host_work)

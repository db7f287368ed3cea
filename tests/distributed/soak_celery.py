"""The fault soak's Celery worker: ``celery -A soak_celery worker`` (see :mod:`soak_app`)."""

from __future__ import annotations

import os

from celery import Celery
from soak_app import HEARTBEAT, QUEUE, TASK_NAME, executor, host_work

from deepwork_retry import ExecutorService
from deepwork_retry.dispatch.celery import CeleryDispatcher, deepwork_task

app = Celery("deepwork_soak", broker=os.environ["SOAK_REDIS"])
app.conf.update(
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=1,
    worker_enable_remote_control=False,
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
)


def make_executor() -> ExecutorService:
    return executor(CeleryDispatcher(app, task_name=TASK_NAME, queue=QUEUE))


execute = deepwork_task(app, make_executor, name=TASK_NAME, heartbeat_interval=HEARTBEAT)(host_work)

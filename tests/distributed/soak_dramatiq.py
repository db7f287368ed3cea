"""The fault soak's Dramatiq worker: ``dramatiq soak_dramatiq`` (see :mod:`soak_app`)."""

from __future__ import annotations

import dramatiq
from soak_app import HEARTBEAT, QUEUE, TASK_NAME, executor, host_work, rabbitmq_broker

from deepwork_retry import ExecutorService
from deepwork_retry.dispatch.dramatiq import DramatiqDispatcher, deepwork_actor

broker = rabbitmq_broker()
dramatiq.set_broker(broker)


def make_executor() -> ExecutorService:
    return executor(DramatiqDispatcher(broker, actor_name=TASK_NAME, queue_name=QUEUE))


execute = deepwork_actor(
    broker, make_executor, actor_name=TASK_NAME, queue_name=QUEUE, heartbeat_interval=HEARTBEAT
)(host_work)

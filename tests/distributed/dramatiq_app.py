"""The Dramatiq broker and actor the tests run as a real worker: ``dramatiq dramatiq_app``.

Configured by the environment variables described in :mod:`dist_support`.
"""

from __future__ import annotations

import os

import dramatiq
from dist_support import HEARTBEAT, TASK_NAME, executor_from_env, host_work

from deepwork_retry import ExecutorService
from deepwork_retry.dispatch.dramatiq import DramatiqDispatcher, deepwork_actor

QUEUE = os.environ["DEEPWORK_TEST_QUEUE"]

if os.environ.get("DEEPWORK_TEST_SPANS"):  # telemetry tests only: the others need no SDK
    from otel_support import instrument_from_env

    instrument_from_env()
BROKER_URL = os.environ["DEEPWORK_TEST_BROKER"]


def make_broker(url: str) -> dramatiq.Broker:
    if url.startswith("redis"):
        from dramatiq.brokers.redis import RedisBroker

        return RedisBroker(url=url)
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    return RabbitmqBroker(url=url, confirm_delivery=True)


broker = make_broker(BROKER_URL)
dramatiq.set_broker(broker)


def make_executor() -> ExecutorService:
    return executor_from_env(DramatiqDispatcher(broker, actor_name=TASK_NAME, queue_name=QUEUE))


execute = deepwork_actor(
    broker, make_executor, actor_name=TASK_NAME, queue_name=QUEUE, heartbeat_interval=HEARTBEAT
)(host_work)

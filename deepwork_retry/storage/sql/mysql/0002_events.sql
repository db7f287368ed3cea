-- Migration 0002: lifecycle events (see deepwork_retry/_core/events.py).
--
-- Each project numbers its events 1, 2, 3 … in commit order: event_seq is
-- the last number given, bumped in the same transaction as the move that
-- makes the events (writes take turns on writer_turn).
ALTER TABLE projects ADD COLUMN event_seq BIGINT NOT NULL DEFAULT 0;

-- The W3C trace context of the request that made the attempt (telemetry).
ALTER TABLE outbox ADD COLUMN trace LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;

-- The events: pending until delivered (delivered_at NULL); a relay claims
-- them until claimed_until. data is a JSON object as text.
CREATE TABLE events (
    project_id    VARBINARY(1020) NOT NULL,
    seq           BIGINT NOT NULL,
    type          VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    task_id       VARBINARY(1020),
    attempt       BIGINT,
    at            BIGINT NOT NULL,
    data          LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    delivered_at  BIGINT,
    claimed_until BIGINT,
    PRIMARY KEY (project_id, seq),
    -- Claims: the pending events in order (delivered_at IS NULL leads).
    KEY events_pending (delivered_at, project_id, seq),
    -- Claims: a pending event's earlier events of its task.
    KEY events_by_task (project_id, task_id, seq)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- A subscriber's failed delivery of an event: retried at retry_at, parked
-- (parked = 1) after the subscriber's limit of tries.
CREATE TABLE event_retries (
    project_id    VARBINARY(1020) NOT NULL,
    seq           BIGINT NOT NULL,
    subscriber    VARBINARY(1020) NOT NULL,
    tries         BIGINT NOT NULL,
    retry_at      BIGINT NOT NULL,
    last_error    LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    parked        TINYINT NOT NULL DEFAULT 0,
    claimed_until BIGINT,
    PRIMARY KEY (project_id, seq, subscriber),
    KEY event_retries_due (parked, retry_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

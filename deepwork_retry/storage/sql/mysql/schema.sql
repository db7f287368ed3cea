-- The schema of the MySQL/MariaDB storage after every migration (a test holds the two equal).
--
-- The same encodings as the SQLite storage: timestamps are BIGINT microseconds
-- since 1970-01-01 UTC (exact and ordered), lists and objects are JSON text.
-- Ids and keys are their UTF-8 bytes (VARBINARY), so they compare and sort by
-- code point, exactly as in Python and in the other storages: a collation
-- would call 'a' and 'A' the same id, and every utf8mb4 collation that MySQL
-- and MariaDB share ignores trailing spaces ('a' = 'a '). Ids are at most 255
-- characters (deepwork_retry._core.inputs.MAX_ID_LENGTH), 1020 bytes, which
-- keeps every key within InnoDB's 3072 bytes. Free text is utf8mb4.
--
-- MySQL has no partial indexes: where SQLite indexes the rows of one state,
-- these indexes lead with the state.

CREATE TABLE projects (
    id          VARBINARY(1020) NOT NULL,
    status      VARCHAR(32)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    name        LONGTEXT     CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    version     BIGINT NOT NULL,
    -- Progress counters, changed in the same transaction as every task change.
    total       BIGINT NOT NULL DEFAULT 0,
    inbox       BIGINT NOT NULL DEFAULT 0,
    assigned    BIGINT NOT NULL DEFAULT 0,
    in_progress BIGINT NOT NULL DEFAULT 0,
    review      BIGINT NOT NULL DEFAULT 0,
    done        BIGINT NOT NULL DEFAULT 0,
    blocked     BIGINT NOT NULL DEFAULT 0,
    skipped     BIGINT NOT NULL DEFAULT 0,
    -- The last event number given in the project (migration 0002).
    event_seq   BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE tasks (
    project_id       VARBINARY(1020) NOT NULL,
    id               VARBINARY(1020) NOT NULL,
    title            LONGTEXT     CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    status           VARCHAR(32)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    retry_count      BIGINT NOT NULL,
    max_retries      BIGINT NOT NULL,
    retries_left     BIGINT NOT NULL,
    error_message    LONGTEXT     CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    error_type       LONGTEXT     CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    blocked_reason   VARCHAR(32)  CHARACTER SET ascii COLLATE ascii_bin,
    blocked_by       LONGTEXT     CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,  -- JSON array of task ids
    attempt          BIGINT NOT NULL,
    lease_expires_at BIGINT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    started_at       BIGINT,
    completed_at     BIGINT,
    version          BIGINT NOT NULL,
    metadata         LONGTEXT     CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,  -- JSON object
    PRIMARY KEY (project_id, id),
    -- Pages of one status (the blocked tasks of a project) without a scan.
    KEY tasks_by_status (project_id, status, id),
    -- Expired leases: the running tasks, by lease.
    KEY tasks_by_lease (status, lease_expires_at, project_id, id),
    -- redeliver_stale(): the few tasks waiting to be started; and, as it leads with
    -- the status, blocked_tasks(): the blocked tasks across projects by (project, id).
    KEY tasks_assigned (status, project_id, id, attempt)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- One row per (task, task it waits for): dependants() is a key lookup.
CREATE TABLE task_deps (
    project_id VARBINARY(1020) NOT NULL,
    blocker_id VARBINARY(1020) NOT NULL,
    task_id    VARBINARY(1020) NOT NULL,
    PRIMARY KEY (project_id, blocker_id, task_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE attempts (
    project_id    VARBINARY(1020) NOT NULL,
    task_id       VARBINARY(1020) NOT NULL,
    number        BIGINT NOT NULL,
    triggered_by  VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    dispatched_at BIGINT NOT NULL,
    available_at  BIGINT NOT NULL,
    actor         LONGTEXT    CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    reason        LONGTEXT    CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    budget        VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin,
    started_at    BIGINT,
    finished_at   BIGINT,
    outcome       VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin,
    error_type    LONGTEXT    CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    error_message LONGTEXT    CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    PRIMARY KEY (project_id, task_id, number),
    -- Retention: attempt records by dispatch time.
    KEY attempts_by_dispatch (dispatched_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- The dispatch outbox. seq keeps insertion order; pending_seq orders the
-- pending entries by the moment they became pending, which is the order
-- claim_due hands them out.
CREATE TABLE outbox (
    seq           BIGINT NOT NULL AUTO_INCREMENT,
    project_id    VARBINARY(1020) NOT NULL,
    task_id       VARBINARY(1020) NOT NULL,
    attempt       BIGINT NOT NULL,
    state         VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    available_at  BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    claimed_until BIGINT,
    tries         BIGINT NOT NULL,
    last_error    LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    delivered_at  BIGINT,
    pending_seq   BIGINT,
    -- The W3C trace context of the request that made the attempt (migration 0002).
    trace         LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    PRIMARY KEY (seq),
    UNIQUE KEY outbox_entry (project_id, task_id, attempt),
    KEY outbox_pending (state, pending_seq),
    KEY outbox_due (state, available_at),
    KEY outbox_deferred (project_id, state, seq),
    -- Retention: delivered entries by delivery time.
    KEY outbox_delivered (state, delivered_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- expires_at: when the key is free again (see deepwork_retry/_core/retention.py).
CREATE TABLE idempotency (
    `key`       VARBINARY(1020) NOT NULL,
    project_id  VARBINARY(1020) NOT NULL,
    task_id     VARBINARY(1020) NOT NULL,
    created_at  BIGINT NOT NULL,
    status_code BIGINT,
    body        LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    expires_at  BIGINT NOT NULL,
    PRIMARY KEY (`key`),
    KEY idempotency_by_expiry (expires_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- The writers' turn: every write transaction first locks this one row, so
-- writes are serialised as they are on SQLite (BEGIN IMMEDIATE) and checks,
-- writes and the outbox order are atomic without gap locks or deadlocks.
CREATE TABLE writer_turn (
    id TINYINT NOT NULL,
    PRIMARY KEY (id)
) ENGINE = InnoDB;
INSERT INTO writer_turn (id) VALUES (1);

-- Lifecycle events (migration 0002, see deepwork_retry/_core/events.py).
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

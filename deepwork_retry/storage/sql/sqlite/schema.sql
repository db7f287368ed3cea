-- The full current schema of the SQLite storage: what the migrations in this
-- directory, applied in order, produce (a test checks that they agree).
--
-- Timestamps are INTEGER microseconds since 1970-01-01 UTC: exact for every
-- datetime the library produces, and ordered, so comparisons run on an index.
-- Ids and free text are TEXT; text that is not valid UTF-8 (lone surrogates)
-- is kept as a BLOB of its surrogate-pass encoding so nothing is lost.

CREATE TABLE projects (
    id          TEXT    NOT NULL PRIMARY KEY,
    status      TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    version     INTEGER NOT NULL,
    -- Progress counters, changed in the same transaction as every task change.
    total       INTEGER NOT NULL DEFAULT 0,
    inbox       INTEGER NOT NULL DEFAULT 0,
    assigned    INTEGER NOT NULL DEFAULT 0,
    in_progress INTEGER NOT NULL DEFAULT 0,
    review      INTEGER NOT NULL DEFAULT 0,
    done        INTEGER NOT NULL DEFAULT 0,
    blocked     INTEGER NOT NULL DEFAULT 0,
    skipped     INTEGER NOT NULL DEFAULT 0,
    -- The last event number given in the project (migration 0004).
    event_seq   INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE TABLE tasks (
    project_id       TEXT    NOT NULL,
    id               TEXT    NOT NULL,
    title            TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    retry_count      INTEGER NOT NULL,
    max_retries      INTEGER NOT NULL,
    retries_left     INTEGER NOT NULL,
    error_message    TEXT,
    error_type       TEXT,
    blocked_reason   TEXT,
    blocked_by       TEXT    NOT NULL,  -- JSON array of task ids
    attempt          INTEGER NOT NULL,
    lease_expires_at INTEGER,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    started_at       INTEGER,
    completed_at     INTEGER,
    version          INTEGER NOT NULL,
    metadata         TEXT    NOT NULL,  -- JSON object
    PRIMARY KEY (project_id, id)
) WITHOUT ROWID;

-- Pages of one status (the blocked tasks of a project) without a scan.
CREATE INDEX tasks_by_status ON tasks (project_id, status, id);

-- Expired leases: only running tasks are indexed.
CREATE INDEX tasks_by_lease ON tasks (lease_expires_at, project_id, id)
    WHERE status = 'in_progress';
-- redeliver_stale(): the few tasks waiting to be started.
CREATE INDEX tasks_assigned ON tasks (project_id, id, attempt)
    WHERE status = 'assigned';
-- blocked_tasks(): the blocked tasks across projects (migration 0005).
CREATE INDEX tasks_blocked ON tasks (project_id, id)
    WHERE status = 'blocked';

-- One row per (task, task it waits for): dependants() is a key lookup.
CREATE TABLE task_deps (
    project_id TEXT NOT NULL,
    blocker_id TEXT NOT NULL,
    task_id    TEXT NOT NULL,
    PRIMARY KEY (project_id, blocker_id, task_id)
) WITHOUT ROWID;

CREATE TABLE attempts (
    project_id    TEXT    NOT NULL,
    task_id       TEXT    NOT NULL,
    number        INTEGER NOT NULL,
    triggered_by  TEXT    NOT NULL,
    dispatched_at INTEGER NOT NULL,
    available_at  INTEGER NOT NULL,
    actor         TEXT,
    reason        TEXT,
    budget        TEXT,
    started_at    INTEGER,
    finished_at   INTEGER,
    outcome       TEXT,
    error_type    TEXT,
    error_message TEXT,
    PRIMARY KEY (project_id, task_id, number)
) WITHOUT ROWID;

-- The dispatch outbox. seq keeps insertion order; pending_seq orders the
-- pending entries by the moment they became pending, which is the order
-- claim_due hands them out.
CREATE TABLE outbox (
    seq           INTEGER PRIMARY KEY,
    project_id    TEXT    NOT NULL,
    task_id       TEXT    NOT NULL,
    attempt       INTEGER NOT NULL,
    state         TEXT    NOT NULL,
    available_at  INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    claimed_until INTEGER,
    tries         INTEGER NOT NULL,
    last_error    TEXT,
    delivered_at  INTEGER,
    pending_seq   INTEGER,
    -- The W3C trace context of the request that made the attempt (migration 0004).
    trace         TEXT,
    UNIQUE (project_id, task_id, attempt)
);

CREATE INDEX outbox_pending ON outbox (pending_seq) WHERE state = 'pending';
CREATE INDEX outbox_due ON outbox (available_at) WHERE state = 'pending';
CREATE INDEX outbox_deferred ON outbox (project_id, seq) WHERE state = 'deferred';

CREATE TABLE idempotency (
    key         TEXT    NOT NULL PRIMARY KEY,
    project_id  TEXT    NOT NULL,
    task_id     TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    status_code INTEGER,
    body        TEXT,
    -- From this moment the key is free again (retention; migration 0003).
    expires_at  INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Retention: each prune batch is a range read of one of these, oldest first.
CREATE INDEX idempotency_by_expiry ON idempotency (expires_at);
CREATE INDEX outbox_delivered ON outbox (delivered_at) WHERE state = 'delivered';
CREATE INDEX attempts_by_dispatch ON attempts (dispatched_at);

-- Lifecycle events (migration 0004, see deepwork_retry/_core/events.py).
-- The events: pending until delivered (delivered_at NULL); a relay claims
-- them until claimed_until. data is a JSON object as text.
CREATE TABLE events (
    project_id    TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    type          TEXT    NOT NULL,
    task_id       TEXT,
    attempt       INTEGER,
    at            INTEGER NOT NULL,
    data          TEXT    NOT NULL,
    delivered_at  INTEGER,
    claimed_until INTEGER,
    PRIMARY KEY (project_id, seq)
) WITHOUT ROWID;

-- Claims read the pending events in order, and each one's earlier pending
-- events of its task; prunes read the delivered ones by delivery time.
CREATE INDEX events_pending ON events (project_id, seq) WHERE delivered_at IS NULL;
CREATE INDEX events_pending_task ON events (project_id, task_id, seq)
    WHERE delivered_at IS NULL;
CREATE INDEX events_delivered ON events (delivered_at) WHERE delivered_at IS NOT NULL;

-- A subscriber's failed delivery of an event: retried at retry_at, parked
-- (parked = 1) after the subscriber's limit of tries.
CREATE TABLE event_retries (
    project_id    TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    subscriber    TEXT    NOT NULL,
    tries         INTEGER NOT NULL,
    retry_at      INTEGER NOT NULL,
    last_error    TEXT,
    parked        INTEGER NOT NULL DEFAULT 0,
    claimed_until INTEGER,
    PRIMARY KEY (project_id, seq, subscriber)
) WITHOUT ROWID;

CREATE INDEX event_retries_due ON event_retries (retry_at) WHERE parked = 0;

-- Migration 0004: lifecycle events (see deepwork_retry/_core/events.py).
--
-- Each project numbers its events 1, 2, 3 … in commit order: event_seq is
-- the last number given, bumped in the same transaction as the move that
-- makes the events (the write lock serialises those transactions).
ALTER TABLE projects ADD COLUMN event_seq INTEGER NOT NULL DEFAULT 0;

-- The W3C trace context of the request that made the attempt (telemetry).
ALTER TABLE outbox ADD COLUMN trace TEXT;

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

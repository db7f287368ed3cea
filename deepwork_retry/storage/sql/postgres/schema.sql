-- The PostgreSQL schema as it stands after every migration in this directory.
-- A test applies the migrations in order and checks the result equals this file.

-- Ids use the "C" collation: they sort by code point, as Python sorts str.

CREATE TABLE projects (
    id          text COLLATE "C" NOT NULL PRIMARY KEY,
    status      text        NOT NULL,
    name        text        NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    version     bigint      NOT NULL,
    -- The number of the project's last lifecycle event (migration 0005).
    event_seq   bigint      NOT NULL DEFAULT 0,
    CONSTRAINT projects_status CHECK (status IN (
        'draft', 'planning', 'awaiting_approval', 'approved', 'executing',
        'paused', 'completed', 'failed', 'cancelled'))
);

-- Each project's counters in 4 rows ("stripes"), one of which is changed in
-- the same statement as every task change, so reading progress never counts
-- tasks. A task's moves always change the stripe named by tasks.stripe, so
-- moves of different tasks of one project rarely wait for the same row; each
-- stripe counts exactly its own tasks, and the project's progress is the sum.
CREATE TABLE progress (
    project_id  text COLLATE "C" NOT NULL REFERENCES projects (id),
    stripe      smallint NOT NULL,
    total       bigint NOT NULL DEFAULT 0,
    inbox       bigint NOT NULL DEFAULT 0,
    assigned    bigint NOT NULL DEFAULT 0,
    in_progress bigint NOT NULL DEFAULT 0,
    review      bigint NOT NULL DEFAULT 0,
    done        bigint NOT NULL DEFAULT 0,
    blocked     bigint NOT NULL DEFAULT 0,
    skipped     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (project_id, stripe),
    CONSTRAINT progress_stripe CHECK (stripe BETWEEN 0 AND 3)
);

CREATE TABLE tasks (
    project_id       text COLLATE "C" NOT NULL REFERENCES projects (id),
    id               text COLLATE "C" NOT NULL,
    title            text        NOT NULL,
    status           text        NOT NULL,
    retry_count      bigint      NOT NULL,
    max_retries      bigint      NOT NULL,
    retries_left     bigint      NOT NULL,
    error_message    text,
    error_type       text,
    blocked_reason   text,
    blocked_by       text[] COLLATE "C" NOT NULL,
    attempt          bigint      NOT NULL,
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    started_at       timestamptz,
    completed_at     timestamptz,
    version          bigint      NOT NULL,
    metadata         jsonb       NOT NULL,
    -- The progress stripe this task's moves change (see progress).
    stripe           smallint    NOT NULL DEFAULT 0,
    PRIMARY KEY (project_id, id),
    CONSTRAINT tasks_status CHECK (status IN (
        'inbox', 'assigned', 'in_progress', 'review', 'done', 'blocked', 'skipped')),
    CONSTRAINT tasks_stripe CHECK (stripe BETWEEN 0 AND 3)
);

-- list_tasks(status=...) pages by id within one status.
CREATE INDEX tasks_by_status ON tasks (project_id, status, id);
-- dependants(): the tasks whose blocked_by names a task.
CREATE INDEX tasks_by_blocker ON tasks USING gin (blocked_by);
-- expired_leases(): only running tasks have a lease worth looking at.
CREATE INDEX tasks_by_lease ON tasks (lease_expires_at, project_id, id)
    WHERE status = 'in_progress';
-- redeliver_stale(): the few tasks waiting to be started.
CREATE INDEX tasks_assigned ON tasks (project_id, id, attempt)
    WHERE status = 'assigned';
-- blocked_tasks(): the blocked tasks across projects (migration 0006).
CREATE INDEX tasks_blocked ON tasks (project_id, id)
    WHERE status = 'blocked';

CREATE TABLE attempts (
    project_id    text COLLATE "C" NOT NULL,
    task_id       text COLLATE "C" NOT NULL,
    number        bigint      NOT NULL,
    trigger       text        NOT NULL,
    dispatched_at timestamptz NOT NULL,
    available_at  timestamptz NOT NULL,
    actor         text,
    reason        text,
    budget        text,
    started_at    timestamptz,
    finished_at   timestamptz,
    outcome       text,
    error_type    text,
    error_message text,
    PRIMARY KEY (project_id, task_id, number),
    FOREIGN KEY (project_id, task_id) REFERENCES tasks (project_id, id)
);

-- Orders outbox rows: "seq" by creation, "pending_seq" by the moment a row
-- last became pending (the order in which relays claim).
CREATE SEQUENCE outbox_order;

CREATE TABLE outbox (
    project_id    text COLLATE "C" NOT NULL,
    task_id       text COLLATE "C" NOT NULL,
    attempt       bigint      NOT NULL,
    state         text        NOT NULL,
    available_at  timestamptz NOT NULL,
    created_at    timestamptz NOT NULL,
    claimed_until timestamptz,
    tries         bigint      NOT NULL,
    last_error    text,
    delivered_at  timestamptz,
    seq           bigint      NOT NULL,
    pending_seq   bigint,
    -- The trace context of the request that made the attempt (migration 0005).
    trace         text,
    PRIMARY KEY (project_id, task_id, attempt),
    FOREIGN KEY (project_id, task_id) REFERENCES tasks (project_id, id),
    CONSTRAINT outbox_state CHECK (state IN ('deferred', 'pending', 'delivered', 'cancelled'))
);

-- claim_due(): pending rows in the order they became pending.
CREATE INDEX outbox_pending ON outbox (pending_seq) WHERE state = 'pending';
-- deferred(): a project's deferred rows in creation order.
CREATE INDEX outbox_deferred ON outbox (project_id, seq) WHERE state = 'deferred';

CREATE TABLE idempotency (
    key         text COLLATE "C" NOT NULL PRIMARY KEY,
    project_id  text        NOT NULL,
    task_id     text        NOT NULL,
    created_at  timestamptz NOT NULL,
    status_code bigint,
    body        text,
    -- From this moment the key is free again (retention; migration 0004).
    expires_at  timestamptz NOT NULL
);

-- Retention: each prune batch is a range read of one of these, oldest first.
CREATE INDEX idempotency_by_expiry ON idempotency (expires_at);
CREATE INDEX outbox_delivered ON outbox (delivered_at) WHERE state = 'delivered';
CREATE INDEX attempts_by_dispatch ON attempts (dispatched_at);

-- Lifecycle events, numbered per project in commit order (projects.event_seq).
CREATE TABLE events (
    project_id    text COLLATE "C" NOT NULL REFERENCES projects (id),
    seq           bigint      NOT NULL,
    type          text        NOT NULL,
    task_id       text COLLATE "C",
    attempt       bigint,
    at            timestamptz NOT NULL,
    data          jsonb       NOT NULL,
    -- NULL: pending (not yet delivered to every subscriber).
    delivered_at  timestamptz,
    claimed_until timestamptz,
    PRIMARY KEY (project_id, seq)
);

CREATE INDEX events_pending ON events (project_id, seq) WHERE delivered_at IS NULL;
CREATE INDEX events_pending_by_task ON events (project_id, task_id, seq)
    WHERE delivered_at IS NULL;
CREATE INDEX events_delivered ON events (delivered_at) WHERE delivered_at IS NOT NULL;

-- A subscriber's failed delivery of an event: retried at retry_at, parked after its limit.
CREATE TABLE event_retries (
    project_id    text COLLATE "C" NOT NULL,
    seq           bigint      NOT NULL,
    subscriber    text COLLATE "C" NOT NULL,
    tries         bigint      NOT NULL,
    retry_at      timestamptz NOT NULL,
    last_error    text,
    parked        boolean     NOT NULL DEFAULT false,
    claimed_until timestamptz,
    PRIMARY KEY (project_id, seq, subscriber),
    FOREIGN KEY (project_id, seq) REFERENCES events (project_id, seq)
);

CREATE INDEX event_retries_due ON event_retries (retry_at) WHERE NOT parked;

-- Migration 0003: each project's progress counters in 4 rows ("stripes").
--
-- Every task move changes the counters, so while a project's counters lived
-- in one row, concurrent moves in one project queued on that row's lock from
-- their counter update until their commit. Now a task belongs to one stripe
-- for life (tasks.stripe, chosen when the task is added) and its moves change
-- that stripe's counters only; the project's progress is the sum of its
-- stripes. Each stripe's counters are exactly those of its tasks.
--
-- Existing tasks join stripe 0 (the column's default) and each existing row
-- becomes its project's stripe 0, so every stripe stays exact without a
-- recount; stripes 1-3 start at zero. Adding the column rewrites nothing;
-- checking the new constraint reads the tasks table once.
--
-- Four stripes: enough that concurrent moves in one project seldom wait for
-- a counter row, few enough that reading a project's progress, which every
-- move does to return it, stays cheap.

ALTER TABLE tasks ADD COLUMN stripe smallint NOT NULL DEFAULT 0,
    ADD CONSTRAINT tasks_stripe CHECK (stripe BETWEEN 0 AND 3);

ALTER TABLE progress ADD COLUMN stripe smallint NOT NULL DEFAULT 0,
    DROP CONSTRAINT progress_pkey;
ALTER TABLE progress ALTER COLUMN stripe DROP DEFAULT,
    ADD CONSTRAINT progress_pkey PRIMARY KEY (project_id, stripe),
    ADD CONSTRAINT progress_stripe CHECK (stripe BETWEEN 0 AND 3);

INSERT INTO progress (project_id, stripe)
    SELECT project_id, s.stripe FROM progress, generate_series(1, 3) AS s(stripe);

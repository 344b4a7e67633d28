-- Jobs and schedules that several hosts share.
--
-- A job's state is also kept in columns, so that hosts can claim pending
-- jobs (`FOR UPDATE SKIP LOCKED`), renew the leases of those they run and
-- expire the leases of hosts that died, all without reading the records.
-- Times are the database's own (`gust_now_ms`), so that hosts whose clocks
-- differ agree on when a lease has lapsed.

CREATE FUNCTION gust_now_ms() RETURNS BIGINT
LANGUAGE sql VOLATILE AS $$
    SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT
$$;

ALTER TABLE jobs
    ADD COLUMN status TEXT,
    -- The host running it, and until when its claim holds.
    ADD COLUMN host TEXT,
    ADD COLUMN lease_until BIGINT,
    -- Set by a host asked to cancel a job that another host runs.
    ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    ADD COLUMN finished_at BIGINT,
    -- What `max_stored_job_bytes` counts of it.
    ADD COLUMN bytes BIGINT NOT NULL DEFAULT 0;

UPDATE jobs SET
    status = record ->> 'status',
    finished_at = (record ->> 'finished_at')::BIGINT;

ALTER TABLE jobs ALTER COLUMN status SET NOT NULL;

CREATE INDEX jobs_pending ON jobs (tenant, id COLLATE "C") WHERE status = 'pending';
CREATE INDEX jobs_running ON jobs (host) WHERE status = 'running';
CREATE INDEX jobs_lapsing ON jobs (lease_until) WHERE status = 'running';
CREATE INDEX jobs_finished ON jobs (tenant, finished_at) WHERE finished_at IS NOT NULL;

-- The cron time a schedule last fired for, whichever host fired it: a
-- host claims a fire by moving it forward (compare-and-set).
ALTER TABLE schedules ADD COLUMN fired_tick BIGINT;

-- Hosts follow each other's schedules as they follow functions (V2); a
-- fire's note (its last run) is not a change of the schedule.
CREATE FUNCTION gust_schedule_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gust_schedules', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER schedules_added_or_removed
AFTER INSERT OR DELETE ON schedules
FOR EACH ROW EXECUTE FUNCTION gust_schedule_changed();

CREATE TRIGGER schedules_replaced
AFTER UPDATE ON schedules
FOR EACH ROW
WHEN (OLD.record -> 'created_at' IS DISTINCT FROM NEW.record -> 'created_at'
      OR OLD.record -> 'cron' IS DISTINCT FROM NEW.record -> 'cron')
EXECUTE FUNCTION gust_schedule_changed();

-- How many records each function incarnation keeps, and the `seq` at or
-- below which all of its records are pruned: a record write deletes exactly
-- the oldest records beyond the retention, found from that floor, instead
-- of counting the newest ones every time.
CREATE TABLE record_counts (
    tenant TEXT NOT NULL,
    function TEXT NOT NULL,
    incarnation BIGINT NOT NULL,
    kept BIGINT NOT NULL,
    pruned_to BIGINT NOT NULL,
    PRIMARY KEY (tenant, function, incarnation)
);

INSERT INTO record_counts (tenant, function, incarnation, kept, pruned_to)
SELECT tenant, function, incarnation, count(*), min(seq) - 1
FROM invocations
GROUP BY tenant, function, incarnation;

-- Change detection coverage. The leading coordinator scans each table for changed tenants over
-- [scanned_from, scanned_through) without gaps; a task whose synced_through is past both
-- scanned_from and the last change seen for it (changed_until) has nothing unsent below
-- scanned_through. That is how idle tenants' lag stays near zero without writing one row per
-- idle tenant per tick.
CREATE TABLE change_scans (
    table_id        bigint PRIMARY KEY REFERENCES table_specs (id) ON DELETE CASCADE,
    scanned_from    timestamptz NOT NULL,
    scanned_through timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE sync_state ADD COLUMN changed_until timestamptz;

-- Source time up to which a task is confirmed in BigQuery, counting change detection.
CREATE FUNCTION effective_synced_through(s sync_state, cs change_scans) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN cs.scanned_through IS NOT NULL
             AND s.synced_through >= cs.scanned_from
             AND s.synced_through >= coalesce(s.changed_until, '-infinity')
        THEN greatest(s.synced_through, cs.scanned_through)
        ELSE s.synced_through
    END
$$;

-- The end of a slice in one round trip, in one transaction:
-- 1. the progress, only if the fencing token is still the current one (a holder whose lease
--    expired matches no row and moves nothing); the watermark only moves forward;
-- 2. the task's compaction turn, when asked for ($12, the interval in seconds) and due: true
--    when the caller should compact now. The turn is recorded up front, so a failed compaction
--    waits for the next turn; a task's first turn only starts the clock (right after the first
--    sync there is nothing old to compact);
-- 3. the run log entry, whose outcome is `fenced` when the progress was refused.
WITH old AS (
    SELECT compacted_at FROM sync_state WHERE tenant_id = $1 AND table_id = $2 FOR UPDATE
), committed AS (
    UPDATE sync_state s SET
        watermark_cursor = COALESCE($4, s.watermark_cursor),
        watermark_key = COALESCE($5, s.watermark_key),
        synced_through = GREATEST(s.synced_through, $6),
        rows_synced = s.rows_synced + $7,
        next_run_at = now() + make_interval(secs => CASE
            WHEN $10::float8 IS NOT NULL
                 AND s.changed_until > GREATEST(s.synced_through, $6) THEN $10::float8
            ELSE $8 END / 1000.0),
        last_success_at = CASE WHEN $9::text IS NULL THEN now() ELSE s.last_success_at END,
        last_error = $9,
        last_error_at = CASE WHEN $9::text IS NULL THEN s.last_error_at ELSE now() END,
        consecutive_failures = CASE WHEN $9::text IS NULL THEN 0 ELSE s.consecutive_failures + 1 END,
        batches_visible_through = GREATEST(s.batches_visible_through, COALESCE($11, 0)),
        compacted_at = CASE WHEN $12::float8 IS NOT NULL
                                 AND (old.compacted_at IS NULL
                                      OR old.compacted_at <= now() - make_interval(secs => $12::float8))
                            THEN now() ELSE s.compacted_at END
    FROM old
    WHERE s.tenant_id = $1 AND s.table_id = $2 AND s.fencing_token <= $3
    RETURNING $12::float8 IS NOT NULL AND old.compacted_at IS NOT NULL
              AND old.compacted_at <= now() - make_interval(secs => $12::float8) AS compact
), run AS (
    INSERT INTO sync_runs (tenant_id, table_id, worker, fencing_token, started_at, duration_ms,
                           rows, outcome, error)
    SELECT $1, $2, $13, $3, $14, $15, $16,
           CASE WHEN EXISTS (SELECT 1 FROM committed) THEN $17 ELSE 'fenced' END, $9
)
SELECT EXISTS (SELECT 1 FROM committed) AS committed,
       coalesce((SELECT compact FROM committed), false) AS compact

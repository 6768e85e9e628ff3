-- The end of slices in one round trip and one transaction, for one task or a batch of them
-- (every parameter is an array with one element per task):
-- 1. each task's progress, only if its fencing token is still the current one (a holder whose
--    lease expired matches no row and moves nothing); the watermark only moves forward;
-- 2. the task's compaction turn, when asked for (compact_s, the interval in seconds) and due: true
--    when the caller should compact now. The turn is recorded up front, so a failed compaction
--    waits for the next turn; a task's first turn only starts the clock (right after the first
--    sync there is nothing old to compact) and says so (`first_turn`: the caller does the
--    cheap part of its periodic work, the check for rows that cannot be synced);
-- 3. the run log entry, whose outcome is `fenced` when the progress was refused.
-- The rows are locked in key order first (see start_slice.sql). The relation `p` holds the
-- per-task parameters, one column each: control/finish.rs fills in its FROM clause,
-- `unnest($1::bigint[], ...) AS p(tenant_id, ...)`, from the parameters' list there.
WITH p AS (
    SELECT *
    FROM {params}
), old AS (
    SELECT s.tenant_id, s.table_id, s.compacted_at
    FROM sync_state s
    JOIN p USING (tenant_id, table_id)
    ORDER BY s.tenant_id, s.table_id
    FOR UPDATE OF s
), committed AS (
    UPDATE sync_state s SET
        watermark_cursor = COALESCE(p.wm_cursor, s.watermark_cursor),
        watermark_key = CASE WHEN p.wm_key IS NULL THEN s.watermark_key
                             ELSE ARRAY(SELECT jsonb_array_elements_text(p.wm_key)) END,
        synced_through = GREATEST(s.synced_through, p.synced_through),
        rows_synced = s.rows_synced + p.rows,
        next_run_at = now() + make_interval(secs => CASE
            WHEN p.rerun_ms IS NOT NULL
                 AND s.changed_until > GREATEST(s.synced_through, p.synced_through) THEN p.rerun_ms
            ELSE p.next_run_ms END / 1000.0),
        last_success_at = CASE WHEN p.error IS NULL THEN now() ELSE s.last_success_at END,
        last_error = p.error,
        last_error_at = CASE WHEN p.error IS NULL THEN s.last_error_at ELSE now() END,
        consecutive_failures = CASE WHEN p.error IS NULL THEN 0 ELSE s.consecutive_failures + 1 END,
        batches_visible_through = GREATEST(s.batches_visible_through, COALESCE(p.batches, 0)),
        compacted_at = CASE WHEN p.compact_s IS NOT NULL
                                 AND (old.compacted_at IS NULL
                                      OR old.compacted_at <= now() - make_interval(secs => p.compact_s))
                            THEN now() ELSE s.compacted_at END
    FROM p
    JOIN old USING (tenant_id, table_id)
    WHERE s.tenant_id = p.tenant_id AND s.table_id = p.table_id AND s.fencing_token <= p.token
    RETURNING s.tenant_id, s.table_id,
              p.compact_s IS NOT NULL AND old.compacted_at IS NOT NULL
              AND old.compacted_at <= now() - make_interval(secs => p.compact_s) AS compact,
              p.compact_s IS NOT NULL AND old.compacted_at IS NULL AS first_turn
), run AS (
    INSERT INTO sync_runs (tenant_id, table_id, worker, fencing_token, started_at, duration_ms,
                           rows, outcome, error)
    SELECT p.tenant_id, p.table_id, p.worker, p.token, p.started_at, p.duration_ms, p.run_rows,
           CASE WHEN c.tenant_id IS NOT NULL THEN p.outcome ELSE 'fenced' END, p.error
    FROM p
    LEFT JOIN committed c USING (tenant_id, table_id)
)
SELECT p.tenant_id, p.table_id, c.tenant_id IS NOT NULL AS committed,
       coalesce(c.compact, false) AS compact, coalesce(c.first_turn, false) AS first_turn
FROM p
LEFT JOIN committed c USING (tenant_id, table_id)

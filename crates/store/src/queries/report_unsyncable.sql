-- Rows of one task ($1 tenant, $2 table) that can never be sent, as dead letters with an empty
-- payload (nothing was built to send): one open letter per key. Keys travel as JSON arrays
-- ($3), with the cursor's text ($4) and the reason ($5). With $6 (the list is complete), open
-- letters of this kind whose key is no longer listed are closed: the row has a real time now
-- and syncs by itself, or it is gone.
WITH found AS (
    SELECT ARRAY(SELECT jsonb_array_elements_text(k::jsonb)) AS row_key, c, r
    FROM unnest($3::text[], $4::text[], $5::text[]) AS u(k, c, r)
), closed AS (
    UPDATE dead_letters d
    SET status = 'discarded', resolved_at = now(),
        reason = d.reason || ' (closed: the row has a real cursor value now, or is gone)'
    WHERE $6 AND d.tenant_id = $1 AND d.table_id = $2 AND d.status = 'open' AND d.payload = ''
      AND NOT EXISTS (SELECT 1 FROM found f WHERE f.row_key = d.row_key)
), added AS (
    INSERT INTO dead_letters (tenant_id, table_id, row_key, cursor, reason, payload)
    SELECT $1, $2, f.row_key, f.c, f.r, ''
    FROM found f
    WHERE NOT EXISTS (SELECT 1 FROM dead_letters d
                      WHERE d.tenant_id = $1 AND d.table_id = $2 AND d.status = 'open'
                        AND d.payload = '' AND d.row_key = f.row_key)
    RETURNING 1
)
SELECT count(*) FROM added

-- The start of a slice in one round trip: the tenant, the table spec, the sealed key's nonce (a
-- worker keeps its cached client while the nonce matches) and the claim: a new fencing token
-- and the watermark. Nothing is claimed unless the tenant is active, the table enabled and the
-- task enabled for the tenant. $1 tenant id, $2 table id.
WITH tn AS (
    SELECT t.id, t.slug, t.organization_id, t.bq_project, t.bq_dataset, t.status,
           t.max_requests_per_s, t.max_rows_per_s, c.nonce AS credentials_nonce
    FROM tenants t
    LEFT JOIN tenant_credentials c ON c.tenant_id = t.id
    WHERE t.id = $1
), ts AS (
    SELECT * FROM table_specs WHERE id = $2
), claimed AS (
    UPDATE sync_state s SET fencing_token = s.fencing_token + 1
    FROM tn, ts
    WHERE s.tenant_id = $1 AND s.table_id = $2 AND s.enabled
      AND tn.status = 'active' AND ts.enabled
    RETURNING s.fencing_token, s.watermark_cursor, s.watermark_key, s.synced_through,
              s.schema_hash, s.batches_visible_through
)
SELECT tn.id, tn.slug, tn.organization_id, tn.bq_project, tn.bq_dataset, tn.status,
       tn.max_requests_per_s, tn.max_rows_per_s, tn.credentials_nonce,
       tn.credentials_nonce IS NOT NULL AS has_credentials,
       ts.id AS table_spec_id, ts.source_schema, ts.source_table, ts.key_columns,
       ts.cursor_column, ts.tenant_column, ts.mode, ts.enabled, ts.sync_interval_ms,
       ts.slice_rows, ts.soft_delete_column, ts.capture,
       claimed.fencing_token, claimed.watermark_cursor, claimed.watermark_key,
       claimed.synced_through, claimed.schema_hash, claimed.batches_visible_through
FROM tn CROSS JOIN ts LEFT JOIN claimed ON true

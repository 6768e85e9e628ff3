-- The start of slices in one round trip, for one task or a batch of them ($1 tenant ids, $2
-- table ids, pairwise): per task the tenant, the table spec, the sealed key's nonce (a worker
-- keeps its cached client while the nonce matches) and the claim: a new fencing token and the
-- watermark. Nothing is claimed unless the tenant is active, the table enabled and the task
-- enabled for the tenant. The task rows are locked in key order before they are updated, so
-- two batches (or a batch and the coordinator's `mark_changed`, which locks in the same order)
-- never wait for each other in a cycle.
WITH req AS (
    SELECT DISTINCT r.tenant_id, r.table_id
    FROM unnest($1::bigint[], $2::bigint[]) AS r(tenant_id, table_id)
), tn AS (
    SELECT t.id, t.slug, t.organization_id, t.bq_project, t.bq_dataset, t.bq_location, t.status,
           t.max_requests_per_s, t.max_rows_per_s, t.impersonate, c.nonce AS credentials_nonce
    FROM tenants t
    LEFT JOIN tenant_credentials c ON c.tenant_id = t.id
    WHERE t.id IN (SELECT tenant_id FROM req)
), ts AS (
    SELECT * FROM table_specs WHERE id IN (SELECT table_id FROM req)
), locked AS (
    SELECT s.tenant_id, s.table_id
    FROM sync_state s
    JOIN req USING (tenant_id, table_id)
    JOIN tn ON tn.id = s.tenant_id AND tn.status = 'active'
    JOIN ts ON ts.id = s.table_id AND ts.enabled
    WHERE s.enabled
    ORDER BY s.tenant_id, s.table_id
    FOR UPDATE OF s
), claimed AS (
    UPDATE sync_state s SET fencing_token = s.fencing_token + 1
    FROM locked
    WHERE s.tenant_id = locked.tenant_id AND s.table_id = locked.table_id
    RETURNING s.tenant_id, s.table_id, s.fencing_token, s.watermark_cursor, s.watermark_key,
              s.synced_through, s.schema_hash, s.batches_visible_through, s.changed_until
)
SELECT req.tenant_id, req.table_id,
       tn.id, tn.slug, tn.organization_id, tn.bq_project, tn.bq_dataset, tn.bq_location, tn.status,
       tn.max_requests_per_s, tn.max_rows_per_s, tn.impersonate, tn.credentials_nonce,
       tn.credentials_nonce IS NOT NULL AS has_credentials,
       ts.id AS table_spec_id, ts.source_schema, ts.source_table, ts.key_columns,
       ts.cursor_column, ts.tenant_column, ts.mode, ts.enabled, ts.sync_interval_ms,
       ts.slice_rows, ts.soft_delete_column, ts.capture, ts.write_api, ts.max_staleness_s,
       ts.exclude_columns, ts.hash_columns,
       claimed.fencing_token, claimed.watermark_cursor, claimed.watermark_key,
       claimed.synced_through, claimed.schema_hash, claimed.batches_visible_through,
       claimed.changed_until
FROM req
JOIN tn ON tn.id = req.tenant_id
JOIN ts ON ts.id = req.table_id
LEFT JOIN claimed ON claimed.tenant_id = req.tenant_id AND claimed.table_id = req.table_id

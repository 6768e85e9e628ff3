-- Rows BigQuery refused (or that cannot be sent at all, e.g. over the request size limit).
-- A row is written here before the watermark moves past it, so nothing refused is lost.
CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    tenant_id   bigint NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    table_id    bigint NOT NULL REFERENCES table_specs (id) ON DELETE CASCADE,
    row_key     text[] NOT NULL,
    cursor      text NOT NULL,
    reason      text NOT NULL,
    -- The insertAll row as it was sent ({"insertId":…,"json":…}); `dlq retry` sends it again.
    payload     text NOT NULL,
    status      text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'retried', 'discarded')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz
);
CREATE INDEX dead_letters_open ON dead_letters (tenant_id, table_id) WHERE status = 'open';

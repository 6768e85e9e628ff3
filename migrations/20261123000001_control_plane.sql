-- Control plane of tenantsync: who is synced where, with which credentials, and how far.

CREATE TABLE tenants (
    id              bigserial PRIMARY KEY,
    slug            text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    -- Value of the tenant column in source tables, kept as text and cast to the column's type
    -- in SQL, so bigint, uuid and text tenant ids all work.
    organization_id text NOT NULL,
    bq_project      text NOT NULL,
    bq_dataset      text NOT NULL,
    status          text NOT NULL DEFAULT 'active'
                    CHECK (status IN ('active', 'paused', 'credentials_invalid')),
    status_reason   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (bq_project, bq_dataset)
);

-- Service-account keys, AES-256-GCM sealed under the master key `key_id`; the tenant id is the
-- associated data. client_email is kept in clear for display: it is not a secret.
CREATE TABLE tenant_credentials (
    tenant_id    bigint PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    key_id       text NOT NULL,
    nonce        bytea NOT NULL,
    ciphertext   bytea NOT NULL,
    client_email text,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE table_specs (
    id               bigserial PRIMARY KEY,
    source_schema    text NOT NULL DEFAULT 'public',
    source_table     text NOT NULL,
    key_columns      text[] NOT NULL CHECK (cardinality(key_columns) > 0),
    cursor_column    text NOT NULL,
    tenant_column    text NOT NULL,
    mode             text NOT NULL DEFAULT 'latest' CHECK (mode IN ('latest', 'history', 'merge')),
    enabled          boolean NOT NULL DEFAULT true,
    sync_interval_ms integer NOT NULL DEFAULT 1000 CHECK (sync_interval_ms >= 0),
    slice_rows       integer NOT NULL DEFAULT 20000 CHECK (slice_rows > 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source_schema, source_table)
);

-- One row per (tenant, table): how far it is confirmed in BigQuery and who may move it.
CREATE TABLE sync_state (
    tenant_id            bigint NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    table_id             bigint NOT NULL REFERENCES table_specs (id) ON DELETE CASCADE,
    enabled              boolean NOT NULL DEFAULT true,
    -- Keyset position of the last row acknowledged by BigQuery: cursor value and key, as text.
    watermark_cursor     text,
    watermark_key        text[],
    -- Source time up to which everything is confirmed in BigQuery; lag = now() - synced_through.
    synced_through       timestamptz,
    -- Issued by Postgres at claim time and only ever grows; a watermark commit must carry the
    -- current one, so a worker whose lease expired cannot move anything.
    fencing_token        bigint NOT NULL DEFAULT 0,
    rows_synced          bigint NOT NULL DEFAULT 0,
    last_success_at      timestamptz,
    last_error           text,
    last_error_at        timestamptz,
    consecutive_failures integer NOT NULL DEFAULT 0,
    next_run_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, table_id)
);
CREATE INDEX sync_state_due ON sync_state (next_run_at) WHERE enabled;

-- One row per slice a worker ran.
CREATE TABLE sync_runs (
    id            bigserial PRIMARY KEY,
    tenant_id     bigint NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    table_id      bigint NOT NULL REFERENCES table_specs (id) ON DELETE CASCADE,
    worker        text NOT NULL,
    fencing_token bigint NOT NULL,
    started_at    timestamptz NOT NULL,
    duration_ms   integer NOT NULL,
    rows          integer NOT NULL,
    outcome       text NOT NULL CHECK (outcome IN ('ok', 'partial', 'failed', 'fenced')),
    error         text
);
CREATE INDEX sync_runs_by_task ON sync_runs (tenant_id, table_id, started_at DESC);

-- Admin surface (issue 7): audit log and admin API tokens.

-- Every admin action, by whom (CLI: $USER or "cli"; API: the token's name), never with secrets.
CREATE TABLE audit_log (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,
    action  text NOT NULL,
    -- What was acted on, e.g. a tenant slug or "tenant/table"; NULL for global actions.
    target  text,
    details jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at ON audit_log (at DESC);

-- Bearer tokens of the admin API. Only a BLAKE3 hash of the token is kept: a token is shown
-- once, when created, and a leaked table cannot be replayed.
CREATE TABLE api_tokens (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,62}$'),
    token_hash   text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);

-- The per-(tenant, table) switch of `tables enable|disable --tenant` is sync_state.enabled,
-- there since the first migration; due_tasks, schedulable_tasks and claim honour it.

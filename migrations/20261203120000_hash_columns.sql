-- Column policies (issue 16): source columns sent only as a keyed hash (HMAC-SHA-256 under a
-- per-tenant secret, in a STRING column `<column>_hmac`), and that secret per tenant, sealed
-- with the master key like credentials (AES-256-GCM, the tenant id bound as associated data).
-- The secret is made the first time one of the tenant's tables needs it, and never rotated:
-- hashes must stay joinable across the tenant's tables and over time.
ALTER TABLE table_specs ADD COLUMN hash_columns text[] NOT NULL DEFAULT '{}';

CREATE TABLE tenant_hash_keys (
    tenant_id  bigint PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    key_id     text NOT NULL,
    nonce      bytea NOT NULL,
    ciphertext bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

//! Admin statements: audit log, API tokens, per-(tenant, table) switches, tenant removal,
//! master-key rotation and the run log.

use super::tasks::TaskId;
use super::ControlPlane;
use crate::error::{Result, StoreError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use tenantsync_core::crypto::Sealed;

/// One admin action, as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub details: serde_json::Value,
}

/// An admin API token as listed (its hash never leaves the store).
#[derive(Debug, Clone, Serialize)]
pub struct ApiToken {
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// One slice from the run log.
#[derive(Debug, Clone, Serialize)]
pub struct RunEntry {
    pub id: i64,
    pub tenant: String,
    pub table: String,
    pub worker: String,
    pub fencing_token: i64,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i32,
    pub rows: i32,
    pub outcome: String,
    pub error: Option<String>,
}

/// A task's per-tenant switch and its sync rate over the recent run log.
#[derive(Debug, Clone, Copy)]
pub struct TaskRate {
    pub task: TaskId,
    pub enabled: bool,
    /// Rows per second over the recent successful slices (wall time from the first start to
    /// the last end), None without recent runs.
    pub rows_per_s: Option<f64>,
}

/// The tables holding secrets sealed with the master key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedTable {
    /// Tenants' service-account keys.
    Credentials,
    /// Tenants' hashing secrets (`--hash-column`).
    HashKeys,
}

impl SealedTable {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Credentials => "tenant_credentials",
            Self::HashKeys => "tenant_hash_keys",
        }
    }
}

/// A sealed credential with the tenant it belongs to.
#[derive(Debug, Clone)]
pub struct StoredCredential {
    pub tenant_id: i64,
    pub sealed: Sealed,
}

impl ControlPlane {
    /// Record an admin action. `details` must not carry secrets.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: Option<&str>,
        details: serde_json::Value,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_log (actor, action, target, details) VALUES ($1, $2, $3, $4)",
        )
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(details)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The newest `limit` audit entries, newest first.
    pub async fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, target, details FROM audit_log
             ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get("id")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    details: r.try_get("details")?,
                })
            })
            .collect()
    }

    /// Store a new token's hash under `name`.
    pub async fn create_api_token(&self, name: &str, token_hash: &str) -> Result<()> {
        sqlx::query("INSERT INTO api_tokens (name, token_hash) VALUES ($1, $2)")
            .bind(name)
            .bind(token_hash)
            .execute(self.pool())
            .await
            .map_err(|e| match StoreError::from(e) {
                StoreError::Conflict(_) => {
                    StoreError::Conflict(format!("a token named {name:?} exists already"))
                }
                StoreError::Invalid(_) => StoreError::Invalid(format!(
                    "token name {name:?} is not valid: 1-63 letters, digits, '.', '_', '@', '-'"
                )),
                other => other,
            })?;
        Ok(())
    }

    pub async fn api_tokens(&self) -> Result<Vec<ApiToken>> {
        let rows = sqlx::query(
            "SELECT name, created_at, last_used_at, revoked_at FROM api_tokens ORDER BY name",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ApiToken {
                    name: r.try_get("name")?,
                    created_at: r.try_get("created_at")?,
                    last_used_at: r.try_get("last_used_at")?,
                    revoked_at: r.try_get("revoked_at")?,
                })
            })
            .collect()
    }

    /// Revoke a token by name. Returns false when no live token has that name.
    pub async fn revoke_api_token(&self, name: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL",
        )
        .bind(name)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The name of the live token with this hash (and note its use), or None.
    pub async fn api_token_by_hash(&self, token_hash: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "UPDATE api_tokens SET last_used_at = now()
             WHERE token_hash = $1 AND revoked_at IS NULL RETURNING name",
        )
        .bind(token_hash)
        .fetch_optional(self.pool())
        .await?)
    }

    /// Look a table spec up by schema and name.
    pub async fn table_by_name(
        &self,
        schema: &str,
        table: &str,
    ) -> Result<tenantsync_core::TableSpec> {
        let row =
            sqlx::query("SELECT * FROM table_specs WHERE source_schema = $1 AND source_table = $2")
                .bind(schema)
                .bind(table)
                .fetch_optional(self.pool())
                .await?
                .ok_or_else(|| {
                    StoreError::NotFound(format!("no registered table {schema}.{table}"))
                })?;
        super::spec_from_row(&row)
    }

    /// Switch one (tenant, table) task on or off. A task switched on is due at once. Returns
    /// whether anything changed.
    pub async fn set_task_enabled(&self, task: TaskId, enabled: bool) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE sync_state SET enabled = $3,
                 next_run_at = CASE WHEN $3 THEN now() ELSE next_run_at END
             WHERE tenant_id = $1 AND table_id = $2 AND enabled <> $3",
        )
        .bind(task.tenant_id)
        .bind(task.table_id)
        .bind(enabled)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Per task of a tenant (or of all tenants): its switch and recent rows/s from the run log
    /// (slices of the last `window_s` seconds).
    pub async fn task_rates(&self, tenant_id: Option<i64>, window_s: f64) -> Result<Vec<TaskRate>> {
        let rows = sqlx::query(
            "SELECT s.tenant_id, s.table_id, s.enabled,
                    (SELECT sum(r.rows)::float8
                            / nullif(extract(epoch FROM max(r.started_at + make_interval(secs => r.duration_ms / 1000.0))
                                                        - min(r.started_at)), 0)
                     FROM sync_runs r
                     WHERE r.tenant_id = s.tenant_id AND r.table_id = s.table_id
                       AND r.outcome IN ('ok', 'partial') AND r.rows > 0
                       AND r.started_at > now() - make_interval(secs => $2)) AS rate
             FROM sync_state s
             WHERE $1::bigint IS NULL OR s.tenant_id = $1",
        )
        .bind(tenant_id)
        .bind(window_s)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TaskRate {
                    task: TaskId {
                        tenant_id: r.try_get(0)?,
                        table_id: r.try_get(1)?,
                    },
                    enabled: r.try_get(2)?,
                    rows_per_s: r.try_get(3)?,
                })
            })
            .collect()
    }

    /// Make every task of a tenant due now (after a resume).
    pub async fn make_tenant_due(&self, tenant_id: i64) -> Result<()> {
        sqlx::query("UPDATE sync_state SET next_run_at = now() WHERE tenant_id = $1")
            .bind(tenant_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Delete a tenant and everything the control plane holds for it (credentials, sync
    /// state, run log, dead letters) in one statement. BigQuery is not touched here.
    pub async fn remove_tenant(&self, tenant_id: i64) -> Result<()> {
        let done = sqlx::query("DELETE FROM tenants WHERE id = $1")
            .bind(tenant_id)
            .execute(self.pool())
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!(
                "no tenant with id {tenant_id}"
            )));
        }
        Ok(())
    }

    /// Every stored credential (sealed), for master-key rotation.
    pub async fn all_credentials(&self) -> Result<Vec<StoredCredential>> {
        self.all_sealed(SealedTable::Credentials).await
    }

    /// Every secret sealed in `table`, for master-key rotation.
    pub async fn all_sealed(&self, table: SealedTable) -> Result<Vec<StoredCredential>> {
        let rows = sqlx::query(&format!(
            "SELECT tenant_id, key_id, nonce, ciphertext FROM {} ORDER BY tenant_id",
            table.name()
        ))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredCredential {
                    tenant_id: r.try_get("tenant_id")?,
                    sealed: Sealed {
                        key_id: r.try_get("key_id")?,
                        nonce: r.try_get("nonce")?,
                        ciphertext: r.try_get("ciphertext")?,
                    },
                })
            })
            .collect()
    }

    /// Replace a sealed credential by the same secret sealed under another master key, only if
    /// the row still holds `old` (compare-and-set on the nonce): a `rotate-credentials` that
    /// ran meanwhile wins. Returns whether the row was replaced.
    pub async fn reseal_credential(
        &self,
        tenant_id: i64,
        old: &Sealed,
        new: &Sealed,
    ) -> Result<bool> {
        self.reseal(SealedTable::Credentials, tenant_id, old, new)
            .await
    }

    /// [`Self::reseal_credential`] for any table of sealed secrets.
    pub async fn reseal(
        &self,
        table: SealedTable,
        tenant_id: i64,
        old: &Sealed,
        new: &Sealed,
    ) -> Result<bool> {
        let done = sqlx::query(&format!(
            "UPDATE {} SET key_id = $3, nonce = $4, ciphertext = $5
             WHERE tenant_id = $1 AND nonce = $2",
            table.name()
        ))
        .bind(tenant_id)
        .bind(&old.nonce)
        .bind(&new.key_id)
        .bind(&new.nonce)
        .bind(&new.ciphertext)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Stored credentials per master key id.
    pub async fn credentials_by_key_id(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT key_id, count(*) FROM tenant_credentials GROUP BY key_id ORDER BY key_id",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// The newest `limit` slices of the run log, of one tenant or all.
    pub async fn runs(&self, tenant: Option<&str>, limit: i64) -> Result<Vec<RunEntry>> {
        let rows = sqlx::query(
            "SELECT r.id, tn.slug, ts.source_schema, ts.source_table, r.worker, r.fencing_token,
                    r.started_at, r.duration_ms, r.rows, r.outcome, r.error
             FROM sync_runs r
             JOIN tenants tn ON tn.id = r.tenant_id
             JOIN table_specs ts ON ts.id = r.table_id
             WHERE $1::text IS NULL OR tn.slug = $1
             ORDER BY r.id DESC LIMIT $2",
        )
        .bind(tenant)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let schema: String = r.try_get("source_schema")?;
                let table: String = r.try_get("source_table")?;
                Ok(RunEntry {
                    id: r.try_get("id")?,
                    tenant: r.try_get("slug")?,
                    table: if schema == "public" {
                        table
                    } else {
                        format!("{schema}.{table}")
                    },
                    worker: r.try_get("worker")?,
                    fencing_token: r.try_get("fencing_token")?,
                    started_at: r.try_get("started_at")?,
                    duration_ms: r.try_get("duration_ms")?,
                    rows: r.try_get("rows")?,
                    outcome: r.try_get("outcome")?,
                    error: r.try_get("error")?,
                })
            })
            .collect()
    }
}

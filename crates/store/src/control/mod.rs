//! The control plane: tenants, sealed credentials, table specs, sync state and the run log.

pub mod admin;
pub mod dead_letters;
mod finish;
pub mod tasks;

use crate::error::{Result, StoreError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};
use tenantsync_core::crypto::Sealed;
use tenantsync_core::{Capture, Mode, TableSpec, Tenant, TenantStatus, WriteApi};

#[derive(Clone, Debug)]
pub struct ControlPlane {
    pool: PgPool,
}

#[derive(Debug, Clone)]
pub struct NewTenant {
    pub slug: String,
    pub organization_id: String,
    pub bq_project: String,
    pub bq_dataset: String,
    /// Where the dataset is (see [`tenantsync_core::location`]).
    pub bq_location: Option<String>,
    /// The service account to impersonate instead of a stored key.
    pub impersonate: Option<String>,
}

/// Credentials to store with a new tenant. `seal` receives the new tenant's id because the id
/// is the ciphertext's associated data.
pub struct NewCredentials<'a> {
    pub seal: &'a dyn Fn(i64) -> Sealed,
    pub client_email: Option<&'a str>,
}

#[derive(Debug, Clone)]
pub struct NewTableSpec {
    pub source_schema: String,
    pub source_table: String,
    pub key_columns: Vec<String>,
    pub cursor_column: String,
    pub tenant_column: String,
    pub mode: Mode,
    pub sync_interval_ms: i32,
    pub slice_rows: i32,
    /// Checked with the rest of the spec before anything is saved.
    pub soft_delete_column: Option<String>,
    pub capture: Capture,
    /// Source columns never sent to BigQuery.
    pub exclude_columns: Vec<String>,
    /// Source columns sent only as a keyed hash: HMAC-SHA-256 under the tenant's own secret,
    /// in a STRING column named `<column>_hmac` (see `tenantsync_core::hashing`).
    pub hash_columns: Vec<String>,
}

/// One line of `tenantsync status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusRow {
    pub tenant_id: i64,
    pub table_id: i64,
    pub organization_id: String,
    pub tenant: String,
    pub tenant_status: String,
    pub table: String,
    pub rows_synced: i64,
    pub watermark: Option<String>,
    pub synced_through: Option<DateTime<Utc>>,
    pub lag_seconds: Option<f64>,
    /// Change detection saw nothing for this task past what is confirmed: nothing to send.
    pub caught_up: bool,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub consecutive_failures: i32,
    /// The table's write method, `None` when it follows the deployment's default.
    pub write_api: Option<String>,
}

const TENANT_COLUMNS: &str =
    "t.id, t.slug, t.organization_id, t.bq_project, t.bq_dataset, t.bq_location, t.status, \
     t.max_requests_per_s, t.max_rows_per_s, t.impersonate, \
     EXISTS (SELECT 1 FROM tenant_credentials c WHERE c.tenant_id = t.id) AS has_credentials";

fn tenant_from_row(r: &sqlx::postgres::PgRow) -> Result<Tenant> {
    let status: String = r.try_get("status")?;
    Ok(Tenant {
        id: r.try_get("id")?,
        slug: r.try_get("slug")?,
        organization_id: r.try_get("organization_id")?,
        bq_project: r.try_get("bq_project")?,
        bq_dataset: r.try_get("bq_dataset")?,
        bq_location: r.try_get("bq_location")?,
        status: status.parse().map_err(StoreError::Invalid)?,
        has_credentials: r.try_get("has_credentials")?,
        impersonate: r.try_get("impersonate")?,
        max_requests_per_s: r.try_get("max_requests_per_s")?,
        max_rows_per_s: r.try_get("max_rows_per_s")?,
    })
}

fn spec_from_row(r: &sqlx::postgres::PgRow) -> Result<TableSpec> {
    spec_from_row_with_id(r, "id")
}

/// A spec from a row that names its id column `id_column` (a join with other tables' ids).
fn spec_from_row_with_id(r: &sqlx::postgres::PgRow, id_column: &str) -> Result<TableSpec> {
    let mode: String = r.try_get("mode")?;
    let capture: String = r.try_get("capture")?;
    Ok(TableSpec {
        id: r.try_get(id_column)?,
        source_schema: r.try_get("source_schema")?,
        source_table: r.try_get("source_table")?,
        key_columns: r.try_get("key_columns")?,
        cursor_column: r.try_get("cursor_column")?,
        tenant_column: r.try_get("tenant_column")?,
        mode: mode.parse().map_err(StoreError::Invalid)?,
        enabled: r.try_get("enabled")?,
        sync_interval_ms: r.try_get("sync_interval_ms")?,
        slice_rows: r.try_get("slice_rows")?,
        soft_delete_column: r.try_get("soft_delete_column")?,
        capture: capture.parse().map_err(StoreError::Invalid)?,
        write_api: r
            .try_get::<Option<String>, _>("write_api")?
            .map(|w| w.parse())
            .transpose()
            .map_err(StoreError::Invalid)?,
        max_staleness_s: r.try_get("max_staleness_s")?,
        exclude_columns: r.try_get("exclude_columns")?,
        hash_columns: r.try_get("hash_columns")?,
    })
}

impl ControlPlane {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Create a tenant, its sealed credentials (if any) and a sync-state row for every table
    /// spec, in one transaction: a tenant never exists half-onboarded.
    pub async fn add_tenant(
        &self,
        t: &NewTenant,
        creds: Option<NewCredentials<'_>>,
    ) -> Result<Tenant> {
        let mut tx = self.pool.begin().await?;
        let id: std::result::Result<i64, _> = sqlx::query_scalar(
            "INSERT INTO tenants (slug, organization_id, bq_project, bq_dataset, bq_location,
                                  impersonate)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(&t.slug)
        .bind(&t.organization_id)
        .bind(&t.bq_project)
        .bind(&t.bq_dataset)
        .bind(&t.bq_location)
        .bind(&t.impersonate)
        .fetch_one(&mut *tx)
        .await;
        let id = match id {
            Ok(id) => id,
            // Onboarding looks for clashes before it calls BigQuery; the constraints decide
            // when two onboardings race, and the refusal names the tenant that won.
            Err(e) => {
                drop(tx);
                return Err(match StoreError::from(e) {
                    StoreError::Conflict(_) => StoreError::Conflict(
                        self.tenant_clash(t).await?.unwrap_or_else(|| {
                            format!(
                                "a tenant with slug {:?}, organization {} or dataset {}.{} exists already",
                                t.slug, t.organization_id, t.bq_project, t.bq_dataset
                            )
                        }),
                    ),
                    other => other,
                });
            }
        };
        if let Some(NewCredentials {
            seal,
            client_email: email,
        }) = creds
        {
            let s = seal(id);
            sqlx::query(
                "INSERT INTO tenant_credentials (tenant_id, key_id, nonce, ciphertext, client_email)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(&s.key_id)
            .bind(&s.nonce)
            .bind(&s.ciphertext)
            .bind(email)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO sync_state (tenant_id, table_id) SELECT $1, id FROM table_specs
             ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.tenant(&t.slug).await
    }

    /// Why a new tenant clashes with an existing one, naming it: the same slug, the same
    /// organization (whose rows would then go to two datasets) or the same dataset. None when
    /// it clashes with nothing.
    pub async fn tenant_clash(&self, t: &NewTenant) -> Result<Option<String>> {
        let rows = sqlx::query(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants t
             WHERE t.slug = $1 OR t.organization_id = $2
                OR (t.bq_project = $3 AND t.bq_dataset = $4)
             ORDER BY t.slug"
        ))
        .bind(&t.slug)
        .bind(&t.organization_id)
        .bind(&t.bq_project)
        .bind(&t.bq_dataset)
        .fetch_all(&self.pool)
        .await?;
        let clashes = rows
            .iter()
            .map(tenant_from_row)
            .collect::<Result<Vec<_>>>()?;
        if clashes.iter().any(|c| c.slug == t.slug) {
            return Ok(Some(format!("a tenant {:?} exists already", t.slug)));
        }
        if let Some(c) = clashes
            .iter()
            .find(|c| c.organization_id == t.organization_id)
        {
            return Ok(Some(format!(
                "organization {} is already onboarded as tenant {}",
                t.organization_id, c.slug
            )));
        }
        Ok(clashes.first().map(|c| {
            format!(
                "dataset {}.{} belongs to tenant {} already",
                t.bq_project, t.bq_dataset, c.slug
            )
        }))
    }

    pub async fn tenant(&self, slug: &str) -> Result<Tenant> {
        let row = sqlx::query(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants t WHERE t.slug = $1"
        ))
        .bind(slug)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no tenant with slug {slug:?}")))?;
        tenant_from_row(&row)
    }

    pub async fn tenant_by_id(&self, id: i64) -> Result<Tenant> {
        let row = sqlx::query(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants t WHERE t.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no tenant with id {id}")))?;
        tenant_from_row(&row)
    }

    pub async fn tenants(&self) -> Result<Vec<Tenant>> {
        let rows = sqlx::query(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants t ORDER BY t.slug"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(tenant_from_row).collect()
    }

    pub async fn set_tenant_status(
        &self,
        tenant_id: i64,
        status: TenantStatus,
        reason: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE tenants SET status = $2, status_reason = $3, updated_at = now() WHERE id = $1",
        )
        .bind(tenant_id)
        .bind(status.as_str())
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Replace a tenant's key (sealed for it) and make it active again, in one transaction.
    pub async fn rotate_credentials(
        &self,
        tenant_id: i64,
        sealed: &Sealed,
        client_email: Option<&str>,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO tenant_credentials (tenant_id, key_id, nonce, ciphertext, client_email)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant_id) DO UPDATE SET key_id = excluded.key_id, nonce = excluded.nonce,
                 ciphertext = excluded.ciphertext, client_email = excluded.client_email,
                 created_at = now()",
        )
        .bind(tenant_id)
        .bind(&sealed.key_id)
        .bind(&sealed.nonce)
        .bind(&sealed.ciphertext)
        .bind(client_email)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE tenants SET status = 'active', status_reason = NULL, updated_at = now()
             WHERE id = $1 AND status = 'credentials_invalid'",
        )
        .bind(tenant_id)
        .execute(&mut *tx)
        .await?;
        // Tasks that backed off while the key was bad run again at once.
        sqlx::query("UPDATE sync_state SET next_run_at = now() WHERE tenant_id = $1")
            .bind(tenant_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Record where a tenant's dataset is (checked against BigQuery by the caller first).
    pub async fn set_tenant_location(&self, slug: &str, location: &str) -> Result<Tenant> {
        let done =
            sqlx::query("UPDATE tenants SET bq_location = $2, updated_at = now() WHERE slug = $1")
                .bind(slug)
                .bind(location)
                .execute(&self.pool)
                .await?;
        self.updated_tenant(slug, done.rows_affected()).await
    }

    /// The tenant `slug` after an UPDATE of it that changed `rows` rows (none: no such tenant).
    async fn updated_tenant(&self, slug: &str, rows: u64) -> Result<Tenant> {
        if rows == 0 {
            return Err(StoreError::NotFound(format!(
                "no tenant with slug {slug:?}"
            )));
        }
        self.tenant(slug).await
    }

    /// Set (or clear, with None) a tenant's insertAll budget.
    pub async fn set_tenant_limits(
        &self,
        slug: &str,
        requests_per_s: Option<f64>,
        rows_per_s: Option<f64>,
    ) -> Result<Tenant> {
        let done = sqlx::query(
            "UPDATE tenants SET max_requests_per_s = $2, max_rows_per_s = $3, updated_at = now()
             WHERE slug = $1",
        )
        .bind(slug)
        .bind(requests_per_s)
        .bind(rows_per_s)
        .execute(&self.pool)
        .await?;
        self.updated_tenant(slug, done.rows_affected()).await
    }

    /// The tenant's sealed hashing secret (`--hash-column`), stored from `fresh()` the first
    /// time: of two workers making one at once, the first stored wins and both use it.
    pub async fn hash_key(&self, tenant_id: i64, fresh: impl FnOnce() -> Sealed) -> Result<Sealed> {
        if let Some(s) = self.sealed_hash_key(tenant_id).await? {
            return Ok(s);
        }
        let new = fresh();
        sqlx::query(
            "INSERT INTO tenant_hash_keys (tenant_id, key_id, nonce, ciphertext)
             VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id) DO NOTHING",
        )
        .bind(tenant_id)
        .bind(&new.key_id)
        .bind(&new.nonce)
        .bind(&new.ciphertext)
        .execute(&self.pool)
        .await?;
        self.sealed_hash_key(tenant_id)
            .await?
            .ok_or_else(|| StoreError::Invalid(format!("tenant {tenant_id} does not exist")))
    }

    pub async fn sealed_hash_key(&self, tenant_id: i64) -> Result<Option<Sealed>> {
        self.sealed_in(admin::SealedTable::HashKeys, tenant_id)
            .await
    }

    pub async fn credentials(&self, tenant_id: i64) -> Result<Option<Sealed>> {
        self.sealed_in(admin::SealedTable::Credentials, tenant_id)
            .await
    }

    /// The tenant's secret in `table`, sealed.
    pub async fn sealed_in(
        &self,
        table: admin::SealedTable,
        tenant_id: i64,
    ) -> Result<Option<Sealed>> {
        let row = sqlx::query(&format!(
            "SELECT key_id, nonce, ciphertext FROM {} WHERE tenant_id = $1",
            table.name()
        ))
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => None,
            Some(r) => Some(Sealed {
                key_id: r.try_get("key_id")?,
                nonce: r.try_get("nonce")?,
                ciphertext: r.try_get("ciphertext")?,
            }),
        })
    }

    /// Register a table spec and a sync-state row for every tenant.
    pub async fn add_table(&self, s: &NewTableSpec) -> Result<TableSpec> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "INSERT INTO table_specs (source_schema, source_table, key_columns, cursor_column,
                                      tenant_column, mode, sync_interval_ms, slice_rows,
                                      soft_delete_column, capture, exclude_columns,
                                      hash_columns)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING *",
        )
        .bind(&s.source_schema)
        .bind(&s.source_table)
        .bind(&s.key_columns)
        .bind(&s.cursor_column)
        .bind(&s.tenant_column)
        .bind(s.mode.as_str())
        .bind(s.sync_interval_ms)
        .bind(s.slice_rows)
        .bind(&s.soft_delete_column)
        .bind(s.capture.as_str())
        .bind(&s.exclude_columns)
        .bind(&s.hash_columns)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| match StoreError::from(e) {
            StoreError::Conflict(_) => StoreError::Conflict(format!(
                "table {}.{} is registered already",
                s.source_schema, s.source_table
            )),
            other => other,
        })?;
        let spec = spec_from_row(&row)?;
        sqlx::query(
            "INSERT INTO sync_state (tenant_id, table_id) SELECT id, $1 FROM tenants
             ON CONFLICT DO NOTHING",
        )
        .bind(spec.id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(spec)
    }

    /// Set (or clear, for the deployment's default) a table's write method.
    pub async fn set_write_api(&self, table_id: i64, w: Option<WriteApi>) -> Result<()> {
        sqlx::query("UPDATE table_specs SET write_api = $2 WHERE id = $1")
            .bind(table_id)
            .bind(w.map(WriteApi::as_str))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A CDC table's `max_staleness`, in seconds.
    pub async fn set_max_staleness(&self, table_id: i64, seconds: i32) -> Result<()> {
        sqlx::query("UPDATE table_specs SET max_staleness_s = $2 WHERE id = $1")
            .bind(table_id)
            .bind(seconds)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Replace a table's excluded and hashed columns, and remove both kinds' values from its
    /// dead letters' rows: an excluded or hashed value must not stay in the control database
    /// either (`dlq retry` then sends the row without it). Returns the dead letters changed.
    pub async fn set_column_policies(
        &self,
        table_id: i64,
        exclude: &[String],
        hash: &[String],
    ) -> Result<u64> {
        let plain: Vec<&String> = exclude.iter().chain(hash).collect();
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE table_specs SET exclude_columns = $2, hash_columns = $3 WHERE id = $1")
            .bind(table_id)
            .bind(exclude)
            .bind(hash)
            .execute(&mut *tx)
            .await?;
        let scrubbed = sqlx::query(
            "UPDATE dead_letters
                SET payload = jsonb_set(payload::jsonb, '{json}',
                                        (payload::jsonb -> 'json') - $2::text[])::text
              WHERE table_id = $1 AND payload <> '' AND (payload::jsonb -> 'json') ?| $2::text[]",
        )
        .bind(table_id)
        .bind(&plain)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(scrubbed)
    }

    /// Name (or clear) the column that marks a table's rows deleted.
    pub async fn set_soft_delete_column(&self, table_id: i64, column: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE table_specs SET soft_delete_column = $2 WHERE id = $1")
            .bind(table_id)
            .bind(column)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn tables(&self) -> Result<Vec<TableSpec>> {
        let rows = sqlx::query("SELECT * FROM table_specs ORDER BY source_schema, source_table")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(spec_from_row).collect()
    }

    pub async fn table(&self, id: i64) -> Result<TableSpec> {
        let row = sqlx::query("SELECT * FROM table_specs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no table spec with id {id}")))?;
        spec_from_row(&row)
    }

    /// The point one task is confirmed through (what `status` shows as synced through).
    pub async fn task_synced_through(
        &self,
        tenant_id: i64,
        table_id: i64,
    ) -> Result<Option<DateTime<Utc>>> {
        Ok(sqlx::query_scalar(
            "SELECT effective_synced_through(s, cs) FROM sync_state s
             LEFT JOIN change_scans cs ON cs.table_id = s.table_id
             WHERE s.tenant_id = $1 AND s.table_id = $2",
        )
        .bind(tenant_id)
        .bind(table_id)
        .fetch_optional(&self.pool)
        .await?
        .flatten())
    }

    /// Per tenant and table: rows synced, watermark, lag (computed here from `synced_through`
    /// and change-detection coverage, so it keeps growing when no worker or coordinator runs),
    /// last error.
    pub async fn status(&self) -> Result<Vec<StatusRow>> {
        let rows = sqlx::query(
            "SELECT s.tenant_id, s.table_id, tn.organization_id, tn.slug, tn.status, ts.source_table, ts.source_schema, s.rows_synced,
                    s.watermark_cursor, s.watermark_key,
                    effective_synced_through(s, cs) AS synced_through,
                    extract(epoch FROM now() - effective_synced_through(s, cs))::float8 AS lag_seconds,
                    coalesce(cs.scanned_through IS NOT NULL
                             AND s.synced_through >= cs.scanned_from
                             AND s.synced_through >= coalesce(s.changed_until, '-infinity'),
                             false) AS caught_up,
                    s.last_success_at, s.last_error, s.consecutive_failures,
                    -- CDC mode implies the Storage Write API whatever the spec names.
                    CASE WHEN ts.mode = 'cdc' THEN 'storage (cdc)' ELSE ts.write_api END AS write_api
             FROM sync_state s
             JOIN tenants tn ON tn.id = s.tenant_id
             JOIN table_specs ts ON ts.id = s.table_id
             LEFT JOIN change_scans cs ON cs.table_id = s.table_id
             ORDER BY tn.slug, ts.source_schema, ts.source_table",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let cursor: Option<String> = r.try_get("watermark_cursor")?;
                let key: Option<Vec<String>> = r.try_get("watermark_key")?;
                let schema: String = r.try_get("source_schema")?;
                let table: String = r.try_get("source_table")?;
                Ok(StatusRow {
                    tenant_id: r.try_get("tenant_id")?,
                    table_id: r.try_get("table_id")?,
                    organization_id: r.try_get("organization_id")?,
                    tenant: r.try_get("slug")?,
                    tenant_status: r.try_get("status")?,
                    table: if schema == "public" {
                        table
                    } else {
                        format!("{schema}.{table}")
                    },
                    rows_synced: r.try_get("rows_synced")?,
                    watermark: cursor
                        .map(|c| format!("{c} / {}", key.unwrap_or_default().join(","))),
                    synced_through: r.try_get("synced_through")?,
                    lag_seconds: r.try_get("lag_seconds")?,
                    caught_up: r.try_get("caught_up")?,
                    last_success_at: r.try_get("last_success_at")?,
                    last_error: r.try_get("last_error")?,
                    consecutive_failures: r.try_get("consecutive_failures")?,
                    write_api: r.try_get("write_api")?,
                })
            })
            .collect()
    }
}

#![doc = include_str!("../README.md")]

pub mod api;
mod error;
pub mod onboarding;
pub mod progress;
pub mod repair;
pub mod tokens;

pub use error::AdminError;

use secrecy::SecretString;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tenantsync_bigquery::{BigQuery, Credentials, Endpoint};
use tenantsync_core::crypto::MasterKey;
use tenantsync_core::{TableSpec, Tenant, TenantStatus};
use tenantsync_lease::Leases;
use tenantsync_store::control::admin::SealedTable;
use tenantsync_store::control::tasks::TaskId;
use tenantsync_store::{ControlPlane, SourceReader};
use tracing::{info, warn};

pub type Result<T, E = AdminError> = std::result::Result<T, E>;

/// What the admin operations need. Only the control plane is required; each operation that
/// needs more says so in its error when it is missing.
#[derive(Clone)]
pub struct Admin {
    pub control: ControlPlane,
    /// For backfill progress (source row counts).
    pub source: Option<SourceReader>,
    /// To wait for in-flight slices before removing a tenant.
    pub leases: Option<Leases>,
    pub master_key: Option<Arc<MasterKey>>,
    pub endpoint: Endpoint,
    /// How long `remove` waits for a paused tenant's slices in flight to finish.
    pub drain_timeout: Duration,
}

/// What happens to a removed tenant's BigQuery dataset. There is no default: the caller must
/// say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataChoice {
    Keep,
    Drop,
}

/// A tenant with every table's state.
#[derive(Debug, Clone, Serialize)]
pub struct TenantDetail {
    #[serde(flatten)]
    pub tenant: Tenant,
    pub tables: Vec<progress::TaskStatus>,
}

/// Outcome of a master-key rotation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KeyRotation {
    /// The key every credential is sealed under now.
    pub key_id: String,
    pub resealed: usize,
    pub already_current: usize,
    /// Credentials that could not be opened (tenant id and reason; never the secret).
    pub failed: Vec<(i64, String)>,
}

/// Who acts, for the audit log: `$USER` on the CLI (or "cli").
pub fn cli_actor() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .map(|u| format!("cli:{u}"))
        .unwrap_or_else(|| "cli".into())
}

impl Admin {
    pub fn new(control: ControlPlane, endpoint: Endpoint) -> Self {
        Self {
            control,
            source: None,
            leases: None,
            master_key: None,
            endpoint,
            drain_timeout: Duration::from_secs(40),
        }
    }

    fn master_key(&self) -> Result<&MasterKey> {
        self.master_key
            .as_deref()
            .ok_or_else(|| AdminError::Unavailable("no master key configured".into()))
    }

    async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: Option<&str>,
        details: serde_json::Value,
    ) -> Result<()> {
        info!(actor, action, target, "admin action");
        Ok(self.control.audit(actor, action, target, details).await?)
    }

    pub async fn tenants(&self) -> Result<Vec<Tenant>> {
        Ok(self.control.tenants().await?)
    }

    /// A tenant with its tables: state, watermark, lag, backfill progress, last error.
    pub async fn tenant_detail(&self, slug: &str) -> Result<TenantDetail> {
        let tenant = self.control.tenant(slug).await?;
        let tables = self.status(Some(slug)).await?;
        Ok(TenantDetail { tenant, tables })
    }

    /// Per tenant and table: state, watermark, lag, progress and ETA, last error.
    pub async fn status(&self, tenant: Option<&str>) -> Result<Vec<progress::TaskStatus>> {
        if let Some(slug) = tenant {
            // A clear 404 instead of an empty list for a mistyped slug.
            self.control.tenant(slug).await?;
        }
        progress::status(&self.control, self.source.as_ref(), tenant).await
    }

    pub async fn pause(&self, actor: &str, slug: &str, reason: Option<&str>) -> Result<Tenant> {
        let t = self.control.tenant(slug).await?;
        self.control
            .set_tenant_status(
                t.id,
                TenantStatus::Paused,
                reason.or(Some("paused by an operator")),
            )
            .await?;
        self.audit(
            actor,
            "tenant.pause",
            Some(slug),
            serde_json::json!({"previous_status": t.status, "reason": reason}),
        )
        .await?;
        Ok(self.control.tenant(slug).await?)
    }

    /// Make a tenant active again and its tasks due now. A tenant paused because its key was
    /// rejected resumes too (the next slice shows whether the key works again).
    pub async fn resume(&self, actor: &str, slug: &str) -> Result<Tenant> {
        let t = self.control.tenant(slug).await?;
        self.control
            .set_tenant_status(t.id, TenantStatus::Active, None)
            .await?;
        self.control.make_tenant_due(t.id).await?;
        self.audit(
            actor,
            "tenant.resume",
            Some(slug),
            serde_json::json!({"previous_status": t.status}),
        )
        .await?;
        Ok(self.control.tenant(slug).await?)
    }

    /// Switch one table on or off for one tenant. `table` is `name` (schema public) or
    /// `schema.name`.
    pub async fn set_table_enabled(
        &self,
        actor: &str,
        slug: &str,
        table: &str,
        enabled: bool,
    ) -> Result<bool> {
        let t = self.control.tenant(slug).await?;
        let (schema, name) = onboarding::split_table(table);
        let spec = self.control.table_by_name(&schema, &name).await?;
        let changed = self
            .control
            .set_task_enabled(
                TaskId {
                    tenant_id: t.id,
                    table_id: spec.id,
                },
                enabled,
            )
            .await?;
        self.audit(
            actor,
            if enabled {
                "table.enable"
            } else {
                "table.disable"
            },
            Some(&format!("{slug}/{schema}.{name}")),
            serde_json::json!({"changed": changed}),
        )
        .await?;
        Ok(changed)
    }

    /// Set a table's write method for every tenant (`None`: the deployment's default). Takes
    /// effect at each task's next slice; a slice under way finishes with the method it began
    /// with (its batch is committed either way).
    pub async fn set_write_api(
        &self,
        actor: &str,
        table: &str,
        write_api: Option<tenantsync_core::WriteApi>,
    ) -> Result<TableSpec> {
        let (schema, name) = onboarding::split_table(table);
        let mut spec = self.control.table_by_name(&schema, &name).await?;
        if spec.mode == tenantsync_core::Mode::Cdc
            && write_api == Some(tenantsync_core::WriteApi::InsertAll)
        {
            return Err(AdminError::Invalid(format!(
                "{schema}.{name} is in mode cdc, which writes through the Storage Write API's default stream only"
            )));
        }
        self.control.set_write_api(spec.id, write_api).await?;
        spec.write_api = write_api;
        self.audit(
            actor,
            "table.write_api",
            Some(&format!("{schema}.{name}")),
            serde_json::json!({"write_api": write_api.map(|w| w.as_str())}),
        )
        .await?;
        Ok(spec)
    }

    /// Set a CDC table's `max_staleness` (seconds, > 0). Stored for every table; BigQuery gets
    /// it when the table is created in a tenant's dataset (an existing table keeps its own).
    pub async fn set_max_staleness(
        &self,
        actor: &str,
        table: &str,
        seconds: i32,
    ) -> Result<TableSpec> {
        if seconds <= 0 {
            return Err(AdminError::Invalid(format!(
                "max staleness must be positive, not {seconds} s"
            )));
        }
        let (schema, name) = onboarding::split_table(table);
        let mut spec = self.control.table_by_name(&schema, &name).await?;
        self.control.set_max_staleness(spec.id, seconds).await?;
        spec.max_staleness_s = seconds;
        self.audit(
            actor,
            "table.max_staleness",
            Some(&format!("{schema}.{name}")),
            serde_json::json!({"max_staleness_s": seconds}),
        )
        .await?;
        Ok(spec)
    }

    /// Replace a tenant's key after checking it works (see `onboard::rotate_credentials`).
    pub async fn rotate_credentials(
        &self,
        actor: &str,
        slug: &str,
        json: SecretString,
    ) -> Result<Tenant> {
        let t = tenantsync_worker::onboard::rotate_credentials(
            &self.control,
            self.master_key()?,
            &self.endpoint,
            slug,
            json,
        )
        .await?;
        self.audit(
            actor,
            "tenant.rotate_credentials",
            Some(slug),
            serde_json::json!({"status": t.status}),
        )
        .await?;
        Ok(t)
    }

    /// Remove a tenant. It is paused first and its slices in flight are given time to finish;
    /// then its dataset is dropped (only with [`DataChoice::Drop`]) and its control-plane rows
    /// deleted. When the drop fails the tenant stays, paused, and the error says why.
    pub async fn remove(&self, actor: &str, slug: &str, data: DataChoice) -> Result<()> {
        let t = self.control.tenant(slug).await?;
        self.control
            .set_tenant_status(t.id, TenantStatus::Paused, Some("being removed"))
            .await?;
        self.wait_for_slices(&t).await?;
        if data == DataChoice::Drop {
            let client = self.client(&t).await?;
            client.delete_dataset().await.map_err(|e| {
                AdminError::Upstream(format!(
                    "could not drop dataset {}.{} (tenant {slug} left paused, not removed): {e}",
                    t.bq_project, t.bq_dataset
                ))
            })?;
        }
        self.control.remove_tenant(t.id).await?;
        self.audit(
            actor,
            "tenant.remove",
            Some(slug),
            serde_json::json!({
                "data": data,
                "dataset": format!("{}.{}", t.bq_project, t.bq_dataset),
                "organization_id": t.organization_id,
            }),
        )
        .await?;
        Ok(())
    }

    async fn wait_for_slices(&self, t: &Tenant) -> Result<()> {
        let Some(leases) = &self.leases else {
            return Ok(());
        };
        let tasks: Vec<(i64, i64)> = self
            .control
            .tables()
            .await?
            .iter()
            .map(|s| (t.id, s.id))
            .collect();
        let t0 = std::time::Instant::now();
        loop {
            let held = leases
                .leased(&tasks)
                .await
                .map_err(|e| AdminError::Unavailable(format!("Redis: {e}")))?;
            if !held.iter().any(|h| *h) {
                return Ok(());
            }
            if t0.elapsed() > self.drain_timeout {
                return Err(AdminError::Conflict(format!(
                    "tenant {} is paused but a slice still holds a lease after {:?}; try again",
                    t.slug, self.drain_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn client(&self, t: &Tenant) -> Result<BigQuery> {
        let key = match self.control.credentials(t.id).await? {
            Some(sealed) => Some(
                self.master_key()?
                    .open(&sealed, t.id)
                    .map_err(|e| AdminError::Unavailable(e.to_string()))?,
            ),
            None => None,
        };
        let creds = Credentials::of_tenant(key, t.impersonate.as_deref(), self.endpoint.emulator)
            .ok_or_else(|| {
            AdminError::Invalid(format!(
                "tenant {} has no stored key; cannot reach its dataset",
                t.slug
            ))
        })?;
        BigQuery::new(
            &self.endpoint,
            &t.bq_project,
            &t.bq_dataset,
            &creds,
            Duration::from_secs(60),
        )
        .await
        .map_err(|e| AdminError::Upstream(e.to_string()))
    }

    /// Re-seal every secret of `table` under `key`, counting into `r`.
    async fn reseal_all(
        &self,
        key: &MasterKey,
        table: SealedTable,
        r: &mut KeyRotation,
    ) -> Result<()> {
        for c in self.control.all_sealed(table).await? {
            let mut current = c.sealed;
            loop {
                match key.reseal(&current, c.tenant_id) {
                    Ok(None) => {
                        r.already_current += 1;
                        break;
                    }
                    Ok(Some(new)) => {
                        if self
                            .control
                            .reseal(table, c.tenant_id, &current, &new)
                            .await?
                        {
                            r.resealed += 1;
                            break;
                        }
                        // Replaced meanwhile (rotate-credentials or another rotation): look again.
                        match self.control.sealed_in(table, c.tenant_id).await? {
                            Some(s) => current = s,
                            None => break,
                        }
                    }
                    Err(e) => {
                        warn!(tenant_id = c.tenant_id, ?table, error = %e, "secret not re-sealed");
                        r.failed.push((c.tenant_id, e.to_string()));
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Re-seal every credential and hashing secret under the current master key. Safe while
    /// workers sync: each row is replaced only if it still holds what was read (a concurrent
    /// `rotate-credentials` wins), and workers configured with the old key among
    /// `TENANTSYNC_MASTER_KEYS_OLD` open either version.
    pub async fn rotate_master_key(&self, actor: &str) -> Result<KeyRotation> {
        let key = self.master_key()?;
        let mut r = KeyRotation {
            key_id: key.id().to_string(),
            ..Default::default()
        };
        for table in [SealedTable::Credentials, SealedTable::HashKeys] {
            self.reseal_all(key, table, &mut r).await?;
        }
        self.audit(
            actor,
            "keys.rotate",
            None,
            serde_json::json!({
                "key_id": r.key_id,
                "resealed": r.resealed,
                "already_current": r.already_current,
                "failed": r.failed.len(),
            }),
        )
        .await?;
        Ok(r)
    }
}

//! Onboarding operations: a tenant, its write limits, a table, changelog capture. Each checks
//! its input, changes the control plane (or the source's triggers) and writes one audit entry,
//! whichever front end (CLI, admin API) called it.

use crate::{Admin, AdminError, Result};
use tenantsync_core::{Capture, TableSpec, Tenant};
use tenantsync_store::changelog::{self, Changelog};
use tenantsync_store::control::NewTableSpec;
use tenantsync_store::{SourceReader, StoreError};
use tenantsync_worker::onboard::{self, TenantRequest};

/// Changelog capture to install on a source table.
#[derive(Debug, Clone)]
pub struct ChangelogRequest {
    /// `name` (schema public) or `schema.name`.
    pub table: String,
    /// Empty: the table's primary key.
    pub key_columns: Vec<String>,
    pub tenant_column: String,
    pub changed_only: bool,
}

/// `name` (schema public) or `schema.name`.
pub fn split_table(table: &str) -> (String, String) {
    match table.split_once('.') {
        Some((s, t)) => (s.to_string(), t.to_string()),
        None => ("public".to_string(), table.to_string()),
    }
}

/// A rate limit must be a positive, finite number (None keeps the default).
fn check_limit(flag: &str, v: Option<f64>) -> Result<()> {
    match v {
        Some(v) if !(v > 0.0 && v.is_finite()) => Err(AdminError::Invalid(format!(
            "{flag} must be a positive number"
        ))),
        _ => Ok(()),
    }
}

impl Admin {
    fn source(&self) -> Result<&SourceReader> {
        self.source
            .as_ref()
            .ok_or_else(|| AdminError::Unavailable("no source database configured".into()))
    }

    /// Register a tenant after checking its key reaches its dataset (see `onboard::add_tenant`).
    pub async fn add_tenant(&self, actor: &str, req: TenantRequest) -> Result<Tenant> {
        let t = onboard::add_tenant(
            &self.control,
            self.source()?,
            self.master_key()?,
            &self.endpoint,
            req,
        )
        .await?;
        self.audit(
            actor,
            "tenant.add",
            Some(&t.slug),
            serde_json::json!({
                "organization_id": t.organization_id,
                "dataset": format!("{}.{}", t.bq_project, t.bq_dataset),
                "location": t.bq_location,
                "key": t.has_credentials,
            }),
        )
        .await?;
        Ok(t)
    }

    /// Record where an existing tenant's dataset is, after checking with the tenant's stored
    /// key (or the emulator's token) that BigQuery has it there. A dataset cannot move: a
    /// location other than its own is refused naming both, and nothing changes.
    pub async fn set_location(&self, actor: &str, slug: &str, location: &str) -> Result<Tenant> {
        let location = tenantsync_core::location::parse(location).map_err(AdminError::Invalid)?;
        let t = self.control.tenant(slug).await?;
        self.client(&t)
            .await?
            .with_location(Some(location.clone()))
            .ensure_dataset()
            .await
            .map_err(|e| AdminError::from(tenantsync_worker::WorkerError::BigQuery(e)))?;
        let t = self.control.set_tenant_location(slug, &location).await?;
        self.audit(
            actor,
            "tenant.location",
            Some(&t.slug),
            serde_json::json!({"location": t.bq_location}),
        )
        .await?;
        Ok(t)
    }

    /// Set (or, with None, reset to the default) a tenant's BigQuery write limits.
    pub async fn set_limits(
        &self,
        actor: &str,
        slug: &str,
        requests_per_s: Option<f64>,
        rows_per_s: Option<f64>,
    ) -> Result<Tenant> {
        check_limit("requests per second", requests_per_s)?;
        check_limit("rows per second", rows_per_s)?;
        let t = self
            .control
            .set_tenant_limits(slug, requests_per_s, rows_per_s)
            .await?;
        self.audit(
            actor,
            "tenant.limits",
            Some(&t.slug),
            serde_json::json!({
                "requests_per_s": t.max_requests_per_s,
                "rows_per_s": t.max_rows_per_s,
            }),
        )
        .await?;
        Ok(t)
    }

    /// Register a source table for every tenant (see `onboard::add_table`).
    pub async fn add_table(&self, actor: &str, spec: NewTableSpec) -> Result<TableSpec> {
        let spec = onboard::add_table(&self.control, self.source()?, spec).await?;
        self.audit(
            actor,
            "table.add",
            Some(&format!("{}.{}", spec.source_schema, spec.source_table)),
            serde_json::json!({
                "mode": spec.mode.to_string(),
                "tenant_column": spec.tenant_column,
                "soft_delete_column": spec.soft_delete_column,
                "capture": spec.capture.to_string(),
                "exclude_columns": spec.exclude_columns,
                "hash_columns": spec.hash_columns,
            }),
        )
        .await?;
        Ok(spec)
    }

    /// Change a registered table's column policy: `exclude` columns from BigQuery, `hash`
    /// columns (sent as `<name>_hmac`, a keyed hash), `include` columns as they are again.
    /// Workers drop a newly excluded or hashed column's plain values from every tenant's
    /// table, `<t>_current` and `<t>_final` at the table's next slice, and open dead letters
    /// lose the values now. Rows synced before a policy changed carry the new column (a
    /// column let back in, a hash) NULL until they change or the table is resynced.
    pub async fn update_policies(
        &self,
        actor: &str,
        table: &str,
        exclude: &[String],
        hash: &[String],
        include: &[String],
    ) -> Result<TableSpec> {
        let (schema, name) = split_table(table);
        let before = self.control.table_by_name(&schema, &name).await?;
        let mut spec = before.clone();
        let apply = |list: &mut Vec<String>, add: &[String], others: &[&[String]]| {
            list.retain(|c| !include.contains(c) && !others.iter().any(|o| o.contains(c)));
            for c in add {
                if !list.contains(c) {
                    list.push(c.clone());
                }
            }
        };
        apply(&mut spec.exclude_columns, exclude, &[hash]);
        apply(&mut spec.hash_columns, hash, &[exclude]);
        onboard::check_table_policies(self.source()?, &spec, &before).await?;
        // Values leave open dead letters if they are now excluded or hashed.
        let scrubbed = self
            .control
            .set_column_policies(spec.id, &spec.exclude_columns, &spec.hash_columns)
            .await?;
        self.audit(
            actor,
            "table.column_policy",
            Some(&format!("{schema}.{name}")),
            serde_json::json!({
                "excluded": {"before": before.exclude_columns, "after": spec.exclude_columns},
                "hashed": {"before": before.hash_columns, "after": spec.hash_columns},
                "dead_letters_scrubbed": scrubbed,
            }),
        )
        .await?;
        Ok(spec)
    }

    /// Install changelog capture on a source table. Returns what was installed and how many
    /// existing rows were filed as inserts.
    pub async fn install_changelog(
        &self,
        actor: &str,
        req: ChangelogRequest,
    ) -> Result<(Changelog, u64)> {
        let source = self.source()?;
        let (schema, table) = split_table(&req.table);
        let key_columns = if req.key_columns.is_empty() {
            source.primary_key(&schema, &table).await?
        } else {
            req.key_columns
        };
        // Also says "does not exist" for a missing table, before the key check below.
        let columns = source.columns(&schema, &table).await?;
        if key_columns.is_empty() {
            return Err(AdminError::Invalid(format!(
                "table {schema}.{table} has no primary key; name the key with --key"
            )));
        }
        // The columns must exist: the trigger would otherwise fail every write to the table.
        for c in key_columns
            .iter()
            .chain(std::iter::once(&req.tenant_column))
        {
            if !columns.iter().any(|pc| &pc.name == c) {
                return Err(AdminError::Invalid(format!(
                    "column {c:?} does not exist in {schema}.{table}"
                )));
            }
        }
        let c = Changelog {
            schema,
            table,
            key_columns,
            tenant_column: req.tenant_column,
            changed_only: req.changed_only,
        };
        let seeded = changelog::install(source.pool(), &c).await?;
        self.audit(
            actor,
            "source.install_changelog",
            Some(&format!("{}.{}", c.schema, c.table)),
            serde_json::json!({"key": c.key_columns, "tenant_column": c.tenant_column,
                               "changed_only": c.changed_only, "seeded_rows": seeded}),
        )
        .await?;
        Ok((c, seeded))
    }

    /// Remove changelog capture from a source table. Refused, unless `force`, while a
    /// registered table syncs from it. Returns whether it was installed.
    pub async fn uninstall_changelog(&self, actor: &str, table: &str, force: bool) -> Result<bool> {
        let source = self.source()?;
        let (schema, table) = split_table(table);
        match self.control.table_by_name(&schema, &table).await {
            Ok(spec) if spec.capture == Capture::Changelog && !force => {
                return Err(AdminError::Conflict(format!(
                    "table {schema}.{table} is registered with changelog capture; its sync would stop. Pass --force to uninstall anyway"
                )))
            }
            Ok(_) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let existed = changelog::uninstall(source.pool(), &schema, &table).await?;
        self.audit(
            actor,
            "source.uninstall_changelog",
            Some(&format!("{schema}.{table}")),
            serde_json::json!({"existed": existed}),
        )
        .await?;
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_default_to_public() {
        assert_eq!(split_table("donors"), ("public".into(), "donors".into()));
        assert_eq!(split_table("crm.donors"), ("crm".into(), "donors".into()));
    }

    #[test]
    fn limits_must_be_positive_and_finite() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = check_limit("rows per second", Some(bad)).unwrap_err();
            assert!(e.to_string().contains("rows per second"), "{e}");
        }
        assert!(check_limit("rows per second", Some(0.5)).is_ok());
        assert!(check_limit("rows per second", None).is_ok());
    }
}

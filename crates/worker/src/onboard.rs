//! Onboarding: tenants and tables are checked before anything is saved.

use crate::WorkerError;
use secrecy::SecretString;
use std::time::Duration;
use tenantsync_bigquery::auth::parse_service_account;
use tenantsync_bigquery::{BigQuery, Credentials, Endpoint};
use tenantsync_core::crypto::MasterKey;
use tenantsync_core::ident;
use tenantsync_core::{TableSpec, Tenant};
use tenantsync_store::control::{NewCredentials, NewTableSpec, NewTenant};
use tenantsync_store::{ControlPlane, SlicePlan, SourceReader};

#[derive(Debug)]
pub struct TenantRequest {
    pub slug: String,
    pub organization_id: String,
    pub project: String,
    pub dataset: String,
    /// Service-account key JSON; None only against the emulator.
    pub credentials: Option<SecretString>,
}

fn invalid(e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Config(e.to_string())
}

/// Validate the request and the key (the key must be able to reach the dataset, creating it
/// when missing), then store the tenant with its key sealed under the master key. The tenant's
/// tasks are due at once, so a running worker starts the backfill by itself.
pub async fn add_tenant(
    control: &ControlPlane,
    master_key: &MasterKey,
    endpoint: &Endpoint,
    req: TenantRequest,
) -> Result<Tenant, WorkerError> {
    ident::project_id(&req.project).map_err(invalid)?;
    ident::dataset_id(&req.dataset).map_err(invalid)?;
    if req.organization_id.trim().is_empty() {
        return Err(invalid("organization id must not be empty"));
    }
    let (creds, email) = match &req.credentials {
        Some(json) => {
            let sa = parse_service_account(json)?;
            (Credentials::ServiceAccount(json.clone()), Some(sa.client_email))
        }
        None if endpoint.emulator => (Credentials::Emulator, None),
        None => {
            return Err(invalid(
                "a service-account key (--credentials-file) is required unless BIGQUERY_EMULATOR_HOST is set",
            ))
        }
    };
    let client = BigQuery::new(
        endpoint,
        &req.project,
        &req.dataset,
        &creds,
        Duration::from_secs(30),
    )
    .await?;
    client.ensure_dataset().await?;

    let new = NewTenant {
        slug: req.slug.clone(),
        organization_id: req.organization_id.trim().to_string(),
        bq_project: req.project.clone(),
        bq_dataset: req.dataset.clone(),
    };
    let tenant = match &req.credentials {
        Some(json) => {
            let plain = secrecy::ExposeSecret::expose_secret(json)
                .as_bytes()
                .to_vec();
            let seal = move |id: i64| master_key.seal(&plain, id);
            let creds = NewCredentials {
                seal: &seal,
                client_email: email.as_deref(),
            };
            control.add_tenant(&new, Some(creds)).await?
        }
        None => control.add_tenant(&new, None).await?,
    };
    Ok(tenant)
}

/// Validate a new key for an existing tenant exactly like onboarding does (parse it, fetch a
/// token, reach the dataset), then store it sealed and resume the tenant if its old key had
/// been rejected. Nothing changes when the new key does not work.
pub async fn rotate_credentials(
    control: &ControlPlane,
    master_key: &MasterKey,
    endpoint: &Endpoint,
    slug: &str,
    json: SecretString,
) -> Result<Tenant, WorkerError> {
    let tenant = control.tenant(slug).await?;
    let sa = parse_service_account(&json)?;
    let creds = Credentials::ServiceAccount(json.clone());
    let client = BigQuery::new(
        endpoint,
        &tenant.bq_project,
        &tenant.bq_dataset,
        &creds,
        Duration::from_secs(30),
    )
    .await?;
    client.ensure_dataset().await?;
    let sealed = master_key.seal(
        secrecy::ExposeSecret::expose_secret(&json).as_bytes(),
        tenant.id,
    );
    control
        .rotate_credentials(tenant.id, &sealed, Some(&sa.client_email))
        .await?;
    Ok(control.tenant(slug).await?)
}

/// Register a table after checking that it exists, that the key, cursor and tenant columns
/// exist, and that every column maps to a BigQuery type.
pub async fn add_table(
    control: &ControlPlane,
    source: &SourceReader,
    mut spec: NewTableSpec,
) -> Result<TableSpec, WorkerError> {
    for (what, v) in [
        ("schema", &spec.source_schema),
        ("table", &spec.source_table),
        ("cursor column", &spec.cursor_column),
        ("tenant column", &spec.tenant_column),
    ] {
        ident::sql_ident(what, v).map_err(invalid)?;
    }
    if spec.mode == tenantsync_core::Mode::Merge {
        return Err(invalid(
            "mode merge is not built yet (partial rows merged into <table>_final); use latest or history"
                .to_string(),
        ));
    }
    let columns = source
        .columns(&spec.source_schema, &spec.source_table)
        .await?;
    if spec.key_columns.is_empty() {
        spec.key_columns = source
            .primary_key(&spec.source_schema, &spec.source_table)
            .await?;
        if spec.key_columns.is_empty() {
            return Err(invalid(format!(
                "table {}.{} has no primary key; name the key with --key",
                spec.source_schema, spec.source_table
            )));
        }
    }
    for k in &spec.key_columns {
        ident::sql_ident("key column", k).map_err(invalid)?;
    }
    let probe = TableSpec {
        id: 0,
        source_schema: spec.source_schema.clone(),
        source_table: spec.source_table.clone(),
        key_columns: spec.key_columns.clone(),
        cursor_column: spec.cursor_column.clone(),
        tenant_column: spec.tenant_column.clone(),
        mode: spec.mode,
        enabled: true,
        sync_interval_ms: spec.sync_interval_ms,
        slice_rows: spec.slice_rows,
        soft_delete_column: None,
    };
    SlicePlan::build(&probe, &columns)?;
    Ok(control.add_table(&spec).await?)
}

/// Map a column that marks rows deleted (`deleted_at`, `is_deleted`) to deletes, after
/// checking it exists and has a usable type; `None` turns the mapping off.
pub async fn set_soft_delete(
    control: &ControlPlane,
    source: &SourceReader,
    mut spec: TableSpec,
    column: Option<&str>,
) -> Result<TableSpec, WorkerError> {
    if let Some(c) = column {
        ident::sql_ident("soft-delete column", c).map_err(invalid)?;
    }
    spec.soft_delete_column = column.map(str::to_string);
    let columns = source
        .columns(&spec.source_schema, &spec.source_table)
        .await?;
    SlicePlan::build(&spec, &columns)?;
    control.set_soft_delete_column(spec.id, column).await?;
    Ok(spec)
}

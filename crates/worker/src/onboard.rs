//! Onboarding: tenants and tables are checked before anything is saved.

use crate::WorkerError;
use secrecy::SecretString;
use std::time::Duration;
use tenantsync_bigquery::auth::parse_service_account;
use tenantsync_bigquery::{BigQuery, Credentials, Endpoint};
use tenantsync_core::crypto::MasterKey;
use tenantsync_core::ident;
use tenantsync_core::mapping::PgColumn;
use tenantsync_core::names::{self, TableNames};
use tenantsync_core::org_id::{self, OrgIdCheck, OrgIdError};
use tenantsync_core::{Capture, Mode, TableSpec, Tenant};
use tenantsync_store::control::{NewCredentials, NewTableSpec, NewTenant};
use tenantsync_store::{changelog, ControlPlane, SlicePlan, SourceReader, StoreError};
use tracing::warn;

#[derive(Debug)]
pub struct TenantRequest {
    pub slug: String,
    pub organization_id: String,
    pub project: String,
    pub dataset: String,
    /// Where the dataset is created, and must be if it exists (`EU`, `europe-west1`, …; see
    /// [`tenantsync_core::location`]). None: wherever BigQuery puts it (its default, US), not
    /// recorded; the CLI always passes one (`--location`, else `TENANTSYNC_BQ_LOCATION`).
    pub location: Option<String>,
    /// Service-account key JSON; None only against the emulator, or with `impersonate`.
    pub credentials: Option<SecretString>,
    /// No key: the deployment's account impersonates this service account.
    pub impersonate: Option<String>,
}

fn invalid(e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Config(e.to_string())
}

/// Validate the request and the key (the key must be able to reach the dataset, creating it
/// when missing), then store the tenant with its key sealed under the master key. The tenant's
/// tasks are due at once, so a running worker starts the backfill by itself.
///
/// Everything that can be checked locally is checked before BigQuery is called: slug, project
/// and dataset names, clashes with existing tenants, the organization id against every
/// registered table's tenant column, the key and its `token_uri`. A refused request leaves no
/// dataset behind.
pub async fn add_tenant(
    control: &ControlPlane,
    source: &SourceReader,
    master_key: &MasterKey,
    endpoint: &Endpoint,
    req: TenantRequest,
) -> Result<Tenant, WorkerError> {
    ident::tenant_slug(&req.slug).map_err(invalid)?;
    ident::project_id(&req.project).map_err(invalid)?;
    ident::dataset_id(&req.dataset).map_err(invalid)?;
    let organization_id = req.organization_id.trim();
    if organization_id.is_empty() {
        return Err(invalid("organization id must not be empty"));
    }
    let location = req
        .location
        .as_deref()
        .map(tenantsync_core::location::parse)
        .transpose()
        .map_err(invalid)?;
    let (creds, email) = match (&req.credentials, &req.impersonate) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "give a service-account key or --impersonate, not both",
            ))
        }
        (Some(json), None) => {
            let sa = parse_service_account(json)?;
            endpoint.token_uri_policy.check(&sa.token_uri)?;
            (Credentials::ServiceAccount(json.clone()), Some(sa.client_email))
        }
        // Checked like a key: the token (through the impersonation call) and the dataset,
        // before anything is saved.
        (None, Some(target)) => {
            tenantsync_bigquery::impersonation::check_email(target).map_err(invalid)?;
            if endpoint.impersonator.is_none() {
                return Err(invalid(
                    "--impersonate needs the deployment's own service-account key \
                     (TENANTSYNC_IMPERSONATOR_KEY_FILE)",
                ));
            }
            (Credentials::Impersonated(target.clone()), None)
        }
        (None, None) if endpoint.emulator => (Credentials::Emulator, None),
        (None, None) => {
            return Err(invalid(
                "a service-account key (--credentials-file) or --impersonate is required unless BIGQUERY_EMULATOR_HOST is set",
            ))
        }
    };
    let new = NewTenant {
        slug: req.slug.clone(),
        organization_id: organization_id.to_string(),
        bq_project: req.project.clone(),
        bq_dataset: req.dataset.clone(),
        bq_location: location.clone(),
        impersonate: req.impersonate.clone(),
    };
    // A second tenant of one organization would receive the same rows in its own dataset.
    if let Some(clash) = control.tenant_clash(&new).await? {
        return Err(WorkerError::Store(StoreError::Conflict(clash)));
    }
    for spec in control.tables().await? {
        let columns = match source
            .columns(&spec.source_schema, &spec.source_table)
            .await
        {
            Ok(c) => c,
            // A registered table dropped from the source fails its own slices; it says nothing
            // about this organization id, and must not block onboarding.
            Err(StoreError::NotFound(_)) => {
                warn!(table = %format!("{}.{}", spec.source_schema, spec.source_table),
                      "registered table is missing from the source; organization id not checked against it");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if let Err(why) = org_id_fits(source, &spec, &columns, organization_id).await? {
            return Err(invalid(format!(
                "organization id {organization_id:?} does not fit {}: {why}",
                describe_tenant_column(&spec, &columns)
            )));
        }
    }

    open_dataset(endpoint, (&req.project, &req.dataset), &creds, location).await?;

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

/// Whether `organization_id` is the canonical text of a value of `spec`'s tenant column (see
/// `tenantsync_core::org_id` for why the canonical text): `Ok(Err(why))` when it is not.
async fn org_id_fits(
    source: &SourceReader,
    spec: &TableSpec,
    columns: &[PgColumn],
    organization_id: &str,
) -> Result<Result<(), String>, WorkerError> {
    let Some(column) = columns.iter().find(|c| c.name == spec.tenant_column) else {
        // A missing tenant column is reported by the slice plan, with the other columns.
        return Ok(Ok(()));
    };
    match org_id::check(column, organization_id) {
        Ok(OrgIdCheck::Fits) => Ok(Ok(())),
        Err(e) => Ok(Err(e.to_string())),
        Ok(OrgIdCheck::AskDatabase) => match source.canonical_text(organization_id, column).await {
            Ok(t) if t == organization_id => Ok(Ok(())),
            Ok(t) => Ok(Err(OrgIdError::NotCanonical { canonical: t }.to_string())),
            Err(StoreError::Invalid(m)) => Ok(Err(m)),
            Err(e) => Err(e.into()),
        },
    }
}

fn describe_tenant_column(spec: &TableSpec, columns: &[PgColumn]) -> String {
    let ty = columns
        .iter()
        .find(|c| c.name == spec.tenant_column)
        .map_or("?", |c| c.formatted.as_str());
    format!(
        "tenant column {} of {}.{} ({ty})",
        spec.tenant_column, spec.source_schema, spec.source_table
    )
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
    let dataset = (tenant.bq_project.as_str(), tenant.bq_dataset.as_str());
    open_dataset(endpoint, dataset, &creds, tenant.bq_location.clone()).await?;
    let sealed = master_key.seal(
        secrecy::ExposeSecret::expose_secret(&json).as_bytes(),
        tenant.id,
    );
    control
        .rotate_credentials(tenant.id, &sealed, Some(&sa.client_email))
        .await?;
    Ok(control.tenant(slug).await?)
}

/// Fetch a token with `creds` and open the dataset (`project`, `dataset`), creating it in
/// `location` when missing; one found in another location is refused (see
/// `BigQuery::ensure_dataset`).
async fn open_dataset(
    endpoint: &Endpoint,
    (project, dataset): (&str, &str),
    creds: &Credentials,
    location: Option<String>,
) -> Result<(), WorkerError> {
    BigQuery::new(endpoint, project, dataset, creds, Duration::from_secs(30))
        .await?
        .with_location(location)
        .ensure_dataset()
        .await?;
    Ok(())
}

/// Check a table's column policies (`tables add`, `tables update`): each newly excluded or
/// hashed column exists in the source, and the table still reads with them (its key, cursor,
/// tenant and soft-delete columns can be neither; a column not both; a hash's column name
/// `<name>_hmac` not the source's). Names already in a policy (`before_*`) may have left the
/// source.
pub fn check_policies(
    spec: &TableSpec,
    columns: &[tenantsync_core::mapping::PgColumn],
    before_excluded: &[String],
    before_hashed: &[String],
) -> Result<(), WorkerError> {
    let new = |list: &'static str, now: &[String], before: &[String]| {
        now.iter()
            .filter(|c| !before.contains(c))
            .map(move |c| (list, c.clone()))
            .collect::<Vec<_>>()
    };
    let added = new("--exclude-column", &spec.exclude_columns, before_excluded)
        .into_iter()
        .chain(new("--hash-column", &spec.hash_columns, before_hashed));
    for (flag, c) in added {
        if !columns.iter().any(|col| col.name == c) {
            return Err(invalid(format!(
                "{flag} {c:?}: {}.{} has no such column",
                spec.source_schema, spec.source_table
            )));
        }
    }
    SlicePlan::build(spec, columns)?;
    Ok(())
}

/// [`check_policies`] against the source's current columns.
pub async fn check_table_policies(
    source: &SourceReader,
    spec: &TableSpec,
    before: &TableSpec,
) -> Result<(), WorkerError> {
    let columns = source
        .columns(&spec.source_schema, &spec.source_table)
        .await?;
    check_policies(
        spec,
        &columns,
        &before.exclude_columns,
        &before.hash_columns,
    )
}

/// Register a table after checking that it exists, that the key, cursor and tenant columns
/// exist, that every column maps to a BigQuery type, and that its capture and mode fit: a
/// changelog table needs `source install-changelog` first (with the same key and tenant
/// column), and merge mode needs a changelog that stores changed columns only.
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
    if let Some(c) = &spec.soft_delete_column {
        ident::sql_ident("soft-delete column", c).map_err(invalid)?;
    }
    if spec.mode == Mode::Merge && spec.capture != Capture::Changelog {
        return Err(invalid(
            "mode merge needs changelog capture (--capture changelog): partial rows come from the change table",
        ));
    }
    if spec.mode == Mode::Merge && spec.soft_delete_column.is_some() {
        return Err(invalid(
            "mode merge does not take --soft-delete: a partial update that leaves the column out cannot be told from one that clears it",
        ));
    }
    // Against every registered table: they all share each tenant's dataset.
    let registered = control.tables().await?;
    let registered: Vec<TableNames<'_>> = registered.iter().map(TableNames::of).collect();
    names::check_new_table(
        &TableNames {
            schema: &spec.source_schema,
            table: &spec.source_table,
            mode: spec.mode,
            capture: spec.capture,
        },
        &registered,
    )
    .map_err(invalid)?;
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
    if spec.capture == Capture::Changelog {
        check_changelog(source, &spec).await?;
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
        soft_delete_column: spec.soft_delete_column.clone(),
        capture: spec.capture,
        write_api: None,
        max_staleness_s: tenantsync_core::model::DEFAULT_MAX_STALENESS_S,
        exclude_columns: spec.exclude_columns.clone(),
        hash_columns: spec.hash_columns.clone(),
    };
    check_policies(&probe, &columns, &[], &[])?;
    // Every tenant onboarded so far must be readable through this table's tenant column: an
    // id its type refuses fails every slice, a non-canonical one never syncs.
    for t in control.tenants().await? {
        if let Err(why) = org_id_fits(source, &probe, &columns, &t.organization_id).await? {
            return Err(invalid(format!(
                "{} does not fit tenant {}'s organization id {:?}: {why}",
                describe_tenant_column(&probe, &columns),
                t.slug,
                t.organization_id
            )));
        }
    }
    Ok(control.add_table(&spec).await?)
}

async fn check_changelog(source: &SourceReader, spec: &NewTableSpec) -> Result<(), WorkerError> {
    let name = format!("{}.{}", spec.source_schema, spec.source_table);
    let Some(c) =
        changelog::installed(source.pool(), &spec.source_schema, &spec.source_table).await?
    else {
        return Err(invalid(format!(
            "table {name} has no changelog; run `tenantsync source install-changelog {name}` first"
        )));
    };
    if c.key_columns != spec.key_columns || c.tenant_column != spec.tenant_column {
        return Err(invalid(format!(
            "the changelog of {name} was installed for key ({}) and tenant column {}, not key ({}) and tenant column {}; install it again with matching options",
            c.key_columns.join(", "),
            c.tenant_column,
            spec.key_columns.join(", "),
            spec.tenant_column
        )));
    }
    if spec.mode == Mode::Merge && !c.changed_only {
        return Err(invalid(format!(
            "mode merge needs a changelog that stores changed columns only; run `tenantsync source install-changelog {name} --changed-only`"
        )));
    }
    if spec.mode != Mode::Merge && c.changed_only {
        return Err(invalid(format!(
            "the changelog of {name} stores changed columns only, which only mode merge can use; install it again without --changed-only"
        )));
    }
    Ok(())
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

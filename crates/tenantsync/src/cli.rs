use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Keeps each tenant's slice of a shared Postgres database in sync with the tenant's own
/// BigQuery dataset.
#[derive(Debug, Parser)]
#[command(name = "tenantsync", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Log format; `auto` is human-readable on a terminal and JSON otherwise.
    #[arg(
        long,
        global = true,
        env = "TENANTSYNC_LOG_FORMAT",
        default_value = "auto"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Auto,
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply control-plane migrations.
    Migrate,
    /// Onboard and list tenants.
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Register and list source tables.
    #[command(subcommand)]
    Tables(TablesCmd),
    /// Changelog capture in the source database: change table and triggers.
    #[command(subcommand)]
    Source(SourceCmd),
    /// Coordinator and worker in one process until interrupted (all-in-one mode).
    Run(RunArgs),
    /// Schedule: campaign for leadership and queue due tasks while leading.
    Coordinator,
    /// Run tasks from the queues, as one member of the worker pool.
    Worker,
    /// Per tenant and table: state, watermark, lag, backfill progress and ETA, last error;
    /// workers, leader, queues.
    Status(StatusArgs),
    /// Master keys: re-seal every credential under the current key (rotation), or count
    /// credentials per key.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Bearer tokens of the admin API.
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// The audit log of admin actions, newest first.
    Audit(AuditArgs),
    /// Serve the admin HTTP API on TENANTSYNC_ADMIN_ADDR (OpenAPI document at /openapi.json).
    #[command(alias = "api")]
    AdminApi,
    /// Rows BigQuery refused: list them, send them again, or discard them.
    #[command(subcommand)]
    Dlq(DlqCmd),
    /// Compare Postgres with BigQuery (`<table>_latest`) per tenant and table, by count and by
    /// key ranges of 1,000 keys; print the ranges that drifted. Exit code 1 when any did.
    Verify(VerifyArgs),
    /// Send a tenant's rows of one table again (all, or a key range), as new versions.
    Resync(ResyncArgs),
    /// The demo: demo schema, three organizations with their own datasets, traffic, sync.
    Demo(DemoArgs),
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Only this tenant (slug).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only this source table.
    #[arg(long)]
    pub table: Option<String>,
    /// Resend the drifted ranges and delete keys BigQuery has but Postgres does not, then
    /// verify again.
    #[arg(long)]
    pub repair: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ResyncArgs {
    /// Tenant (slug).
    #[arg(long)]
    pub tenant: String,
    /// Source table.
    #[arg(long)]
    pub table: String,
    /// First key to send (inclusive); composite keys as comma-separated parts.
    #[arg(long)]
    pub from: Option<String>,
    /// Last key to send (inclusive).
    #[arg(long)]
    pub to: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DlqCmd {
    /// Open dead letters (or all, with --all).
    List {
        #[arg(long)]
        tenant: Option<String>,
        /// Include retried and discarded ones.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Send open dead letters again (all of a tenant's with --tenant, or the given ids).
    Retry {
        ids: Vec<i64>,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Give up on open dead letters (they stay listed as discarded).
    Discard {
        ids: Vec<i64>,
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Re-seal every stored credential under TENANTSYNC_MASTER_KEY. Run it after every process
    /// has TENANTSYNC_MASTER_KEY set to the new key and the old one in
    /// TENANTSYNC_MASTER_KEYS_OLD; syncing goes on meanwhile.
    Rotate,
    /// Stored credentials per master key id (which keys are still needed).
    Status(ListArgs),
}

#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// Create a token; it is printed once and only its hash is stored.
    Create {
        /// Name the token acts under in the audit log (e.g. `ops-alice`, `terraform`).
        name: String,
    },
    /// List tokens (names and dates; never the tokens).
    List(ListArgs),
    /// Revoke a token: it gets 401 from then on.
    Revoke { name: String },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Entries to show.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this tenant.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON (one array) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum TenantCmd {
    /// Add a tenant. Its key is checked (dataset access) before it is saved, encrypted.
    Add(TenantAdd),
    /// List tenants.
    List(ListArgs),
    /// Set a tenant's insertAll budget across all workers (requests/s, rows/s).
    Limits(TenantLimits),
    /// Replace a tenant's key after checking it works; resumes a tenant whose key was rejected.
    RotateCredentials(RotateCredentials),
    /// Record where a tenant's dataset is (tenants onboarded before locations were kept),
    /// after BigQuery confirms it is there; a dataset cannot be moved.
    Update {
        slug: String,
        #[arg(long)]
        location: String,
    },
    /// A tenant and each of its tables: state, watermark, lag, rows, progress, last error.
    Show {
        slug: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop scheduling a tenant's tasks (slices in flight finish).
    Pause {
        slug: String,
        /// Why, for `tenant show` and the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Schedule a paused tenant again, at once.
    Resume { slug: String },
    /// Remove a tenant from tenantsync. Asks whether to keep or drop its BigQuery dataset;
    /// without a terminal, --keep-data or --drop-data is required.
    Remove(TenantRemove),
}

#[derive(Debug, Args)]
pub struct TenantRemove {
    pub slug: String,
    /// Leave the tenant's BigQuery dataset as it is.
    #[arg(long, conflicts_with = "drop_data")]
    pub keep_data: bool,
    /// Delete the tenant's BigQuery dataset and everything in it.
    #[arg(long)]
    pub drop_data: bool,
}

#[derive(Debug, Args)]
pub struct RotateCredentials {
    pub slug: String,
    /// The new service-account key JSON; its token_uri is held to the same rule as for
    /// `tenant add` (Google's token endpoint, or a host in TENANTSYNC_TOKEN_URI_ALLOW_HOSTS).
    #[arg(long)]
    pub credentials_file: PathBuf,
}

#[derive(Debug, Args)]
pub struct TenantLimits {
    pub slug: String,
    /// insertAll requests per second; omit for the deployment default.
    #[arg(long)]
    pub requests_per_second: Option<f64>,
    /// Rows per second; omit for the deployment default.
    #[arg(long)]
    pub rows_per_second: Option<f64>,
}

#[derive(Debug, Args)]
pub struct TenantAdd {
    /// Short unique name (lowercase letters, digits, `-`, `_`).
    pub slug: String,
    /// Value of the tenant column (e.g. `organization_id`) in the source tables, as Postgres
    /// prints it (`42`, not `042`); one tenant per organization.
    #[arg(long)]
    pub organization_id: String,
    /// BigQuery project of the tenant.
    #[arg(long)]
    pub project: String,
    /// BigQuery dataset of the tenant (created if missing).
    #[arg(long)]
    pub dataset: String,
    /// Where the dataset is created (`US`, `EU`, or a region such as `europe-west1`); an
    /// existing dataset elsewhere is refused. Default: TENANTSYNC_BQ_LOCATION, else US.
    #[arg(long)]
    pub location: Option<String>,
    /// Service-account key JSON. Required unless BIGQUERY_EMULATOR_HOST is set.
    ///
    /// Its token_uri must be Google's token endpoint (https://oauth2.googleapis.com/token)
    /// unless TENANTSYNC_TOKEN_URI_ALLOW_HOSTS (comma-separated `host` or `host:port`) allows
    /// other hosts.
    #[arg(long)]
    pub credentials_file: Option<PathBuf>,
    /// No key: the deployment's own service account (TENANTSYNC_IMPERSONATOR_KEY_FILE)
    /// impersonates this one, which the tenant lets it do by granting it
    /// roles/iam.serviceAccountTokenCreator. Checked like a key before anything is saved.
    #[arg(long, conflicts_with = "credentials_file")]
    pub impersonate: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TablesCmd {
    /// Register a source table for every tenant.
    Add(Box<TablesAdd>),
    /// List registered tables.
    List(ListArgs),
    /// Sync a table for one tenant again (it is due at once).
    Enable(TableSwitch),
    /// Stop syncing a table for one tenant (other tenants are not affected).
    Disable(TableSwitch),
    /// Set how a table's rows are written, for every tenant: `insert-all`, `storage` (the
    /// Storage Write API), or `default` (TENANTSYNC_WRITE_API, else insert-all).
    WriteApi(TablesWriteApi),
    /// Change a registered table's column policy: exclude columns (dropped from every
    /// tenant's tables at the next slice; open dead letters lose their values at once) or let
    /// excluded ones back in.
    Update(TablesUpdate),
}

#[derive(Debug, Args)]
pub struct TablesUpdate {
    /// Table name, or `schema.name` outside public.
    pub table: String,
    /// Keep this column out of BigQuery from now on (repeatable).
    #[arg(long = "exclude-column")]
    pub exclude_column: Vec<String>,
    /// Send this column only as `<column>_hmac`, its HMAC-SHA-256 under the tenant's own
    /// secret (repeatable).
    #[arg(long = "hash-column")]
    pub hash_column: Vec<String>,
    /// Sync this excluded or hashed column as it is again (repeatable).
    #[arg(long = "include-column")]
    pub include_column: Vec<String>,
}

#[derive(Debug, Args)]
pub struct TablesWriteApi {
    /// Table name, or `schema.name` outside public.
    pub table: String,
    #[arg(value_parser = ["insert-all", "storage", "default"])]
    pub method: String,
}

#[derive(Debug, Subcommand)]
pub enum SourceCmd {
    /// Create the change table and the trigger that fills it, for `tables add --capture
    /// changelog` (idempotent). A new change table is seeded with every existing row.
    InstallChangelog(InstallChangelog),
    /// Remove the trigger, its function and the change table (idempotent).
    UninstallChangelog(UninstallChangelog),
}

#[derive(Debug, Args)]
pub struct InstallChangelog {
    /// Table name, or `schema.name` outside public.
    pub table: String,
    /// Key column(s); repeat for a composite key. Default: the primary key.
    #[arg(long = "key")]
    pub key: Vec<String>,
    /// Column holding the tenant id.
    #[arg(long, default_value = "organization_id")]
    pub tenant_column: String,
    /// Updates store only the columns that changed (for `--mode merge`).
    #[arg(long)]
    pub changed_only: bool,
}

#[derive(Debug, Args)]
pub struct UninstallChangelog {
    /// Table name, or `schema.name` outside public.
    pub table: String,
    /// Uninstall even though a registered table reads the changelog (its sync stops with an
    /// error until the changelog is installed again).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct TableSwitch {
    /// Table name, or `schema.name` outside public.
    pub table: String,
    /// The tenant (slug).
    #[arg(long)]
    pub tenant: String,
}

#[derive(Debug, Args)]
pub struct TablesAdd {
    /// Source table name.
    pub table: String,
    /// Source schema.
    #[arg(long, default_value = "public")]
    pub schema: String,
    /// Key column(s); repeat for a composite key. Default: the primary key.
    #[arg(long = "key")]
    pub key: Vec<String>,
    /// Cursor column (timestamp or timestamptz, set on every write). Unused with
    /// `--capture changelog`.
    #[arg(long, default_value = "updated_at")]
    pub cursor: String,
    /// How changes are found: keyset reads on the cursor column, or the change table of
    /// `source install-changelog` (sees hard deletes; needed for `--mode merge`).
    #[arg(long, default_value = "cursor", value_parser = ["cursor", "changelog"])]
    pub capture: String,
    /// Column holding the tenant id.
    #[arg(long, default_value = "organization_id")]
    pub tenant_column: String,
    /// How versions are kept in BigQuery. `cdc`: BigQuery's change data capture keeps one
    /// row per key (primary key, UPSERT/DELETE rows on the default stream); implies
    /// `--write-api storage`.
    #[arg(long, default_value = "latest", value_parser = ["latest", "history", "merge", "cdc"])]
    pub mode: String,
    /// CDC mode: the table's max_staleness in seconds (how stale BigQuery may serve the
    /// applied rows; shorter costs more background merging).
    #[arg(long, default_value_t = tenantsync_core::model::DEFAULT_MAX_STALENESS_S, value_parser = clap::value_parser!(i32).range(1..))]
    pub max_staleness_s: i32,
    /// Minimum time between two slices of a caught-up task, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: i32,
    /// Rows per slice.
    #[arg(long, default_value_t = 20000)]
    pub slice_rows: i32,
    /// Column that marks a row deleted (boolean, or a timestamp/date that is set): such rows
    /// are sent as deletes and leave `<table>_latest`.
    #[arg(long)]
    pub soft_delete: Option<String>,
    /// A column never sent to BigQuery (repeat for several): left out of every read, table,
    /// view and dead letter. Not the key, cursor, tenant or soft-delete column.
    #[arg(long = "exclude-column")]
    pub exclude_column: Vec<String>,
    /// A column sent only as `<column>_hmac` (repeat for several): the hex HMAC-SHA-256 of its
    /// text under the tenant's own secret, so values join across the tenant's tables but not
    /// across tenants. Not the key, cursor, tenant or soft-delete column.
    #[arg(long = "hash-column")]
    pub hash_column: Vec<String>,
    /// How rows are written: tabledata.insertAll, or the Storage Write API (exactly-once
    /// appends to a pending stream per slice). Default: TENANTSYNC_WRITE_API, else insert-all.
    #[arg(long, value_parser = ["insert-all", "storage"])]
    pub write_api: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Stop when everything committed before the start is confirmed in BigQuery.
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long, env = "DEMO_SECONDS")]
    pub seconds: Option<u64>,
    /// Row changes per second written by the generator.
    #[arg(long, env = "DEMO_RATE", default_value_t = 300.0)]
    pub rate: f64,
    /// Messages per organization written in bulk before syncing starts (a timed backfill).
    #[arg(long, env = "DEMO_BACKFILL", default_value_t = 10_000)]
    pub backfill: i64,
    /// Number of demo organizations (each gets its own dataset).
    #[arg(long, default_value_t = 3)]
    pub orgs: i64,
}

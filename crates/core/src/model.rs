//! Tenants and table specs as the control plane stores them.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Lifecycle of a tenant. Only `Active` tenants are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TenantStatus {
    Active,
    Paused,
    CredentialsInvalid,
}

impl TenantStatus {
    pub const ALL: [TenantStatus; 3] = [Self::Active, Self::Paused, Self::CredentialsInvalid];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Paused => "paused",
            Self::CredentialsInvalid => "credentials_invalid",
        }
    }
}

impl fmt::Display for TenantStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TenantStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown tenant status {s:?}"))
    }
}

/// How versions are kept in the tenant's dataset (README, "What lands in a tenant's dataset").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Row versions, a `<table>_latest` view, compaction of superseded versions.
    #[default]
    Latest,
    /// Every version kept forever.
    History,
    /// Partial rows merged into `<table>_final`.
    Merge,
    /// BigQuery's change data capture: a table with a primary key, written through the
    /// Storage Write API's default stream with `_CHANGE_TYPE` and `_CHANGE_SEQUENCE_NUMBER`
    /// (see [`crate::cdc`]); BigQuery keeps one row per key. No view, no compaction.
    Cdc,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Self::Latest, Self::History, Self::Merge, Self::Cdc];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Latest => "latest",
            Self::History => "history",
            Self::Merge => "merge",
            Self::Cdc => "cdc",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown mode {s:?} (expected latest, history, merge or cdc)"))
    }
}

/// How changes are found in the source (docs/architecture.md, "A slice's life", step 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Capture {
    /// Keyset reads on (cursor column, key) below the in-flight-transaction horizon. Needs
    /// nothing installed; cannot see hard deletes.
    #[default]
    Cursor,
    /// A change table filled by triggers (`tenantsync source install-changelog`), read below
    /// the oldest running transaction id: exact, hard deletes included.
    Changelog,
}

impl Capture {
    pub const ALL: [Capture; 2] = [Self::Cursor, Self::Changelog];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cursor => "cursor",
            Self::Changelog => "changelog",
        }
    }
}

impl fmt::Display for Capture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Capture {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown capture {s:?} (expected cursor or changelog)"))
    }
}

/// A tenant: one source organization synced into one BigQuery dataset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tenant {
    pub id: i64,
    pub slug: String,
    /// Value of the tenant column in the source tables, as text (cast to the column's type in SQL).
    pub organization_id: String,
    pub bq_project: String,
    pub bq_dataset: String,
    /// Where the dataset is (`EU`, `europe-west1`, …): created there, and an existing dataset
    /// elsewhere is refused. None for tenants onboarded before locations were recorded (their
    /// datasets are used wherever they are).
    pub bq_location: Option<String>,
    pub status: TenantStatus,
    pub has_credentials: bool,
    /// A keyless tenant: the service account the deployment impersonates for it
    /// (`tenant add --impersonate`).
    pub impersonate: Option<String>,
    /// insertAll budget of this tenant across all workers (None: the deployment default).
    pub max_requests_per_s: Option<f64>,
    pub max_rows_per_s: Option<f64>,
}

/// How rows reach a tenant's tables (docs/architecture.md, "Write methods").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WriteApi {
    /// `tabledata.insertAll`: at-least-once rows, made visible by the batch listing.
    #[default]
    InsertAll,
    /// The Storage Write API: a pending stream per batch, appended at offsets (exactly once)
    /// and committed at once.
    Storage,
}

impl WriteApi {
    pub const ALL: [WriteApi; 2] = [Self::InsertAll, Self::Storage];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InsertAll => "insert-all",
            Self::Storage => "storage",
        }
    }
}

impl fmt::Display for WriteApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WriteApi {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|w| w.as_str() == s)
            .ok_or_else(|| format!("unknown write method {s:?} (expected insert-all or storage)"))
    }
}

/// A source table and how to sync it; the same spec applies to every tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableSpec {
    pub id: i64,
    pub source_schema: String,
    pub source_table: String,
    pub key_columns: Vec<String>,
    pub cursor_column: String,
    pub tenant_column: String,
    pub mode: Mode,
    pub enabled: bool,
    pub sync_interval_ms: i32,
    pub slice_rows: i32,
    /// A column that marks rows deleted (boolean true, or a non-NULL timestamp): such rows
    /// are sent as deletes. Cursor mode sees no hard delete.
    pub soft_delete_column: Option<String>,
    pub capture: Capture,
    /// The table's write method; `None`: the deployment's default (`TENANTSYNC_WRITE_API`).
    pub write_api: Option<WriteApi>,
    /// CDC mode: the table's `max_staleness` in seconds (how old the background-applied
    /// state may be before a query applies pending changes itself).
    pub max_staleness_s: i32,
    /// Source columns never sent: left out of every read, table, view and dead letter.
    pub exclude_columns: Vec<String>,
    /// Source columns sent only as a keyed hash: HMAC-SHA-256 under the tenant's own secret,
    /// in a STRING column named `<column>_hmac` (see `tenantsync_core::hashing`).
    pub hash_columns: Vec<String>,
}

/// The default `max_staleness` of a CDC table (migration `20261202180000_cdc.sql`).
pub const DEFAULT_MAX_STALENESS_S: i32 = 900;

impl TableSpec {
    /// Name of the table in the tenant's dataset (see [`crate::names::bq_table`]).
    pub fn bq_table(&self) -> String {
        crate::names::bq_table(&self.source_schema, &self.source_table)
    }
}

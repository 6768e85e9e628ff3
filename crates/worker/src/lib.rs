#![doc = include_str!("../README.md")]

mod batcher;
mod batches;
mod compact;
mod error;
pub mod metrics;
pub mod onboard;
mod retry;
mod run;
mod slice;
pub mod verify;

pub use error::WorkerError;
pub use run::{run, RunMode, RunSummary};
pub use slice::{CrashPoint, Hooks, NoHooks, SliceOutcome, SliceReport};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tenantsync_bigquery::Endpoint;
use tenantsync_core::chunk::Limits;
use tenantsync_core::crypto::MasterKey;
use tenantsync_lease::Leases;
use tenantsync_store::{ControlPlane, SlicePlan, SourceReader};
use tokio::sync::Mutex;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Unique per process; shows up as the lease holder and in the run log.
    pub worker_id: String,
    pub endpoint: Endpoint,
    /// Allowance for application clocks that stamp rows themselves (see the horizon query).
    pub cursor_skew: Duration,
    /// Slices starting within this long of a horizon query use its result instead of asking
    /// again. An older horizon is safe (a slice reads less); the query is one of the few a
    /// slice needs, and at hundreds of slices a second it was a noticeable share of them.
    pub horizon_reuse: Duration,
    pub lease_ttl: Duration,
    pub request_timeout: Duration,
    /// Attempts per insertAll chunk before the slice stops at the last acknowledged row.
    pub max_attempts: u32,
    /// Tasks run at once by this process. Slices of caught-up tasks are mostly waiting (on
    /// Postgres, BigQuery, Redis); more of them at once also share more statements (see
    /// `batcher.rs`): 32 instead of 8 took the freshness benchmark from 357 to 607 slices/s.
    pub concurrency: usize,
    /// Upper bound on one slice's wall time, so a big tenant yields to others.
    pub slice_max_duration: Duration,
    pub chunk_limits: Limits,
    /// Cap on retry backoff within a slice.
    pub max_backoff: Duration,
    /// A caught-up task is re-checked after this long even if the coordinator saw no change
    /// (a safety net; changes normally make it due at once).
    pub idle_recheck: Duration,
    /// Number of Redis queue shards (must match the coordinators').
    pub shards: u32,
    /// insertAll budget of the whole deployment, shared by every worker.
    pub global_budget: tenantsync_lease::ratelimit::Budget,
    /// Budget of a tenant that has none of its own.
    pub tenant_budget: tenantsync_lease::ratelimit::Budget,
    /// Compaction (latest mode) keeps superseded versions synced within this window (at
    /// least insertAll's streaming buffer, which DML cannot touch).
    pub compact_window: Duration,
    /// A slice's rows must become visible within this long after the slice's length (its
    /// listing or commit, retries included) or the slice is sent again; merges into
    /// `<table>_current` therefore read back only this far.
    pub settle_window: Duration,
    /// How far two workers' clocks may disagree: merges read this much further back.
    pub clock_skew: Duration,
    /// A task's table is compacted at most this often, after a caught-up slice.
    pub compact_every: Duration,
    /// Merge mode: `<table>_final` is merged at most this often per task, after a caught-up
    /// slice (each merge is a few queries; it reads the versions since its last cutoff).
    pub merge_every: Duration,
    /// A slice is read and sent this many rows at a time (and the next page read meanwhile):
    /// memory is about concurrency × 2 pages × row size (32 tenants backfilling at once at the
    /// defaults: 85 MB peak RSS in the throughput benchmark).
    pub page_rows: i32,
    /// Write method of tables that name none (`TENANTSYNC_WRITE_API`).
    pub write_api: tenantsync_core::WriteApi,
}

impl WorkerConfig {
    pub fn new(worker_id: impl Into<String>, endpoint: Endpoint) -> Self {
        Self {
            worker_id: worker_id.into(),
            endpoint,
            cursor_skew: Duration::from_millis(1000),
            horizon_reuse: Duration::from_millis(200),
            lease_ttl: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            max_attempts: 6,
            concurrency: 32,
            slice_max_duration: Duration::from_secs(20),
            chunk_limits: Limits::default(),
            max_backoff: Duration::from_secs(30),
            idle_recheck: Duration::from_secs(300),
            shards: 8,
            global_budget: Default::default(),
            tenant_budget: Default::default(),
            compact_window: Duration::from_secs(3 * 3600),
            settle_window: Duration::from_secs(300),
            clock_skew: Duration::from_secs(60),
            compact_every: Duration::from_secs(3600),
            merge_every: Duration::from_secs(300),
            page_rows: 1000,
            write_api: Default::default(),
        }
    }
}

/// What the worker talks to.
#[derive(Clone)]
pub struct Deps {
    pub control: ControlPlane,
    pub source: SourceReader,
    pub leases: Leases,
    pub master_key: Arc<MasterKey>,
}

/// Per-process caches: a BigQuery client per tenant, a slice plan per table, and the last
/// horizon.
#[derive(Default)]
struct Caches {
    clients: Mutex<HashMap<i64, CachedClient>>,
    /// Per tenant, its Storage Write sink, built on the tenant's cached client.
    storage: Mutex<HashMap<i64, Arc<tenantsync_bigquery::StorageSink>>>,
    /// The process's one channel to the Storage Write endpoint (every tenant's calls carry
    /// their own token).
    channel: std::sync::OnceLock<tonic::transport::Channel>,
    plans: Mutex<HashMap<i64, CachedPlan>>,
    /// Per tenant, its hashing secret (`--hash-column`), opened once.
    hash_keys: Mutex<HashMap<i64, Arc<tenantsync_core::hashing::HashKey>>>,
    /// When the last horizon query was sent, and its result.
    horizon: Mutex<Option<(std::time::Instant, chrono::DateTime<chrono::Utc>)>>,
    /// Claim and commit statements shared by slices that start or end together.
    statements: std::sync::OnceLock<batcher::Statements>,
}

/// A tenant's client with the nonce of the sealed key it was built from (the key's version).
type CachedClient = (Vec<u8>, Arc<tenantsync_bigquery::BigQuery>);

/// A table's plan, valid while its spec is unchanged and slice reads find the catalog
/// fingerprint it was built with ([`SlicePlan::catalog`]).
struct CachedPlan {
    spec: tenantsync_core::TableSpec,
    plan: Arc<SlicePlan>,
}

pub struct Worker {
    cfg: WorkerConfig,
    deps: Deps,
    caches: Caches,
    hooks: Arc<dyn Hooks>,
}

impl Worker {
    pub fn new(cfg: WorkerConfig, deps: Deps) -> Self {
        Self::with_hooks(cfg, deps, Arc::new(NoHooks))
    }

    /// Hooks let tests inject crashes at exact points of a slice.
    pub fn with_hooks(cfg: WorkerConfig, deps: Deps, hooks: Arc<dyn Hooks>) -> Self {
        Self {
            cfg,
            deps,
            caches: Caches::default(),
            hooks,
        }
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.cfg
    }

    pub fn deps(&self) -> &Deps {
        &self.deps
    }

    /// Started on first use: its tasks need the runtime the slices run on.
    fn statements(&self) -> &batcher::Statements {
        self.caches
            .statements
            .get_or_init(|| batcher::Statements::spawn(&self.deps.control, &self.deps.source))
    }
}

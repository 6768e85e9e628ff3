//! Configuration from environment variables. Every missing or malformed variable is reported
//! by name; secrets are wrapped so `Debug` cannot print them.

use anyhow::{anyhow, Context, Result};
use secrecy::SecretString;
use std::str::FromStr;
use std::time::Duration;
use tenantsync_bigquery::auth::ALLOW_HOSTS_VAR;
use tenantsync_bigquery::{Endpoint, TokenUriPolicy};
use tenantsync_core::crypto::MasterKey;

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn required(name: &str, what: &str) -> Result<String> {
    var(name).ok_or_else(|| anyhow!("{name} is not set ({what})"))
}

fn parsed<T: FromStr>(name: &str, default: T) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    match var(name) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|e| anyhow!("{name}={v:?} is not valid: {e}")),
    }
}

/// An optional positive rate (unset: unlimited).
fn rate(name: &str) -> Result<Option<f64>> {
    match var(name) {
        None => Ok(None),
        Some(v) => match v.trim().parse::<f64>() {
            Ok(r) if r > 0.0 && r.is_finite() => Ok(Some(r)),
            _ => Err(anyhow!("{name}={v:?} is not a positive number")),
        },
    }
}

fn millis(name: &str, default_ms: u64) -> Result<Duration> {
    parsed(name, default_ms).map(Duration::from_millis)
}

/// Connections per database pool of this process (each opened only when needed).
pub fn pool_size(name: &str, default: u32) -> Result<u32> {
    let n = parsed(name, default)?;
    if n == 0 {
        return Err(anyhow!("{name} must be at least 1"));
    }
    Ok(n)
}

/// Control-plane database URL (`DATABASE_URL`).
pub fn database_url() -> Result<String> {
    required("DATABASE_URL", "Postgres URL of the control plane")
}

/// Source database URL; the control plane's when unset (same server, separate schema).
pub fn source_database_url() -> Result<String> {
    var("SOURCE_DATABASE_URL").map_or_else(database_url, Ok)
}

pub fn redis_url() -> Result<String> {
    required("REDIS_URL", "e.g. redis://127.0.0.1:6379")
}

pub fn redis_prefix() -> String {
    var("TENANTSYNC_REDIS_PREFIX").unwrap_or_else(|| "tenantsync".into())
}

/// The BigQuery API (Google's, or the emulator's with `BIGQUERY_EMULATOR_HOST`) and which token
/// endpoints keys may name (`TENANTSYNC_TOKEN_URI_ALLOW_HOSTS`; Google's only when unset).
pub fn endpoint() -> Result<Endpoint> {
    let policy = match var(ALLOW_HOSTS_VAR) {
        None => TokenUriPolicy::google_only(),
        Some(list) => TokenUriPolicy::allowing(&list)
            .map_err(|e| anyhow!("{ALLOW_HOSTS_VAR} is not valid: {e}"))?,
    };
    let impersonator = impersonator(&policy)?;
    Ok(
        Endpoint::from_env_value(var("BIGQUERY_EMULATOR_HOST").as_deref())
            .with_storage_emulator(var("BIGQUERY_STORAGE_EMULATOR_HOST").as_deref())
            .with_token_uri_policy(policy)
            .with_impersonator(impersonator),
    )
}

/// The deployment's own service account, which impersonates keyless tenants' accounts: its
/// key file (`TENANTSYNC_IMPERSONATOR_KEY_FILE`) and the IAM Credentials API
/// (`TENANTSYNC_IAM_CREDENTIALS_URL`, Google's by default). None without a key file.
fn impersonator(
    policy: &TokenUriPolicy,
) -> Result<Option<std::sync::Arc<tenantsync_bigquery::Impersonator>>> {
    let Some(path) = var("TENANTSYNC_IMPERSONATOR_KEY_FILE") else {
        return Ok(None);
    };
    let key: SecretString = std::fs::read_to_string(&path)
        .map_err(|e| anyhow!("cannot read TENANTSYNC_IMPERSONATOR_KEY_FILE {path}: {e}"))?
        .into();
    let url = var("TENANTSYNC_IAM_CREDENTIALS_URL").unwrap_or_else(|| {
        tenantsync_bigquery::impersonation::GOOGLE_IAM_CREDENTIALS_URL.to_string()
    });
    let by = tenantsync_bigquery::Impersonator::new(key, &url, policy)
        .map_err(|e| anyhow!("TENANTSYNC_IMPERSONATOR_KEY_FILE {path}: {e}"))?;
    Ok(Some(std::sync::Arc::new(by)))
}

/// Where new tenants' datasets are created unless `tenant add --location` says otherwise.
pub fn default_location() -> Result<String> {
    let v = var("TENANTSYNC_BQ_LOCATION").unwrap_or_else(|| "US".into());
    tenantsync_core::location::parse(&v).map_err(|e| anyhow!("TENANTSYNC_BQ_LOCATION: {e}"))
}

pub fn master_key() -> Result<MasterKey> {
    let raw: SecretString = required(
        "TENANTSYNC_MASTER_KEY",
        "base64 of 32 random bytes; encrypts tenant credentials",
    )?
    .into();
    let current = MasterKey::from_base64(&raw).context("TENANTSYNC_MASTER_KEY is not usable")?;
    Ok(current.with_previous(previous_master_keys()?))
}

/// The master key when `TENANTSYNC_MASTER_KEY` is set (it must then be usable), else None.
pub fn master_key_if_set() -> Result<Option<MasterKey>> {
    match var("TENANTSYNC_MASTER_KEY") {
        None => Ok(None),
        Some(_) => master_key().map(Some),
    }
}

/// Previous master keys (`TENANTSYNC_MASTER_KEYS_OLD`, comma-separated base64): during a
/// rotation they still open credentials not yet re-sealed under `TENANTSYNC_MASTER_KEY`.
fn previous_master_keys() -> Result<Vec<MasterKey>> {
    let Some(list) = var("TENANTSYNC_MASTER_KEYS_OLD") else {
        return Ok(Vec::new());
    };
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .enumerate()
        .map(|(i, b64)| {
            MasterKey::from_base64(&SecretString::from(b64.to_string())).with_context(|| {
                format!(
                    "TENANTSYNC_MASTER_KEYS_OLD: entry {} (of the comma-separated list) is not usable",
                    i + 1
                )
            })
        })
        .collect()
}

/// Worker settings, each overridable by a `TENANTSYNC_…` variable.
pub fn worker() -> Result<tenantsync_worker::WorkerConfig> {
    let id = var("TENANTSYNC_WORKER_ID").unwrap_or_else(|| {
        let host = var("HOSTNAME").unwrap_or_else(|| "worker".into());
        format!("{host}-{}", std::process::id())
    });
    let mut c = tenantsync_worker::WorkerConfig::new(id, endpoint()?);
    c.concurrency = parsed("TENANTSYNC_CONCURRENCY", c.concurrency)?;
    c.cursor_skew = millis(
        "TENANTSYNC_CURSOR_SKEW_MS",
        c.cursor_skew.as_millis() as u64,
    )?;
    c.horizon_reuse = millis(
        "TENANTSYNC_HORIZON_REUSE_MS",
        c.horizon_reuse.as_millis() as u64,
    )?;
    c.lease_ttl = millis("TENANTSYNC_LEASE_TTL_MS", c.lease_ttl.as_millis() as u64)?;
    c.request_timeout = millis(
        "TENANTSYNC_REQUEST_TIMEOUT_MS",
        c.request_timeout.as_millis() as u64,
    )?;
    c.max_attempts = parsed("TENANTSYNC_MAX_ATTEMPTS", c.max_attempts)?;
    c.slice_max_duration = millis(
        "TENANTSYNC_SLICE_MAX_MS",
        c.slice_max_duration.as_millis() as u64,
    )?;
    c.global_budget = tenantsync_lease::ratelimit::Budget {
        requests_per_s: rate("TENANTSYNC_GLOBAL_REQUESTS_PER_S")?,
        rows_per_s: rate("TENANTSYNC_GLOBAL_ROWS_PER_S")?,
    };
    c.tenant_budget = tenantsync_lease::ratelimit::Budget {
        requests_per_s: rate("TENANTSYNC_TENANT_REQUESTS_PER_S")?,
        rows_per_s: rate("TENANTSYNC_TENANT_ROWS_PER_S")?,
    };
    c.idle_recheck = millis(
        "TENANTSYNC_IDLE_RECHECK_MS",
        c.idle_recheck.as_millis() as u64,
    )?;
    c.shards = shards()?;
    c.compact_window = Duration::from_secs(parsed(
        "TENANTSYNC_COMPACT_WINDOW_S",
        c.compact_window.as_secs(),
    )?);
    c.settle_window =
        Duration::from_secs(parsed("TENANTSYNC_SETTLE_S", c.settle_window.as_secs())?);
    c.clock_skew = Duration::from_secs(parsed("TENANTSYNC_CLOCK_SKEW_S", c.clock_skew.as_secs())?);
    c.page_rows = parsed("TENANTSYNC_PAGE_ROWS", c.page_rows)?.max(1);
    c.write_api = match var("TENANTSYNC_WRITE_API") {
        None => c.write_api,
        Some(w) => w
            .parse()
            .map_err(|e| anyhow!("TENANTSYNC_WRITE_API is not valid: {e}"))?,
    };
    c.merge_every =
        Duration::from_secs(parsed("TENANTSYNC_MERGE_EVERY_S", c.merge_every.as_secs())?);
    c.compact_every = Duration::from_secs(parsed(
        "TENANTSYNC_COMPACT_EVERY_S",
        c.compact_every.as_secs(),
    )?);
    c.chunk_limits.max_rows =
        parsed("TENANTSYNC_CHUNK_ROWS", c.chunk_limits.max_rows)?.clamp(1, 500);
    if c.lease_ttl < Duration::from_millis(300) {
        return Err(anyhow!("TENANTSYNC_LEASE_TTL_MS must be at least 300"));
    }
    Ok(c)
}

/// Coordinator settings.
pub fn coordinator() -> Result<tenantsync_coordinator::CoordinatorConfig> {
    let id = var("TENANTSYNC_COORDINATOR_ID").unwrap_or_else(|| {
        let host = var("HOSTNAME").unwrap_or_else(|| "coordinator".into());
        format!("{host}-{}", std::process::id())
    });
    let mut c = tenantsync_coordinator::CoordinatorConfig::new(id);
    c.tick = millis("TENANTSYNC_TICK_MS", c.tick.as_millis() as u64)?;
    c.leader_ttl = millis("TENANTSYNC_LEADER_TTL_MS", c.leader_ttl.as_millis() as u64)?;
    c.shards = shards()?;
    c.cursor_skew = millis(
        "TENANTSYNC_CURSOR_SKEW_MS",
        c.cursor_skew.as_millis() as u64,
    )?;
    let keep = parsed(
        "TENANTSYNC_RUN_LOG_KEEP_S",
        c.run_log_keep.map_or(0, |d| d.as_secs()),
    )?;
    // 0 keeps the whole run log.
    c.run_log_keep = (keep > 0).then(|| Duration::from_secs(keep));
    Ok(c)
}

/// Number of queue shards; coordinators and workers must agree.
pub fn shards() -> Result<u32> {
    let n = parsed("TENANTSYNC_SHARDS", 8u32)?;
    if n == 0 {
        return Err(anyhow!("TENANTSYNC_SHARDS must be at least 1"));
    }
    Ok(n)
}

/// Where `/metrics`, `/healthz` and `/readyz` are served. Loopback by default; the container
/// image sets 0.0.0.0:9464.
pub fn metrics_addr() -> Result<std::net::SocketAddr> {
    parsed(
        "TENANTSYNC_METRICS_ADDR",
        std::net::SocketAddr::from(([127, 0, 0, 1], 9464)),
    )
}

/// How long shutdown may take before the process exits anyway.
pub fn shutdown_grace() -> Result<Duration> {
    millis("TENANTSYNC_SHUTDOWN_GRACE_MS", 25_000)
}

/// Where `tenantsync admin-api` listens. Loopback by default: put it behind TLS termination
/// before exposing it.
pub fn admin_addr() -> Result<std::net::SocketAddr> {
    parsed(
        "TENANTSYNC_ADMIN_ADDR",
        std::net::SocketAddr::from(([127, 0, 0, 1], 9465)),
    )
}

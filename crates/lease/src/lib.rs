#![doc = include_str!("../README.md")]

pub mod pool;
pub mod ratelimit;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use std::sync::LazyLock;
use std::time::Duration;
use thiserror::Error;

static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/renew.lua")));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/release.lua")));

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LeaseError {
    #[error("redis unavailable: {0}")]
    Unavailable(#[from] redis::RedisError),
    #[error("no redis connection to pop tasks with: {0}")]
    PopPool(#[from] deadpool_redis::PoolError),
}

impl LeaseError {
    pub fn is_retriable(&self) -> bool {
        true
    }
}

/// Redis access for leases, namespaced by a key prefix (one per deployment, or per test).
#[derive(Clone)]
pub struct Leases {
    conn: ConnectionManager,
    /// Dedicated connections for blocking pops ([`Leases::pop`]); everything else shares `conn`.
    pops: deadpool_redis::Pool,
    prefix: String,
}

/// A held lease. Dropping it does not release it: release explicitly, or let the TTL expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: String,
    pub holder: String,
    pub ttl: Duration,
}

/// How the shared connection reconnects after Redis went away. The redis crate's default
/// multiplies each wait by 100 from a 1 s start: after a 2-3 s restart the second attempt came
/// ~100 s later, and no slice could take a lease meanwhile (issue 13). Here every attempt waits
/// about a second (backon's minimum, with jitter), so a blip costs seconds; after
/// `RECONNECT_ATTEMPTS` failures the caller sees the error and the next command starts over.
/// The timeouts turn a half-open socket (no RST from a vanished peer) into an error that
/// triggers the reconnect instead of a command that never returns.
pub fn connection_config() -> ConnectionManagerConfig {
    const RECONNECT_ATTEMPTS: usize = 4;
    ConnectionManagerConfig::new()
        .set_factor(1)
        .set_max_delay(1_000)
        .set_number_of_retries(RECONNECT_ATTEMPTS)
        .set_connection_timeout(Duration::from_secs(2))
        .set_response_timeout(Duration::from_secs(5))
}

/// The pool of connections blocking pops run on. One worker pops one task at a time (a pop
/// returns as soon as a task is pushed, and the next one starts right after), so two
/// connections are enough: the one in use and a spare. Connections are made on first use.
/// A connection that failed is dropped rather than returned, and one that comes back is
/// pinged before reuse (deadpool-redis' recycle), so a Redis restart costs one failed pop; the
/// timeouts bound each step while Redis does not answer, as `connection_config` does for the
/// shared connection.
fn pop_pool(url: &str) -> Result<deadpool_redis::Pool, LeaseError> {
    const POP_CONNECTIONS: usize = 2;
    let mut pool = deadpool_redis::PoolConfig::new(POP_CONNECTIONS);
    pool.timeouts.wait = Some(Duration::from_secs(5));
    pool.timeouts.create = Some(Duration::from_secs(2));
    pool.timeouts.recycle = Some(Duration::from_secs(2));
    let mut cfg = deadpool_redis::Config::from_url(url);
    cfg.pool = Some(pool);
    cfg.create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .map_err(|e| {
            LeaseError::Unavailable(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "cannot make the pop pool",
                e.to_string(),
            )))
        })
}

impl Leases {
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, LeaseError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new_with_config(client, connection_config()).await?;
        Ok(Self {
            conn,
            pops: pop_pool(url)?,
            prefix: prefix.to_string(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub(crate) fn task_key(&self, tenant_id: i64, table_id: i64) -> String {
        format!("{}:lease:{tenant_id}:{table_id}", self.prefix)
    }

    /// Try to take the lease of a (tenant, table) task. None when someone else holds it.
    pub async fn acquire(
        &self,
        tenant_id: i64,
        table_id: i64,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, LeaseError> {
        self.take(self.task_key(tenant_id, table_id), holder, ttl)
            .await
    }

    /// `SET key holder NX PX ttl`: the lease if nobody holds `key`.
    pub(crate) async fn take(
        &self,
        key: String,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, LeaseError> {
        let ok: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(holder)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(ok.map(|_| Lease {
            key,
            holder: holder.to_string(),
            ttl,
        }))
    }

    /// Extend a lease. False when it was lost (expired and maybe taken by another holder).
    pub async fn renew(&self, lease: &Lease) -> Result<bool, LeaseError> {
        let n: i64 = RENEW
            .key(&lease.key)
            .arg(&lease.holder)
            .arg(lease.ttl.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(n == 1)
    }

    /// Give a lease back. False when it was no longer ours.
    pub async fn release(&self, lease: &Lease) -> Result<bool, LeaseError> {
        let n: i64 = RELEASE
            .key(&lease.key)
            .arg(&lease.holder)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(n == 1)
    }

    /// Who holds a task's lease right now, if anyone.
    pub async fn holder(
        &self,
        tenant_id: i64,
        table_id: i64,
    ) -> Result<Option<String>, LeaseError> {
        Ok(self
            .conn
            .clone()
            .get(self.task_key(tenant_id, table_id))
            .await?)
    }
}

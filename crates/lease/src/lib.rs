#![doc = include_str!("../README.md")]

pub mod pool;
pub mod ratelimit;

use redis::aio::ConnectionManager;
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
    prefix: String,
}

/// A held lease. Dropping it does not release it: release explicitly, or let the TTL expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: String,
    pub holder: String,
    pub ttl: Duration,
}

impl Leases {
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, LeaseError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(Self {
            conn,
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

//! Sharded task queues, worker membership and the coordinator's leader lease.

use crate::{Lease, LeaseError, Leases};
use redis::Script;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static ENQUEUE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/enqueue.lua")));
static DEQUEUE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/dequeue.lua")));

/// A worker counts as live while its last heartbeat is younger than this.
pub const LIVE_AFTER: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Task ids on the queues are `"<tenant_id>:<table_id>"`.
pub fn task_key(tenant_id: i64, table_id: i64) -> String {
    format!("{tenant_id}:{table_id}")
}

pub fn parse_task_key(s: &str) -> Option<(i64, i64)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

impl Leases {
    fn queued_key(&self) -> String {
        format!("{}:queued", self.prefix)
    }

    fn shard_key(&self, shard: u32) -> String {
        format!("{}:queue:{shard}", self.prefix)
    }

    fn workers_key(&self) -> String {
        format!("{}:workers", self.prefix)
    }

    fn leader_key(&self) -> String {
        format!("{}:leader", self.prefix)
    }

    /// Shard of a task: by tenant, so one tenant's tables share a shard and a noisy tenant
    /// fills one queue, not all of them.
    pub fn shard_of(tenant_id: i64, shards: u32) -> u32 {
        (tenant_id.unsigned_abs() % u64::from(shards.max(1))) as u32
    }

    /// Queue tasks that are not queued yet. Returns how many were added.
    pub async fn enqueue(&self, tasks: &[(i64, i64)], shards: u32) -> Result<usize, LeaseError> {
        if tasks.is_empty() {
            return Ok(0);
        }
        let shards = shards.max(1);
        let mut inv = ENQUEUE.prepare_invoke();
        inv.key(self.queued_key());
        for s in 0..shards {
            inv.key(self.shard_key(s));
        }
        for &(tenant, table) in tasks {
            inv.arg(task_key(tenant, table))
                .arg(Self::shard_of(tenant, shards));
        }
        let added: usize = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(added)
    }

    /// Pop one task, trying shards starting at `start`.
    pub async fn dequeue(&self, shards: u32, start: u32) -> Result<Option<(i64, i64)>, LeaseError> {
        let mut inv = DEQUEUE.prepare_invoke();
        inv.key(self.queued_key());
        for i in 0..shards {
            inv.key(self.shard_key((start + i) % shards));
        }
        let v: Option<String> = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(v.as_deref().and_then(parse_task_key))
    }

    /// Queue length per shard.
    pub async fn queue_depths(&self, shards: u32) -> Result<Vec<u64>, LeaseError> {
        let mut pipe = redis::pipe();
        for s in 0..shards {
            pipe.cmd("LLEN").arg(self.shard_key(s));
        }
        Ok(pipe.query_async(&mut self.conn.clone()).await?)
    }

    /// Which of these tasks hold a lease right now (one round trip).
    pub async fn leased(&self, tasks: &[(i64, i64)]) -> Result<Vec<bool>, LeaseError> {
        if tasks.is_empty() {
            return Ok(vec![]);
        }
        let keys: Vec<String> = tasks.iter().map(|&(a, b)| self.task_key(a, b)).collect();
        let vals: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(vals.iter().map(Option::is_some).collect())
    }

    /// Record that `worker` is alive, and forget workers silent for long.
    pub async fn heartbeat(&self, worker: &str) -> Result<(), LeaseError> {
        let now = now_ms();
        redis::pipe()
            .cmd("ZADD")
            .arg(self.workers_key())
            .arg(now)
            .arg(worker)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(self.workers_key())
            .arg("-inf")
            .arg(now.saturating_sub(10 * LIVE_AFTER.as_millis() as u64))
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Remove a worker from membership (clean shutdown).
    pub async fn leave(&self, worker: &str) -> Result<(), LeaseError> {
        redis::cmd("ZREM")
            .arg(self.workers_key())
            .arg(worker)
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Workers with a heartbeat within [`LIVE_AFTER`].
    pub async fn live_workers(&self) -> Result<Vec<String>, LeaseError> {
        Ok(redis::cmd("ZRANGEBYSCORE")
            .arg(self.workers_key())
            .arg(now_ms().saturating_sub(LIVE_AFTER.as_millis() as u64))
            .arg("+inf")
            .query_async(&mut self.conn.clone())
            .await?)
    }

    /// Try to become (or stay) the leading coordinator.
    pub async fn acquire_leader(
        &self,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, LeaseError> {
        self.take(self.leader_key(), holder, ttl).await
    }

    pub async fn leader(&self) -> Result<Option<String>, LeaseError> {
        Ok(redis::cmd("GET")
            .arg(self.leader_key())
            .query_async(&mut self.conn.clone())
            .await?)
    }
}

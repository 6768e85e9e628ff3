//! Sharded task queues, worker membership and the coordinator's leader lease.

use crate::{Lease, LeaseError, Leases};
use redis::Script;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tracing::warn;

static ENQUEUE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/enqueue.lua")));
static DEQUEUE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/dequeue.lua")));
static SWEEP: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/sweep.lua")));

/// How long one blocking pop waits for a task before it returns None. The wait costs Redis
/// nothing (a blocked client is woken by the push itself), so this only bounds how long a pop
/// holds its connection: a shutdown whose `CLIENT UNBLOCK` is refused (an ACL without
/// `@admin`) waits this long at most.
pub const POP_BLOCK: Duration = Duration::from_secs(1);

/// How long past its block time a pop waits for Redis' answer before it gives the connection
/// up. Without it a half-open socket (Redis gone without a RST) would hold the pop forever;
/// the multiplexed connection has `connection_config`'s response timeout for the same reason.
const POP_GRACE: Duration = Duration::from_secs(5);

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

    /// Wait up to `block` for a task on any shard and pop it, the oldest of the first
    /// non-empty shard in the order from `start` (the caller rotates `start`, as with
    /// [`Self::dequeue`], so that every shard gets served). None when nothing came within
    /// `block`, or when `cancel` fired first: a task popped at that moment goes back to the
    /// end of the shard it left, still marked queued.
    ///
    /// The pop blocks on a dedicated connection from the pop pool (a blocked command would
    /// stall every other command on the shared multiplexed connection), so a queued task
    /// reaches an idle worker when it is pushed, not at its next poll.
    pub async fn pop(
        &self,
        shards: u32,
        start: u32,
        block: Duration,
        cancel: &CancellationToken,
    ) -> Result<Option<(i64, i64)>, LeaseError> {
        let shards = shards.max(1);
        if cancel.is_cancelled() {
            return Ok(None);
        }
        // A task already queued is taken as before: one script pops and unmarks it atomically,
        // on the shared connection. Only an empty queue costs a blocking pop.
        if let Some(task) = self.dequeue(shards, start % shards).await? {
            return Ok(Some(task));
        }
        let Some((shard, id, unblocked)) = self.blocking_pop(shards, start, block, cancel).await?
        else {
            return Ok(None);
        };
        self.settle_popped(&shard, &id, unblocked).await
    }

    /// `BLMPOP` over every shard, starting at `start`, on a pooled connection. Returns the
    /// shard and task id it took, and whether the pop was being cancelled when it did.
    async fn blocking_pop(
        &self,
        shards: u32,
        start: u32,
        block: Duration,
        cancel: &CancellationToken,
    ) -> Result<Option<(String, String, bool)>, LeaseError> {
        let mut conn = self.pops.get().await?;
        // Its id lets a cancelled pop be unblocked from the shared connection.
        let id: i64 = match redis::cmd("CLIENT").arg("ID").query_async(&mut conn).await {
            Ok(id) => id,
            Err(e) => {
                // Not back to the pool: a connection that failed is likely dead.
                drop(deadpool_redis::Connection::take(conn));
                return Err(e.into());
            }
        };
        let mut blmpop = redis::cmd("BLMPOP");
        blmpop.arg(block.as_secs_f64()).arg(shards);
        for i in 0..shards {
            blmpop.arg(self.shard_key((start % shards + i) % shards));
        }
        blmpop.arg("RIGHT").arg("COUNT").arg(1);
        let mut unblocked = false;
        let answer = {
            let pop = blmpop.query_async::<Option<(String, Vec<String>)>>(&mut conn);
            tokio::pin!(pop);
            let late = tokio::time::sleep(block + POP_GRACE);
            tokio::pin!(late);
            loop {
                tokio::select! {
                    r = &mut pop => break Some(r),
                    _ = cancel.cancelled(), if !unblocked => {
                        unblocked = true;
                        // The pop then answers nil at once, or the task it got just before.
                        // Refused or failed, the pop still ends within `block`.
                        let r = redis::cmd("CLIENT").arg("UNBLOCK").arg(id)
                            .query_async::<i64>(&mut self.conn.clone()).await;
                        if let Err(e) = r {
                            warn!(error = %e, "cannot unblock a cancelled pop; it ends within its block time");
                        }
                    }
                    _ = &mut late => break None,
                }
            }
        };
        let popped = match answer {
            Some(Ok(popped)) => popped,
            Some(Err(e)) => {
                drop(deadpool_redis::Connection::take(conn));
                return Err(e.into());
            }
            None => {
                drop(deadpool_redis::Connection::take(conn));
                return Err(redis::RedisError::from((
                    redis::ErrorKind::IoError,
                    "no answer to a blocking pop",
                ))
                .into());
            }
        };
        drop(conn);
        Ok(popped
            .and_then(|(k, v)| Some((k, v.into_iter().next()?)))
            .map(|(shard, id)| (shard, id, unblocked)))
    }

    /// After a blocking pop: a task taken while cancelled goes back to its shard; otherwise its
    /// `queued` mark is cleared and the task returned.
    async fn settle_popped(
        &self,
        shard: &str,
        id: &str,
        unblocked: bool,
    ) -> Result<Option<(i64, i64)>, LeaseError> {
        let mut shared = self.conn.clone();
        if unblocked {
            // Popped while being cancelled: back to the end it left, so it is next in line;
            // its `queued` entry was never cleared.
            let r = redis::cmd("RPUSH")
                .arg(shard)
                .arg(id)
                .query_async::<()>(&mut shared)
                .await;
            if let Err(e) = r {
                warn!(task = %id, error = %e, "cannot put back a task popped at shutdown; the coordinator queues it again");
            }
            return Ok(None);
        }
        // Not atomic with the pop (a blocking command cannot run in a script). If this fails,
        // or the worker dies first, the entry outlives the task's place on the list and
        // `enqueue` would skip the task: `sweep_queued` clears such entries.
        let r = redis::cmd("SREM")
            .arg(self.queued_key())
            .arg(id)
            .query_async::<()>(&mut shared)
            .await;
        if let Err(e) = r {
            warn!(task = %id, error = %e, "cannot clear a popped task's queued mark; the sweep clears it");
        }
        Ok(parse_task_key(id))
    }

    /// Forget `queued` marks of tasks that are on no shard list (a pop whose second step
    /// never ran, see [`Self::pop`]), so that `enqueue` takes them again. Returns how many.
    pub async fn sweep_queued(&self, shards: u32) -> Result<usize, LeaseError> {
        let mut inv = SWEEP.prepare_invoke();
        inv.key(self.queued_key());
        for s in 0..shards.max(1) {
            inv.key(self.shard_key(s));
        }
        let forgot: Vec<String> = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(forgot.len())
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

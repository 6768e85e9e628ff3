//! The Lua scripts (renew, release, enqueue, gcra) against the real Redis: `REDIS_URL`, or the
//! development server on 127.0.0.1:6379. Each test works under a key prefix of its own and
//! deletes its keys at the end. Without a reachable Redis the tests fail: they are the only
//! check that the scripts do what the Rust side assumes.

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use std::time::Duration;
use tenantsync_lease::ratelimit::Budget;
use tenantsync_lease::{Lease, Leases};

/// A `Leases` under a prefix no other test or process uses.
struct Fixture {
    leases: Leases,
    conn: ConnectionManager,
    prefix: String,
}

impl Fixture {
    async fn new(test: &str) -> Self {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let prefix = format!("tstest:scripts:{test}:{}:{nanos}", std::process::id());
        let leases = Leases::connect(&url, &prefix)
            .await
            .unwrap_or_else(|e| panic!("Redis at {url} is needed for these tests: {e}"));
        Self {
            conn: leases.connection(),
            leases,
            prefix,
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    async fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .conn
            .clone()
            .keys(format!("{}:*", self.prefix))
            .await
            .unwrap();
        keys.sort();
        keys
    }

    /// Delete every key of the test (called at the end of each test).
    async fn cleanup(self) {
        let keys = self.keys().await;
        if !keys.is_empty() {
            let _: () = self.conn.clone().del(keys).await.unwrap();
        }
    }
}

#[tokio::test]
async fn renew_extends_only_the_holders_lease() {
    let f = Fixture::new("renew").await;
    let ttl = Duration::from_secs(60);
    let lease = f.leases.acquire(1, 2, "a", ttl).await.unwrap().unwrap();
    assert_eq!(lease.key, f.key("lease:1:2"));
    assert!(f.leases.acquire(1, 2, "b", ttl).await.unwrap().is_none());
    let mut conn = f.conn.clone();
    // Shorten the lease by hand; a renewal puts the full TTL back.
    let _: () = conn.pexpire(&lease.key, 5_000).await.unwrap();
    assert!(f.leases.renew(&lease).await.unwrap());
    let pttl: i64 = conn.pttl(&lease.key).await.unwrap();
    assert!(pttl > 5_000 && pttl <= 60_000, "pttl {pttl}");

    // Another holder's renewal changes nothing.
    let other = Lease {
        holder: "b".into(),
        ttl: Duration::from_secs(600),
        ..lease.clone()
    };
    assert!(!f.leases.renew(&other).await.unwrap());
    let pttl: i64 = conn.pttl(&lease.key).await.unwrap();
    assert!(pttl <= 60_000, "pttl {pttl}");
    assert_eq!(f.leases.holder(1, 2).await.unwrap().as_deref(), Some("a"));

    // A lease that expired is not brought back by a late renewal.
    let _: () = conn.del(&lease.key).await.unwrap();
    assert!(!f.leases.renew(&lease).await.unwrap());
    assert_eq!(f.leases.holder(1, 2).await.unwrap(), None);
    f.cleanup().await;
}

#[tokio::test]
async fn release_deletes_only_the_holders_lease() {
    let f = Fixture::new("release").await;
    let ttl = Duration::from_secs(60);
    let lease = f.leases.acquire(3, 4, "a", ttl).await.unwrap().unwrap();
    let other = Lease {
        holder: "b".into(),
        ..lease.clone()
    };
    assert!(!f.leases.release(&other).await.unwrap());
    assert_eq!(f.leases.holder(3, 4).await.unwrap().as_deref(), Some("a"));
    assert!(f.leases.release(&lease).await.unwrap());
    assert_eq!(f.leases.holder(3, 4).await.unwrap(), None);
    // Released twice: the second time it is no longer ours.
    assert!(!f.leases.release(&lease).await.unwrap());
    // Once released, the next holder takes it at once.
    let next = f.leases.acquire(3, 4, "b", ttl).await.unwrap().unwrap();
    assert!(!f.leases.release(&lease).await.unwrap());
    assert_eq!(f.leases.holder(3, 4).await.unwrap().as_deref(), Some("b"));
    assert!(f.leases.release(&next).await.unwrap());
    f.cleanup().await;
}

#[tokio::test]
async fn enqueue_queues_each_task_once_on_its_tenants_shard() {
    let f = Fixture::new("enqueue").await;
    let mut conn = f.conn.clone();
    assert_eq!(f.leases.enqueue(&[], 4).await.unwrap(), 0);
    assert_eq!(
        f.leases
            .enqueue(&[(1, 10), (5, 10), (1, 11), (2, 10)], 4)
            .await
            .unwrap(),
        4
    );
    // Already queued tasks are skipped, new ones added, in one call.
    assert_eq!(
        f.leases
            .enqueue(&[(1, 10), (3, 10), (5, 10)], 4)
            .await
            .unwrap(),
        1
    );
    let shard = |tenant: i64| f.key(&format!("queue:{}", Leases::shard_of(tenant, 4)));
    let one: Vec<String> = conn.lrange(shard(1), 0, -1).await.unwrap();
    // Tenants 1 and 5 share shard 1; LPUSH puts the latest at the head.
    assert_eq!(one, ["1:11", "5:10", "1:10"]);
    let two: Vec<String> = conn.lrange(shard(2), 0, -1).await.unwrap();
    assert_eq!(two, ["2:10"]);
    let three: Vec<String> = conn.lrange(shard(3), 0, -1).await.unwrap();
    assert_eq!(three, ["3:10"]);
    let mut queued: Vec<String> = conn.smembers(f.key("queued")).await.unwrap();
    queued.sort();
    assert_eq!(queued, ["1:10", "1:11", "2:10", "3:10", "5:10"]);
    assert_eq!(
        f.keys().await,
        [
            f.key("queue:1"),
            f.key("queue:2"),
            f.key("queue:3"),
            f.key("queued")
        ]
    );
    f.cleanup().await;
}

#[tokio::test]
async fn gcra_spaces_reservations_per_budget() {
    let f = Fixture::new("gcra").await;
    let mut conn = f.conn.clone();
    // One request per 1,000 s (slots spaced 10% wider: 1,100 s): the first reservation is
    // free, the second waits for the next slot, whatever the machine's speed.
    let slow = Budget {
        requests_per_s: Some(0.001),
        rows_per_s: None,
    };
    let none = Budget::default();
    assert_eq!(
        f.leases.reserve_insert(slow, 1, none, 5).await.unwrap(),
        Duration::ZERO
    );
    let wait = f.leases.reserve_insert(slow, 1, none, 5).await.unwrap();
    assert!(
        wait > Duration::from_secs(1_000) && wait <= Duration::from_secs(1_100),
        "{wait:?}"
    );
    // The third waits for the slot after that.
    let wait = f.leases.reserve_insert(slow, 2, none, 5).await.unwrap();
    assert!(wait > Duration::from_secs(2_100), "{wait:?}");
    // The budget's key expires once its reservations are past.
    let pttl: i64 = conn.pttl(f.key("rate:global:req")).await.unwrap();
    assert!(pttl > 3_000_000 && pttl <= 3_301_000, "pttl {pttl}");

    // Rows are reserved as units: 3 rows at one row per 1,000 s take three slots. Another
    // tenant's budget is its own key.
    let rows = Budget {
        requests_per_s: None,
        rows_per_s: Some(0.001),
    };
    assert_eq!(
        f.leases.reserve_insert(none, 7, rows, 3).await.unwrap(),
        Duration::ZERO
    );
    let wait = f.leases.reserve_insert(none, 7, rows, 1).await.unwrap();
    assert!(wait > Duration::from_secs(3_200), "{wait:?}");
    assert_eq!(
        f.leases.reserve_insert(none, 8, rows, 1).await.unwrap(),
        Duration::ZERO
    );

    // Unlimited (or zero) budgets reserve nothing and write no key.
    let zero = Budget {
        requests_per_s: Some(0.0),
        rows_per_s: None,
    };
    assert_eq!(
        f.leases.reserve_insert(zero, 9, none, 1).await.unwrap(),
        Duration::ZERO
    );
    assert_eq!(
        f.keys().await,
        [
            f.key("rate:global:req"),
            f.key("rate:t7:rows"),
            f.key("rate:t8:rows")
        ]
    );
    f.cleanup().await;
}

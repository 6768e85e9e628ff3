//! The task queues against the real Redis (`REDIS_URL`, else 127.0.0.1:6379), each test under
//! its own key prefix, deleted at the end: a blocking pop gets a task pushed while it waits,
//! shards are served in the order the caller rotates, a cancelled pop returns at once and
//! loses nothing, and a `queued` mark whose task left every list is swept.

use redis::AsyncCommands;
use std::time::{Duration, Instant};
use tenantsync_lease::Leases;
use tokio_util::sync::CancellationToken;

/// Far longer than any of these waits should take on a loaded machine; the measured
/// latencies are printed instead.
const GENEROUS: Duration = Duration::from_secs(5);

async fn leases(test: &str) -> Leases {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("queue-test:{test}:{}:{nanos}", std::process::id());
    Leases::connect(&url, &prefix).await.unwrap()
}

async fn clean_up(leases: &Leases) {
    let mut conn = leases.connection();
    let keys: Vec<String> = conn.keys(format!("{}:*", leases.prefix())).await.unwrap();
    if !keys.is_empty() {
        let _: () = conn.del(keys).await.unwrap();
    }
}

async fn is_marked_queued(leases: &Leases, task: &str) -> bool {
    let mut conn = leases.connection();
    conn.sismember(format!("{}:queued", leases.prefix()), task)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_blocked_pop_gets_a_task_queued_while_it_waits() {
    let leases = leases("wake").await;
    let popper = leases.clone();
    let never = CancellationToken::new();
    let pop = tokio::spawn(async move {
        let r = popper.pop(4, 0, Duration::from_secs(30), &never).await;
        (r, Instant::now())
    });
    // Let the pop reach Redis and block on the empty shards.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pop.is_finished(), "nothing is queued: the pop waits");
    let queued_at = Instant::now();
    assert_eq!(leases.enqueue(&[(7, 3)], 4).await.unwrap(), 1);
    let (popped, at) = tokio::time::timeout(GENEROUS, pop)
        .await
        .expect("the blocked pop returns the task queued meanwhile")
        .unwrap();
    println!("queued → popped: {:?}", at.duration_since(queued_at));
    assert_eq!(popped.unwrap(), Some((7, 3)));
    assert!(
        !is_marked_queued(&leases, "7:3").await,
        "the pop clears the task's queued mark, so the coordinator can queue it again"
    );
    assert_eq!(leases.enqueue(&[(7, 3)], 4).await.unwrap(), 1);
    clean_up(&leases).await;
}

#[tokio::test]
async fn pops_start_at_the_given_shard_and_take_the_oldest_first() {
    let leases = leases("order").await;
    let never = CancellationToken::new();
    let block = Duration::from_secs(1);
    // Tenant t goes to shard t % 3; tenant 3's tasks share shard 0 with tenant 0's.
    leases
        .enqueue(&[(0, 1), (1, 1), (2, 1), (3, 1), (3, 2)], 3)
        .await
        .unwrap();
    assert_eq!(leases.pop(3, 1, block, &never).await.unwrap(), Some((1, 1)));
    assert_eq!(leases.pop(3, 2, block, &never).await.unwrap(), Some((2, 1)));
    assert_eq!(leases.pop(3, 0, block, &never).await.unwrap(), Some((0, 1)));
    // Shard 1 is empty now: the next shard in order serves.
    assert_eq!(leases.pop(3, 1, block, &never).await.unwrap(), Some((3, 1)));
    // A start past the shard count wraps around.
    assert_eq!(leases.pop(3, 7, block, &never).await.unwrap(), Some((3, 2)));
    for task in ["0:1", "1:1", "2:1", "3:1", "3:2"] {
        assert!(!is_marked_queued(&leases, task).await, "{task} unmarked");
    }
    let t0 = Instant::now();
    assert_eq!(leases.pop(3, 0, block, &never).await.unwrap(), None);
    println!(
        "empty pop returned after {:?} (block {block:?})",
        t0.elapsed()
    );

    // Blocked on every shard, in the rotated order: a batch queued across shards wakes it.
    let popper = leases.clone();
    let pop = tokio::spawn(async move {
        popper
            .pop(3, 2, Duration::from_secs(30), &CancellationToken::new())
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    leases.enqueue(&[(4, 1), (5, 1)], 3).await.unwrap();
    let first = tokio::time::timeout(GENEROUS, pop)
        .await
        .expect("a batch wakes the blocked pop")
        .unwrap()
        .unwrap()
        .unwrap();
    assert!([(4, 1), (5, 1)].contains(&first), "{first:?}");
    let second = leases.pop(3, 0, block, &never).await.unwrap().unwrap();
    assert_ne!(first, second);
    assert!([(4, 1), (5, 1)].contains(&second), "{second:?}");
    clean_up(&leases).await;
}

#[tokio::test]
async fn shutdown_cancels_a_blocked_pop() {
    let leases = leases("cancel").await;
    let shutdown = CancellationToken::new();
    let (popper, sd) = (leases.clone(), shutdown.clone());
    let pop = tokio::spawn(async move { popper.pop(2, 0, Duration::from_secs(30), &sd).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pop.is_finished());
    let t0 = Instant::now();
    shutdown.cancel();
    let r = tokio::time::timeout(GENEROUS, pop)
        .await
        .expect("a cancelled pop returns long before its 30 s block time")
        .unwrap();
    println!("cancel → pop returned: {:?}", t0.elapsed());
    assert_eq!(r.unwrap(), None);
    // Its connection went back to the pool unblocked: the next pop works at once.
    leases.enqueue(&[(1, 1)], 2).await.unwrap();
    let never = CancellationToken::new();
    let next = tokio::time::timeout(GENEROUS, leases.pop(2, 0, Duration::from_secs(30), &never))
        .await
        .expect("the pool serves the next pop");
    assert_eq!(next.unwrap(), Some((1, 1)));
    // A pop cancelled before it starts takes nothing.
    leases.enqueue(&[(2, 2)], 2).await.unwrap();
    assert_eq!(
        leases
            .pop(2, 0, Duration::from_secs(1), &shutdown)
            .await
            .unwrap(),
        None
    );
    assert!(is_marked_queued(&leases, "2:2").await);
    assert_eq!(leases.queue_depths(2).await.unwrap(), vec![1, 0]);
    clean_up(&leases).await;
}

#[tokio::test]
async fn a_queued_mark_whose_task_left_every_list_is_swept() {
    let leases = leases("sweep").await;
    leases.enqueue(&[(1, 1), (2, 1)], 2).await.unwrap();
    // A worker that died right after its blocking pop: the task left its list, its mark stayed.
    let mut conn = leases.connection();
    let lost: Option<String> = conn
        .rpop(format!("{}:queue:1", leases.prefix()), None)
        .await
        .unwrap();
    assert_eq!(lost.as_deref(), Some("1:1"));
    assert_eq!(
        leases.enqueue(&[(1, 1)], 2).await.unwrap(),
        0,
        "the stale mark hides the task from enqueue"
    );
    assert_eq!(leases.sweep_queued(2).await.unwrap(), 1);
    assert!(
        is_marked_queued(&leases, "2:1").await,
        "a listed task keeps its mark"
    );
    assert_eq!(leases.enqueue(&[(1, 1)], 2).await.unwrap(), 1);
    assert_eq!(leases.sweep_queued(2).await.unwrap(), 0);
    clean_up(&leases).await;
}

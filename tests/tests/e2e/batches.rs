//! Batch visibility: a slice that wrote only some of its chunks is invisible in the views
//! until a later slice commits the same range.

use std::sync::Arc;
use std::time::Duration;
use tenantsync_store::control::tasks::TaskId;
use tenantsync_tests::{scalar_i64, CrashOnceAt, TestEnv};
use tenantsync_worker::{CrashPoint, SliceOutcome};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_half_written_batch_is_invisible_until_a_later_slice_commits() {
    let env = TestEnv::new().await.unwrap();
    tenantsync_demo::seed(env.source_pool(), &[1], 100)
        .await
        .unwrap();
    let contacts = env.add_table("contacts", "organization_id").await.unwrap();
    let tenant = env.add_tenant("org-1", 1).await.unwrap();
    let task = TaskId {
        tenant_id: tenant.id,
        table_id: contacts.id,
    };
    let mut cfg = env.worker_config();
    cfg.chunk_limits.max_rows = 20;
    cfg.lease_ttl = Duration::from_secs(2);
    // Dies once, right after the first chunk of a slice was acknowledged.
    let dying = env.worker_with(cfg.clone(), CrashOnceAt::new(CrashPoint::AfterFirstChunk));
    env.past_skew().await;
    let r = dying
        .try_execute_task(task, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(r.outcome, SliceOutcome::Crashed);

    let bq = env.bq(&tenant).await.unwrap();
    let count = |sql: String| {
        let bq = &bq;
        async move { scalar_i64(&bq.query(&sql).await.unwrap()) }
    };
    let base = bq.qualified("contacts");
    let latest = bq.qualified("contacts_latest");
    let batches = bq.qualified("_sync_batches_contacts");
    // insertAll: one chunk of the slice reached the table. Storage Write: nothing did (the
    // pending stream was never committed).
    let reached = match env.write_api() {
        tenantsync_core::WriteApi::InsertAll => 20,
        tenantsync_core::WriteApi::Storage => 0,
    };
    assert_eq!(
        count(format!("SELECT COUNT(*) FROM {base}")).await,
        reached,
        "rows of the half-written slice in the table"
    );
    assert_eq!(
        count(format!("SELECT COUNT(*) FROM {latest}")).await,
        0,
        "a half-written batch must not show in the view"
    );
    assert_eq!(count(format!("SELECT COUNT(*) FROM {batches}")).await, 0);

    // After the lease expires another worker runs the task from the same watermark.
    let t0 = std::time::Instant::now();
    while env.lease_holder(task).await.is_some() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.sync_once(&env.worker_with(cfg, Arc::new(tenantsync_worker::NoHooks)))
        .await
        .unwrap();
    assert_eq!(count(format!("SELECT COUNT(*) FROM {latest}")).await, 100);
    // insertAll: the committing slice listed its own batch only; it sent the dead one's rows
    // again (insertIds name the batch, so BigQuery kept them), and the dead batch stays
    // invisible. Storage Write lists nothing: its commit is the visibility point, and the
    // dead slice's stream was never committed.
    let listed = count(format!(
        "SELECT COUNT(*) FROM {batches} WHERE batch_id IN ('{0}-{1}-1', '{0}-{1}-2')",
        tenant.id, contacts.id
    ))
    .await;
    match env.write_api() {
        tenantsync_core::WriteApi::InsertAll => {
            assert_eq!(listed, 1);
            assert_eq!(count(format!("SELECT COUNT(*) FROM {base}")).await, 120);
        }
        tenantsync_core::WriteApi::Storage => {
            assert_eq!(listed, 0);
            assert_eq!(count(format!("SELECT COUNT(*) FROM {base}")).await, 100);
        }
    }
    let dup = bq
        .query(&format!(
            "SELECT id FROM {latest} GROUP BY id HAVING COUNT(*) > 1"
        ))
        .await
        .unwrap();
    assert!(dup.is_empty(), "{dup:?}");
    env.cleanup().await.unwrap();
}

//! `verify` finds drift between Postgres and BigQuery and `--repair` fixes it; `resync` replays
//! a key range.

use tenantsync_tests::{scalar_i64, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_finds_a_row_deleted_behind_our_back_and_repair_restores_it() {
    let env = TestEnv::new().await.unwrap();
    tenantsync_demo::seed(env.source_pool(), &[1, 2], 2500)
        .await
        .unwrap();
    env.add_table("contacts", "organization_id").await.unwrap();
    let t1 = env.add_tenant("org-1", 1).await.unwrap();
    env.add_tenant("org-2", 2).await.unwrap();
    env.sync_once(&env.worker()).await.unwrap();

    let (ok, out) = env.cli(&["verify"]);
    assert!(ok, "verify after a clean sync:\n{out}");
    assert_eq!(out.matches("ok    org-").count(), 2, "{out}");

    // Behind our back: one row disappears from org-1's BigQuery table, and one row of org-1 is
    // deleted in Postgres (cursor mode cannot see a hard delete).
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM contacts WHERE organization_id = 1 ORDER BY id OFFSET 1700 LIMIT 2",
    )
    .fetch_all(env.source_pool())
    .await
    .unwrap();
    let (lost, gone) = (ids[0], ids[1]);
    let bq = env.bq(&t1).await.unwrap();
    bq.query(&format!(
        "DELETE FROM {} WHERE id = {lost}",
        bq.qualified("contacts")
    ))
    .await
    .unwrap();
    sqlx::query("DELETE FROM contacts WHERE id = $1")
        .bind(gone)
        .execute(env.source_pool())
        .await
        .unwrap();

    let (ok, out) = env.cli(&["verify", "--tenant", "org-1"]);
    assert!(!ok, "verify must fail on drift:\n{out}");
    assert!(out.contains("DRIFT org-1 contacts"), "{out}");
    // Keys are compared in ranges of 1,000: the lost row is in the second range only.
    assert_eq!(out.matches("missing").count(), 1, "{out}");
    assert!(out.contains("1 missing, 0 stale"), "{out}");
    assert!(
        out.contains(&format!("1 key(s) in BigQuery but not in Postgres: {gone}")),
        "{out}"
    );
    let (ok, out) = env.cli(&["verify", "--tenant", "org-2"]);
    assert!(ok, "the other tenant has no drift:\n{out}");

    let versions_before = scalar_i64(
        &bq.query(&format!(
            "SELECT COUNT(*) FROM {}",
            bq.qualified("contacts")
        ))
        .await
        .unwrap(),
    );
    let (ok, out) = env.cli(&["verify", "--tenant", "org-1", "--repair"]);
    assert!(ok, "verify --repair:\n{out}");
    assert!(out.contains("ok    org-1 contacts"), "{out}");
    // Only the drifted range (1,000 rows) and one tombstone were sent, not the whole table.
    let versions_after = scalar_i64(
        &bq.query(&format!(
            "SELECT COUNT(*) FROM {}",
            bq.qualified("contacts")
        ))
        .await
        .unwrap(),
    );
    assert_eq!(versions_after - versions_before, 1001, "{out}");
    let latest = bq.qualified("contacts_latest");
    let has = |id: i64| {
        let sql = format!("SELECT COUNT(*) FROM {latest} WHERE id = {id}");
        let bq = &bq;
        async move { scalar_i64(&bq.query(&sql).await.unwrap()) }
    };
    assert_eq!(has(lost).await, 1, "the lost row is back");
    assert_eq!(has(gone).await, 0, "the row deleted at the source is gone");
    let pg: i64 = sqlx::query_scalar("SELECT count(*) FROM contacts WHERE organization_id = 1")
        .fetch_one(env.source_pool())
        .await
        .unwrap();
    assert_eq!(
        scalar_i64(
            &bq.query(&format!("SELECT COUNT(*) FROM {latest}"))
                .await
                .unwrap()
        ),
        pg
    );

    // resync replays exactly the asked range, as new versions.
    let (ok, out) = env.cli(&[
        "resync",
        "--tenant",
        "org-1",
        "--table",
        "contacts",
        "--from",
        &ids[0].to_string(),
        "--to",
        &(ids[0] + 9).to_string(),
    ]);
    assert!(ok, "{out}");
    let sent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM contacts WHERE organization_id = 1 AND id BETWEEN $1 AND $1 + 9",
    )
    .bind(ids[0])
    .fetch_one(env.source_pool())
    .await
    .unwrap();
    assert!(
        out.contains(&format!("resent {sent} rows of contacts")),
        "{out}"
    );
    let (ok, out) = env.cli(&["verify", "--tenant", "org-1", "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["ranges"].as_array().unwrap().len(), 0, "{out}");
    env.cleanup().await.unwrap();
}

//! /metrics, /healthz and /readyz of the real binary.

use chrono::Utc;
use std::time::{Duration, Instant};
use tenantsync_tests::TestEnv;

async fn get(addr: &str, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Value of the first sample whose line starts with `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_health_and_readiness_are_served_and_lag_rises_without_workers() {
    let env = TestEnv::new().await.unwrap();
    tenantsync_demo::seed(env.source_pool(), &[1, 2], 20)
        .await
        .unwrap();
    env.add_table("contacts", "organization_id").await.unwrap();
    env.add_tenant("org-1", 1).await.unwrap();
    env.add_tenant("org-2", 2).await.unwrap();

    let run = env.spawn(
        "run",
        &["run"],
        &[("TENANTSYNC_LOG", "info,tenantsync_worker=debug")],
    );
    let addr = env.metrics_addr(&run).await;
    env.wait_synced_through(Utc::now(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(get(&addr, "/healthz").await, (200, "ok".into()));
    assert_eq!(get(&addr, "/readyz").await, (200, "ready".into()));

    // Gauges refresh every 5 s; wait for one refresh after the sync.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (status, text) = get(&addr, "/metrics").await;
    assert_eq!(status, 200);
    let rows = sample(
        &text,
        "tenantsync_sync_rows_total{tenant=\"org-1\",table=\"contacts\"}",
    );
    assert_eq!(rows, Some(20.0), "rows counter:\n{text}");
    assert!(
        sample(
            &text,
            "tenantsync_bigquery_insert_requests_total{outcome=\"ok\",method=\"insert-all\"}"
        )
        .unwrap()
            >= 2.0
    );
    assert_eq!(
        sample(
            &text,
            "tenantsync_bigquery_insert_requests_total{outcome=\"quota_exceeded\",method=\"insert-all\"}"
        ),
        Some(0.0)
    );
    assert!(
        text.contains(
            "tenantsync_bigquery_insert_duration_seconds_bucket{method=\"insert-all\",le=\"0.1\"}"
        ),
        "histogram missing"
    );
    // Batch sizes are bucketed (not the exporter's default summary) so the dashboard can
    // sum them across workers; every slice's claim and commit counted at least once.
    assert!(
        sample(&text, "tenantsync_control_batch_tasks_bucket{le=\"+Inf\"}").unwrap_or(0.0) >= 2.0,
        "control batch histogram:\n{text}"
    );
    assert!(
        !text.contains("tenantsync_bigquery_insert_duration_seconds_bucket{tenant"),
        "no tenant label on histograms"
    );
    assert_eq!(sample(&text, "tenantsync_coordinator_is_leader"), Some(1.0));
    assert_eq!(sample(&text, "tenantsync_workers_live"), Some(1.0));
    assert_eq!(
        sample(&text, "tenantsync_tenants{status=\"active\"}"),
        Some(2.0)
    );
    let lag = sample(
        &text,
        "tenantsync_sync_lag_seconds{tenant=\"org-2\",table=\"contacts\"}",
    )
    .expect("lag gauge");
    assert!(lag < 10.0, "lag right after catching up: {lag}");

    // Logs are JSON (stderr is a file here), and a slice's lines carry its task, tenant,
    // table and run.
    let logs = env.json_logs(&run);
    let slice = logs
        .iter()
        .find(|l| l["fields"]["message"] == "slice finished" && l["span"]["tenant"] == "org-1")
        .unwrap_or_else(|| panic!("no slice line of org-1 in {} JSON lines", logs.len()));
    assert_eq!(slice["span"]["table"], "contacts", "{slice}");
    assert!(slice["span"]["task"].is_string(), "{slice}");
    assert!(
        slice["span"]["run"].as_i64().is_some_and(|r| r >= 1),
        "{slice}"
    );
    assert!(slice["fields"]["rows"].is_u64(), "{slice}");
    drop(run);

    // No worker at all, only a coordinator: new rows wait, and the lag it reports keeps rising.
    sqlx::query("UPDATE contacts SET name = 'pending' WHERE organization_id = 2")
        .execute(env.source_pool())
        .await
        .unwrap();
    let coord = env.spawn("coord", &["coordinator"], &[]);
    let addr = env.metrics_addr(&coord).await;
    let series = "tenantsync_sync_lag_seconds{tenant=\"org-2\",table=\"contacts\"}";
    let t0 = Instant::now();
    let first = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(v) = sample(&get(&addr, "/metrics").await.1, series) {
            break v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "coordinator never served lag"
        );
    };
    tokio::time::sleep(Duration::from_secs(6)).await;
    let text = get(&addr, "/metrics").await.1;
    let later = sample(&text, series).unwrap();
    assert!(
        later >= first + 4.0,
        "lag did not rise without workers: {first} then {later}"
    );
    // The backlog counts the 20 updated rows waiting; the caught-up tenant has none. Gauges
    // refresh every 5 s on their own, after a tick has marked the task changed: on a loaded
    // machine the first refresh can come before that tick, so wait for a later one.
    let backlog = "tenantsync_sync_backlog_rows{tenant=\"org-2\",table=\"contacts\"}";
    let t0 = Instant::now();
    let mut text = text;
    while sample(&text, backlog) != Some(20.0) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "backlog never 20:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        text = get(&addr, "/metrics").await.1;
    }
    assert_eq!(
        sample(
            &text,
            "tenantsync_sync_backlog_rows{tenant=\"org-1\",table=\"contacts\"}"
        ),
        Some(0.0)
    );
    // The killed worker left no goodbye: it drops out when its heartbeat is 10 s old.
    let t0 = Instant::now();
    while sample(&get(&addr, "/metrics").await.1, "tenantsync_workers_live") != Some(0.0) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "dead worker still counted live"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A tenant removed while it lags: its series read 0 from the next refresh, so its last
    // lag does not hold `TenantLagHigh` firing for ever. The other tenant's stay.
    let (ok, out) = env.cli(&["tenant", "remove", "org-2", "--keep-data"]);
    assert!(ok, "{out}");
    let t0 = Instant::now();
    loop {
        let text = get(&addr, "/metrics").await.1;
        let lag = sample(&text, series);
        let backlog = sample(
            &text,
            "tenantsync_sync_backlog_rows{tenant=\"org-2\",table=\"contacts\"}",
        );
        if lag == Some(0.0) && backlog == Some(0.0) {
            assert!(
                sample(
                    &text,
                    "tenantsync_sync_lag_seconds{tenant=\"org-1\",table=\"contacts\"}"
                )
                .is_some_and(|l| l > 0.0),
                "the remaining tenant's lag:\n{text}"
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "removed tenant still reported: lag {lag:?}, backlog {backlog:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(coord);
    env.cleanup().await.unwrap();
}

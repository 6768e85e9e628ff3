//! Faults between the workers and BigQuery: every valid row still lands exactly once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tenantsync_bigquery::Endpoint;
use tenantsync_tests::http::{forward, serve, Request, Response};
use tenantsync_tests::{scalar_i64, TestEnv};

fn err(status: u16, reason: &str) -> Response {
    Response::json(
        status,
        &serde_json::json!({"error": {"code": status, "message": format!("injected {reason}"),
                                                          "errors": [{"reason": reason}]}}),
    )
}

/// A well-mixed 64-bit hash (SplitMix64's finalizer): deterministic, not periodic.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_valid_row_lands_once_through_twenty_percent_faults() {
    let env = TestEnv::new().await.unwrap();
    let orgs = [1i64, 2, 3];
    tenantsync_demo::seed(env.source_pool(), &orgs, 150)
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE readings (id bigint PRIMARY KEY, organization_id bigint NOT NULL,
                                value numeric(12,2), updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO readings SELECT g, 1 + g % 3, CASE WHEN g % 25 = 0 THEN 'NaN'::numeric ELSE g END,
                                     now() - interval '1 minute' + g * interval '1 ms'
         FROM generate_series(1, 300) g;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    env.add_table("contacts", "organization_id").await.unwrap();
    env.add_table("readings", "organization_id").await.unwrap();
    let mut tenants = Vec::new();
    for o in orgs {
        tenants.push(env.add_tenant(&format!("org-{o}"), o).await.unwrap());
    }

    let upstream = env.emulator_url();
    // The client gives up after TIMEOUT; a slow answer comes well after that. TIMEOUT leaves a
    // loaded emulator room: a clean call that times out too is a fault the test did not mean.
    const TIMEOUT: Duration = Duration::from_secs(4);
    let counts: Arc<[AtomicUsize; 8]> = Arc::new(Default::default());
    let calls = Arc::new(AtomicUsize::new(0));
    let faults = Arc::new(AtomicUsize::new(0));
    let since_fault = Arc::new(AtomicUsize::new(0));
    let c = counts.clone();
    let http = reqwest::Client::new();
    let (addr, _proxy) = serve(Arc::new(move |req: Request| {
        let (c, http, upstream) = (c.clone(), http.clone(), upstream.clone());
        let n = calls.fetch_add(1, Ordering::Relaxed);
        // About one call in five fails, chosen by a hash of the call's number, and the faults
        // cycle through the seven kinds. Not every fifth call: a retry loop that makes five
        // calls per attempt would then meet a fault at the same step every time and never get
        // through, which says nothing about real faults. A run of ten clean calls forces one,
        // so every kind shows up even in a short run.
        let quiet = since_fault.fetch_add(1, Ordering::Relaxed);
        let fault = if splitmix64(n as u64) % 5 == 0 || quiet >= 10 {
            since_fault.store(0, Ordering::Relaxed);
            faults.fetch_add(1, Ordering::Relaxed) % 7 + 1
        } else {
            0
        };
        Box::pin(async move {
            c[fault].fetch_add(1, Ordering::Relaxed);
            match fault {
                1 => err(429, "rateLimitExceeded"),
                2 => err(403, "rateLimitExceeded"),
                3 => err(500, "backendError"),
                4 => err(503, "backendError"),
                5 => {
                    // Slow: the write happens, the answer comes after the client gave up.
                    let r = forward(&http, &upstream, &req).await;
                    tokio::time::sleep(TIMEOUT + Duration::from_secs(1)).await;
                    r
                }
                6 => Response::drop_connection(),
                7 => {
                    // Reset after the write: the client cannot know it succeeded.
                    let _ = forward(&http, &upstream, &req).await;
                    Response::drop_connection()
                }
                _ => forward(&http, &upstream, &req).await,
            }
        })
    }))
    .await;

    let mut cfg = env.worker_config();
    cfg.endpoint = Endpoint::emulator(&format!("http://{addr}"))
        .with_storage_emulator(env.endpoint.storage_url.as_deref());
    cfg.request_timeout = TIMEOUT;
    cfg.chunk_limits.max_rows = 20;
    cfg.max_attempts = 30;
    cfg.max_backoff = Duration::from_millis(500);
    let worker = env.worker_with(cfg, Arc::new(tenantsync_worker::NoHooks));
    env.sync_once(&worker).await.unwrap();
    let injected: Vec<usize> = counts.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    println!(
        "calls through the proxy: {} clean, faults (429, 403, 500, 503, slow, reset, reset after write): {:?}",
        injected[0],
        &injected[1..]
    );
    assert!(
        injected[1..].iter().all(|n| *n > 0),
        "every fault kind should have been injected: {injected:?}"
    );

    for (t, org) in tenants.iter().zip(orgs) {
        let bq = env.bq(t).await.unwrap();
        for (table, bad) in [("contacts", 0i64), ("readings", 4)] {
            let pg: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {table} WHERE organization_id = $1"
            ))
            .bind(org)
            .fetch_one(env.source_pool())
            .await
            .unwrap();
            let latest = bq.qualified(&format!("{table}_latest"));
            let rows = scalar_i64(
                &bq.query(&format!("SELECT COUNT(*) FROM {latest}"))
                    .await
                    .unwrap(),
            );
            let keys = scalar_i64(
                &bq.query(&format!("SELECT COUNT(DISTINCT id) FROM {latest}"))
                    .await
                    .unwrap(),
            );
            assert_eq!(
                rows, keys,
                "{} {table}: a key appears twice in _latest",
                t.slug
            );
            assert_eq!(
                rows,
                pg - bad,
                "{} {table}: valid rows missing from _latest",
                t.slug
            );
        }
    }
    // The refused rows (NaN) and nothing else are in the dead-letter table.
    let dl = env.control.dead_letters(None, Some("open")).await.unwrap();
    let mut keys: Vec<i64> = dl.iter().map(|d| d.key[0].parse().unwrap()).collect();
    keys.sort();
    assert_eq!(
        keys,
        (1..=12).map(|i| i * 25).collect::<Vec<i64>>(),
        "{dl:?}"
    );
    env.cleanup().await.unwrap();
}

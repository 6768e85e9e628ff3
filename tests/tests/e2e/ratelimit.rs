//! insertAll budgets, measured where BigQuery would see them: at a proxy in front of it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tenantsync_bigquery::Endpoint;
use tenantsync_tests::http::{forward, serve, Request};
use tenantsync_tests::TestEnv;

/// insertAll arrivals at the proxy: (when, dataset).
type Arrivals = Arc<Mutex<Vec<(Instant, String)>>>;

async fn counting_proxy(env: &TestEnv) -> (String, Arrivals) {
    let upstream = env.emulator_url();
    let seen: Arrivals = Arc::default();
    let s = seen.clone();
    let http = reqwest::Client::new();
    let (addr, task) = serve(Arc::new(move |req: Request| {
        let (s, http, upstream) = (s.clone(), http.clone(), upstream.clone());
        Box::pin(async move {
            if req.path.ends_with("/insertAll") {
                let dataset = req
                    .path
                    .split("/datasets/")
                    .nth(1)
                    .unwrap_or("")
                    .split('/')
                    .next()
                    .unwrap_or("")
                    .to_string();
                s.lock().unwrap().push((Instant::now(), dataset));
            }
            forward(&http, &upstream, &req).await
        })
    }))
    .await;
    std::mem::forget(task);
    (format!("http://{addr}"), seen)
}

/// Most arrivals in any half-open one-second window, and the average rate over the run.
fn measure(arrivals: &[Instant]) -> (usize, f64) {
    let mut t: Vec<Instant> = arrivals.to_vec();
    t.sort();
    let mut max = 0;
    let mut j = 0;
    for i in 0..t.len() {
        while t[i].duration_since(t[j]) >= Duration::from_secs(1) {
            j += 1;
        }
        max = max.max(i - j + 1);
    }
    let span = t
        .last()
        .map(|l| l.duration_since(t[0]).as_secs_f64())
        .unwrap_or(0.0);
    let avg = if span > 0.0 {
        (t.len() - 1) as f64 / span
    } else {
        0.0
    };
    (max, avg)
}

async fn setup(env: &TestEnv, orgs: &[i64], contacts: i64) {
    tenantsync_demo::seed(env.source_pool(), orgs, contacts)
        .await
        .unwrap();
    env.add_table("contacts", "organization_id").await.unwrap();
    for &o in orgs {
        env.add_tenant(&format!("org-{o}"), o).await.unwrap();
    }
}

const LIMIT: f64 = 8.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_worker_never_exceeds_the_global_request_budget() {
    let env = TestEnv::new().await.unwrap();
    setup(&env, &[1, 2, 3], 250).await;
    let (url, seen) = counting_proxy(&env).await;
    let mut cfg = env.worker_config();
    cfg.endpoint =
        Endpoint::emulator(&url).with_storage_emulator(env.endpoint.storage_url.as_deref());
    cfg.chunk_limits.max_rows = 25;
    cfg.global_budget.requests_per_s = Some(LIMIT);
    let worker = env.worker_with(cfg, Arc::new(tenantsync_worker::NoHooks));
    env.sync_once(&worker).await.unwrap();
    let arrivals: Vec<Instant> = seen.lock().unwrap().iter().map(|a| a.0).collect();
    let (max, avg) = measure(&arrivals);
    println!("1 worker: {} insertAll calls, max {max} in any 1 s window, average {avg:.2}/s, limit {LIMIT}/s", arrivals.len());
    assert!(
        arrivals.len() >= 30,
        "too few requests to judge: {}",
        arrivals.len()
    );
    assert!(
        max as f64 <= LIMIT,
        "{max} requests within one second, limit {LIMIT}"
    );
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_worker_processes_share_the_global_budget_and_a_tenant_budget_holds() {
    let env = TestEnv::new().await.unwrap();
    let orgs: Vec<i64> = (1..=6).collect();
    setup(&env, &orgs, 150).await;
    // org-1 has a budget of its own, below its share of the global one.
    env.control
        .set_tenant_limits("org-1", Some(2.0), None)
        .await
        .unwrap();
    let (url, seen) = counting_proxy(&env).await;
    let limit = LIMIT.to_string();
    let vars = [
        ("BIGQUERY_EMULATOR_HOST", url.as_str()),
        ("TENANTSYNC_CHUNK_ROWS", "25"),
        ("TENANTSYNC_GLOBAL_REQUESTS_PER_S", limit.as_str()),
        // Fewer slots per worker than tasks, so all three workers take some.
        ("TENANTSYNC_CONCURRENCY", "2"),
    ];
    let _c = env.spawn("c1", &["coordinator"], &vars);
    let _w: Vec<_> = ["w1", "w2", "w3"]
        .iter()
        .map(|n| env.spawn(n, &["worker"], &vars))
        .collect();
    env.wait_synced_through(chrono::Utc::now(), Duration::from_secs(120))
        .await
        .unwrap();

    let all = seen.lock().unwrap().clone();
    let (max, avg) = measure(&all.iter().map(|a| a.0).collect::<Vec<_>>());
    let org1_dataset = env.dataset("org-1");
    let org1: Vec<Instant> = all
        .iter()
        .filter(|a| a.1 == org1_dataset)
        .map(|a| a.0)
        .collect();
    let (max1, avg1) = measure(&org1);
    println!(
        "3 workers: {} insertAll calls, max {max} in any 1 s window, average {avg:.2}/s, limit {LIMIT}/s; \
         org-1: {} calls, max {max1} per 1 s window, average {avg1:.2}/s, limit 2/s",
        all.len(),
        org1.len()
    );
    let workers: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT worker) FROM sync_runs WHERE rows > 0")
            .fetch_one(env.control.pool())
            .await
            .unwrap();
    assert!(
        workers >= 2,
        "the load should have spread over several workers"
    );
    assert!(all.len() >= 36);
    assert!(
        max as f64 <= LIMIT,
        "{max} requests within one second, limit {LIMIT}"
    );
    assert!(
        max1 <= 2,
        "org-1 sent {max1} requests within one second, its limit is 2"
    );
    env.cleanup().await.unwrap();
}

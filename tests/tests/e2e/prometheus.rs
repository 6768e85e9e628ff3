//! A real Prometheus (Debian's `prometheus`, installed by `scripts/dev-env test`) scrapes a
//! coordinator and two workers while the demo generator writes. Every query of every dashboard
//! panel and every alert expression is evaluated through Prometheus' HTTP API and must return
//! data; then the workers are killed and the lag alert must fire.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tenantsync_tests::TestEnv;

/// The Prometheus server of one test: its own config, rules, data directory and port.
struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(dir: &Path, targets: &[String], rules: &str) -> Self {
        let bin = std::env::var("TENANTSYNC_TEST_PROMETHEUS").unwrap_or("prometheus".into());
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("rules.yml"), rules).unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files: ['rules.yml']\n\
                 scrape_configs:\n  - job_name: tenantsync\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.join("prometheus.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(&bin)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} ({e}); `scripts/dev-env test` installs Prometheus")
            });
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let r = reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .query(query)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap_or_else(|e| panic!("prometheus {path}: {e}\n{}", self.log_text()));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status"], "success", "{path} {query:?}: {v}");
        v["data"].clone()
    }

    /// Instant query; the result vector (a scalar counts as one value).
    async fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.get("/api/v1/query", &[("query", expr)]).await;
        match data["resultType"].as_str() {
            Some("scalar") | Some("string") => vec![data["result"].clone()],
            _ => data["result"].as_array().cloned().unwrap_or_default(),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_ready(&self) {
        let t0 = Instant::now();
        loop {
            if let Ok(r) = reqwest::get(format!("{}/-/ready", self.url)).await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "prometheus not ready:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Wait until `expr` returns a non-empty result.
    async fn wait_for(&self, expr: &str, within: Duration) -> Vec<Value> {
        let t0 = Instant::now();
        loop {
            let r = self.query(expr).await;
            if !r.is_empty() {
                return r;
            }
            assert!(t0.elapsed() < within, "{expr} stayed empty for {within:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn alerts(&self, state: &str) -> BTreeSet<String> {
        let data = self.get("/api/v1/alerts", &[]).await;
        data["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["state"] == state)
            .map(|a| a["labels"]["alertname"].as_str().unwrap().to_string())
            .collect()
    }
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Every `expr` in a dashboard's panels (nested rows included).
fn panel_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    ("templating", _) => {}
                    _ => panel_exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| panel_exprs(x, out)),
        _ => {}
    }
}

/// The shipped alert rules with thresholds and `for` durations a test can reach: lag 8 s instead
/// of 900 s, pending 3 s instead of minutes. The expressions are otherwise the shipped ones.
fn test_rules() -> String {
    let shipped = std::fs::read_to_string(repo_file("dashboards/alerts.yml")).unwrap();
    let mut rules = shipped.clone();
    for (from, to) in [
        (
            "(tenantsync_sync_lag_seconds) > 900",
            "(tenantsync_sync_lag_seconds) > 8",
        ),
        ("for: 10m", "for: 3s"),
        ("for: 5m", "for: 3s"),
        ("for: 2m", "for: 3s"),
    ] {
        assert!(rules.contains(from), "alerts.yml no longer has {from:?}");
        rules = rules.replace(from, to);
    }
    rules
}

/// Names of the tenantsync metrics an expression reads.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("tenantsync_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_evaluates_every_dashboard_query_and_alert_and_the_lag_alert_fires() {
    let env = TestEnv::new().await.unwrap();
    let orgs = vec![1i64, 2, 3];
    tenantsync_demo::seed(env.source_pool(), &orgs, 50)
        .await
        .unwrap();
    for table in ["contacts", "messages"] {
        env.add_table(table, "organization_id").await.unwrap();
    }
    for o in &orgs {
        env.add_tenant(&format!("org-{o}"), *o).await.unwrap();
    }

    let coord = env.spawn("coord", &["coordinator"], &[]);
    let w1 = env.spawn("w1", &["worker"], &[]);
    let w2 = env.spawn("w2", &["worker"], &[]);
    let mut targets = Vec::new();
    for p in [&coord, &w1, &w2] {
        targets.push(env.metrics_addr(p).await);
    }
    let dir = std::env::temp_dir().join(format!("tstest-{}-prometheus", env.id));
    let prom = Prometheus::start(&dir, &targets, &test_rules());
    prom.wait_ready().await;

    // Load: the demo generator writes inserts and updates for all three tenants throughout.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (pool, orgs, stop) = (env.source_pool().clone(), orgs.clone(), stop.clone());
        tokio::spawn(async move {
            let mut g = tenantsync_demo::Generator::new(pool, orgs, 7).await?;
            g.run_for(40.0, None, stop.cancelled_owned()).await
        })
    };

    // All three targets up, rows flowing, and a few scrapes for rate() to work with.
    prom.wait_for("count(up == 1) == 3", Duration::from_secs(30))
        .await;
    prom.wait_for(
        "sum(tenantsync_sync_rows_total) > 0 and max(tenantsync_workers_live) == 2",
        Duration::from_secs(60),
    )
    .await;
    prom.wait_for(
        "count_over_time(max(tenantsync_sync_lag_seconds)[1m:1s]) >= 5",
        Duration::from_secs(60),
    )
    .await;

    // Every panel query of both dashboards returns data, with `$tenant` set the way Grafana
    // sets it: from `label_values(tenantsync_sync_lag_seconds, tenant)`.
    let mut empty = Vec::new();
    let mut evaluated = 0;
    for file in [
        "dashboards/fleet-overview.json",
        "dashboards/tenant-drilldown.json",
    ] {
        let dash: Value =
            serde_json::from_str(&std::fs::read_to_string(repo_file(file)).unwrap()).unwrap();
        let mut tenant = None;
        for var in dash["templating"]["list"].as_array().unwrap() {
            if var["type"] != "query" {
                continue;
            }
            let q = var["query"]["query"]
                .as_str()
                .or(var["query"].as_str())
                .unwrap();
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|s| s.strip_suffix(')'))
                .unwrap_or_else(|| panic!("{file}: variable query {q:?} is not label_values"));
            let (metric, label) = inner.split_once(',').unwrap();
            let values = prom
                .get(
                    &format!("/api/v1/label/{}/values", label.trim()),
                    &[("match[]", metric.trim())],
                )
                .await;
            let values: Vec<String> = values
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            assert!(
                values.contains(&"org-1".to_string()),
                "{file}: ${} values {values:?}",
                var["name"]
            );
            tenant = Some("org-1");
        }
        let mut exprs = Vec::new();
        panel_exprs(&dash["panels"], &mut exprs);
        assert!(!exprs.is_empty(), "{file} has no queries");
        for e in exprs {
            let e = match tenant {
                Some(t) => e.replace("$tenant", t),
                None => e,
            };
            assert!(!e.contains('$'), "{file}: unresolved variable in {e}");
            evaluated += 1;
            if prom.query(&e).await.is_empty() {
                empty.push(format!("{file}: {e}"));
            }
        }
    }
    assert!(
        empty.is_empty(),
        "panel queries without data:\n{}",
        empty.join("\n")
    );

    // Every alert rule is loaded and evaluates without error. An alert's expression is empty
    // while it does not fire, so "returns data" is checked on what it reads: each metric the
    // expression names has series.
    let groups = prom.get("/api/v1/rules", &[]).await;
    let rules: Vec<Value> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect();
    assert_eq!(rules.len(), 7, "alert rules loaded: {rules:?}");
    for r in &rules {
        assert_eq!(r["health"], "ok", "rule {}: {r}", r["name"]);
        let expr = r["query"].as_str().unwrap();
        for m in metrics_in(expr) {
            assert!(
                !prom.query(&format!("count({m})")).await.is_empty(),
                "alert {}: {m} has no series",
                r["name"]
            );
        }
        evaluated += 1;
    }
    let firing = prom.alerts("firing").await;
    assert!(
        !firing.contains("NoCoordinatorLeading") && !firing.contains("NoLiveWorkers"),
        "alerts firing while everything runs: {firing:?}"
    );
    println!("evaluated {evaluated} dashboard and alert queries; firing while healthy: {firing:?}");

    // Stop every worker while writes go on: lag rises past the (test) threshold and stays there,
    // so TenantLagHigh fires; the workers' memberships expire, so NoLiveWorkers fires too.
    drop(w1);
    drop(w2);
    let t0 = Instant::now();
    let fired = loop {
        let firing = prom.alerts("firing").await;
        if firing.contains("TenantLagHigh") && firing.contains("NoLiveWorkers") {
            break firing;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "alerts firing 90 s after the workers stopped: {firing:?}; pending: {:?}",
            prom.alerts("pending").await
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    println!(
        "firing {:.0} s after the workers stopped: {fired:?}",
        t0.elapsed().as_secs_f64()
    );
    assert!(!fired.contains("NoCoordinatorLeading"), "{fired:?}");

    stop.cancel();
    load.await.unwrap().unwrap();
    drop(prom);
    drop(coord);
    let _ = std::fs::remove_dir_all(&dir);
    env.cleanup().await.unwrap();
}

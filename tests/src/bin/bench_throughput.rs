//! Throughput benchmark (issue 8): one worker process, Postgres → insertAll, against the
//! zero-cost sink ([`tenantsync_tests::sink`]), side by side in the same run with the pipeline a
//! user would otherwise write (`bench/reference/insert_rows.py`: psycopg 3 +
//! google-cloud-bigquery `insert_rows_json`, batches of 500) on the same rows and the same sink.
//!
//! Source: one wide-ish table (`bench_events`: text, enum-like text, bool, text[] and bigint[]
//! arrays, numeric, float, jsonb, timestamptz, NULLs in most columns) with `BENCH_ROWS` rows
//! spread evenly over `BENCH_TENANTS` tenants, written with `generate_series`, then
//! `VACUUM ANALYZE`. The table is registered through `onboard::add_table` and the tenants
//! through `onboard::add_tenant` (against the sink, in emulator mode). Then:
//!
//! 1. `target/release/tenantsync run --once` (the real binary; its own process, so its RSS is its
//!    own) syncs every tenant until caught up;
//! 2. the reference pipeline (its own process) sends the same rows to the same sink.
//!
//! For each: rows/s (rows the sink acknowledged / process wall time, and over the sink's
//! first-to-last acknowledgement), peak RSS (VmHWM, polled every 100 ms; the reference also
//! reports `ru_maxrss`), and CPU seconds of the process, of the Postgres backends serving it,
//! of all Postgres processes, and of this process (the sink). Benchmarks print figures and
//! assert nothing.
//!
//! Settings (environment): `BENCH_TENANTS` (8), `BENCH_ROWS` (1000000 in total),
//! `BENCH_SLICE_ROWS` (20000, the `tables add` default), `BENCH_CONCURRENCY` (32, the worker
//! default), `BENCH_SOURCE_POOL` (8), `BENCH_CONTROL_POOL` (4), `BENCH_CHUNK_ROWS` (500),
//! `BENCH_REFERENCE=0` (skip the reference), `BENCH_PYTHON` (the reference's interpreter;
//! default `.dev/bench-venv/bin/python`, set up by `scripts/bench-env`), `BENCH_KEEP=1` (keep the
//! databases). `TENANTSYNC_*` variables in the environment reach the worker unchanged.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tenantsync_core::Mode;
use tenantsync_store::control::NewTableSpec;
use tenantsync_tests::bench::{self, env_flag, env_num, Meter, MeterReport};
use tenantsync_tests::sink::{Sink, SinkStats};
use tenantsync_tests::TestEnv;
use tenantsync_worker::onboard;

const TABLE: &str = "bench_events";

struct Params {
    tenants: i64,
    rows: i64,
    slice_rows: i32,
    concurrency: usize,
    source_pool: u32,
    control_pool: u32,
    chunk_rows: usize,
    reference: bool,
    python: PathBuf,
    keep: bool,
}

impl Params {
    fn from_env() -> Result<Self> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        Ok(Self {
            tenants: env_num("BENCH_TENANTS", 8)?,
            rows: env_num("BENCH_ROWS", 1_000_000)?,
            slice_rows: env_num("BENCH_SLICE_ROWS", 20_000)?,
            concurrency: env_num("BENCH_CONCURRENCY", 32)?,
            source_pool: env_num("BENCH_SOURCE_POOL", 8)?,
            control_pool: env_num("BENCH_CONTROL_POOL", 4)?,
            chunk_rows: env_num("BENCH_CHUNK_ROWS", 500)?,
            reference: env_flag("BENCH_REFERENCE", true),
            python: std::env::var("BENCH_PYTHON")
                .map(PathBuf::from)
                .unwrap_or_else(|_| root.join(".dev/bench-venv/bin/python")),
            keep: env_flag("BENCH_KEEP", false),
        })
    }
}

async fn create_source(env: &TestEnv, p: &Params) -> Result<()> {
    let pool = env.source_pool();
    sqlx::raw_sql(&bench::wide_table_sql(TABLE))
        .execute(pool)
        .await?;
    bench::fill_wide_table(pool, TABLE, p.tenants, p.rows).await?;
    sqlx::raw_sql(&format!("VACUUM ANALYZE {TABLE}"))
        .execute(pool)
        .await?;
    Ok(())
}

async fn register(env: &TestEnv, p: &Params) -> Result<Vec<(i64, String)>> {
    onboard::add_table(
        &env.control,
        &env.source,
        NewTableSpec {
            source_schema: "public".into(),
            source_table: TABLE.into(),
            key_columns: vec![],
            cursor_column: "updated_at".into(),
            tenant_column: "organization_id".into(),
            mode: Mode::Latest,
            sync_interval_ms: 1000,
            slice_rows: p.slice_rows,
            soft_delete_column: None,
            capture: Default::default(),
            exclude_columns: Vec::new(),
            hash_columns: Vec::new(),
        },
    )
    .await?;
    let mut tenants = Vec::new();
    for org in 1..=p.tenants {
        let t = env.add_tenant(&format!("org{org}"), org).await?;
        tenants.push((org, t.bq_dataset));
    }
    Ok(tenants)
}

/// One pipeline's figures.
struct Figures {
    name: &'static str,
    wall: f64,
    sink: SinkStats,
    meter: MeterReport,
    label: &'static str,
    /// What the process said about itself (the reference's `ru_maxrss`).
    self_reported_rss_mb: Option<f64>,
    ok: bool,
}

impl Figures {
    fn rows_per_s(&self) -> f64 {
        self.sink.rows as f64 / self.wall
    }

    fn sink_window(&self) -> f64 {
        match (self.sink.first_ack, self.sink.last_ack) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => f64::NAN,
        }
    }
}

async fn run_tenantsync(
    env: &TestEnv,
    sink: &Sink,
    admin: &sqlx::PgPool,
    p: &Params,
) -> Result<Figures> {
    sink.reset();
    let log = std::env::temp_dir().join(format!("bench-throughput-{}-worker.log", env.id));
    let extra: Vec<(String, String)> = [
        ("TENANTSYNC_WORKER_ID", "bench-worker".to_string()),
        ("TENANTSYNC_CONCURRENCY", p.concurrency.to_string()),
        ("TENANTSYNC_SOURCE_POOL", p.source_pool.to_string()),
        ("TENANTSYNC_CONTROL_POOL", p.control_pool.to_string()),
        ("TENANTSYNC_CHUNK_ROWS", p.chunk_rows.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let meter = Meter::start(admin.clone(), bench::env_dbs(env)).await;
    let t0 = Instant::now();
    let mut child = bench::tenantsync(env, &sink.host(), &["run", "--once"], &extra, &log)?;
    meter.watch("tenantsync worker", child.id());
    let ok = bench::wait_child(&mut child, Duration::from_secs(3600)).await?;
    let wall = t0.elapsed().as_secs_f64();
    let meter = meter.finish().await;
    if !ok {
        eprintln!(
            "tenantsync run --once failed; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    Ok(Figures {
        name: "tenantsync run --once",
        wall,
        sink: sink.stats(),
        meter,
        label: "tenantsync worker",
        self_reported_rss_mb: None,
        ok,
    })
}

async fn run_reference(
    env: &TestEnv,
    sink: &Sink,
    admin: &sqlx::PgPool,
    p: &Params,
    tenants: &[(i64, String)],
) -> Result<Figures> {
    sink.reset();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/reference/insert_rows.py");
    anyhow::ensure!(
        p.python.exists(),
        "{} is missing; run scripts/bench-env (make bench does) or set BENCH_REFERENCE=0",
        p.python.display()
    );
    let list: Vec<String> = tenants.iter().map(|(o, d)| format!("{o}:{d}")).collect();
    let meter = Meter::start(admin.clone(), bench::env_dbs(env)).await;
    let t0 = Instant::now();
    let mut child = std::process::Command::new(&p.python)
        .arg(&script)
        .env("SOURCE_DSN", &env.source_url)
        .env("SINK_URL", sink.url())
        .env("BQ_PROJECT", &env.project)
        .env("TABLE", TABLE)
        .env("TENANTS", list.join(","))
        .env("BATCH", "500")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start the reference pipeline")?;
    meter.watch("reference (python)", child.id());
    // Its output is one line at the end; pipes cannot fill up before that.
    let ok = bench::wait_child(&mut child, Duration::from_secs(7200)).await?;
    let wall = t0.elapsed().as_secs_f64();
    let meter = meter.finish().await;
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read;
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut out)?;
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_string(&mut err)?;
    }
    if !ok {
        eprintln!("reference pipeline failed:\n{out}\n{err}");
    }
    let report: serde_json::Value = out
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    if ok {
        println!("  reference reported: {report}");
    }
    Ok(Figures {
        name: "reference (psycopg + insert_rows_json)",
        wall,
        sink: sink.stats(),
        meter,
        label: "reference (python)",
        self_reported_rss_mb: report["maxrss_kb"].as_f64().map(|kb| kb / 1024.0),
        ok,
    })
}

fn print(f: &Figures, source_rows: i64) {
    let (cpu, rss) = f.meter.proc(f.label);
    println!("\n{}{}", f.name, if f.ok { "" } else { " (FAILED)" });
    println!(
        "  rows acknowledged {} of {} in {} requests ({:.0} bytes/row); {} calls besides insertAll",
        f.sink.rows,
        source_rows,
        f.sink.requests,
        f.sink.bytes as f64 / f.sink.rows.max(1) as f64,
        f.sink.other_calls
    );
    println!(
        "  wall {:.2} s (process start to exit) → {:.0} rows/s; first to last insertAll {:.2} s → {:.0} rows/s",
        f.wall,
        f.rows_per_s(),
        f.sink_window(),
        f.sink.rows as f64 / f.sink_window()
    );
    print!("  peak RSS {rss:.1} MB (VmHWM)");
    if let Some(r) = f.self_reported_rss_mb {
        print!(", {r:.1} MB (its ru_maxrss)");
    }
    println!(
        "; process CPU {cpu:.1} s = {:.0} µs/row",
        cpu * 1e6 / f.sink.rows.max(1) as f64
    );
    println!(
        "  Postgres backends {:.0} µs/row",
        f.meter.pg_backends_cpu * 1e6 / f.sink.rows.max(1) as f64
    );
    f.meter.print_cpu(f.name);
}

#[tokio::main]
async fn main() -> Result<()> {
    let p = Params::from_env()?;
    anyhow::ensure!(
        p.tenants > 0 && p.rows > 0,
        "BENCH_TENANTS and BENCH_ROWS must be positive"
    );
    bench::release_binary()?;
    let sink = Sink::start().await;
    let mut env = TestEnv::new().await?;
    env.endpoint = tenantsync_bigquery::Endpoint::emulator(&sink.host());
    println!(
        "throughput benchmark: {} rows over {} tenants, slice {} rows, concurrency {}, chunk {} rows; databases tstest_{}_*; sink on {}",
        p.rows, p.tenants, p.slice_rows, p.concurrency, p.chunk_rows, env.id, sink.host()
    );
    let result = run(&env, &sink, &p).await;
    if p.keep {
        println!("kept databases tstest_{}_ctl / _src", env.id);
    } else {
        env.cleanup().await?;
    }
    result
}

async fn run(env: &TestEnv, sink: &Sink, p: &Params) -> Result<()> {
    let t = Instant::now();
    create_source(env, p).await?;
    let tenants = register(env, p).await?;
    let (bytes,): (i64,) = sqlx::query_as(&format!("SELECT pg_total_relation_size('{TABLE}')"))
        .fetch_one(env.source_pool())
        .await?;
    println!(
        "source ready in {:.1} s: {TABLE} {:.0} MB with indexes",
        t.elapsed().as_secs_f64(),
        bytes as f64 / 1e6
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average before: {}", load.trim());
    let admin = tenantsync_store::connect(
        &std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?,
        1,
    )
    .await?;

    let ts = run_tenantsync(env, sink, &admin, p).await?;
    print(&ts, p.rows);
    let reference = if p.reference {
        let r = run_reference(env, sink, &admin, p, &tenants).await?;
        print(&r, p.rows);
        Some(r)
    } else {
        None
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("\nload average after: {}", load.trim());
    if let Some(r) = reference {
        let (_, ts_rss) = ts.meter.proc(ts.label);
        let (_, r_rss) = r.meter.proc(r.label);
        println!(
            "summary: tenantsync {:.0} rows/s, peak RSS {:.1} MB | reference {:.0} rows/s, peak RSS {:.1} MB | ratio {:.1}×",
            ts.rows_per_s(),
            ts_rss,
            r.rows_per_s(),
            r_rss,
            ts.rows_per_s() / r.rows_per_s()
        );
    }
    Ok(())
}

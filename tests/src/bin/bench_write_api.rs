//! Write methods benchmark (issue 15): the same source rows written once with insertAll and
//! once with the Storage Write API, back to back in one run, by the real `tenantsync run --once`
//! against zero-cost sinks: [`tenantsync_tests::sink`] (HTTP: insertAll, and every REST call of
//! both runs: datasets, tables, views) and [`tenantsync_tests::grpc_sink`] (gRPC:
//! CreateWriteStream, AppendRows, FinalizeWriteStream, BatchCommitWriteStreams,
//! GetWriteStream; every row decoded with its request's descriptor).
//!
//! Source: the throughput benchmark's wide table, twice with the same rows (`bench_events_ia`
//! written with insertAll, `bench_events_sw` with the Storage Write API; each table's
//! `write_api` set explicitly), `BENCH_ROWS` rows each over `BENCH_TENANTS` tenants. Run 1 has
//! only the insertAll table enabled, run 2 only the Storage Write table; the worker's
//! environment is otherwise the same.
//!
//! For each: rows/s (rows the sink acknowledged / process wall time), the worker's CPU seconds
//! per million rows (`/proc/<pid>/stat`), its peak RSS (VmHWM, polled every 100 ms), its
//! Postgres backends' CPU, and billable bytes per million rows: insertAll bills each row as
//! max(1 KB, its JSON size), from the rows the HTTP sink saw; the Storage Write API bills the
//! serialized rows, from the bytes the gRPC sink decoded. Benchmarks print figures and assert
//! nothing.
//!
//! Settings (environment): `BENCH_TENANTS` (8), `BENCH_ROWS` (500000 per method),
//! `BENCH_SLICE_ROWS` (20000), `BENCH_CONCURRENCY` (32), `BENCH_SOURCE_POOL` (8),
//! `BENCH_CONTROL_POOL` (4), `BENCH_CHUNK_ROWS` (500), `BENCH_KEEP=1` (keep the databases).

use anyhow::{Context, Result};
use std::time::{Duration, Instant};
use tenantsync_core::{Mode, WriteApi};
use tenantsync_store::control::NewTableSpec;
use tenantsync_tests::bench::{self, env_flag, env_num, Meter, MeterReport};
use tenantsync_tests::grpc_sink::{GrpcSink, GrpcSinkStats};
use tenantsync_tests::sink::{Sink, SinkStats};
use tenantsync_tests::TestEnv;
use tenantsync_worker::onboard;

const INSERT_ALL_TABLE: &str = "bench_events_ia";
const STORAGE_TABLE: &str = "bench_events_sw";
const LABEL: &str = "tenantsync worker";

struct Params {
    tenants: i64,
    rows: i64,
    slice_rows: i32,
    concurrency: usize,
    source_pool: u32,
    control_pool: u32,
    chunk_rows: usize,
    keep: bool,
}

impl Params {
    fn from_env() -> Result<Self> {
        Ok(Self {
            tenants: env_num("BENCH_TENANTS", 8)?,
            rows: env_num("BENCH_ROWS", 500_000)?,
            slice_rows: env_num("BENCH_SLICE_ROWS", 20_000)?,
            concurrency: env_num("BENCH_CONCURRENCY", 32)?,
            source_pool: env_num("BENCH_SOURCE_POOL", 8)?,
            control_pool: env_num("BENCH_CONTROL_POOL", 4)?,
            chunk_rows: env_num("BENCH_CHUNK_ROWS", 500)?,
            keep: env_flag("BENCH_KEEP", false),
        })
    }
}

/// The throughput benchmark's rows in `INSERT_ALL_TABLE`, and a copy of them in `STORAGE_TABLE`.
async fn create_source(env: &TestEnv, p: &Params) -> Result<()> {
    let pool = env.source_pool();
    let t = INSERT_ALL_TABLE;
    sqlx::raw_sql(&bench::wide_table_sql(t))
        .execute(pool)
        .await?;
    bench::fill_wide_table(pool, t, p.tenants, p.rows).await?;
    let s = STORAGE_TABLE;
    // One statement per call: VACUUM cannot run in the implicit transaction of a batch.
    for sql in [
        format!("CREATE TABLE {s} (LIKE {t} INCLUDING ALL)"),
        format!("INSERT INTO {s} SELECT * FROM {t}"),
        format!("VACUUM ANALYZE {t}"),
        format!("VACUUM ANALYZE {s}"),
    ] {
        sqlx::raw_sql(&sql).execute(pool).await?;
    }
    Ok(())
}

async fn register(env: &TestEnv, p: &Params) -> Result<()> {
    for (table, method) in [
        (INSERT_ALL_TABLE, WriteApi::InsertAll),
        (STORAGE_TABLE, WriteApi::Storage),
    ] {
        let spec = onboard::add_table(
            &env.control,
            &env.source,
            NewTableSpec {
                source_schema: "public".into(),
                source_table: table.into(),
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
        env.control.set_write_api(spec.id, Some(method)).await?;
    }
    for org in 1..=p.tenants {
        env.add_tenant(&format!("org{org}"), org).await?;
    }
    Ok(())
}

/// Only `table` is synced by the next run.
async fn enable_only(env: &TestEnv, table: &str) -> Result<()> {
    sqlx::query("UPDATE table_specs SET enabled = (source_table = $1)")
        .bind(table)
        .execute(env.control.pool())
        .await?;
    Ok(())
}

/// One method's figures.
struct Figures {
    name: &'static str,
    wall: f64,
    rows: u64,
    /// What BigQuery would bill for those rows.
    billable_bytes: u64,
    /// What was sent for them (request bodies; serialized rows).
    sent_bytes: u64,
    meter: MeterReport,
    detail: String,
    ok: bool,
}

impl Figures {
    fn per_million(&self, x: f64) -> f64 {
        x * 1e6 / self.rows.max(1) as f64
    }
}

struct Sinks {
    http: Sink,
    grpc: GrpcSink,
}

/// One `tenantsync run --once` with only `table` enabled.
async fn run_once(
    env: &TestEnv,
    sinks: &Sinks,
    admin: &sqlx::PgPool,
    p: &Params,
    table: &str,
    tag: &str,
) -> Result<(f64, MeterReport, bool, SinkStats, GrpcSinkStats)> {
    enable_only(env, table).await?;
    sinks.http.reset();
    sinks.grpc.reset();
    let log = std::env::temp_dir().join(format!("bench-write-api-{}-{tag}.log", env.id));
    let extra: Vec<(String, String)> = [
        ("TENANTSYNC_WORKER_ID", format!("bench-{tag}")),
        ("TENANTSYNC_CONCURRENCY", p.concurrency.to_string()),
        ("TENANTSYNC_SOURCE_POOL", p.source_pool.to_string()),
        ("TENANTSYNC_CONTROL_POOL", p.control_pool.to_string()),
        ("TENANTSYNC_CHUNK_ROWS", p.chunk_rows.to_string()),
        ("BIGQUERY_STORAGE_EMULATOR_HOST", sinks.grpc.host()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let meter = Meter::start(admin.clone(), bench::env_dbs(env)).await;
    let t0 = Instant::now();
    let mut child = bench::tenantsync(env, &sinks.http.host(), &["run", "--once"], &extra, &log)?;
    meter.watch(LABEL, child.id());
    let ok = bench::wait_child(&mut child, Duration::from_secs(1800)).await?;
    let wall = t0.elapsed().as_secs_f64();
    let meter = meter.finish().await;
    if !ok {
        eprintln!(
            "tenantsync run --once ({tag}) failed; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    Ok((wall, meter, ok, sinks.http.stats(), sinks.grpc.stats()))
}

async fn run_insert_all(
    env: &TestEnv,
    sinks: &Sinks,
    admin: &sqlx::PgPool,
    p: &Params,
) -> Result<Figures> {
    let (wall, meter, ok, h, g) =
        run_once(env, sinks, admin, p, INSERT_ALL_TABLE, "insertall").await?;
    Ok(Figures {
        name: "insertAll",
        wall,
        rows: h.rows,
        billable_bytes: h.billable_bytes,
        sent_bytes: h.bytes,
        meter,
        detail: format!(
            "{} insertAll requests, {:.0} body bytes/row, row JSON {:.0} bytes/row; \
             {} REST calls besides; {} rows reached the gRPC sink; {} bad bodies",
            h.requests,
            h.bytes as f64 / h.rows.max(1) as f64,
            h.row_json_bytes as f64 / h.rows.max(1) as f64,
            h.other_calls,
            g.rows,
            h.bad_requests
        ),
        ok,
    })
}

async fn run_storage(
    env: &TestEnv,
    sinks: &Sinks,
    admin: &sqlx::PgPool,
    p: &Params,
) -> Result<Figures> {
    let (wall, meter, ok, h, g) = run_once(env, sinks, admin, p, STORAGE_TABLE, "storage").await?;
    Ok(Figures {
        name: "Storage Write API",
        wall,
        rows: g.rows,
        billable_bytes: g.row_bytes,
        sent_bytes: g.row_bytes,
        meter,
        detail: format!(
            "{} appends ({:.0} rows each), {:.1} fields/row decoded; {} streams created, \
             {} finalized, {} commits of {} rows; {} bad rows, {} offset refusals; \
             {} REST calls, {} rows reached insertAll",
            g.appends,
            g.rows as f64 / g.appends.max(1) as f64,
            g.fields as f64 / g.rows.max(1) as f64,
            g.streams_created,
            g.finalized,
            g.commits,
            g.committed_rows,
            g.bad_rows,
            g.offset_refusals,
            h.other_calls,
            h.rows
        ),
        ok,
    })
}

fn print(f: &Figures, source_rows: i64) {
    let (cpu, rss) = f.meter.proc(LABEL);
    println!("\n{}{}", f.name, if f.ok { "" } else { " (FAILED)" });
    println!(
        "  rows acknowledged {} of {source_rows}; {}",
        f.rows, f.detail
    );
    println!(
        "  wall {:.2} s → {:.0} rows/s; worker CPU {:.1} s = {:.2} CPU s per million rows; \
         peak RSS {rss:.1} MB; its Postgres backends {:.2} CPU s per million rows",
        f.wall,
        f.rows as f64 / f.wall,
        cpu,
        f.per_million(cpu),
        f.per_million(f.meter.pg_backends_cpu)
    );
    println!(
        "  billable {:.0} MB per million rows ({:.0} bytes/row; {:.0} bytes/row sent)",
        f.per_million(f.billable_bytes as f64) / 1e6,
        f.billable_bytes as f64 / f.rows.max(1) as f64,
        f.sent_bytes as f64 / f.rows.max(1) as f64
    );
    f.meter.print_cpu(f.name);
}

fn uptime() -> String {
    std::process::Command::new("uptime")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> Result<()> {
    let p = Params::from_env()?;
    anyhow::ensure!(
        p.tenants > 0 && p.rows > 0,
        "BENCH_TENANTS and BENCH_ROWS must be positive"
    );
    bench::release_binary()?;
    let sinks = Sinks {
        http: Sink::start().await,
        grpc: GrpcSink::start().await,
    };
    let mut env = TestEnv::new().await?;
    env.endpoint = tenantsync_bigquery::Endpoint::emulator(&sinks.http.host())
        .with_storage_emulator(Some(&sinks.grpc.host()));
    println!(
        "write methods benchmark: {} rows per method over {} tenants, slice {} rows, concurrency {}, chunk {} rows; databases tstest_{}_*; HTTP sink on {}, gRPC sink on {}",
        p.rows, p.tenants, p.slice_rows, p.concurrency, p.chunk_rows, env.id,
        sinks.http.host(), sinks.grpc.host()
    );
    let result = run(&env, &sinks, &p).await;
    if p.keep {
        println!("kept databases tstest_{}_ctl / _src", env.id);
    } else {
        env.cleanup().await?;
    }
    result
}

async fn run(env: &TestEnv, sinks: &Sinks, p: &Params) -> Result<()> {
    let t = Instant::now();
    create_source(env, p).await?;
    register(env, p).await?;
    println!(
        "source ready in {:.1} s ({} rows in each of {INSERT_ALL_TABLE}, {STORAGE_TABLE})",
        t.elapsed().as_secs_f64(),
        p.rows
    );
    let admin = tenantsync_store::connect(
        &std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?,
        1,
    )
    .await?;

    println!("uptime before: {}", uptime());
    let ia = run_insert_all(env, sinks, &admin, p).await?;
    print(&ia, p.rows);
    println!("\nuptime between: {}", uptime());
    let sw = run_storage(env, sinks, &admin, p).await?;
    print(&sw, p.rows);
    println!("\nuptime after: {}", uptime());

    let (ia_cpu, ia_rss) = ia.meter.proc(LABEL);
    let (sw_cpu, sw_rss) = sw.meter.proc(LABEL);
    println!("\n| method | rows/s | worker CPU s per million rows | peak RSS MB | billable MB per million rows |");
    println!("|---|---|---|---|---|");
    for (f, cpu, rss) in [(&ia, ia_cpu, ia_rss), (&sw, sw_cpu, sw_rss)] {
        println!(
            "| {} | {:.0} | {:.2} | {:.1} | {:.0} |",
            f.name,
            f.rows as f64 / f.wall,
            f.per_million(cpu),
            rss,
            f.per_million(f.billable_bytes as f64) / 1e6
        );
    }
    Ok(())
}

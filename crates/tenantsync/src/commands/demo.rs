//! `tenantsync demo`: the real thing on local services with a demo data set.

use super::status::status;
use super::{control, leases, shutdown_on_signal, source, worker_on};
use crate::cli::{DemoArgs, ListArgs};
use crate::config;
use anyhow::{Context, Result};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tenantsync_bigquery::{BigQuery, Credentials};
use tenantsync_core::Mode;
use tenantsync_store::control::NewTableSpec;
use tenantsync_worker::onboard::{self, TenantRequest};
use tenantsync_worker::RunMode;
use tokio_util::sync::CancellationToken;

pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    let control = control().await?;
    tenantsync_store::migrate(control.pool()).await?;
    let source = source().await?;
    tenantsync_demo::install_schema(source.pool()).await?;
    let orgs: Vec<i64> = (1..=args.orgs).collect();
    tenantsync_demo::seed(source.pool(), &orgs, 200).await?;
    println!("demo source ready: {} organizations", orgs.len());

    let registered = control.tables().await?;
    for (table, tenant_column) in tenantsync_demo::TABLES {
        if registered.iter().any(|s| s.source_table == table) {
            continue;
        }
        onboard::add_table(
            &control,
            &source,
            NewTableSpec {
                source_schema: "public".into(),
                source_table: table.into(),
                key_columns: vec![],
                cursor_column: "updated_at".into(),
                tenant_column: tenant_column.into(),
                mode: Mode::Latest,
                sync_interval_ms: 500,
                slice_rows: 20_000,
                soft_delete_column: None,
                capture: Default::default(),
                exclude_columns: Vec::new(),
                hash_columns: Vec::new(),
            },
        )
        .await?;
        println!("registered table {table}");
    }
    let endpoint = config::endpoint()?;
    let project = std::env::var("BIGQUERY_PROJECT").unwrap_or_else(|_| "tenantsync-local".into());
    let existing = control.tenants().await?;
    let master_key = config::master_key()?;
    for org in &orgs {
        let slug = format!("ngo-{org}");
        if existing.iter().any(|t| t.slug == slug) {
            continue;
        }
        onboard::add_tenant(
            &control,
            &source,
            &master_key,
            &endpoint,
            TenantRequest {
                slug: slug.clone(),
                organization_id: org.to_string(),
                project: project.clone(),
                dataset: format!("ngo_{org}"),
                location: Some(crate::config::default_location()?),
                credentials: None,
                impersonate: None,
            },
        )
        .await
        .with_context(|| format!("onboarding {slug}"))?;
        println!("onboarded tenant {slug} -> dataset {project}.ngo_{org}");
    }

    if args.backfill > 0 {
        let n = tenantsync_demo::backfill(source.pool(), &orgs, args.backfill).await?;
        println!("wrote a backlog of {n} messages");
    }
    let synced_before: i64 = control.status().await?.iter().map(|r| r.rows_synced).sum();
    let backlog_at = chrono::Utc::now();
    let shutdown = shutdown_on_signal();
    let w = worker_on(control.clone(), source.clone(), leases().await?)?;
    let worker_stop = CancellationToken::new();
    let health = std::sync::Arc::new(tenantsync_coordinator::Health::default());
    let (metrics_at, _http) = crate::http::serve(
        config::metrics_addr()?,
        crate::http::install_recorder()?,
        control.clone(),
        w.deps().leases.clone(),
        Some(health.clone()),
        shutdown.clone(),
    )
    .await?;
    println!("metrics on http://{metrics_at}/metrics");
    let coordinator = tokio::spawn(tenantsync_coordinator::run_with_health(
        config::coordinator()?,
        tenantsync_coordinator::Deps {
            control: control.clone(),
            source: source.clone(),
            leases: w.deps().leases.clone(),
        },
        health,
        worker_stop.clone(),
    ));
    let sync = tokio::spawn(tenantsync_worker::run(
        w.clone(),
        RunMode::Pool,
        worker_stop.clone(),
    ));
    let duration = args.seconds.map(Duration::from_secs);
    println!(
        "generating ~{} changes/s{}; syncing (Ctrl-C to stop)",
        args.rate,
        duration.map_or(String::new(), |d| format!(" for {}s", d.as_secs()))
    );
    let t0 = Instant::now();
    {
        // Time the backlog alone: until every task is confirmed past the moment it was written.
        let control = control.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Ok(Some(t)) = control.oldest_synced_through().await {
                    if t >= backlog_at {
                        let secs = t0.elapsed().as_secs_f64();
                        let rows: i64 = control
                            .status()
                            .await
                            .map(|r| r.iter().map(|r| r.rows_synced).sum())
                            .unwrap_or(0)
                            - synced_before;
                        println!(
                            "caught up with the backlog: {rows} rows in {secs:.1}s = {:.0} rows/s",
                            rows as f64 / secs
                        );
                        return;
                    }
                }
            }
        });
    }
    let mut generator =
        tenantsync_demo::Generator::new(source.pool().clone(), orgs.clone(), 42).await?;
    let printer = {
        let control = control.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stop.cancelled() => break,
                }
                if let Ok(rows) = control.status().await {
                    let synced: i64 = rows.iter().map(|r| r.rows_synced).sum();
                    let max_lag = rows
                        .iter()
                        .filter_map(|r| r.lag_seconds)
                        .fold(0.0, f64::max);
                    println!(
                        "[{:>4.0}s] rows synced {synced}, max lag {max_lag:.1}s",
                        t0.elapsed().as_secs_f64()
                    );
                }
            }
        })
    };
    generator
        .run_for(args.rate, duration, shutdown.cancelled())
        .await?;
    let written = generator.written;
    println!("generator stopped after {written} changes; draining");
    worker_stop.cancel();
    sync.await.context("sync loop panicked")??;
    coordinator.await.context("coordinator panicked")?;
    let drained = tenantsync_worker::run(w, RunMode::Once, shutdown.clone()).await?;
    shutdown.cancel();
    let _ = printer.await;
    let secs = t0.elapsed().as_secs_f64();

    println!();
    status(&control, &ListArgs { json: false }).await?;
    let rows = control.status().await?;
    let synced: i64 = rows.iter().map(|r| r.rows_synced).sum::<i64>() - synced_before;
    println!(
        "\n{synced} row versions synced by this run in {secs:.1}s: {:.0} rows/s, with the generator at ~{} changes/s \
         (the local BigQuery emulator takes ~4-7k rows/s)",
        synced as f64 / secs,
        args.rate
    );

    // Compare what the tenants see in BigQuery with Postgres.
    println!("\nPostgres vs BigQuery `<table>_latest`, per tenant:");
    let mut ok = drained.failed.is_empty();
    for t in control.tenants().await? {
        let bq = BigQuery::new(
            &endpoint,
            &t.bq_project,
            &t.bq_dataset,
            &Credentials::Emulator,
            Duration::from_secs(60),
        )
        .await?;
        for (table, tenant_column) in tenantsync_demo::TABLES {
            let pg: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {table} WHERE {tenant_column} = $1::bigint"
            ))
            .bind(&t.organization_id)
            .fetch_one(source.pool())
            .await?;
            let got = bq
                .query(&format!(
                    "SELECT COUNT(*) FROM {}",
                    bq.qualified(&format!("{table}_latest"))
                ))
                .await?;
            let n: i64 = got
                .first()
                .and_then(|r| r.first())
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse().ok())
                .unwrap_or(-1);
            let mark = if n == pg { "ok" } else { "MISMATCH" };
            ok &= n == pg;
            println!(
                "  {:<8} {:<14} postgres {pg:>7}  bigquery {n:>7}  {mark}",
                t.slug, table
            );
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

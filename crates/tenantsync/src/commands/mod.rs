//! Subcommand implementations: each builds what it needs from the configuration and calls
//! into the library crates.

mod admin;
mod demo;
mod source;
mod verify;

use crate::cli::{Cli, Command, ListArgs, RunArgs, TablesCmd, TenantCmd};
use crate::config;
use anyhow::{Context, Result};
use secrecy::SecretString;
use std::process::ExitCode;
use std::sync::Arc;
use tenantsync_admin::cli_actor;
use tenantsync_lease::Leases;
use tenantsync_store::control::NewTableSpec;
use tenantsync_store::{ControlPlane, SourceReader};
use tenantsync_worker::onboard::{self, TenantRequest};
use tenantsync_worker::{Deps, RunMode, Worker};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub async fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Migrate => {
            let pool = tenantsync_store::connect(&config::database_url()?, 2).await?;
            tenantsync_store::migrate(&pool).await?;
            println!("control plane migrated");
        }
        Command::Tenant(TenantCmd::Add(a)) => {
            let control = control().await?;
            let credentials = match &a.credentials_file {
                Some(path) => Some(SecretString::from(
                    std::fs::read_to_string(path).with_context(|| {
                        format!("cannot read credentials file {}", path.display())
                    })?,
                )),
                None => None,
            };
            let t = onboard::add_tenant(
                &control,
                &source().await?,
                &config::master_key()?,
                &config::endpoint()?,
                TenantRequest {
                    slug: a.slug,
                    organization_id: a.organization_id,
                    project: a.project,
                    dataset: a.dataset,
                    credentials,
                },
            )
            .await?;
            control
                .audit(
                    &cli_actor(),
                    "tenant.add",
                    Some(&t.slug),
                    serde_json::json!({
                        "organization_id": t.organization_id,
                        "dataset": format!("{}.{}", t.bq_project, t.bq_dataset),
                        "key": t.has_credentials,
                    }),
                )
                .await?;
            println!(
                "tenant {} added (organization {}, dataset {}.{}); its backfill starts with the next worker tick",
                t.slug, t.organization_id, t.bq_project, t.bq_dataset
            );
        }
        Command::Tenant(TenantCmd::RotateCredentials(a)) => {
            let json = SecretString::from(
                std::fs::read_to_string(&a.credentials_file).with_context(|| {
                    format!(
                        "cannot read credentials file {}",
                        a.credentials_file.display()
                    )
                })?,
            );
            let mut admin = tenantsync_admin::Admin::new(control().await?, config::endpoint()?);
            admin.master_key = Some(Arc::new(config::master_key()?));
            let t = admin
                .rotate_credentials(&cli_actor(), &a.slug, json)
                .await?;
            println!("tenant {}: new key stored, status {}", t.slug, t.status);
        }
        Command::Tenant(TenantCmd::Limits(a)) => {
            for (flag, v) in [
                ("--requests-per-second", a.requests_per_second),
                ("--rows-per-second", a.rows_per_second),
            ] {
                if v.is_some_and(|v| !(v > 0.0 && v.is_finite())) {
                    anyhow::bail!("{flag} must be a positive number");
                }
            }
            let control = control().await?;
            let t = control
                .set_tenant_limits(&a.slug, a.requests_per_second, a.rows_per_second)
                .await?;
            control
                .audit(
                    &cli_actor(),
                    "tenant.limits",
                    Some(&t.slug),
                    serde_json::json!({
                        "requests_per_s": t.max_requests_per_s,
                        "rows_per_s": t.max_rows_per_s,
                    }),
                )
                .await?;
            let show = |v: Option<f64>| v.map_or("default".to_string(), |v| v.to_string());
            println!(
                "tenant {}: {} requests/s, {} rows/s",
                t.slug,
                show(t.max_requests_per_s),
                show(t.max_rows_per_s)
            );
        }
        Command::Tenant(TenantCmd::List(l)) => {
            let tenants = control().await?.tenants().await?;
            print_list(
                &l,
                &tenants,
                &["SLUG", "ORG", "PROJECT", "DATASET", "STATUS", "KEY"],
                |t| {
                    vec![
                        t.slug.clone(),
                        t.organization_id.clone(),
                        t.bq_project.clone(),
                        t.bq_dataset.clone(),
                        t.status.to_string(),
                        if t.has_credentials {
                            "sealed".into()
                        } else {
                            "emulator".into()
                        },
                    ]
                },
            )?;
        }
        Command::Tables(TablesCmd::Add(a)) => {
            let control = control().await?;
            let source = source().await?;
            let spec = onboard::add_table(
                &control,
                &source,
                NewTableSpec {
                    source_schema: a.schema,
                    source_table: a.table,
                    key_columns: a.key,
                    cursor_column: a.cursor,
                    tenant_column: a.tenant_column,
                    mode: a.mode.parse().map_err(anyhow::Error::msg)?,
                    sync_interval_ms: a.interval_ms,
                    slice_rows: a.slice_rows,
                    soft_delete_column: a.soft_delete,
                    capture: a.capture.parse().map_err(anyhow::Error::msg)?,
                },
            )
            .await?;
            control
                .audit(
                    &cli_actor(),
                    "table.add",
                    Some(&format!("{}.{}", spec.source_schema, spec.source_table)),
                    serde_json::json!({"mode": spec.mode.to_string(), "tenant_column": spec.tenant_column,
                                       "soft_delete_column": spec.soft_delete_column,
                                       "capture": spec.capture.to_string()}),
                )
                .await?;
            let capture = match spec.capture {
                tenantsync_core::Capture::Cursor => format!("cursor {}", spec.cursor_column),
                tenantsync_core::Capture::Changelog => "changelog capture".to_string(),
            };
            println!(
                "table {}.{} registered (key {}, {capture}, tenant column {}, mode {})",
                spec.source_schema,
                spec.source_table,
                spec.key_columns.join(","),
                spec.tenant_column,
                spec.mode
            );
        }
        Command::Tables(TablesCmd::List(l)) => {
            let tables = control().await?.tables().await?;
            print_list(
                &l,
                &tables,
                &[
                    "TABLE",
                    "KEY",
                    "CAPTURE",
                    "TENANT COLUMN",
                    "MODE",
                    "ENABLED",
                ],
                |s| {
                    vec![
                        format!("{}.{}", s.source_schema, s.source_table),
                        s.key_columns.join(","),
                        match s.capture {
                            tenantsync_core::Capture::Cursor => {
                                format!("cursor {}", s.cursor_column)
                            }
                            tenantsync_core::Capture::Changelog => "changelog".to_string(),
                        },
                        s.tenant_column.clone(),
                        s.mode.to_string(),
                        s.enabled.to_string(),
                    ]
                },
            )?;
        }
        Command::Run(r) => return run(r).await,
        Command::Coordinator => return serve(true, false).await,
        Command::Worker => return serve(false, true).await,
        Command::Status(s) => {
            let tasks = admin::status_rows(&s).await?;
            let pool = pool_status().await?;
            if s.json {
                // One document, so `status --json | jq` and JSON parsers read all of it.
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"tasks": tasks, "pool": pool})
                    )?
                );
            } else {
                admin::print_tasks(false, &tasks)?;
                if let Some(p) = pool {
                    println!(
                        "\nworkers live: {} {:?}\nleader: {}\nqueue depth per shard: {:?}",
                        p.workers.len(),
                        p.workers,
                        p.leader.as_deref().unwrap_or("none"),
                        p.queue_depth
                    );
                }
            }
        }
        Command::Tenant(TenantCmd::Show { slug, json }) => admin::show(&slug, json).await?,
        Command::Tenant(TenantCmd::Pause { slug, reason }) => {
            admin::pause(&slug, reason.as_deref()).await?
        }
        Command::Tenant(TenantCmd::Resume { slug }) => admin::resume(&slug).await?,
        Command::Tenant(TenantCmd::Remove(r)) => admin::remove(r).await?,
        Command::Tables(TablesCmd::Enable(s)) => admin::set_table(s, true).await?,
        Command::Tables(TablesCmd::Disable(s)) => admin::set_table(s, false).await?,
        Command::Keys(cmd) => return admin::keys(cmd).await,
        Command::Tokens(cmd) => admin::tokens(cmd).await?,
        Command::Audit(a) => admin::audit(a).await?,
        Command::AdminApi => return admin::serve_api().await,
        Command::Demo(d) => return demo::run(d).await,
        Command::Source(cmd) => source::run(cmd).await?,
        Command::Dlq(cmd) => return dlq(cmd).await,
        Command::Verify(v) => return verify::verify(v).await,
        Command::Resync(r) => return verify::resync(r).await,
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn control() -> Result<ControlPlane> {
    let pool = tenantsync_store::connect(
        &config::database_url()?,
        config::pool_size("TENANTSYNC_CONTROL_POOL", 8)?,
    )
    .await
    .context("cannot connect to the control-plane database (DATABASE_URL)")?;
    Ok(ControlPlane::new(pool))
}

pub(crate) async fn source() -> Result<SourceReader> {
    let pool = tenantsync_store::connect(
        &config::source_database_url()?,
        config::pool_size("TENANTSYNC_SOURCE_POOL", 16)?,
    )
    .await
    .context("cannot connect to the source database (SOURCE_DATABASE_URL)")?;
    Ok(SourceReader::new(pool))
}

pub(crate) async fn leases() -> Result<Leases> {
    Leases::connect(&config::redis_url()?, &config::redis_prefix())
        .await
        .context("cannot connect to Redis (REDIS_URL)")
}

pub(crate) async fn worker() -> Result<Arc<Worker>> {
    worker_on(control().await?, source().await?, leases().await?)
}

/// A worker on existing pools (one process shares its pools between its roles).
pub(crate) fn worker_on(
    control: ControlPlane,
    source: SourceReader,
    leases: Leases,
) -> Result<Arc<Worker>> {
    let deps = Deps {
        control,
        source,
        leases,
        master_key: Arc::new(config::master_key()?),
    };
    Ok(Arc::new(Worker::new(config::worker()?, deps)))
}

/// A token cancelled by SIGINT or SIGTERM.
pub(crate) fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        info!("shutdown requested; finishing slices in flight");
        t.cancel();
    });
    token
}

async fn run(args: RunArgs) -> Result<ExitCode> {
    if !args.once {
        return serve(true, true).await;
    }
    let worker = worker().await?;
    let shutdown = shutdown_on_signal();
    let started = std::time::Instant::now();
    let summary = with_grace(
        tenantsync_worker::run(worker, RunMode::Once, shutdown.clone()),
        &shutdown,
    )
    .await??;
    let secs = started.elapsed().as_secs_f64();
    info!(
        rows = summary.rows,
        slices = summary.slices,
        seconds = secs,
        rows_per_second = summary.rows as f64 / secs.max(1e-9),
        "caught up"
    );
    if summary.failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for (task, e) in &summary.failed {
            eprintln!("task {task} failed: {e}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// Await `fut`, but give up `TENANTSYNC_SHUTDOWN_GRACE_MS` after shutdown was requested.
async fn with_grace<T>(
    fut: impl std::future::Future<Output = T>,
    shutdown: &CancellationToken,
) -> Result<T> {
    let grace = config::shutdown_grace()?;
    tokio::select! {
        r = fut => Ok(r),
        _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            anyhow::bail!("shutdown grace period ({} ms) over with work in flight; exiting", grace.as_millis())
        }
    }
}

/// Run the coordinator and/or a pool worker until SIGINT/SIGTERM.
pub(crate) async fn serve(coordinator: bool, pool_worker: bool) -> Result<ExitCode> {
    let shutdown = shutdown_on_signal();
    let handle = crate::http::install_recorder()?;
    // One pool per database for the whole process, shared by its roles.
    let (control, source, leases) = (control().await?, source().await?, leases().await?);
    // Stopped after the roles have drained, so probes answer during shutdown.
    let http_stop = CancellationToken::new();
    let health = coordinator.then(|| Arc::new(tenantsync_coordinator::Health::default()));
    let (_, http) = crate::http::serve(
        config::metrics_addr()?,
        handle,
        control.clone(),
        leases.clone(),
        health.clone(),
        http_stop.clone(),
    )
    .await?;
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(health) = health {
        let cfg = config::coordinator()?;
        let deps = tenantsync_coordinator::Deps {
            control: control.clone(),
            source: source.clone(),
            leases: leases.clone(),
        };
        let sd = shutdown.clone();
        tasks.spawn(async move {
            tenantsync_coordinator::run_with_health(cfg, deps, health, sd).await;
            Ok(())
        });
    }
    if pool_worker {
        let w = worker_on(control, source, leases)?;
        let sd = shutdown.clone();
        tasks.spawn(async move {
            tenantsync_worker::run(w, RunMode::Pool, sd)
                .await
                .map(|_| ())
        });
    }
    let all = async {
        while let Some(r) = tasks.join_next().await {
            r.context("role panicked")??;
        }
        Ok::<(), anyhow::Error>(())
    };
    with_grace(all, &shutdown).await??;
    http_stop.cancel();
    let _ = http.await;
    Ok(ExitCode::SUCCESS)
}

/// Live workers, leader and queue depth per shard.
#[derive(serde::Serialize)]
struct PoolStatus {
    workers: Vec<String>,
    leader: Option<String>,
    queue_depth: Vec<u64>,
}

/// The worker pool as Redis sees it, when Redis is configured.
async fn pool_status() -> Result<Option<PoolStatus>> {
    let Ok(url) = config::redis_url() else {
        return Ok(None);
    };
    let leases = Leases::connect(&url, &config::redis_prefix()).await?;
    Ok(Some(PoolStatus {
        workers: leases.live_workers().await?,
        leader: leases.leader().await?,
        queue_depth: leases.queue_depths(config::shards()?).await?,
    }))
}

pub(crate) async fn status(control: &ControlPlane, l: &ListArgs) -> Result<()> {
    let rows = control.status().await?;
    print_list(
        l,
        &rows,
        &[
            "TENANT",
            "STATUS",
            "TABLE",
            "ROWS",
            "LAG",
            "SYNCED THROUGH",
            "LAST ERROR",
        ],
        |r| {
            vec![
                r.tenant.clone(),
                r.tenant_status.clone(),
                r.table.clone(),
                r.rows_synced.to_string(),
                r.lag_seconds
                    .map_or("never synced".into(), |l| format!("{l:.1}s")),
                r.synced_through.map_or("-".into(), |t| {
                    t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
                }),
                r.last_error
                    .clone()
                    .unwrap_or_default()
                    .chars()
                    .take(80)
                    .collect(),
            ]
        },
    )
}

/// Open dead letters selected by ids, or all of a tenant's.
async fn select_dead_letters(
    control: &ControlPlane,
    ids: &[i64],
    tenant: Option<&str>,
) -> Result<Vec<tenantsync_store::control::dead_letters::DeadLetter>> {
    anyhow::ensure!(
        !ids.is_empty() || tenant.is_some(),
        "name dead-letter ids or --tenant"
    );
    let open = control.dead_letters(tenant, Some("open")).await?;
    let picked: Vec<_> = open
        .into_iter()
        .filter(|d| ids.is_empty() || ids.contains(&d.id))
        .collect();
    for id in ids {
        anyhow::ensure!(
            picked.iter().any(|d| d.id == *id),
            "dead letter {id} does not exist or is not open"
        );
    }
    Ok(picked)
}

async fn dlq(cmd: crate::cli::DlqCmd) -> Result<ExitCode> {
    use crate::cli::DlqCmd;
    let control = control().await?;
    match cmd {
        DlqCmd::List { tenant, all, json } => {
            let rows = control
                .dead_letters(tenant.as_deref(), if all { None } else { Some("open") })
                .await?;
            print_list(
                &ListArgs { json },
                &rows,
                &["ID", "TENANT", "TABLE", "KEY", "STATUS", "REASON"],
                |d| {
                    vec![
                        d.id.to_string(),
                        d.tenant.clone(),
                        d.table.clone(),
                        d.key.join(","),
                        d.status.clone(),
                        d.reason.chars().take(100).collect(),
                    ]
                },
            )?;
        }
        DlqCmd::Discard { ids, tenant } => {
            let picked = select_dead_letters(&control, &ids, tenant.as_deref()).await?;
            for d in &picked {
                control.resolve_dead_letter(d.id, "discarded", None).await?;
            }
            control
                .audit(
                    &cli_actor(),
                    "dlq.discard",
                    tenant.as_deref(),
                    serde_json::json!({"ids": picked.iter().map(|d| d.id).collect::<Vec<_>>()}),
                )
                .await?;
            println!("discarded {} dead letter(s)", picked.len());
        }
        DlqCmd::Retry { ids, tenant } => {
            let picked = select_dead_letters(&control, &ids, tenant.as_deref()).await?;
            let w = worker().await?;
            let (mut ok, mut failed) = (0, 0);
            for d in &picked {
                match w.resend_dead_letter(d).await {
                    Ok(()) => {
                        control.resolve_dead_letter(d.id, "retried", None).await?;
                        ok += 1;
                    }
                    Err(e) => {
                        control
                            .note_dead_letter(d.id, &format!("retry failed: {e}"))
                            .await?;
                        failed += 1;
                    }
                }
            }
            control
                .audit(
                    &cli_actor(),
                    "dlq.retry",
                    tenant.as_deref(),
                    serde_json::json!({"retried": ok, "refused": failed}),
                )
                .await?;
            println!("retried {ok} dead letter(s); {failed} refused again (still open)");
            if failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Print rows as JSON or as an aligned table.
fn print_list<T: serde::Serialize>(
    l: &ListArgs,
    items: &[T],
    header: &[&str],
    cells: impl Fn(&T) -> Vec<String>,
) -> Result<()> {
    if l.json {
        println!("{}", serde_json::to_string_pretty(items)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items.iter().map(cells).collect();
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(header.iter().map(|h| h.to_string()).collect()));
    for r in rows {
        println!("{}", line(r));
    }
    Ok(())
}

//! Long-running roles: `run` (all in one, or `--once`), `coordinator`, `worker`, and how they
//! shut down (SIGINT/SIGTERM, then a grace period for the slices in flight).

use super::{control, leases, source, worker, worker_on};
use crate::cli::RunArgs;
use crate::config;
use anyhow::{Context, Result};
use std::process::ExitCode;
use std::sync::Arc;
use tenantsync_worker::RunMode;
use tokio_util::sync::CancellationToken;
use tracing::info;

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

pub(crate) async fn run(args: RunArgs) -> Result<ExitCode> {
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

//! `/metrics` (Prometheus), `/healthz` (liveness: the process answers) and `/readyz`
//! (readiness: the control plane and Redis answer, and a coordinator's ticks work) for
//! coordinators and workers.

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tenantsync_lease::Leases;
use tenantsync_store::ControlPlane;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Install the Prometheus recorder and describe every metric (each bounded series at zero).
pub fn install_recorder() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(tenantsync_worker::metrics::INSERT_DURATION.to_string()),
            &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
        )
        .context("histogram buckets")?
        // Buckets rather than the exporter's default summary, so batch sizes from many
        // workers can be summed on the dashboard (summaries' quantiles do not aggregate).
        .set_buckets_for_metric(
            Matcher::Full(tenantsync_worker::metrics::CONTROL_BATCH.to_string()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
        )
        .context("histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    tenantsync_worker::metrics::describe();
    tenantsync_coordinator::metrics::describe();
    Ok(handle)
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    control: ControlPlane,
    leases: Leases,
    coordinator: Option<Arc<tenantsync_coordinator::Health>>,
}

async fn metrics(State(s): State<AppState>) -> String {
    s.metrics.render()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    let db = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(s.control.pool()),
    )
    .await;
    if !matches!(db, Ok(Ok(1))) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "control-plane database unreachable".into(),
        );
    }
    let redis = tokio::time::timeout(Duration::from_secs(2), s.leases.live_workers()).await;
    if !matches!(redis, Ok(Ok(_))) {
        return (StatusCode::SERVICE_UNAVAILABLE, "redis unreachable".into());
    }
    if let Some(why) = s.coordinator.as_ref().and_then(|h| h.unready()) {
        return (StatusCode::SERVICE_UNAVAILABLE, why);
    }
    (StatusCode::OK, "ready".into())
}

/// Serve until `shutdown`. Returns the bound address (useful with port 0). `coordinator`: the
/// health of this process' coordinator role, if it runs one.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    control: ControlPlane,
    leases: Leases,
    coordinator: Option<Arc<tenantsync_coordinator::Health>>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            metrics: handle,
            control,
            leases,
            coordinator,
        });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (TENANTSYNC_METRICS_ADDR)"))?;
    let bound = listener.local_addr()?;
    info!(addr = %bound, "serving /metrics, /healthz, /readyz");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((bound, task))
}

//! The admin HTTP API: the CLI's admin operations behind bearer-token auth, with an OpenAPI
//! document at `/openapi.json` (hand-written: `openapi.json`, checked against the routes by a
//! unit test). Every mutation is written to the audit log under the token's name.

use crate::{Admin, AdminError, DataChoice};
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The OpenAPI 3 document served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Who called: the name of the token presented.
#[derive(Clone)]
struct Actor(String);

/// An error as the API answers it: a status and `{"error": "..."}`.
pub struct ApiError(StatusCode, String);

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            warn!(error = %e, "admin api request failed");
        }
        Self(status, e.to_string())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self(StatusCode::BAD_REQUEST, e.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

fn unauthorized(why: &str) -> Response {
    let mut r = (
        StatusCode::UNAUTHORIZED,
        Json(serde_json::json!({ "error": why })),
    )
        .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"tenantsync\""),
    );
    r
}

/// Bearer-token check in front of every `/v1` route: a missing, malformed, unknown or revoked
/// token gets 401 before any handler runs.
async fn auth(State(admin): State<Arc<Admin>>, mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = presented else {
        return unauthorized("missing bearer token (Authorization: Bearer <token>)");
    };
    match admin.authenticate(token).await {
        Ok(Some(name)) => {
            req.extensions_mut().insert(Actor(format!("api:{name}")));
            next.run(req).await
        }
        Ok(None) => {
            warn!(path = %req.uri().path(), "admin api: rejected token");
            unauthorized("invalid or revoked token")
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

pub fn router(admin: Arc<Admin>) -> Router {
    let v1 = Router::new()
        .route("/tenants", get(tenants))
        .route("/tenants/{slug}", get(tenant).delete(remove))
        .route("/tenants/{slug}/pause", post(pause))
        .route("/tenants/{slug}/resume", post(resume))
        .route("/tenants/{slug}/credentials", put(rotate_credentials))
        .route("/tenants/{slug}/tables/{table}/enable", post(enable))
        .route("/tenants/{slug}/tables/{table}/disable", post(disable))
        .route("/status", get(status))
        .route("/runs", get(runs))
        .route("/dlq", get(dlq))
        .route("/audit", get(audit))
        .route("/keys/rotate", post(rotate_keys))
        .route_layer(axum::middleware::from_fn_with_state(admin.clone(), auth));
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok" }))
        .nest("/v1", v1)
        .with_state(admin)
}

/// Serve the API on `addr` until `shutdown`; returns the bound address (port 0 picks one).
pub async fn serve(
    admin: Arc<Admin>,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!(addr = %bound, "serving admin api");
    let app = router(admin);
    let handle = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    });
    Ok((bound, handle))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn tenants(State(a): State<Arc<Admin>>) -> ApiResult<Vec<tenantsync_core::Tenant>> {
    Ok(Json(a.tenants().await?))
}

async fn tenant(
    State(a): State<Arc<Admin>>,
    Path(slug): Path<String>,
) -> ApiResult<crate::TenantDetail> {
    Ok(Json(a.tenant_detail(&slug).await?))
}

#[derive(Deserialize)]
struct RemoveQuery {
    data: Option<String>,
}

async fn remove(
    State(a): State<Arc<Admin>>,
    Extension(Actor(who)): Extension<Actor>,
    Path(slug): Path<String>,
    q: Result<Query<RemoveQuery>, QueryRejection>,
) -> ApiResult<serde_json::Value> {
    let choice = match q?.0.data.as_deref() {
        Some("keep") => DataChoice::Keep,
        Some("drop") => DataChoice::Drop,
        _ => {
            return Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                "say what happens to the tenant's BigQuery dataset: ?data=keep or ?data=drop"
                    .into(),
            ))
        }
    };
    a.remove(&who, &slug, choice).await?;
    Ok(Json(serde_json::json!({ "removed": slug, "data": choice })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    reason: Option<String>,
}

async fn pause(
    State(a): State<Arc<Admin>>,
    Extension(Actor(who)): Extension<Actor>,
    Path(slug): Path<String>,
    body: Bytes,
) -> ApiResult<tenantsync_core::Tenant> {
    let body: PauseBody = if body.iter().all(u8::is_ascii_whitespace) {
        PauseBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("body must be {{\"reason\": \"...\"}} or empty: {e}"),
            )
        })?
    };
    Ok(Json(a.pause(&who, &slug, body.reason.as_deref()).await?))
}

async fn resume(
    State(a): State<Arc<Admin>>,
    Extension(Actor(who)): Extension<Actor>,
    Path(slug): Path<String>,
) -> ApiResult<tenantsync_core::Tenant> {
    Ok(Json(a.resume(&who, &slug).await?))
}

/// The body is the new service-account key JSON, checked like onboarding does before it is
/// stored; it is never echoed back or logged.
async fn rotate_credentials(
    State(a): State<Arc<Admin>>,
    Extension(Actor(who)): Extension<Actor>,
    Path(slug): Path<String>,
    body: Bytes,
) -> ApiResult<tenantsync_core::Tenant> {
    let json = String::from_utf8(body.to_vec()).map_err(|_| {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "service-account key must be UTF-8 JSON".into(),
        )
    })?;
    Ok(Json(a.rotate_credentials(&who, &slug, json.into()).await?))
}

async fn enable(
    State(a): State<Arc<Admin>>,
    Extension(Actor(who)): Extension<Actor>,
    Path((slug, table)): Path<(String, String)>,
) -> ApiResult<serde_json::Value> {
    let changed = a.set_table_enabled(&who, &slug, &table, true).await?;
    Ok(Json(
        serde_json::json!({"tenant": slug, "table": table, "enabled": true, "changed": changed}),
    ))
}

async fn disable(
    State(a): State<Arc<Admin>>,
    Extension(Actor(who)): Extension<Actor>,
    Path((slug, table)): Path<(String, String)>,
) -> ApiResult<serde_json::Value> {
    let changed = a.set_table_enabled(&who, &slug, &table, false).await?;
    Ok(Json(
        serde_json::json!({"tenant": slug, "table": table, "enabled": false, "changed": changed}),
    ))
}

#[derive(Deserialize)]
struct ListQuery {
    tenant: Option<String>,
    limit: Option<u32>,
    all: Option<bool>,
}

fn limit(l: Option<u32>) -> i64 {
    i64::from(l.unwrap_or(100).clamp(1, 1000))
}

async fn status(
    State(a): State<Arc<Admin>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Vec<crate::progress::TaskStatus>> {
    let q = q?.0;
    Ok(Json(a.status(q.tenant.as_deref()).await?))
}

async fn runs(
    State(a): State<Arc<Admin>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Vec<tenantsync_store::control::admin::RunEntry>> {
    let q = q?.0;
    Ok(Json(
        a.control
            .runs(q.tenant.as_deref(), limit(q.limit))
            .await
            .map_err(AdminError::from)?,
    ))
}

async fn dlq(
    State(a): State<Arc<Admin>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Vec<tenantsync_store::control::dead_letters::DeadLetter>> {
    let q = q?.0;
    let status = if q.all.unwrap_or(false) {
        None
    } else {
        Some("open")
    };
    Ok(Json(
        a.control
            .dead_letters(q.tenant.as_deref(), status)
            .await
            .map_err(AdminError::from)?,
    ))
}

async fn audit(
    State(a): State<Arc<Admin>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Vec<tenantsync_store::control::admin::AuditEntry>> {
    let q = q?.0;
    Ok(Json(
        a.control
            .audit_log(limit(q.limit))
            .await
            .map_err(AdminError::from)?,
    ))
}

async fn rotate_keys(
    State(a): State<Arc<Admin>>,
    Extension(Actor(who)): Extension<Actor>,
) -> ApiResult<crate::KeyRotation> {
    Ok(Json(a.rotate_master_key(&who).await?))
}

#[cfg(test)]
mod tests {
    use super::OPENAPI;

    /// Every route is documented, with the bearer scheme, and nothing else is.
    #[test]
    fn openapi_document_lists_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("valid JSON");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        let mut paths: Vec<String> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(p, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .filter(|m| *m != "parameters")
                    .map(move |m| format!("{} {p}", m.to_uppercase()))
            })
            .collect();
        paths.sort();
        let mut want = vec![
            "GET /openapi.json",
            "GET /healthz",
            "GET /v1/tenants",
            "GET /v1/tenants/{slug}",
            "DELETE /v1/tenants/{slug}",
            "POST /v1/tenants/{slug}/pause",
            "POST /v1/tenants/{slug}/resume",
            "PUT /v1/tenants/{slug}/credentials",
            "POST /v1/tenants/{slug}/tables/{table}/enable",
            "POST /v1/tenants/{slug}/tables/{table}/disable",
            "GET /v1/status",
            "GET /v1/runs",
            "GET /v1/dlq",
            "GET /v1/audit",
            "POST /v1/keys/rotate",
        ];
        want.sort();
        assert_eq!(paths, want);
    }
}

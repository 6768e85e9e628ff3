//! Keyless tenants (issue 16): `tenant add --impersonate SA_EMAIL`. The deployment's own key
//! (token_uri on a local token endpoint) gets the deployment's token; a local stand-in for
//! Google's IAM Credentials API (`generateAccessToken`, no offline one exists) hands out the
//! tenant account's token when the deployment may impersonate it; a recording proxy in front
//! of the local BigQuery shows which token each call carried.

use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use rsa::RsaPrivateKey;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tenantsync_bigquery::{Endpoint, Impersonator, TokenUriPolicy};
use tenantsync_core::TenantStatus;
use tenantsync_tests::http::{forward, serve, Request, Response};
use tenantsync_tests::{assert_no_secrets, captured_logs, scalar_i64, TestEnv};
use tenantsync_worker::onboard::{add_tenant, TenantRequest};

/// Emails asked for at the IAM endpoint, each with the Authorization header it came with.
type IamCalls = Arc<Mutex<Vec<(String, Option<String>)>>>;

const TENANT_SA: &str = "sync@ngo-a.iam.gserviceaccount.com";

struct Fixture {
    endpoint: Endpoint,
    /// The deployment's token and the impersonated one: never to be printed.
    deploy_token: String,
    tenant_token: String,
    key_marker: String,
    /// Accounts the deployment may impersonate (the tenant's grant).
    granted: Arc<Mutex<HashSet<String>>>,
    iam_calls: IamCalls,
    /// Authorization headers BigQuery saw.
    seen: Arc<Mutex<Vec<Option<String>>>>,
    /// BigQuery refuses the impersonated token (the grant was withdrawn and it expired).
    revoked: Arc<AtomicBool>,
}

async fn fixture(upstream: String) -> Fixture {
    let key = RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let key_marker = pem.lines().nth(5).unwrap().to_string();
    let deploy_token = format!("ya29.deploy-{}", uuid::Uuid::new_v4().simple());
    let tenant_token = format!("ya29.impersonated-{}", uuid::Uuid::new_v4().simple());

    let t = deploy_token.clone();
    let (token_addr, task) = serve(Arc::new(move |_req: Request| {
        let t = t.clone();
        Box::pin(async move {
            Response::json(
                200,
                &serde_json::json!({"access_token": t, "expires_in": 3600, "token_type": "Bearer"}),
            )
        })
    }))
    .await;
    std::mem::forget(task);

    let granted = Arc::new(Mutex::new(HashSet::from([TENANT_SA.to_string()])));
    let iam_calls = Arc::new(Mutex::new(Vec::new()));
    let (g, calls, tt) = (granted.clone(), iam_calls.clone(), tenant_token.clone());
    let (iam_addr, task) = serve(Arc::new(move |req: Request| {
        let (g, calls, tt) = (g.clone(), calls.clone(), tt.clone());
        Box::pin(async move {
            let email = req
                .path
                .strip_prefix("/v1/projects/-/serviceAccounts/")
                .and_then(|p| p.strip_suffix(":generateAccessToken"))
                .unwrap_or_default()
                .to_string();
            let auth = req.header("authorization").map(str::to_string);
            calls.lock().unwrap().push((email.clone(), auth));
            if req.method != "POST" || !g.lock().unwrap().contains(&email) {
                return Response::json(
                    403,
                    &serde_json::json!({"error": {"code": 403, "status": "PERMISSION_DENIED",
                        "message": "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist)."}}),
                );
            }
            // Inside the client's one-minute renewal margin: every use asks again, so a
            // withdrawn grant is seen at once, whichever write path the table uses.
            let expires = (chrono::Utc::now() + chrono::Duration::seconds(30))
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            Response::json(
                200,
                &serde_json::json!({"accessToken": tt, "expireTime": expires}),
            )
        })
    }))
    .await;
    std::mem::forget(task);

    let seen = Arc::new(Mutex::new(Vec::new()));
    let revoked = Arc::new(AtomicBool::new(false));
    let (s, r, tt) = (seen.clone(), revoked.clone(), tenant_token.clone());
    let http = reqwest::Client::new();
    let (proxy_addr, task) = serve(Arc::new(move |req: Request| {
        let (s, r, tt, http, upstream) = (
            s.clone(),
            r.clone(),
            tt.clone(),
            http.clone(),
            upstream.clone(),
        );
        Box::pin(async move {
            let auth = req.header("authorization").map(str::to_string);
            s.lock().unwrap().push(auth.clone());
            if r.load(Ordering::SeqCst) && auth.as_deref() == Some(&format!("Bearer {tt}")) {
                return Response::json(
                    401,
                    &serde_json::json!({"error": {"code": 401,
                    "message": "Request had invalid authentication credentials.",
                    "errors": [{"reason": "authError"}]}}),
                );
            }
            forward(&http, &upstream, &req).await
        })
    }))
    .await;
    std::mem::forget(task);

    let deploy_key = serde_json::json!({
        "type": "service_account", "project_id": "tenantsync-deploy",
        "private_key_id": "00112233", "private_key": pem,
        "client_email": "tenantsync@deploy.iam.gserviceaccount.com", "client_id": "7",
        "token_uri": format!("http://{token_addr}/token"),
    })
    .to_string();
    let policy = TokenUriPolicy::allowing(tenantsync_tests::TEST_TOKEN_HOSTS).unwrap();
    let by = Impersonator::new(deploy_key.into(), &format!("http://{iam_addr}"), &policy).unwrap();
    let endpoint = Endpoint::emulator(&format!("http://{proxy_addr}"))
        .with_storage_emulator(
            std::env::var("BIGQUERY_STORAGE_EMULATOR_HOST")
                .ok()
                .as_deref(),
        )
        .with_token_uri_policy(policy)
        .with_impersonator(Some(Arc::new(by)));
    Fixture {
        endpoint,
        deploy_token,
        tenant_token,
        key_marker,
        granted,
        iam_calls,
        seen,
        revoked,
    }
}

fn request(env: &TestEnv, slug: &str, impersonate: &str) -> TenantRequest {
    TenantRequest {
        slug: slug.into(),
        organization_id: "1".into(),
        project: env.project.clone(),
        dataset: env.dataset(&slug.replace('-', "_")),
        location: None,
        credentials: None,
        impersonate: Some(impersonate.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_impersonating_tenant_is_checked_like_a_key_syncs_and_pauses_when_refused() {
    let env = TestEnv::new().await.unwrap();
    let fx = fixture(env.emulator_url()).await;
    tenantsync_demo::seed(env.source_pool(), &[1], 20)
        .await
        .unwrap();
    env.add_table("contacts", "organization_id").await.unwrap();

    // Refused before anything is saved: an address that is not a service account's, one the
    // deployment may not impersonate (the IAM API says 403), and a process with no account of
    // its own to impersonate with.
    let add = |req: TenantRequest, endpoint: Endpoint| {
        let env = &env;
        async move {
            add_tenant(&env.control, &env.source, &env.master_key, &endpoint, req)
                .await
                .map_err(|e| e.to_string())
        }
    };
    let err = add(
        request(&env, "ngo-x", "sync@example.com"),
        fx.endpoint.clone(),
    )
    .await
    .unwrap_err();
    assert!(err.contains("not a service account's address"), "{err}");
    let other = "sync@ngo-b.iam.gserviceaccount.com";
    let err = add(request(&env, "ngo-b", other), fx.endpoint.clone())
        .await
        .unwrap_err();
    assert!(
        err.contains("may not impersonate") && err.contains(other) && err.contains("403"),
        "{err}"
    );
    let err = add(request(&env, "ngo-a", TENANT_SA), env.endpoint.clone())
        .await
        .unwrap_err();
    assert!(err.contains("TENANTSYNC_IMPERSONATOR_KEY_FILE"), "{err}");
    assert!(env.control.tenants().await.unwrap().is_empty());

    // Granted: onboarded with no stored key, its token from the impersonation call.
    let tenant = add(request(&env, "ngo-a", TENANT_SA), fx.endpoint.clone())
        .await
        .unwrap();
    assert_eq!(tenant.impersonate.as_deref(), Some(TENANT_SA));
    assert!(env.control.credentials(tenant.id).await.unwrap().is_none());
    let deploy_bearer = format!("Bearer {}", fx.deploy_token);
    assert!(fx
        .iam_calls
        .lock()
        .unwrap()
        .iter()
        .any(|(email, auth)| email == TENANT_SA && auth.as_deref() == Some(&deploy_bearer)));

    let mut cfg = env.worker_config();
    cfg.endpoint = fx.endpoint.clone();
    let worker = env.worker_with(cfg, Arc::new(tenantsync_worker::NoHooks));
    fx.seen.lock().unwrap().clear();
    env.sync_once(&worker).await.unwrap();
    let bq = env.bq(&tenant).await.unwrap();
    let n = scalar_i64(
        &bq.query(&format!(
            "SELECT COUNT(*) FROM {}",
            bq.qualified("contacts_latest")
        ))
        .await
        .unwrap(),
    );
    assert_eq!(n, 20);
    // Every BigQuery call carried the impersonated account's token, never the deployment's.
    let tenant_bearer = format!("Bearer {}", fx.tenant_token);
    let seen = fx.seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|a| a.as_deref() == Some(&tenant_bearer)),
        "a call without the impersonated token"
    );

    // The grant is withdrawn and the token refused: the tenant pauses like a revoked key.
    fx.granted.lock().unwrap().clear();
    fx.revoked.store(true, Ordering::SeqCst);
    sqlx::query("UPDATE contacts SET name = 'changed' WHERE organization_id = 1")
        .execute(env.source_pool())
        .await
        .unwrap();
    env.past_skew().await;
    let _ = tenantsync_worker::run(
        worker.clone(),
        tenantsync_worker::RunMode::Once,
        Default::default(),
    )
    .await;
    assert_eq!(
        env.control.tenant_by_id(tenant.id).await.unwrap().status,
        TenantStatus::CredentialsInvalid
    );

    let logs = captured_logs();
    assert_no_secrets(
        &[("logs", &logs)],
        &[
            ("deployment token", &fx.deploy_token),
            ("impersonated token", &fx.tenant_token),
            ("deployment private key", &fx.key_marker),
        ],
    );
    env.cleanup().await.unwrap();
}

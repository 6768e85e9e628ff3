//! The real service-account path and what happens to the key: a generated RSA key whose
//! token_uri points at a local token endpoint, a recording proxy in front of the local BigQuery.

use base64::Engine;
use rsa::pkcs1v15::{Signature, VerifyingKey};
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use rsa::sha2::Sha256;
use rsa::signature::Verifier;
use rsa::RsaPrivateKey;
use secrecy::SecretString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tenantsync_bigquery::Endpoint;
use tenantsync_core::TenantStatus;
use tenantsync_tests::http::{forward, serve, Request, Response};
use tenantsync_tests::{assert_no_secrets, captured_logs, scalar_i64, TestEnv};
use tenantsync_worker::onboard::{add_tenant, TenantRequest};

/// Method, path and Authorization header of a request the proxy forwarded.
type Seen = (String, String, Option<String>);

const FIRST_EMAIL: &str = "sync@ngo-a.iam.gserviceaccount.com";

/// A fresh service-account key for `email` whose token_uri is `token_uri`.
fn key_json(email: &str, token_uri: &str) -> SecretString {
    let key = RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    serde_json::json!({
        "type": "service_account", "project_id": "ngo-a", "private_key_id": "fedcba9876543210",
        "private_key": pem, "client_email": email, "client_id": "2", "token_uri": token_uri,
    })
    .to_string()
    .into()
}

struct Fixture {
    key_json: SecretString,
    /// A piece of the private key that must never show up anywhere.
    secret_marker: String,
    token: String,
    revoked: Arc<AtomicBool>,
    assertions: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    proxy: Endpoint,
    proxy_url: String,
    pubkey: rsa::RsaPublicKey,
    email: String,
    token_uri: String,
}

impl Fixture {
    fn assert_secret_free(&self, texts: &[(&str, &str)]) {
        assert_no_secrets(
            texts,
            &[
                ("private key material", &self.secret_marker),
                ("access token", &self.token),
            ],
        );
    }
}

async fn fixture(upstream: String) -> Fixture {
    let key = RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let secret_marker = pem.lines().nth(5).unwrap().to_string();
    let token = format!("ya29.test-{}", uuid::Uuid::new_v4().simple());
    let revoked = Arc::new(AtomicBool::new(false));
    let assertions = Arc::new(Mutex::new(Vec::new()));

    let (t_revoked, t_assertions, t_token) = (revoked.clone(), assertions.clone(), token.clone());
    let (token_addr, _t) = serve(Arc::new(move |req: Request| {
        let (revoked, assertions, token) = (t_revoked.clone(), t_assertions.clone(), t_token.clone());
        Box::pin(async move {
            let form = String::from_utf8_lossy(&req.body).to_string();
            let assertion = form
                .split('&')
                .find_map(|kv| kv.strip_prefix("assertion="))
                .map(percent_decode)
                .unwrap_or_default();
            assertions.lock().unwrap().push(assertion.clone());
            // Only the first key is ever revoked; a rotated key (another account) gets its own token.
            let iss = assertion
                .split('.')
                .nth(1)
                .and_then(|p| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p.trim_end_matches('=')).ok())
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["iss"].as_str().map(str::to_string))
                .unwrap_or_default();
            if iss != FIRST_EMAIL {
                return Response::json(200, &serde_json::json!({"access_token": format!("{token}-rotated"), "expires_in": 3600, "token_type": "Bearer"}));
            }
            if revoked.load(Ordering::SeqCst) {
                return Response::json(400, &serde_json::json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}));
            }
            Response::json(200, &serde_json::json!({"access_token": token, "expires_in": 3600, "token_type": "Bearer"}))
        })
    }))
    .await;
    std::mem::forget(_t);

    let seen = Arc::new(Mutex::new(Vec::new()));
    let (p_seen, p_revoked, p_token) = (seen.clone(), revoked.clone(), token.clone());
    let http = reqwest::Client::new();
    let (proxy_addr, _p) = serve(Arc::new(move |req: Request| {
        let (seen, revoked, token, http, upstream) =
            (p_seen.clone(), p_revoked.clone(), p_token.clone(), http.clone(), upstream.clone());
        Box::pin(async move {
            let auth = req.header("authorization").map(str::to_string);
            seen.lock().unwrap().push((req.method.clone(), req.path.clone(), auth.clone()));
            // A deleted key: Google refuses tokens minted from it.
            if revoked.load(Ordering::SeqCst) && auth.as_deref() == Some(&format!("Bearer {token}")) {
                return Response::json(401, &serde_json::json!({"error": {"code": 401, "message": "Request had invalid authentication credentials.", "errors": [{"reason": "authError"}]}}));
            }
            forward(&http, &upstream, &req).await
        })
    }))
    .await;
    std::mem::forget(_p);

    let email = FIRST_EMAIL.to_string();
    let token_uri = format!("http://{token_addr}/token");
    let key_json = serde_json::json!({
        "type": "service_account",
        "project_id": "ngo-a",
        "private_key_id": "0123456789abcdef",
        "private_key": pem,
        "client_email": email,
        "client_id": "1",
        "token_uri": token_uri,
    })
    .to_string();
    let proxy_url = format!("http://{proxy_addr}");
    Fixture {
        key_json: key_json.into(),
        secret_marker,
        token,
        revoked,
        assertions,
        seen,
        proxy: Endpoint::emulator(&proxy_url)
            .with_storage_emulator(
                std::env::var("BIGQUERY_STORAGE_EMULATOR_HOST")
                    .ok()
                    .as_deref(),
            )
            .with_token_uri_policy(
                tenantsync_bigquery::TokenUriPolicy::allowing(tenantsync_tests::TEST_TOKEN_HOSTS)
                    .unwrap(),
            ),
        proxy_url,
        pubkey: key.to_public_key(),
        email,
        token_uri,
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Onboard organization 1 as `ngo-a` with the fixture's key, through the proxy; and a worker
/// configuration that talks to BigQuery through the same proxy.
async fn onboard_with_key(
    env: &TestEnv,
    fx: &Fixture,
) -> (tenantsync_core::Tenant, tenantsync_worker::WorkerConfig) {
    let tenant = add_tenant(
        &env.control,
        &env.source,
        &env.master_key,
        &fx.proxy,
        TenantRequest {
            slug: "ngo-a".into(),
            organization_id: "1".into(),
            project: env.project.clone(),
            dataset: env.dataset("ngo_a"),
            location: None,
            credentials: Some(fx.key_json.clone()),
            impersonate: None,
        },
    )
    .await
    .unwrap();
    let mut cfg = env.worker_config();
    cfg.endpoint = fx.proxy.clone();
    (tenant, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_account_key_yields_a_token_that_reaches_bigquery_as_bearer() {
    let env = TestEnv::new().await.unwrap();
    let fx = fixture(env.emulator_url()).await;
    tenantsync_demo::seed(env.source_pool(), &[1], 25)
        .await
        .unwrap();
    env.add_table("contacts", "organization_id").await.unwrap();
    let (tenant, cfg) = onboard_with_key(&env, &fx).await;
    let worker = env.worker_with(cfg, Arc::new(tenantsync_worker::NoHooks));
    env.sync_once(&worker).await.unwrap();

    // The token endpoint received a JWT signed with the tenant's key, for the tenant's account.
    let assertion = fx
        .assertions
        .lock()
        .unwrap()
        .first()
        .cloned()
        .expect("no token request");
    let parts: Vec<&str> = assertion.split('.').collect();
    assert_eq!(parts.len(), 3, "not a JWT");
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = parts.iter().map(|p| p.trim_end_matches('=')).collect();
    let claims: serde_json::Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(claims["iss"], fx.email.as_str());
    assert_eq!(claims["aud"], fx.token_uri.as_str());
    assert!(claims["scope"].as_str().unwrap().contains("bigquery"));
    let sig = Signature::try_from(b64.decode(parts[2]).unwrap().as_slice()).unwrap();
    VerifyingKey::<Sha256>::new(fx.pubkey.clone())
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
        .expect("assertion not signed by the tenant's key");

    // Every BigQuery call, insertAll included, carried that token.
    let seen = fx.seen.lock().unwrap().clone();
    let inserts: Vec<_> = seen
        .iter()
        .filter(|(_, p, _)| p.ends_with("/insertAll"))
        .collect();
    assert!(!inserts.is_empty(), "no insertAll went through the proxy");
    let bearer = format!("Bearer {}", fx.token);
    for (m, p, auth) in &seen {
        assert_eq!(
            auth.as_deref(),
            Some(bearer.as_str()),
            "{m} {p} without the tenant's token"
        );
    }
    let bq = env.bq(&tenant).await.unwrap();
    let n = scalar_i64(
        &bq.query(&format!(
            "SELECT COUNT(*) FROM {}",
            bq.qualified("contacts_latest")
        ))
        .await
        .unwrap(),
    );
    assert_eq!(n, 25);
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credentials_are_stored_encrypted_and_appear_in_no_log_or_output() {
    let env = TestEnv::new().await.unwrap();
    let fx = fixture(env.emulator_url()).await;
    tenantsync_demo::seed(env.source_pool(), &[1, 2], 10)
        .await
        .unwrap();
    env.add_table("contacts", "organization_id").await.unwrap();

    // Through the real binary, as an operator would: key file in, nothing secret out.
    let dir = std::env::temp_dir().join(format!("ts-{}", env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("key.json");
    std::fs::write(
        &key_file,
        secrecy::ExposeSecret::expose_secret(&fx.key_json),
    )
    .unwrap();
    let extra = &[
        ("BIGQUERY_EMULATOR_HOST", fx.proxy_url.as_str()),
        ("TENANTSYNC_LOG", "debug"),
        ("TENANTSYNC_CURSOR_SKEW_MS", "50"),
    ];
    let run = |args: &[&str]| env.cli_with(args, extra);
    let (ok, add_out) = env.cli_tenant_add("ngo-a", 1, &key_file, extra);
    assert!(ok, "tenant add failed: {add_out}");
    let (ok, run_out) = run(&["run", "--once"]);
    assert!(ok, "run --once failed: {run_out}");
    let (ok, list_out) = run(&["tenant", "list", "--json"]);
    assert!(ok);
    assert!(list_out.contains("\"has_credentials\": true"), "{list_out}");

    // A malformed key is refused with a message that names the problem and echoes nothing.
    let broken = secrecy::ExposeSecret::expose_secret(&fx.key_json)
        .replace("BEGIN PRIVATE KEY", "BEGIN PRIVATE KEX");
    std::fs::write(&key_file, &broken).unwrap();
    let (ok, bad_out) = env.cli_tenant_add("ngo-b", 2, &key_file, extra);
    assert!(!ok && bad_out.contains("PEM"), "{bad_out}");
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        env.control.tenants().await.unwrap().len(),
        1,
        "the refused tenant must not be saved"
    );

    // At rest: sealed, with the key id recorded; the plaintext appears in no table.
    let sealed = env
        .control
        .credentials(1)
        .await
        .unwrap()
        .expect("credentials stored");
    assert_eq!(sealed.key_id, env.master_key.id());
    let dump: String = sqlx::query_scalar(
        "SELECT concat_ws('\n',
             (SELECT string_agg(t::text, '\n') FROM tenants t),
             (SELECT string_agg(c::text || encode(c.ciphertext, 'escape'), '\n') FROM tenant_credentials c),
             (SELECT string_agg(s::text, '\n') FROM sync_state s),
             (SELECT string_agg(r::text, '\n') FROM sync_runs r))",
    )
    .fetch_one(env.control.pool())
    .await
    .unwrap();
    assert!(dump.contains("ngo-a"));
    fx.assert_secret_free(&[
        ("database", &dump),
        ("tenant add", &add_out),
        ("run", &run_out),
        ("tenant list", &list_out),
        ("bad key", &bad_out),
        ("test logs", &captured_logs()),
    ]);
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_key_pauses_only_its_tenant_until_a_working_key_is_rotated_in() {
    let env = TestEnv::new().await.unwrap();
    let fx = fixture(env.emulator_url()).await;
    tenantsync_demo::seed(env.source_pool(), &[1, 2], 10)
        .await
        .unwrap();
    env.add_table("contacts", "organization_id").await.unwrap();
    let (a, cfg) = onboard_with_key(&env, &fx).await;
    let b = env.add_tenant("ngo-b", 2).await.unwrap();
    let worker = env.worker_with(cfg, Arc::new(tenantsync_worker::NoHooks));
    env.sync_once(&worker).await.unwrap();

    fx.revoked.store(true, Ordering::SeqCst);
    sqlx::query("UPDATE contacts SET name = 'changed' WHERE organization_id IN (1, 2)")
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
        env.control.tenant_by_id(a.id).await.unwrap().status,
        TenantStatus::CredentialsInvalid
    );
    assert_eq!(
        env.control.tenant_by_id(b.id).await.unwrap().status,
        TenantStatus::Active
    );
    let bq_b = env.bq(&b).await.unwrap();
    let changed = scalar_i64(
        &bq_b
            .query(&format!(
                "SELECT COUNT(*) FROM {} WHERE name = 'changed'",
                bq_b.qualified("contacts_latest")
            ))
            .await
            .unwrap(),
    );
    assert_eq!(changed, 10, "the healthy tenant must keep syncing");
    // A paused tenant is no longer scheduled.
    let due = env.control.schedulable_tasks().await.unwrap();
    assert!(due.iter().all(|t| t.tenant_id != a.id));

    // A key that does not work is refused and changes nothing ...
    let bad = key_json(
        "other@ngo-a.iam.gserviceaccount.com",
        "http://127.0.0.1:9/token",
    );
    let err = tenantsync_worker::onboard::rotate_credentials(
        &env.control,
        &env.master_key,
        &fx.proxy,
        "ngo-a",
        bad,
    )
    .await;
    assert!(
        err.is_err(),
        "a key whose token endpoint is unreachable must be refused"
    );
    assert_eq!(
        env.control.tenant_by_id(a.id).await.unwrap().status,
        TenantStatus::CredentialsInvalid
    );
    // ... a working one is stored and resumes the tenant, and the pending changes arrive.
    let new_key = key_json("sync2@ngo-a.iam.gserviceaccount.com", &fx.token_uri);
    let t = tenantsync_worker::onboard::rotate_credentials(
        &env.control,
        &env.master_key,
        &fx.proxy,
        "ngo-a",
        new_key,
    )
    .await
    .unwrap();
    assert_eq!(t.status, TenantStatus::Active);
    env.sync_once(&worker).await.unwrap();
    let bq_a = env.bq(&a).await.unwrap();
    let changed = scalar_i64(
        &bq_a
            .query(&format!(
                "SELECT COUNT(*) FROM {} WHERE name = 'changed'",
                bq_a.qualified("contacts_latest")
            ))
            .await
            .unwrap(),
    );
    assert_eq!(changed, 10, "the tenant must catch up after rotation");
    let rotated = format!("Bearer {}-rotated", fx.token);
    assert!(
        fx.seen
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.2.as_deref() == Some(rotated.as_str())),
        "the new key's token was never used"
    );
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_and_insufficient_keys_are_refused_by_name_and_nothing_is_saved() {
    let env = TestEnv::new().await.unwrap();
    let fx = fixture(env.emulator_url()).await;
    env.add_table("contacts", "organization_id").await.unwrap();
    // A BigQuery that accepts the token but lets this account do nothing on the dataset, the
    // way Google words it.
    let (denied_addr, _d) = serve(Arc::new(|req: Request| {
        Box::pin(async move {
            let permission = if req.method == "POST" {
                "bigquery.datasets.create"
            } else {
                "bigquery.datasets.get"
            };
            Response::json(403, &serde_json::json!({"error": {"code": 403,
                "message": format!("Access Denied: Permission {permission} denied (or it may not exist)."),
                "errors": [{"reason": "accessDenied"}]}}))
        })
    }))
    .await;
    let denied = format!("http://{denied_addr}");
    let dir = std::env::temp_dir().join(format!("ts-bad-{}", env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("key.json");
    let good = secrecy::ExposeSecret::expose_secret(&fx.key_json).to_string();
    let without = |field: &str| {
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        v.as_object_mut().unwrap().remove(field);
        v.to_string()
    };
    let retyped = good.replace("\"service_account\"", "\"authorized_user\"");
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "truncated JSON",
            good[..good.len() / 2].to_string(),
            &fx.proxy_url,
            "not valid JSON",
        ),
        (
            "wrong key type",
            retyped,
            &fx.proxy_url,
            "type \"service_account\") is required",
        ),
        (
            "no private key",
            without("private_key"),
            &fx.proxy_url,
            "missing field(s): private_key",
        ),
        (
            "no client email",
            without("client_email"),
            &fx.proxy_url,
            "missing field(s): client_email",
        ),
        (
            "no dataset access",
            good.clone(),
            &denied,
            "bigquery.datasets.",
        ),
    ];
    let mut outputs = Vec::new();
    for (what, key, host, expect) in &cases {
        std::fs::write(&key_file, key).unwrap();
        let (ok, out) =
            env.cli_tenant_add("ngo-a", 1, &key_file, &[("BIGQUERY_EMULATOR_HOST", host)]);
        assert!(!ok, "{what}: accepted");
        assert!(
            out.contains(expect),
            "{what}: the error does not say what is wrong: {out}"
        );
        outputs.push(out);
    }
    let saved: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM tenants) + (SELECT count(*) FROM tenant_credentials)
              + (SELECT count(*) FROM sync_state) + (SELECT count(*) FROM audit_log)",
    )
    .fetch_one(env.control.pool())
    .await
    .unwrap();
    assert_eq!(saved, 0, "a refused key left something behind");

    // Rotation refuses the same keys and keeps the working one.
    std::fs::write(&key_file, &good).unwrap();
    let (ok, out) = env.cli_tenant_add(
        "ngo-a",
        1,
        &key_file,
        &[("BIGQUERY_EMULATOR_HOST", fx.proxy_url.as_str())],
    );
    assert!(ok, "{out}");
    outputs.push(out);
    let stored = env.control.credentials(1).await.unwrap().unwrap();
    for (what, key, host, expect) in &cases {
        std::fs::write(&key_file, key).unwrap();
        let (ok, out) = env.cli_with(
            &[
                "tenant",
                "rotate-credentials",
                "ngo-a",
                "--credentials-file",
                key_file.to_str().unwrap(),
            ],
            &[("BIGQUERY_EMULATOR_HOST", host)],
        );
        assert!(!ok && out.contains(expect), "rotate with {what}: {out}");
        outputs.push(out);
    }
    assert_eq!(env.control.credentials(1).await.unwrap().unwrap(), stored);
    std::fs::remove_dir_all(&dir).unwrap();
    let all = outputs.join("\n");
    fx.assert_secret_free(&[("cli output", &all), ("test logs", &captured_logs())]);
    env.cleanup().await.unwrap();
}

//! Credential rotation and master-key rotation while a real `tenantsync run` process syncs a
//! tenant under write load: nothing is lost (every key and version of `_latest` equals
//! Postgres), the rotated key is used, and no secret shows up anywhere.

use base64::Engine;
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use rsa::RsaPrivateKey;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tenantsync_core::crypto::MasterKey;
use tenantsync_tests::http::{serve, Request, Response};
use tenantsync_tests::{assert_no_secrets, captured_logs, TestEnv};

/// A service-account key for `email` whose token_uri is `token_uri`, and one line of its
/// private key (to scan for).
fn key_json(email: &str, token_uri: &str) -> (String, String) {
    let key = RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let marker = pem.lines().nth(5).unwrap().to_string();
    let json = serde_json::json!({
        "type": "service_account", "project_id": "ngo-a", "private_key_id": "0123456789abcdef",
        "private_key": pem, "client_email": email, "client_id": "1", "token_uri": token_uri,
    })
    .to_string();
    (json, marker)
}

/// Same keys and versions in Postgres (the tenant's organization) and in its `<table>_latest`.
async fn assert_latest_equals_postgres(env: &TestEnv, tenant: &tenantsync_core::Tenant) {
    let bq = env.bq(tenant).await.unwrap();
    for table in ["contacts", "messages"] {
        let pg: BTreeSet<(String, String)> = sqlx::query_as(&format!(
            "SELECT id::text, (extract(epoch FROM updated_at) * 1000000)::bigint::text
             FROM {table} WHERE organization_id = $1"
        ))
        .bind(tenant.organization_id.parse::<i64>().unwrap())
        .fetch_all(env.source_pool())
        .await
        .unwrap()
        .into_iter()
        .collect();
        let got: BTreeSet<(String, String)> = bq
            .query(&format!(
                "SELECT CAST(id AS STRING), CAST(UNIX_MICROS(updated_at) AS STRING) FROM {}",
                bq.qualified(&format!("{table}_latest"))
            ))
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r[0].as_str().unwrap().to_string(),
                    r[1].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert!(!pg.is_empty());
        let missing = pg.difference(&got).count();
        let extra = got.difference(&pg).count();
        assert!(
            missing == 0 && extra == 0,
            "{table}_latest differs from Postgres: {missing} versions missing, {extra} unexpected"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credential_and_master_key_rotation_while_syncing_lose_nothing() {
    let env = TestEnv::new().await.unwrap();
    tenantsync_demo::seed(env.source_pool(), &[1, 2], 50)
        .await
        .unwrap();
    tenantsync_demo::backfill(env.source_pool(), &[1, 2], 3000)
        .await
        .unwrap();
    env.add_table("contacts", "organization_id").await.unwrap();
    env.add_table("messages", "organization_id").await.unwrap();

    // A token endpoint that records which account asked (the JWT's `iss`).
    let issuers = Arc::new(Mutex::new(Vec::<String>::new()));
    let access_token = format!("ya29.rot-{}", uuid::Uuid::new_v4().simple());
    let (i2, t2) = (issuers.clone(), access_token.clone());
    let (token_addr, _server) = serve(Arc::new(move |req: Request| {
        let (issuers, token) = (i2.clone(), t2.clone());
        Box::pin(async move {
            let form = String::from_utf8_lossy(&req.body).to_string();
            let iss = form
                .split('&')
                .find_map(|kv| kv.strip_prefix("assertion="))
                // Base64 padding arrives percent-encoded.
                .map(|a| a.replace("%3D", "="))
                .and_then(|a| a.split('.').nth(1).map(str::to_string))
                .and_then(|p| {
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(p.trim_end_matches('='))
                        .ok()
                })
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["iss"].as_str().map(str::to_string))
                .unwrap_or_default();
            issuers.lock().unwrap().push(iss);
            Response::json(
                200,
                &serde_json::json!({"access_token": token, "expires_in": 3600, "token_type": "Bearer"}),
            )
        })
    }))
    .await;
    let token_uri = format!("http://{token_addr}/token");
    let (first_key, first_marker) = key_json("first@ngo-a.iam.gserviceaccount.com", &token_uri);
    let (second_key, second_marker) = key_json("second@ngo-a.iam.gserviceaccount.com", &token_uri);
    let dir = std::env::temp_dir().join(format!("ts-rot-{}", env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let (first_file, second_file) = (dir.join("first.json"), dir.join("second.json"));
    std::fs::write(&first_file, &first_key).unwrap();
    std::fs::write(&second_file, &second_key).unwrap();

    let old_b64 = secrecy::ExposeSecret::expose_secret(&env.master_key_b64).to_string();
    let new_b64 = secrecy::ExposeSecret::expose_secret(&MasterKey::generate_base64()).to_string();
    let new_id = MasterKey::from_base64(&new_b64.clone().into())
        .unwrap()
        .id()
        .to_string();
    let rotating: [(&str, &str); 2] = [
        ("TENANTSYNC_MASTER_KEY", new_b64.as_str()),
        ("TENANTSYNC_MASTER_KEYS_OLD", old_b64.as_str()),
    ];
    let mut outputs = Vec::new();

    // Onboarded under the old master key, as it was before the rotation began.
    let (ok, out) = env.cli_tenant_add("ngo-a", 1, &first_file, &[]);
    assert!(ok, "tenant add: {out}");
    outputs.push(out);
    let b = env.add_tenant("ngo-b", 2).await.unwrap();
    let a = env.control.tenant("ngo-a").await.unwrap();
    assert_eq!(
        env.control.credentials(a.id).await.unwrap().unwrap().key_id,
        env.master_key.id()
    );

    // Step 1 of a rotation: processes run with the new key, the old one still accepted.
    let run = env.spawn(
        "w1",
        &["run"],
        &[
            rotating[0],
            rotating[1],
            ("TENANTSYNC_LOG", "debug"),
            ("TENANTSYNC_CONCURRENCY", "2"),
        ],
    );
    let writing = Arc::new(AtomicBool::new(true));
    let w = writing.clone();
    let pool = env.source_pool().clone();
    let writer = tokio::spawn(async move {
        let mut g = tenantsync_demo::Generator::new(pool, vec![1, 2], 7)
            .await
            .unwrap();
        while w.load(Ordering::SeqCst) {
            g.step(20).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        g.written
    });

    // Step 2, mid-backfill, under load: re-seal every credential under the new key.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let key_rotated_at = chrono::Utc::now();
    let (ok, out) = env.cli_with(&["keys", "rotate"], &rotating);
    assert!(ok && out.contains("1 re-sealed"), "keys rotate: {out}");
    outputs.push(out);
    assert_eq!(
        env.control.credentials(a.id).await.unwrap().unwrap().key_id,
        new_id
    );
    let (ok, out) = env.cli_with(&["keys", "status", "--json"], &rotating);
    assert!(ok && out.contains(&new_id), "{out}");
    outputs.push(out);

    // The tenant's own key replaced while syncing goes on.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let creds_rotated_at = chrono::Utc::now();
    let (ok, out) = env.cli_with(
        &[
            "tenant",
            "rotate-credentials",
            "ngo-a",
            "--credentials-file",
            second_file.to_str().unwrap(),
        ],
        &rotating,
    );
    assert!(ok, "rotate-credentials: {out}");
    outputs.push(out);
    assert_eq!(
        env.control.credentials(a.id).await.unwrap().unwrap().key_id,
        new_id
    );

    // Step 3: the old key is no longer needed; a process with only the new key syncs too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    writing.store(false, Ordering::SeqCst);
    let written = writer.await.unwrap();
    assert!(written > 0);
    env.wait_synced_through(chrono::Utc::now(), Duration::from_secs(120))
        .await
        .unwrap();
    drop(run);
    let (ok, out) = env.cli_with(
        &["run", "--once"],
        &[("TENANTSYNC_MASTER_KEY", new_b64.as_str())],
    );
    assert!(ok, "run --once with only the new key: {out}");
    outputs.push(out);

    assert_latest_equals_postgres(&env, &a).await;
    assert_latest_equals_postgres(&env, &b).await;
    let issuers = issuers.lock().unwrap().clone();
    assert!(
        issuers.iter().any(|i| i.starts_with("first@")),
        "{issuers:?}"
    );
    assert!(
        issuers.iter().any(|i| i.starts_with("second@")),
        "the rotated key was never used: {issuers:?}"
    );
    // The worker kept sending for ngo-a across both rotations (not only after the fact).
    for (what, since) in [
        ("master-key rotation", key_rotated_at),
        ("credential rotation", creds_rotated_at),
    ] {
        let rows: Option<i64> = sqlx::query_scalar(
            "SELECT sum(rows) FROM sync_runs
             WHERE tenant_id = $1 AND worker = 'w1' AND outcome = 'ok' AND started_at > $2",
        )
        .bind(a.id)
        .bind(since)
        .fetch_one(env.control.pool())
        .await
        .unwrap();
        assert!(
            rows.unwrap_or(0) > 0,
            "w1 sent nothing for ngo-a after the {what}"
        );
    }
    let key_errors: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sync_runs WHERE error ILIKE '%master key%' OR error ILIKE '%decrypt%'",
    )
    .fetch_one(env.control.pool())
    .await
    .unwrap();
    assert_eq!(
        key_errors, 0,
        "a slice could not open a credential during the rotation"
    );
    let audit: Vec<String> = sqlx::query_scalar("SELECT action FROM audit_log ORDER BY id")
        .fetch_all(env.control.pool())
        .await
        .unwrap();
    assert_eq!(
        audit,
        ["tenant.add", "keys.rotate", "tenant.rotate_credentials"]
    );

    let log =
        std::fs::read_to_string(std::env::temp_dir().join(format!("tstest-{}-w1.log", env.id)))
            .unwrap_or_default();
    let logs = captured_logs();
    let all = outputs.join("\n");
    let dump: String = sqlx::query_scalar(
        "SELECT concat_ws('\n', (SELECT string_agg(a::text, '\n') FROM audit_log a),
                                (SELECT string_agg(r::text, '\n') FROM sync_runs r),
                                (SELECT string_agg(c::text || encode(c.ciphertext, 'escape'), '\n')
                                 FROM tenant_credentials c))",
    )
    .fetch_one(env.control.pool())
    .await
    .unwrap();
    assert_no_secrets(
        &[
            ("cli output", &all),
            ("worker log", &log),
            ("test logs", &logs),
            ("control plane", &dump),
        ],
        &[
            ("old master key", &old_b64),
            ("new master key", &new_b64),
            ("first private key", &first_marker),
            ("second private key", &second_marker),
            ("access token", &access_token),
        ],
    );
    std::fs::remove_dir_all(&dir).unwrap();
    env.cleanup().await.unwrap();
}

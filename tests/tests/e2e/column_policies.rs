//! Column policies (issue 16): a column excluded with `tables add --exclude-column` is never
//! read, so it appears in no BigQuery table or view, no dead letter and no log line, and
//! `verify` checks the table without it. The key, cursor, tenant and soft-delete columns cannot
//! be excluded, and a name the table does not have is refused.

use tenantsync_tests::TestEnv;

const SECRET: &str = "zz-secret-email@ngo.example";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_excluded_column_appears_in_no_table_view_dead_letter_or_log() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(&format!(
        "CREATE TABLE people (id bigint PRIMARY KEY, organization_id bigint NOT NULL, name text,
                              email text, phone text, score numeric(12,2),
                              updated_at timestamptz NOT NULL DEFAULT now() - interval '1 minute');
         INSERT INTO people (id, organization_id, name, email, phone, score)
         SELECT g, 1, 'p' || g, '{SECRET}', '+1-555-0100', g * 1.5 FROM generate_series(1, 20) g;
         -- BigQuery's NUMERIC has no NaN: this row is dead-lettered, its email with it if sent.
         UPDATE people SET score = 'NaN' WHERE id = 7;"
    ))
    .execute(env.source_pool())
    .await
    .unwrap();

    // Refused: an excluded key, and a column the table does not have.
    let add = |extra: &[&str]| {
        let mut args = vec!["tables", "add", "people"];
        args.extend(extra);
        env.cli(&args)
    };
    let (ok, out) = add(&["--exclude-column", "id"]);
    assert!(
        !ok && out.contains("\"id\"") && out.contains("cannot be excluded"),
        "{out}"
    );
    let (ok, out) = add(&["--exclude-column", "mail"]);
    assert!(
        !ok && out.contains("\"mail\"") && out.contains("no such column"),
        "{out}"
    );
    let (ok, out) = add(&["--exclude-column", "email", "--exclude-column", "phone"]);
    assert!(ok, "{out}");
    let spec = env.control.tables().await.unwrap().remove(0);
    assert_eq!(spec.exclude_columns, ["email", "phone"]);

    let tenant = env.add_tenant("org-1", 1).await.unwrap();
    let (ok, run_out) = env.cli(&["run", "--once"]);
    assert!(ok, "{run_out}");
    assert!(!run_out.contains(SECRET), "an excluded value was logged");

    let bq = env.bq(&tenant).await.unwrap();
    let schema = bq.table_schema("people").await.unwrap().unwrap();
    let names: Vec<&str> = schema.iter().filter_map(|f| f["name"].as_str()).collect();
    assert!(
        names.contains(&"name") && names.contains(&"score"),
        "{names:?}"
    );
    assert!(
        !names.contains(&"email") && !names.contains(&"phone"),
        "{names:?}"
    );
    let rows = bq
        .query(&format!(
            "SELECT TO_JSON_STRING(t) FROM {} t",
            bq.qualified("people_latest")
        ))
        .await
        .unwrap();
    assert_eq!(rows.len(), 19, "every row but the dead-lettered one");
    for r in &rows {
        let row = tenantsync_tests::cell(r, 0);
        assert!(!row.contains(SECRET) && !row.contains("email"), "{row}");
    }
    let letters = env.control.dead_letters(None, None).await.unwrap();
    assert_eq!(letters.len(), 1, "the NaN score");
    assert_eq!(letters[0].key, ["7"]);
    assert!(
        letters[0].payload.contains("score"),
        "{}",
        letters[0].payload
    );
    assert!(
        !letters[0].payload.contains(SECRET) && !letters[0].payload.contains("phone"),
        "{}",
        letters[0].payload
    );

    // The row fixed at the source syncs; then `verify` compares every row, without the
    // excluded columns, and finds the table equal.
    sqlx::raw_sql("UPDATE people SET score = 1, updated_at = now() WHERE id = 7")
        .execute(env.source_pool())
        .await
        .unwrap();
    env.past_skew().await;
    let (ok, run_out) = env.cli(&["run", "--once"]);
    assert!(ok && !run_out.contains(SECRET), "{run_out}");
    let (ok, out) = env.cli(&["verify"]);
    assert!(ok && out.contains("ok "), "{out}");
    assert!(!out.contains(SECRET), "{out}");
    env.cleanup().await.unwrap();
}

/// The columns of a BigQuery table that must exist.
async fn column_names(bq: &tenantsync_bigquery::BigQuery, table: &str) -> Vec<String> {
    let schema = bq.table_schema(table).await.unwrap();
    let schema = schema.unwrap_or_else(|| panic!("no table {table}"));
    schema
        .iter()
        .filter_map(|f| f["name"].as_str().map(String::from))
        .collect()
}

/// `tables update --exclude-column` on a table already synced: the column leaves every
/// tenant's versions table, `<t>_current` and `<t>_latest` at the next slice, open dead
/// letters lose its values at once, later slices never send it, and `verify` agrees.
/// `--include-column` lets it back in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluding_a_synced_column_drops_it_everywhere() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(&format!(
        "CREATE TABLE people (id bigint PRIMARY KEY, organization_id bigint NOT NULL, name text,
                              email text, score numeric(12,2),
                              updated_at timestamptz NOT NULL DEFAULT now() - interval '1 minute');
         INSERT INTO people (id, organization_id, name, email, score)
         SELECT g, 1, 'p' || g, '{SECRET}', g FROM generate_series(1, 12) g;
         UPDATE people SET score = 'NaN' WHERE id = 5;"
    ))
    .execute(env.source_pool())
    .await
    .unwrap();
    let (ok, out) = env.cli(&["tables", "add", "people"]);
    assert!(ok, "{out}");
    let tenant = env.add_tenant("org-1", 1).await.unwrap();
    let (ok, out) = env.cli_with(&["run", "--once"], &[("TENANTSYNC_COMPACT_EVERY_S", "0")]);
    assert!(ok, "{out}");
    let bq = env.bq(&tenant).await.unwrap();
    let columns = |table: &'static str| column_names(&bq, table);
    // Synced with the column, as registered; the merge made `people_current`.
    assert!(columns("people").await.contains(&"email".to_string()));
    assert!(columns("people_current")
        .await
        .contains(&"email".to_string()));
    let letters = env.control.dead_letters(None, None).await.unwrap();
    assert!(
        letters[0].payload.contains(SECRET),
        "the NaN row kept its email"
    );

    // Refused, and nothing changes: a key column, a column the table does not have.
    for (bad, why) in [("id", "cannot be excluded"), ("mail", "no such column")] {
        let (ok, out) = env.cli(&["tables", "update", "people", "--exclude-column", bad]);
        assert!(!ok && out.contains(why), "{out}");
    }
    assert!(env.control.tables().await.unwrap()[0]
        .exclude_columns
        .is_empty());

    let (ok, out) = env.cli(&["tables", "update", "people", "--exclude-column", "email"]);
    assert!(ok && out.contains("excluded columns email"), "{out}");
    let letters = env.control.dead_letters(None, None).await.unwrap();
    assert!(
        !letters[0].payload.contains(SECRET) && letters[0].payload.contains("score"),
        "the open dead letter lost the value, not the row: {}",
        letters[0].payload
    );
    // Row 5 fixed at the source too, so `verify` below compares all 12.
    sqlx::raw_sql(
        "UPDATE people SET name = 'changed', updated_at = now() WHERE id = 3;
         UPDATE people SET score = 5, updated_at = now() WHERE id = 5;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    env.past_skew().await;
    let (ok, out) = env.cli_with(&["run", "--once"], &[("TENANTSYNC_COMPACT_EVERY_S", "0")]);
    assert!(ok && !out.contains(SECRET), "{out}");
    for table in ["people", "people_current"] {
        let cols = columns(table).await;
        assert!(!cols.contains(&"email".to_string()), "{table}: {cols:?}");
    }
    let rows = bq
        .query(&format!(
            "SELECT TO_JSON_STRING(t) FROM {} t",
            bq.qualified("people_latest")
        ))
        .await
        .unwrap();
    assert_eq!(rows.len(), 12);
    let all: String = rows.iter().map(|r| tenantsync_tests::cell(r, 0)).collect();
    assert!(!all.contains(SECRET) && all.contains("changed"), "{all}");
    let (ok, out) = env.cli(&["verify"]);
    assert!(ok && out.contains("ok ") && !out.contains(SECRET), "{out}");

    // Let back in: the column is added again and changed rows carry it.
    let (ok, out) = env.cli(&["tables", "update", "people", "--include-column", "email"]);
    assert!(ok && out.contains("excluded columns none"), "{out}");
    sqlx::raw_sql("UPDATE people SET email = 'back@ngo.example', updated_at = now() WHERE id = 4")
        .execute(env.source_pool())
        .await
        .unwrap();
    env.past_skew().await;
    let (ok, out) = env.cli(&["run", "--once"]);
    assert!(ok, "{out}");
    let back = bq
        .query(&format!(
            "SELECT email FROM {} WHERE id = 4",
            bq.qualified("people_latest")
        ))
        .await
        .unwrap();
    assert_eq!(tenantsync_tests::cell(&back[0], 0), "back@ngo.example");
    env.cleanup().await.unwrap();
}

/// The tenant's hashing secret, opened the way workers open it.
async fn hash_key(env: &TestEnv, tenant_id: i64) -> tenantsync_core::hashing::HashKey {
    use base64::Engine;
    use secrecy::ExposeSecret;
    let sealed = env
        .control
        .sealed_hash_key(tenant_id)
        .await
        .unwrap()
        .expect("made by the first slice that needed it");
    let text = env.deps().master_key.open(&sealed, tenant_id).unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.expose_secret())
        .unwrap();
    tenantsync_core::hashing::HashKey::from_bytes(&bytes).unwrap()
}

/// `--hash-column`: the column lands as `<name>_hmac`, equal to HMAC-SHA-256 under the tenant's
/// own sealed secret; equal values join across one tenant's tables and differ between two
/// tenants; the plain value is in no table, view or log line. `tables update --hash-column`
/// on a column synced plain drops the plain column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hashed_column_is_an_hmac_under_each_tenants_own_secret() {
    const SHARED: &str = "shared-donor@ngo.example";
    // A timestamp's text is the session's (UTC, ISO) whatever the server's settings, and the
    // same under either capture: changelog rows are rebuilt as source rows before the read.
    const SEEN: &str = "2026-11-30 10:11:12.345678+00";
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(&format!(
        "CREATE TABLE people (id bigint PRIMARY KEY, organization_id bigint NOT NULL,
                              email text, phone text, seen_at timestamptz DEFAULT '{SEEN}',
                              tenure interval DEFAULT '1 day 02:03:04',
                              updated_at timestamptz NOT NULL DEFAULT now() - interval '1 minute');
         CREATE TABLE gifts (id bigint PRIMARY KEY, organization_id bigint NOT NULL,
                             donor_email text, seen_at timestamptz,
                             updated_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE donations (id bigint PRIMARY KEY, organization_id bigint NOT NULL,
                                 donor_email text, amount int,
                                 updated_at timestamptz NOT NULL DEFAULT now() - interval '1 minute');
         INSERT INTO people (id, organization_id, email, phone) VALUES
             (1, 1, '{SHARED}', '+1-555-0101'), (2, 1, NULL, '+1-555-0102'),
             (3, 2, '{SHARED}', '+1-555-0103');
         INSERT INTO donations (id, organization_id, donor_email, amount) VALUES
             (10, 1, '{SHARED}', 50);"
    ))
    .execute(env.source_pool())
    .await
    .unwrap();
    // A source database whose own settings render timestamps otherwise.
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(env.source_pool())
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "ALTER DATABASE \"{db}\" SET DateStyle = 'SQL, DMY';
         ALTER DATABASE \"{db}\" SET TimeZone = 'America/New_York';
         ALTER DATABASE \"{db}\" SET IntervalStyle = 'iso_8601'"
    ))
    .execute(env.source_pool())
    .await
    .unwrap();
    for (args, why) in [
        (vec!["--hash-column", "id"], "cannot be hashed"),
        (vec!["--hash-column", "nope"], "no such column"),
        (
            vec!["--hash-column", "email", "--exclude-column", "email"],
            "both excluded and hashed",
        ),
    ] {
        let mut all = vec!["tables", "add", "people"];
        all.extend(args);
        let (ok, out) = env.cli(&all);
        assert!(!ok && out.contains(why), "{out}");
    }
    assert!(env.control.tables().await.unwrap().is_empty());
    let (ok, out) = env.cli(&[
        "tables",
        "add",
        "people",
        "--hash-column",
        "email",
        "--hash-column",
        "seen_at",
        "--hash-column",
        "tenure",
    ]);
    assert!(ok, "{out}");
    let (ok, out) = env.cli(&["tables", "add", "donations", "--hash-column", "donor_email"]);
    assert!(ok, "{out}");
    let (ok, out) = env.cli(&["source", "install-changelog", "public.gifts"]);
    assert!(ok, "{out}");
    let (ok, out) = env.cli(&[
        "tables",
        "add",
        "gifts",
        "--capture",
        "changelog",
        "--hash-column",
        "donor_email",
        "--hash-column",
        "seen_at",
    ]);
    assert!(ok, "{out}");
    sqlx::raw_sql(&format!(
        "INSERT INTO gifts (id, organization_id, donor_email, seen_at) VALUES (20, 1, '{SHARED}', '{SEEN}')"
    ))
    .execute(env.source_pool())
    .await
    .unwrap();
    let t1 = env.add_tenant("org-1", 1).await.unwrap();
    let t2 = env.add_tenant("org-2", 2).await.unwrap();
    let (ok, run_out) = env.cli(&["run", "--once"]);
    assert!(ok, "{run_out}");

    let (k1, k2) = (hash_key(&env, t1.id).await, hash_key(&env, t2.id).await);
    let (bq1, bq2) = (env.bq(&t1).await.unwrap(), env.bq(&t2).await.unwrap());
    let one = |bq: &tenantsync_bigquery::BigQuery, sql: String| {
        let bq = bq.clone();
        async move {
            let rows = bq.query(&sql).await.unwrap();
            rows.iter()
                .map(|r| tenantsync_tests::cell(r, 0))
                .collect::<Vec<_>>()
        }
    };
    let people1 = one(
        &bq1,
        format!(
            "SELECT email_hmac FROM {} ORDER BY id",
            bq1.qualified("people_latest")
        ),
    )
    .await;
    assert_eq!(people1, [k1.hmac_hex(SHARED), "NULL".to_string()]);
    // One tenant's tables join on the hash…
    let joined = one(
        &bq1,
        format!(
            "SELECT CAST(d.amount AS STRING) FROM {} d JOIN {} p ON d.donor_email_hmac = p.email_hmac",
            bq1.qualified("donations_latest"),
            bq1.qualified("people_latest")
        ),
    )
    .await;
    assert_eq!(joined, ["50"]);
    // …whatever their capture, timestamps included.
    let gift = one(
        &bq1,
        format!(
            "SELECT CONCAT(g.donor_email_hmac, ' ', g.seen_at_hmac, ' ', p.seen_at_hmac) FROM {} g \
             JOIN {} p ON g.donor_email_hmac = p.email_hmac",
            bq1.qualified("gifts_latest"),
            bq1.qualified("people_latest")
        ),
    )
    .await;
    let seen = k1.hmac_hex(SEEN);
    assert_eq!(gift, [format!("{} {seen} {seen}", k1.hmac_hex(SHARED))]);
    let tenure = one(
        &bq1,
        format!(
            "SELECT tenure_hmac FROM {} WHERE id = 1",
            bq1.qualified("people_latest")
        ),
    )
    .await;
    assert_eq!(tenure, [k1.hmac_hex("1 day 02:03:04")]);
    // …two tenants' hashes of one value differ.
    let people2 = one(
        &bq2,
        format!("SELECT email_hmac FROM {}", bq2.qualified("people_latest")),
    )
    .await;
    assert_eq!(people2, [k2.hmac_hex(SHARED)]);
    assert_ne!(people1[0], people2[0]);
    for bq in [&bq1, &bq2] {
        let names = column_names(bq, "people").await;
        assert!(
            names.contains(&"email_hmac".into()) && !names.contains(&"email".into()),
            "{names:?}"
        );
    }
    assert!(!run_out.contains(SHARED), "a hashed value was logged");

    // Hashing a column synced plain: the plain column goes, its hash comes.
    let (ok, out) = env.cli(&["tables", "update", "people", "--hash-column", "phone"]);
    assert!(
        ok && out.contains("hashed columns email,seen_at,tenure,phone"),
        "{out}"
    );
    sqlx::raw_sql("UPDATE people SET updated_at = now()")
        .execute(env.source_pool())
        .await
        .unwrap();
    env.past_skew().await;
    let (ok, out) = env.cli(&["run", "--once"]);
    assert!(ok && !out.contains("+1-555-0101"), "{out}");
    let phones = one(
        &bq1,
        format!(
            "SELECT phone_hmac FROM {} ORDER BY id",
            bq1.qualified("people_latest")
        ),
    )
    .await;
    assert_eq!(
        phones,
        [k1.hmac_hex("+1-555-0101"), k1.hmac_hex("+1-555-0102")]
    );
    let all = one(
        &bq1,
        format!(
            "SELECT TO_JSON_STRING(t) FROM {} t",
            bq1.qualified("people")
        ),
    )
    .await
    .concat();
    assert!(!all.contains("+1-555") && !all.contains(SHARED), "{all}");
    let (ok, out) = env.cli(&["verify"]);
    assert!(ok && out.matches("ok ").count() >= 4, "{out}");
    env.cleanup().await.unwrap();
}

/// `keys rotate` re-seals each tenant's hashing secret with its credentials: afterwards a
/// process holding only the new master key opens it, and the secret is the same one, so new
/// hashes still join the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hashing_secret_is_resealed_by_keys_rotate_and_stays_the_same() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE people (id bigint PRIMARY KEY, organization_id bigint NOT NULL, email text,
                              updated_at timestamptz NOT NULL DEFAULT now() - interval '1 minute');
         INSERT INTO people (id, organization_id, email) VALUES (1, 1, 'a@ngo.example');",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    let (ok, out) = env.cli(&["tables", "add", "people", "--hash-column", "email"]);
    assert!(ok, "{out}");
    let t = env.add_tenant("org-1", 1).await.unwrap();
    let (ok, out) = env.cli(&["run", "--once"]);
    assert!(ok, "{out}");
    let before = hash_key(&env, t.id).await;

    let old = secrecy::ExposeSecret::expose_secret(&env.master_key_b64).to_string();
    let new_b64 = tenantsync_core::crypto::MasterKey::generate_base64();
    let new = secrecy::ExposeSecret::expose_secret(&new_b64).to_string();
    let new_key = tenantsync_core::crypto::MasterKey::from_base64(&new_b64).unwrap();
    let rotating = [
        ("TENANTSYNC_MASTER_KEY", new.as_str()),
        ("TENANTSYNC_MASTER_KEYS_OLD", old.as_str()),
    ];
    let (ok, out) = env.cli_with(&["keys", "rotate"], &rotating);
    assert!(ok && !out.contains(" 0 re-sealed"), "keys rotate: {out}");
    let sealed = env.control.sealed_hash_key(t.id).await.unwrap().unwrap();
    assert_eq!(
        sealed.key_id,
        new_key.id(),
        "the hashing secret was not re-sealed"
    );

    // Only the new master key from here on: the secret must open with it.
    sqlx::raw_sql("UPDATE people SET email = 'b@ngo.example', updated_at = now()")
        .execute(env.source_pool())
        .await
        .unwrap();
    env.past_skew().await;
    let (ok, out) = env.cli_with(
        &["run", "--once"],
        &[("TENANTSYNC_MASTER_KEY", new.as_str())],
    );
    assert!(ok, "{out}");
    let bq = env.bq(&t).await.unwrap();
    let got = bq
        .query(&format!(
            "SELECT email_hmac FROM {}",
            bq.qualified("people_latest")
        ))
        .await
        .unwrap();
    assert_eq!(
        tenantsync_tests::cell(&got[0], 0),
        before.hmac_hex("b@ngo.example"),
        "hashed under another secret after the rotation"
    );
    assert!(
        !out.contains(&old) && !out.contains(&new),
        "a master key was printed"
    );
    env.cleanup().await.unwrap();
}

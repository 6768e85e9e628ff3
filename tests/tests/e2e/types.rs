//! Row rendering: every mapped Postgres type, read in binary and rendered as JSON by the worker
//! (`tenantsync_core::wire`), equals what Postgres' own JSON rendering of the same values gives
//! (the per-column expressions tenantsync used before rows were rendered in Rust), and the local
//! BigQuery takes the rows.

use serde_json::Value;
use tenantsync_store::control::tasks::Watermark;
use tenantsync_store::{GroupRead, SlicePlan};
use tenantsync_tests::{cell, TestEnv};

/// (column, type, how Postgres rendered it for insertAll: `same`, `text` or `base64`).
const COLUMNS: &[(&str, &str, &str)] = &[
    ("c_i2", "smallint", "same"),
    ("c_i4", "integer", "same"),
    ("c_i8", "bigint", "text"),
    ("c_oid", "oid", "text"),
    ("c_f4", "real", "same"),
    ("c_f8", "double precision", "same"),
    ("c_num", "numeric", "text"),
    ("c_num2", "numeric(12,2)", "text"),
    ("c_bool", "boolean", "same"),
    ("c_text", "text", "text"),
    ("c_vc", "varchar(10)", "text"),
    ("c_bpc", "char(5)", "text"),
    ("c_name", "name", "text"),
    ("c_uuid", "uuid", "text"),
    ("c_bytea", "bytea", "base64"),
    ("c_date", "date", "same"),
    ("c_time", "time", "same"),
    ("c_ts", "timestamp", "same"),
    ("c_tstz", "timestamptz", "same"),
    ("c_json", "json", "text"),
    ("c_jsonb", "jsonb", "text"),
    ("c_enum", "mood", "text"),
    ("c_range", "int4range", "text"),
    ("c_interval", "interval", "text"),
    ("c_inet", "inet", "text"),
    ("c_money", "money", "text"),
    ("c_timetz", "timetz", "text"),
    ("c_bit", "bit(3)", "text"),
    ("c_dom", "posint", "same"),
    ("a_text", "text[]", "text"),
    ("a_i8", "bigint[]", "text"),
    ("a_i4_2d", "integer[][]", "same"),
    ("a_num", "numeric[]", "text"),
    ("a_f8", "float8[]", "same"),
    ("a_bool", "boolean[]", "same"),
    ("a_date", "date[]", "same"),
    ("a_tstz", "timestamptz[]", "same"),
    ("a_jsonb", "jsonb[]", "text"),
    ("a_bytea", "bytea[]", "base64"),
    ("a_uuid", "uuid[]", "text"),
    ("a_enum", "mood[]", "text"),
];

/// Values per row, in `COLUMNS` order (`NULL` where left out).
const ROWS: &[&[&str]] = &[
    // Everyday values.
    &[
        "1",
        "2",
        "3",
        "4",
        "1.1",
        "2.5",
        "123.4500",
        "99.90",
        "true",
        "'hello'",
        "'vc'",
        "'ab'",
        "'nm'",
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
        "'\\x00ff10'",
        "'2024-02-29'",
        "'13:14:15.5'",
        "'2024-01-31 12:00:00.000001'",
        "'2024-01-31 12:00:00+02'",
        "'{\"a\": [1, 2],  \"b\": null}'",
        "'{\"b\": 1, \"a\": \"x\"}'",
        "'happy'",
        "'[1,5)'",
        "'1 day 02:03:04'",
        "'10.1.2.3/32'",
        "'12.34'",
        "'10:11:12+05:30'",
        "B'101'",
        "7",
        "ARRAY['a', NULL, 'b']",
        "ARRAY[1, NULL, 9007199254740993]",
        "'{{1,2},{NULL,4}}'",
        "ARRAY[1.50, NULL, -0.001]",
        "ARRAY[0.1, NULL]",
        "ARRAY[true, NULL, false]",
        "ARRAY['2024-01-01'::date]",
        "ARRAY['2024-01-01 00:00:00+00'::timestamptz]",
        "ARRAY['{\"k\": 1}'::jsonb, NULL]",
        "ARRAY['\\x01'::bytea, NULL, '\\x'::bytea]",
        "ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid]",
        "ARRAY['sad'::mood, NULL]",
    ],
    // Every column NULL.
    &["NULL"; 41],
    // Edge values.
    &[
        "-32768",
        "-2147483648",
        "-9223372036854775808",
        "4294967295",
        "'NaN'",
        "'-Infinity'",
        "'123456789012345678901234567890.000000000000000000001'",
        "-0.05",
        "false",
        "E'q\"b\\\\s\\n\\t\\r\\x01 é 😀'",
        "''",
        "'a    '",
        "'x'",
        "'00000000-0000-0000-0000-000000000000'",
        "decode(repeat('ab', 100), 'hex')",
        "'0044-03-15 BC'",
        "'24:00:00'",
        "'infinity'",
        "'0001-01-01 00:00:00+00 BC'",
        "'[]'",
        "'{\"u\": \"\\u00e9\\n\"}'",
        "'sad'",
        "'empty'",
        "'-1 years -2 mons'",
        "'::1'",
        "'-0.01'",
        "'00:00:00-12'",
        "B'000'",
        "1",
        "'{}'",
        "'{}'",
        "'{}'",
        "ARRAY['NaN'::numeric, 0]",
        "ARRAY['Infinity'::float8, 1e300, 5e-324]",
        "'{}'",
        "ARRAY['infinity'::date]",
        "ARRAY[NULL::timestamptz]",
        "'{}'",
        "'{}'",
        "'{}'",
        "'{}'",
    ],
];

/// Postgres' JSON rendering of a column, as tenantsync selected it before rows were rendered in
/// Rust (`json_build_object` over these expressions; arrays flattened, NULLs dropped).
fn oracle_expr(col: &str, ty: &str, how: &str) -> String {
    let render = |v: &str| match how {
        "same" => v.to_string(),
        "text" => format!("({v})::text"),
        _ => format!("translate(encode({v}, 'base64'), E'\\n', '')"),
    };
    if ty.ends_with("[]") {
        format!(
            "coalesce(ARRAY(SELECT {} FROM unnest(t.{col}) WITH ORDINALITY AS a(e, n)
                            WHERE e IS NOT NULL ORDER BY n), '{{}}')",
            render("a.e")
        )
    } else {
        render(&format!("t.{col}"))
    }
}

/// Numbers compare by value (Postgres prints `1e+300` and `1`, the worker `1e300` and `1.0`),
/// everything else exactly; NULL members are dropped (the worker leaves them out).
fn normalize(v: Value) -> Value {
    match v {
        Value::Number(n) => Value::String(format!("number {:?}", n.as_f64().unwrap())),
        Value::Array(a) => Value::Array(a.into_iter().map(normalize).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, normalize(v)))
                .collect(),
        ),
        other => other,
    }
}

/// A message's value read back (`ProtoSchema::to_json`) against the JSON path's, both
/// [`normalize`]d: equal, or the same instant, date-time or time of day in another spelling
/// (a message carries TIMESTAMP as microseconds, read back in UTC with six digits), or the same
/// number. An empty array is an absent repeated field in a message.
fn same_value(got: &Value, want: &Value) -> bool {
    use chrono::{DateTime, NaiveDateTime, NaiveTime};
    match (got, want) {
        (g, w) if g == w => true,
        (Value::Null, Value::Array(w)) => w.is_empty(),
        (Value::Array(g), Value::Array(w)) => {
            g.len() == w.len() && g.iter().zip(w).all(|(g, w)| same_value(g, w))
        }
        (Value::String(g), Value::String(w)) => {
            let instant = |s: &str| DateTime::parse_from_rfc3339(s).ok();
            let local = |s: &str| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f").ok();
            let time = |s: &str| NaiveTime::parse_from_str(s, "%H:%M:%S%.f").ok();
            let number = |s: &str| s.strip_prefix("number ").unwrap_or(s).parse::<f64>().ok();
            (instant(g).is_some() && instant(g) == instant(w))
                || (local(g).is_some() && local(g) == local(w))
                || (time(g).is_some() && time(g) == time(w))
                || (number(g).is_some() && number(g) == number(w))
        }
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_type_renders_as_postgres_renders_it_and_bigquery_takes_it() {
    let env = TestEnv::new().await.unwrap();
    let defs: Vec<String> = COLUMNS.iter().map(|(c, t, _)| format!("{c} {t}")).collect();
    sqlx::raw_sql(&format!(
        "CREATE TYPE mood AS ENUM ('happy', 'sad');
         CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
         CREATE TABLE types (id bigint PRIMARY KEY, organization_id bigint NOT NULL, {},
                             updated_at timestamptz NOT NULL);",
        defs.join(", ")
    ))
    .execute(env.source_pool())
    .await
    .unwrap();
    let names: Vec<&str> = COLUMNS.iter().map(|c| c.0).collect();
    for (i, values) in ROWS.iter().enumerate() {
        assert_eq!(values.len(), COLUMNS.len(), "row {i} has every column");
        sqlx::raw_sql(&format!(
            "INSERT INTO types (id, organization_id, updated_at, {}) VALUES
                 ({i}, 1, now() - interval '1 minute' + interval '1 ms' * {i}, {})",
            names.join(", "),
            values.join(", ")
        ))
        .execute(env.source_pool())
        .await
        .unwrap_or_else(|e| panic!("insert row {i}: {e}"));
    }
    let spec = env.add_table("types", "organization_id").await.unwrap();
    let (columns, fingerprint) = env.source.catalog("public", "types").await.unwrap();
    let plan = SlicePlan::build(&spec, &columns)
        .unwrap()
        .with_catalog(fingerprint);
    let rows = env
        .source
        .read_slice(&plan, "1", &Watermark::default(), chrono::Utc::now(), 100)
        .await
        .unwrap();
    assert_eq!(rows.len(), ROWS.len());

    let oracle: Vec<String> = COLUMNS
        .iter()
        .map(|(c, t, how)| format!("'{c}', {}", oracle_expr(c, t, how)))
        .collect();
    let expected: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT (json_build_object('id', (t.id)::text, 'organization_id', (t.organization_id)::text)::jsonb
                 || json_build_object({})::jsonb
                 || json_build_object('updated_at', t.updated_at, '_op', 'upsert',
                                      '_source_ts', t.updated_at)::jsonb)::text
         FROM types t ORDER BY t.updated_at, t.id",
        oracle.join(", ")
    ))
    .fetch_all(env.source_pool())
    .await
    .unwrap();
    for (i, (row, want)) in rows.iter().zip(&expected).enumerate() {
        let got: Value = serde_json::from_str(&row.json)
            .unwrap_or_else(|e| panic!("row {i} is not JSON ({e}): {}", row.json));
        let want: Value = serde_json::from_str(want).unwrap();
        let (got, want) = (normalize(got), normalize(want));
        for (col, w) in want.as_object().unwrap() {
            assert_eq!(got.get(col), Some(w), "row {i}, column {col}");
        }
        assert_eq!(
            got.as_object().unwrap().len(),
            want.as_object().unwrap().len(),
            "row {i}: {got}"
        );
    }

    // The Storage Write path: each row's protobuf message, encoded by the reader from the same
    // binary values, reads back to the values of its JSON row. The edge row holds values
    // BigQuery cannot (24:00, infinity, NaN), so it comes as JSON instead, for the sink's
    // encoder to refuse naming the column.
    let proto_plan = plan.clone().with_proto(false);
    let schema = proto_plan.proto.clone().unwrap();
    let messages = env
        .source
        .read_slice(
            &proto_plan,
            "1",
            &Watermark::default(),
            chrono::Utc::now(),
            100,
        )
        .await
        .unwrap();
    for (i, (m, row)) in messages.iter().zip(&rows).enumerate() {
        match (&m.proto, i) {
            (Some(bytes), 0 | 1) => {
                assert!(m.json.is_empty(), "row {i} was rendered twice");
                let (got, _) = schema.to_json(bytes).unwrap();
                let want: Value = serde_json::from_str(&row.json).unwrap();
                let want = normalize(want);
                let got = normalize(Value::Object(got));
                for (col, w) in want.as_object().unwrap() {
                    let g = got.get(col).unwrap_or(&Value::Null);
                    assert!(same_value(g, w), "row {i}, column {col}: {g} vs JSON {w}");
                }
                // And nothing more (a NULL array is `[]` in JSON, absent in a message).
                let present = |v: &Value| {
                    let o = v.as_object().unwrap();
                    o.iter()
                        .filter(|(_, v)| *v != &Value::Array(vec![]))
                        .count()
                };
                assert_eq!(present(&got), present(&want), "row {i}: {got}");
            }
            (None, 2) => assert_eq!(m.json, row.json, "the edge row's JSON"),
            (p, _) => panic!("row {i}: message {:?}", p.as_ref().map(Vec::len)),
        }
    }

    // Key, cursor and tenant texts, printed by the worker from the binary values, are Postgres'.
    let texts: Vec<(Vec<String>, String, String)> = sqlx::query_as(
        "SELECT ARRAY[id::text], updated_at::text, organization_id::text
         FROM types ORDER BY updated_at, id",
    )
    .fetch_all(env.source_pool())
    .await
    .unwrap();
    for (row, (key, cursor, tenant)) in rows.iter().zip(&texts) {
        assert_eq!((&row.key, &row.cursor), (key, cursor));
        assert_eq!(row.tenant.as_ref(), Some(tenant));
    }

    // The everyday and the all-NULL rows reach BigQuery, with values BigQuery reads back.
    sqlx::raw_sql("DELETE FROM types WHERE id = 2")
        .execute(env.source_pool())
        .await
        .unwrap();
    let tenant = env.add_tenant("org-1", 1).await.unwrap();
    let summary = env.sync_once(&env.worker()).await.unwrap();
    assert!(summary.failed.is_empty(), "{:?}", summary.failed);
    let bq = env.bq(&tenant).await.unwrap();
    let got = bq
        .query(&format!(
            // COALESCE: BigQuery stores an absent repeated field as []; the local BigQuery
            // stores one sent through the Storage Write API (no element in the message) as NULL.
            "SELECT id, c_i8, c_num2, c_text, c_bpc, c_uuid, c_bytea, c_tstz,
                    COALESCE(ARRAY_LENGTH(a_text), 0), COALESCE(ARRAY_LENGTH(a_i4_2d), 0),
                    c_enum, c_bool
             FROM {} ORDER BY id",
            bq.qualified("types_latest")
        ))
        .await
        .unwrap();
    let got: Vec<Vec<String>> = got
        .iter()
        .map(|r| (0..12).map(|i| cell(r, i)).collect())
        .collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0][..4], ["0", "3", "99.9", "hello"]);
    assert_eq!(got[0][4..6], ["ab", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]);
    assert_eq!(got[0][8..], ["2", "3", "happy", "true"]);
    assert_eq!(
        got[1],
        ["1", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "0", "0", "NULL", "NULL"]
    );
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_cursor_and_tenant_texts_are_postgres_own_and_watermarks_round_trip() {
    // A composite key of five types, a text tenant and a `timestamp` cursor: the worker prints
    // these texts itself, and a watermark made of them must cast back to the exact values.
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE keyed (k_num numeric, k_date date, k_ts timestamp, k_uuid uuid, k_i2 smallint,
                             org text NOT NULL, changed timestamp NOT NULL, note text,
                             PRIMARY KEY (k_num, k_date, k_ts, k_uuid, k_i2));
         INSERT INTO keyed
         SELECT (g * 1.25)::numeric(10, 3), date '2024-02-28' + g, timestamp '2024-01-01' + g * interval '1.000001 s',
                md5(g::text)::uuid, (g - 3)::smallint, 'tenant-α', timestamp '2024-03-01 10:00:00.5' + (g % 3) * interval '1 ms',
                'row ' || g
         FROM generate_series(1, 9) g;
         INSERT INTO keyed VALUES (-0.5, '0010-01-01 BC', '1999-12-31 23:59:59.999999', gen_random_uuid(), 0,
                                   'tenant-α', '2024-03-01 10:00:00.5', 'old');",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    let spec = tenantsync_worker::onboard::add_table(
        &env.control,
        &env.source,
        tenantsync_store::control::NewTableSpec {
            source_schema: "public".into(),
            source_table: "keyed".into(),
            key_columns: vec![],
            cursor_column: "changed".into(),
            tenant_column: "org".into(),
            mode: tenantsync_core::Mode::Latest,
            sync_interval_ms: 100,
            slice_rows: 100,
            soft_delete_column: None,
            capture: Default::default(),
            exclude_columns: Vec::new(),
            hash_columns: Vec::new(),
        },
    )
    .await
    .unwrap();
    let columns = env.source.columns("public", "keyed").await.unwrap();
    let plan = SlicePlan::build(&spec, &columns).unwrap();
    let all = env
        .source
        .read_slice(
            &plan,
            "tenant-α",
            &Watermark::default(),
            chrono::Utc::now(),
            100,
        )
        .await
        .unwrap();
    let want: Vec<(Vec<String>, String, String)> = sqlx::query_as(
        "SELECT ARRAY[k_num::text, k_date::text, k_ts::text, k_uuid::text, k_i2::text],
                changed::text, org::text
         FROM keyed ORDER BY changed, k_num, k_date, k_ts, k_uuid, k_i2",
    )
    .fetch_all(env.source_pool())
    .await
    .unwrap();
    assert_eq!(all.len(), 10);
    let got: Vec<(Vec<String>, String, String)> = all
        .iter()
        .map(|r| (r.key.clone(), r.cursor.clone(), r.tenant.clone().unwrap()))
        .collect();
    assert_eq!(got, want);
    // Resuming after each row's watermark gives exactly the rows after it.
    for (i, r) in all.iter().enumerate() {
        let rest = env
            .source
            .read_slice(&plan, "tenant-α", &r.watermark(), chrono::Utc::now(), 100)
            .await
            .unwrap();
        let keys: Vec<&Vec<String>> = rest.iter().map(|r| &r.key).collect();
        let expected: Vec<&Vec<String>> = all[i + 1..].iter().map(|r| &r.key).collect();
        assert_eq!(keys, expected, "after row {i}");
    }

    // Several tenants' slices read in one statement get what each would read alone.
    sqlx::raw_sql(
        "INSERT INTO keyed SELECT k_num + 100, k_date, k_ts, gen_random_uuid(), k_i2, 'tenant-β',
                                  changed + interval '1 ms', note FROM keyed",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    let now = chrono::Utc::now();
    let beta = env
        .source
        .read_slice(&plan, "tenant-β", &Watermark::default(), now, 100)
        .await
        .unwrap();
    assert_eq!(beta.len(), 10);
    let (wa, wb) = (all[1].watermark(), beta[4].watermark());
    let reqs = [
        GroupRead {
            organization_id: "tenant-α",
            watermark: &wa,
            horizon: now,
            limit: 3,
        },
        GroupRead {
            organization_id: "tenant-β",
            watermark: &wb,
            horizon: now,
            limit: 100,
        },
        GroupRead {
            organization_id: "tenant-γ",
            watermark: &wa,
            horizon: now,
            limit: 100,
        },
    ];
    let got = env.source.read_slices(&plan, &reqs).await.unwrap();
    let keys = |rows: &[tenantsync_store::SourceRow]| -> Vec<Vec<String>> {
        rows.iter().map(|r| r.key.clone()).collect()
    };
    assert_eq!(keys(&got[0]), keys(&all[2..5]));
    assert_eq!(keys(&got[1]), keys(&beta[5..]));
    assert!(got[2].is_empty());
    assert!(got[1]
        .iter()
        .all(|r| r.tenant.as_deref() == Some("tenant-β")));
    let alone = env
        .source
        .read_slice(&plan, "tenant-β", &wb, now, 100)
        .await
        .unwrap();
    let json = |rows: &[tenantsync_store::SourceRow]| -> Vec<String> {
        rows.iter().map(|r| r.json.clone()).collect()
    };
    assert_eq!(json(&got[1]), json(&alone));
    env.cleanup().await.unwrap();
}

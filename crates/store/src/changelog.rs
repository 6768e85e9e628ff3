//! Changelog capture: a change table per source table, filled by a trigger in the writing
//! transaction, read by workers below the oldest running transaction id (docs/architecture.md,
//! "A slice's life", step 3; the README's "Changelog capture").
//!
//! Everything lives in the source database's `tenantsync_changes` schema:
//! `tenantsync_changes."<schema>__<table>"` (the changes) and a trigger function of the same
//! name with `_capture` appended; names past Postgres' 63 bytes are shortened and made unique
//! by a hash (`tenantsync_core::names`), since Postgres would cut them to one name for two
//! tables. Each change table records the source table it serves, so a name two tables would
//! share (`a.b__c` and `a__b.c`) is refused instead of mixing their changes. The SQL is
//! generated per table with the key and tenant columns spelled out, so the trigger does no
//! dynamic SQL on the write path.

use crate::error::{Result, StoreError};
use sqlx::{PgPool, Postgres, Row, Transaction};
use tenantsync_core::ident::{quote_pg, sql_ident};
use tenantsync_core::names;

pub const SCHEMA: &str = names::CHANGES_SCHEMA;
/// The trigger's name on the source table.
const TRIGGER: &str = "tenantsync_capture";

/// What `install` writes, and what a table spec must agree with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changelog {
    pub schema: String,
    pub table: String,
    pub key_columns: Vec<String>,
    pub tenant_column: String,
    /// Updates store only the columns that changed (plus key and tenant), for merge mode;
    /// inserts always store the whole row, deletes only key and tenant.
    pub changed_only: bool,
}

/// `tenantsync_changes."<schema>__<table>"` (see [`names::change_table`]), quoted.
pub fn change_table(schema: &str, table: &str) -> String {
    format!(
        "{}.{}",
        quote_pg(SCHEMA),
        quote_pg(&names::change_table(schema, table))
    )
}

fn function(schema: &str, table: &str) -> String {
    qualified_function(&names::capture_function(schema, table))
}

fn qualified_function(name: &str) -> String {
    format!("{}.{}", quote_pg(SCHEMA), quote_pg(name))
}

/// How the installed changelog is described in the change table's comment, which is where
/// `installed` reads it back: the source database needs no table of ours besides the change
/// tables. `source` names the table the change table serves (installs before it was
/// recorded have none).
fn describe(c: &Changelog) -> String {
    serde_json::json!({
        "source": format!("{}.{}", c.schema, c.table),
        "key": c.key_columns,
        "tenant_column": c.tenant_column,
        "changed_only": c.changed_only,
    })
    .to_string()
}

/// The source table another install recorded on the change table named for `schema.table`,
/// if it is not `schema.table`: that table's changes are in it, so this one must not use it.
/// `None` when the change table is free, ours, or from an install that recorded no source.
async fn change_table_owner(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    table: &str,
) -> Result<Option<String>> {
    let row = sqlx::query(
        "SELECT c.relkind::text AS kind, obj_description(c.oid, 'pg_class') AS d
         FROM pg_class c WHERE c.oid = to_regclass($1)",
    )
    .bind(change_table(schema, table))
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let kind: String = row.try_get("kind")?;
    if kind != "r" {
        // An index or sequence of another change table took the name first.
        return Ok(Some(format!(
            "another change table (as its {kind} relation)"
        )));
    }
    let d: Option<String> = row.try_get("d")?;
    let source = d
        .as_deref()
        .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .and_then(|v| v["source"].as_str().map(str::to_string));
    Ok(source.filter(|s| *s != format!("{schema}.{table}")))
}

/// Tables other than `schema.table` whose trigger calls the function named for it.
async fn function_users(
    tx: &mut Transaction<'_, Postgres>,
    function: &str,
    schema: &str,
    table: &str,
) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT n.nspname || '.' || c.relname
         FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE t.tgfoid = to_regprocedure($1) AND (n.nspname, c.relname) <> ($2, $3)
         ORDER BY 1",
    )
    .bind(format!("{function}()"))
    .bind(schema)
    .bind(table)
    .fetch_all(&mut **tx)
    .await?)
}

/// Drop the trigger function older installs named by Postgres' truncation, once no trigger
/// calls it any more (a function two tables shared stays until both moved on).
async fn drop_legacy_function(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    table: &str,
) -> Result<()> {
    let legacy = names::legacy_capture_function(schema, table);
    if legacy == names::capture_function(schema, table) {
        return Ok(());
    }
    let legacy = qualified_function(&legacy);
    let unused: bool = sqlx::query_scalar(
        "SELECT to_regprocedure($1) IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgfoid = to_regprocedure($1))",
    )
    .bind(format!("{legacy}()"))
    .fetch_one(&mut **tx)
    .await?;
    if unused {
        sqlx::query(&format!("DROP FUNCTION {legacy}()"))
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

fn trigger_sql(c: &Changelog) -> String {
    let ct = change_table(&c.schema, &c.table);
    let ident_cols: Vec<&String> = c
        .key_columns
        .iter()
        .chain(std::iter::once(&c.tenant_column))
        .collect();
    let tuple = |rec: &str| {
        ident_cols
            .iter()
            .map(|k| format!("{rec}.{}", quote_pg(k)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let key = |rec: &str| {
        c.key_columns
            .iter()
            .map(|k| format!("{rec}.{}::text", quote_pg(k)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let tenant = |rec: &str| format!("coalesce({rec}.{}::text, '')", quote_pg(&c.tenant_column));
    // Key and tenant columns as a JSON object: what a delete needs to become a tombstone, and
    // what every partial update must carry to be merged.
    let ident_json = |rec: &str| {
        let pairs: Vec<String> = ident_cols
            .iter()
            .map(|k| {
                format!(
                    "'{}', to_jsonb({rec}.{})",
                    k.replace('\'', "''"),
                    quote_pg(k)
                )
            })
            .collect();
        format!("jsonb_build_object({})", pairs.join(", "))
    };
    let names: Vec<String> = ident_cols
        .iter()
        .map(|k| format!("'{}'", k.replace('\'', "''")))
        .collect();
    let update_row = if c.changed_only {
        format!(
            "(SELECT jsonb_object_agg(e.key, e.value) FROM jsonb_each(to_jsonb(NEW)) e
              WHERE e.key IN ({}) OR to_jsonb(OLD) -> e.key IS DISTINCT FROM e.value)",
            names.join(", ")
        )
    } else {
        "to_jsonb(NEW)".to_string()
    };
    let delete_row = if c.changed_only {
        ident_json("OLD")
    } else {
        "to_jsonb(OLD)".to_string()
    };
    format!(
        r#"CREATE OR REPLACE FUNCTION {func}() RETURNS trigger LANGUAGE plpgsql AS $tenantsync$
BEGIN
    -- A key or tenant change is a delete of the old row and an insert of the new one: the
    -- change is filed under each tenant, and a key never moves between datasets.
    IF TG_OP = 'UPDATE' AND ROW({old}) IS NOT DISTINCT FROM ROW({new}) THEN
        INSERT INTO {ct} (tenant, op, key, row)
        VALUES ({tenant_new}, 'update', ARRAY[{key_new}], {update_row});
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO {ct} (tenant, op, key, row)
        VALUES ({tenant_old}, 'delete', ARRAY[{key_old}], {delete_row});
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        INSERT INTO {ct} (tenant, op, key, row)
        VALUES ({tenant_new}, 'insert', ARRAY[{key_new}], to_jsonb(NEW));
    END IF;
    RETURN NULL;
END
$tenantsync$"#,
        func = function(&c.schema, &c.table),
        old = tuple("OLD"),
        new = tuple("NEW"),
        tenant_new = tenant("NEW"),
        tenant_old = tenant("OLD"),
        key_new = key("NEW"),
        key_old = key("OLD"),
    )
}

/// Create (or update) the change table, its trigger function and the trigger, in one
/// transaction. Idempotent. When the change table is new, every existing row is filed as an
/// insert in the same transaction, so the first sync sends the whole table and nothing written
/// around the installation is missed or doubled. Returns how many rows were filed that way.
pub async fn install(pool: &PgPool, c: &Changelog) -> Result<u64> {
    sql_ident("schema", &c.schema).map_err(|e| StoreError::Invalid(e.to_string()))?;
    sql_ident("table", &c.table).map_err(|e| StoreError::Invalid(e.to_string()))?;
    sql_ident("tenant column", &c.tenant_column).map_err(|e| StoreError::Invalid(e.to_string()))?;
    if c.key_columns.is_empty() {
        return Err(StoreError::Invalid(format!(
            "table {}.{} has no key columns",
            c.schema, c.table
        )));
    }
    for k in &c.key_columns {
        sql_ident("key column", k).map_err(|e| StoreError::Invalid(e.to_string()))?;
    }
    let source = format!("{}.{}", quote_pg(&c.schema), quote_pg(&c.table));
    let ct = change_table(&c.schema, &c.table);
    let mut tx = pool.begin().await?;
    // Serializes concurrent installs of the same table (and against writers' row locks, the
    // seed below sees a consistent table: SHARE ROW EXCLUSIVE blocks writes until commit).
    sqlx::query(&format!("LOCK TABLE {source} IN SHARE ROW EXCLUSIVE MODE"))
        .execute(&mut *tx)
        .await
        .map_err(|e| match StoreError::from(e) {
            StoreError::Invalid(m) if m.contains("does not exist") => StoreError::NotFound(
                format!("source table {}.{} does not exist", c.schema, c.table),
            ),
            other => other,
        })?;
    // Under the lock, and before anything is created: a change table or function serving
    // another source table would mix the two tables' changes (each lands in the other's
    // datasets).
    let name = format!("{}.{}", c.schema, c.table);
    if let Some(owner) = change_table_owner(&mut tx, &c.schema, &c.table).await? {
        return Err(StoreError::Conflict(format!(
            "table {name} maps to change table {ct}, which {owner} already uses as its change table; rename one of the tables"
        )));
    }
    let func = function(&c.schema, &c.table);
    if let Some(other) = function_users(&mut tx, &func, &c.schema, &c.table)
        .await?
        .first()
    {
        return Err(StoreError::Conflict(format!(
            "table {name} maps to trigger function {func}, which {other} already uses as its trigger function; rename one of the tables"
        )));
    }
    let existed: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&ct)
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {}", quote_pg(SCHEMA)))
        .execute(&mut *tx)
        .await?;
    // (tenant, txid, seq): a worker reads one tenant's changes in commit-safe order, and the
    // coordinator's DISTINCT tenant query walks the same index.
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {ct} (
            txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
            seq bigint GENERATED ALWAYS AS IDENTITY,
            tenant text NOT NULL,
            op text NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
            key text[] NOT NULL,
            row jsonb NOT NULL,
            changed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (tenant, txid, seq)
        )"
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!(
        "COMMENT ON TABLE {ct} IS {}",
        quote_literal(&describe(c))
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(&trigger_sql(c)).execute(&mut *tx).await?;
    sqlx::query(&format!("DROP TRIGGER IF EXISTS {TRIGGER} ON {source}"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!(
        "CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {source}
         FOR EACH ROW EXECUTE FUNCTION {}()",
        function(&c.schema, &c.table)
    ))
    .execute(&mut *tx)
    .await?;
    drop_legacy_function(&mut tx, &c.schema, &c.table).await?;
    let seeded = if existed {
        0
    } else {
        let key: Vec<String> = c
            .key_columns
            .iter()
            .map(|k| format!("t.{}::text", quote_pg(k)))
            .collect();
        sqlx::query(&format!(
            "INSERT INTO {ct} (tenant, op, key, row)
             SELECT coalesce(t.{tn}::text, ''), 'insert', ARRAY[{key}], to_jsonb(t) FROM {source} t",
            tn = quote_pg(&c.tenant_column),
            key = key.join(", "),
        ))
        .execute(&mut *tx)
        .await?
        .rows_affected()
    };
    tx.commit().await?;
    Ok(seeded)
}

/// Remove the trigger, its function and the change table (pending changes are lost).
/// Idempotent.
pub async fn uninstall(pool: &PgPool, schema: &str, table: &str) -> Result<bool> {
    sql_ident("schema", schema).map_err(|e| StoreError::Invalid(e.to_string()))?;
    sql_ident("table", table).map_err(|e| StoreError::Invalid(e.to_string()))?;
    let source = format!("{}.{}", quote_pg(schema), quote_pg(table));
    let ct = change_table(schema, table);
    let mut tx = pool.begin().await?;
    // A change table recorded for another source table is that table's: only our trigger
    // goes.
    let owned_by_other = change_table_owner(&mut tx, schema, table).await?.is_some();
    let existed: bool = !owned_by_other
        && sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&ct)
            .fetch_one(&mut *tx)
            .await?;
    let source_exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&source)
        .fetch_one(&mut *tx)
        .await?;
    if source_exists {
        sqlx::query(&format!("DROP TRIGGER IF EXISTS {TRIGGER} ON {source}"))
            .execute(&mut *tx)
            .await?;
    }
    drop_legacy_function(&mut tx, schema, table).await?;
    let func = function(schema, table);
    if !owned_by_other
        && function_users(&mut tx, &func, schema, table)
            .await?
            .is_empty()
    {
        sqlx::query(&format!("DROP FUNCTION IF EXISTS {func}()"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("DROP TABLE IF EXISTS {ct}"))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(existed)
}

/// The changelog installed for a table, read back from its change table, if any (and only if
/// the trigger is in place too).
pub async fn installed(pool: &PgPool, schema: &str, table: &str) -> Result<Option<Changelog>> {
    let ct = change_table(schema, table);
    let row = sqlx::query(
        "SELECT obj_description(to_regclass($1), 'pg_class') AS d,
                EXISTS (SELECT 1 FROM pg_trigger
                        WHERE tgrelid = to_regclass($2) AND tgname = $3) AS has_trigger
         WHERE to_regclass($1) IS NOT NULL",
    )
    .bind(&ct)
    .bind(format!("{}.{}", quote_pg(schema), quote_pg(table)))
    .bind(TRIGGER)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    if !row.try_get::<bool, _>("has_trigger")? {
        return Ok(None);
    }
    let d: Option<String> = row.try_get("d")?;
    let v: serde_json::Value = d
        .as_deref()
        .and_then(|d| serde_json::from_str(d).ok())
        .ok_or_else(|| {
            StoreError::Invalid(format!(
                "change table {ct} has no tenantsync description; run install-changelog again"
            ))
        })?;
    // A change table recorded for another source table does not serve this one, even if
    // this table has a trigger of ours (one left from before the name was taken).
    if v["source"]
        .as_str()
        .is_some_and(|s| s != format!("{schema}.{table}"))
    {
        return Ok(None);
    }
    Ok(Some(Changelog {
        schema: schema.to_string(),
        table: table.to_string(),
        key_columns: serde_json::from_value(v["key"].clone()).unwrap_or_default(),
        tenant_column: v["tenant_column"].as_str().unwrap_or_default().to_string(),
        changed_only: v["changed_only"].as_bool().unwrap_or(false),
    }))
}

/// Delete a tenant's changes up to and including `(txid, seq)`: they are in BigQuery and the
/// task's watermark is past them. Keeps the change table (and the coordinator's scan of it)
/// as small as the backlog.
pub async fn prune(
    pool: &PgPool,
    schema: &str,
    table: &str,
    tenant: &str,
    txid: &str,
    seq: &str,
) -> Result<u64> {
    Ok(sqlx::query(&format!(
        "DELETE FROM {} WHERE tenant = $1 AND (txid, seq) <= ($2::text::xid8, $3::text::bigint)",
        change_table(schema, table)
    ))
    .bind(tenant)
    .bind(txid)
    .bind(seq)
    .execute(pool)
    .await?
    .rows_affected())
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

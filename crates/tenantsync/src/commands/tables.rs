//! `tenantsync tables …`: register source tables, list them, switch one on or off per tenant.

use super::{admin, admin_with_source, print_list};
use crate::cli::{TablesAdd, TablesCmd, TablesUpdate};
use anyhow::Result;
use std::process::ExitCode;
use tenantsync_admin::cli_actor;
use tenantsync_core::{Capture, Mode, TableSpec, WriteApi};
use tenantsync_store::control::NewTableSpec;

pub(crate) async fn run(cmd: TablesCmd) -> Result<ExitCode> {
    match cmd {
        TablesCmd::Add(a) => add(*a).await?,
        TablesCmd::List(l) => {
            let tables = admin().await?.control.tables().await?;
            print_list(
                &l,
                &tables,
                &[
                    "TABLE",
                    "KEY",
                    "CAPTURE",
                    "TENANT COLUMN",
                    "MODE",
                    "WRITE API",
                    "ENABLED",
                ],
                |s| {
                    vec![
                        format!("{}.{}", s.source_schema, s.source_table),
                        s.key_columns.join(","),
                        capture(s),
                        s.tenant_column.clone(),
                        s.mode.to_string(),
                        s.write_api
                            .map_or_else(|| "default".to_string(), |w| w.to_string()),
                        s.enabled.to_string(),
                    ]
                },
            )?;
        }
        TablesCmd::Update(u) => update(u).await?,
        TablesCmd::Enable(s) => switch(&s.tenant, &s.table, true).await?,
        TablesCmd::Disable(s) => switch(&s.tenant, &s.table, false).await?,
        TablesCmd::WriteApi(w) => {
            let method = match w.method.as_str() {
                "default" => None,
                m => Some(m.parse().map_err(anyhow::Error::msg)?),
            };
            admin()
                .await?
                .set_write_api(&cli_actor(), &w.table, method)
                .await?;
            println!("table {}: write api {}", w.table, w.method);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn capture(s: &TableSpec) -> String {
    match s.capture {
        Capture::Cursor => format!("cursor {}", s.cursor_column),
        Capture::Changelog => "changelog".to_string(),
    }
}

async fn add(a: TablesAdd) -> Result<()> {
    let write_api: Option<WriteApi> = a
        .write_api
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let mode: Mode = a.mode.parse().map_err(anyhow::Error::msg)?;
    if mode == Mode::Cdc && write_api == Some(WriteApi::InsertAll) {
        anyhow::bail!(
            "--mode cdc writes through the Storage Write API's default stream (its change pseudo-columns exist nowhere else); it cannot take --write-api insert-all"
        );
    }
    let admin = admin_with_source().await?;
    let mut spec = admin
        .add_table(
            &cli_actor(),
            NewTableSpec {
                source_schema: a.schema,
                source_table: a.table,
                key_columns: a.key,
                cursor_column: a.cursor,
                tenant_column: a.tenant_column,
                mode,
                sync_interval_ms: a.interval_ms,
                slice_rows: a.slice_rows,
                soft_delete_column: a.soft_delete,
                capture: a.capture.parse().map_err(anyhow::Error::msg)?,
                exclude_columns: a.exclude_column.clone(),
                hash_columns: a.hash_column.clone(),
            },
        )
        .await?;
    let name = format!("{}.{}", spec.source_schema, spec.source_table);
    if let Some(w) = write_api {
        spec = admin.set_write_api(&cli_actor(), &name, Some(w)).await?;
    }
    if mode == Mode::Cdc && a.max_staleness_s != spec.max_staleness_s {
        spec = admin
            .set_max_staleness(&cli_actor(), &name, a.max_staleness_s)
            .await?;
    }
    println!(
        "table {}.{} registered (key {}, {}, tenant column {}, mode {}, write api {})",
        spec.source_schema,
        spec.source_table,
        spec.key_columns.join(","),
        match spec.capture {
            Capture::Cursor => format!("cursor {}", spec.cursor_column),
            Capture::Changelog => "changelog capture".to_string(),
        },
        spec.tenant_column,
        spec.mode,
        if spec.mode == Mode::Cdc {
            format!(
                "storage (implied by mode cdc), max staleness {} s",
                spec.max_staleness_s
            )
        } else {
            spec.write_api
                .map_or_else(|| "default".to_string(), |w| w.to_string())
        }
    );
    Ok(())
}

async fn update(u: TablesUpdate) -> Result<()> {
    let lists = [&u.exclude_column, &u.hash_column, &u.include_column];
    if lists.iter().all(|l| l.is_empty()) {
        anyhow::bail!(
            "tables update {}: nothing to change (--exclude-column C, --hash-column C, --include-column C)",
            u.table
        );
    }
    for (i, a) in lists.iter().enumerate() {
        for b in &lists[i + 1..] {
            if let Some(c) = a.iter().find(|c| b.contains(c)) {
                anyhow::bail!("column {c:?} is given two policies at once");
            }
        }
    }
    let spec = admin_with_source()
        .await?
        .update_policies(
            &cli_actor(),
            &u.table,
            &u.exclude_column,
            &u.hash_column,
            &u.include_column,
        )
        .await?;
    let show = |l: &[String]| match l.is_empty() {
        true => "none".to_string(),
        false => l.join(","),
    };
    println!(
        "table {}.{}: excluded columns {}; hashed columns {}",
        spec.source_schema,
        spec.source_table,
        show(&spec.exclude_columns),
        show(&spec.hash_columns)
    );
    Ok(())
}

async fn switch(tenant: &str, table: &str, enabled: bool) -> Result<()> {
    let changed = admin()
        .await?
        .set_table_enabled(&cli_actor(), tenant, table, enabled)
        .await?;
    println!(
        "table {table} for tenant {tenant}: {}{}",
        if enabled { "enabled" } else { "disabled" },
        if changed { "" } else { " (already)" }
    );
    Ok(())
}

//! `tenantsync source install-changelog|uninstall-changelog`: changelog capture in the source
//! database (crates/store/src/changelog.rs holds the SQL).

use super::{control, source};
use crate::cli::SourceCmd;
use anyhow::{bail, Result};
use tenantsync_admin::cli_actor;
use tenantsync_core::Capture;
use tenantsync_store::changelog::{self, Changelog};
use tenantsync_store::StoreError;

/// `name` or `schema.name`.
fn split(table: &str) -> (String, String) {
    match table.split_once('.') {
        Some((s, t)) => (s.to_string(), t.to_string()),
        None => ("public".to_string(), table.to_string()),
    }
}

pub(crate) async fn run(cmd: SourceCmd) -> Result<()> {
    let control = control().await?;
    let source = source().await?;
    match cmd {
        SourceCmd::InstallChangelog(a) => {
            let (schema, table) = split(&a.table);
            let key_columns = if a.key.is_empty() {
                source.primary_key(&schema, &table).await?
            } else {
                a.key
            };
            if key_columns.is_empty() {
                // Either the table is missing or it has no primary key; say which.
                source.columns(&schema, &table).await?;
                bail!("table {schema}.{table} has no primary key; name the key with --key");
            }
            // The columns must exist: the trigger would otherwise fail every write to the table.
            let columns = source.columns(&schema, &table).await?;
            for c in key_columns.iter().chain(std::iter::once(&a.tenant_column)) {
                if !columns.iter().any(|pc| &pc.name == c) {
                    bail!("column {c:?} does not exist in {schema}.{table}");
                }
            }
            let c = Changelog {
                schema: schema.clone(),
                table: table.clone(),
                key_columns,
                tenant_column: a.tenant_column,
                changed_only: a.changed_only,
            };
            let seeded = changelog::install(source.pool(), &c).await?;
            control
                .audit(
                    &cli_actor(),
                    "source.install_changelog",
                    Some(&format!("{schema}.{table}")),
                    serde_json::json!({"key": c.key_columns, "tenant_column": c.tenant_column,
                                       "changed_only": c.changed_only, "seeded_rows": seeded}),
                )
                .await?;
            println!(
                "changelog installed on {schema}.{table} (change table {}, key {}, tenant column {}, {}); {seeded} existing rows filed as inserts",
                changelog::change_table(&schema, &table),
                c.key_columns.join(","),
                c.tenant_column,
                if c.changed_only { "changed columns only" } else { "full rows" },
            );
        }
        SourceCmd::UninstallChangelog(a) => {
            let (schema, table) = split(&a.table);
            match control.table_by_name(&schema, &table).await {
                Ok(spec) if spec.capture == Capture::Changelog && !a.force => bail!(
                    "table {schema}.{table} is registered with changelog capture; its sync would stop. Pass --force to uninstall anyway"
                ),
                Ok(_) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            let existed = changelog::uninstall(source.pool(), &schema, &table).await?;
            control
                .audit(
                    &cli_actor(),
                    "source.uninstall_changelog",
                    Some(&format!("{schema}.{table}")),
                    serde_json::json!({"existed": existed}),
                )
                .await?;
            println!(
                "changelog of {schema}.{table} {}",
                if existed {
                    "removed"
                } else {
                    "was not installed"
                }
            );
        }
    }
    Ok(())
}

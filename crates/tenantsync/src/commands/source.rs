//! `tenantsync source install-changelog|uninstall-changelog`: changelog capture in the source
//! database (crates/store/src/changelog.rs holds the SQL, `tenantsync_admin::onboarding` the
//! checks).

use super::admin_with_source;
use crate::cli::SourceCmd;
use anyhow::Result;
use std::process::ExitCode;
use tenantsync_admin::cli_actor;
use tenantsync_admin::onboarding::{split_table, ChangelogRequest};
use tenantsync_store::changelog;

pub(crate) async fn run(cmd: SourceCmd) -> Result<ExitCode> {
    let admin = admin_with_source().await?;
    match cmd {
        SourceCmd::InstallChangelog(a) => {
            let req = ChangelogRequest {
                table: a.table,
                key_columns: a.key,
                tenant_column: a.tenant_column,
                changed_only: a.changed_only,
            };
            let (c, seeded) = admin.install_changelog(&cli_actor(), req).await?;
            println!(
                "changelog installed on {}.{} (change table {}, key {}, tenant column {}, {}); {seeded} existing rows filed as inserts",
                c.schema,
                c.table,
                changelog::change_table(&c.schema, &c.table),
                c.key_columns.join(","),
                c.tenant_column,
                if c.changed_only { "changed columns only" } else { "full rows" },
            );
        }
        SourceCmd::UninstallChangelog(a) => {
            let existed = admin
                .uninstall_changelog(&cli_actor(), &a.table, a.force)
                .await?;
            let (schema, table) = split_table(&a.table);
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
    Ok(ExitCode::SUCCESS)
}

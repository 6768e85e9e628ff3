//! `tenantsync dlq list|retry|discard`: rows BigQuery refused, and rows that cannot be synced.

use super::{admin, admin_of, control, print_list, worker};
use crate::cli::{DlqCmd, ListArgs};
use anyhow::Result;
use std::process::ExitCode;
use tenantsync_admin::cli_actor;

pub(crate) async fn run(cmd: DlqCmd) -> Result<ExitCode> {
    match cmd {
        DlqCmd::List { tenant, all, json } => {
            let rows = control()
                .await?
                .dead_letters(tenant.as_deref(), if all { None } else { Some("open") })
                .await?;
            print_list(
                &ListArgs { json },
                &rows,
                &["ID", "TENANT", "TABLE", "KEY", "STATUS", "REASON"],
                |d| {
                    vec![
                        d.id.to_string(),
                        d.tenant.clone(),
                        d.table.clone(),
                        d.key.join(","),
                        d.status.clone(),
                        d.reason.chars().take(100).collect(),
                    ]
                },
            )?;
        }
        DlqCmd::Discard { ids, tenant } => {
            let n = admin()
                .await?
                .discard_dead_letters(&cli_actor(), &ids, tenant.as_deref())
                .await?;
            println!("discarded {n} dead letter(s)");
        }
        DlqCmd::Retry { ids, tenant } => {
            let w = worker().await?;
            let r = admin_of(&w)?
                .retry_dead_letters(&cli_actor(), &w, &ids, tenant.as_deref())
                .await?;
            println!(
                "retried {} dead letter(s); {} refused again (still open)",
                r.retried, r.refused
            );
            if r.refused > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

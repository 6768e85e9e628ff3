//! Who may do what: master keys, admin API tokens, the audit log, and the admin API itself.

use super::{admin, admin_full, admin_with_key, control, print_list};
use crate::cli::{AuditArgs, KeysCmd, ListArgs, TokensCmd};
use crate::config;
use anyhow::{Context, Result};
use secrecy::ExposeSecret;
use std::process::ExitCode;
use std::sync::Arc;
use tenantsync_admin::cli_actor;

pub(crate) async fn keys(cmd: KeysCmd) -> Result<ExitCode> {
    match cmd {
        KeysCmd::Rotate => {
            let a = admin_with_key().await?;
            let r = a.rotate_master_key(&cli_actor()).await?;
            println!(
                "credentials now under master key {}: {} re-sealed, {} already current, {} failed",
                r.key_id,
                r.resealed,
                r.already_current,
                r.failed.len()
            );
            for (tenant_id, e) in &r.failed {
                eprintln!("tenant id {tenant_id}: {e}");
            }
            if !r.failed.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        KeysCmd::Status(l) => {
            let rows = control().await?.credentials_by_key_id().await?;
            let current = config::master_key().ok();
            let view: Vec<serde_json::Value> = rows
                .iter()
                .map(|(id, n)| {
                    serde_json::json!({
                        "key_id": id,
                        "credentials": n,
                        "configured": current.as_ref().map(|k| k.can_open(id)),
                        "current": current.as_ref().map(|k| k.id() == id),
                    })
                })
                .collect();
            print_list(
                &l,
                &view,
                &["KEY ID", "CREDENTIALS", "CURRENT", "CONFIGURED"],
                |v| {
                    vec![
                        v["key_id"].as_str().unwrap_or_default().to_string(),
                        v["credentials"].to_string(),
                        v["current"].to_string(),
                        v["configured"].to_string(),
                    ]
                },
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn tokens(cmd: TokensCmd) -> Result<ExitCode> {
    let a = admin().await?;
    match cmd {
        TokensCmd::Create { name } => {
            let token = a.create_token(&cli_actor(), &name).await?;
            eprintln!("token {name} created; it is shown only this once:");
            // The one place a token is printed: to the operator who asked for it, on stdout.
            println!("{}", token.expose_secret());
        }
        TokensCmd::List(l) => {
            let rows = a.tokens().await?;
            print_list(
                &l,
                &rows,
                &["NAME", "CREATED", "LAST USED", "REVOKED"],
                |t| {
                    let ts = |v: Option<chrono::DateTime<chrono::Utc>>| {
                        v.map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    };
                    vec![
                        t.name.clone(),
                        ts(Some(t.created_at)),
                        ts(t.last_used_at),
                        ts(t.revoked_at),
                    ]
                },
            )?;
        }
        TokensCmd::Revoke { name } => {
            a.revoke_token(&cli_actor(), &name).await?;
            println!("token {name} revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn audit(args: AuditArgs) -> Result<ExitCode> {
    let rows = control()
        .await?
        .audit_log(i64::from(args.limit.clamp(1, 10_000)))
        .await?;
    print_list(
        &ListArgs { json: args.json },
        &rows,
        &["AT", "ACTOR", "ACTION", "TARGET", "DETAILS"],
        |e| {
            vec![
                e.at.format("%Y-%m-%d %H:%M:%S").to_string(),
                e.actor.clone(),
                e.action.clone(),
                e.target.clone().unwrap_or_default(),
                e.details.to_string(),
            ]
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Serve the admin API until SIGINT/SIGTERM.
pub(crate) async fn serve_api() -> Result<ExitCode> {
    // Required, as for the other long-running roles: the API rotates credentials and master
    // keys, and a server that starts without a usable key fails only at the first such call.
    let key = Arc::new(config::master_key()?);
    let mut a = admin_full().await?;
    a.master_key = Some(key);
    let a = Arc::new(a);
    let shutdown = super::shutdown_on_signal();
    let (_, handle) = tenantsync_admin::api::serve(a, config::admin_addr()?, shutdown)
        .await
        .context("cannot listen on TENANTSYNC_ADMIN_ADDR")?;
    handle.await.context("admin api panicked")??;
    Ok(ExitCode::SUCCESS)
}

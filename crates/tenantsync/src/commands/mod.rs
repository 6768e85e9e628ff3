//! Subcommands, one file per family. Each builds what it needs from the configuration and
//! calls into the library crates; every action that changes something goes through
//! `tenantsync_admin::Admin`, which writes the audit log (one path for the CLI and the API).

mod access;
mod demo;
mod dlq;
mod output;
mod serve;
mod source;
mod status;
mod tables;
mod tenant;
mod verify;

use crate::cli::{Cli, Command};
use crate::config;
use anyhow::{Context, Result};
use std::process::ExitCode;
use std::sync::Arc;
use tenantsync_admin::Admin;
use tenantsync_lease::Leases;
use tenantsync_store::{ControlPlane, SourceReader};
use tenantsync_worker::{Deps, Worker};

pub(crate) use output::print_list;
pub(crate) use serve::shutdown_on_signal;

pub async fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Migrate => {
            let pool = tenantsync_store::connect(&config::database_url()?, 2).await?;
            tenantsync_store::migrate(&pool).await?;
            println!("control plane migrated");
            Ok(ExitCode::SUCCESS)
        }
        Command::Tenant(cmd) => tenant::run(cmd).await,
        Command::Tables(cmd) => tables::run(cmd).await,
        Command::Source(cmd) => source::run(cmd).await,
        Command::Run(r) => serve::run(r).await,
        Command::Coordinator => serve::serve(true, false).await,
        Command::Worker => serve::serve(false, true).await,
        Command::Status(s) => status::run(s).await,
        Command::Keys(cmd) => access::keys(cmd).await,
        Command::Tokens(cmd) => access::tokens(cmd).await,
        Command::Audit(a) => access::audit(a).await,
        Command::AdminApi => access::serve_api().await,
        Command::Dlq(cmd) => dlq::run(cmd).await,
        Command::Verify(v) => verify::verify(v).await,
        Command::Resync(r) => verify::resync(r).await,
        Command::Demo(d) => demo::run(d).await,
    }
}

pub(crate) async fn control() -> Result<ControlPlane> {
    let pool = tenantsync_store::connect(
        &config::database_url()?,
        config::pool_size("TENANTSYNC_CONTROL_POOL", 8)?,
    )
    .await
    .context("cannot connect to the control-plane database (DATABASE_URL)")?;
    Ok(ControlPlane::new(pool))
}

pub(crate) async fn source() -> Result<SourceReader> {
    let pool = tenantsync_store::connect(
        &config::source_database_url()?,
        config::pool_size("TENANTSYNC_SOURCE_POOL", 16)?,
    )
    .await
    .context("cannot connect to the source database (SOURCE_DATABASE_URL)")?;
    Ok(SourceReader::new(pool))
}

pub(crate) async fn leases() -> Result<Leases> {
    Leases::connect(&config::redis_url()?, &config::redis_prefix())
        .await
        .context("cannot connect to Redis (REDIS_URL)")
}

pub(crate) async fn worker() -> Result<Arc<Worker>> {
    worker_on(control().await?, source().await?, leases().await?)
}

/// A worker on existing pools (one process shares its pools between its roles).
pub(crate) fn worker_on(
    control: ControlPlane,
    source: SourceReader,
    leases: Leases,
) -> Result<Arc<Worker>> {
    let deps = Deps {
        control,
        source,
        leases,
        master_key: Arc::new(config::master_key()?),
    };
    Ok(Arc::new(Worker::new(config::worker()?, deps)))
}

/// The admin operations on the control plane only (no source, Redis or key needed).
pub(crate) async fn admin() -> Result<Admin> {
    Ok(Admin::new(control().await?, config::endpoint()?))
}

/// With the master key (credential operations).
pub(crate) async fn admin_with_key() -> Result<Admin> {
    let mut a = admin().await?;
    a.master_key = Some(Arc::new(config::master_key()?));
    Ok(a)
}

/// With the source database (tables, changelogs; tenants also need the key).
pub(crate) async fn admin_with_source() -> Result<Admin> {
    let mut a = admin().await?;
    a.source = Some(source().await?);
    Ok(a)
}

/// With the source too (progress), and Redis when configured.
pub(crate) async fn admin_full() -> Result<Admin> {
    let mut a = admin().await?;
    a.source = Some(source().await?);
    if config::redis_url().is_ok() {
        a.leases = Some(leases().await?);
    }
    // Optional here (status and show do not need it), but a key that is set must be usable:
    // ignoring a malformed one would only defer the error to the first operation needing it.
    a.master_key = config::master_key_if_set()?.map(Arc::new);
    Ok(a)
}

/// The admin view of a worker's own pools, for operations that send rows (dlq retry, verify,
/// resync): the audit entry and the rows go through the same connections.
pub(crate) fn admin_of(w: &Worker) -> Result<Admin> {
    Ok(Admin::new(w.deps().control.clone(), config::endpoint()?))
}

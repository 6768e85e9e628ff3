//! `tenantsync`: one binary, roles and admin tasks as subcommands. Library crates hold the
//! logic; this crate is wiring: CLI, configuration, telemetry, signals.

mod cli;
mod commands;
mod config;
mod http;
mod telemetry;

use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    telemetry::init(cli.global.log_format);
    tenantsync_bigquery::client::install_crypto_provider();
    match commands::dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            // `{:#}` prints the context chain on one line; errors never carry secrets.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn verify_cli() {
        crate::cli::Cli::command().debug_assert();
    }
}

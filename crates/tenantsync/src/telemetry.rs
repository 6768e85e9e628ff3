use crate::cli::LogFormat;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Logs go to stderr: JSON when not on a terminal (for collectors), text on one.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("TENANTSYNC_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let filter = tenantsync_bigquery::SECRET_SAFE_LOG_DIRECTIVES
        .iter()
        .fold(filter, |f, d| {
            f.add_directive(d.parse().expect("static directive"))
        });
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        // The current span holds a slice's task, tenant, table and run: collectors filter on
        // them. The span list would repeat the same fields.
        builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder.init();
    }
}

//! The gRPC fault proxy (`tests/scripts/grpc_fault_proxy.py`) in front of the local BigQuery's
//! Storage Write port: fault injection, and (for CDC, which the local BigQuery does not
//! implement) a recorder that answers the appends of named tables itself.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// Cyclic fault plans per method: `pass`, `unavailable`, `exhausted`, `drop_after`.
#[derive(Debug, Default, Clone)]
pub struct FaultPlan {
    pub appends: &'static str,
    pub creates: &'static str,
    pub finalizes: &'static str,
    pub commits: &'static str,
}

pub struct GrpcFaultProxy {
    child: Child,
    /// `127.0.0.1:port`, for `Endpoint::with_storage_emulator`.
    pub host: String,
    stats: PathBuf,
    /// Where the answered tables' appends are recorded (one JSON line per request).
    record: Option<PathBuf>,
}

/// One AppendRows request the proxy answered itself: its stream and its rows decoded with the
/// request's descriptor (int64 columns come as JSON strings, as protobuf's JSON mapping has
/// them).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RecordedAppend {
    pub stream: String,
    pub rows: Vec<serde_json::Map<String, serde_json::Value>>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

impl GrpcFaultProxy {
    /// In front of `target` (`host:port` of the emulator's gRPC port).
    pub fn start(target: &str, plan: &FaultPlan) -> Self {
        Self::spawn(target, plan, &[])
    }

    /// Like [`Self::start`], and the appends to `tables` (table ids) are recorded and
    /// answered with success instead of reaching the emulator.
    pub fn recording(target: &str, plan: &FaultPlan, tables: &[&str]) -> Self {
        Self::spawn(target, plan, tables)
    }

    fn spawn(target: &str, plan: &FaultPlan, tables: &[&str]) -> Self {
        let python = root().join(".dev/venv/bin/python");
        let stats = std::env::temp_dir().join(format!(
            "grpc-faults-{}-{}.json",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let record = (!tables.is_empty()).then(|| stats.with_extension("appends.jsonl"));
        let mut cmd = Command::new(&python);
        if let Some(r) = &record {
            cmd.arg(root().join("tests/scripts/grpc_fault_proxy.py"))
                .arg("--record")
                .arg(r)
                .args(["--answer-tables", &tables.join(",")]);
        } else {
            cmd.arg(root().join("tests/scripts/grpc_fault_proxy.py"));
        }
        let mut child = cmd
            .args(["--target", target, "--stats"])
            .arg(&stats)
            .args(["--appends", plan.appends, "--creates", plan.creates])
            .args(["--finalizes", plan.finalizes, "--commits", plan.commits])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{} (scripts/dev-env installs it): {e}", python.display()));
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("proxy port");
        let port: u16 = line
            .trim()
            .parse()
            .expect("the proxy prints its port first");
        Self {
            child,
            host: format!("127.0.0.1:{port}"),
            stats,
            record,
        }
    }

    /// Every append answered so far, in the order the proxy got them.
    pub fn recorded(&self) -> Vec<RecordedAppend> {
        let Some(path) = &self.record else {
            return Vec::new();
        };
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a recorded append"))
            .collect()
    }

    /// How many calls got each fault, keyed `Method:fault`.
    pub fn counts(&self) -> HashMap<String, u64> {
        std::fs::read_to_string(&self.stats)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default()
    }
}

impl Drop for GrpcFaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stats);
        if let Some(r) = &self.record {
            let _ = std::fs::remove_file(r);
        }
    }
}

//! The gRPC fault proxy (`tests/scripts/grpc_fault_proxy.py`) in front of the local BigQuery's
//! Storage Write port: fault injection only, every call it does not fail is the emulator's.

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
        let python = root().join(".dev/venv/bin/python");
        let stats = std::env::temp_dir().join(format!(
            "grpc-faults-{}-{}.json",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let mut child = Command::new(&python)
            .arg(root().join("tests/scripts/grpc_fault_proxy.py"))
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
        }
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
    }
}

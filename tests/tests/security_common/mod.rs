//! What the security tests share: a kit provisioned as a user does, a coordinator serving it,
//! clients run with it, and waiting on their logs.

// Each test file uses its own part of this.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use fedtune_tests::{Proc, fashion_subset, free_port};

fedtune_tests::test_binaries!();

pub fn provision(kits: &Path, clients: &str) {
    let out = std::process::Command::new(coordinator_bin())
        .args(["provision", "--out"])
        .arg(kits)
        .args(["--san", "127.0.0.1,localhost", "--clients", clients])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A coordinator serving `kits`' coordinator.toml on a free port, waiting for `clients`.
pub fn serve(dir: &Path, kits: &Path, clients: usize, extra: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let mut args: Vec<String> = [
        "serve",
        "--config",
        kits.join("coordinator/coordinator.toml").to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--min-clients",
        &clients.to_string(),
        "--model",
        "mlp",
        "--out",
        dir.join("out").to_str().unwrap(),
        "--available-timeout",
        "2m",
    ]
    .map(String::from)
    .to_vec();
    if !extra.contains(&"--rounds") {
        args.extend(["--rounds".to_string(), "2".to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    (
        Proc::spawn("coordinator", coordinator_bin(), &args, dir),
        port,
    )
}

/// `fedtune-client run` with `flags` on the bundled data, expecting it to give up quickly.
pub fn client(dir: &Path, name: &str, flags: &[String]) -> Proc {
    let mut args: Vec<String> = ["run", "--data", fashion_subset().to_str().unwrap()]
        .map(String::from)
        .to_vec();
    args.extend(flags.iter().cloned());
    args.extend(
        [
            "--no-progress",
            "--give-up-after",
            "20s",
            "--max-epochs",
            "1",
        ]
        .map(String::from),
    );
    Proc::spawn(name, client_bin(), &args, dir)
}

pub fn kit_flags(kits: &Path, name: &str, port: u16) -> Vec<String> {
    vec![
        "--config".into(),
        kits.join(format!("clients/{name}/client.toml"))
            .display()
            .to_string(),
        "--coordinator".into(),
        format!("https://127.0.0.1:{port}"),
    ]
}

/// Waits (up to two minutes) until `p` has logged `want`.
pub fn wait_for_log(p: &Proc, want: &str) {
    let started = std::time::Instant::now();
    while !p.output().contains(want) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{}: no `{want}` in {}",
            p.name,
            p.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for `p` to fail and returns its log.
pub fn fails(p: &mut Proc) -> String {
    let status = p.wait(Duration::from_secs(90));
    let log = p.output();
    assert!(
        matches!(status, Some(s) if !s.success()),
        "{} should have failed: {log}",
        p.name
    );
    log
}

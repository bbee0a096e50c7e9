//! Revoking and naming clients while a federation runs, with real processes on 127.0.0.1:
//! a client taken off the allow-list, clients known by a token instead of a certificate, and
//! a token deleted mid-run. Each refused client's session ends and the round goes on.

mod security_common;

use std::path::Path;
use std::time::Duration;

use fedtune_tests::{Proc, free_port};
use security_common::*;

fedtune_tests::test_binaries!();

#[test]
fn a_client_taken_off_the_allow_list_is_refused_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let kits = dir.path().join("kits");
    provision(&kits, "site-a,site-b,site-c");
    let allow = dir.path().join("allowed.txt");
    std::fs::write(&allow, "site-a\nsite-b\nsite-c\n").unwrap();
    let (mut coordinator, port) = serve(
        dir.path(),
        &kits,
        2,
        &[
            "--rounds",
            "4",
            "--allowed-clients",
            allow.to_str().unwrap(),
        ],
    );
    let mut clients: Vec<Proc> = ["site-a", "site-b", "site-c"]
        .iter()
        .map(|name| client(dir.path(), name, &kit_flags(&kits, name, port)))
        .collect();
    wait_for_log(&coordinator, "round 1/4 |");
    std::fs::write(&allow, "site-a\nsite-c\n").unwrap();
    coordinator.expect_success(Duration::from_secs(240));
    let log = coordinator.output();
    assert!(log.contains("round 4/4"), "{log}");
    assert!(
        log.contains("allow-list") && log.contains("changed"),
        "{log}"
    );
    assert!(
        log.contains("ended the session of site-b: client `site-b` is no longer"),
        "{log}"
    );
    let b = fails(&mut clients[1]);
    assert!(
        b.contains("client `site-b` is no longer on the coordinator's allow-list"),
        "{b}"
    );
    for i in [0, 2] {
        clients[i].expect_success(Duration::from_secs(30));
    }
}

/// `fedtune-coordinator token add NAME`: the printed token, saved to a file for the device.
fn token_for(tokens: &Path, name: &str, dir: &Path) -> std::path::PathBuf {
    let out = std::process::Command::new(coordinator_bin())
        .args(["token", "add", name, "--file"])
        .arg(tokens)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let stored = std::fs::read_to_string(tokens).unwrap();
    assert!(!stored.contains(token.trim()), "only the hash is kept");
    let path = dir.join(format!("{name}.token"));
    std::fs::write(&path, token).unwrap();
    path
}

/// A coordinator with server-side TLS from `kits` and client tokens from `tokens`, waiting
/// for 2 clients, for `rounds` rounds.
fn serve_with_tokens(d: &Path, kits: &Path, tokens: &Path, rounds: u32) -> (Proc, u16) {
    let port = free_port();
    let f = |p: &str| kits.join(p).display().to_string();
    let coordinator = Proc::spawn(
        "coordinator",
        coordinator_bin(),
        &[
            "serve",
            "--tls-cert",
            &f("coordinator/server.pem"),
            "--tls-key",
            &f("coordinator/server.key"),
            "--client-tokens",
            tokens.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--rounds",
            &rounds.to_string(),
            "--min-clients",
            "2",
            "--model",
            "mlp",
            "--out",
            d.join("out").to_str().unwrap(),
        ]
        .map(String::from),
        d,
    );
    (coordinator, port)
}

/// A client's flags for that coordinator: its CA, and `token` when given.
fn token_flags(kits: &Path, port: u16, token: Option<&Path>) -> Vec<String> {
    let mut v = vec![
        "--coordinator".to_string(),
        format!("https://127.0.0.1:{port}"),
        "--ca-cert".into(),
        kits.join("ca/ca.pem").display().to_string(),
    ];
    if let Some(t) = token {
        v.extend(["--token-file".into(), t.display().to_string()]);
    }
    v
}

#[test]
fn clients_without_certificates_join_with_tokens_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kits = d.join("kits");
    provision(&kits, "unused");
    let tokens = d.join("tokens.txt");
    let (t1, t2) = (
        token_for(&tokens, "sensor-1", d),
        token_for(&tokens, "sensor-2", d),
    );
    let (mut coordinator, port) = serve_with_tokens(d, &kits, &tokens, 2);
    let flags = |token: Option<&Path>| token_flags(&kits, port, token);
    let wrong = d.join("wrong.token");
    std::fs::write(&wrong, "fedtune_00000000\n").unwrap();
    let mut refused = [
        (
            client(d, "wrong-token", &flags(Some(&wrong))),
            "unknown client token",
        ),
        (client(d, "no-token", &flags(None)), "or a client token"),
    ];
    let mut sensors = [
        client(d, "sensor-1", &flags(Some(&t1))),
        client(d, "sensor-2", &flags(Some(&t2))),
    ];
    for (p, want) in &mut refused {
        let log = fails(p);
        assert!(log.contains(*want), "{}: {log}", p.name);
    }
    coordinator.expect_success(Duration::from_secs(240));
    for s in &mut sensors {
        s.expect_success(Duration::from_secs(30));
    }
    let log = coordinator.output();
    assert!(log.contains("client joined: sensor-1"), "{log}");
}

#[test]
fn a_client_whose_token_is_deleted_is_refused_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kits = d.join("kits");
    provision(&kits, "unused");
    let tokens = d.join("tokens.txt");
    let files: Vec<_> = ["sensor-1", "sensor-2", "sensor-3"]
        .iter()
        .map(|n| token_for(&tokens, n, d))
        .collect();
    let (mut coordinator, port) = serve_with_tokens(d, &kits, &tokens, 4);
    let mut sensors: Vec<Proc> = files
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let flags = token_flags(&kits, port, Some(t));
            client(d, &format!("sensor-{}", i + 1), &flags)
        })
        .collect();
    wait_for_log(&coordinator, "round 1/4 |");
    // Revoking a device: delete its line.
    let kept: String = std::fs::read_to_string(&tokens)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("sensor-2 "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&tokens, kept).unwrap();
    coordinator.expect_success(Duration::from_secs(240));
    let log = coordinator.output();
    assert!(log.contains("round 4/4"), "{log}");
    assert!(
        log.contains("ended the session of sensor-2: unknown client token"),
        "{log}"
    );
    let revoked = fails(&mut sensors[1]);
    assert!(revoked.contains("unknown client token"), "{revoked}");
    for i in [0, 2] {
        sensors[i].expect_success(Duration::from_secs(30));
    }
}

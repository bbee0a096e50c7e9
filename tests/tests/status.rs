//! `fedtune-coordinator status` against a real coordinator process: every client's latest
//! session with what it is doing mid-round, as JSON, as a table, and as the live view on a
//! terminal (a pty from script(1)).

use std::time::Duration;

use fedtune_proto as pb;
use fedtune_tests::raw::{RawClient, pattern};
use fedtune_tests::{Proc, free_port, insecure_serve};

fedtune_tests::test_binaries!();

/// What a terminal stream shows, roughly: control sequences (cursor moves over blank cells,
/// colours) read as one space, runs of spaces as one.
fn visible_text(stream: &str) -> String {
    let mut out = String::new();
    let mut chars = stream.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters and intermediates, up to the final byte.
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() || c == '~' {
                        break;
                    }
                }
            }
            out.push(' ');
        } else if !c.is_control() {
            out.push(c);
        }
    }
    out.split(' ')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `fedtune-coordinator status` as a process against the coordinator at `port`, with `extra`.
fn status(port: u16, extra: &[&str]) -> String {
    let out = std::process::Command::new(coordinator_bin())
        .args([
            "status",
            "--insecure",
            "--coordinator",
            &format!("http://127.0.0.1:{port}"),
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_client_where_it_is_mid_round() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut coordinator = Proc::spawn(
        "coordinator",
        coordinator_bin(),
        &insecure_serve(
            port,
            &dir.path().join("out"),
            &[
                "--rounds",
                "1",
                "--min-clients",
                "4",
                "--local-epochs",
                "3",
                "--model",
                "synthetic:1000",
            ],
        ),
        dir.path(),
    );
    let mut clients = Vec::new();
    for name in ["site-a", "site-b", "site-c", "site-d"] {
        clients.push(RawClient::join_when_up(&url, name, 10).await);
    }
    let mut tasks = Vec::new();
    for c in &mut clients {
        tasks.push(c.next_train().await);
    }
    // site-a is done; site-b trains (and says how far); site-c has not started; site-d sent
    // an update that is not finite.
    let global = clients[0].fetch(&tasks[0].task_id).await;
    let delta = pattern(&global, |i| i as f32 * 1e-3);
    clients[0]
        .submit(&tasks[0], &delta, 10, None)
        .await
        .unwrap();
    clients[1].fetch(&tasks[1].task_id).await;
    let token = clients[1].token.clone();
    clients[1]
        .rpc
        .heartbeat(pb::HeartbeatRequest {
            session_token: token,
            activity: "round 1".into(),
            training: Some(pb::TrainingProgress {
                task_id: tasks[1].task_id.clone(),
                epoch: 2,
                epochs: 3,
                loss: Some(0.5),
            }),
        })
        .await
        .unwrap();
    clients[3].fetch(&tasks[3].task_id).await;
    let nan = pattern(&global, |_| f32::NAN);
    assert!(clients[3].submit(&tasks[3], &nan, 10, None).await.is_err());

    let json: serde_json::Value = serde_json::from_str(status(port, &["--json"]).trim()).unwrap();
    assert_eq!(json["phase"], "training", "{json}");
    assert_eq!(
        (json["round"].as_u64(), json["rounds"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(
        json["seconds_to_deadline"]
            .as_f64()
            .is_some_and(|d| d > 0.0),
        "{json}"
    );
    let by_name = |name: &str| {
        json["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in {json}"))
            .clone()
    };
    assert_eq!(by_name("site-a")["state"], "reported");
    let b = by_name("site-b");
    assert_eq!(
        (
            &b["state"],
            b["epoch"].as_u64(),
            b["epochs"].as_u64(),
            b["loss"].as_f64()
        ),
        (&serde_json::json!("training"), Some(2), Some(3), Some(0.5)),
        "{b}"
    );
    assert_eq!(by_name("site-c")["state"], "selected");
    let d = by_name("site-d");
    assert_eq!(d["state"], "failed", "{d}");
    assert!(d["reason"].as_str().is_some_and(|r| !r.is_empty()), "{d}");
    for (i, task) in tasks.iter().enumerate() {
        assert_eq!(
            by_name(&format!("site-{}", ['a', 'b', 'c', 'd'][i]))["task_id"],
            task.task_id
        );
    }

    // The table names every client with what it does.
    let table = status(port, &[]);
    for want in [
        "round 1/1",
        "site-a",
        "reported",
        "training epoch 2/3 loss 0.5000",
        "site-c",
    ] {
        assert!(table.contains(want), "`{want}` not in\n{table}");
    }

    // --watch on a terminal (a pty from script(1)) draws the live view.
    // script(1)'s pty starts at 0 x 0; a terminal has a size.
    let command = format!(
        "stty cols 120 rows 30; exec {} status --insecure --coordinator {url} --watch --interval 200ms",
        coordinator_bin().display()
    );
    let mut watch = std::process::Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .env("TERM", "xterm")
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = watch.kill();
    let output = watch.wait_with_output().unwrap();
    let screen = visible_text(&String::from_utf8_lossy(&output.stdout));
    for want in [
        "round 1/1",
        "site-b",
        "training epoch 2/3",
        "0/1 rounds done",
    ] {
        assert!(
            screen.contains(want),
            "`{want}` not on the terminal:\n{screen}"
        );
    }

    // The round completes, and the run ends.
    for i in [1, 2] {
        clients[i].fetch(&tasks[i].task_id).await;
        clients[i]
            .submit(&tasks[i], &delta, 10, None)
            .await
            .unwrap();
    }
    for c in &mut clients {
        assert!(matches!(c.next().await, pb::task::Kind::Finished(_)));
    }
    coordinator.expect_success(Duration::from_secs(30));
}

#[test]
fn under_mutual_tls_only_the_named_admins_read_the_status() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let kits = fedtune_tests::kit_dir(&["ops", "site-a"]);
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--admins",
        "ops",
        "--model",
        "synthetic:1000",
        "--out",
        dir.path().join("out").to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(fedtune_tests::tls_serve_args());
    let _coordinator = Proc::spawn("coordinator", coordinator_bin(), &args, dir.path());
    let ask = |who: &str| {
        let kit = kits.join("clients").join(who).join("client.toml");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let out = std::process::Command::new(coordinator_bin())
                .args(["status", "--json", "--config", kit.to_str().unwrap()])
                .args(["--coordinator", &format!("https://127.0.0.1:{port}")])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            // Until the coordinator listens, the connection is refused.
            if out.status.success() || !stderr.contains("cannot connect") {
                return (
                    out.status.success(),
                    String::from_utf8(out.stdout).unwrap(),
                    stderr,
                );
            }
            assert!(std::time::Instant::now() < deadline, "{stderr}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let (ok, stdout, stderr) = ask("ops");
    assert!(ok, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(status["phase"], "waiting", "{status}");
    let (ok, _, stderr) = ask("site-a");
    assert!(!ok);
    assert!(
        stderr.contains("`site-a` may not read the run's status") && stderr.contains("--admins"),
        "{stderr}"
    );
}

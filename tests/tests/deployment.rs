//! The deployment files checked against the binaries they run (there is no container engine or
//! systemd to run them here): the compose topology started as plain processes with the commands
//! compose.yaml holds and the coordinator's health check from the Dockerfile; the libraries the
//! binaries need against what the distroless runtime image holds; the systemd units through
//! `systemd-analyze`; `deploy/install-client.sh` into a staging root.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fedtune_tests::{Proc, client_shares, free_port, workspace_root};
use yaml_rust2::{Yaml, YamlLoader};

fedtune_tests::test_binaries!();

fn deploy() -> PathBuf {
    workspace_root().join("deploy")
}

/// One compose service: what it runs (the image's target) and its command and mounts.
struct Service {
    name: String,
    target: String,
    command: Vec<String>,
    /// (host path relative to the compose file or a named volume, container path)
    mounts: Vec<(String, String)>,
    waits_for_healthy: Vec<String>,
}

fn str_list(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// compose.yaml's services, with `<<: *anchor` merged.
fn compose_services() -> Vec<Service> {
    let text = std::fs::read_to_string(deploy().join("docker/compose.yaml")).unwrap();
    let doc = &YamlLoader::load_from_str(&text).unwrap()[0];
    let services = doc["services"].as_hash().expect("services");
    services
        .iter()
        .map(|(name, s)| {
            let field = |k: &str| -> Yaml {
                match &s[k] {
                    Yaml::BadValue => s["<<"][k].clone(),
                    v => v.clone(),
                }
            };
            let waits_for_healthy = field("depends_on")
                .as_hash()
                .map(|h| {
                    h.iter()
                        .filter(|(_, c)| c["condition"].as_str() == Some("service_healthy"))
                        .filter_map(|(n, _)| n.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            Service {
                name: name.as_str().unwrap().to_string(),
                target: field("build")["target"].as_str().unwrap().to_string(),
                command: str_list(&field("command")),
                mounts: str_list(&field("volumes"))
                    .iter()
                    .map(|m| {
                        let mut p = m.split(':');
                        (p.next().unwrap().into(), p.next().unwrap().into())
                    })
                    .collect(),
                waits_for_healthy,
            }
        })
        .collect()
}

/// The JSON-array instruction `what` (HEALTHCHECK ... CMD, CMD, ENTRYPOINT) of the stage named
/// `target` in a Dockerfile, continuation lines joined.
fn dockerfile_instruction(file: &str, target: &str, what: &str) -> Vec<String> {
    let text = std::fs::read_to_string(deploy().join("docker").join(file)).unwrap();
    let joined = text.replace("\\\n", " ");
    let stage = joined
        .split("\nFROM ")
        .find(|s| {
            s.lines()
                .next()
                .is_some_and(|l| l.ends_with(&format!(" AS {target}")))
        })
        .unwrap_or_else(|| panic!("no stage {target} in {file}"));
    let line = stage
        .lines()
        .find(|l| l.starts_with(what))
        .unwrap_or_else(|| panic!("no {what} in stage {target}"));
    let json = &line[line.find('[').unwrap()..];
    serde_json::from_str(json).unwrap()
}

/// `args` with the container's paths mapped onto host folders and its listening addresses
/// onto free local ports.
fn on_host(
    args: &[String],
    mounts: &HashMap<String, PathBuf>,
    ports: &HashMap<&str, u16>,
) -> Vec<String> {
    args.iter()
        .map(|a| {
            for (container, host) in mounts {
                if let Some(rest) = a.strip_prefix(container.as_str()) {
                    return format!("{}{rest}", host.display());
                }
            }
            for (addr, port) in ports {
                if a == addr {
                    return format!("127.0.0.1:{port}");
                }
            }
            a.clone()
        })
        .collect()
}

#[test]
fn the_compose_topology_runs_as_processes_with_the_files_commands() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (grpc, metrics) = (free_port(), free_port());
    // The kits as docs/deploy.md provisions them, with this machine's address.
    let status = Command::new(coordinator_bin())
        .args(["provision", "--out"])
        .arg(root.join("kits"))
        .args([
            "--san",
            "coordinator,127.0.0.1",
            "--clients",
            "site-1,site-2,site-3",
        ])
        .args(["--url", &format!("https://127.0.0.1:{grpc}")])
        .status()
        .unwrap();
    assert!(status.success());
    for (i, share) in client_shares(&root.join("shares"), 900, 3, 1.0, 8)
        .iter()
        .enumerate()
    {
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::rename(share, root.join(format!("data/site-{}", i + 1))).unwrap();
    }
    let ports = HashMap::from([("0.0.0.0:50051", grpc), ("0.0.0.0:9464", metrics)]);

    let services = compose_services();
    assert_eq!(services.len(), 4, "a coordinator and 3 clients");
    let start = |s: &Service| {
        let mounts: HashMap<String, PathBuf> = s
            .mounts
            .iter()
            .map(|(host, container)| {
                let host = match host.strip_prefix("./") {
                    Some(rel) => root.join(rel),
                    None => root.join("volumes").join(host),
                };
                std::fs::create_dir_all(&host).unwrap();
                (container.clone(), host)
            })
            .collect();
        let program = match s.target.as_str() {
            "coordinator" => coordinator_bin(),
            "client-cpu" => client_bin(),
            t => panic!("unknown image target {t}"),
        };
        Proc::spawn(
            &s.name,
            program,
            &on_host(&s.command, &mounts, &ports),
            root,
        )
    };
    let coordinator = services.iter().find(|s| s.target == "coordinator").unwrap();
    let mut server = start(coordinator);

    // depends_on: service_healthy, with the image's own HEALTHCHECK.
    let check = dockerfile_instruction("Dockerfile", "coordinator", "HEALTHCHECK");
    let check: Vec<String> = check
        .iter()
        .map(|a| a.replace("127.0.0.1:9464", &format!("127.0.0.1:{metrics}")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !Command::new(coordinator_bin())
        .args(&check[1..])
        .status()
        .unwrap()
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "never healthy:\n{}",
            server.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut clients: Vec<Proc> = services
        .iter()
        .filter(|s| s.target == "client-cpu")
        .inspect(|s| assert_eq!(s.waits_for_healthy, ["coordinator"], "{}", s.name))
        .map(start)
        .collect();
    server.expect_success(Duration::from_secs(400));
    for c in &mut clients {
        c.expect_success(Duration::from_secs(30));
    }
    let run = root.join("volumes/run/run");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["clients_reported"] == 3), "{rows:?}");
    assert!(run.join("global.safetensors").exists());
    // The probe fails once the run is over and the coordinator gone.
    assert!(
        !Command::new(coordinator_bin())
            .args(&check[1..])
            .status()
            .unwrap()
            .success()
    );
}

#[test]
fn the_images_entrypoints_and_commands_name_real_flags() {
    for (file, target, program) in [
        ("Dockerfile", "coordinator", coordinator_bin()),
        ("Dockerfile", "client-cpu", client_bin()),
        ("Dockerfile.cuda", "client-cuda", client_bin()),
    ] {
        let cmd = dockerfile_instruction(file, target, "CMD");
        // Every flag of the default command is one the binary knows (clap refuses others).
        let help = Command::new(program)
            .args([&cmd[0], "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        for flag in cmd.iter().filter(|a| a.starts_with("--")) {
            assert!(
                help.contains(flag.as_str()),
                "{file} {target}: {flag} is not a flag of `{}`",
                cmd[0]
            );
        }
        let entry = dockerfile_instruction(file, target, "ENTRYPOINT");
        assert!(entry[0].starts_with("/usr/local/bin/fedtune-"), "{entry:?}");
    }
}

#[test]
fn distroless_cc_holds_every_library_the_binaries_need() {
    // gcr.io/distroless/cc-debian12: glibc, libgcc_s, libstdc++, libgomp.
    let mut provided = vec![
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "ld-linux-x86-64.so.2",
        "ld-linux-aarch64.so.1",
        "libstdc++.so.6",
        "libgomp.so.1",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
    ];
    if cfg!(feature = "tch") {
        // The CUDA image copies these from the torch wheel (Dockerfile.cuda).
        provided.extend([
            "libtorch.so",
            "libtorch_cpu.so",
            "libtorch_cuda.so",
            "libc10.so",
        ]);
    }
    for bin in [coordinator_bin(), client_bin()] {
        let out = Command::new("readelf")
            .arg("-d")
            .arg(bin)
            .output()
            .expect("readelf (binutils)");
        let text = String::from_utf8_lossy(&out.stdout);
        let needed: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("(NEEDED)"))
            .filter_map(|l| l.split('[').nth(1)?.split(']').next())
            .collect();
        assert!(!needed.is_empty(), "{}: {text}", bin.display());
        for lib in needed {
            assert!(
                provided.contains(&lib),
                "{} needs {lib}, which the runtime image does not hold",
                bin.display()
            );
        }
    }
}

/// `systemd-analyze`, or `None` (skipped with a line) where this machine has none and CI did
/// not ask for it (FEDTUNE_REQUIRE_FETCHED=1 makes its absence a failure).
fn systemd_analyze() -> Option<&'static str> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        assert!(
            std::env::var("FEDTUNE_REQUIRE_FETCHED").as_deref() != Ok("1"),
            "systemd-analyze is missing"
        );
        eprintln!("skipped: no systemd-analyze on this machine");
        return None;
    }
    Some("systemd-analyze")
}

/// A unit with its binary path pointed at the binary under test and its instance named.
fn unit_under_test(dir: &Path, unit: &str, instance: Option<&str>) -> PathBuf {
    let text = std::fs::read_to_string(deploy().join("systemd").join(unit)).unwrap();
    let text = text
        .replace(
            "/usr/local/bin/fedtune-coordinator",
            &coordinator_bin().display().to_string(),
        )
        .replace(
            "/usr/local/bin/fedtune-client",
            &client_bin().display().to_string(),
        );
    let name = match instance {
        Some(i) => unit.replace("@.", &format!("@{i}.")),
        None => unit.to_string(),
    };
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_systemd_units_verify_and_expose_at_most_2_0() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (unit, instance) in [
        ("fedtune-coordinator.service", None),
        ("fedtune-client@.service", Some("site-a")),
    ] {
        let path = unit_under_test(dir.path(), unit, instance);
        let verify = Command::new(analyze)
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            verify.status.success() && verify.stderr.is_empty(),
            "{unit}: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
        let security = Command::new(analyze)
            .args(["security", "--offline=yes", "--threshold=20"])
            .arg(&path)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&security.stdout);
        let level: f64 = report
            .lines()
            .find_map(|l| l.split("exposure level for ").nth(1))
            .and_then(|l| l.split(": ").nth(1)?.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{unit}: no exposure level in\n{report}"));
        eprintln!("{unit}: exposure {level}");
        assert!(
            security.status.success() && level <= 2.0,
            "{unit}: {level}\n{report}"
        );
    }
}

fn install_client(args: &[&str]) -> std::process::Output {
    Command::new("bash")
        .arg(deploy().join("install-client.sh"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn install_client_puts_binary_kit_data_and_unit_where_the_unit_looks() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let kits = fedtune_tests::kit_dir(&["site-a"]);
    let kit = kits.join("clients/site-a");
    let data = client_shares(dir.path(), 200, 1, 1.0, 1).remove(0);
    let staged = dir.path().join("root");
    let out = install_client(&[
        "--binary",
        &client_bin().display().to_string(),
        "--kit",
        &kit.display().to_string(),
        "--data",
        &data.display().to_string(),
        "--root",
        &staged.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let installed = staged.join("usr/local/bin/fedtune-client");
    assert!(
        Command::new(&installed)
            .arg("--version")
            .status()
            .unwrap()
            .success()
    );
    let key = staged.join("etc/fedtune/clients/site-a/client.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o640
    );
    assert_eq!(
        std::fs::read_link(staged.join("var/lib/fedtune-data/site-a")).unwrap(),
        data.canonicalize().unwrap()
    );
    // Every path the unit's command names for instance site-a is there in the staged root.
    let unit =
        std::fs::read_to_string(staged.join("etc/systemd/system/fedtune-client@.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    for path in exec.split_whitespace().filter(|a| a.starts_with('/')) {
        let path = staged.join(path.trim_start_matches('/').replace("%i", "site-a"));
        assert!(
            path.exists(),
            "the unit names {} , which was not installed",
            path.display()
        );
    }
    // The installed kit reads with the installed binary: the client gets as far as dialling.
    let run = Command::new(&installed)
        .args(["run", "--config"])
        .arg(staged.join("etc/fedtune/clients/site-a/client.toml"))
        .arg("--data")
        .arg(staged.join("var/lib/fedtune-data/site-a"))
        .args([
            "--coordinator",
            &format!("https://127.0.0.1:{}", free_port()),
            "--give-up-after",
            "1s",
        ])
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&run.stderr).to_string() + &String::from_utf8_lossy(&run.stdout);
    // 200 images, 10% held out for validation.
    assert!(
        said.contains("180 training and 20 validation examples"),
        "{said}"
    );
}

#[test]
fn install_client_refuses_a_kit_without_its_key_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let kit = dir.path().join("kit");
    std::fs::create_dir_all(&kit).unwrap();
    for f in ["client.toml", "client.pem", "ca.pem"] {
        std::fs::write(kit.join(f), "").unwrap();
    }
    let out = install_client(&[
        "--binary",
        &client_bin().display().to_string(),
        "--kit",
        &kit.display().to_string(),
        "--data",
        &dir.path().display().to_string(),
        "--root",
        &dir.path().join("root").display().to_string(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no client.key"), "{err}");
}

//! `fedtune-coordinator bench` as a user runs it: real client processes on 127.0.0.1, every
//! figure in the table and in the JSON.

use std::time::Duration;

use fedtune_tests::{Proc, test_binaries};

test_binaries!();

#[test]
fn bench_measures_a_real_federation_and_writes_every_figure_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let args: Vec<String> = [
        "bench",
        "--cells",
        "1Mx2",
        "--rounds",
        "2",
        "--json",
        json.to_str().unwrap(),
        "--client",
        client_bin().to_str().unwrap(),
        "--work",
        dir.path().join("work").to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut bench = Proc::spawn("bench", coordinator_bin(), &args, dir.path());
    bench.expect_success(Duration::from_secs(240));
    let out = bench.output();
    assert!(out.contains("| 1M×2 |"), "no table row:\n{out}");
    assert!(out.contains("of memcpy"), "no kernel line:\n{out}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let host = &report["host"];
    assert!(host["memcpy_gbps"].as_f64().unwrap() > 0.0);
    assert!(host["fold_gbps"].as_f64().unwrap() > 0.0);
    let loopback = host["loopback_gbps"].as_array().unwrap();
    assert_eq!(loopback.len(), 1);
    assert_eq!(loopback[0][0].as_u64(), Some(4_000_000));
    assert!(loopback[0][1].as_f64().unwrap() > 0.0);

    let cell = &report["cells"][0];
    assert_eq!(cell["params"].as_u64(), Some(1_000_000));
    assert_eq!(cell["clients"].as_u64(), Some(2));
    assert_eq!(cell["rounds"].as_u64(), Some(2));
    assert!(cell["round_s"].as_f64().unwrap() > 0.0);
    assert!(cell["effective_gbps"].as_f64().unwrap() > 0.0);
    // Peak RSS from the kernel: each process holds at least the 4 MB model.
    for who in ["coordinator_rss_bytes", "client_rss_bytes"] {
        assert!(cell[who].as_u64().unwrap() > 4_000_000, "{who}: {cell}");
    }

    let targets = report["targets"].as_array().unwrap();
    let limit_of = |what: &str| {
        targets
            .iter()
            .find(|t| t["what"].as_str().unwrap().contains(what))
            .unwrap_or_else(|| panic!("no target `{what}` in {targets:?}"))["limit"]
            .as_f64()
            .unwrap()
    };
    let mib = (1u64 << 20) as f64;
    assert!((limit_of("1M×2: coordinator") - (8e6 / mib + 100.0)).abs() < 1e-9);
    assert!((limit_of("1M×2: client") - (10e6 / mib + 100.0)).abs() < 1e-9);
    limit_of("fold kernel");
}

#[test]
fn a_malformed_cell_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let args = vec!["bench".to_string(), "--cells".into(), "10M".into()];
    let mut bench = Proc::spawn("bench", coordinator_bin(), &args, dir.path());
    let status = bench.wait(Duration::from_secs(30)).expect("exits");
    assert!(!status.success());
    let out = bench.output();
    assert!(out.contains("`10M` is not PARAMSxCLIENTS"), "{out}");
}

//! Transport security with real handshakes on 127.0.0.1: a federation set up as a user does
//! (`provision`, then `serve --config` and `run --config`), and each way in that must be
//! refused, asserted on what the refused side and the coordinator are told.

mod security_common;

use std::path::Path;
use std::time::Duration;

use fedtune_proto::federation_client::FederationClient;
use fedtune_proto::{self as pb};
use fedtune_tests::{Proc, free_port};
use security_common::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

fedtune_tests::test_binaries!();

#[test]
fn a_provisioned_federation_runs_over_mutual_tls_naming_clients_by_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let kits = dir.path().join("kits");
    provision(&kits, "site-a,site-b");
    let (mut coordinator, port) = serve(dir.path(), &kits, 2, &[]);
    let mut clients: Vec<Proc> = ["site-a", "site-b"]
        .iter()
        .map(|name| {
            let mut flags = kit_flags(&kits, name, port);
            // The name a client calls itself does not matter under mutual TLS.
            flags.extend(["--name".into(), "impostor".into()]);
            client(dir.path(), name, &flags)
        })
        .collect();
    coordinator.expect_success(Duration::from_secs(240));
    for c in &mut clients {
        c.expect_success(Duration::from_secs(30));
    }
    let log = coordinator.output();
    assert!(log.contains("mutual TLS"), "{log}");
    assert!(log.contains("round 2/2 | clients 2/2 ok"), "{log}");
    assert!(
        log.contains("client `site-a`") || log.contains("site-a"),
        "clients are named by their certificates: {log}"
    );
    assert!(!log.contains("impostor"), "{log}");
    let metrics = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let names: Vec<_> = row["clients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["client"].as_str().unwrap(),
                    c["outcome"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [("site-a", "reported"), ("site-b", "reported")],
            "metrics name clients by certificate: {line}"
        );
    }
}

#[test]
fn each_wrong_way_in_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let (kits, other) = (dir.path().join("kits"), dir.path().join("other"));
    provision(&kits, "site-a,site-c");
    provision(&other, "site-b");
    let allow = dir.path().join("allowed.txt");
    std::fs::write(&allow, "# who may join\nsite-a\n").unwrap();
    let (coordinator, port) = serve(
        dir.path(),
        &kits,
        5,
        &["--allowed-clients", allow.to_str().unwrap()],
    );
    let f = |p: &Path| p.display().to_string();
    let url = format!("https://127.0.0.1:{port}");
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            // Another federation's kit: it does not trust this coordinator.
            "trusts-another-ca",
            kit_flags(&other, "site-b", port),
            "not issued by the CA in --ca-cert",
        ),
        (
            // This federation's CA, but a certificate another CA issued.
            "cert-of-another-ca",
            vec![
                "--coordinator".into(),
                url.clone(),
                "--ca-cert".into(),
                f(&kits.join("ca/ca.pem")),
                "--cert".into(),
                f(&other.join("clients/site-b/client.pem")),
                "--key".into(),
                f(&other.join("clients/site-b/client.key")),
            ],
            "refused this client's certificate",
        ),
        (
            "no-certificate",
            vec![
                "--coordinator".into(),
                url.clone(),
                "--ca-cert".into(),
                f(&kits.join("ca/ca.pem")),
            ],
            "requires a client certificate",
        ),
        (
            // A valid certificate of this CA, but not on the allow-list.
            "not-allowed",
            kit_flags(&kits, "site-c", port),
            "client `site-c` is not on the coordinator's allow-list",
        ),
        (
            "dials-an-unnamed-host",
            {
                let mut f = kit_flags(&kits, "site-a", port);
                f.extend(["--tls-server-name".into(), "elsewhere.example".into()]);
                f
            },
            "does not name the host",
        ),
        (
            "plaintext-without-insecure",
            vec!["--coordinator".into(), format!("http://127.0.0.1:{port}")],
            "is plaintext: use https://",
        ),
        (
            // Plaintext against TLS cannot be told from a broken network: it retries, then
            // gives up saying what to check.
            "plaintext-insecure",
            vec![
                "--coordinator".into(),
                format!("http://127.0.0.1:{port}"),
                "--insecure".into(),
            ],
            "if the coordinator serves TLS, use https://",
        ),
    ];
    let mut procs: Vec<(Proc, &str)> = cases
        .into_iter()
        .map(|(name, flags, want)| (client(dir.path(), name, &flags), want))
        .collect();
    for (p, want) in &mut procs {
        let log = fails(p);
        assert!(log.contains(*want), "{}: wanted `{want}` in {log}", p.name);
    }
    // The coordinator tells each refused handshake too, naming the peer.
    let log = coordinator.output();
    for want in [
        "refused a TLS connection from 127.0.0.1:",
        "its client certificate is not issued by the client CA",
        "it presented no client certificate",
        "the client does not accept this coordinator's certificate",
        "it did not speak TLS",
        "refused client `site-c`",
    ] {
        assert!(log.contains(want), "coordinator: wanted `{want}` in {log}");
    }
}

/// A certificate for client `name` issued by `kits`' CA, valid only in 2020.
fn expired_client_certificate(kits: &Path, name: &str, out: &Path) -> (String, String) {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    let read = |p: &str| std::fs::read_to_string(kits.join(p)).unwrap();
    let issuer = Issuer::from_ca_cert_pem(
        &read("ca/ca.pem"),
        KeyPair::from_pem(&read("ca/ca.key")).unwrap(),
    )
    .unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::create_dir_all(out).unwrap();
    let (c, k) = (out.join("client.pem"), out.join("client.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c.display().to_string(), k.display().to_string())
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused_on_both_sides() {
    fedtune_proto::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let kits = dir.path().join("kits");
    provision(&kits, "site-a");
    let (cert, key) = expired_client_certificate(&kits, "site-a", &dir.path().join("expired"));
    let (coordinator, port) = serve(dir.path(), &kits, 2, &[]);
    let ca = kits.join("ca/ca.pem").display().to_string();
    let url = format!("https://127.0.0.1:{port}");

    // The client knows its own certificate is out of date before it dials.
    let mut cli = client(
        dir.path(),
        "expired",
        &[
            "--coordinator".into(),
            url.clone(),
            "--ca-cert".into(),
            ca.clone(),
            "--cert".into(),
            cert.clone(),
            "--key".into(),
            key.clone(),
        ],
    );
    let log = fails(&mut cli);
    assert!(
        log.contains(&format!(
            "--cert {cert}: this client's certificate expired on"
        )),
        "{log}"
    );

    // A peer that dials with it anyway is refused at the handshake (seen on its first call).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&ca).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(&cert).unwrap(),
            std::fs::read(&key).unwrap(),
        ));
    let channel = Endpoint::from_shared(url)
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy();
    let refused = FederationClient::new(channel)
        .join(pb::JoinRequest {
            protocol_version: fedtune_proto::PROTOCOL_VERSION,
            name: "site-a".into(),
            device: "flex".into(),
            num_examples: 10,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_ne!(refused.code(), tonic::Code::Ok);
    let started = std::time::Instant::now();
    while !coordinator.output().contains("has expired") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{}",
            coordinator.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = coordinator.output();
    assert!(
        log.contains("refused a TLS connection from 127.0.0.1:")
            && log.contains("its client certificate has expired (on 2021-01-01)"),
        "{log}"
    );
}

#[test]
fn a_renewed_certificate_and_client_ca_are_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (dir.path().join("old"), dir.path().join("new"));
    provision(&old, "site-a");
    provision(&new, "site-a");
    let live = dir.path().join("live");
    std::fs::create_dir(&live).unwrap();
    let put = |from: &Path| {
        for name in ["server.pem", "server.key", "ca.pem"] {
            std::fs::copy(from.join("coordinator").join(name), live.join(name)).unwrap();
        }
    };
    put(&old);
    let port = free_port();
    let f = |name: &str| live.join(name).display().to_string();
    let mut coordinator = Proc::spawn(
        "coordinator",
        coordinator_bin(),
        &[
            "serve",
            "--tls-cert",
            &f("server.pem"),
            "--tls-key",
            &f("server.key"),
            "--client-ca",
            &f("ca.pem"),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--rounds",
            "1",
            "--min-clients",
            "1",
            "--model",
            "mlp",
            "--out",
            dir.path().join("out").to_str().unwrap(),
        ]
        .map(String::from),
        dir.path(),
    );
    wait_for_log(&coordinator, "TLS with");
    // The operator rotates the whole federation to a new authority while the coordinator runs.
    put(&new);
    let mut c = client(dir.path(), "site-a", &kit_flags(&new, "site-a", port));
    coordinator.expect_success(Duration::from_secs(120));
    c.expect_success(Duration::from_secs(30));
    let log = coordinator.output();
    assert!(
        log.contains("TLS files") && log.contains("changed: re-read"),
        "{log}"
    );
    assert!(log.contains("round 1/1 | clients 1/1 ok"), "{log}");
}

#[test]
fn a_tls_client_against_a_plaintext_coordinator_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let kits = dir.path().join("kits");
    provision(&kits, "site-a");
    let port = free_port();
    let _coordinator = Proc::spawn(
        "coordinator",
        coordinator_bin(),
        &[
            "serve",
            "--insecure",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--out",
            dir.path().join("out").to_str().unwrap(),
        ]
        .map(String::from),
        dir.path(),
    );
    std::thread::sleep(Duration::from_secs(2));
    let mut c = client(dir.path(), "site-a", &kit_flags(&kits, "site-a", port));
    let log = fails(&mut c);
    assert!(log.contains("may serve plaintext"), "{log}");
}

async fn channel(kits: &Path, name: &str, port: u16) -> Channel {
    let read = |p: &str| std::fs::read(kits.join(p)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca/ca.pem")))
        .identity(Identity::from_pem(
            read(&format!("clients/{name}/client.pem")),
            read(&format!("clients/{name}/client.key")),
        ));
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_session_token_replayed_under_another_certificate_is_refused() {
    fedtune_proto::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let kits = dir.path().join("kits");
    provision(&kits, "site-a,site-b");
    let (_coordinator, port) = serve(dir.path(), &kits, 3, &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut a = FederationClient::new(channel(&kits, "site-a", port).await);
    let joined = a
        .join(pb::JoinRequest {
            protocol_version: fedtune_proto::PROTOCOL_VERSION,
            name: "whatever".into(),
            device: "flex".into(),
            num_examples: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let heartbeat = |token: &str| pb::HeartbeatRequest {
        session_token: token.to_string(),
        ..Default::default()
    };
    a.heartbeat(heartbeat(&joined.session_token))
        .await
        .expect("the owner may use its token");
    let mut b = FederationClient::new(channel(&kits, "site-b", port).await);
    let refused = b
        .heartbeat(heartbeat(&joined.session_token))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(
        refused
            .message()
            .contains("belongs to client `site-a`, not to client `site-b`"),
        "{refused}"
    );
}

/// Joins `name` over plaintext; the error when refused.
async fn try_join(url: &str, name: &str) -> Result<String, tonic::Status> {
    let mut rpc = FederationClient::connect(url.to_string()).await.unwrap();
    rpc.join(pb::JoinRequest {
        protocol_version: fedtune_proto::PROTOCOL_VERSION,
        name: name.into(),
        device: "test".into(),
        num_examples: 10,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().session_token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_abuse_limit_trips_and_the_others_are_still_served() {
    use fedtune_common::logging::LogFormat;
    use fedtune_coordinator::config::{SecurityArgs, ServeArgs};
    use fedtune_tests::raw::RawClient;

    let dir = tempfile::tempdir().unwrap();
    let cfg = ServeArgs {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        rounds: Some(1),
        min_available_clients: Some(2),
        // Larger than the HTTP/2 windows: an unread download stays open on the server.
        model: Some("synthetic:2M".into()),
        out: Some(dir.path().to_path_buf()),
        log_format: Some(LogFormat::Text),
        // Raw protocol clients: the limits, not TLS, are under test.
        security: SecurityArgs {
            insecure: true,
            max_clients: Some(2),
            max_streams_per_client: Some(1),
            max_joins_per_minute: Some(3),
            ..Default::default()
        },
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let listener = fedtune_coordinator::bind(&cfg).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let _server = tokio::spawn(fedtune_coordinator::serve(cfg, listener));

    let mut a = RawClient::join(&url, "a", 10).await;
    let _b = RawClient::join(&url, "b", 10).await;
    // A third live client: the federation is full.
    let full = try_join(&url, "c").await.unwrap_err();
    assert_eq!(full.code(), tonic::Code::ResourceExhausted, "{full}");
    assert!(full.message().contains("at most 2"), "{full}");
    // A fourth attempt from 127.0.0.1 within the minute: too many Joins.
    let rate = try_join(&url, "d").await.unwrap_err();
    assert_eq!(rate.code(), tonic::Code::ResourceExhausted, "{rate}");
    assert!(rate.message().contains("too many Join attempts"), "{rate}");

    // The joined clients go on: a's round starts, and its one allowed download stream is
    // open while a second is refused.
    let task = a.next_train().await;
    let fetch = |rpc: &mut FederationClient<Channel>| {
        let req = pb::FetchModelRequest {
            session_token: a.token.clone(),
            task_id: task.task_id.clone(),
            frozen_hash: 0,
            resume_offset: 0,
        };
        let mut rpc = rpc.clone();
        async move { rpc.fetch_model(req).await }
    };
    let first = fetch(&mut a.rpc).await.expect("the first stream is served");
    let second = fetch(&mut a.rpc).await.unwrap_err();
    assert_eq!(second.code(), tonic::Code::ResourceExhausted, "{second}");
    drop(first);
    // Once the first stream is gone its slot is free again.
    let mut served = false;
    for _ in 0..50 {
        if fetch(&mut a.rpc).await.is_ok() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "a slot frees when its stream ends");
}

//! The wire protocol against a real coordinator over real gRPC on 127.0.0.1, driven by raw
//! protocol clients so that every refusal can be provoked: FedAvg arithmetic, duplicate and
//! late uploads, corrupted chunks, invalid tensors, protocol versions, chunked transfer.

use std::time::Duration;

use fedtune_common::checkpoint;
use fedtune_common::logging::LogFormat;
use fedtune_common::models::ModelSpec;
use fedtune_common::tensors::TensorSet;
use fedtune_common::wire::MAX_CHUNK_BYTES;
use fedtune_coordinator::config::{SecurityArgs, ServeArgs, ServeConfig};
use fedtune_proto::federation_client::FederationClient;
use fedtune_proto::{self as pb, PROTOCOL_VERSION, submit_reply::Outcome, task::Kind};
use fedtune_tests::raw::{RawClient, pattern};
use tonic::Code;

/// ~10 MB in 10 tensors whose sizes do not divide the 1 MiB chunk size.
const MODEL: &str = "synthetic:2500003";
const SEED: u64 = 5;

fn config(out: &std::path::Path, rounds: u64, min_clients: usize) -> ServeConfig {
    ServeArgs {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        rounds: Some(rounds),
        min_available_clients: Some(min_clients),
        model: Some(MODEL.into()),
        out: Some(out.to_path_buf()),
        lr: Some(0.01),
        optimizer: Some("sgd".into()),
        round_timeout: Some(Duration::from_secs(120)),
        log_format: Some(LogFormat::Text),
        seed: Some(SEED),
        // Raw protocol clients: plaintext keeps the test about the protocol.
        security: SecurityArgs {
            insecure: true,
            ..Default::default()
        },
        ..Default::default()
    }
    .resolve()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fedavg_exactly_once_and_clear_refusals_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2, 5);
    let listener = fedtune_coordinator::bind(&cfg).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(fedtune_coordinator::serve(cfg, listener));

    // A client speaking another protocol version is refused with both versions named.
    let mut rpc = FederationClient::connect(url.clone()).await.unwrap();
    let err = rpc
        .join(pb::JoinRequest {
            protocol_version: 999,
            name: "old".into(),
            device: "x".into(),
            num_examples: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("999") && err.message().contains(&PROTOCOL_VERSION.to_string()),
        "{}",
        err.message()
    );

    let mut a = RawClient::join(&url, "a", 1).await;
    let mut b = RawClient::join(&url, "b", 3).await;
    let mut c = RawClient::join(&url, "c", 2).await;
    let mut d = RawClient::join(&url, "d", 2).await;
    let mut e = RawClient::join(&url, "e", 2).await;
    let (ta, tb, tc, td, te) = (
        a.next_train().await,
        b.next_train().await,
        c.next_train().await,
        d.next_train().await,
        e.next_train().await,
    );
    assert_eq!(ta.round, 1);

    // The broadcast arrives in chunks, bit-exact.
    let initial = ModelSpec::parse(MODEL, 10)
        .unwrap()
        .init_weights(SEED)
        .unwrap();
    assert!(initial.byte_len() > 8 << 20);
    let (global, chunks) = a.fetch_counting(&ta.task_id).await;
    assert!(
        chunks > 8,
        "a 10 MB model must travel in more than 8 chunks, got {chunks}"
    );
    for (x, y) in initial.tensors().iter().zip(global.tensors()) {
        assert_eq!(x.name, y.name);
        assert!(
            x.data
                .iter()
                .zip(&y.data)
                .all(|(p, q)| p.to_bits() == q.to_bits()),
            "{} differs",
            x.name
        );
    }

    let d1 = pattern(&global, |i| (i % 7) as f32 * 0.01);
    let d2 = pattern(&global, |i| -((i % 5) as f32) * 0.02);

    // A: accepted, then the same upload again counts once.
    assert_eq!(
        a.submit(&ta, &d1, 1, None).await.unwrap().outcome,
        Outcome::Accepted as i32
    );
    let dup = a.submit(&ta, &d1, 1, None).await.unwrap();
    assert_eq!(dup.outcome, Outcome::Duplicate as i32, "{}", dup.message);

    // B: a corrupted chunk is refused as data loss; the retry is accepted.
    let err = b.submit(&tb, &d2, 3, Some(4)).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{}", err.message());
    assert!(err.message().contains("corrupted"), "{}", err.message());
    assert_eq!(
        b.submit(&tb, &d2, 3, None).await.unwrap().outcome,
        Outcome::Accepted as i32
    );

    // C: a NaN; D: an unknown tensor; E: a wrong shape. Each is refused with the tensor named.
    let mut nan = d1.clone().into_tensors();
    nan[2].data[12345] = f32::NAN;
    let err = c
        .submit(&tc, &TensorSet::new(nan).unwrap(), 2, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains(&d1.tensors()[2].name) && err.message().contains("12345"),
        "{}",
        err.message()
    );

    let mut unknown = d1.clone().into_tensors();
    unknown[0].name = "encoder.bogus".into();
    let err = d
        .submit(&td, &TensorSet::new(unknown).unwrap(), 2, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("encoder.bogus"), "{}", err.message());

    let mut reshaped = d1.clone().into_tensors();
    let t = &mut reshaped[1];
    t.shape = vec![t.data.len()];
    let err = e
        .submit(&te, &TensorSet::new(reshaped).unwrap(), 2, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains(&d1.tensors()[1].name) && err.message().contains("shape"),
        "{}",
        err.message()
    );

    // The round closed with A and B: global += (1*d1 + 3*d2) / 4, computed by hand.
    let ta2 = a.next_train().await;
    assert_eq!(ta2.round, 2);
    let (after_round1, meta) = checkpoint::load(&dir.path().join("global.safetensors")).unwrap();
    assert_eq!(meta.get("fedtune.round").map(String::as_str), Some("1"));
    for t in initial.tensors() {
        let got = after_round1.get(&t.name).unwrap();
        for (i, (&g0, &g1)) in t.data.iter().zip(&got.data).enumerate() {
            let want = g0 as f64
                + (1.0 * ((i % 7) as f64 * 0.01) + 3.0 * (-((i % 5) as f64) * 0.02)) / 4.0;
            assert!(
                (g1 as f64 - want).abs() < 1e-5,
                "{}[{i}]: {g1} vs {want}",
                t.name
            );
        }
    }

    // C's round-1 upload arrives late: refused with the round named.
    let err = c.submit(&tc, &d1, 2, None).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("round 1 has closed")
            && err.message().contains("current round is 2"),
        "{}",
        err.message()
    );

    // Round 2: everyone sends a zero update; then the run finishes.
    let zero = pattern(&global, |_| 0.0);
    assert_eq!(
        a.submit(&ta2, &zero, 1, None).await.unwrap().outcome,
        Outcome::Accepted as i32
    );
    for client in [&mut b, &mut c, &mut d, &mut e] {
        let t = client.next_train().await;
        assert_eq!(t.round, 2);
        assert_eq!(
            client.submit(&t, &zero, 1, None).await.unwrap().outcome,
            Outcome::Accepted as i32
        );
    }
    for client in [&mut a, &mut b, &mut c, &mut d, &mut e] {
        assert!(matches!(client.next().await, Kind::Finished(_)));
    }
    let summary = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let r = &summary.records;
    assert_eq!(
        (
            r[0].clients_selected,
            r[0].clients_reported,
            r[0].clients_failed
        ),
        (5, 2, 3)
    );
    assert_eq!((r[1].clients_reported, r[1].clients_failed), (5, 0));
    // Bytes: A downloaded once in round 1. Uploads count the tensor bytes that arrived: A and
    // B's retry in full, B's corrupted attempt up to the bad chunk; C's NaN is refused as soon
    // as the chunk holding it is checked, so C counts at least through that chunk and at most
    // in full (the rest of its stream is not read); the duplicate and the uploads refused at
    // their manifest (D, E) sent none.
    let model = initial.byte_len() as u64;
    assert_eq!(r[0].bytes_down, model);
    let settled = 2 * model + 5 * MAX_CHUNK_BYTES as u64;
    let nan_at = (d1.tensors()[..2]
        .iter()
        .map(|t| t.data.len())
        .sum::<usize>()
        + 12345)
        * 4;
    let through_nan = ((nan_at / MAX_CHUNK_BYTES + 1) * MAX_CHUNK_BYTES) as u64;
    assert!(
        (settled + through_nan..=settled + model).contains(&r[0].bytes_up),
        "bytes up {} outside {}..={}",
        r[0].bytes_up,
        settled + through_nan,
        settled + model
    );
}

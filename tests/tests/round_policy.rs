//! Round policy against a real coordinator over real gRPC on 127.0.0.1, with scripted raw
//! clients: client sampling, stragglers past the deadline, failed rounds retried or stopping
//! the run, the grace period, FedProx's μ in the task, federated evaluation, and the wait for
//! clients giving up.

use std::time::Duration;

use fedtune_coordinator::config::OnRoundFailure;
use fedtune_proto::task::Kind;
use fedtune_tests::raw::{RawClient, pattern};
use fedtune_tests::scripted::{metrics, serve_args, start, worker};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sampling_selects_a_fraction_and_everyone_takes_part() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = serve_args(dir.path(), 4, 6);
    a.fraction_fit = Some(0.5);
    a.fraction_evaluate = Some(0.5);
    let (url, server) = start(a).await;
    let workers: Vec<_> = (0..6)
        .map(|i| tokio::spawn(worker(url.clone(), format!("w{i}"), 10 + i, 0.5)))
        .collect();
    let mut trained = Vec::new();
    for w in workers {
        trained.push(w.await.unwrap());
    }
    server.await.unwrap().unwrap();
    let rows = metrics(dir.path());
    assert_eq!(rows.len(), 4);
    for r in &rows {
        assert_eq!(r["clients_selected"], 3, "{r}");
        assert_eq!(r["clients_reported"], 3, "{r}");
        assert_eq!(r["fed_eval_clients"], 3, "{r}");
    }
    // Least-selected first: rounds 1-2 cover all six clients, and so do rounds 3-4.
    for (i, rounds) in trained.iter().enumerate() {
        assert_eq!(rounds.len(), 2, "w{i} trained in rounds {rounds:?}");
        assert!(rounds[0] <= 2 && rounds[1] >= 3, "w{i}: {rounds:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_straggler_is_refused_as_late_and_the_round_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = serve_args(dir.path(), 1, 2);
    a.round_timeout = Some(Duration::from_secs(2));
    a.accept_failures = Some(false);
    a.on_round_failure = Some(OnRoundFailure::Retry);
    a.round_retries = Some(1);
    let (url, server) = start(a).await;
    let mut fast = RawClient::join(&url, "fast", 5).await;
    let mut slow = RawClient::join(&url, "slow", 5).await;
    let (t_fast, t_slow) = (fast.next_train().await, slow.next_train().await);
    let g = fast.fetch(&t_fast.task_id).await;
    let d = pattern(&g, |i| (i % 3) as f32 * 0.1);
    fast.submit(&t_fast, &d, 5, None).await.unwrap();
    slow.fetch(&t_slow.task_id).await;

    // The deadline passes without `slow`: with accept_failures false, attempt 1 fails and the
    // round is retried with new tasks.
    let retry_fast = fast.next_train().await;
    assert_eq!(
        (retry_fast.round, retry_fast.task_id.as_str()),
        (1, "r1.2-c1")
    );
    let late = slow.submit(&t_slow, &d, 5, None).await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert!(
        late.message().contains("earlier attempt of round 1") && late.message().contains("late"),
        "{}",
        late.message()
    );
    let retry_slow = slow.next_train().await;
    assert_eq!(retry_slow.task_id, "r1.2-c2");
    for (c, t) in [(&mut fast, &retry_fast), (&mut slow, &retry_slow)] {
        let g = c.fetch(&t.task_id).await;
        c.submit(t, &pattern(&g, |_| 0.5), 5, None).await.unwrap();
    }
    for c in [&mut fast, &mut slow] {
        assert!(matches!(c.next().await, Kind::Finished(_)));
    }
    server.await.unwrap().unwrap();
    let rows = metrics(dir.path());
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["attempt"], 2);
    assert_eq!(rows[0]["clients_reported"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_round_stops_the_run_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = serve_args(dir.path(), 2, 2);
    a.round_timeout = Some(Duration::from_secs(2));
    a.accept_failures = Some(false);
    a.on_round_failure = Some(OnRoundFailure::Stop);
    let (url, server) = start(a).await;
    let mut fast = RawClient::join(&url, "fast", 5).await;
    let mut silent = RawClient::join(&url, "silent", 5).await;
    let t = fast.next_train().await;
    silent.next_train().await;
    let g = fast.fetch(&t.task_id).await;
    fast.submit(&t, &pattern(&g, |_| 0.1), 5, None)
        .await
        .unwrap();
    // Clients are told why the run ended.
    let Kind::Finished(f) = fast.next().await else {
        panic!("expected Finished")
    };
    assert!(
        f.reason.contains("accept_failures is false"),
        "{}",
        f.reason
    );
    let e = format!("{:#}", server.await.unwrap().unwrap_err());
    assert!(
        e.contains("round 1 failed")
            && e.contains("1 of 2 selected clients failed")
            && e.contains("run the same command again"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn federated_evaluation_is_weighted_and_the_wait_for_clients_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = serve_args(dir.path(), 2, 2);
    a.fraction_evaluate = Some(1.0);
    let (url, server) = start(a).await;
    let w1 = tokio::spawn(worker(url.clone(), "w1".into(), 100, 0.5));
    let w2 = tokio::spawn(worker(url.clone(), "w2".into(), 300, 0.9));
    w1.await.unwrap();
    w2.await.unwrap();
    server.await.unwrap().unwrap();
    for r in metrics(dir.path()) {
        assert_eq!(r["fed_eval_clients"], 2, "{r}");
        assert_eq!(r["fed_eval_examples"], 400, "{r}");
        // (100·0.5 + 300·0.9) / 400 = 0.8
        let acc = r["fed_eval_accuracy"].as_f64().unwrap();
        assert!((acc - 0.8).abs() < 1e-9, "{r}");
    }

    let dir = tempfile::tempdir().unwrap();
    let mut a = serve_args(dir.path(), 1, 2);
    a.available_timeout = Some(Duration::from_secs(1));
    let (url, server) = start(a).await;
    let mut lonely = RawClient::join(&url, "lonely", 1).await;
    let Kind::Finished(f) = lonely.next().await else {
        panic!("expected Finished")
    };
    let e = format!("{:#}", server.await.unwrap().unwrap_err());
    assert!(
        e.contains("only 1 of the 2 clients") && e.contains("--available-timeout"),
        "{e}"
    );
    assert!(f.reason.contains("only 1 of the 2"), "{}", f.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grace_period_closes_the_round_after_the_minimum_and_fedprox_sends_mu() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = serve_args(dir.path(), 1, 3);
    a.min_fit_clients = Some(2);
    a.grace_period = Some(Duration::from_secs(1));
    a.round_timeout = Some(Duration::from_secs(120));
    a.strategy = Some("fedprox".into());
    a.proximal_mu = Some(0.25);
    let (url, server) = start(a).await;
    let mut clients = Vec::new();
    for name in ["a", "b", "idle"] {
        clients.push(RawClient::join(&url, name, 4).await);
    }
    let mut tasks = Vec::new();
    for c in &mut clients {
        let t = c.next_train().await;
        assert_eq!(t.config.as_ref().unwrap().proximal_mu, 0.25);
        tasks.push(t);
    }
    for (c, t) in clients.iter_mut().zip(&tasks).take(2) {
        let g = c.fetch(&t.task_id).await;
        c.submit(t, &pattern(&g, |_| 0.1), 4, None).await.unwrap();
    }
    // `idle` is live (it joined moments ago) but never uploads: the grace period after the
    // second update, not the 120 s deadline, closes the round.
    for c in &mut clients {
        assert!(matches!(c.next().await, Kind::Finished(_)));
    }
    server.await.unwrap().unwrap();
    let rows = metrics(dir.path());
    assert_eq!(rows[0]["clients_reported"], 2);
    assert_eq!(rows[0]["clients_failed"], 1);
    assert!(
        rows[0]["round_ms"].as_u64().unwrap() < 60_000,
        "{}",
        rows[0]
    );
}

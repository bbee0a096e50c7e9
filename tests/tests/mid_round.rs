//! The open round across a coordinator killed with SIGKILL: the real coordinator binary, raw
//! scripted clients over real gRPC on 127.0.0.1. An update accepted before the kill is
//! counted once (its client's re-sent copy is answered DUPLICATE), the other selected client
//! gets its same task back when it joins again, and the round's model is exactly the model of
//! a round that was never interrupted. A damaged journaled update is not counted; its client's
//! copy is. A client that restarts mid-round gets its task back at once.

use std::path::Path;
use std::time::Duration;

use fedtune_common::checkpoint;
use fedtune_common::tensors::TensorSet;
use fedtune_proto::submit_reply::Outcome;
use fedtune_tests::raw::{RawClient, pattern};
use fedtune_tests::scripted::{metrics, serve_args, start};
use fedtune_tests::{Proc, free_port};

fedtune_tests::test_binaries!();

fn serve(port: u16, out: &Path, name: &str) -> Proc {
    let args: Vec<String> = [
        "serve",
        "--insecure",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--rounds",
        "1",
        "--min-clients",
        "2",
        "--model",
        "synthetic:5000",
        "--seed",
        "11",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    Proc::spawn(name, coordinator_bin(), &args, out.parent().unwrap())
}

fn accepted_lines(out: &Path) -> usize {
    std::fs::read_to_string(out.join("journal/accepted.jsonl"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// The largest difference between `got` and `global + Σ nᵢ·dᵢ / Σ nᵢ` (FedAvg by hand).
fn off_fedavg(got: &TensorSet, global: &TensorSet, deltas: &[(&TensorSet, u64)]) -> f32 {
    let total: u64 = deltas.iter().map(|(_, n)| n).sum();
    let mut worst = 0.0f32;
    for t in global.tensors() {
        let g = got.get(&t.name).expect("the same tensors");
        for (i, v) in t.data.iter().enumerate() {
            let sum: f64 = deltas
                .iter()
                .map(|(d, n)| f64::from(d.get(&t.name).unwrap().data[i]) * *n as f64)
                .sum();
            let want = (f64::from(*v) + sum / total as f64) as f32;
            worst = worst.max((want - g.data[i]).abs());
        }
    }
    worst
}

/// Submits `delta` for `task`, again while the coordinator answers that it is still opening.
async fn resend_while_opening(
    client: &mut RawClient,
    task: &fedtune_proto::TrainTask,
    delta: &TensorSet,
) -> fedtune_proto::SubmitReply {
    for _ in 0..100 {
        match client.submit(task, delta, 10, None).await {
            Ok(reply) => return reply,
            Err(st) if st.code() == tonic::Code::Unavailable => {
                assert!(st.message().contains("restoring"), "{}", st.message());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(st) => panic!("the re-sent update was refused: {st}"),
        }
    }
    panic!("the coordinator did not open its journaled round within 10 s")
}

async fn killed_after_one_update(damage_the_journaled_update: bool) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut first = serve(port, &out, "coordinator-1");

    let mut a = RawClient::join_when_up(&url, "a", 10).await;
    let mut b = RawClient::join_when_up(&url, "b", 30).await;
    let (ta, tb) = (a.next_train().await, b.next_train().await);
    let g0 = a.fetch(&ta.task_id).await;
    let da = pattern(&g0, |i| (i % 5) as f32 * 0.01);
    let db = pattern(&g0, |i| (i % 3) as f32 * -0.02);
    let reply = a.submit(&ta, &da, 10, None).await.unwrap();
    assert_eq!(reply.outcome, Outcome::Accepted as i32, "{}", reply.message);
    assert_eq!(accepted_lines(&out), 1, "the accepted update is journaled");

    first.signal("KILL");
    assert!(first.wait(Duration::from_secs(10)).is_some());
    if damage_the_journaled_update {
        let file = out.join("journal/u1.safetensors");
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        std::fs::write(&file, bytes).unwrap();
    }
    let mut second = serve(port, &out, "coordinator-2");

    // `a` re-sends its update under the task id of before the restart, as soon as it can: until
    // the journal's round is open again the coordinator asks it to retry (UNAVAILABLE), as a
    // real client does, keeping the update.
    let mut a = RawClient::join_when_up(&url, "a", 10).await;
    let reply = resend_while_opening(&mut a, &ta, &da).await;
    let expected = if damage_the_journaled_update {
        Outcome::Accepted
    } else {
        Outcome::Duplicate
    };
    assert_eq!(reply.outcome, expected as i32, "{}", reply.message);
    // `b` gets its own task back, on the same model, and finishes the round.
    let mut b = RawClient::join_when_up(&url, "b", 30).await;
    let again = b.next_train().await;
    assert_eq!(again.task_id, tb.task_id);
    assert_eq!(b.fetch(&again.task_id).await, g0);
    let reply = b.submit(&again, &db, 30, None).await.unwrap();
    assert_eq!(reply.outcome, Outcome::Accepted as i32, "{}", reply.message);
    second.expect_success(Duration::from_secs(60));

    // Counted once each: the coordinator's own record and the model say so.
    let rows = metrics(&out);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["clients_reported"], 2, "{}", rows[0]);
    assert_eq!(rows[0]["clients_selected"], 2, "{}", rows[0]);
    let (global, _) = checkpoint::load(&out.join("global.safetensors")).unwrap();
    let worst = off_fedavg(&global, &g0, &[(&da, 10), (&db, 30)]);
    assert!(
        worst < 1e-6,
        "the model differs from FedAvg of a and b by {worst}"
    );
    assert!(
        !out.join("journal").exists(),
        "the checkpoint replaces the journal"
    );
    if damage_the_journaled_update {
        assert!(
            second.output().contains("unusable") && second.output().contains("u1.safetensors"),
            "{}",
            second.output()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_update_accepted_before_a_kill_is_counted_once_after_the_restart() {
    killed_after_one_update(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_journaled_update_is_not_counted_and_its_client_copy_is() {
    killed_after_one_update(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_restarts_mid_round_gets_its_task_back_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (url, server) = start(serve_args(dir.path(), 1, 2)).await;
    let mut a = RawClient::join(&url, "a", 10).await;
    let mut b = RawClient::join(&url, "b", 10).await;
    let (ta, tb) = (a.next_train().await, b.next_train().await);
    // `a` dies and starts again: a new session under the same name.
    drop(a);
    let mut a = RawClient::join(&url, "a", 10).await;
    let again = tokio::time::timeout(Duration::from_secs(5), a.next_train())
        .await
        .expect("the task comes back without waiting for the old session to time out");
    assert_eq!(again.task_id, ta.task_id);
    let g = a.fetch(&again.task_id).await;
    let d = pattern(&g, |_| 0.01);
    for (c, t) in [(&mut a, &again), (&mut b, &tb)] {
        let reply = c.submit(t, &d, 10, None).await.unwrap();
        assert_eq!(reply.outcome, Outcome::Accepted as i32, "{}", reply.message);
    }
    let summary = server.await.unwrap().unwrap();
    assert_eq!(summary.records[0].clients_reported, 2);
    assert_eq!(summary.records[0].clients_failed, 0);
}

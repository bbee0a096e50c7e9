//! A client that breaks the secure-aggregation protocol, over real gRPC on 127.0.0.1 against
//! an in-process coordinator: three scripted honest clients run the real SecAgg+ steps (the
//! library's own participant), a fourth sends one malformed message. It is refused naming
//! what was wrong, and the round still completes with the other three — the coordinator
//! neither crashes nor folds anything wrong into the model.

use std::time::Duration;

use fedtune_common::logging::LogFormat;
use fedtune_common::secagg::participant::Participant;
use fedtune_common::secagg::quantize::Quantizer;
use fedtune_common::secagg::{Advertise, Revealed, SealedShare};
use fedtune_common::wire::MAX_CHUNK_BYTES;
use fedtune_common::wire_masked::encode_masked;
use fedtune_coordinator::config::{SecureAggArgs, SecurityArgs, ServeArgs};
use fedtune_proto::{self as pb, sec_agg_message::Message, sec_agg_step::Step, task::Kind};
use fedtune_tests::raw::RawClient;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tonic::Code;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Public keys of 31 bytes.
    ShortKey,
    /// One sealed share cut short.
    TruncatedShare,
    /// A masked update one word short.
    ShortMaskedUpdate,
}

async fn send(
    c: &mut RawClient,
    task_id: &str,
    m: Message,
) -> Result<pb::SubmitReply, tonic::Status> {
    c.rpc
        .submit_sec_agg(pb::SecAggMessage {
            session_token: c.token.clone(),
            task_id: task_id.into(),
            message: Some(m),
        })
        .await
        .map(|r| r.into_inner())
}

/// Plays the client's side of one securely aggregated round; with `fault`, breaks it once.
/// Returns the refusal, after asking for work until the run is over.
async fn client(mut c: RawClient, fault: Option<Fault>) -> Option<tonic::Status> {
    let refusal = round(&mut c, fault).await;
    while !matches!(c.next().await, Kind::Finished(_)) {}
    refusal
}

async fn round(c: &mut RawClient, fault: Option<Fault>) -> Option<tonic::Status> {
    let t = match c.next().await {
        Kind::Train(t) => t,
        other => panic!("expected a training task, got {other:?}"),
    };
    let spec = t
        .secagg
        .clone()
        .expect("the task asks for secure aggregation");
    let global = c.fetch(&t.task_id).await;
    let len: usize = global.tensors().iter().map(|x| x.data.len()).sum();
    let q = Quantizer::new(spec.clip, spec.bits).unwrap();
    let mut words = Vec::new();
    let mut rng = StdRng::from_rng(&mut rand::rng());
    q.quantize(&vec![0.01 * spec.weight as f32; len], &mut words, &mut rng);
    let (mut me, ad) = Participant::new(spec.participant, &spec.context, &mut rng);
    let key_len = if fault == Some(Fault::ShortKey) {
        31
    } else {
        32
    };
    let keys = pb::SecAggPublicKeys {
        participant: ad.id,
        enc_key: ad.enc_key[..key_len].to_vec().into(),
        mask_key: ad.mask_key.to_vec().into(),
    };
    if let Err(st) = send(c, &t.task_id, Message::Advertise(keys)).await {
        return Some(st);
    }
    loop {
        let step = match c.next().await {
            Kind::Secagg(s) => s.step.unwrap(),
            Kind::Finished(_) | Kind::Train(_) | Kind::Evaluate(_) => {
                panic!("the round ended before this client's steps did")
            }
            Kind::Wait(_) => continue,
        };
        match step {
            Step::ShareKeys(n) => {
                let ns: Vec<Advertise> = n
                    .neighbours
                    .iter()
                    .map(|p| Advertise {
                        id: p.participant,
                        enc_key: p.enc_key[..].try_into().unwrap(),
                        mask_key: p.mask_key[..].try_into().unwrap(),
                    })
                    .collect();
                let (sealed, commitment) = me
                    .share_keys(&ns, spec.threshold as usize, &mut rng)
                    .unwrap();
                let mut sealed: Vec<pb::SealedShare> = sealed
                    .into_iter()
                    .map(|s| pb::SealedShare {
                        from: s.from,
                        to: s.to,
                        ciphertext: s.ciphertext.into(),
                    })
                    .collect();
                if fault == Some(Fault::TruncatedShare) {
                    sealed[0].ciphertext = sealed[0].ciphertext.slice(..40);
                }
                let m = Message::Shares(pb::SecAggShares {
                    sealed,
                    commitment: commitment.to_vec().into(),
                });
                if let Err(st) = send(c, &t.task_id, m).await {
                    return Some(st);
                }
            }
            Step::Mask(m) => {
                let inbox: Vec<SealedShare> = m
                    .inbox
                    .into_iter()
                    .map(|s| SealedShare {
                        from: s.from,
                        to: s.to,
                        ciphertext: s.ciphertext.to_vec(),
                    })
                    .collect();
                assert!(me.receive(&inbox).is_empty());
                let mut out = words.clone();
                me.mask(&mut out, &m.active).unwrap();
                if fault == Some(Fault::ShortMaskedUpdate) {
                    out.pop();
                }
                let enc = encode_masked(&out, t.model_version, MAX_CHUNK_BYTES).unwrap();
                if let Err(st) = c.submit_encoded(&t, &enc, 100).await {
                    return Some(st);
                }
            }
            Step::Unmask(u) => {
                let shares = me
                    .unmask(&u.survivors, &u.dropped, spec.threshold as usize)
                    .unwrap()
                    .into_iter()
                    .map(|r| {
                        let (of, survivor, share) = match r {
                            Revealed::SelfSeed { of, share } => (of, true, share),
                            Revealed::MaskKey { of, share } => (of, false, share),
                        };
                        pb::RevealedShare {
                            of,
                            survivor,
                            x: u32::from(share.x),
                            y: share.y.into(),
                        }
                    })
                    .collect();
                send(c, &t.task_id, Message::Reveal(pb::SecAggReveal { shares }))
                    .await
                    .unwrap();
                return None;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_secure_aggregation_message_is_refused_and_the_round_goes_on() {
    for (fault, says) in [
        (Fault::ShortKey, "31 bytes, not 32"),
        (Fault::TruncatedShare, "bytes (must be from"),
        (Fault::ShortMaskedUpdate, "[1999]"),
    ] {
        let out = tempfile::tempdir().unwrap();
        let cfg = ServeArgs {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            rounds: Some(1),
            min_available_clients: Some(4),
            model: Some("synthetic:2000".into()),
            out: Some(out.path().to_path_buf()),
            log_format: Some(LogFormat::Text),
            security: SecurityArgs {
                insecure: true,
                ..Default::default()
            },
            secure_agg: SecureAggArgs {
                secure_aggregation: true,
                secagg_step_timeout: Some(Duration::from_secs(5)),
                ..Default::default()
            },
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let listener = fedtune_coordinator::bind(&cfg).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let run = tokio::spawn(fedtune_coordinator::serve(cfg, listener));
        let mut clients = Vec::new();
        for i in 0..4 {
            let c = RawClient::join(&url, &format!("site-{i}"), 100).await;
            clients.push(tokio::spawn(client(c, (i == 0).then_some(fault))));
        }
        let mut refusals = Vec::new();
        for c in clients {
            refusals.push(c.await.unwrap());
        }
        let refused = refusals[0]
            .as_ref()
            .unwrap_or_else(|| panic!("{fault:?} was accepted"));
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{fault:?}: {refused}"
        );
        assert!(
            refused.message().contains(says),
            "{fault:?}: {}",
            refused.message()
        );
        assert!(
            refusals[1..].iter().all(Option::is_none),
            "{fault:?}: {refusals:?}"
        );
        let summary = run.await.unwrap().unwrap();
        let round = &summary.records[0];
        assert_eq!(
            (round.clients_selected, round.clients_reported),
            (4, 3),
            "{fault:?}"
        );
    }
}

use fedtune_common::codec::Codec;
use fedtune_common::optim::OptimizerKind;

use super::*;
use fedtune_common::optim::LrSchedule;

/// Plaintext: these tests are about the other keys.
fn plain(a: ServeArgs) -> ServeArgs {
    ServeArgs {
        security: SecurityArgs {
            insecure: true,
            ..Default::default()
        },
        ..a
    }
}

#[test]
fn flags_override_file_and_unknown_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        "rounds = 7\nmin_clients = 4\nround_timeout = \"90s\"\nmodel = \"cnn\"\ninsecure = true\n",
    )
    .unwrap();
    let args = ServeArgs {
        config: Some(p.clone()),
        min_available_clients: Some(3),
        ..Default::default()
    };
    let cfg = args.resolve().unwrap();
    assert_eq!((cfg.rounds, cfg.policy.min_available_clients), (7, 3));
    assert_eq!(cfg.policy.round_timeout, Duration::from_secs(90));
    assert_eq!(cfg.model.kind.to_string(), "cnn");

    std::fs::write(&p, "roundz = 7\n").unwrap();
    let e = format!("{:#}", args.resolve().unwrap_err());
    assert!(e.contains("roundz"), "{e}");
    let bad = ServeArgs {
        lr: Some(-1.0),
        ..Default::default()
    };
    assert!(format!("{:#}", plain(bad).resolve().unwrap_err()).contains("lr"));
}

#[test]
fn strategy_keys_from_file_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        "insecure = true\nstrategy = \"fedadam\"\nbeta2 = 0.999\nfraction_fit = 0.5\ngrace_period = \"30s\"\non_round_failure = \"stop\"\n",
    )
    .unwrap();
    let args = ServeArgs {
        config: Some(p.clone()),
        tau: Some(0.01),
        ..Default::default()
    };
    let cfg = args.resolve().unwrap();
    assert_eq!(cfg.strategy.kind, StrategyKind::FedAdam);
    assert_eq!(cfg.strategy.server_lr, 0.01, "fedadam's default server lr");
    assert_eq!((cfg.strategy.beta2, cfg.strategy.tau), (0.999, 0.01));
    assert_eq!(cfg.strategy.fraction_fit, 0.5);
    assert_eq!(cfg.policy.grace_period, Some(Duration::from_secs(30)));
    assert_eq!(cfg.policy.on_round_failure, OnRoundFailure::Stop);

    let bad = |a: ServeArgs| format!("{:#}", plain(a).resolve().unwrap_err());
    let e = bad(ServeArgs {
        strategy: Some("fedsgd".into()),
        ..Default::default()
    });
    assert!(e.contains("fedsgd") && e.contains("krum"), "{e}");
    let e = bad(ServeArgs {
        strategy: Some("krum".into()),
        ..Default::default()
    });
    assert!(e.contains("min_fit_clients") && e.contains('4'), "{e}");
    let e = bad(ServeArgs {
        trim_fraction: Some(0.5),
        ..Default::default()
    });
    assert!(e.contains("trim_fraction"), "{e}");
    let e = bad(ServeArgs {
        fraction_fit: Some(0.0),
        ..Default::default()
    });
    assert!(e.contains("fraction_fit"), "{e}");
}

#[test]
fn recipe_keys_and_init_table() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("w.pt");
    std::fs::write(&weights, b"x").unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        format!(
            "insecure = true\nmodel = \"cnn\"\noptimizer = \"sgd\"\nmomentum = 0.9\nnesterov = true\nlr_schedule = \"cosine:0.1\"\nfreeze = \"conv1.*\"\naugment_flip = true\n[init]\nfile = {:?}\nreset_head = true\n[init.remap]\n\"^b\\\\.\" = \"\"\n\"^head\\\\.\" = \"fc2.\"\n",
            weights
        ),
    )
    .unwrap();
    let cfg = ServeArgs {
        config: Some(p.clone()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    assert_eq!(cfg.optimizer.kind, OptimizerKind::Sgd);
    assert!(cfg.optimizer.nesterov);
    assert_eq!(cfg.lr_schedule, LrSchedule::Cosine { min_factor: 0.1 });
    assert_eq!(cfg.frozen, vec!["conv1.weight", "conv1.bias"]);
    assert!(cfg.augment.flip);
    assert_eq!(cfg.init.as_deref(), Some(weights.as_path()));
    assert_eq!(cfg.init_options.reset_head.as_deref(), Some("fc2."));
    let rules: Vec<&str> = cfg
        .init_options
        .remap
        .iter()
        .map(|r| r.pattern.as_str())
        .collect();
    assert_eq!(rules, [r"^b\.", r"^head\."], "in file order");

    let bad = |a: ServeArgs| format!("{:#}", plain(a).resolve().unwrap_err());
    let e = bad(ServeArgs {
        nesterov: Some(true),
        ..Default::default()
    });
    assert!(e.contains("nesterov"), "{e}");
    let e = bad(ServeArgs {
        model: Some("cnn".into()),
        freeze: Some("conv9.*".into()),
        ..Default::default()
    });
    assert!(e.contains("conv9.*") && e.contains("conv1.weight"), "{e}");
    let e = bad(ServeArgs {
        lr_schedule: Some("linear".into()),
        ..Default::default()
    });
    assert!(e.contains("lr_schedule"), "{e}");
    let e = bad(ServeArgs {
        init_remap: vec!["no-equals".into()],
        init: Some(weights.clone()),
        ..Default::default()
    });
    assert!(e.contains("REGEX=REPLACEMENT"), "{e}");
}

#[test]
fn a_buffer_memory_too_large_to_address_is_refused_not_wrapped() {
    let args = ServeArgs {
        buffer_memory_mb: Some(u64::MAX >> 10),
        ..Default::default()
    };
    let e = format!("{:#}", plain(args).resolve().unwrap_err());
    assert!(e.contains("buffer_memory_mb"), "{e}");
    let args = ServeArgs {
        buffer_memory_mb: Some(3),
        ..Default::default()
    };
    assert_eq!(
        plain(args).resolve().unwrap().strategy.buffer_memory,
        3 << 20
    );
}

#[test]
fn tls_is_the_default_and_plaintext_must_be_asked_for() {
    let p = |s: &str| Some(PathBuf::from(s));
    let cases: Vec<(SecurityArgs, &str)> = vec![
        (SecurityArgs::default(), "provision"),
        (
            SecurityArgs {
                tls_cert: p("s.pem"),
                ..Default::default()
            },
            "without --tls-key",
        ),
        (
            SecurityArgs {
                insecure: true,
                tls_cert: p("s.pem"),
                ..Default::default()
            },
            "drop one or the other",
        ),
        (
            SecurityArgs {
                tls_cert: p("s.pem"),
                tls_key: p("s.key"),
                allowed_clients: p("allow.txt"),
                ..Default::default()
            },
            "needs `client_ca` (mutual TLS) or `client_tokens`",
        ),
    ];
    for (security, want) in cases {
        let e = format!(
            "{:#}",
            ServeArgs {
                security,
                ..Default::default()
            }
            .resolve()
            .unwrap_err()
        );
        assert!(e.contains(want), "{e}");
    }
}

#[test]
fn tls_paths_in_the_config_file_are_relative_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("coordinator.toml");
    std::fs::write(
        &p,
        "tls_cert = \"server.pem\"\ntls_key = \"/abs/server.key\"\nclient_ca = \"ca.pem\"\n",
    )
    .unwrap();
    let cfg = ServeArgs {
        config: Some(p),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    assert_eq!(
        cfg.security,
        Security::Tls(TlsFiles {
            cert: dir.path().join("server.pem"),
            key: PathBuf::from("/abs/server.key"),
            client_ca: Some(dir.path().join("ca.pem")),
            allowed_clients: None,
            client_tokens: None,
            admins: Vec::new(),
        })
    );
    assert!(cfg.security.is_mutual());
}

#[test]
fn dp_keys_from_file_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        "insecure = true\ndp = \"central\"\ndp_clip = \"adaptive\"\ndp_clipped_count_stddev = 2.0\nfraction_fit = 0.5\ndp_max_epsilon = 8.0\n",
    )
    .unwrap();
    let args = ServeArgs {
        config: Some(p),
        privacy: PrivacyArgs {
            dp_noise_multiplier: Some(1.1),
            dp_delta: Some(1e-6),
            ..Default::default()
        },
        ..Default::default()
    };
    let dp = args.resolve().unwrap().privacy.unwrap();
    assert_eq!(dp.mode, crate::strategy::dp::DpMode::Central);
    assert_eq!(dp.sample_rate, 0.5, "q is --fraction-fit");
    assert_eq!((dp.noise_multiplier, dp.delta), (1.1, Some(1e-6)));
    assert_eq!(dp.max_epsilon, Some(8.0));
    assert_eq!(
        dp.clip,
        crate::strategy::dp::ClipRule::Adaptive {
            initial: 0.1,
            target_quantile: 0.5,
            lr: 0.2,
            count_stddev: Some(2.0),
        }
    );
}

#[test]
fn dp_combinations_the_accountant_cannot_account_for_are_refused() {
    refused_from_files(&[
        (
            "dp_clip = \"1.0\"",
            &["differential privacy is off", "dp_clip"][..],
        ),
        (
            "dp = \"central\"\ndp_clip = \"1\"",
            &["dp_noise_multiplier", "dp-plan"],
        ),
        ("dp = \"central\"\ndp_noise_multiplier = 1.0", &["dp_clip"]),
        (
            "dp = \"sometimes\"",
            &["sometimes", "off, central or local"],
        ),
        (
            "dp = \"central\"\ndp_clip = \"1\"\ndp_noise_multiplier = 1.0\nstrategy = \"median\"\nmin_fit_clients = 1",
            &["cannot wrap `median`", "--dp local"],
        ),
        (
            "dp = \"central\"\ndp_clip = \"1\"\ndp_noise_multiplier = 1.0\nmin_fit_clients = 3",
            &["Poisson", "min_available_clients"],
        ),
        (
            "dp = \"central\"\ndp_clip = \"1\"\ndp_noise_multiplier = 1.0\naccept_failures = false",
            &["accept_failures"],
        ),
        (
            "dp = \"local\"\ndp_clip = \"adaptive\"\ndp_noise_multiplier = 1.0",
            &["--dp central only"],
        ),
        (
            "dp = \"central\"\ndp_clip = \"adaptive\"\ndp_noise_multiplier = 1.0\nmin_available_clients = 10",
            &["dp_clipped_count_stddev", "z/2"],
        ),
        (
            "dp = \"central\"\ndp_clip = \"1\"\ndp_noise_multiplier = 1.0\ndp_target_quantile = 0.9",
            &["`dp_target_quantile`", "adaptive` only"],
        ),
        (
            "dp = \"central\"\ndp_clip = \"-2\"\ndp_noise_multiplier = 1.0",
            &["dp_clip", "positive"],
        ),
        (
            "dp = \"central\"\ndp_clip = \"1\"\ndp_noise_multiplier = 1.0\ndp_delta = 1.5",
            &["dp_delta", "(0, 1)"],
        ),
    ]);
}

#[test]
fn secure_aggregation_combinations_it_cannot_serve_are_refused() {
    refused_from_files(&[
        (
            "secagg_threshold = 3",
            &["secure aggregation is off", "secagg_threshold"][..],
        ),
        (
            "secure_aggregation = true\nstrategy = \"krum\"",
            &["cannot run `krum`", "fedavg"],
        ),
        (
            "secure_aggregation = true\ndp = \"central\"\ndp_clip = \"1\"\ndp_noise_multiplier = 1.0",
            &["--dp central cannot combine", "--dp local"],
        ),
        (
            "secure_aggregation = true\nsecagg_neighbours = 4\nsecagg_threshold = 6",
            &["exceeds `secagg_neighbours` + 1 = 5"],
        ),
        (
            "secure_aggregation = true\nsecagg_bits = 32",
            &["1 to 30 bits"],
        ),
        (
            "secure_aggregation = true\nsecagg_clip = 0.0",
            &["clipping range", "positive"],
        ),
        (
            "secure_aggregation = true\nsecagg_step_timeout = \"0s\"",
            &["secagg_step_timeout"],
        ),
    ]);
}

#[test]
fn secure_aggregation_defaults_tolerate_a_third_of_the_round_dropping() {
    let args = plain(ServeArgs {
        secure_agg: SecureAggArgs {
            secure_aggregation: true,
            ..Default::default()
        },
        ..Default::default()
    });
    let s = args.resolve().unwrap().secure_agg.unwrap();
    // Every other client a neighbour; t = ⌊2n/3⌋ + 1 of the n shares of each secret.
    assert_eq!(s.graph(10), (9, 7));
    assert_eq!(s.graph(3), (2, 3));
    assert_eq!((s.quantizer.clip, s.quantizer.bits), (1.0, 20));
    let sparse = SecAggSettings {
        neighbours: Some(4),
        ..s
    };
    assert_eq!(sparse.graph(100), (4, 4));
}

#[test]
fn admins_without_client_authentication_are_refused() {
    let args = ServeArgs {
        security: SecurityArgs {
            insecure: true,
            admins: vec!["ops".into()],
            ..Default::default()
        },
        ..Default::default()
    };
    let e = format!("{:#}", args.resolve().unwrap_err());
    assert!(e.contains("`admins`") && e.contains("client_ca"), "{e}");
}

#[test]
fn compression_keys_are_read_and_settings_it_cannot_serve_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        "insecure = true\ncompress_up = \"topk:0.05\"\ncompress_down = \"bf16\"\n",
    )
    .unwrap();
    let from_file = |up: Option<&str>| ServeArgs {
        config: Some(p.clone()),
        compression: CompressionArgs {
            compress_up: up.map(String::from),
            compress_down: None,
        },
        ..Default::default()
    };
    let c = from_file(None).resolve().unwrap().compression;
    assert_eq!((c.up, c.down), (Codec::TopK(0.05), Codec::Bf16));
    // The flag wins over the file.
    let c = from_file(Some("int8")).resolve().unwrap().compression;
    assert_eq!((c.up, c.down), (Codec::Int8, Codec::Bf16));
    refused_from_files(&[
        (
            "compress_up = \"int4\"",
            &[
                "invalid `compress_up`",
                "fp32, fp16, bf16, int8 or topk:FRACTION",
            ][..],
        ),
        ("compress_up = \"topk:0.9\"", &["(0, 0.5]"]),
        (
            "compress_down = \"int8\"",
            &["invalid `compress_down`", "fp32, fp16 or bf16"],
        ),
        (
            "compress_up = \"int8\"\nsecure_aggregation = true",
            &["--compress-up int8 cannot combine with --secure-aggregation"],
        ),
    ]);
}

/// Each TOML snippet (after `insecure = true`) is refused with a message holding every `wants`.
fn refused_from_files(cases: &[(&str, &[&str])]) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    for (toml, wants) in cases {
        std::fs::write(&p, format!("insecure = true\n{toml}\n")).unwrap();
        let args = ServeArgs {
            config: Some(p.clone()),
            ..Default::default()
        };
        let e = format!("{:#}", args.resolve().unwrap_err());
        for want in *wants {
            assert!(e.contains(want), "{toml:?}: `{want}` not in: {e}");
        }
    }
}

#[test]
fn skew_settings_are_refused_where_they_cannot_work_naming_why() {
    let bad = |a: ServeArgs| format!("{:#}", plain(a).resolve().unwrap_err());
    let cases: [(ServeArgs, &[&str]); 5] = [
        (
            ServeArgs {
                personalize_steps: Some(10),
                ..Default::default()
            },
            &["personalize_steps", "fraction_evaluate"],
        ),
        (
            ServeArgs {
                ditto_lambda: Some(0.1),
                ..Default::default()
            },
            &["ditto_lambda", "personalize_steps"],
        ),
        (
            ServeArgs {
                ditto_lambda: Some(-1.0),
                ..Default::default()
            },
            &["ditto_lambda", ">= 0"],
        ),
        (
            ServeArgs {
                strategy: Some("scaffold".into()),
                compression: crate::config::CompressionArgs {
                    compress_up: Some("fp16".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            &["scaffold", "fp16", "variate"],
        ),
        (
            ServeArgs {
                strategy: Some("fednova".into()),
                secure_agg: crate::config::SecureAggArgs {
                    secure_aggregation: true,
                    ..Default::default()
                },
                ..Default::default()
            },
            &["fednova", "local steps"],
        ),
    ];
    for (args, words) in cases {
        let e = bad(args);
        for w in words {
            assert!(e.contains(w), "`{w}` missing from: {e}");
        }
    }
}

//! The settings files people write: the coordinator's `serve --config` TOML and a client's kit
//! (`client.toml`), then every value grammar the files spell (strategy, optimiser, learning-rate
//! schedule, log format, init layout, `[init.remap]` regexes). A bad file is refused, never a
//! panic; a value that parses prints back as itself.

#![no_main]

use std::fmt::Display;
use std::str::FromStr;

use fedtune_formats::pretrained::{Layout, Remap};
use fedtune_settings::{KitFile, LogFormat, LrSchedule, OptimizerKind, ServeFile, StrategyKind};
use libfuzzer_sys::fuzz_target;

/// Names a remap rule is tried on: a PyTorch state-dict key and a burn one.
const KEYS: [&str; 2] = ["backbone.layer1.0.conv1.weight", "classifier.fc2.bias"];

fn round_trips<T: FromStr + Display + PartialEq + std::fmt::Debug>(value: &str) {
    if let Ok(parsed) = value.parse::<T>() {
        let printed = parsed.to_string();
        match printed.parse::<T>() {
            Ok(again) => assert_eq!(again, parsed, "`{value}` printed as `{printed}`"),
            Err(_) => panic!("`{value}` printed as `{printed}`, which does not parse"),
        }
    }
}

fn grammars(value: &str) {
    round_trips::<StrategyKind>(value);
    round_trips::<OptimizerKind>(value);
    round_trips::<LrSchedule>(value);
    let _ = value.parse::<LogFormat>();
    let _ = value.parse::<Layout>();
}

fn remap(pattern: &str, replacement: &str) {
    if let Ok(rule) = Remap::new(pattern, replacement) {
        for key in KEYS {
            let _ = rule.pattern.replace_all(key, rule.replacement.as_str());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = KitFile::parse(text);
    // Each line on its own, as the value of a key or a flag.
    for line in text.lines() {
        grammars(line);
    }
    let Ok(file) = ServeFile::parse(text) else {
        return;
    };
    for value in [
        &file.strategy,
        &file.optimizer,
        &file.lr_schedule,
        &file.freeze,
    ] {
        grammars(value);
    }
    if let Ok(rules) = file.init_remap_rules() {
        for (pattern, replacement) in rules {
            remap(pattern, replacement);
        }
    }
});

//! Federations on the other data formats, with real processes: CSV rows (the real UCI digits,
//! bundled in data/digits.csv) with the `tabular-mlp` model, and image folders of PNG files.

use std::path::Path;
use std::time::Duration;

use fedtune_common::data::DataFolder;
use fedtune_tests::{Proc, client_args, fashion_subset, free_port, workspace_root};

fedtune_tests::test_binaries!();

/// Runs a federation of one client per data path; returns the final server-side accuracy.
fn federate(
    dir: &Path,
    model: &str,
    eval: &Path,
    data: &[std::path::PathBuf],
    extra: &[&str],
) -> f64 {
    let port = free_port();
    let out = dir.join("out");
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--rounds",
        "3",
        "--min-available-clients",
        &data.len().to_string(),
        "--model",
        model,
        "--eval-data",
        eval.to_str().unwrap(),
        "--local-epochs",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut coordinator = Proc::spawn("coordinator", coordinator_bin(), &args, dir);
    let mut clients: Vec<Proc> = data
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let args = client_args(port, d, &format!("site-{i}"), &[]);
            Proc::spawn(&format!("client{i}"), client_bin(), &args, dir)
        })
        .collect();
    let status = coordinator.wait(Duration::from_secs(180));
    assert!(
        status.is_some_and(|s| s.success()),
        "{}",
        coordinator.output()
    );
    for c in &mut clients {
        assert!(
            c.wait(Duration::from_secs(60)).is_some_and(|s| s.success()),
            "{}",
            c.output()
        );
    }
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    last["eval_accuracy"].as_f64().unwrap()
}

#[test]
fn csv_rows_with_tabular_mlp() {
    let dir = tempfile::tempdir().unwrap();
    let csv = std::fs::read_to_string(workspace_root().join("data/digits.csv")).unwrap();
    let mut lines = csv.lines();
    let header = lines.next().unwrap();
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 1797);
    // Two clients share the first 1,500 rows; the last 297 are the held-out test set.
    let write = |name: &str, part: &[&str]| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{header}\n{}\n", part.join("\n"))).unwrap();
        p
    };
    let clients = [
        write("a.csv", &rows[..750]),
        write("b.csv", &rows[750..1500]),
    ];
    let test = write("test.csv", &rows[1500..]);
    let acc = federate(
        dir.path(),
        "tabular-mlp:64",
        &test,
        &clients,
        &["--lr", "0.01"],
    );
    assert!(acc > 0.85, "digits test accuracy {acc}");
}

#[test]
fn image_folders_of_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let folder = DataFolder::open(&fashion_subset()).unwrap();
    // Each client gets 600 Fashion-MNIST images as PNG files in class folders named 0..9.
    let data: Vec<std::path::PathBuf> = (0..2)
        .map(|c| {
            let root = dir.path().join(format!("site{c}"));
            for i in c * 600..(c + 1) * 600 {
                let class = root.join(folder.train.labels[i].to_string());
                std::fs::create_dir_all(&class).unwrap();
                let img =
                    image::GrayImage::from_raw(28, 28, folder.train.image(i).to_vec()).unwrap();
                img.save(class.join(format!("{i}.png"))).unwrap();
            }
            root
        })
        .collect();
    let acc = federate(dir.path(), "mlp", &fashion_subset(), &data, &[]);
    assert!(acc > 0.6, "test accuracy {acc}");
}

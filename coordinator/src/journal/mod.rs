//! The open round's journal: what the coordinator needs to carry a training round on after it
//! dies in the middle of it (`<out>/journal/`).
//!
//! - `round.json`: the attempt (round, attempt, the checksum of the model it trains, the live
//!   clients it was drawn from) and its tasks with the name of the client holding each;
//!   written when the attempt opens;
//! - `u<N>.safetensors`: each update, written while it arrives (`staged`), checked and synced
//!   **before** the client hears Accepted; the aggregator folds it from there;
//! - `accepted.jsonl`: one line per accepted update (task, client, examples, metrics, file),
//!   appended and synced after its file: the line is the update's commit point. A torn last
//!   line is an update whose client never heard Accepted; it re-sends it;
//! - `closed.json`: written when the attempt closes: the tasks that did not report, and why.
//!
//! On restart, the round is opened again with the same tasks: counted ones stay counted (a
//! client that re-sends one is answered DUPLICATE), the others go back to their clients when
//! they join again (by name), and a closed attempt goes straight to aggregation. The journal
//! is removed once the round's checkpoint is written: the checkpoint is then the state.
//! Secure aggregation keeps no journal (its keys live in memory only): its attempt runs again.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use fedtune_common::checkpoint;
use fedtune_common::tensors::TensorSpec;
use serde::{Deserialize, Serialize};
use tracing::warn;

mod staged;
pub use staged::{StagedUpdate, StagedWriter};

pub const JOURNAL_DIR: &str = "journal";
const ROUND_FILE: &str = "round.json";
const ACCEPTED_FILE: &str = "accepted.jsonl";
const CLOSED_FILE: &str = "closed.json";

/// A task of the journaled attempt and the name of the client that holds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JournalTask {
    pub task_id: String,
    pub client: String,
}

/// The attempt a journal belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttemptHeader {
    pub round: u64,
    pub attempt: u32,
    /// [`checkpoint::checksum`] of the global model the attempt trains (by content, in any
    /// tensor order): a journal is only replayed onto the model its updates were computed
    /// against.
    pub model_checksum: String,
    /// Live clients when the attempt was drawn (what the strategy's `begin_round` saw).
    pub candidates: usize,
    pub tasks: Vec<JournalTask>,
}

/// One accepted update.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Accepted {
    pub task_id: String,
    pub client: String,
    pub num_examples: u64,
    pub metrics: HashMap<String, f64>,
    /// Its file in the journal folder.
    pub file: String,
}

/// A journaled attempt read back at restart.
pub struct Journaled {
    pub header: AttemptHeader,
    pub accepted: Vec<Accepted>,
    /// Set when the attempt had closed: task id -> why it did not report.
    pub closed: Option<HashMap<String, String>>,
}

/// Writes the journal of the open attempt.
pub struct Journal {
    dir: PathBuf,
    accepted: Mutex<Option<File>>,
    next_file: AtomicU64,
    next_trash: AtomicU64,
    /// The threads deleting cleared folders: joined when the journal is dropped, so a
    /// finished run leaves none behind.
    removers: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Drop for Journal {
    fn drop(&mut self) {
        for remover in std::mem::take(&mut *lock(&self.removers)) {
            let _ = remover.join();
        }
    }
}

/// A cleared journal folder on its way out: `journal.cleared-<pid>-<n>`.
const TRASH_SUFFIX: &str = ".cleared-";

fn remove_trash(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!("cannot remove {}: {e}", path.display());
    }
}

impl Journal {
    pub fn new(out: &Path) -> Self {
        Self {
            dir: out.join(JOURNAL_DIR),
            accepted: Mutex::new(None),
            next_file: AtomicU64::new(1),
            next_trash: AtomicU64::new(1),
            removers: Mutex::new(Vec::new()),
        }
    }

    /// Starts the journal of a new attempt, replacing any earlier one.
    pub fn begin(&self, header: &AttemptHeader) -> anyhow::Result<()> {
        self.clear()?;
        self.remove_leftovers();
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        write_json_atomically(&self.dir.join(ROUND_FILE), header)?;
        self.open_accepted()
    }

    /// Continues the journal of an attempt opened again after a restart.
    pub fn resume(&self, journaled: &Journaled) -> anyhow::Result<()> {
        let n = journaled
            .accepted
            .iter()
            .filter_map(|a| a.file.strip_prefix('u')?.strip_suffix(".safetensors"))
            .filter_map(|n| n.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        self.next_file.store(n + 1, Ordering::Relaxed);
        // A closed attempt opened again closes again: its old verdict goes.
        remove_if_present(&self.dir.join(CLOSED_FILE))?;
        // Rewritten with the updates counted, so that a torn last line (or one whose update
        // was unusable) is not continued by the next append.
        let path = self.dir.join(ACCEPTED_FILE);
        let tmp = path.with_extension("jsonl.tmp");
        let mut lines = String::new();
        for a in &journaled.accepted {
            lines.push_str(&serde_json::to_string(a)?);
            lines.push('\n');
        }
        std::fs::write(&tmp, lines)
            .and_then(|_| File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &path))
            .with_context(|| format!("cannot rewrite {}", path.display()))?;
        self.open_accepted()
    }

    fn open_accepted(&self) -> anyhow::Result<()> {
        let path = self.dir.join(ACCEPTED_FILE);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        checkpoint::sync_parent(&path)
            .with_context(|| format!("cannot sync {}", self.dir.display()))?;
        *lock(&self.accepted) = Some(file);
        Ok(())
    }

    /// Starts the file of an update of `specs` (in the order they arrive) whose payload
    /// hashes to `checksum` (`None`: hashed as written, for updates decoded on arrival). Called when its upload starts, outside the coordinator's locks.
    pub fn stage(
        &self,
        specs: &[TensorSpec],
        checksum: Option<u64>,
    ) -> anyhow::Result<StagedWriter> {
        let name = format!(
            "u{}.safetensors",
            self.next_file.fetch_add(1, Ordering::Relaxed)
        );
        StagedWriter::create(&self.dir, name, specs, checksum)
    }

    /// Removes an update file whose update was not counted after all.
    pub fn discard(&self, file: &str) {
        let path = self.dir.join(file);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!("cannot remove {}: {e}", path.display());
        }
    }

    /// Records an accepted update durably: its commit point.
    pub fn record(&self, accepted: &Accepted) -> anyhow::Result<()> {
        let path = self.dir.join(ACCEPTED_FILE);
        let mut guard = lock(&self.accepted);
        let file = guard
            .as_mut()
            .with_context(|| format!("{} is not open", path.display()))?;
        let line = serde_json::to_string(accepted)?;
        writeln!(file, "{line}")
            .and_then(|_| file.sync_data())
            .with_context(|| format!("cannot append to {}", path.display()))
    }

    /// Records that the attempt closed, and why each task that did not report did not.
    pub fn close(&self, unreported: &HashMap<String, String>) -> anyhow::Result<()> {
        *lock(&self.accepted) = None;
        write_json_atomically(&self.dir.join(CLOSED_FILE), unreported)
    }

    /// Removes the journal: the round it held was checkpointed, or will run again from the
    /// start.
    ///
    /// The folder is renamed away at once and deleted on another thread: unlinking a round's
    /// update files (hundreds of megabytes each) would otherwise hold up the next round.
    /// Folders left by a crash in between are deleted when the next journal starts.
    pub fn clear(&self) -> anyhow::Result<()> {
        *lock(&self.accepted) = None;
        let n = self.next_trash.fetch_add(1, Ordering::Relaxed);
        let trash = self.dir.with_file_name(format!(
            "{JOURNAL_DIR}{TRASH_SUFFIX}{}-{n}",
            std::process::id()
        ));
        match std::fs::rename(&self.dir, &trash) {
            Ok(()) => {
                let mut removers = lock(&self.removers);
                removers.retain(|r| !r.is_finished());
                removers.push(std::thread::spawn(move || remove_trash(&trash)));
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", self.dir.display())),
        }
    }

    /// Deletes journal folders that an earlier process set aside but did not finish deleting.
    fn remove_leftovers(&self) {
        let Some(out) = self.dir.parent() else { return };
        let Ok(entries) = std::fs::read_dir(out) else {
            return;
        };
        let own = format!("{JOURNAL_DIR}{TRASH_SUFFIX}{}-", std::process::id());
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{JOURNAL_DIR}{TRASH_SUFFIX}")) && !name.starts_with(&own)
            {
                remove_trash(&e.path());
            }
        }
    }

    /// The journaled attempt of `round` on `global`, if there is a usable one. A journal of
    /// another round or model is removed, with a line saying so.
    pub fn load(&self, round: u64, model_checksum: &str) -> anyhow::Result<Option<Journaled>> {
        let round_path = self.dir.join(ROUND_FILE);
        if !round_path.is_file() {
            return Ok(None);
        }
        let header: AttemptHeader = match read_json(&round_path) {
            Ok(h) => h,
            Err(e) => {
                warn!(
                    "{e:#}: the round's journal is unusable; its round runs again from the start"
                );
                self.clear()?;
                return Ok(None);
            }
        };
        if header.round != round {
            warn!(
                "{} belongs to round {}, not round {round}, the round to run: removed",
                self.dir.display(),
                header.round
            );
            self.clear()?;
            return Ok(None);
        }
        if header.model_checksum != model_checksum {
            warn!(
                "{} was written for another model than the one round {round} starts from: removed; the round runs again from the start",
                self.dir.display()
            );
            self.clear()?;
            return Ok(None);
        }
        let accepted = read_accepted(&self.dir.join(ACCEPTED_FILE), &header)?;
        let closed_path = self.dir.join(CLOSED_FILE);
        let closed = if closed_path.is_file() {
            match read_json(&closed_path) {
                Ok(c) => Some(c),
                Err(e) => {
                    // The attempt closed but its verdict is unreadable: open it again.
                    warn!("{e:#}: the round is opened again to wait for its missing updates");
                    None
                }
            }
        } else {
            None
        };
        Ok(Some(Journaled {
            header,
            accepted,
            closed,
        }))
    }

    /// An accepted update's file, checked against its checksum and the update's tensors.
    pub fn read_update(
        &self,
        accepted: &Accepted,
        specs: &[TensorSpec],
    ) -> anyhow::Result<StagedUpdate> {
        StagedUpdate::open(&self.dir.join(&accepted.file), specs)
    }
}

/// The accepted updates, in order; a torn last line (a crash while appending) is dropped: its
/// client never heard Accepted and sends the update again. Entries for tasks the attempt does
/// not hold, or repeated ones, are ignored with a warning.
fn read_accepted(path: &Path, header: &AttemptHeader) -> anyhow::Result<Vec<Accepted>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let lines: Vec<String> = std::io::BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut accepted: Vec<Accepted> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<Accepted>(line) {
            Ok(a) if !header.tasks.iter().any(|t| t.task_id == a.task_id) => warn!(
                "{} line {}: task `{}` is not one of the round's tasks: ignored",
                path.display(),
                i + 1,
                a.task_id
            ),
            Ok(a) if let Some(earlier) = accepted.iter_mut().find(|b| b.task_id == a.task_id) => {
                // Written again only after the earlier copy was found damaged at a restart.
                warn!(
                    "{} line {}: task `{}` appears again: the later copy is counted, once",
                    path.display(),
                    i + 1,
                    a.task_id
                );
                *earlier = a;
            }
            Ok(a) => accepted.push(a),
            Err(e) if i + 1 == lines.len() => warn!(
                "{} ends with a torn line ({e}): that update's client never heard Accepted and sends it again",
                path.display()
            ),
            Err(e) => anyhow::bail!(
                "{} line {} is damaged ({e}); remove the journal folder to run the round again from the start",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(accepted)
}

fn write_json_atomically(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value)?;
    std::fs::write(&tmp, bytes)
        .and_then(|_| File::open(&tmp)?.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path))
        .and_then(|_| checkpoint::sync_parent(path))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is damaged", path.display()))
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedtune_common::blocks::Blocks;
    use fedtune_common::tensors::{NamedTensor, TensorSet};
    use fedtune_common::wire::Payload;

    fn model() -> TensorSet {
        TensorSet::new(vec![
            NamedTensor::new("w", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap(),
            NamedTensor::new("b", vec![2], vec![0.5, -0.5]).unwrap(),
        ])
        .unwrap()
    }

    fn update(v: f32) -> Payload {
        let set = model();
        let specs = set.specs();
        let bytes = specs
            .iter()
            .flat_map(|s| vec![v; s.num_elements()])
            .flat_map(f32::to_le_bytes)
            .collect();
        Payload {
            manifest: Default::default(),
            specs,
            bytes,
        }
    }

    const M: &str = "xxh3:0123456789abcdef";

    fn header(round: u64, model: &str) -> AttemptHeader {
        AttemptHeader {
            round,
            attempt: 1,
            model_checksum: model.to_string(),
            candidates: 2,
            tasks: ["a", "b"]
                .iter()
                .map(|c| JournalTask {
                    task_id: format!("r{round}-{c}"),
                    client: c.to_string(),
                })
                .collect(),
        }
    }

    /// Stages an update as an upload does, in pieces that do not fall on value boundaries;
    /// with its checksum given first (raw f32) or computed as written (decoded).
    fn stage(j: &Journal, u: &Payload, checksum_first: bool) -> StagedUpdate {
        let checksum = checksum_first.then(|| xxhash_rust::xxh3::xxh3_64(&u.bytes));
        let mut w = j.stage(&u.specs, checksum).unwrap();
        for piece in u.bytes.chunks(7) {
            w.write(piece).unwrap();
        }
        w.finish().unwrap()
    }

    fn read_back(u: &dyn Blocks) -> Vec<u8> {
        let mut bytes = Vec::new();
        u.for_each_block(&mut |_, _, b| bytes.extend_from_slice(b))
            .unwrap();
        bytes
    }

    fn accept(j: &Journal, task: &str, v: f32) -> String {
        accept_staged(j, task, v, true)
    }

    fn accept_staged(j: &Journal, task: &str, v: f32, checksum_first: bool) -> String {
        let file = stage(j, &update(v), checksum_first).file_name().to_string();
        j.record(&Accepted {
            task_id: task.into(),
            client: task.into(),
            num_examples: 3,
            metrics: HashMap::new(),
            file: file.clone(),
        })
        .unwrap();
        file
    }

    #[test]
    fn an_accepted_update_reads_back_as_it_arrived_with_its_checksum_given_or_computed() {
        for checksum_first in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let j = Journal::new(dir.path());
            j.begin(&header(2, M)).unwrap();
            accept_staged(&j, "r2-a", 0.25, checksum_first);
            let back = j.load(2, M).unwrap().expect("a journal");
            assert_eq!(back.header, header(2, M));
            assert_eq!(back.accepted.len(), 1);
            assert!(back.closed.is_none());
            let u = j.read_update(&back.accepted[0], &model().specs()).unwrap();
            assert_eq!(read_back(&u), update(0.25).bytes);
        }
    }

    #[test]
    fn an_update_file_whose_data_changed_is_refused_at_restart() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        j.begin(&header(2, M)).unwrap();
        let file = accept(&j, "r2-a", 0.25);
        let path = dir.path().join(JOURNAL_DIR).join(&file);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let back = j.load(2, M).unwrap().expect("a journal");
        let err = j
            .read_update(&back.accepted[0], &model().specs())
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("does not match its checksum"),
            "{err:#}"
        );
    }

    #[test]
    fn an_upload_that_breaks_off_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        j.begin(&header(2, M)).unwrap();
        let u = update(1.0);
        let mut w = j.stage(&u.specs, Some(0)).unwrap();
        w.write(&u.bytes[..10]).unwrap();
        drop(w);
        let files: Vec<_> = std::fs::read_dir(dir.path().join(JOURNAL_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('u'))
            .collect();
        assert!(files.is_empty(), "{files:?}");
    }

    #[test]
    fn a_torn_last_line_is_an_update_not_counted() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        j.begin(&header(1, M)).unwrap();
        accept(&j, "r1-a", 1.0);
        let path = dir.path().join(JOURNAL_DIR).join(ACCEPTED_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"task_id\":\"r1-b\",\"cli").unwrap();
        let back = j.load(1, M).unwrap().unwrap();
        assert_eq!(back.accepted.len(), 1);
        assert_eq!(back.accepted[0].task_id, "r1-a");
    }

    #[test]
    fn an_update_after_a_torn_line_is_read_back_after_the_next_restart() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        j.begin(&header(1, M)).unwrap();
        accept(&j, "r1-a", 1.0);
        let path = dir.path().join(JOURNAL_DIR).join(ACCEPTED_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"task_id\":\"r1-b\",\"cli").unwrap();
        // The restart carries the round on; `b` sends its update again.
        let back = j.load(1, M).unwrap().unwrap();
        j.resume(&back).unwrap();
        accept(&j, "r1-b", 2.0);
        let again = j.load(1, M).unwrap().unwrap();
        let tasks: Vec<&str> = again.accepted.iter().map(|a| a.task_id.as_str()).collect();
        assert_eq!(tasks, ["r1-a", "r1-b"]);
    }

    #[test]
    fn a_journal_of_another_round_or_model_is_removed() {
        for (round, model) in [(3, M), (2, "xxh3:another")] {
            let dir = tempfile::tempdir().unwrap();
            let j = Journal::new(dir.path());
            j.begin(&header(2, M)).unwrap();
            accept(&j, "r2-a", 1.0);
            assert!(j.load(round, model).unwrap().is_none());
            assert!(!dir.path().join(JOURNAL_DIR).exists());
        }
    }

    #[test]
    fn a_closed_attempt_says_why_its_missing_tasks_did_not_report() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        j.begin(&header(1, M)).unwrap();
        accept(&j, "r1-a", 1.0);
        j.close(&HashMap::from([(
            "r1-b".to_string(),
            "it crashed".to_string(),
        )]))
        .unwrap();
        let back = j.load(1, M).unwrap().unwrap();
        assert_eq!(back.closed.unwrap()["r1-b"], "it crashed");
    }
}

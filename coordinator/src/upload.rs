//! An update's bytes on their way to the journal: each chunk the assembler has checked is
//! handed (without a copy) to a writer thread that checks its values are finite and appends
//! it to the update's journal file. The network and the disk overlap, and an update is never
//! held in memory whole: the coordinator's memory stays flat in the model size per upload.
//! [`Guarded`] keeps an upload's ticket so that an RPC dropped mid-upload gives its task back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use fedtune_common::blocks::FiniteCheck;
use fedtune_common::tensors::{TensorError, TensorSpec};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::journal::{StagedUpdate, StagedWriter};
use crate::round::{Federation, UploadTicket};

/// Chunks queued between the network and the writer (1 MiB each).
const QUEUE_CHUNKS: usize = 4;

/// Why staging an upload failed.
pub enum StageFailure {
    /// A value is NaN or infinite: the update is invalid.
    NonFinite(TensorError),
    /// The journal file could not be written: the coordinator's fault; the client may retry.
    Io(anyhow::Error),
}

/// An upload being staged to its journal file.
pub struct Staging {
    tx: mpsc::Sender<Bytes>,
    abandoned: Arc<AtomicBool>,
    /// `None`: the upload was abandoned (its file removed).
    writer: JoinHandle<Result<Option<StagedUpdate>, StageFailure>>,
}

impl Staging {
    /// Starts the writer thread for an update of `specs` (in the order they arrive).
    pub fn start(mut file: StagedWriter, specs: &[TensorSpec]) -> Self {
        let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE_CHUNKS);
        let abandoned = Arc::new(AtomicBool::new(false));
        let mut check = FiniteCheck::new(specs);
        let given_up = abandoned.clone();
        let writer = tokio::task::spawn_blocking(move || {
            while let Some(bytes) = rx.blocking_recv() {
                check.feed(&bytes).map_err(StageFailure::NonFinite)?;
                file.write(&bytes).map_err(StageFailure::Io)?;
            }
            if given_up.load(Ordering::Acquire) {
                // Dropping the unfinished file removes it.
                return Ok(None);
            }
            file.finish().map(Some).map_err(StageFailure::Io)
        });
        Self {
            tx,
            abandoned,
            writer,
        }
    }

    /// Queues the next checked chunk. `false` when the writer has stopped: [`Staging::finish`]
    /// says why.
    pub async fn push(&self, bytes: Bytes) -> bool {
        self.tx.send(bytes).await.is_ok()
    }

    /// Every chunk arrived and the payload checked out: the synced file, or why not.
    pub async fn finish(self) -> Result<StagedUpdate, StageFailure> {
        drop(self.tx);
        match self.writer.await {
            Ok(Ok(Some(staged))) => Ok(staged),
            Ok(Err(e)) => Err(e),
            // Only `abandon` sets the flag, and it consumes the staging.
            Ok(Ok(None)) => Err(StageFailure::Io(anyhow::anyhow!(
                "the upload was abandoned"
            ))),
            Err(e) => Err(StageFailure::Io(anyhow::anyhow!(
                "journal writer failed: {e}"
            ))),
        }
    }

    /// The upload failed: its file is removed.
    pub async fn abandon(self) {
        self.abandoned.store(true, Ordering::Release);
        drop(self.tx);
        let _ = self.writer.await;
    }
}

/// An upload's ticket that gives the task back to its client if it is dropped unused: tonic
/// drops an RPC whose connection closed at whatever `.await` it was waiting on, and the
/// upload must not stay `Uploading` (its client's retries would be refused as in progress).
pub struct Guarded {
    engine: Arc<Federation>,
    ticket: Option<UploadTicket>,
}

impl Guarded {
    pub fn new(engine: Arc<Federation>, ticket: UploadTicket) -> Self {
        Self {
            engine,
            ticket: Some(ticket),
        }
    }

    /// The ticket, for the call that commits or refuses the upload (exactly one per upload).
    pub fn take(&mut self) -> UploadTicket {
        self.ticket
            .take()
            .expect("each path of submit_update uses its ticket once")
    }
}

impl std::ops::Deref for Guarded {
    type Target = UploadTicket;
    fn deref(&self) -> &UploadTicket {
        self.ticket
            .as_ref()
            .expect("each path of submit_update uses its ticket once")
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.engine.abort_upload(ticket, None);
        }
    }
}

//! A run's output folder: after every round the history (`history.json`,
//! `history.csv`) and a [`Checkpoint`] (`checkpoint.safetensors`) are
//! written atomically (temporary file, fsync, rename), so a crash, Ctrl-C
//! or `kill -9` at any moment leaves the last complete round on disk, and
//! [`RunDir::resume`] continues from it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::checkpoint::Checkpoint;
use crate::history::{History, RunStatus};
use crate::round::{Resume, RoundObserver};
use crate::types::CoreError;

/// File names inside a run folder.
pub const HISTORY_JSON: &str = "history.json";
/// The history as CSV, one line per round.
pub const HISTORY_CSV: &str = "history.csv";
/// The latest checkpoint.
pub const CHECKPOINT: &str = "checkpoint.safetensors";

fn io(path: &Path, e: std::io::Error) -> CoreError {
    CoreError::Io(format!("{}: {e}", path.display()))
}

/// Writes `bytes` to `path` so that readers see the old or the new file,
/// never a partial one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path, e));
    }
    // Make the rename itself durable; not every file system allows this.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The output folder of one run.
pub struct RunDir {
    dir: PathBuf,
    history: Mutex<History>,
}

impl RunDir {
    /// Creates `dir` for a new run; refuses a folder that already holds a
    /// run (continue it with [`RunDir::resume`] instead).
    pub fn create(dir: &Path) -> Result<RunDir, CoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        if dir.join(HISTORY_JSON).exists() || dir.join(CHECKPOINT).exists() {
            return Err(CoreError::Invalid(format!(
                "{} already holds a run: pass --resume {0} to continue it, or choose another --out",
                dir.display()
            )));
        }
        Ok(RunDir {
            dir: dir.to_path_buf(),
            history: Mutex::new(History::new()),
        })
    }

    /// Opens the run in `dir` to continue it: its checkpoint and its
    /// history up to the checkpoint's round.
    pub fn resume(dir: &Path) -> Result<(RunDir, Resume), CoreError> {
        let path = dir.join(CHECKPOINT);
        let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
        let checkpoint = Checkpoint::from_safetensors(&bytes)
            .map_err(|e| CoreError::Invalid(format!("{}: {e}", path.display())))?;
        let hpath = dir.join(HISTORY_JSON);
        let mut history = match std::fs::read(&hpath) {
            Ok(text) => serde_json::from_slice::<History>(&text).map_err(|e| {
                CoreError::Invalid(format!("{}: not a Petal history: {e}", hpath.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => History::new(),
            Err(e) => return Err(io(&hpath, e)),
        };
        history.rounds.retain(|r| r.round <= checkpoint.round);
        history.status = RunStatus::Running;
        let run = RunDir {
            dir: dir.to_path_buf(),
            history: Mutex::new(history.clone()),
        };
        Ok((
            run,
            Resume {
                checkpoint,
                history,
            },
        ))
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn write_history(&self, history: &History) -> Result<(), CoreError> {
        let json = serde_json::to_vec_pretty(history)
            .map_err(|e| CoreError::Io(format!("serializing the history: {e}")))?;
        write_atomic(&self.dir.join(HISTORY_JSON), &json)?;
        write_atomic(&self.dir.join(HISTORY_CSV), history.to_csv().as_bytes())
    }

    /// Records how the run ended (rounds written so far are kept).
    pub fn finish(&self, status: RunStatus) -> Result<History, CoreError> {
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        h.status = status;
        self.write_history(&h)?;
        Ok(h.clone())
    }
}

impl RoundObserver for RunDir {
    /// Writes the history, then the checkpoint: the checkpoint is the
    /// commit point, so a resumed run never lacks the history of a round
    /// its checkpoint holds (a round in the history but not yet in the
    /// checkpoint is played again).
    fn round_done(&self, history: &History, checkpoint: &Checkpoint) -> Result<(), CoreError> {
        self.write_history(history)?;
        write_atomic(&self.dir.join(CHECKPOINT), &checkpoint.to_safetensors())?;
        *self.history.lock().unwrap_or_else(|e| e.into_inner()) = history.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::RoundRecord;
    use crate::types::{Parameters, Tensor};
    use std::sync::Arc;

    fn checkpoint(round: u64) -> Checkpoint {
        Checkpoint {
            round,
            parameters: Arc::new(Parameters::new(vec![
                Tensor::new(vec![1], vec![round as f32]).unwrap(),
            ])),
            names: vec!["w".into()],
            strategy_state: serde_json::Value::Null,
            sample_seed: 3,
        }
    }

    #[test]
    fn rounds_are_saved_and_resumed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let run = RunDir::create(&dir).unwrap();
        let mut h = History::new();
        for round in 1..=3 {
            h.rounds.push(RoundRecord {
                round,
                ..Default::default()
            });
            if round < 3 {
                run.round_done(&h, &checkpoint(round)).unwrap();
            }
        }
        // Round 3 was never checkpointed: it is not in the resumed history.
        let e = RunDir::create(&dir).err().unwrap().to_string();
        assert!(e.contains("--resume"), "{e}");
        let (_, resume) = RunDir::resume(&dir).unwrap();
        assert_eq!(resume.checkpoint, checkpoint(2));
        assert_eq!(resume.history.last_round(), 2);
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn finish_records_the_status() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(tmp.path()).unwrap();
        run.finish(RunStatus::Interrupted).unwrap();
        let text = std::fs::read_to_string(tmp.path().join(HISTORY_JSON)).unwrap();
        assert!(text.contains("interrupted"), "{text}");
        assert!(RunDir::resume(tmp.path()).is_err(), "no checkpoint yet");
    }
}

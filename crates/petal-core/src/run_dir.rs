//! A run's output folder: after every round the history (`history.json`,
//! `history.csv`) and a [`Checkpoint`] (`checkpoint.safetensors`) are
//! written atomically (temporary file, fsync, rename), so a crash, Ctrl-C
//! or `kill -9` at any moment leaves the last complete round on disk, and
//! [`RunDir::resume`] continues from it.
//!
//! A run folder is used by one process at a time: an exclusive lock on
//! `.lock` (held while the [`RunDir`] lives) refuses a second server with
//! the same `--out` or `--resume`. Resuming checks the checkpoint's CRC
//! and that the history holds exactly rounds 1..=R of a checkpoint after
//! round R, with the digest the checkpoint recorded.

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
/// Held locked while a process uses the folder.
pub const LOCK: &str = ".lock";

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
    /// The folder's lock, held while this value lives.
    _lock: std::fs::File,
}

/// Takes the exclusive lock of `dir` (which must exist), or says who holds it.
fn lock(dir: &Path) -> Result<std::fs::File, CoreError> {
    let path = dir.join(LOCK);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io(&path, e))?;
    match f.try_lock() {
        Ok(()) => {
            use std::io::Seek;
            let _ = f.set_len(0);
            let _ = f.seek(std::io::SeekFrom::Start(0));
            let _ = write!(f, "{}", std::process::id());
            Ok(f)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another process".to_string()
            } else {
                format!("process {holder}")
            };
            Err(CoreError::Invalid(format!(
                "{} is in use by {who}: one run folder serves one server at a time",
                dir.display()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io(&path, e)),
    }
}

impl RunDir {
    /// Creates `dir` for a new run; refuses a folder that already holds a
    /// run (continue it with [`RunDir::resume`] instead) or that another
    /// process uses.
    pub fn create(dir: &Path) -> Result<RunDir, CoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let lock = lock(dir)?;
        if dir.join(HISTORY_JSON).exists() || dir.join(CHECKPOINT).exists() {
            return Err(CoreError::Invalid(format!(
                "{} already holds a run: pass --resume {0} to continue it, or choose another --out",
                dir.display()
            )));
        }
        Ok(RunDir {
            dir: dir.to_path_buf(),
            history: Mutex::new(History::new()),
            _lock: lock,
        })
    }

    /// Opens the run in `dir` to continue it: its checkpoint and its
    /// history up to the checkpoint's round. Refuses a damaged checkpoint,
    /// a missing history, and a history that does not hold exactly the
    /// rounds the checkpoint recorded.
    pub fn resume(dir: &Path) -> Result<(RunDir, Resume), CoreError> {
        if !dir.is_dir() {
            return Err(CoreError::Invalid(format!(
                "{}: no such run folder",
                dir.display()
            )));
        }
        let lock = lock(dir)?;
        let path = dir.join(CHECKPOINT);
        let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
        let pending = Checkpoint::from_safetensors(&bytes)
            .map_err(|e| CoreError::Invalid(format!("{}: {e}", path.display())))?;
        let checkpoint = match pending.state_file.clone() {
            None => pending.checkpoint,
            Some((name, _)) => {
                let spath = dir.join(&name);
                let state = std::fs::read(&spath).map_err(|e| io(&spath, e))?;
                pending
                    .load_state(&state)
                    .map_err(|e| CoreError::Invalid(format!("{}: {e}", spath.display())))?
            }
        };
        let hpath = dir.join(HISTORY_JSON);
        let mut history = match std::fs::read(&hpath) {
            Ok(text) => serde_json::from_slice::<History>(&text).map_err(|e| {
                CoreError::Invalid(format!("{}: not a Petal history: {e}", hpath.display()))
            })?,
            Err(e) => {
                return Err(CoreError::Invalid(format!(
                    "{}: {e}; the checkpoint holds {} rounds whose history is needed to resume",
                    hpath.display(),
                    checkpoint.round
                )));
            }
        };
        history.rounds.retain(|r| r.round <= checkpoint.round);
        let numbers: Vec<u64> = history.rounds.iter().map(|r| r.round).collect();
        if !numbers.iter().copied().eq(1..=checkpoint.round) {
            let held = match (numbers.first(), numbers.last()) {
                (Some(a), Some(b)) => format!("{} records of rounds {a}..{b}", numbers.len()),
                _ => "no rounds".to_string(),
            };
            return Err(CoreError::Invalid(format!(
                "{}: holds {held}, but the checkpoint is after round {}: \
                 the history is incomplete or out of order",
                hpath.display(),
                checkpoint.round
            )));
        }
        if let Some(want) = checkpoint.history_crc32 {
            let got = crate::checkpoint::history_digest(&history, checkpoint.round);
            if got != want {
                return Err(CoreError::Invalid(format!(
                    "{}: its rounds 1..{} differ from those the checkpoint recorded \
                     (digest {got:08x}, expected {want:08x})",
                    hpath.display(),
                    checkpoint.round
                )));
            }
        }
        history.status = RunStatus::Running;
        let run = RunDir {
            dir: dir.to_path_buf(),
            history: Mutex::new(history.clone()),
            _lock: lock,
        };
        Ok((
            run,
            Resume {
                checkpoint,
                history,
            },
        ))
    }

    /// Removes strategy-state files other than `keep`.
    fn remove_stale_state(&self, keep: Option<&str>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("strategy-state-")
                && name.ends_with(".safetensors")
                && Some(name.as_str()) != keep
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
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
        // The strategy's tensors first, under the round's own name: the
        // previous round's stay until the checkpoint that names this one
        // is in place.
        let state = checkpoint.state_file();
        if let Some((name, bytes)) = &state {
            write_atomic(&self.dir.join(name), bytes)?;
        }
        write_atomic(&self.dir.join(CHECKPOINT), &checkpoint.to_safetensors())?;
        self.remove_stale_state(state.as_ref().map(|(n, _)| n.as_str()));
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
            strategy_state: crate::strategy::StrategyState::default(),
            sample_seed: 3,
            history_crc32: None,
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
        assert!(e.contains("in use by process"), "{e}");
        drop(run);
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

    fn history(rounds: &[u64]) -> History {
        let mut h = History::new();
        for &round in rounds {
            h.rounds.push(RoundRecord {
                round,
                ..Default::default()
            });
        }
        h
    }

    #[test]
    fn a_folder_serves_one_process_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let first = RunDir::create(tmp.path()).unwrap();
        let again = RunDir::create(tmp.path()).err().unwrap().to_string();
        assert!(again.contains("in use by process"), "{again}");
        first.round_done(&history(&[1]), &checkpoint(1)).unwrap();
        let resumed = RunDir::resume(tmp.path()).err().unwrap().to_string();
        assert!(resumed.contains("in use"), "{resumed}");
        drop(first);
        assert!(RunDir::resume(tmp.path()).is_ok());
    }

    #[test]
    fn a_missing_short_or_reordered_history_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(tmp.path()).unwrap();
        let h = history(&[1, 2, 3]);
        let mut c = checkpoint(3);
        c.history_crc32 = Some(crate::checkpoint::history_digest(&h, 3));
        run.round_done(&h, &c).unwrap();
        drop(run);
        assert!(RunDir::resume(tmp.path()).is_ok());
        let write = |h: &History| {
            std::fs::write(
                tmp.path().join(HISTORY_JSON),
                serde_json::to_vec(h).unwrap(),
            )
            .unwrap()
        };
        for (bad, want) in [
            (history(&[1, 2]), "holds 2 records of rounds 1..2"),
            (history(&[1, 3, 2]), "out of order"),
            (history(&[]), "no rounds"),
        ] {
            write(&bad);
            let e = RunDir::resume(tmp.path()).err().unwrap().to_string();
            assert!(e.contains(want), "{e}");
        }
        let mut changed = h.clone();
        changed.rounds[1].loss = Some(0.5);
        write(&changed);
        let e = RunDir::resume(tmp.path()).err().unwrap().to_string();
        assert!(
            e.contains("differ from those the checkpoint recorded"),
            "{e}"
        );
        std::fs::remove_file(tmp.path().join(HISTORY_JSON)).unwrap();
        let e = RunDir::resume(tmp.path()).err().unwrap().to_string();
        assert!(e.contains("history is needed"), "{e}");
        write(&h);
        assert!(RunDir::resume(tmp.path()).is_ok());
    }

    #[test]
    fn strategy_state_tensors_resume_and_old_ones_go() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(tmp.path()).unwrap();
        let mut h = History::new();
        for round in 1..=2 {
            h.rounds.push(RoundRecord {
                round,
                ..Default::default()
            });
            let mut c = checkpoint(round);
            c.strategy_state.tensors = vec![(
                "m.0".into(),
                Tensor::new(vec![1], vec![round as f32]).unwrap(),
            )];
            c.history_crc32 = Some(crate::checkpoint::history_digest(&h, round));
            run.round_done(&h, &c).unwrap();
        }
        assert!(!tmp.path().join("strategy-state-1.safetensors").exists());
        drop(run);
        let (_, r) = RunDir::resume(tmp.path()).unwrap();
        assert_eq!(r.checkpoint.strategy_state.tensors[0].1.data, vec![2.0f32]);
        std::fs::remove_file(tmp.path().join("strategy-state-2.safetensors")).unwrap();
        let e = RunDir::resume(tmp.path()).err().unwrap().to_string();
        assert!(e.contains("strategy-state-2.safetensors"), "{e}");
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

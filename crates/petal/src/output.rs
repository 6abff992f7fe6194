//! Everything this process writes to stderr goes through [`write_whole`]:
//! log lines, and the lines of the client processes `petal run` starts
//! (relayed a whole line at a time). Writes never interleave mid-line, and
//! the progress bar is lifted while a line is written.

use std::io::Write;
use std::sync::Mutex;

/// The progress bar on screen, if any.
static BAR: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

fn bar() -> std::sync::MutexGuard<'static, Option<indicatif::ProgressBar>> {
    BAR.lock().unwrap_or_else(|e| e.into_inner())
}

/// Shows `bar` (or no bar) from now on.
pub fn set_bar(b: Option<indicatif::ProgressBar>) {
    *bar() = b;
}

/// `bar` drawn with `template` (indicatif's syntax).
pub fn styled_bar(bar: indicatif::ProgressBar, template: &str) -> indicatif::ProgressBar {
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// Stops lifting `bar` for log lines and clears it.
pub fn finish_bar(bar: Option<&indicatif::ProgressBar>) {
    set_bar(None);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

/// Writes `bytes` (whole lines) to stderr in one piece, the bar lifted.
pub fn write_whole(bytes: &[u8]) {
    let guard = bar();
    let write = || {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(bytes);
        let _ = err.flush();
    };
    match &*guard {
        Some(b) => b.suspend(write),
        None => write(),
    }
}

/// The log's writer: each event is formatted whole, then written by
/// [`write_whole`].
#[derive(Clone, Copy, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        write_whole(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter
    }
}

/// Relays `stream` (a child's stderr) to ours a whole line at a time.
pub async fn relay_lines(stream: impl tokio::io::AsyncRead + Unpin) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match lines.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if line.last() != Some(&b'\n') {
                    line.push(b'\n');
                }
                write_whole(&line);
            }
        }
    }
}

//! The record of a run: one [`RoundRecord`] per round, saved as JSON and CSV.

use serde::{Deserialize, Serialize};

use crate::strategy::EvaluateSummary;
use crate::types::{Metrics, NodeId};

/// Why one client's call did not count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// The client, when the failure belongs to one.
    pub node: Option<NodeId>,
    /// `fit`, `evaluate` or `get_parameters`.
    pub phase: String,
    /// What went wrong.
    pub reason: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.node {
            Some(n) => write!(f, "{n}: {} failed: {}", self.phase, self.reason),
            None => write!(f, "{} failed: {}", self.phase, self.reason),
        }
    }
}

/// What happened in one round.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RoundRecord {
    /// 1-based round number.
    pub round: u64,
    /// Why the round did not train (e.g. too few clients connected);
    /// `null` when it did.
    pub skipped: Option<String>,
    /// Clients whose training result was aggregated.
    pub fit_results: usize,
    /// Clients whose training failed, timed out or was rejected.
    pub fit_failures: usize,
    /// Aggregated fit metrics (default: example-weighted means, e.g. `train_loss`).
    pub fit_metrics: Metrics,
    /// Clients whose evaluation was aggregated.
    pub eval_results: usize,
    /// Clients whose evaluation failed.
    pub eval_failures: usize,
    /// Example-weighted distributed loss (null when no client evaluated).
    pub loss: Option<f64>,
    /// Example-weighted distributed accuracy (null when no client reported one).
    pub accuracy: Option<f64>,
    /// Every other aggregated evaluation metric.
    pub metrics: Metrics,
    /// Server-side evaluation of the new global model, when the strategy has one.
    pub centralized: Option<EvaluateSummary>,
    /// Why each failure happened.
    pub failures: Vec<Failure>,
    /// Seconds this round took.
    pub round_seconds: f64,
    /// Seconds since the run started, at the end of this round.
    pub elapsed_seconds: f64,
}

/// Drops values that are not finite numbers (JSON cannot hold them, and a
/// history must always read back), saying which.
fn keep_finite(what: &str, m: &mut Metrics) {
    m.retain(|k, v| {
        let keep = v.is_finite();
        if !keep {
            tracing::warn!("{what} '{k}' is {v}; not recorded");
        }
        keep
    });
}

fn finite(what: &str, v: &mut Option<f64>) {
    if let Some(x) = *v
        && !x.is_finite()
    {
        tracing::warn!("{what} is {x}; not recorded");
        *v = None;
    }
}

impl EvaluateSummary {
    /// Removes the values that are not finite (see [`RoundRecord::finite_only`]).
    pub fn finite_only(&mut self) {
        finite("centralized loss", &mut self.loss);
        keep_finite("centralized metric", &mut self.metrics);
    }
}

impl RoundRecord {
    /// Removes every value that is not a finite number, with a warning:
    /// JSON would write it as `null`, and the history would not read back.
    pub fn finite_only(&mut self) {
        finite("loss", &mut self.loss);
        finite("accuracy", &mut self.accuracy);
        keep_finite("fit metric", &mut self.fit_metrics);
        keep_finite("metric", &mut self.metrics);
        if let Some(c) = &mut self.centralized {
            c.finite_only();
        }
    }
}

/// How a run ended (or that it has not yet).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Rounds are still being played.
    #[default]
    Running,
    /// Every round was played.
    Completed,
    /// Stopped by a signal (Ctrl-C, SIGTERM).
    Interrupted,
    /// Stopped by an error, with its message.
    Failed(String),
}

/// The whole run, as written to `history.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Format version of this document.
    pub schema: u32,
    /// How the run ended.
    pub status: RunStatus,
    /// Server-side evaluation of the initial model, when the strategy has one.
    pub initial_centralized: Option<EvaluateSummary>,
    /// One entry per round played (skipped rounds included).
    pub rounds: Vec<RoundRecord>,
}

/// Columns of `history.csv`.
const CSV_HEADER: &str = "round,skipped,fit_results,fit_failures,eval_results,eval_failures,\
loss,accuracy,train_loss,centralized_loss,centralized_accuracy,round_seconds,elapsed_seconds";

impl History {
    /// An empty history of the current schema.
    pub fn new() -> Self {
        History {
            schema: 2,
            ..Default::default()
        }
    }

    /// The last round played, 0 before the first.
    pub fn last_round(&self) -> u64 {
        self.rounds.last().map_or(0, |r| r.round)
    }

    /// One line per round, for spreadsheets and plotting tools.
    pub fn to_csv(&self) -> String {
        let num = |v: Option<f64>| v.map_or(String::new(), |x| x.to_string());
        let mut s = String::from(CSV_HEADER);
        s.push('\n');
        for r in &self.rounds {
            let central = r.centralized.as_ref();
            let skipped = r
                .skipped
                .as_deref()
                .map(|s| format!("\"{}\"", s.replace('"', "\"\"")))
                .unwrap_or_default();
            s.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{},{},{:.3},{:.3}\n",
                r.round,
                skipped,
                r.fit_results,
                r.fit_failures,
                r.eval_results,
                r.eval_failures,
                num(r.loss),
                num(r.accuracy),
                num(r.fit_metrics.get("train_loss").copied()),
                num(central.and_then(|c| c.loss)),
                num(central.and_then(|c| c.metrics.get("accuracy").copied())),
                r.round_seconds,
                r.elapsed_seconds
            ));
        }
        s
    }

    /// A human summary like Flower's, one line per round (empty without rounds).
    pub fn summary(&self) -> String {
        if self.rounds.is_empty() {
            return String::new();
        }
        let f = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{x:.4}"));
        let server = |c: Option<&EvaluateSummary>| {
            c.map_or(String::new(), |c| {
                format!(
                    "; server: loss {} accuracy {}",
                    f(c.loss),
                    f(c.metrics.get("accuracy").copied())
                )
            })
        };
        let mut s = String::from("History (distributed loss and accuracy");
        let any_server = self.initial_centralized.is_some()
            || self.rounds.iter().any(|r| r.centralized.is_some());
        s.push_str(if any_server {
            "; the server's own evaluation):\n"
        } else {
            "):\n"
        });
        if self.initial_centralized.is_some() {
            s.push_str(&format!(
                "  round 0{}\n",
                server(self.initial_centralized.as_ref()).replacen(';', ":", 1)
            ));
        }
        for r in &self.rounds {
            if let Some(why) = &r.skipped {
                s.push_str(&format!("  round {}: skipped ({why})\n", r.round));
                continue;
            }
            s.push_str(&format!(
                "  round {}: loss {} accuracy {} (fit {}/{} ok, eval {}/{} ok, {:.1}s){}\n",
                r.round,
                f(r.loss),
                f(r.accuracy),
                r.fit_results,
                r.fit_results + r.fit_failures,
                r.eval_results,
                r.eval_results + r.eval_failures,
                r.round_seconds,
                server(r.centralized.as_ref())
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_has_one_line_per_round_and_quotes_reasons() {
        let mut h = History::new();
        h.rounds.push(RoundRecord {
            round: 1,
            loss: Some(0.5),
            accuracy: Some(0.75),
            fit_metrics: [("train_loss".to_string(), 1.25)].into(),
            ..Default::default()
        });
        h.rounds.push(RoundRecord {
            round: 2,
            skipped: Some("only 1 \"client\", 2 needed".into()),
            ..Default::default()
        });
        let csv = h.to_csv();
        let lines: Vec<_> = csv.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].split(',').count(), 13);
        assert!(
            lines[1].starts_with("1,,0,0,0,0,0.5,0.75,1.25,,,"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with("2,\"only 1 \"\"client\"\", 2 needed\","),
            "{}",
            lines[2]
        );
        assert!(h.summary().contains("round 2: skipped"));
    }

    #[test]
    fn a_history_with_non_finite_values_reads_back() {
        let mut r = RoundRecord {
            round: 1,
            loss: Some(f64::INFINITY),
            accuracy: Some(0.5),
            fit_metrics: [("a".to_string(), f64::NAN), ("b".to_string(), 1.0)].into(),
            centralized: Some(EvaluateSummary {
                loss: Some(f64::NAN),
                metrics: [("accuracy".to_string(), f64::NEG_INFINITY)].into(),
            }),
            ..Default::default()
        };
        let mut h = History::new();
        h.rounds.push(r.clone());
        let json = serde_json::to_string(&h).unwrap();
        assert!(serde_json::from_str::<History>(&json).is_err(), "{json}");
        r.finite_only();
        h.rounds[0] = r;
        let json = serde_json::to_string(&h).unwrap();
        let back: History = serde_json::from_str(&json).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.rounds[0].fit_metrics.len(), 1);
        assert_eq!(back.rounds[0].accuracy, Some(0.5));
    }

    #[test]
    fn status_serializes_readably() {
        let mut h = History::new();
        h.status = RunStatus::Failed("boom".into());
        let json = serde_json::to_string(&h).unwrap();
        assert!(json.contains(r#""status":{"failed":"boom"}"#), "{json}");
        let back: History = serde_json::from_str(&json).unwrap();
        assert_eq!(back, h);
    }
}

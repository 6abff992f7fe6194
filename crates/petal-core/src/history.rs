//! The record of a run: one [`RoundRecord`] per round, saved as JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What happened in one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// 1-based round number.
    pub round: u64,
    /// Clients whose training result was aggregated.
    pub fit_results: usize,
    /// Clients whose training failed, timed out or was rejected.
    pub fit_failures: usize,
    /// Clients whose evaluation was aggregated.
    pub eval_results: usize,
    /// Clients whose evaluation failed.
    pub eval_failures: usize,
    /// Example-weighted distributed loss (null when no client evaluated).
    pub loss: Option<f64>,
    /// Example-weighted distributed accuracy (null when no client reported one).
    pub accuracy: Option<f64>,
    /// Every other aggregated evaluation metric.
    pub metrics: BTreeMap<String, f64>,
    /// Why each failure happened, `"<cid>: <reason>"`.
    pub failures: Vec<String>,
    /// Seconds this round took.
    pub round_seconds: f64,
    /// Seconds since the run started, at the end of this round.
    pub elapsed_seconds: f64,
}

/// The whole run, as written by `--history`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Format version of this document.
    pub schema: u32,
    /// One entry per completed round.
    pub rounds: Vec<RoundRecord>,
}

impl History {
    /// An empty history of the current schema.
    pub fn new() -> Self {
        History {
            schema: 1,
            rounds: Vec::new(),
        }
    }

    /// A human summary like Flower's, one line per round.
    pub fn summary(&self) -> String {
        let mut s = String::from("History (distributed loss and accuracy):\n");
        for r in &self.rounds {
            let f = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{x:.4}"));
            s.push_str(&format!(
                "  round {}: loss {} accuracy {} (fit {}/{} ok, eval {}/{} ok, {:.1}s)\n",
                r.round,
                f(r.loss),
                f(r.accuracy),
                r.fit_results,
                r.fit_results + r.fit_failures,
                r.eval_results,
                r.eval_results + r.eval_failures,
                r.round_seconds
            ));
        }
        s
    }
}

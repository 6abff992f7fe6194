//! Python learners in Petal's clients: the user's training code, unchanged
//! (anything with Flower's `NumPyClient` methods, a real
//! `flwr.client.NumPyClient` included), behind a [`petal_core::Client`].
//!
//! The seed ran every train and test step in a freshly spawned interpreter
//! so that the GPU's memory came back when the step ended, paying the
//! interpreter start and `import torch` every time. Here a client process
//! starts one warm Python parent that imports the learner's module once and
//! forks a child per step ([`Mode::Fork`]): the child exits when the step
//! ends, returning all its memory, host and device, while the imports are
//! paid once. With [`Mode::Inline`] learners stay in long-lived Python
//! processes. Either way many logical clients share the processes, tensors
//! keep their dtypes (bfloat16 and int64 buffers included) and names, and a
//! learner that raises, dies, hangs or prints is that step's failure or a
//! log line, never a crash of the client.
//!
//! The Python side is `python/petal_learner/worker.py` (run from Petal's
//! own copy, so only NumPy is needed); [`frame`] is the protocol.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod frame;
mod worker;

use std::sync::{Arc, Mutex};

use petal_core::{
    Client, Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, names_property,
};
use serde_json::Value;

pub use worker::{Mode, PythonSpec, WorkerPool};

use crate::frame::{TensorMeta, config_to_json, metrics_from_json, pack, unpack};

/// One logical client whose learner is Python code.
pub struct PythonClient {
    pool: Arc<WorkerPool>,
    partition_id: usize,
    num_partitions: usize,
    /// The learner's tensor names, once a reply carried them.
    names: Arc<Mutex<Vec<String>>>,
}

impl PythonClient {
    /// The client of partition `partition_id` of `num_partitions`.
    pub fn new(pool: Arc<WorkerPool>, partition_id: usize, num_partitions: usize) -> Self {
        PythonClient {
            pool,
            partition_id,
            num_partitions,
            names: Arc::default(),
        }
    }

    fn err(&self, why: String) -> CoreError {
        CoreError::Local(why)
    }

    fn call(
        &self,
        op: &str,
        config: &Config,
        parameters: Option<&Parameters>,
    ) -> Result<(Value, Option<Parameters>), CoreError> {
        let start = std::time::Instant::now();
        let (metas, chunks) = parameters.map(pack).unwrap_or_default();
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let frame = self
            .pool
            .call(
                self.partition_id,
                self.num_partitions,
                op,
                config_to_json(config),
                serde_json::to_value(&metas).unwrap_or(Value::Null),
                &refs,
            )
            .map_err(|e| self.err(e))?;
        let metas: Vec<TensorMeta> = match frame.header.get("tensors") {
            None | Some(Value::Null) => Vec::new(),
            Some(t) => serde_json::from_value(t.clone())
                .map_err(|e| self.err(format!("a reply with bad tensors: {e}")))?,
        };
        let params = if op == "evaluate" {
            None
        } else {
            let p = unpack(&metas, &frame.body).map_err(|e| self.err(e))?;
            if !p.names.is_empty() {
                *self.names.lock().unwrap_or_else(|e| e.into_inner()) = p.names.clone();
            }
            Some(p)
        };
        let call_ms = start.elapsed().as_secs_f64() * 1000.0;
        let learner_ms = frame
            .header
            .get("learner_ms")
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN);
        tracing::debug!(
            "PETAL-STEP {op} partition={} call_ms={call_ms:.1} learner_ms={learner_ms:.1} overhead_ms={:.1}",
            self.partition_id,
            call_ms - learner_ms
        );
        Ok((frame.header, params))
    }
}

fn examples(header: &Value) -> Result<u64, CoreError> {
    header
        .get("num_examples")
        .and_then(Value::as_u64)
        .ok_or_else(|| CoreError::Local("the learner gave no num_examples".into()))
}

impl Client for PythonClient {
    fn get_parameters(&mut self, config: &Config) -> Result<Parameters, CoreError> {
        let (_, p) = self.call("get_parameters", config, None)?;
        Ok(p.unwrap_or_default())
    }

    fn fit(&mut self, ins: FitIns) -> Result<FitRes, CoreError> {
        let (header, p) = self.call("fit", &ins.config, Some(&ins.parameters))?;
        Ok(FitRes {
            parameters: p.unwrap_or_default(),
            num_examples: examples(&header)?,
            metrics: metrics_from_json(header.get("metrics")),
        })
    }

    fn evaluate(&mut self, ins: EvaluateIns) -> Result<EvaluateRes, CoreError> {
        let (header, _) = self.call("evaluate", &ins.config, Some(&ins.parameters))?;
        let loss = header
            .get("loss")
            .and_then(Value::as_f64)
            .ok_or_else(|| CoreError::Local("the learner gave no loss".into()))?;
        Ok(EvaluateRes {
            loss: loss as f32,
            num_examples: examples(&header)?,
            metrics: metrics_from_json(header.get("metrics")),
        })
    }

    fn get_properties(&mut self, _config: &Config) -> Result<Config, CoreError> {
        Ok(names_property(
            &self.names.lock().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}

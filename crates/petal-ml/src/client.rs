//! Learners as federated clients: [`LearnerClient`] owns its learner (one
//! client per process, or a worker); [`PooledClient`]s of one process
//! borrow learners from a shared [`LearnerPool`], so a process hosting a
//! thousand clients holds as many models as train at once, not a thousand.

use std::sync::{Arc, Mutex};

use petal_core::{
    Client, Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar, Tensor,
};
use std::borrow::Cow;

use petal_data::{ImageSet, Splits, SyntheticSpec};

use crate::{Learner, MlError, TrainOptions};

/// Answers fit/evaluate by training `learner` on a local partition.
pub struct LearnerClient<L> {
    learner: L,
    data: Splits,
    defaults: TrainOptions,
}

impl<L: Learner> LearnerClient<L> {
    /// A client training `learner` on `data`, with `defaults` unless the server's config overrides them.
    pub fn new(learner: L, data: Splits, defaults: TrainOptions) -> Self {
        LearnerClient {
            learner,
            data,
            defaults,
        }
    }
}

fn err(e: MlError) -> CoreError {
    CoreError::Local(e.to_string())
}

impl<L: Learner> Client for LearnerClient<L> {
    fn get_parameters(&mut self, _config: &Config) -> Result<Parameters, CoreError> {
        parameters_of(&self.learner).map_err(err)
    }

    fn fit(&mut self, ins: FitIns) -> Result<FitRes, CoreError> {
        fit_with(&mut self.learner, &self.data.train, &self.defaults, &ins).map_err(err)
    }

    fn evaluate(&mut self, ins: EvaluateIns) -> Result<EvaluateRes, CoreError> {
        evaluate_with(&mut self.learner, &self.data.test, &self.defaults, &ins).map_err(err)
    }

    fn get_properties(&mut self, _config: &Config) -> Result<Config, CoreError> {
        let names: Vec<String> = self
            .learner
            .get_weights()
            .map_err(err)?
            .into_iter()
            .map(|n| n.name)
            .collect();
        Ok(petal_core::names_property(&names))
    }
}

fn parameters_of(learner: &dyn Learner) -> Result<Parameters, MlError> {
    let (names, tensors): (Vec<String>, Vec<Tensor>) = learner
        .get_weights()?
        .into_iter()
        .map(|n| (n.name, n.tensor))
        .unzip();
    Ok(Parameters::new(tensors).with_names(names))
}

/// Loads the server's model, saying what this client's data needs when it
/// does not fit (a server whose clients train on another data set).
fn set_global(
    learner: &mut dyn Learner,
    data: &ImageSet,
    tensors: &[Tensor],
) -> Result<(), MlError> {
    learner.set_weights(tensors).map_err(|e| match e {
        MlError::Weights(why) => {
            let [c, h, w] = data.shape;
            MlError::Weights(format!(
                "the server's model does not fit this client's data set ({c}x{h}x{w} images, \
                 {} classes; is the server's model for another data set?): {why}",
                data.num_classes
            ))
        }
        other => other,
    })
}

fn fit_with(
    learner: &mut dyn Learner,
    train: &ImageSet,
    defaults: &TrainOptions,
    ins: &FitIns,
) -> Result<FitRes, MlError> {
    let opts = defaults.with_config(&ins.config)?;
    set_global(learner, train, &ins.parameters.tensors)?;
    let stats = learner.fit(train, &opts)?;
    Ok(FitRes {
        parameters: parameters_of(learner)?,
        num_examples: stats.num_examples as u64,
        metrics: [("train_loss".to_string(), Scalar::Double(stats.train_loss))].into(),
    })
}

fn evaluate_with(
    learner: &mut dyn Learner,
    test: &ImageSet,
    defaults: &TrainOptions,
    ins: &EvaluateIns,
) -> Result<EvaluateRes, MlError> {
    let opts = defaults.with_config(&ins.config)?;
    set_global(learner, test, &ins.parameters.tensors)?;
    let stats = learner.evaluate(test, opts.batch_size)?;
    Ok(EvaluateRes {
        loss: stats.loss as f32,
        num_examples: stats.num_examples as u64,
        metrics: [("accuracy".to_string(), Scalar::Double(stats.accuracy))].into(),
    })
}

/// One fit of `learner` on `train` as a client does it: the server's model
/// loaded, the instruction's config over `defaults`, a fresh optimizer.
pub fn fit_on(
    learner: &mut dyn Learner,
    train: &ImageSet,
    defaults: &TrainOptions,
    ins: &FitIns,
) -> Result<FitRes, CoreError> {
    fit_with(learner, train, defaults, ins).map_err(err)
}

/// One evaluation of the server's model by `learner` on `test`.
pub fn evaluate_on(
    learner: &mut dyn Learner,
    test: &ImageSet,
    defaults: &TrainOptions,
    ins: &EvaluateIns,
) -> Result<EvaluateRes, CoreError> {
    evaluate_with(learner, test, defaults, ins).map_err(err)
}

/// `learner`'s weights as named parameters.
pub fn learner_parameters(learner: &dyn Learner) -> Result<Parameters, CoreError> {
    parameters_of(learner).map_err(err)
}

/// A factory of learners (all alike: same architecture and initial weights).
pub type MakeLearner = Box<dyn Fn() -> Result<Box<dyn Learner>, MlError> + Send + Sync>;

/// The learners of one process, lent to its clients one call at a time.
/// The process's runtime bounds how many calls run at once, so the pool
/// never holds more learners than that.
pub struct LearnerPool {
    make: MakeLearner,
    idle: Mutex<Vec<Box<dyn Learner>>>,
}

impl LearnerPool {
    /// A pool creating learners with `make` when none is idle.
    pub fn new(make: MakeLearner) -> Self {
        LearnerPool {
            make,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut dyn Learner) -> Result<T, MlError>,
    ) -> Result<T, MlError> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut learner = match idle {
            Some(l) => l,
            None => (self.make)()?,
        };
        let out = f(&mut *learner);
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(learner);
        out
    }

    /// A new learner's initial weights.
    fn initial(&self) -> Result<Parameters, MlError> {
        parameters_of(&*(self.make)()?)
    }
}

/// A client's data: loaded (a share of a real data set), or generated
/// when a call needs it (synthetic data: nothing held between calls).
pub enum PartitionData {
    /// Both splits in memory.
    Loaded(Arc<Splits>),
    /// Partition `id` of a synthetic data set.
    Synthetic { spec: SyntheticSpec, id: usize },
}

impl PartitionData {
    fn split(&self, test: bool) -> Result<Cow<'_, ImageSet>, MlError> {
        match self {
            PartitionData::Loaded(s) => Ok(Cow::Borrowed(if test { &s.test } else { &s.train })),
            PartitionData::Synthetic { spec, id } => spec
                .generate_split(*id, test)
                .map(Cow::Owned)
                .map_err(|e| MlError::Shape(e.to_string())),
        }
    }
}

/// One client of a process hosting many: its own data partition, a
/// learner borrowed from the process's pool for each call (every call
/// starts from the server's weights, so no model is kept between calls).
pub struct PooledClient {
    data: PartitionData,
    pool: Arc<LearnerPool>,
    defaults: TrainOptions,
}

impl PooledClient {
    /// A client training on `data` with learners from `pool`.
    pub fn new(data: PartitionData, pool: Arc<LearnerPool>, defaults: TrainOptions) -> Self {
        PooledClient {
            data,
            pool,
            defaults,
        }
    }
}

impl Client for PooledClient {
    fn get_parameters(&mut self, _config: &Config) -> Result<Parameters, CoreError> {
        self.pool.initial().map_err(err)
    }

    fn fit(&mut self, ins: FitIns) -> Result<FitRes, CoreError> {
        let train = self.data.split(false).map_err(err)?;
        let defaults = &self.defaults;
        self.pool
            .with(|l| fit_with(l, &train, defaults, &ins))
            .map_err(err)
    }

    fn evaluate(&mut self, ins: EvaluateIns) -> Result<EvaluateRes, CoreError> {
        let test = self.data.split(true).map_err(err)?;
        let defaults = &self.defaults;
        self.pool
            .with(|l| evaluate_with(l, &test, defaults, &ins))
            .map_err(err)
    }

    fn get_properties(&mut self, _config: &Config) -> Result<Config, CoreError> {
        let p = self.pool.initial().map_err(err)?;
        Ok(petal_core::names_property(&p.names))
    }
}

/// Checks that `weights` match `expected` names and shapes, naming the first mismatch.
pub(crate) fn check_shapes(
    expected: &[(String, Vec<usize>)],
    weights: &[Tensor],
) -> Result<(), MlError> {
    if expected.len() != weights.len() {
        return Err(MlError::Weights(format!(
            "expected {} tensors, got {}",
            expected.len(),
            weights.len()
        )));
    }
    for ((name, shape), t) in expected.iter().zip(weights) {
        if &t.shape != shape {
            return Err(MlError::Weights(format!(
                "{name}: expected shape {shape:?}, got {:?}",
                t.shape
            )));
        }
    }
    Ok(())
}

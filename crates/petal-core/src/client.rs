//! What a federated client does, whatever carries its messages (Flower's
//! `Client`): the gRPC runtime, a worker process and the simulation engine
//! all drive a [`Client`].

use crate::types::{Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters};

/// A federated client. Calls block (they train), so runtimes run them on
/// blocking threads. An error becomes a failure the server records.
pub trait Client: Send {
    /// Current local parameters.
    fn get_parameters(&mut self, config: &Config) -> Result<Parameters, CoreError>;
    /// Trains from the given parameters on local data.
    fn fit(&mut self, ins: FitIns) -> Result<FitRes, CoreError>;
    /// Evaluates the given parameters on local test data.
    fn evaluate(&mut self, ins: EvaluateIns) -> Result<EvaluateRes, CoreError>;
    /// Properties the client reports (Flower's `get_properties`); Petal
    /// clients give their model's tensor names under
    /// [`PARAMETER_NAMES_PROPERTY`] when they know them.
    fn get_properties(&mut self, _config: &Config) -> Result<Config, CoreError> {
        Ok(Config::new())
    }
}

/// The property holding a client's tensor names, as a JSON list of strings.
pub const PARAMETER_NAMES_PROPERTY: &str = "petal.parameter_names";

/// `names` as the value of [`PARAMETER_NAMES_PROPERTY`] (empty: no properties).
pub fn names_property(names: &[String]) -> Config {
    if names.is_empty() {
        return Config::new();
    }
    let json = serde_json::to_string(names).unwrap_or_default();
    [(
        PARAMETER_NAMES_PROPERTY.to_string(),
        crate::Scalar::Str(json),
    )]
    .into()
}

/// The tensor names in `properties`, if a Petal client gave them.
pub fn names_from_properties(properties: &Config) -> Option<Vec<String>> {
    match properties.get(PARAMETER_NAMES_PROPERTY)? {
        crate::Scalar::Str(s) => serde_json::from_str(s).ok(),
        _ => None,
    }
}

impl<C: Client + ?Sized> Client for Box<C> {
    fn get_parameters(&mut self, config: &Config) -> Result<Parameters, CoreError> {
        (**self).get_parameters(config)
    }
    fn fit(&mut self, ins: FitIns) -> Result<FitRes, CoreError> {
        (**self).fit(ins)
    }
    fn evaluate(&mut self, ins: EvaluateIns) -> Result<EvaluateRes, CoreError> {
        (**self).evaluate(ins)
    }
    fn get_properties(&mut self, config: &Config) -> Result<Config, CoreError> {
        (**self).get_properties(config)
    }
}

//! Petal's strategies against flwr 1.41's own classes (real flwr, the
//! interop venv): the same seeded inputs through FedAvg, FedProx, FedAvgM
//! (defaults and with momentum), FedAdagrad, FedAdam, FedYogi, FedMedian,
//! FedTrimmedAvg, Krum, MultiKrum, Bulyan and q-FedAvg (Flower's defaults,
//! `flwr/serverapp/strategy`), and the four differential-privacy wrappers
//! (`flwr/server/strategy`, without noise), 3 rounds each: every aggregate
//! within 1e-6 relative of Flower's, stateful strategies included, and the
//! adaptive clipping norm the same. Also Flower's client-side clipping.

mod support;

use std::sync::Arc;
use std::time::Duration;

use petal_core::strategy::{ClippingClient, DpMode, DpSpec, StrategyConfig, build};
use petal_core::{
    Client, ClientProxy, Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, NodeId,
    Parameters, ProxyFuture, Registry, Scalar, StrategySpec, Tensor,
};
use rand::SeedableRng;
use serde_json::Value;
use support::flower::{fixture, python, skip};

/// A client the strategies can sample (never called).
struct Idle(NodeId);

impl ClientProxy for Idle {
    fn node_id(&self) -> NodeId {
        self.0
    }
    fn get_parameters(&self, _: Config, _: Option<Duration>) -> ProxyFuture<'_, Parameters> {
        Box::pin(async { Err(CoreError::Invalid("idle".into())) })
    }
    fn fit(&self, _: FitIns, _: Option<Duration>) -> ProxyFuture<'_, FitRes> {
        Box::pin(async { Err(CoreError::Invalid("idle".into())) })
    }
    fn evaluate(&self, _: EvaluateIns, _: Option<Duration>) -> ProxyFuture<'_, EvaluateRes> {
        Box::pin(async { Err(CoreError::Invalid("idle".into())) })
    }
    fn disconnect(&self, _: Option<Duration>) -> ProxyFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

fn registry(n: usize) -> Registry {
    let r = Registry::new();
    for _ in 0..n {
        let id = r.next_node_id();
        r.register(Arc::new(Idle(id)));
    }
    r
}

/// A model from `{name: nested list}` in the fixture's tensor order.
fn model(v: &Value, shapes: &[(String, Vec<usize>)]) -> Parameters {
    let tensors = shapes
        .iter()
        .map(|(name, shape)| {
            let mut flat = Vec::new();
            flatten(&v[name], &mut flat);
            Tensor::new(shape.clone(), flat.iter().map(|&x| x as f32).collect()).unwrap()
        })
        .collect();
    Parameters::new(tensors).with_names(shapes.iter().map(|(n, _)| n.clone()).collect())
}

fn flatten(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        Value::Number(n) => out.push(n.as_f64().unwrap()),
        other => panic!("not a number: {other}"),
    }
}

fn values(v: &Value, shapes: &[(String, Vec<usize>)]) -> Vec<f64> {
    let mut out = Vec::new();
    for (name, _) in shapes {
        flatten(&v[name], &mut out);
    }
    out
}

/// Largest |got − want| over the largest |want|.
fn relative(got: &Parameters, want: &[f64]) -> f64 {
    let got: Vec<f64> = got
        .tensors
        .iter()
        .flat_map(|t| t.data.to_f64_vec())
        .collect();
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-12);
    let worst = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    worst / scale
}

fn spec_of(name: &str, params: &Value) -> (StrategySpec, Option<DpSpec>) {
    if let Ok(mode) = name.parse::<DpMode>() {
        let mut dp = DpSpec::new(mode, 0.0, 5);
        if let Some(c) = params.get("clipping_norm").and_then(Value::as_f64) {
            dp.clipping_norm = c;
        }
        return (StrategySpec::FedAvg, Some(dp));
    }
    let mut spec = serde_json::to_value(StrategySpec::defaults(name).unwrap()).unwrap();
    for (k, v) in params.as_object().unwrap() {
        spec[k] = v.clone();
    }
    (serde_json::from_value(spec).unwrap(), None)
}

#[test]
fn every_strategy_aggregates_as_flower_does() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("reference.json");
    let status = support::flower::no_proxy(std::process::Command::new(python()))
        .arg(fixture("strategies", "flwr_reference.py"))
        .arg(&out)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "flwr_reference.py failed");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let shapes: Vec<(String, Vec<usize>)> = ["conv.weight", "conv.bias", "fc.weight"]
        .iter()
        .map(|n| {
            let s = doc["shapes"][n]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (n.to_string(), s)
        })
        .collect();
    let mut checked = Vec::new();
    for case in doc["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (spec, dp) = spec_of(name, &case["params"]);
        let n = case["rounds"][0]["results"].as_array().unwrap().len();
        let config = StrategyConfig {
            fit_clients: n,
            min_available_clients: n,
            ..Default::default()
        };
        let mut s = build(&spec, config, dp.as_ref()).unwrap();
        let clients = registry(n);
        let mut current = Arc::new(model(&case["initial"], &shapes));
        for (r, round) in case["rounds"].as_array().unwrap().iter().enumerate() {
            let r = r as u64 + 1;
            let mut rng = rand::rngs::StdRng::seed_from_u64(r);
            let ins = s.configure_fit(r, &current, &clients, &mut rng);
            assert_eq!(ins.len(), n, "{name}: sampled");
            for (i, res) in round["results"].as_array().unwrap().iter().enumerate() {
                let mut metrics: Config = res["metrics"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), Scalar::Double(v.as_f64().unwrap())))
                    .collect();
                if name == "client-adaptive" {
                    metrics.insert(
                        "norm_bit".into(),
                        Scalar::Bool(res["norm_bit"].as_bool().unwrap()),
                    );
                }
                let fit = FitRes {
                    parameters: model(&res["arrays"], &shapes),
                    num_examples: res["num_examples"].as_u64().unwrap(),
                    metrics,
                };
                s.fold_fit(r, NodeId(i as u64 + 1), fit).unwrap();
            }
            let (got, metrics) = s.aggregate_fit(r, &current).expect("an aggregate");
            let want = values(&round["expected"], &shapes);
            let err = relative(&got, &want);
            assert!(err <= 1e-6, "{name} round {r}: relative error {err:e}");
            if let Some(m) = round["metrics"].as_object() {
                for (k, v) in m {
                    if k == "num-examples" {
                        continue;
                    }
                    let (a, b) = (metrics[k], v.as_f64().unwrap());
                    assert!(
                        (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                        "{name} {k}: {a} vs {b}"
                    );
                }
            }
            checked.push(format!("{name} round {r}: {err:.1e}"));
            current = Arc::new(got);
        }
    }
    eprintln!("{}", checked.join("\n"));
    assert_eq!(checked.len(), 17 * 3);
}

/// Flower's adaptive clipping norm, round after round, as Petal's.
#[test]
fn the_adaptive_clipping_norm_follows_flowers() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("reference.json");
    let status = support::flower::no_proxy(std::process::Command::new(python()))
        .arg(fixture("strategies", "flwr_reference.py"))
        .arg(&out)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for case in doc["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        if !name.ends_with("-adaptive") {
            continue;
        }
        let mode: DpMode = name.parse().unwrap();
        let mut w = petal_core::strategy::DpWrapper::new(
            build(
                &StrategySpec::FedAvg,
                StrategyConfig {
                    fit_clients: 5,
                    min_available_clients: 5,
                    ..Default::default()
                },
                None,
            )
            .unwrap(),
            DpSpec::new(mode, 0.0, 5),
        )
        .unwrap();
        let shapes: Vec<(String, Vec<usize>)> = vec![
            ("conv.weight".into(), vec![4, 3]),
            ("conv.bias".into(), vec![3]),
            ("fc.weight".into(), vec![2, 2, 2]),
        ];
        let clients = registry(5);
        let mut current = Arc::new(model(&case["initial"], &shapes));
        for (r, round) in case["rounds"].as_array().unwrap().iter().enumerate() {
            let r = r as u64 + 1;
            let before = round["clipping_norm_before"].as_f64().unwrap();
            assert!(
                (w.clipping_norm() - before).abs() < 1e-12,
                "{name} round {r}"
            );
            use petal_core::Strategy;
            let mut rng = rand::rngs::StdRng::seed_from_u64(r);
            w.configure_fit(r, &current, &clients, &mut rng);
            for (i, res) in round["results"].as_array().unwrap().iter().enumerate() {
                let metrics: Config = [(
                    "norm_bit".to_string(),
                    Scalar::Bool(res["norm_bit"].as_bool().unwrap()),
                )]
                .into();
                let fit = FitRes {
                    parameters: model(&res["arrays"], &shapes),
                    num_examples: res["num_examples"].as_u64().unwrap(),
                    metrics,
                };
                w.fold_fit(r, NodeId(i as u64 + 1), fit).unwrap();
            }
            let (got, _) = w.aggregate_fit(r, &current).unwrap();
            let after = round["clipping_norm_after"].as_f64().unwrap();
            assert!(
                (w.clipping_norm() - after).abs() <= 1e-12 * after,
                "{name} round {r}: {} vs {after}",
                w.clipping_norm()
            );
            current = Arc::new(got);
        }
    }
}

/// Flower's client-side clipping (`fixedclipping_mod`) and Petal's
/// `ClippingClient`, on the same update.
#[test]
fn client_side_clipping_is_flowers() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("reference.json");
    let status = support::flower::no_proxy(std::process::Command::new(python()))
        .arg(fixture("strategies", "flwr_reference.py"))
        .arg(&out)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let shapes: Vec<(String, Vec<usize>)> = vec![
        ("conv.weight".into(), vec![4, 3]),
        ("conv.bias".into(), vec![3]),
        ("fc.weight".into(), vec![2, 2, 2]),
    ];
    /// Returns a fixed model whatever it is given.
    struct Fixed(Parameters);
    impl Client for Fixed {
        fn get_parameters(&mut self, _: &Config) -> Result<Parameters, CoreError> {
            Ok(self.0.clone())
        }
        fn fit(&mut self, _: FitIns) -> Result<FitRes, CoreError> {
            Ok(FitRes {
                parameters: self.0.clone(),
                num_examples: 1,
                metrics: Config::new(),
            })
        }
        fn evaluate(&mut self, _: EvaluateIns) -> Result<EvaluateRes, CoreError> {
            Err(CoreError::Invalid("unused".into()))
        }
    }
    for case in doc["client_clip"].as_array().unwrap() {
        let norm = case["clipping_norm"].as_f64().unwrap();
        let mut c = ClippingClient::new(Fixed(model(&case["new"], &shapes)));
        let res = c
            .fit(FitIns {
                parameters: Arc::new(model(&case["base"], &shapes)),
                config: [("clipping_norm".to_string(), Scalar::Double(norm))].into(),
            })
            .unwrap();
        let err = relative(&res.parameters, &values(&case["expected"], &shapes));
        assert!(err <= 1e-6, "clipping norm {norm}: {err:e}");
        assert!(res.metrics.contains_key("norm_bit"));
    }
}

//! Streaming weighted averaging: results are folded in as they arrive, so
//! memory stays O(model) whatever the number of clients.

use crate::types::{Config, CoreError, DType, Metrics, Parameters, Tensor, TensorData};

/// Running weighted sum of parameter sets, accumulated in `f64` whatever
/// the tensors' dtypes; the mean is given back in the dtypes of the first
/// update folded (integers rounded to the nearest value).
#[derive(Debug, Default)]
pub struct WeightedMean {
    shapes: Vec<Vec<usize>>,
    dtypes: Vec<DType>,
    sums: Vec<Vec<f64>>,
    total_weight: f64,
    count: usize,
}

impl WeightedMean {
    /// An empty accumulator; the first folded update fixes the shapes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of updates folded so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Folds `params` with weight `weight`. A wrong shape, a non-finite
    /// value or a zero weight leaves the accumulator untouched.
    pub fn fold(&mut self, params: &Parameters, weight: f64) -> Result<(), CoreError> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(CoreError::Invalid(format!(
                "weight must be positive, got {weight}"
            )));
        }
        for (i, t) in params.tensors.iter().enumerate() {
            if let Some((pos, v)) = t.data.first_non_finite() {
                return Err(CoreError::NotFinite(format!(
                    "tensor {i} holds {v} at index {pos}"
                )));
            }
        }
        if self.count == 0 {
            self.shapes = params.tensors.iter().map(|t| t.shape.clone()).collect();
            self.dtypes = params.tensors.iter().map(Tensor::dtype).collect();
            self.sums = params.tensors.iter().map(|t| vec![0.0; t.len()]).collect();
        } else {
            if params.tensors.len() != self.shapes.len() {
                return Err(CoreError::ShapeMismatch(format!(
                    "expected {} tensors, got {}",
                    self.shapes.len(),
                    params.tensors.len()
                )));
            }
            for (i, (t, s)) in params.tensors.iter().zip(&self.shapes).enumerate() {
                if &t.shape != s {
                    return Err(CoreError::ShapeMismatch(format!(
                        "tensor {i}: expected shape {s:?}, got {:?}",
                        t.shape
                    )));
                }
            }
        }
        for (sum, t) in self.sums.iter_mut().zip(&params.tensors) {
            match t.data.as_f32() {
                Some(values) => {
                    for (acc, &v) in sum.iter_mut().zip(values) {
                        *acc += weight * f64::from(v);
                    }
                }
                None => t.data.for_each_f64(|i, v| sum[i] += weight * v),
            }
        }
        self.total_weight += weight;
        self.count += 1;
        Ok(())
    }

    /// The weighted mean, or `None` when nothing was folded.
    pub fn finish(self) -> Option<Parameters> {
        if self.count == 0 {
            return None;
        }
        let w = self.total_weight;
        let tensors = self
            .shapes
            .into_iter()
            .zip(self.dtypes)
            .zip(self.sums)
            .map(|((shape, dtype), mut sum)| {
                sum.iter_mut().for_each(|v| *v /= w);
                let data = match dtype {
                    DType::F32 => TensorData::F32(sum.into_iter().map(|v| v as f32).collect()),
                    other => TensorData::from_f64(other, &sum),
                };
                Tensor { shape, data }
            })
            .collect();
        Some(Parameters::new(tensors))
    }
}

/// Running weighted mean of scalars (loss, accuracy), kept as a mean
/// rather than a sum: finite values can never make it overflow (a client
/// reporting 1e308 moves the mean, it does not make it infinite).
#[derive(Debug, Default, Clone, Copy)]
pub struct ScalarMean {
    mean: f64,
    weight: f64,
}

impl ScalarMean {
    /// Adds `value` with weight `weight`; a value or weight that is not
    /// finite, or a weight that is not positive, is ignored.
    pub fn add(&mut self, value: f64, weight: f64) {
        if !(value.is_finite() && weight.is_finite() && weight > 0.0) {
            return;
        }
        let total = self.weight + weight;
        // Both terms are at most max(|mean|, |value|) in magnitude.
        let mean = self.mean * (self.weight / total) + value * (weight / total);
        if mean.is_finite() {
            self.mean = mean;
            self.weight = total;
        }
    }

    /// The weighted mean, or `None` if no weight was added.
    pub fn mean(&self) -> Option<f64> {
        (self.weight > 0.0).then_some(self.mean)
    }
}

/// Most distinct metric names one aggregate keeps (more are dropped, with
/// a warning): clients choose metric names, and every name kept is kept in
/// every round of the history.
pub const MAX_METRIC_KEYS: usize = 256;

/// Running example-weighted mean of every numeric metric clients report
/// (the default metrics aggregation, as Flower's `weighted_average`), at
/// most [`MAX_METRIC_KEYS`] names.
#[derive(Debug, Default, Clone)]
pub struct MetricsMean {
    means: std::collections::BTreeMap<String, ScalarMean>,
    dropped: usize,
}

impl MetricsMean {
    /// Adds one client's metrics, weighted by its example count; values
    /// that are not finite numbers are ignored, and so are new names once
    /// [`MAX_METRIC_KEYS`] are kept.
    pub fn add(&mut self, metrics: &Config, weight: f64) {
        for (k, v) in metrics {
            let Some(x) = v.as_f64().filter(|x| x.is_finite()) else {
                continue;
            };
            let kept = self.means.len();
            match self.means.get_mut(k) {
                Some(m) => m.add(x, weight),
                None if kept < MAX_METRIC_KEYS => {
                    self.means.entry(k.clone()).or_default().add(x, weight);
                }
                None => self.dropped += 1,
            }
        }
    }

    /// The means so far (and a warning if names were dropped).
    pub fn finish(&self) -> Metrics {
        if self.dropped > 0 {
            tracing::warn!(
                "{} metric values were dropped: at most {MAX_METRIC_KEYS} metric names are aggregated",
                self.dropped
            );
        }
        self.means
            .iter()
            .filter_map(|(k, m)| m.mean().map(|v| (k.clone(), v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Scalar;

    fn p(vals: &[f32]) -> Parameters {
        Parameters::new(vec![
            Tensor::new(vec![vals.len()], vals.to_vec()).unwrap(),
            Tensor::new(vec![1], vec![vals[0] * 2.0]).unwrap(),
        ])
    }

    #[test]
    fn metrics_mean_is_example_weighted_and_skips_text() {
        let mut m = MetricsMean::default();
        let c = |acc: f64| -> Config {
            [
                ("accuracy".to_string(), Scalar::Double(acc)),
                ("name".to_string(), Scalar::Str("x".into())),
            ]
            .into()
        };
        m.add(&c(0.5), 100.0);
        m.add(&c(1.0), 300.0);
        m.add(&c(f64::NAN), 300.0);
        assert_eq!(m.finish(), [("accuracy".to_string(), 0.875)].into());
    }

    #[test]
    fn means_of_huge_finite_values_stay_finite() {
        let mut m = ScalarMean::default();
        m.add(1e308, 1e6);
        m.add(1.7e308, 3e6);
        m.add(f64::INFINITY, 1.0);
        let v = m.mean().unwrap();
        assert!(v.is_finite() && v > 1e308, "{v}");
        let mut mm = MetricsMean::default();
        let c = |x: f64| -> Config { [("loss".to_string(), Scalar::Double(x))].into() };
        mm.add(&c(1e308), 1e18);
        mm.add(&c(-1e308), 1e18);
        mm.add(&c(1e308), 1e18);
        let got = mm.finish()["loss"];
        assert!(got.is_finite(), "{got}");
    }

    #[test]
    fn metric_names_are_capped() {
        let mut mm = MetricsMean::default();
        for i in 0..(MAX_METRIC_KEYS + 50) {
            let c: Config = [(format!("m{i:05}"), Scalar::Double(1.0))].into();
            mm.add(&c, 1.0);
        }
        let c: Config = [("m00000".to_string(), Scalar::Double(3.0))].into();
        mm.add(&c, 1.0);
        let out = mm.finish();
        assert_eq!(out.len(), MAX_METRIC_KEYS);
        assert_eq!(out["m00000"], 2.0, "known names keep aggregating");
    }

    #[test]
    fn weighted_average_matches_hand_computation() {
        let mut m = WeightedMean::new();
        m.fold(&p(&[1.0, 2.0]), 1.0).unwrap();
        m.fold(&p(&[4.0, 8.0]), 3.0).unwrap();
        let out = m.finish().unwrap();
        // (1*1 + 3*4)/4 = 3.25, (1*2 + 3*8)/4 = 6.5
        assert_eq!(out.tensors[0].data, vec![3.25, 6.5]);
        assert_eq!(out.tensors[1].data, vec![6.5]);
    }

    #[test]
    fn rejects_nan_and_shape_mismatch_without_corrupting() {
        let mut m = WeightedMean::new();
        m.fold(&p(&[1.0, 1.0]), 2.0).unwrap();
        let err = m.fold(&p(&[f32::NAN, 1.0]), 1.0).unwrap_err();
        assert!(err.to_string().contains("NaN"), "{err}");
        let err = m.fold(&p(&[1.0, 1.0, 1.0]), 1.0).unwrap_err();
        assert!(err.to_string().contains("expected shape [2]"), "{err}");
        assert!(m.fold(&p(&[1.0, 1.0]), 0.0).is_err());
        assert_eq!(m.count(), 1);
        assert_eq!(m.finish().unwrap().tensors[0].data, vec![1.0, 1.0]);
    }

    /// FedAvg folding updates one at a time equals FedAvg over all the
    /// updates held at once (Flower's `aggregate`), in any arrival order.
    #[test]
    fn streaming_fedavg_equals_batch_fedavg() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let updates: Vec<(Parameters, f64)> = (0..50)
            .map(|i| {
                let t = |n: usize, next: &mut dyn FnMut() -> f32| {
                    Tensor::new(vec![n], (0..n).map(|_| next()).collect()).unwrap()
                };
                let p = Parameters::new(vec![t(37, &mut next), t(5, &mut next)]);
                (p, (1 + (i * 37) % 500) as f64)
            })
            .collect();
        // Batch: every update in memory, then one weighted sum per value.
        let total: f64 = updates.iter().map(|u| u.1).sum();
        let batch: Vec<Vec<f32>> = (0..2)
            .map(|ti| {
                let n = updates[0].0.tensors[ti].data.len();
                (0..n)
                    .map(|j| {
                        let s: f64 = updates
                            .iter()
                            .map(|(p, w)| w * p.tensors[ti].data.as_f32().unwrap()[j] as f64)
                            .sum();
                        (s / total) as f32
                    })
                    .collect()
            })
            .collect();
        for order in [
            (0..50).collect::<Vec<_>>(),
            (0..50).rev().collect(),
            (0..50).map(|i| (i * 17) % 50).collect(),
        ] {
            let mut m = WeightedMean::new();
            for &i in &order {
                m.fold(&updates[i].0, updates[i].1).unwrap();
            }
            let out = m.finish().unwrap();
            for (t, want) in out.tensors.iter().zip(&batch) {
                for (g, w) in t.data.as_f32().unwrap().iter().zip(want) {
                    assert!(
                        (g - w).abs() <= f32::EPSILON * w.abs().max(1e-3),
                        "{g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn integer_and_half_tensors_keep_their_dtype() {
        let p = |steps: i64, h: f64| {
            Parameters::new(vec![
                Tensor::from_data(vec![], TensorData::I64(vec![steps])).unwrap(),
                Tensor::from_data(vec![2], TensorData::from_f64(DType::BF16, &[h, -h])).unwrap(),
            ])
        };
        let mut m = WeightedMean::new();
        m.fold(&p(10, 1.0), 1.0).unwrap();
        m.fold(&p(13, 2.0), 1.0).unwrap();
        let out = m.finish().unwrap();
        assert_eq!(
            out.tensors[0].data,
            TensorData::I64(vec![12]),
            "11.5 rounds to 12"
        );
        assert_eq!(out.tensors[0].shape, Vec::<usize>::new());
        assert_eq!(out.tensors[1].dtype(), DType::BF16);
        assert_eq!(out.tensors[1].data.to_f64_vec(), vec![1.5, -1.5]);
    }

    #[test]
    fn empty_mean_is_none() {
        assert!(WeightedMean::new().finish().is_none());
        assert!(ScalarMean::default().mean().is_none());
        let mut s = ScalarMean::default();
        s.add(1.0, 1.0);
        s.add(0.0, 3.0);
        assert_eq!(s.mean(), Some(0.25));
    }
}

//! Arithmetic shared by the strategies: models as `f64` values, and back
//! in each tensor's own dtype.

use crate::types::{DType, Parameters, Tensor, TensorData};

/// Every tensor's values as `f64`.
pub(crate) fn values(p: &Parameters) -> Vec<Vec<f64>> {
    p.tensors.iter().map(|t| t.data.to_f64_vec()).collect()
}

/// Parameters with `values`, in the shapes, dtypes and names of `like`.
pub(crate) fn like(values: Vec<Vec<f64>>, like: &Parameters) -> Parameters {
    let tensors = values
        .into_iter()
        .zip(&like.tensors)
        .map(|(v, t)| Tensor {
            shape: t.shape.clone(),
            data: TensorData::from_f64(t.dtype(), &v),
        })
        .collect();
    Parameters::new(tensors).with_names(like.names.clone())
}

/// State tensors holding `values` in the dtypes of `like` (float tensors
/// keep theirs, as Flower's NumPy state does; others are kept as f64).
pub(crate) fn state_tensors(values: &[Vec<f64>], like: &Parameters) -> Vec<Tensor> {
    values
        .iter()
        .zip(&like.tensors)
        .map(|(v, t)| {
            let dtype = if t.dtype().is_float() {
                t.dtype()
            } else {
                DType::F64
            };
            Tensor {
                shape: t.shape.clone(),
                data: TensorData::from_f64(dtype, v),
            }
        })
        .collect()
}

/// Rounds `values` to what [`state_tensors`] keeps, so that a resumed run
/// continues from exactly what was saved.
pub(crate) fn round_like_state(values: &mut [Vec<f64>], like: &Parameters) {
    for (v, t) in values.iter_mut().zip(&like.tensors) {
        if t.dtype().is_float() && t.dtype() != DType::F64 {
            let kept = TensorData::from_f64(t.dtype(), v).to_f64_vec();
            *v = kept;
        }
    }
}

/// Squared Euclidean distance between two models' values.
pub(crate) fn squared_distance(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q) * (p - q)))
        .sum()
}

/// Median of `v` (sorted in place), NumPy's: the mean of the middle two
/// for an even count.
pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The coordinate-wise statistic `f` over the same tensor of every model.
pub(crate) fn per_coordinate(
    models: &[Vec<Vec<f64>>],
    mut f: impl FnMut(&mut [f64]) -> f64,
) -> Vec<Vec<f64>> {
    let Some(first) = models.first() else {
        return Vec::new();
    };
    let mut column = vec![0.0; models.len()];
    first
        .iter()
        .enumerate()
        .map(|(t, values)| {
            (0..values.len())
                .map(|i| {
                    for (c, m) in column.iter_mut().zip(models) {
                        *c = m[t][i];
                    }
                    f(&mut column)
                })
                .collect()
        })
        .collect()
}

/// Indices of `scores` from smallest to largest (ties keep index order).
pub(crate) fn argsort(scores: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_order_are_numpys() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(argsort(&[0.5, -1.0, 2.0]), vec![1, 0, 2]);
        let models = vec![
            vec![vec![1.0, 10.0]],
            vec![vec![3.0, 30.0]],
            vec![vec![2.0, 0.0]],
        ];
        assert_eq!(per_coordinate(&models, median), vec![vec![2.0, 10.0]]);
    }
}

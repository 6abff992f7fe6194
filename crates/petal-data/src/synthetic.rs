//! Generated, learnable, class-conditional images of any shape: each class
//! has a random prototype; an image is its class prototype plus noise.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{DataError, ImageSet, Splits};

/// Shape and size of a synthetic data set.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSpec {
    /// Channels, height, width.
    pub shape: [usize; 3],
    /// Number of classes (at most 256).
    pub num_classes: usize,
    /// Training images.
    pub train: usize,
    /// Test images.
    pub test: usize,
    /// Noise amplitude in pixel units (0..=255); more noise is harder.
    pub noise: u8,
    /// Seed of prototypes and samples.
    pub seed: u64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec {
            shape: [1, 28, 28],
            num_classes: 10,
            train: 2_000,
            test: 500,
            noise: 96,
            seed: 0,
        }
    }
}

impl SyntheticSpec {
    /// Checks the spec without generating anything; returns the image size.
    pub fn validate(&self) -> Result<usize, DataError> {
        if !(2..=256).contains(&self.num_classes) {
            return Err(DataError::Synthetic(format!(
                "num_classes must be in 2..=256, got {}",
                self.num_classes
            )));
        }
        if self.shape.contains(&0) || self.train == 0 || self.test == 0 {
            return Err(DataError::Synthetic(format!(
                "shape {:?}, train {} and test {} must all be non-zero",
                self.shape, self.train, self.test
            )));
        }
        let size = self
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&size| {
                self.train
                    .checked_add(self.test)
                    .and_then(|n| n.checked_mul(size))
                    .is_some_and(|bytes| bytes <= isize::MAX as usize)
            })
            .ok_or_else(|| {
                DataError::Synthetic(format!(
                    "{} + {} images of shape {:?} do not fit in memory",
                    self.train, self.test, self.shape
                ))
            })?;
        Ok(size)
    }

    /// Generates both splits (deterministic for a given spec).
    pub fn generate(&self) -> Result<Splits, DataError> {
        let size = self.validate()?;
        let mut rng = StdRng::seed_from_u64(self.seed);
        let prototypes: Vec<Vec<u8>> = (0..self.num_classes)
            .map(|_| (0..size).map(|_| rng.random::<u8>()).collect())
            .collect();
        let mut make = |n: usize| {
            let mut set = ImageSet {
                shape: self.shape,
                num_classes: self.num_classes,
                pixels: Vec::with_capacity(n * size),
                labels: Vec::with_capacity(n),
            };
            let noise = self.noise as i16;
            for _ in 0..n {
                let label = rng.random_range(0..self.num_classes);
                set.labels.push(label as u8);
                for &p in &prototypes[label] {
                    let v = p as i16 + rng.random_range(-noise..=noise);
                    set.pixels.push(v.clamp(0, 255) as u8);
                }
            }
            set
        };
        let train = make(self.train);
        let test = make(self.test);
        Ok(Splits { train, test })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_shaped() {
        let spec = SyntheticSpec {
            shape: [3, 8, 8],
            train: 20,
            test: 5,
            ..Default::default()
        };
        let a = spec.generate().unwrap();
        assert_eq!(a, spec.generate().unwrap());
        assert_eq!(a.train.pixels.len(), 20 * 3 * 8 * 8);
        assert!(a.train.labels.iter().all(|&l| l < 10));
        let other = SyntheticSpec {
            seed: 1,
            ..spec.clone()
        }
        .generate()
        .unwrap();
        assert_ne!(a.train.pixels, other.train.pixels);
    }

    #[test]
    fn nearest_prototype_separates_classes() {
        // The data must be learnable: images of one class sit closer to
        // their class mean than to other class means.
        let s = SyntheticSpec::default().generate().unwrap().train;
        let size = s.image_size();
        let mut means = vec![vec![0f64; size]; 10];
        let mut counts = vec![0f64; 10];
        for i in 0..s.len() {
            let l = s.labels[i] as usize;
            counts[l] += 1.0;
            for (m, &p) in means[l].iter_mut().zip(s.image(i)) {
                *m += p as f64;
            }
        }
        for (m, c) in means.iter_mut().zip(&counts) {
            m.iter_mut().for_each(|v| *v /= c.max(1.0));
        }
        let correct = (0..s.len())
            .filter(|&i| {
                let d = |m: &Vec<f64>| -> f64 {
                    m.iter()
                        .zip(s.image(i))
                        .map(|(a, &b)| (a - b as f64).powi(2))
                        .sum()
                };
                let best = (0..10)
                    .min_by(|&a, &b| d(&means[a]).total_cmp(&d(&means[b])))
                    .unwrap();
                best == s.labels[i] as usize
            })
            .count();
        assert!(
            correct as f64 / s.len() as f64 > 0.95,
            "{correct}/{}",
            s.len()
        );
    }

    #[test]
    fn rejects_empty_specs() {
        let e = SyntheticSpec {
            train: 0,
            ..Default::default()
        }
        .generate()
        .unwrap_err();
        assert!(e.to_string().contains("non-zero"), "{e}");
        let huge = SyntheticSpec {
            shape: [usize::MAX, 2, 1],
            ..Default::default()
        };
        assert!(
            huge.generate()
                .unwrap_err()
                .to_string()
                .contains("do not fit")
        );
        assert!(
            SyntheticSpec {
                num_classes: 1,
                ..Default::default()
            }
            .generate()
            .is_err()
        );
    }
}

//! Generated, learnable, class-conditional images of any shape: each class
//! has a random prototype; an image is its class prototype plus noise.
//! Sizes are per client: partition `i` is generated on its own (same class
//! prototypes, its own samples), so a federation of any size costs nothing
//! to set up and a client never holds more than its share.

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
    /// Training images per partition.
    pub train: usize,
    /// Test images per partition.
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
            train: 500,
            test: 100,
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

    /// Generates both splits of partition 0 (deterministic for a given spec).
    pub fn generate(&self) -> Result<Splits, DataError> {
        self.generate_partition(0)
    }

    /// Generates both splits of partition `id`.
    pub fn generate_partition(&self, id: usize) -> Result<Splits, DataError> {
        Ok(Splits {
            train: self.generate_split(id, false)?,
            test: self.generate_split(id, true)?,
        })
    }

    /// Partition `id` of `num` under `scheme`: IID partitions are generated
    /// on their own; for the others, a virtual data set of `num` partitions'
    /// worth of uniformly drawn labels is cut by the scheme (labels only,
    /// cheap) and partition `id` is generated with its share's labels.
    pub fn generate_partition_by(
        &self,
        scheme: crate::PartitionScheme,
        id: usize,
        num: usize,
        seed: u64,
    ) -> Result<Splits, DataError> {
        if scheme == crate::PartitionScheme::Iid {
            return self.generate_partition(id);
        }
        let virtual_labels = |n: usize, salt: u64| -> Result<Vec<u8>, DataError> {
            let total = n.checked_mul(num).ok_or_else(|| {
                DataError::Synthetic(format!("{n} images × {num} partitions overflow"))
            })?;
            let mut rng = StdRng::seed_from_u64(self.seed ^ salt);
            Ok((0..total)
                .map(|_| rng.random_range(0..self.num_classes) as u8)
                .collect())
        };
        let train = virtual_labels(self.train, 0x7472_6169_6e00_0000)?;
        let test = virtual_labels(self.test, 0x7465_7374_0000_0000)?;
        let parts = crate::assign(scheme, &train, self.num_classes, num, seed)?;
        let shares = crate::class_shares(&parts, &train, self.num_classes);
        let test_parts = crate::assign_like(&test, &shares, seed.wrapping_add(1))?;
        let pick =
            |labels: &[u8], idx: &[usize]| idx.iter().map(|&i| labels[i]).collect::<Vec<u8>>();
        Ok(Splits {
            train: self.generate_with(id, false, Some(pick(&train, &parts[id])))?,
            test: self.generate_with(id, true, Some(pick(&test, &test_parts[id])))?,
        })
    }

    /// Generates one split of partition `id` (the test split with `test`):
    /// the classes' prototypes come from the seed alone, the samples from
    /// the seed, `id` and the split, so either split can be made alone.
    pub fn generate_split(&self, id: usize, test: bool) -> Result<ImageSet, DataError> {
        self.generate_with(id, test, None)
    }

    /// [`SyntheticSpec::generate_split`] into `out`, reusing its buffers (a
    /// simulation's worker makes one client's data after another).
    pub fn generate_split_into(
        &self,
        id: usize,
        test: bool,
        out: &mut ImageSet,
    ) -> Result<(), DataError> {
        self.generate_into(id, test, None, out)
    }

    /// One split of partition `id`, with these labels when given (else
    /// drawn uniformly).
    fn generate_with(
        &self,
        id: usize,
        test: bool,
        labels: Option<Vec<u8>>,
    ) -> Result<ImageSet, DataError> {
        // Shaped by generate_into once the spec is known to be valid.
        let mut set = ImageSet::pixels([1, 1, 1], 1);
        self.generate_into(id, test, labels, &mut set)?;
        Ok(set)
    }

    fn generate_into(
        &self,
        id: usize,
        test: bool,
        labels: Option<Vec<u8>>,
        set: &mut ImageSet,
    ) -> Result<(), DataError> {
        let size = self.validate()?;
        let mut rng = StdRng::seed_from_u64(self.seed);
        let prototypes: Vec<Vec<u8>> = (0..self.num_classes)
            .map(|_| (0..size).map(|_| rng.random::<u8>()).collect())
            .collect();
        let stream = (self.seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).rotate_left(17)
            ^ if test {
                0x2545_f491_4f6c_dd1d
            } else {
                0x5851_f42d_4c95_7f2d
            };
        let mut rng = StdRng::seed_from_u64(stream);
        let n = labels
            .as_ref()
            .map_or(if test { self.test } else { self.train }, Vec::len);
        let mut pixels = match std::mem::replace(&mut set.values, crate::Values::U8(Vec::new())) {
            crate::Values::U8(mut v) => {
                v.clear();
                v
            }
            crate::Values::F32(_) => Vec::new(),
        };
        pixels.reserve(n * size);
        set.shape = self.shape;
        set.num_classes = self.num_classes;
        set.normalize = crate::Normalize::half(self.shape[0]);
        set.labels.clear();
        set.labels.reserve(n);
        let noise = self.noise as i16;
        for i in 0..n {
            let label = match &labels {
                Some(l) => l[i] as usize,
                None => rng.random_range(0..self.num_classes),
            };
            set.labels.push(label as u8);
            for &p in &prototypes[label] {
                let v = p as i16 + rng.random_range(-noise..=noise);
                pixels.push(v.clamp(0, 255) as u8);
            }
        }
        set.values = crate::Values::U8(pixels);
        Ok(())
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
        assert_eq!(a.train.values.len(), 20 * 3 * 8 * 8);
        assert!(a.train.labels.iter().all(|&l| l < 10));
        let other = SyntheticSpec {
            seed: 1,
            ..spec.clone()
        }
        .generate()
        .unwrap();
        assert_ne!(a.train.values, other.train.values);
    }

    #[test]
    fn partitions_share_classes_but_not_samples() {
        let spec = SyntheticSpec {
            shape: [1, 6, 6],
            train: 30,
            test: 10,
            ..Default::default()
        };
        let a = spec.generate_partition(1).unwrap();
        let b = spec.generate_partition(2).unwrap();
        assert_ne!(a.train.values, b.train.values);
        assert_eq!(a, spec.generate_partition(1).unwrap());
        assert_eq!((a.train.len(), a.test.len()), (30, 10));
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

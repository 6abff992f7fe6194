//! Which examples each client holds, as index lists into one loaded data
//! set: a simulation of 100,000 clients costs their indices (4 bytes
//! each), never copies of their images.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::partition::{assign, assign_like, check, class_shares};
use crate::{DataError, PartitionScheme, Splits};

/// The training and test examples of every client: `train[id]` and
/// `test[id]` index the data set's splits.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Shares {
    pub train: Vec<Vec<u32>>,
    pub test: Vec<Vec<u32>>,
}

/// How a data set is shared among clients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sharing {
    /// The partition scheme.
    pub scheme: PartitionScheme,
    /// Number of clients.
    pub clients: usize,
    /// Seed of the cut.
    pub seed: u64,
    /// At most this many training examples per client (`--examples-per-client`).
    /// With IID and fewer examples than `clients × n`, each client draws
    /// its `n` without repeats and clients share examples; otherwise a
    /// client's partition is cut to its first `n` (a random order).
    pub per_client: Option<usize>,
}

impl Sharing {
    /// Every example cut among `clients` by `scheme`, none capped.
    pub fn new(scheme: PartitionScheme, clients: usize, seed: u64) -> Self {
        Sharing {
            scheme,
            clients,
            seed,
            per_client: None,
        }
    }

    /// Test examples per client for `per_client` training examples: the
    /// same fraction of the test split as of the training split (at least one).
    pub fn test_per_client(per_client: usize, train_len: usize, test_len: usize) -> usize {
        let scaled = (per_client as u128 * test_len as u128).div_ceil(train_len.max(1) as u128);
        (scaled as usize).clamp(1, test_len.max(1))
    }

    /// Checks that splits of `train` and `test` examples can be shared so:
    /// no client without examples.
    pub fn check(&self, train: usize, test: usize) -> Result<(), DataError> {
        match self.per_client {
            Some(0) => Err(DataError::Partition(
                "--examples-per-client must be at least 1".into(),
            )),
            Some(n) if n > train => Err(DataError::Partition(format!(
                "--examples-per-client {n} is more than the {train} training examples"
            ))),
            Some(_) if self.scheme == PartitionScheme::Iid => {
                for (split, len) in [("training", train), ("test", test)] {
                    if len == 0 {
                        return Err(DataError::Partition(format!("the {split} split is empty")));
                    }
                }
                if self.clients == 0 {
                    return Err(DataError::Partition(
                        "the number of partitions must be at least 1".into(),
                    ));
                }
                Ok(())
            }
            _ => {
                for (split, len) in [("training", train), ("test", test)] {
                    if self.clients > len {
                        return Err(DataError::Partition(format!(
                            "cannot split {len} {split} examples into {} non-empty partitions",
                            self.clients
                        )));
                    }
                }
                check(train, self.clients)
            }
        }
    }
}

/// IID shares of `len` examples: a seeded shuffle cut into near-equal
/// pieces; with `per_client = n`, pieces of `n` when `clients × n` fit,
/// else `n` distinct examples drawn per client (seeded by the client).
fn iid(len: usize, clients: usize, seed: u64, per_client: Option<usize>) -> Vec<Vec<u32>> {
    let fits = per_client.is_none_or(|n| n.saturating_mul(clients) <= len);
    if fits {
        let mut all: Vec<u32> = (0..len as u32).collect();
        all.shuffle(&mut StdRng::seed_from_u64(seed));
        return (0..clients)
            .map(|id| match per_client {
                Some(n) => all[id * n..(id + 1) * n].to_vec(),
                None => all[id * len / clients..(id + 1) * len / clients].to_vec(),
            })
            .collect();
    }
    let n = per_client.unwrap_or(1).min(len);
    (0..clients)
        .map(|id| {
            let mut rng = StdRng::seed_from_u64(mix(seed, id as u64));
            rand::seq::index::sample(&mut rng, len, n)
                .into_iter()
                .map(|i| i as u32)
                .collect()
        })
        .collect()
}

/// A seed for client `id` from `seed` (SplitMix64's finalizer).
fn mix(seed: u64, id: u64) -> u64 {
    let mut z = seed ^ id.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn to_u32(parts: Vec<Vec<usize>>, cap: Option<usize>) -> Vec<Vec<u32>> {
    parts
        .into_iter()
        .map(|p| {
            let take = cap.unwrap_or(p.len()).min(p.len());
            p[..take].iter().map(|&i| i as u32).collect()
        })
        .collect()
}

impl Shares {
    /// The shares of `data` under `sharing`.
    pub fn compute(data: &Splits, sharing: &Sharing) -> Result<Shares, DataError> {
        let (train_len, test_len) = (data.train.len(), data.test.len());
        sharing.check(train_len, test_len)?;
        if u32::try_from(train_len.max(test_len)).is_err() {
            return Err(DataError::Partition(format!(
                "{train_len} examples are more than Petal indexes (2^32)"
            )));
        }
        let Sharing {
            scheme,
            clients,
            seed,
            per_client,
        } = *sharing;
        let test_cap = per_client.map(|n| Sharing::test_per_client(n, train_len, test_len));
        if scheme == PartitionScheme::Iid {
            // Each split cut on its own (as Petal always has).
            return Ok(Shares {
                train: iid(train_len, clients, seed, per_client),
                test: iid(test_len, clients, seed.wrapping_add(1), test_cap),
            });
        }
        let classes = data.train.num_classes;
        let train = assign(scheme, &data.train.labels, classes, clients, seed)?;
        let shares = class_shares(&train, &data.train.labels, classes);
        let test = assign_like(&data.test.labels, &shares, seed.wrapping_add(1))?;
        Ok(Shares {
            train: to_u32(train, per_client),
            test: to_u32(test, test_cap),
        })
    }

    /// Number of clients.
    pub fn len(&self) -> usize {
        self.train.len()
    }

    /// True when there is no client.
    pub fn is_empty(&self) -> bool {
        self.train.is_empty()
    }

    /// Bytes the index lists hold.
    pub fn index_bytes(&self) -> usize {
        self.train
            .iter()
            .chain(&self.test)
            .map(|p| p.len() * 4)
            .sum()
    }
}

impl Splits {
    /// Client `id`'s examples, copied out of the whole data set.
    pub fn share(&self, shares: &Shares, id: usize) -> Result<Splits, DataError> {
        match (shares.train.get(id), shares.test.get(id)) {
            (Some(train), Some(test)) => Ok(Splits {
                train: self.train.select(train),
                test: self.test.select(test),
            }),
            _ => Err(DataError::Partition(format!(
                "partition id {id} is out of range for {} partitions (0..{})",
                shares.len(),
                shares.len().saturating_sub(1)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ImageSet;

    fn set(n: usize) -> ImageSet {
        ImageSet {
            values: crate::Values::U8((0..n).map(|i| i as u8).collect()),
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
            ..ImageSet::pixels([1, 1, 1], 10)
        }
    }

    fn splits(train: usize, test: usize) -> Splits {
        Splits {
            train: set(train),
            test: set(test),
        }
    }

    #[test]
    fn iid_shares_are_the_partitions_petal_always_cut() {
        let data = splits(103, 31);
        let shares = Shares::compute(&data, &Sharing::new(PartitionScheme::Iid, 7, 5)).unwrap();
        for id in 0..7 {
            let old = crate::partition_indices(103, id, 7, 5).unwrap();
            let new: Vec<usize> = shares.train[id].iter().map(|&i| i as usize).collect();
            assert_eq!(old, new, "partition {id}");
            let old = crate::partition_indices(31, id, 7, 6).unwrap();
            let new: Vec<usize> = shares.test[id].iter().map(|&i| i as usize).collect();
            assert_eq!(old, new, "test partition {id}");
        }
    }

    #[test]
    fn examples_per_client_are_disjoint_when_they_fit_and_drawn_without_repeats_otherwise() {
        let data = splits(4000, 1000);
        let mut sharing = Sharing::new(PartitionScheme::Iid, 80, 1);
        sharing.per_client = Some(50);
        let fit = Shares::compute(&data, &sharing).unwrap();
        let mut all: Vec<u32> = fit.train.iter().flatten().copied().collect();
        assert_eq!(all.len(), 4000);
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 4000, "80 × 50 of 4000: every example once");
        assert!(
            fit.test.iter().all(|t| t.len() == 13),
            "50 × 1000 / 4000, rounded up"
        );

        sharing.clients = 1000;
        let drawn = Shares::compute(&data, &sharing).unwrap();
        assert_eq!(drawn.len(), 1000);
        for p in &drawn.train {
            let mut p = p.clone();
            assert_eq!(p.len(), 50);
            p.sort_unstable();
            p.dedup();
            assert_eq!(p.len(), 50, "no repeats within a client");
            assert!(p.iter().all(|&i| i < 4000));
        }
        assert_ne!(drawn.train[0], drawn.train[1]);
        assert_eq!(drawn, Shares::compute(&data, &sharing).unwrap(), "seeded");
        assert_eq!(drawn.index_bytes(), 1000 * (50 + 13) * 4);
    }

    #[test]
    fn other_schemes_are_capped_and_bad_counts_refused() {
        let data = splits(600, 100);
        let mut sharing = Sharing::new(PartitionScheme::Shards { per_partition: 2 }, 10, 3);
        sharing.per_client = Some(20);
        let s = Shares::compute(&data, &sharing).unwrap();
        assert!(s.train.iter().all(|p| p.len() == 20));
        sharing.per_client = Some(601);
        let e = Shares::compute(&data, &sharing).unwrap_err().to_string();
        assert!(
            e.contains("--examples-per-client 601 is more than the 600"),
            "{e}"
        );
        sharing.per_client = Some(0);
        assert!(Shares::compute(&data, &sharing).is_err());
        let e = Shares::compute(&data, &Sharing::new(PartitionScheme::Iid, 101, 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot split 100 test examples into 101"), "{e}");
        assert!(data.share(&s, 10).is_err());
        assert_eq!(data.share(&s, 3).unwrap().train.len(), 20);
    }
}

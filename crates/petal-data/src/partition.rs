//! Seeded IID partitioning into disjoint shards that cover the data set.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::DataError;

/// Indices of shard `id` of `num` over `len` items: a seeded shuffle cut
/// into `num` contiguous, near-equal pieces (sizes differ by at most one).
pub fn partition_indices(
    len: usize,
    id: usize,
    num: usize,
    seed: u64,
) -> Result<Vec<usize>, DataError> {
    if num == 0 {
        return Err(DataError::Partition(
            "the number of partitions must be at least 1".into(),
        ));
    }
    if id >= num {
        return Err(DataError::Partition(format!(
            "partition id {id} is out of range for {num} partitions (0..{})",
            num - 1
        )));
    }
    if num > len {
        return Err(DataError::Partition(format!(
            "cannot split {len} examples into {num} non-empty partitions"
        )));
    }
    let mut all: Vec<usize> = (0..len).collect();
    all.shuffle(&mut StdRng::seed_from_u64(seed));
    let (start, end) = (id * len / num, (id + 1) * len / num);
    Ok(all[start..end].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_disjoint_and_cover_everything() {
        for (len, num) in [(10, 3), (60_000, 7), (5, 5)] {
            let mut seen = vec![0u8; len];
            let mut sizes = Vec::new();
            for id in 0..num {
                let shard = partition_indices(len, id, num, 42).unwrap();
                sizes.push(shard.len());
                for i in shard {
                    seen[i] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "len {len} num {num}");
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= 1, "{sizes:?}");
        }
    }

    #[test]
    fn seed_changes_the_shuffle_and_is_reproducible() {
        let a = partition_indices(100, 0, 2, 1).unwrap();
        assert_eq!(a, partition_indices(100, 0, 2, 1).unwrap());
        assert_ne!(a, partition_indices(100, 0, 2, 2).unwrap());
    }

    #[test]
    fn bad_arguments_are_explained() {
        let e = partition_indices(10, 3, 3, 0).unwrap_err().to_string();
        assert!(e.contains("partition id 3 is out of range"), "{e}");
        assert!(partition_indices(10, 0, 0, 0).is_err());
        assert!(partition_indices(2, 0, 3, 0).is_err());
    }
}

//! Partitioning a data set among clients, seeded, with Flower Datasets'
//! schemes (`--partition`):
//!
//! - `iid`: a seeded shuffle cut into near-equal pieces (`IidPartitioner`);
//! - `dirichlet:ALPHA`: label skew; for every class, the partitions' shares
//!   are drawn from Dirichlet(ALPHA) and the class's examples cut by them,
//!   drawn again until every partition holds at least
//!   `min(10, n / partitions)` examples (`DirichletPartitioner`, its
//!   `min_partition_size` 10); small ALPHA, few classes per client;
//! - `shards:K`: pathological non-IID (McMahan et al.; `ShardPartitioner`):
//!   examples sorted by label are cut into `K × partitions` shards, each
//!   partition gets K of them at random;
//! - `size-skew:ALPHA`: quantity skew; partition sizes from
//!   Dirichlet(ALPHA), examples IID (NIID-Bench's quantity skew).
//!
//! Every example goes to exactly one partition and no partition is empty.
//! A test split is cut like its training split: each partition's share of
//! each class in the training split is its share of that class in the test
//! split ([`assign_like`]), so a client evaluates on data distributed as
//! its own.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::DataError;

/// How a data set is cut among clients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PartitionScheme {
    Iid,
    Dirichlet { alpha: f64 },
    Shards { per_partition: usize },
    SizeSkew { alpha: f64 },
}

impl std::str::FromStr for PartitionScheme {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "'{s}' is not a partition scheme (iid, dirichlet:ALPHA, shards:K or \
                 size-skew:ALPHA, e.g. dirichlet:0.5)"
            )
        };
        let (name, arg) = s.split_once(':').unwrap_or((s, ""));
        let positive = |a: &str| -> Result<f64, String> {
            a.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| format!("{name}: '{a}' is not a positive number"))
        };
        match (name, arg) {
            ("iid", "") => Ok(PartitionScheme::Iid),
            ("dirichlet", a) => Ok(PartitionScheme::Dirichlet {
                alpha: positive(a)?,
            }),
            ("size-skew", a) => Ok(PartitionScheme::SizeSkew {
                alpha: positive(a)?,
            }),
            ("shards", a) => a
                .parse::<usize>()
                .ok()
                .filter(|&k| k > 0)
                .map(|per_partition| PartitionScheme::Shards { per_partition })
                .ok_or_else(|| format!("shards: '{a}' is not a positive whole number")),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for PartitionScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartitionScheme::Iid => write!(f, "iid"),
            PartitionScheme::Dirichlet { alpha } => write!(f, "dirichlet:{alpha}"),
            PartitionScheme::Shards { per_partition } => write!(f, "shards:{per_partition}"),
            PartitionScheme::SizeSkew { alpha } => write!(f, "size-skew:{alpha}"),
        }
    }
}

impl serde::Serialize for PartitionScheme {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for PartitionScheme {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

pub(crate) fn check(len: usize, num: usize) -> Result<(), DataError> {
    if num == 0 {
        return Err(DataError::Partition(
            "the number of partitions must be at least 1".into(),
        ));
    }
    if num > len {
        return Err(DataError::Partition(format!(
            "cannot split {len} examples into {num} non-empty partitions"
        )));
    }
    Ok(())
}

/// Indices of shard `id` of `num` over `len` items: a seeded shuffle cut
/// into `num` contiguous, near-equal pieces (sizes differ by at most one).
pub fn partition_indices(
    len: usize,
    id: usize,
    num: usize,
    seed: u64,
) -> Result<Vec<usize>, DataError> {
    check(len, num)?;
    if id >= num {
        return Err(DataError::Partition(format!(
            "partition id {id} is out of range for {num} partitions (0..{})",
            num - 1
        )));
    }
    let mut all: Vec<usize> = (0..len).collect();
    all.shuffle(&mut StdRng::seed_from_u64(seed));
    let (start, end) = (id * len / num, (id + 1) * len / num);
    Ok(all[start..end].to_vec())
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A Gamma(alpha, 1) draw (Marsaglia and Tsang; boosted below 1).
fn gamma(alpha: f64, rng: &mut StdRng) -> f64 {
    if alpha < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(alpha + 1.0, rng) * u.powf(1.0 / alpha);
    }
    let d = alpha - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// A draw from the symmetric Dirichlet(alpha) over `n` parts.
fn dirichlet(alpha: f64, n: usize, rng: &mut StdRng) -> Vec<f64> {
    let g: Vec<f64> = (0..n).map(|_| gamma(alpha, rng)).collect();
    let total: f64 = g.iter().sum();
    if total > 0.0 && total.is_finite() {
        g.into_iter().map(|x| x / total).collect()
    } else {
        // Every draw underflowed (tiny alpha): one part takes all.
        let mut v = vec![0.0; n];
        v[rng.random_range(0..n)] = 1.0;
        v
    }
}

/// Cuts `items` by `shares` (summing to 1) as Flower does: at the
/// cumulative shares, rounded down.
fn cut(items: &[usize], shares: &[f64], out: &mut [Vec<usize>]) {
    let n = items.len();
    let mut start = 0usize;
    let mut cum = 0.0;
    for (i, s) in shares.iter().enumerate() {
        cum += s;
        let end = if i + 1 == shares.len() {
            n
        } else {
            ((cum * n as f64) as usize).clamp(start, n)
        };
        out[i].extend_from_slice(&items[start..end]);
        start = end;
    }
}

/// Indices of each class, each list shuffled with `rng`.
fn by_class(labels: &[u8], num_classes: usize, rng: &mut StdRng) -> Vec<Vec<usize>> {
    let mut classes = vec![Vec::new(); num_classes.max(1)];
    for (i, &l) in labels.iter().enumerate() {
        if let Some(c) = classes.get_mut(l as usize) {
            c.push(i);
        }
    }
    for c in &mut classes {
        c.shuffle(rng);
    }
    classes
}

/// The training indices of every partition under `scheme` (each list in
/// a seeded random order). Every index is in exactly one list, and none
/// is empty.
pub fn assign(
    scheme: PartitionScheme,
    labels: &[u8],
    num_classes: usize,
    num: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, DataError> {
    let len = labels.len();
    check(len, num)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut parts = match scheme {
        PartitionScheme::Iid => (0..num)
            .map(|id| partition_indices(len, id, num, seed))
            .collect::<Result<Vec<_>, _>>()?,
        PartitionScheme::Dirichlet { alpha } => {
            let min = (len / num).clamp(1, 10);
            let mut best: Option<Vec<Vec<usize>>> = None;
            for _ in 0..100 {
                let mut parts = vec![Vec::new(); num];
                for class in by_class(labels, num_classes, &mut rng) {
                    let shares = dirichlet(alpha, num, &mut rng);
                    cut(&class, &shares, &mut parts);
                }
                let smallest = parts.iter().map(Vec::len).min().unwrap_or(0);
                if smallest >= min {
                    best = Some(parts);
                    break;
                }
                let best_smallest = best
                    .as_ref()
                    .map_or(0, |b| b.iter().map(Vec::len).min().unwrap_or(0));
                if best.is_none() || smallest > best_smallest {
                    best = Some(parts);
                }
            }
            let mut parts = best.unwrap_or_default();
            if parts.iter().any(|p| p.len() < min) {
                tracing::warn!(
                    "dirichlet:{alpha} over {num} partitions leaves some with fewer than {min} \
                     examples in 100 draws; the emptiest get examples from the largest"
                );
                fill_empty(&mut parts);
            }
            parts
        }
        PartitionScheme::Shards { per_partition } => {
            let shards = num.saturating_mul(per_partition);
            if shards > len {
                return Err(DataError::Partition(format!(
                    "shards:{per_partition} needs {shards} shards of at least one example, \
                     the data has {len}"
                )));
            }
            // Sorted by label (a random order within each class).
            let sorted: Vec<usize> = by_class(labels, num_classes, &mut rng)
                .into_iter()
                .flatten()
                .collect();
            let mut ids: Vec<usize> = (0..shards).collect();
            ids.shuffle(&mut rng);
            let mut parts = vec![Vec::new(); num];
            for (k, shard) in ids.into_iter().enumerate() {
                let (a, b) = (shard * len / shards, (shard + 1) * len / shards);
                parts[k / per_partition].extend_from_slice(&sorted[a..b]);
            }
            parts
        }
        PartitionScheme::SizeSkew { alpha } => {
            let shares = dirichlet(alpha, num, &mut rng);
            // Every partition one example, the rest by the shares.
            let spare = len - num;
            let mut sizes: Vec<usize> = shares
                .iter()
                .map(|s| 1 + (s * spare as f64) as usize)
                .collect();
            let mut left = len - sizes.iter().sum::<usize>();
            let mut i = 0;
            while left > 0 {
                sizes[i % num] += 1;
                left -= 1;
                i += 1;
            }
            let mut all: Vec<usize> = (0..len).collect();
            all.shuffle(&mut rng);
            let mut start = 0;
            sizes
                .into_iter()
                .map(|n| {
                    let p = all[start..start + n].to_vec();
                    start += n;
                    p
                })
                .collect()
        }
    };
    for p in &mut parts {
        p.shuffle(&mut rng);
    }
    Ok(parts)
}

/// Gives every empty partition an example from the largest one.
fn fill_empty(parts: &mut [Vec<usize>]) {
    while let Some(empty) = parts.iter().position(Vec::is_empty) {
        let largest = (0..parts.len())
            .max_by_key(|&i| parts[i].len())
            .unwrap_or(0);
        match parts[largest].pop() {
            Some(x) if parts[largest].len() + 1 > 1 => parts[empty].push(x),
            Some(x) => {
                parts[largest].push(x);
                break;
            }
            None => break,
        }
    }
}

/// Each class's share per partition: `shares[class][partition]`.
pub fn class_shares(parts: &[Vec<usize>], labels: &[u8], num_classes: usize) -> Vec<Vec<f64>> {
    let mut counts = vec![vec![0usize; parts.len()]; num_classes.max(1)];
    for (i, p) in parts.iter().enumerate() {
        for &x in p {
            if let Some(c) = counts.get_mut(labels[x] as usize) {
                c[i] += 1;
            }
        }
    }
    counts
        .into_iter()
        .map(|row| {
            let total: usize = row.iter().sum();
            if total == 0 {
                vec![1.0 / parts.len() as f64; parts.len()]
            } else {
                row.into_iter().map(|c| c as f64 / total as f64).collect()
            }
        })
        .collect()
}

/// The indices of `labels` (another split) per partition, each class cut
/// by `shares` ([`class_shares`] of the training split); every index in
/// one list, and an example moved from the largest list to any that
/// would be empty.
pub fn assign_like(
    labels: &[u8],
    shares: &[Vec<f64>],
    seed: u64,
) -> Result<Vec<Vec<usize>>, DataError> {
    let num = shares.first().map_or(0, Vec::len);
    check(labels.len(), num)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut parts = vec![Vec::new(); num];
    for (class, items) in by_class(labels, shares.len(), &mut rng).iter().enumerate() {
        cut(items, &shares[class], &mut parts);
    }
    fill_empty(&mut parts);
    for p in &mut parts {
        p.shuffle(&mut rng);
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize, classes: u8) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % classes as usize) as u8).collect()
    }

    fn covers_once(parts: &[Vec<usize>], len: usize) {
        let mut seen = vec![0u8; len];
        for p in parts {
            assert!(!p.is_empty(), "an empty partition");
            for &i in p {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "every example exactly once");
    }

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
    fn seeded_and_checked() {
        let a = partition_indices(100, 0, 2, 1).unwrap();
        assert_eq!(a, partition_indices(100, 0, 2, 1).unwrap());
        assert_ne!(a, partition_indices(100, 0, 2, 2).unwrap());
        let e = partition_indices(10, 3, 3, 0).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
        assert!(partition_indices(10, 0, 0, 0).is_err());
        assert!(partition_indices(2, 0, 3, 0).is_err());
    }

    #[test]
    fn every_scheme_covers_every_example_once() {
        let l = labels(6000, 10);
        for s in [
            "iid",
            "dirichlet:0.1",
            "dirichlet:100",
            "shards:2",
            "size-skew:0.5",
        ] {
            let scheme: PartitionScheme = s.parse().unwrap();
            for num in [1, 10, 97] {
                let parts = assign(scheme, &l, 10, num, 7).unwrap();
                assert_eq!(parts.len(), num, "{s}");
                covers_once(&parts, l.len());
                assert_eq!(
                    parts,
                    assign(scheme, &l, 10, num, 7).unwrap(),
                    "{s} is seeded"
                );
                let test = labels(1000, 10);
                let t = assign_like(&test, &class_shares(&parts, &l, 10), 8).unwrap();
                covers_once(&t, test.len());
            }
        }
    }

    #[test]
    fn skew_is_where_it_should_be() {
        let l = labels(20_000, 10);
        let classes_held = |parts: &[Vec<usize>]| -> f64 {
            let held: usize = parts
                .iter()
                .map(|p| {
                    let mut c = [0usize; 10];
                    p.iter().for_each(|&i| c[l[i] as usize] += 1);
                    // Classes making at least 5 % of the partition.
                    c.iter().filter(|&&n| n * 20 >= p.len()).count()
                })
                .sum();
            held as f64 / parts.len() as f64
        };
        let iid = assign(PartitionScheme::Iid, &l, 10, 10, 1).unwrap();
        let dir = assign(PartitionScheme::Dirichlet { alpha: 0.1 }, &l, 10, 10, 1).unwrap();
        let shards = assign(PartitionScheme::Shards { per_partition: 2 }, &l, 10, 10, 1).unwrap();
        assert_eq!(classes_held(&iid), 10.0);
        assert!(classes_held(&dir) < 4.0, "{}", classes_held(&dir));
        assert!(classes_held(&shards) <= 2.5, "{}", classes_held(&shards));
        let sizes: Vec<usize> = assign(PartitionScheme::SizeSkew { alpha: 0.3 }, &l, 10, 10, 1)
            .unwrap()
            .iter()
            .map(Vec::len)
            .collect();
        let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(max > &(4 * min), "size skew: {sizes:?}");
    }

    #[test]
    fn dirichlet_draws_are_dirichlet() {
        // E[x_i] = 1/n; Var[x_i] = (n − 1) / (n² (n·alpha + 1)).
        let mut rng = StdRng::seed_from_u64(3);
        let (n, alpha, draws) = (4usize, 0.5, 20_000);
        let first: Vec<f64> = (0..draws)
            .map(|_| dirichlet(alpha, n, &mut rng)[0])
            .collect();
        let mean = first.iter().sum::<f64>() / draws as f64;
        let var = first.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / draws as f64;
        let want = (n as f64 - 1.0) / ((n * n) as f64 * (n as f64 * alpha + 1.0));
        assert!((mean - 0.25).abs() < 0.01, "{mean}");
        assert!((var - want).abs() < 0.1 * want, "{var} vs {want}");
    }

    #[test]
    fn schemes_parse_and_print() {
        for s in ["iid", "dirichlet:0.5", "shards:2", "size-skew:1"] {
            let p: PartitionScheme = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        for bad in [
            "dirichlet",
            "dirichlet:-1",
            "shards:0",
            "shards:1.5",
            "zipf:2",
            "iid:3",
        ] {
            assert!(bad.parse::<PartitionScheme>().is_err(), "{bad}");
        }
    }
}

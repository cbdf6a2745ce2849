//! A log-linear latency histogram (the layout of HDR histograms): values below 32 µs are
//! counted exactly, above that each power of two is split into 32 buckets, so a reported
//! percentile is within 1/32 (about 3 %) of the true value at any scale. The `hold` clients
//! record into one each and send it, sparse, with their `latency` report; the scenario merges
//! the clients' histograms and reads the fleet's percentiles from the sum (a count-weighted mean
//! of per-client medians, or the worst client's p99, is not a percentile of anything).

use serde_json::{Value, json};

/// Sub-buckets per power of two (2^5: 3 % resolution).
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
/// Buckets for values up to 2^63 µs.
const BUCKETS: usize = (SUB + (64 - SUB_BITS as u64) * SUB) as usize;

pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: vec![0; BUCKETS], total: 0 }
    }
}

/// The bucket of `v`.
fn index(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let sub = (v >> shift) - SUB; // 0..SUB
    (SUB + u64::from(shift) * SUB + sub) as usize
}

/// The largest value bucket `i` holds.
fn upper(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let shift = (i - SUB) / SUB;
    let sub = (i - SUB) % SUB;
    ((SUB + sub + 1) << shift) - 1
}

impl Histogram {
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (0..=1): the upper end of the bucket that holds it; 0 when
    /// empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let target = ((self.total as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= target {
                return upper(i);
            }
        }
        0
    }

    /// The non-empty buckets, as `[[bucket, count], ...]`.
    pub fn to_json(&self) -> Value {
        let pairs: Vec<[u64; 2]> =
            self.counts.iter().enumerate().filter(|(_, n)| **n > 0).map(|(i, n)| [i as u64, *n]).collect();
        json!(pairs)
    }

    /// Adds the counts of a histogram sent with [`Histogram::to_json`] (unknown buckets are
    /// ignored).
    pub fn merge_json(&mut self, sparse: &Value) {
        for pair in sparse.as_array().into_iter().flatten() {
            let (Some(i), Some(n)) = (pair[0].as_u64(), pair[1].as_u64()) else { continue };
            if let Some(c) = self.counts.get_mut(i as usize) {
                *c += n;
                self.total += n;
            }
        }
    }

    pub fn clear(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0);
        self.total = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_a_bucket_within_three_percent_of_it() {
        let mut v = 1u64;
        while v < u64::MAX / 3 {
            for x in [v, v + 1, v * 3 / 2] {
                let hi = upper(index(x));
                assert!(hi >= x, "{x} above its bucket's top {hi}");
                assert!((hi - x) as f64 <= x as f64 / 32.0 + 1.0, "{x} vs {hi}");
            }
            v *= 2;
        }
        assert_eq!(index(31), 31);
        assert_eq!(upper(index(32)), 32);
    }

    #[test]
    fn merged_histograms_give_the_percentiles_of_all_their_values() {
        let (mut a, mut b) = (Histogram::default(), Histogram::default());
        (1..=900).for_each(|v| a.record(v * 1000)); // 1..900 ms
        (901..=1000).for_each(|v| b.record(v * 1000)); // 901..1000 ms
        let mut all = Histogram::default();
        all.merge_json(&a.to_json());
        all.merge_json(&b.to_json());
        assert_eq!(all.count(), 1000);
        let near = |got: u64, want: u64| (got as f64 - want as f64).abs() <= want as f64 / 32.0;
        assert!(near(all.quantile(0.5), 500_000), "{}", all.quantile(0.5));
        assert!(near(all.quantile(0.99), 990_000), "{}", all.quantile(0.99));
        assert!(near(all.quantile(0.999), 999_000), "{}", all.quantile(0.999));
        assert!(near(all.quantile(1.0), 1_000_000));
        // Resolution below 2x: 100 ms and 125 ms (one power-of-two bucket) are told apart.
        let (mut x, mut y) = (Histogram::default(), Histogram::default());
        x.record(100_000);
        y.record(125_000);
        assert!(y.quantile(0.5) as f64 / x.quantile(0.5) as f64 > 1.2);
    }
}

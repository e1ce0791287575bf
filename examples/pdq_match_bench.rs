//! PDQ matching at bank scale: a bank of reference entries (8 PDQ hashes each, the dihedral
//! variants a reference image has) against a collection (one hash per image), through
//! [`PdqIndex`] (multi-index hashing) and, as the baseline, a linear scan of the bank per image.
//!
//! The hashes are seeded random 256-bit values (8 independent ones per entry: the index's cost
//! depends on how the hashes spread over its 16-bit chunks, which random hashes do evenly),
//! and the collection holds `--planted` near-copies of bank entries: a random variant of a
//! random entry with 0 to 31 random bits flipped (evenly over those distances). Every planted
//! copy must be found (recall 100%, checked); random hashes are never within 31 bits of each
//! other (the chance is about 2^-90 a pair), so any other match is reported as an error.
//!
//! Per size: the index's build time and memory; the whole collection matched at distance 31
//! by [`PdqIndex::pairs_within`] (the join the `matches` command runs); each image probed with
//! [`PdqIndex::within`] (rayon over the collection, as checking images one at a time does); and
//! the linear scan (every bank hash compared with each image's, on 64-bit words). The last two
//! run over an evenly spread sample of the collection when it is larger than `--within-probes`
//! (default 100000) or `--linear-probes` (default 10000), and are extrapolated to the whole
//! collection (marked "est."). Every way must find the same matches on the images it covers;
//! the speed-ups are the linear scan's time over each index method's.
//!
//! ```sh
//! CARGO_BUILD_JOBS=1 cargo run --example pdq_match_bench \
//!     --config 'profile.dev.package.blipsearch.opt-level=3' \
//!     --config 'profile.dev.package.blipsearch.debug-assertions=false' \
//!     --config 'profile.dev.package.blipsearch.overflow-checks=false' \
//!     -- --sizes 10000x10000,100000x100000,1000000x1000000
//! ```
//!
//! (The dev profile already builds the dependencies optimised; the flags optimise this crate
//! too, which costs a few minutes rather than a `--release` build of everything.)

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blipsearch::index::{PdqHash, PdqIndex, DEFAULT_PDQ_DISTANCE};
use rayon::prelude::*;

// Only its random bits are needed here.
#[allow(dead_code)]
#[path = "common/gen.rs"]
mod gen;
use gen::Gen;

struct Args {
    sizes: Vec<(usize, usize)>,
    planted: usize,
    within_probes: usize,
    linear_probes: usize,
    seed: u64,
}

fn parse() -> anyhow::Result<Args> {
    let mut args = Args {
        sizes: vec![(10_000, 10_000), (100_000, 100_000)],
        planted: 1000,
        within_probes: 100_000,
        linear_probes: 10_000,
        seed: 7,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sizes" => {
                args.sizes = value
                    .split(',')
                    .map(|s| {
                        let (b, c) = s
                            .split_once('x')
                            .with_context(|| format!("{s:?} is not BANKxCOLLECTION"))?;
                        Ok((b.parse()?, c.parse()?))
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            "--planted" => args.planted = value.parse()?,
            "--within-probes" => args.within_probes = value.parse()?,
            "--linear-probes" => args.linear_probes = value.parse()?,
            "--seed" => args.seed = value.parse()?,
            _ => bail!("unknown option {flag} (--sizes, --planted, --within-probes, --linear-probes, --seed)"),
        }
    }
    Ok(args)
}

fn random_hash(g: &mut Gen) -> PdqHash {
    let mut h = [0u8; 32];
    for chunk in h.chunks_mut(8) {
        chunk.copy_from_slice(&g.next().to_le_bytes());
    }
    PdqHash(h)
}

/// `h` with `k` distinct random bits flipped.
fn flipped(h: &PdqHash, k: u32, g: &mut Gen) -> PdqHash {
    let mut out = *h;
    let mut done = HashSet::new();
    while done.len() < k as usize {
        let bit = (g.next() % 256) as usize;
        if done.insert(bit) {
            out.0[bit / 8] ^= 1 << (bit % 8);
        }
    }
    out
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.1} s")
    }
}

/// (collection position, bank entry) of every hit.
type Matches = HashSet<(usize, usize)>;

fn words(h: &PdqHash) -> [u64; 4] {
    std::array::from_fn(|i| u64::from_be_bytes(h.0[8 * i..8 * i + 8].try_into().unwrap()))
}

/// `n` positions spread evenly over `0..len`.
fn spread(n: usize, len: usize) -> Vec<usize> {
    let n = n.min(len);
    (0..n).map(|i| i * len / n).collect()
}

/// A time over `sample` images scaled to `total`, labelled as an estimate when scaled.
fn scaled(t: Duration, sample: usize, total: usize) -> (Duration, String) {
    let t = t.mul_f64(total as f64 / sample as f64);
    if sample == total {
        (t, secs(t))
    } else {
        (t, format!("{} est.", secs(t)))
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse()?;
    let d = DEFAULT_PDQ_DISTANCE;
    println!(
        "PDQ matching at distance {d}: bank entries x 8 dihedral hashes against a collection, {} rayon threads",
        rayon::current_num_threads()
    );
    println!(
        "| bank entries | bank hashes | collection | build | index MB | planted | found | other | join (pairs_within) | within per image | linear scan | join speed-up | within speed-up |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &(bank_entries, collection_size) in &args.sizes {
        let mut g = Gen(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let bank: Vec<PdqHash> = (0..bank_entries * 8).map(|_| random_hash(&mut g)).collect();
        let mut collection: Vec<PdqHash> =
            (0..collection_size).map(|_| random_hash(&mut g)).collect();
        // Near-copies at spread positions: (position, entry).
        let mut planted: Matches = HashSet::new();
        let planted_at = spread(args.planted, collection_size);
        for (i, &at) in planted_at.iter().enumerate() {
            let entry = (g.next() % bank_entries as u64) as usize;
            let variant = (g.next() % 8) as usize;
            let k = (i as u32) % (d + 1);
            collection[at] = flipped(&bank[8 * entry + variant], k, &mut g);
            planted.insert((at, entry));
        }

        let t = Instant::now();
        let index = PdqIndex::new(bank.clone());
        let build = t.elapsed();

        // The whole collection at once.
        let t = Instant::now();
        let pairs = index.pairs_within(&collection, d);
        let join = t.elapsed();
        let found: Matches = pairs.iter().map(|&(i, p, _)| (i, p / 8)).collect();
        let recalled = planted.intersection(&found).count();
        let other = found.difference(&planted).count();
        if recalled != planted.len() || other != 0 {
            bail!(
                "{recalled} of {} planted copies found, {other} other matches",
                planted.len()
            );
        }
        let on = |sample: &[usize]| -> Matches {
            let s: HashSet<usize> = sample.iter().copied().collect();
            found
                .iter()
                .filter(|(i, _)| s.contains(i))
                .copied()
                .collect()
        };

        // One image at a time, rayon over the images.
        let sample = spread(args.within_probes, collection_size);
        let t = Instant::now();
        let hits: Matches = sample
            .par_iter()
            .flat_map_iter(|&i| {
                index
                    .within(&collection[i], d)
                    .into_iter()
                    .map(move |(p, _)| (i, p / 8))
            })
            .collect();
        let (within, within_label) = scaled(t.elapsed(), sample.len(), collection_size);
        if hits != on(&sample) {
            bail!("within and pairs_within disagree");
        }

        // The baseline.
        let bank_words: Vec<[u64; 4]> = bank.iter().map(words).collect();
        let sample = spread(args.linear_probes, collection_size);
        let t = Instant::now();
        let linear: Matches = sample
            .par_iter()
            .flat_map_iter(|&i| {
                let q = words(&collection[i]);
                bank_words
                    .iter()
                    .enumerate()
                    .filter(move |(_, w)| {
                        (w[0] ^ q[0]).count_ones()
                            + (w[1] ^ q[1]).count_ones()
                            + (w[2] ^ q[2]).count_ones()
                            + (w[3] ^ q[3]).count_ones()
                            <= d
                    })
                    .map(move |(p, _)| (i, p / 8))
            })
            .collect();
        let (linear_time, linear_label) = scaled(t.elapsed(), sample.len(), collection_size);
        if linear != on(&sample) {
            bail!("the index and the linear scan disagree");
        }
        println!(
            "| {} | {} | {} | {} | {:.0} | {} | {} ({:.0}%) | {} | {} | {} | {} | {:.0}x | {:.0}x |",
            bank_entries,
            bank.len(),
            collection_size,
            secs(build),
            index.memory_bytes() as f64 / 1e6,
            planted.len(),
            recalled,
            100.0 * recalled as f64 / planted.len().max(1) as f64,
            other,
            secs(join),
            within_label,
            linear_label,
            linear_time.as_secs_f64() / join.as_secs_f64(),
            linear_time.as_secs_f64() / within.as_secs_f64(),
        );
    }
    Ok(())
}

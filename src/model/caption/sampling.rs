//! Greedy search and nucleus sampling: each row of an image decoded on its own, the next token
//! the argmax, or a draw after HF's repetition penalty, top-k and top-p, from a stream seeded per
//! sample.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::logits::{apply_repetition_penalty, argmax, mask_early_sep};
use super::params::SampleParams;
use super::stepper::{Generated, Plan, Stepper};
use crate::model::error::Result;
use crate::model::tokenizer::{PAD, SEP};

/// The tokens that survive HF's top-k then top-p filters, with their renormalised
/// probabilities, most likely first (ties: lower id first).
///
/// Top-k keeps every token scoring at least the k-th best score. Top-p keeps a token when the
/// probability mass of the tokens ranked before it is below `top_p`: the smallest set of most
/// likely tokens whose mass reaches `top_p`, and always at least one token.
fn nucleus(scores: &[f32], top_k: usize, top_p: f32) -> Vec<(u32, f64)> {
    let mut order: Vec<u32> = (0..scores.len() as u32)
        .filter(|&i| scores[i as usize] > f32::NEG_INFINITY)
        .collect();
    let by_score = |a: &u32, b: &u32| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    };
    if top_k > 0 && top_k < order.len() {
        order.select_nth_unstable_by(top_k - 1, by_score);
        let kth = scores[order[top_k - 1] as usize];
        order.retain(|&i| scores[i as usize] >= kth);
    }
    order.sort_unstable_by(by_score);
    let Some(&first) = order.first() else {
        return Vec::new();
    };
    let max = f64::from(scores[first as usize]);
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| (f64::from(scores[i as usize]) - max).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let top_p = f64::from(top_p);
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for (&i, &w) in order.iter().zip(&weights) {
        if !kept.is_empty() && mass >= top_p {
            break;
        }
        let p = w / total;
        kept.push((i, p));
        mass += p;
    }
    let kept_mass: f64 = kept.iter().map(|(_, p)| p).sum();
    kept.into_iter().map(|(i, p)| (i, p / kept_mass)).collect()
}

/// Draws one token from `dist` (probabilities summing to 1).
fn draw(dist: &[(u32, f64)], rng: &mut StdRng) -> Option<u32> {
    let u: f64 = rng.random();
    let mut cum = 0.0;
    for &(t, p) in dist {
        cum += p;
        if u < cum {
            return Some(t);
        }
    }
    dist.last().map(|&(t, _)| t)
}

/// The random stream of sample `j` (independent of which other images share the batch).
fn sample_rng(seed: u64, j: usize) -> StdRng {
    StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(j as u64),
    )
}

/// One sampling step as HF `generate(do_sample=True)` does it: repetition penalty, min length,
/// top-k, top-p, then a draw from the softmax of what is left.
fn sample_token(
    logits: &[f32],
    seq: &[u32],
    min_length: usize,
    params: &SampleParams,
    rng: &mut StdRng,
) -> u32 {
    let mut scores = logits.to_vec();
    apply_repetition_penalty(&mut scores, seq, params.repetition_penalty);
    mask_early_sep(&mut scores, seq.len(), min_length);
    let dist = nucleus(&scores, params.top_k, params.top_p);
    draw(&dist, rng).unwrap_or_else(|| argmax(&scores))
}

/// Greedy search or sampling: `rows` rows per image (1, or the number of samples), each decoded
/// on its own. A finished row keeps its place (fed [PAD], as HF does) until every row of its
/// image is done; then the image leaves the batch.
pub(super) fn decode_rows(
    st: &mut dyn Stepper,
    n: usize,
    plan: &Plan,
    sampling: Option<&SampleParams>,
) -> Result<Vec<Vec<Generated>>> {
    let g = sampling.map_or(1, |s| s.num_samples);
    let mut seqs = vec![vec![plan.prompt.clone(); g]; n];
    let mut done = vec![vec![false; g]; n];
    let mut rngs: Vec<Vec<StdRng>> = (0..n)
        .map(|_| {
            (0..g)
                .map(|j| sample_rng(sampling.map_or(0, |s| s.seed), j))
                .collect()
        })
        .collect();
    let mut active: Vec<usize> = (0..n).collect();
    let mut logits = st.prefill(&plan.prompt)?;
    if g > 1 {
        let rows: Vec<u32> = (0..n as u32)
            .flat_map(|i| std::iter::repeat_n(i, g))
            .collect();
        let images: Vec<u32> = (0..n as u32).collect();
        st.select(&rows, &images, g)?;
        logits = logits.repeat_rows(g);
    }
    loop {
        for (a, &img) in active.iter().enumerate() {
            for j in 0..g {
                if done[img][j] {
                    continue;
                }
                let row = logits.row(a * g + j);
                let seq = &mut seqs[img][j];
                let token = match sampling {
                    None => {
                        let mut scores = row.to_vec();
                        mask_early_sep(&mut scores, seq.len(), plan.min_length);
                        argmax(&scores)
                    }
                    Some(s) => sample_token(row, seq, plan.min_length, s, &mut rngs[img][j]),
                };
                seq.push(token);
                done[img][j] = token == SEP || seq.len() >= plan.max_length;
            }
        }
        let keep: Vec<usize> = (0..active.len())
            .filter(|&a| done[active[a]].iter().any(|d| !d))
            .collect();
        if keep.is_empty() {
            break;
        }
        if keep.len() != active.len() {
            let rows: Vec<u32> = keep
                .iter()
                .flat_map(|&a| (0..g).map(move |j| (a * g + j) as u32))
                .collect();
            let images: Vec<u32> = keep.iter().map(|&a| a as u32).collect();
            st.select(&rows, &images, g)?;
            active = keep.iter().map(|&a| active[a]).collect();
        }
        let tokens: Vec<u32> = active
            .iter()
            .flat_map(|&img| (0..g).map(move |j| (img, j)))
            .map(|(img, j)| {
                if done[img][j] {
                    PAD
                } else {
                    seqs[img][j].last().copied().unwrap_or(PAD)
                }
            })
            .collect();
        logits = st.step(&tokens)?;
    }
    Ok(seqs
        .into_iter()
        .map(|rows| {
            rows.into_iter()
                .map(|ids| Generated { ids, score: None })
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits_of(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        let scores = logits_of(&[0.05, 0.5, 0.15, 0.3]);
        let ids = |p: f32| -> Vec<u32> { nucleus(&scores, 0, p).iter().map(|x| x.0).collect() };
        assert_eq!(ids(0.4), vec![1]);
        assert_eq!(ids(0.75), vec![1, 3]);
        assert_eq!(ids(0.85), vec![1, 3, 2]);
        assert_eq!(ids(0.99), vec![1, 3, 2, 0]);
        assert_eq!(ids(1.0), vec![1, 3, 2, 0]);
        // Kept mass >= p, and dropping the least likely kept token falls below p.
        for p in [0.1f32, 0.3, 0.55, 0.7, 0.9, 0.96] {
            let kept = nucleus(&scores, 0, p);
            let probs = [0.05, 0.5, 0.15, 0.3];
            let mass: f64 = kept.iter().map(|(i, _)| probs[*i as usize]).sum();
            let last = probs[kept.last().unwrap().0 as usize];
            assert!(
                mass >= f64::from(p) - 1e-9 && mass - last < f64::from(p),
                "p {p}"
            );
        }
        // Renormalised over the kept tokens.
        let kept = nucleus(&scores, 0, 0.75);
        assert!((kept[0].1 - 0.5 / 0.8).abs() < 1e-6 && (kept[1].1 - 0.3 / 0.8).abs() < 1e-6);
        // A single dominant token is always kept, even for tiny p.
        assert_eq!(nucleus(&scores, 0, 1e-6).len(), 1);
    }

    #[test]
    fn top_k_keeps_ties_and_runs_before_top_p() {
        let scores = [1.0f32, 3.0, 2.0, 2.0, -1.0, f32::NEG_INFINITY];
        let ids: Vec<u32> = nucleus(&scores, 2, 1.0).iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![1, 2, 3], "the 2nd best score is tied: both kept");
        let ids: Vec<u32> = nucleus(&scores, 1, 1.0).iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![1]);
        // Masked tokens never survive.
        assert!(nucleus(&scores, 0, 1.0).iter().all(|x| x.0 != 5));
        // top-p mass is computed over the top-k survivors: with k=2 (3 tokens kept), token 1
        // has e^3 / (e^3 + 2 e^2) = 0.576 of the mass.
        let ids: Vec<u32> = nucleus(&scores, 2, 0.55).iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![1]);
        let ids: Vec<u32> = nucleus(&scores, 0, 0.55).iter().map(|x| x.0).collect();
        assert_eq!(
            ids,
            vec![1, 2],
            "without top-k, token 1 holds less than 0.55"
        );
    }

    #[test]
    fn draws_follow_the_nucleus() {
        let dist = nucleus(&logits_of(&[0.05, 0.5, 0.15, 0.3]), 0, 0.75);
        let mut rng = sample_rng(7, 0);
        let mut counts = [0usize; 4];
        let n = 20_000;
        for _ in 0..n {
            counts[draw(&dist, &mut rng).unwrap() as usize] += 1;
        }
        assert_eq!(
            counts[0] + counts[2],
            0,
            "tokens outside the nucleus are never drawn"
        );
        let f1 = counts[1] as f64 / n as f64;
        assert!((f1 - 0.625).abs() < 0.02, "frequency {f1}");
    }
}

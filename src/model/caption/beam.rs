//! Beam search, step for step as HF transformers' `_beam_search`, over several images at once.

use super::logits::mask_early_sep;
use super::params::BeamParams;
use super::stepper::{Generated, Plan, Stepper};
use crate::model::error::Result;
use crate::model::tokenizer::{PAD, SEP};

/// The score HF gives to a beam it has set aside (`-1e9`).
const NEG_LARGE: f32 = -1.0e9;

/// A finished-hypothesis slot of HF's beam search.
#[derive(Debug, Clone)]
struct Hypothesis {
    score: f32,
    ids: Vec<u32>,
    finished: bool,
}

/// A running beam.
#[derive(Debug, Clone)]
struct Beam {
    score: f32,
    ids: Vec<u32>,
}

/// The beam search state of one image, following HF transformers' `_beam_search` (v4.50+ / v5):
/// each step takes the best `2 * num_beams` continuations over all beams; those among the first
/// `num_beams` that end with [SEP] or reach `max_length` become hypotheses, the best `num_beams`
/// that do not continue; the search stops when `max_length` is reached or, all hypothesis slots
/// being filled, the best running beam (length-normalised by its current generated length) cannot
/// beat the worst hypothesis (`early_stopping=False`).
struct BeamState {
    running: Vec<Beam>,
    hypotheses: Vec<Hypothesis>,
    /// HF's `is_early_stop_heuristic_unsatisfied`.
    improvable: bool,
    done: bool,
}

/// `(score, beam, token)` candidates, best first.
type Candidates = Vec<(f32, usize, u32)>;

/// Keeps the `k` best of `(score, beam, token)` seen so far, best first; on equal scores the
/// earlier one (lower beam, then lower token) ranks first.
fn push_candidate(top: &mut Candidates, k: usize, cand: (f32, usize, u32)) {
    if top.len() == k
        && top
            .last()
            .is_some_and(|last| cand.0.partial_cmp(&last.0) != Some(std::cmp::Ordering::Greater))
    {
        return;
    }
    let pos = top.iter().position(|c| cand.0 > c.0).unwrap_or(top.len());
    top.insert(pos, cand);
    top.truncate(k);
}

/// Log-softmax of a row (f64 accumulation, f32 result).
pub(super) fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| f64::from(x - max).exp()).sum();
    let lse = f64::from(max) + sum.ln();
    row.iter().map(|&x| (f64::from(x) - lse) as f32).collect()
}

/// Indices of the `k` largest values, best first; ties keep the earlier index first.
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

impl BeamState {
    fn new(num_beams: usize, prompt: &[u32]) -> Self {
        let running = (0..num_beams)
            .map(|b| Beam {
                score: if b == 0 { 0.0 } else { NEG_LARGE },
                ids: prompt.to_vec(),
            })
            .collect();
        let hypotheses = (0..num_beams)
            .map(|_| Hypothesis {
                score: NEG_LARGE,
                ids: prompt.to_vec(),
                finished: false,
            })
            .collect();
        Self {
            running,
            hypotheses,
            improvable: true,
            done: false,
        }
    }

    /// One step from the logits of this image's beams (`rows[b]` for beam `b`). Returns, for each
    /// new running beam, the index of the beam it continues.
    fn advance(&mut self, rows: &[&[f32]], plan: &Plan, params: &BeamParams) -> Vec<usize> {
        let k = self.running.len();
        let prompt_len = plan.prompt.len();
        let cur_len = self.running[0].ids.len();
        let mut top: Candidates = Vec::with_capacity(2 * k + 1);
        for (b, row) in rows.iter().enumerate() {
            let mut lp = log_softmax(row);
            mask_early_sep(&mut lp, cur_len, plan.min_length);
            let base = self.running[b].score;
            for (t, &x) in lp.iter().enumerate() {
                push_candidate(&mut top, 2 * k, (x + base, b, t as u32));
            }
        }
        let cands: Vec<(f32, Vec<u32>, bool)> = top
            .iter()
            .map(|&(score, b, t)| {
                let mut ids = self.running[b].ids.clone();
                ids.push(t);
                let hit = t == SEP || ids.len() >= plan.max_length;
                (score, ids, hit)
            })
            .collect();

        // Beams that go on: the best k continuations that did not finish.
        let adjusted: Vec<f32> = cands
            .iter()
            .map(|(s, _, hit)| if *hit { s + NEG_LARGE } else { *s })
            .collect();
        let next = top_indices(&adjusted, k);
        let sources: Vec<usize> = next.iter().map(|&j| top[j].1).collect();

        // Hypotheses: finished continuations ranked within the first k, length-normalised.
        let gen_len = (cur_len + 1 - prompt_len) as f32;
        let norm = gen_len.powf(params.length_penalty);
        let mut merged = std::mem::take(&mut self.hypotheses);
        for (j, (score, ids, hit)) in cands.iter().enumerate() {
            let eligible = *hit && j < k;
            let mut s = score / norm;
            if !self.improvable {
                s += NEG_LARGE;
            }
            if !eligible {
                s += NEG_LARGE;
            }
            merged.push(Hypothesis {
                score: s,
                ids: ids.clone(),
                finished: eligible,
            });
        }
        let scores: Vec<f32> = merged.iter().map(|h| h.score).collect();
        self.hypotheses = top_indices(&scores, k)
            .into_iter()
            .map(|i| merged[i].clone())
            .collect();

        self.running = next
            .iter()
            .map(|&j| Beam {
                score: adjusted[j],
                ids: cands[j].1.clone(),
            })
            .collect();

        // Can a running beam still beat the worst hypothesis?
        let new_len = cur_len + 1;
        let best_running =
            self.running[0].score / ((new_len - prompt_len) as f32).powf(params.length_penalty);
        let worst = self
            .hypotheses
            .iter()
            .map(|h| h.score)
            .fold(f32::INFINITY, f32::min);
        let improvable = self
            .hypotheses
            .iter()
            .any(|h| best_running > if h.finished { worst } else { NEG_LARGE });
        self.improvable &= improvable;
        self.done = !self.improvable || new_len >= plan.max_length;
        sources
    }

    fn best(&self) -> Generated {
        let h = &self.hypotheses[0];
        Generated {
            ids: h.ids.clone(),
            score: Some(h.score),
        }
    }
}

/// Beam search over `n` images at once, `params.num_beams` rows per image.
pub(super) fn beam_search(
    st: &mut dyn Stepper,
    n: usize,
    plan: &Plan,
    params: &BeamParams,
) -> Result<Vec<Generated>> {
    let k = params.num_beams;
    let mut states: Vec<BeamState> = (0..n).map(|_| BeamState::new(k, &plan.prompt)).collect();
    let first = st.prefill(&plan.prompt)?;
    let rows: Vec<u32> = (0..n as u32)
        .flat_map(|i| std::iter::repeat_n(i, k))
        .collect();
    let all: Vec<u32> = (0..n as u32).collect();
    st.select(&rows, &all, k)?;
    let mut logits = first.repeat_rows(k);
    let mut active: Vec<usize> = (0..n).collect();
    loop {
        let mut rows = Vec::with_capacity(active.len() * k);
        let mut keep = Vec::with_capacity(active.len());
        for (a, &img) in active.iter().enumerate() {
            let beam_rows: Vec<&[f32]> = (0..k).map(|b| logits.row(a * k + b)).collect();
            let sources = states[img].advance(&beam_rows, plan, params);
            if !states[img].done {
                keep.push(a);
                rows.extend(sources.iter().map(|&b| (a * k + b) as u32));
            }
        }
        if keep.is_empty() {
            break;
        }
        let images: Vec<u32> = keep.iter().map(|&a| a as u32).collect();
        st.select(&rows, &images, k)?;
        active = keep.iter().map(|&a| active[a]).collect();
        let tokens: Vec<u32> = active
            .iter()
            .flat_map(|&img| {
                states[img]
                    .running
                    .iter()
                    .map(|b| b.ids.last().copied().unwrap_or(PAD))
            })
            .collect();
        logits = st.step(&tokens)?;
    }
    Ok(states.iter().map(BeamState::best).collect())
}

//! Next-token logits, one row per decoder row, and the HF logits processors the search loops
//! apply to them (minimum length, repetition penalty) with torch's `argmax`.

use crate::model::tokenizer::SEP;

/// Next-token logits, one row per decoder row.
pub(super) struct Logits {
    pub(super) data: Vec<f32>,
    pub(super) vocab: usize,
}

impl Logits {
    pub(super) fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.vocab..(r + 1) * self.vocab]
    }

    /// Each row repeated `times` times, consecutively.
    pub(super) fn repeat_rows(&self, times: usize) -> Self {
        let rows = self.data.len() / self.vocab.max(1);
        let mut data = Vec::with_capacity(self.data.len() * times);
        for r in 0..rows {
            for _ in 0..times {
                data.extend_from_slice(self.row(r));
            }
        }
        Self {
            data,
            vocab: self.vocab,
        }
    }
}

/// HF's `MinLengthLogitsProcessor`: no [SEP] while the sequence is shorter than `min_length`.
pub(super) fn mask_early_sep(scores: &mut [f32], len: usize, min_length: usize) {
    if len < min_length {
        if let Some(s) = scores.get_mut(SEP as usize) {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// The first index of the largest value (torch `argmax`); NaN never wins.
pub(super) fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] || scores[best].is_nan() && !s.is_nan() {
            best = i;
        }
    }
    best as u32
}

/// HF's `RepetitionPenaltyLogitsProcessor`: each distinct token of `seq` has its score divided by
/// `penalty` when positive and multiplied by it otherwise.
pub(super) fn apply_repetition_penalty(scores: &mut [f32], seq: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = std::collections::HashSet::with_capacity(seq.len());
    for &t in seq {
        if !seen.insert(t) {
            continue;
        }
        if let Some(s) = scores.get_mut(t as usize) {
            *s = if *s < 0.0 { *s * penalty } else { *s / penalty };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_as_hf() {
        let mut s = [2.0f32, -1.0, 0.5, 3.0, 0.0];
        apply_repetition_penalty(&mut s, &[0, 1, 0, 4, 0], 1.1);
        assert_eq!(s, [2.0 / 1.1, -1.1, 0.5, 3.0, 0.0]);
        let mut t = [2.0f32, -1.0];
        apply_repetition_penalty(&mut t, &[0, 1], 1.0);
        assert_eq!(t, [2.0, -1.0]);
        // Ids outside the vocabulary are ignored, not a panic.
        apply_repetition_penalty(&mut t, &[99], 2.0);
    }

    #[test]
    fn min_length_masks_sep_and_argmax_takes_the_first_max() {
        let mut s = vec![0.0f32; 200];
        s[SEP as usize] = 5.0;
        s[7] = 1.0;
        s[9] = 1.0;
        assert_eq!(argmax(&s), SEP);
        mask_early_sep(&mut s, 3, 4);
        assert_eq!(argmax(&s), 7);
        let mut s2 = vec![0.0f32; 200];
        s2[SEP as usize] = 5.0;
        mask_early_sep(&mut s2, 4, 4);
        assert_eq!(argmax(&s2), SEP);
    }
}

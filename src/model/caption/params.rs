//! The options of a caption request: length limits, prompt, and the generation mode with its own
//! options (greedy, beam search, sampling), checked before any decoding.

use crate::model::error::{ModelError, Result};

/// BLIP's caption prompt. The model continues it; it is stripped from the returned text.
pub const DEFAULT_PROMPT: &str = "a picture of ";

/// Beam search options.
#[derive(Debug, Clone, PartialEq)]
pub struct BeamParams {
    /// Beams per image (BLIP: 3).
    pub num_beams: usize,
    /// A finished beam scores `sum of log-probabilities / generated_len ^ length_penalty`, where
    /// `generated_len` counts the tokens after the prompt, `[SEP]` included (HF's rule; 1.0).
    pub length_penalty: f32,
}

impl Default for BeamParams {
    fn default() -> Self {
        Self {
            num_beams: 3,
            length_penalty: 1.0,
        }
    }
}

/// Nucleus sampling options (BLIP's CapFilt captioner: top-p 0.9, repetition penalty 1.1).
#[derive(Debug, Clone, PartialEq)]
pub struct SampleParams {
    /// Keep the smallest set of most likely tokens whose probability mass reaches `top_p`.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens before top-p (ties kept); 0 disables. 50 is HF's
    /// default, so BLIP's CapFilt, which does not set it, sampled with top-k 50 as well.
    pub top_k: usize,
    /// Every token already in the sequence (prompt and `[DEC]` included) has its logit divided by
    /// this when positive and multiplied when negative (HF's `RepetitionPenaltyLogitsProcessor`).
    pub repetition_penalty: f32,
    /// Captions drawn per image.
    pub num_samples: usize,
    /// Seed. Sample `j` of an image draws from its own stream derived from `(seed, j)`, so an
    /// image's samples do not depend on the other images in the batch.
    pub seed: u64,
}

impl Default for SampleParams {
    fn default() -> Self {
        Self {
            top_p: 0.9,
            top_k: 50,
            repetition_penalty: 1.1,
            num_samples: 1,
            seed: 0,
        }
    }
}

/// How to choose the next token.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationMode {
    /// The most likely token at every step.
    Greedy,
    /// Beam search (BLIP's captions for evaluation and display).
    Beam(BeamParams),
    /// Nucleus sampling (BLIP's CapFilt: diverse synthetic captions).
    Sample(SampleParams),
}

impl Default for GenerationMode {
    fn default() -> Self {
        Self::Beam(BeamParams::default())
    }
}

/// Caption generation options. The default is BLIP's: prompt `"a picture of "`, 3 beams,
/// max 20 / min 5 tokens counting `[DEC]` and the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionParams {
    /// Text the caption continues (may be empty); stripped from the output.
    pub prompt: String,
    /// Longest decoder sequence, `[DEC]` and prompt included.
    pub max_length: usize,
    /// `[SEP]` is not allowed while the sequence is shorter than this (`[DEC]` and prompt
    /// included).
    pub min_length: usize,
    /// Greedy, beam search or sampling.
    pub mode: GenerationMode,
}

impl Default for CaptionParams {
    fn default() -> Self {
        Self {
            prompt: DEFAULT_PROMPT.to_string(),
            max_length: 20,
            min_length: 5,
            mode: GenerationMode::default(),
        }
    }
}

impl CaptionParams {
    /// BLIP's defaults with another generation mode.
    pub fn with_mode(mode: GenerationMode) -> Self {
        Self {
            mode,
            ..Self::default()
        }
    }

    /// Checks the options that do not depend on the prompt's tokens.
    pub fn validate(&self, max_positions: usize) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidInput(m));
        if self.max_length > max_positions {
            return bad(format!(
                "max_length {} exceeds the decoder's {max_positions} positions",
                self.max_length
            ));
        }
        if self.min_length > self.max_length {
            return bad(format!(
                "min_length {} is greater than max_length {}",
                self.min_length, self.max_length
            ));
        }
        match &self.mode {
            GenerationMode::Greedy => {}
            GenerationMode::Beam(b) => {
                if b.num_beams == 0 {
                    return bad("the number of beams must be at least 1".into());
                }
                if !b.length_penalty.is_finite() {
                    return bad(format!("length penalty {} is not finite", b.length_penalty));
                }
            }
            GenerationMode::Sample(s) => {
                if s.num_samples == 0 {
                    return bad("the number of samples must be at least 1".into());
                }
                if !(s.top_p > 0.0 && s.top_p <= 1.0) {
                    return bad(format!("top_p {} is not in (0, 1]", s.top_p));
                }
                if !(s.repetition_penalty > 0.0 && s.repetition_penalty.is_finite()) {
                    return bad(format!(
                        "repetition penalty {} is not a positive number",
                        s.repetition_penalty
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_params_are_errors() {
        let p = CaptionParams::default();
        assert!(p.validate(512).is_ok());
        assert!(
            p.validate(10).is_err(),
            "max_length beyond the position table"
        );
        let mut q = p.clone();
        q.min_length = 30;
        assert!(q.validate(512).is_err());
        for mode in [
            GenerationMode::Beam(BeamParams {
                num_beams: 0,
                length_penalty: 1.0,
            }),
            GenerationMode::Sample(SampleParams {
                num_samples: 0,
                ..SampleParams::default()
            }),
            GenerationMode::Sample(SampleParams {
                top_p: 0.0,
                ..SampleParams::default()
            }),
            GenerationMode::Sample(SampleParams {
                top_p: 1.5,
                ..SampleParams::default()
            }),
            GenerationMode::Sample(SampleParams {
                repetition_penalty: -1.0,
                ..SampleParams::default()
            }),
        ] {
            let e = CaptionParams::with_mode(mode.clone()).validate(512);
            assert!(matches!(e, Err(ModelError::InvalidInput(_))), "{mode:?}");
        }
    }
}

//! Caption metrics as the COCO caption evaluation computes them (`pycocoevalcap`, which the BLIP
//! paper's numbers come from): corpus BLEU-1..4 and CIDEr-D.
//!
//! - BLEU (Papineni et al. 2002), `pycocoevalcap/bleu/bleu_scorer.py` with `option="closest"`:
//!   n-gram counts clipped by the largest count in any one reference, summed over the corpus;
//!   the reference length of each sentence is the one closest to the hypothesis length (the
//!   shorter one on ties), summed; brevity penalty `exp(1 - r/c)` when `c < r`. The tiny
//!   (1e-15) and small (1e-9) constants that keep a zero precision finite are kept, so a corpus
//!   without any matching 4-gram scores a tiny positive value, as in pycocoevalcap (NLTK's
//!   `corpus_bleu` without smoothing returns 0 there and agrees otherwise).
//! - CIDEr-D (Vedantam et al. 2015), `pycocoevalcap/cider/cider_scorer.py` (named "CIDEr" there):
//!   n-grams 1..4 weighted by TF-IDF with document frequencies over the reference sets of the
//!   evaluated corpus (`log(max(1, df))`, `log(number of images)`); per n the cosine with each
//!   reference, where the hypothesis weight is clipped by the reference weight
//!   (`min(h, r) * r`), times a Gaussian penalty `exp(-d^2 / (2 sigma^2))` with sigma 6 on the
//!   length difference `d`; averaged over n and references, times 10, averaged over images.
//!   As in the reference code, "length" counts bigrams (a sentence of `w >= 1` words has
//!   `w - 1`), which only differs from counting words when a sentence has no words.
//!
//! Both take sentences already tokenised into space-separated lowercase words; [`coco_tokenize`]
//! approximates the Stanford PTB tokenizer the COCO toolkit runs first.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::error::{EvalError, Result};

/// Largest n-gram order of both metrics.
pub const MAX_N: usize = 4;

/// Gaussian length-penalty width of CIDEr-D.
pub const CIDER_SIGMA: f64 = 6.0;

/// Punctuation tokens the COCO toolkit drops after PTB tokenisation.
const PTB_PUNCTUATION: [&str; 17] = [
    "''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--",
    "...", ";",
];

/// Lowercases and splits a caption into words the way the COCO caption toolkit's PTB tokenizer
/// does for ordinary English captions: punctuation split off and dropped, brackets and quotes
/// dropped, clitics split ("dog's" -> "dog 's", "don't" -> "do n't"). An approximation of the
/// Java tokenizer, exact for plain captions.
pub fn coco_tokenize(text: &str) -> String {
    let lower = text.to_lowercase();
    let mut spaced = String::with_capacity(lower.len() + 8);
    for c in lower.chars() {
        match c {
            '.' | ',' | '?' | '!' | ':' | ';' | '"' | '(' | ')' | '[' | ']' | '{' | '}' | '`' => {
                spaced.push(' ')
            }
            c if c.is_whitespace() => spaced.push(' '),
            c => spaced.push(c),
        }
    }
    let mut words = Vec::new();
    for w in spaced.split(' ').filter(|w| !w.is_empty()) {
        // "-" between words stays (PTB keeps "t-shirt"); alone it is punctuation.
        if let Some(stem) = w.strip_suffix("n't").filter(|s| !s.is_empty()) {
            words.push(stem.to_string());
            words.push("n't".to_string());
        } else if let Some(i) = w.find('\'').filter(|&i| i > 0 && i + 1 < w.len()) {
            words.push(w[..i].to_string());
            words.push(w[i..].to_string());
        } else {
            words.push(w.to_string());
        }
    }
    words.retain(|w| !PTB_PUNCTUATION.contains(&w.as_str()));
    words.join(" ")
}

type Ngram<'a> = Vec<&'a str>;

/// Counts of every n-gram of orders 1..=MAX_N, and the number of words.
fn ngram_counts(sentence: &str) -> (usize, HashMap<Ngram<'_>, usize>) {
    let words: Vec<&str> = sentence.split_whitespace().collect();
    let mut counts = HashMap::new();
    for n in 1..=MAX_N {
        for g in words.windows(n) {
            *counts.entry(g.to_vec()).or_insert(0) += 1;
        }
    }
    (words.len(), counts)
}

fn check_corpus(hypotheses: &[String], references: &[Vec<String>]) -> Result<()> {
    if hypotheses.len() != references.len() {
        return Err(EvalError::InvalidInput(format!(
            "{} hypotheses for {} reference sets",
            hypotheses.len(),
            references.len()
        )));
    }
    if hypotheses.is_empty() {
        return Err(EvalError::InvalidInput("no captions to score".into()));
    }
    if let Some(i) = references.iter().position(Vec::is_empty) {
        return Err(EvalError::InvalidInput(format!(
            "item {i} has no reference captions"
        )));
    }
    Ok(())
}

/// Corpus BLEU.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BleuScore {
    /// BLEU-1 to BLEU-4 (index n-1), brevity penalty included, in 0..=1.
    pub bleu: [f64; MAX_N],
    /// Hypothesis words over closest-reference words in the corpus.
    pub length_ratio: f64,
}

/// Corpus-level BLEU-1..4 of `hypotheses[i]` against `references[i]` (tokenised sentences), as
/// pycocoevalcap's `Bleu(4)` computes it.
pub fn corpus_bleu(hypotheses: &[String], references: &[Vec<String>]) -> Result<BleuScore> {
    check_corpus(hypotheses, references)?;
    const TINY: f64 = 1e-15;
    const SMALL: f64 = 1e-9;
    let mut correct = [0usize; MAX_N];
    let mut guess = [0usize; MAX_N];
    let mut hyp_len = 0usize;
    let mut ref_len = 0usize;
    for (hyp, refs) in hypotheses.iter().zip(references) {
        let mut max_ref: HashMap<Ngram<'_>, usize> = HashMap::new();
        let mut ref_lens = Vec::with_capacity(refs.len());
        for r in refs {
            let (len, counts) = ngram_counts(r);
            ref_lens.push(len);
            for (g, c) in counts {
                let m = max_ref.entry(g).or_insert(0);
                *m = (*m).max(c);
            }
        }
        let (len, counts) = ngram_counts(hyp);
        hyp_len += len;
        // Closest reference length, the shorter on ties (Python's min over (|diff|, len)).
        ref_len += ref_lens
            .iter()
            .map(|&l| (l.abs_diff(len), l))
            .min()
            .map(|(_, l)| l)
            .unwrap_or(0);
        for (n, g) in guess.iter_mut().enumerate() {
            *g += (len + 1).saturating_sub(n + 1);
        }
        for (g, c) in &counts {
            correct[g.len() - 1] += (*c).min(max_ref.get(g).copied().unwrap_or(0));
        }
    }
    let ratio = (hyp_len as f64 + TINY) / (ref_len as f64 + SMALL);
    let penalty = if ratio < 1.0 {
        (1.0 - 1.0 / ratio).exp()
    } else {
        1.0
    };
    let mut bleu = [0.0; MAX_N];
    let mut product = 1.0;
    for k in 0..MAX_N {
        product *= (correct[k] as f64 + TINY) / (guess[k] as f64 + SMALL);
        bleu[k] = product.powf(1.0 / (k + 1) as f64) * penalty;
    }
    Ok(BleuScore {
        bleu,
        length_ratio: ratio,
    })
}

/// CIDEr-D of a corpus.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CiderScore {
    /// The corpus score (mean of `per_item`), on the 0..10 scale papers multiply by 100.
    pub cider: f64,
    /// Each hypothesis' score.
    pub per_item: Vec<f64>,
}

/// TF-IDF vectors per n-gram order, their norms, and the sentence's bigram count.
struct TfIdf<'a> {
    vec: [HashMap<Ngram<'a>, f64>; MAX_N],
    norm: [f64; MAX_N],
    length: f64,
}

fn tfidf<'a>(sentence: &'a str, df: &HashMap<Ngram<'a>, f64>, log_images: f64) -> TfIdf<'a> {
    let (_, counts) = ngram_counts(sentence);
    let mut vec: [HashMap<Ngram<'a>, f64>; MAX_N] = Default::default();
    let mut norm = [0.0; MAX_N];
    let mut length = 0.0;
    for (g, tf) in counts {
        let n = g.len() - 1;
        let d = df.get(&g).copied().unwrap_or(0.0).max(1.0).ln();
        let w = tf as f64 * (log_images - d);
        norm[n] += w * w;
        if n == 1 {
            length += tf as f64;
        }
        vec[n].insert(g, w);
    }
    TfIdf {
        vec,
        norm: norm.map(f64::sqrt),
        length,
    }
}

/// CIDEr-D of `hypotheses[i]` against `references[i]` (tokenised sentences), as pycocoevalcap's
/// `Cider()` computes it: document frequencies from these reference sets, sigma 6, times 10.
pub fn cider_d(hypotheses: &[String], references: &[Vec<String>]) -> Result<CiderScore> {
    check_corpus(hypotheses, references)?;
    let mut df: HashMap<Ngram<'_>, f64> = HashMap::new();
    for refs in references {
        let mut seen = HashSet::new();
        for r in refs {
            seen.extend(ngram_counts(r).1.into_keys());
        }
        for g in seen {
            *df.entry(g).or_insert(0.0) += 1.0;
        }
    }
    let log_images = (references.len() as f64).ln();
    let mut per_item = Vec::with_capacity(hypotheses.len());
    for (hyp, refs) in hypotheses.iter().zip(references) {
        let h = tfidf(hyp, &df, log_images);
        let mut sum = [0.0; MAX_N];
        for r in refs {
            let r = tfidf(r, &df, log_images);
            let delta = h.length - r.length;
            let penalty = (-(delta * delta) / (2.0 * CIDER_SIGMA * CIDER_SIGMA)).exp();
            for (n, acc) in sum.iter_mut().enumerate() {
                let mut val: f64 = h.vec[n]
                    .iter()
                    .map(|(g, &wh)| {
                        let wr = r.vec[n].get(g).copied().unwrap_or(0.0);
                        wh.min(wr) * wr
                    })
                    .sum();
                if h.norm[n] != 0.0 && r.norm[n] != 0.0 {
                    val /= h.norm[n] * r.norm[n];
                }
                *acc += val * penalty;
            }
        }
        let mean = sum.iter().sum::<f64>() / MAX_N as f64;
        per_item.push(mean / refs.len() as f64 * 10.0);
    }
    let cider = per_item.iter().sum::<f64>() / per_item.len() as f64;
    Ok(CiderScore { cider, per_item })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// A small corpus with shorter and longer hypotheses, repeated n-grams (clipping), a
    /// hypothesis without any reference word, and reference sets of different sizes.
    fn corpus() -> (Vec<String>, Vec<Vec<String>>) {
        let hyps = s(&[
            "a man riding a horse on a beach",
            "two dogs playing in the snow",
            "a plate of food",
            "the the the the cat",
            "an orange bus parked next to a building",
            "zebra",
        ]);
        let refs = vec![
            s(&[
                "a man rides a horse on the beach",
                "a person riding a brown horse along the sea shore",
                "man on horseback at the beach",
            ]),
            s(&[
                "two dogs play in the snow",
                "a pair of dogs running through snow",
            ]),
            s(&[
                "a white plate topped with rice and vegetables",
                "a plate of food on a wooden table",
                "food on a plate",
                "a meal served on a plate",
            ]),
            s(&["the cat sat on the mat", "a cat on a mat"]),
            s(&[
                "a red bus parked beside a tall building",
                "a bus stopped in front of a building",
            ]),
            s(&[
                "a giraffe standing in a field",
                "a tall giraffe eating leaves",
            ]),
        ];
        (hyps, refs)
    }

    // Expected values: pycocoevalcap 1.2 `Bleu(4).compute_score(gts, res)` and
    // `Cider().compute_score(gts, res)` with gts = {i: refs[i]}, res = {i: [hyps[i]]}, run once
    // by hand. NLTK 3.10.4 `corpus_bleu` gives 0.21767 here: it counts max(1, n-grams) for the
    // one-word "zebra"; without that item both give 0.2577889010.
    #[test]
    fn bleu_matches_pycocoevalcap() {
        let (h, r) = corpus();
        let b = corpus_bleu(&h, &r).unwrap();
        let want = EXPECTED_BLEU;
        for (k, (got, want)) in b.bleu.iter().zip(want).enumerate() {
            assert!(
                (got - want).abs() < 1e-12,
                "BLEU-{}: {got} vs {want}",
                k + 1
            );
        }
        assert!((b.length_ratio - EXPECTED_RATIO).abs() < 1e-9);
    }

    #[test]
    fn cider_matches_pycocoevalcap() {
        let (h, r) = corpus();
        let c = cider_d(&h, &r).unwrap();
        assert!(
            (c.cider - EXPECTED_CIDER).abs() < 1e-12,
            "{} vs {EXPECTED_CIDER}",
            c.cider
        );
        for (got, want) in c.per_item.iter().zip(EXPECTED_CIDER_ITEMS) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
    }

    #[test]
    fn brevity_penalty_and_no_match_follow_the_reference() {
        // One short hypothesis: BP < 1; no 4-gram match at all.
        let h = s(&["a dog"]);
        let r = vec![s(&["a dog runs on the grass", "a brown dog"])];
        let b = corpus_bleu(&h, &r).unwrap();
        for (got, want) in b.bleu.iter().zip(EXPECTED_SHORT_BLEU) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        } // One image: log(1) = 0 weights every n-gram 0, so CIDEr is 0 (as in pycocoevalcap).
        assert_eq!(cider_d(&h, &r).unwrap().cider, 0.0);
    }

    #[test]
    fn perfect_captions_score_high() {
        let (_, r) = corpus();
        let h: Vec<String> = r.iter().map(|refs| refs[0].clone()).collect();
        let b = corpus_bleu(&h, &r).unwrap();
        assert!((b.bleu[3] - 1.0).abs() < 1e-9);
        let c = cider_d(&h, &r).unwrap();
        let (wrong, _) = corpus();
        assert!(c.cider > cider_d(&wrong, &r).unwrap().cider);
    }

    #[test]
    fn bad_corpora_are_refused() {
        assert!(corpus_bleu(&[], &[]).is_err());
        assert!(cider_d(&s(&["a"]), &[]).is_err());
        assert!(cider_d(&s(&["a"]), &[vec![]]).is_err());
    }

    #[test]
    fn tokenizer_drops_punctuation_and_splits_clitics() {
        assert_eq!(
            coco_tokenize("A dog's ball, on the (green) grass. Isn't it?"),
            "a dog 's ball on the green grass is n't it"
        );
        assert_eq!(coco_tokenize("  T-shirt -  red  "), "t-shirt red");
    }

    const EXPECTED_BLEU: [f64; 4] = [
        0.6342946486930348,
        0.5290383080451573,
        0.36100180713474017,
        0.22569936319150385,
    ];
    const EXPECTED_RATIO: f64 = 32.0 / 36.0;
    const EXPECTED_CIDER: f64 = 1.6120052987322884;
    const EXPECTED_CIDER_ITEMS: [f64; 6] = [
        1.9471016499779235,
        2.5457416793156322,
        2.5449140620729804,
        1.2015830490575787,
        1.432691351969614,
        0.0,
    ];
    const EXPECTED_SHORT_BLEU: [f64; 4] = [
        0.6065306591061034,
        0.6065306589544709,
        0.0060653065910610355,
        0.0006065306591819196,
    ];
}

//! Retrieval and caption evaluation as BLIP reports them (`train_retrieval.py` `evaluation` and
//! `itm_eval`, `train_caption.py` + the COCO caption toolkit).
//!
//! Retrieval: every image and text is embedded once (ITC); image->text (TR) ranks all texts for
//! each image, text->image (IR) all images for each text, by ITC cosine. With reranking, the top
//! `k` candidates by ITC are scored again with `itm_logit[match] + itc_cosine` (BLIP's
//! `score_matrix_i2t[i, topk] = itm_score + topk_sim`, with `[ENC]` as ITM's first token) and
//! placed before the rest, which keep their ITC order. An image counts as found at rank r when
//! its best-ranked caption is at r (TR); a text when its image is (IR). Recall@K in percent.
//!
//! Captions: BLIP's beam search (3 beams, max 20, min 5 tokens, prompt "a picture of "), scored
//! with corpus BLEU-4 and CIDEr-D against the item's captions after the COCO toolkit's
//! tokenisation ([`super::metrics`]); both reported x100 as in the paper's tables.

use std::path::PathBuf;

use candle_core::Tensor;
use image::DynamicImage;
use serde::Serialize;

use super::dataset::Dataset;
use super::error::{check_batch_size, EvalError, Result};
use super::metrics::{cider_d, coco_tokenize, corpus_bleu};
use crate::index::dot;
use crate::model::preprocess::{load_image, DecodeLimits};
use crate::model::retrieval::rows;
use crate::model::{
    CaptionParams, Captioner, GenerationMode, ItmFirstToken, ItmScore, ModelError, Retriever,
};
use crate::progress::{Event, Progress};

/// Options of an evaluation run.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Folder the dataset's relative image paths are under.
    pub images_root: PathBuf,
    /// ITM rerank depth (BLIP: 256 for COCO, 128 for Flickr30k); 0 skips the rerank.
    pub k: usize,
    /// Images per ViT forward pass.
    pub batch_size: usize,
    /// Texts per text-encoder forward pass.
    pub text_batch_size: usize,
    /// Image decoding limits.
    pub limits: DecodeLimits,
    /// ITM's first token (BLIP: `[ENC]`).
    pub itm_first_token: ItmFirstToken,
    /// Caption generation (BLIP: beam 3, max 20, min 5).
    pub caption: CaptionParams,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            images_root: PathBuf::from("."),
            k: 128,
            batch_size: 16,
            text_batch_size: 256,
            limits: DecodeLimits::default(),
            itm_first_token: ItmFirstToken::Enc,
            caption: CaptionParams::default(),
        }
    }
}

/// Recall@1/5/10 of one direction, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Recall {
    /// Recall@1.
    pub r1: f64,
    /// Recall@5.
    pub r5: f64,
    /// Recall@10.
    pub r10: f64,
    /// Mean of the three.
    pub mean: f64,
}

impl Recall {
    /// Recall from 0-based ranks of the first correct result.
    pub fn from_ranks(ranks: &[usize]) -> Recall {
        let at = |k: usize| {
            if ranks.is_empty() {
                0.0
            } else {
                100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len() as f64
            }
        };
        let (r1, r5, r10) = (at(1), at(5), at(10));
        Recall {
            r1,
            r5,
            r10,
            mean: (r1 + r5 + r10) / 3.0,
        }
    }
}

/// Both directions of one scoring.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RetrievalScores {
    /// Image->text: for each image, the rank of its best caption.
    pub text_retrieval: Recall,
    /// Text->image: for each text, the rank of its image.
    pub image_retrieval: Recall,
    /// Mean of the two means (BLIP's `r_mean`).
    pub r_mean: f64,
}

impl RetrievalScores {
    fn new(tr: &[usize], ir: &[usize]) -> Self {
        let text_retrieval = Recall::from_ranks(tr);
        let image_retrieval = Recall::from_ranks(ir);
        RetrievalScores {
            text_retrieval,
            image_retrieval,
            r_mean: (text_retrieval.mean + image_retrieval.mean) / 2.0,
        }
    }
}

/// Retrieval evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct RetrievalReport {
    /// Images.
    pub images: usize,
    /// Texts.
    pub texts: usize,
    /// Rerank depth used (clipped to the number of candidates).
    pub k: usize,
    /// Ranking by ITC cosine alone.
    pub itc: RetrievalScores,
    /// ITC top-k reranked by ITM logit + ITC cosine (absent when k = 0).
    pub itm_rerank: Option<RetrievalScores>,
    /// 0-based rank of each image's best caption after reranking (ITC when k = 0), item order.
    #[serde(skip)]
    pub text_ranks: Vec<usize>,
    /// 0-based rank of each text's image after reranking (ITC when k = 0), in dataset order.
    #[serde(skip)]
    pub image_ranks: Vec<usize>,
}

/// Caption evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct CaptionReport {
    /// Images captioned.
    pub images: usize,
    /// Corpus BLEU-4 x 100.
    pub bleu4: f64,
    /// Corpus BLEU-1..4 x 100.
    pub bleu: [f64; 4],
    /// CIDEr-D x 100.
    pub cider: f64,
    /// The generated caption of each item, in dataset order.
    pub captions: Vec<String>,
}

/// One phase of progress: `Started` now, `Finished` when dropped.
struct Phase<'a>(&'a dyn Progress);

impl<'a> Phase<'a> {
    fn start(progress: &'a dyn Progress, what: &str, total: usize) -> Self {
        progress.event(Event::Started {
            what,
            total: total as u64,
            done: 0,
        });
        Phase(progress)
    }

    fn inc(&self, n: u64) {
        self.0.event(Event::Done { n });
    }
}

impl Drop for Phase<'_> {
    fn drop(&mut self) {
        self.0.event(Event::Finished);
    }
}

/// Decodes the images of items `range`, naming the file that fails.
fn load_batch(
    data: &Dataset,
    opts: &EvalOptions,
    range: std::ops::Range<usize>,
) -> Result<Vec<DynamicImage>> {
    data.items[range]
        .iter()
        .map(|item| {
            let path = data.resolve(&opts.images_root, item);
            load_image(&path, opts.limits).map_err(EvalError::from)
        })
        .collect()
}

/// Indices of `scores` sorted by descending score (ties: lower index first).
fn order_desc(scores: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx
}

/// Order after reranking the first `k` of `itc_order` by `rerank` (same length as k).
fn reranked(itc_order: &[usize], rerank: &[f32]) -> Vec<usize> {
    let k = rerank.len();
    let mut out: Vec<usize> = order_desc(rerank)
        .into_iter()
        .map(|j| itc_order[j])
        .collect();
    out.extend_from_slice(&itc_order[k..]);
    out
}

/// [`reranked`] by ITM: the first `itm.len()` candidates of `itc_order` scored by their ITM match
/// logit plus their ITC similarity (`sim` of the candidate).
fn reranked_by_itm(
    itc_order: &[usize],
    itm: &[ItmScore],
    sim: impl Fn(usize) -> f32,
) -> Vec<usize> {
    let score: Vec<f32> = itc_order
        .iter()
        .zip(itm)
        .map(|(&c, s)| s.logits[1] + sim(c))
        .collect();
    reranked(itc_order, &score)
}

/// Evaluates image<->text retrieval over every image and caption of `data`.
pub fn evaluate_retrieval(
    model: &Retriever,
    data: &Dataset,
    opts: &EvalOptions,
    progress: &dyn Progress,
) -> Result<RetrievalReport> {
    if opts.batch_size == 0 || opts.text_batch_size == 0 {
        return Err(EvalError::InvalidInput(
            "batch sizes must be at least 1".into(),
        ));
    }
    let n_img = data.items.len();
    // Texts and their images.
    let mut texts: Vec<&str> = Vec::new();
    let mut txt2img: Vec<usize> = Vec::new();
    let mut img2txt: Vec<Vec<usize>> = Vec::with_capacity(n_img);
    for (i, item) in data.items.iter().enumerate() {
        let mut mine = Vec::new();
        for t in &item.texts {
            mine.push(texts.len());
            texts.push(&t.text);
            txt2img.push(i);
        }
        img2txt.push(mine);
    }
    let n_txt = texts.len();

    // Embed texts, then images (keeping each image's ViT tokens for ITM).
    let pb = Phase::start(progress, "texts", n_txt);
    let mut txt_itc: Vec<Vec<f32>> = Vec::with_capacity(n_txt);
    for chunk in texts.chunks(opts.text_batch_size) {
        txt_itc.extend(rows(&model.embed_texts(chunk)?.itc)?);
        pb.inc(chunk.len() as u64);
    }
    drop(pb);
    let pb = Phase::start(progress, "images", n_img);
    let mut img_itc: Vec<Vec<f32>> = Vec::with_capacity(n_img);
    let mut img_tokens: Vec<Tensor> = Vec::with_capacity(n_img);
    for start in (0..n_img).step_by(opts.batch_size) {
        let end = (start + opts.batch_size).min(n_img);
        let images = load_batch(data, opts, start..end)?;
        let emb = model.embed_images(&images)?;
        img_itc.extend(rows(&emb.itc)?);
        for j in 0..images.len() {
            img_tokens.push(emb.tokens.narrow(0, j, 1).map_err(ModelError::from)?);
        }
        pb.inc((end - start) as u64);
    }
    drop(pb);

    // ITC similarity matrix (images x texts).
    let sims: Vec<Vec<f32>> = img_itc
        .iter()
        .map(|v| txt_itc.iter().map(|t| dot(v, t)).collect())
        .collect();

    let tr_rank = |i: usize, order: &[usize]| {
        order
            .iter()
            .position(|t| img2txt[i].contains(t))
            .unwrap_or(order.len())
    };
    let ir_rank = |t: usize, order: &[usize]| {
        order
            .iter()
            .position(|&i| i == txt2img[t])
            .unwrap_or(order.len())
    };

    let i2t_itc: Vec<Vec<usize>> = sims.iter().map(|row| order_desc(row)).collect();
    let t2i_itc: Vec<Vec<usize>> = (0..n_txt)
        .map(|t| order_desc(&sims.iter().map(|row| row[t]).collect::<Vec<_>>()))
        .collect();
    let tr_itc: Vec<usize> = (0..n_img).map(|i| tr_rank(i, &i2t_itc[i])).collect();
    let ir_itc: Vec<usize> = (0..n_txt).map(|t| ir_rank(t, &t2i_itc[t])).collect();
    let itc = RetrievalScores::new(&tr_itc, &ir_itc);

    let mut report = RetrievalReport {
        images: n_img,
        texts: n_txt,
        k: 0,
        itc,
        itm_rerank: None,
        text_ranks: tr_itc,
        image_ranks: ir_itc,
    };
    if opts.k == 0 {
        return Ok(report);
    }

    // Image -> text: the top k texts of each image against that image.
    let k_txt = opts.k.min(n_txt);
    let k_img = opts.k.min(n_img);
    let pb = Phase::start(progress, "ITM reranks", n_img + n_txt);
    let mut tr = Vec::with_capacity(n_img);
    for i in 0..n_img {
        let top = &i2t_itc[i][..k_txt];
        let cand: Vec<&str> = top.iter().map(|&t| texts[t]).collect();
        let itm = model.itm(&cand, &img_tokens[i], &vec![0; k_txt], opts.itm_first_token)?;
        tr.push(tr_rank(
            i,
            &reranked_by_itm(&i2t_itc[i], &itm, |t| sims[i][t]),
        ));
        pb.inc(1);
    }
    // Text -> image: each text against its top k images.
    let mut ir = Vec::with_capacity(n_txt);
    for t in 0..n_txt {
        let top = &t2i_itc[t][..k_img];
        let tokens = Tensor::cat(&top.iter().map(|&i| &img_tokens[i]).collect::<Vec<_>>(), 0)
            .map_err(ModelError::from)?;
        let cand = vec![texts[t]; k_img];
        let index: Vec<usize> = (0..k_img).collect();
        let itm = model.itm(&cand, &tokens, &index, opts.itm_first_token)?;
        ir.push(ir_rank(
            t,
            &reranked_by_itm(&t2i_itc[t], &itm, |i| sims[i][t]),
        ));
        pb.inc(1);
    }
    drop(pb);
    report.k = opts.k.min(n_txt.max(n_img));
    report.itm_rerank = Some(RetrievalScores::new(&tr, &ir));
    report.text_ranks = tr;
    report.image_ranks = ir;
    Ok(report)
}

/// Captions every image of `data` and scores the captions against the item's texts.
pub fn evaluate_captions(
    model: &Captioner,
    data: &Dataset,
    opts: &EvalOptions,
    progress: &dyn Progress,
) -> Result<CaptionReport> {
    check_batch_size(opts.batch_size)?;
    if matches!(opts.caption.mode, GenerationMode::Sample(_)) {
        return Err(EvalError::InvalidInput(
            "caption evaluation needs one deterministic caption per image (beam or greedy)".into(),
        ));
    }
    let n = data.items.len();
    let pb = Phase::start(progress, "captions", n);
    let mut captions = Vec::with_capacity(n);
    for start in (0..n).step_by(opts.batch_size) {
        let end = (start + opts.batch_size).min(n);
        let images = load_batch(data, opts, start..end)?;
        for caps in model.caption_images(&images, &opts.caption)? {
            captions.push(caps.into_iter().next().map(|c| c.text).unwrap_or_default());
        }
        pb.inc((end - start) as u64);
    }
    drop(pb);
    let hyps: Vec<String> = captions.iter().map(|c| coco_tokenize(c)).collect();
    let refs: Vec<Vec<String>> = data
        .items
        .iter()
        .map(|item| item.texts.iter().map(|t| coco_tokenize(&t.text)).collect())
        .collect();
    let bleu = corpus_bleu(&hyps, &refs)?;
    let cider = cider_d(&hyps, &refs)?;
    Ok(CaptionReport {
        images: n,
        bleu4: bleu.bleu[3] * 100.0,
        bleu: bleu.bleu.map(|b| b * 100.0),
        cider: cider.cider * 100.0,
        captions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_counts_ranks_below_k() {
        let r = Recall::from_ranks(&[0, 0, 3, 7, 20]);
        assert_eq!(r.r1, 40.0);
        assert_eq!(r.r5, 60.0);
        assert_eq!(r.r10, 80.0);
        assert!((r.mean - 60.0).abs() < 1e-12);
    }

    #[test]
    fn rerank_reorders_only_the_top_k() {
        let itc = vec![4, 2, 0, 1, 3];
        // Top 3 by ITC are 4, 2, 0; the rerank prefers 0, then 4, then 2.
        assert_eq!(reranked(&itc, &[1.0, 0.5, 2.0]), vec![0, 4, 2, 1, 3]);
        assert_eq!(order_desc(&[0.1, 0.3, 0.3, -1.0]), vec![1, 2, 0, 3]);
    }
}

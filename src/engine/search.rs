//! Search: a text query (or an image) becomes an ITC vector for approximate nearest-neighbour
//! search, in parallel BM25 runs over captions, given texts and file names; the two lists are
//! fused, and the best `rerank_k` candidates are reranked with ITM cross-attention against their
//! stored ViT features. Final score of a reranked hit is BLIP's `itm_logit + itc_cosine`.
//!
//! With a cut-off (`min_itm_prob`) the answer is what ITM accepts, so ITM reranks as deep as
//! the matches go rather than a fixed `rerank_k`: rounds of `rerank_k` candidates down the fused
//! list, continuing while the last round still had a match, within a budget of candidates
//! judged. The rule and what the answer then promises are on [`CutoffStop`].

use std::collections::HashMap;
use std::sync::{RwLock, RwLockReadGuard};

use candle_core::Tensor;
use image::DynamicImage;
use serde::Serialize;

use super::error::{EngineError, Result};
use super::facets::{
    count_facets, FacetCounts, FacetRequest, GroupBy, HitGroup, MAX_FACETS, MAX_FACET_RANGES,
};
use super::models::Encoders;
use crate::index::{dot, BlobStore, Caption, Filter, ImageId, IndexError, Product, Store};

/// Largest number of candidates taken from each retriever.
pub const MAX_K: usize = 1000;
/// Largest number of candidates reranked with ITM.
pub const MAX_RERANK_K: usize = 256;
/// Candidates of a text query reranked with ITM when the caller does not say.
pub const DEFAULT_RERANK_K: usize = 16;
/// Most candidates ITM judges in one search with a cut-off (`min_itm_prob`) when the caller
/// does not say: 16 rounds of the default `rerank_k`.
pub const DEFAULT_RERANK_BUDGET: usize = 256;
/// Most candidates ITM may judge in one search with a cut-off: as many as one retriever can
/// give ([`MAX_K`]).
pub const MAX_RERANK_BUDGET: usize = MAX_K;
/// When grouping, each retriever is asked for this many times `k` images (within [`MAX_K`]):
/// `k` counts images, and a product often shows several among the results.
pub const GROUP_FETCH: usize = 4;

/// Which retrievers produce candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// ITC vectors and BM25, fused.
    #[default]
    Hybrid,
    /// ITC vectors only.
    Vector,
    /// BM25 over captions, given texts and file names only (reranked with ITM like the others).
    Text,
}

impl std::str::FromStr for SearchMode {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "hybrid" => Ok(Self::Hybrid),
            "vector" => Ok(Self::Vector),
            "text" => Ok(Self::Text),
            other => Err(EngineError::InvalidInput(format!(
                "unknown mode {other:?}: use hybrid, vector or text"
            ))),
        }
    }
}

/// How the vector and text lists are combined.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Fusion {
    /// Reciprocal rank fusion: `sum 1 / (k + rank)`, ranks from 1.
    Rrf {
        /// The damping constant (60 in the RRF paper).
        k: f32,
    },
    /// `w_vector * cosine + w_text * bm25 / max_bm25`.
    Weighted {
        /// Weight of the ITC cosine.
        vector: f32,
        /// Weight of the max-normalised BM25 score.
        text: f32,
    },
}

impl Default for Fusion {
    fn default() -> Self {
        Self::Rrf { k: 60.0 }
    }
}

/// Options of one search. Start from the default (hybrid, `k` 100, 16 reranked for a text
/// query, 20 results) and set what differs:
///
/// ```
/// use blipsearch::engine::search::{SearchMode, SearchParams};
/// use blipsearch::engine::Filter;
///
/// let params = SearchParams {
///     mode: SearchMode::Vector,
///     rerank_k: Some(32),
///     min_itm_prob: Some(0.5), // drop what ITM says does not match
///     filter: Filter {
///         path_prefix: Some("/home/me/Pictures/2023/".into()),
///         min_width: Some(800),
///         ..Filter::default()
///     },
///     ..SearchParams::default()
/// };
/// assert!(params.check(true).is_ok()); // valid for a query by text...
/// assert!(params.check(false).is_err()); // ...not by image: ITM needs a text
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct SearchParams {
    /// Candidates taken from each retriever (clamped to [`MAX_K`]). When grouping, each
    /// retriever is asked for [`GROUP_FETCH`] times as many (still within [`MAX_K`]), so that
    /// about `k` groups form even when products show several images among the candidates; the
    /// groups are then at most the candidates' number, and `total` says how many formed.
    /// With `min_itm_prob`, each retriever is asked for at least `rerank_budget`.
    pub k: usize,
    /// Candidates reranked with ITM (0: off; clamped to [`MAX_RERANK_K`]). `None`:
    /// [`DEFAULT_RERANK_K`] for a text query, 0 for a search by image, which refuses any other
    /// value (ITM scores a text against an image, and it has no text). Reranking applies in
    /// every mode, text included.
    pub rerank_k: Option<usize>,
    /// Which retrievers run.
    pub mode: SearchMode,
    /// How their lists are combined.
    pub fusion: Fusion,
    /// HNSW search breadth (`None`: the index default).
    pub ef: Option<usize>,
    /// Results returned.
    pub limit: usize,
    /// Results skipped (paging).
    pub offset: usize,
    /// Keep only results that ITM judged and accepted, with p(match) at least this (0 to 1), so
    /// that a query about something absent can return nothing. ITM then judges the fused
    /// candidates in rounds of `rerank_k`, as deep as the matches go, up to `rerank_budget`
    /// candidates (the rule: [`CutoffStop`]); what it did not judge is dropped. Needs
    /// reranking: refused with `rerank_k` 0 and by a search by image.
    pub min_itm_prob: Option<f32>,
    /// With `min_itm_prob`: most candidates ITM judges (at least 1; `None`:
    /// [`DEFAULT_RERANK_BUDGET`]; clamped to [`MAX_RERANK_BUDGET`]). Each retriever is asked
    /// for at least this many candidates, so that the budget can be spent. Refused without
    /// `min_itm_prob`.
    pub rerank_budget: Option<usize>,
    /// Search by an indexed image: keep that image in the results (it is left out by default,
    /// as "more like this" asks for others).
    pub include_self: bool,
    /// Which images may be returned.
    pub filter: Filter,
    /// Facets to count over the relevant set.
    pub facets: Vec<FacetRequest>,
    /// One hit per group (paging and `total` then count groups): a product's best-ranked image
    /// (after rerank), with the product's other images among the results and its size.
    pub group_by: Option<GroupBy>,
}

impl SearchParams {
    /// Refuses what cannot mean anything for a query by text (`by_text`) or by image: a bad
    /// filter, more facets or ranges than [`MAX_FACETS`] and [`MAX_FACET_RANGES`], `k` or
    /// `limit` of 0, `min_itm_prob` outside 0 to 1 or without reranking, `rerank_budget` of 0
    /// or without `min_itm_prob`, reranking an image query, `include_self` on a text query.
    pub fn check(&self, by_text: bool) -> Result<()> {
        self.filter.check()?;
        if self.facets.len() > MAX_FACETS
            || self
                .facets
                .iter()
                .any(|f| f.ranges.len() > MAX_FACET_RANGES)
        {
            return Err(EngineError::InvalidInput(format!(
                "at most {MAX_FACETS} facets, of at most {MAX_FACET_RANGES} ranges each"
            )));
        }
        if self.k == 0 || self.limit == 0 {
            return Err(EngineError::InvalidInput(
                "k and limit must be at least 1".into(),
            ));
        }
        if let Some(p) = self.min_itm_prob {
            if !(0.0..=1.0).contains(&p) {
                return Err(EngineError::InvalidInput(format!(
                    "min_itm_prob must be between 0 and 1, not {p}"
                )));
            }
        }
        match self.rerank_budget {
            Some(_) if self.min_itm_prob.is_none() => {
                return Err(EngineError::InvalidInput(
                    "rerank_budget bounds how deep the ITM cut-off looks, so it needs min_itm_prob"
                        .into(),
                ))
            }
            Some(0) => {
                return Err(EngineError::InvalidInput(
                    "rerank_budget must be at least 1".into(),
                ))
            }
            _ => {}
        }
        if by_text {
            if self.rerank_k == Some(0) && self.min_itm_prob.is_some() {
                return Err(EngineError::InvalidInput(
                    "min_itm_prob keeps what ITM accepts, so it needs rerank_k of at least 1"
                        .into(),
                ));
            }
            if self.include_self {
                return Err(EngineError::InvalidInput(
                    "include_self applies to a search by an indexed image".into(),
                ));
            }
        } else if self.rerank_k.is_some_and(|k| k > 0) || self.min_itm_prob.is_some() {
            return Err(EngineError::InvalidInput(
                "a search by image cannot rerank (rerank_k, min_itm_prob): ITM scores a text \
                 against an image, and there is no text"
                    .into(),
            ));
        }
        Ok(())
    }
}

impl Default for SearchParams {
    fn default() -> Self {
        Self {
            k: 100,
            rerank_k: None,
            mode: SearchMode::Hybrid,
            fusion: Fusion::default(),
            ef: None,
            limit: 20,
            offset: 0,
            min_itm_prob: None,
            rerank_budget: None,
            include_self: false,
            filter: Filter::default(),
            facets: Vec::new(),
            group_by: None,
        }
    }
}

/// One result, with every score that put it there.
#[derive(Debug, Clone, Serialize)]
pub struct SearchHit {
    /// Image id.
    pub id: u64,
    /// Image path.
    pub path: String,
    /// The score results are ordered by: `itm_logit + itc` when reranked, else the fused score.
    pub score: f32,
    /// ITC cosine between query and image.
    pub itc: Option<f32>,
    /// BM25 score of the text match.
    pub bm25: Option<f32>,
    /// Rank (from 1) in the vector list.
    pub vector_rank: Option<usize>,
    /// Rank (from 1) in the text list.
    pub text_rank: Option<usize>,
    /// Fused score.
    pub fused: f32,
    /// Whether ITM reranked this hit: `score` is then `itm_logit + itc`, else the fused score
    /// (the two are on different scales).
    pub reranked: bool,
    /// ITM match logit, when reranked.
    pub itm_logit: Option<f32>,
    /// ITM p(match), when reranked.
    pub itm_prob: Option<f32>,
    /// Captions kept by CapFilt and the product's texts (why it may have matched on words).
    pub captions: Vec<Caption>,
    /// The product the image belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product: Option<Product>,
    /// When results are grouped: the group this hit stands for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<HitGroup>,
}

/// The answer to a search.
#[derive(Debug, Clone, Serialize)]
pub struct SearchResults {
    /// Results after offset and limit.
    pub hits: Vec<SearchHit>,
    /// Candidates considered (after filters).
    pub candidates: usize,
    /// Results (groups, when grouped) before offset and limit.
    pub total: usize,
    /// Facet counts over the relevant set, in the order asked.
    pub facets: Vec<FacetCounts>,
    /// Whether the query text was cut to BLIP's 35-token limit.
    pub truncated: bool,
    /// Notices for the user (clamped parameters, truncation).
    pub notices: Vec<String>,
    /// Candidates ITM judged (0 without rerank): `rerank_k` at most, or with a cut-off as many
    /// as its rounds took.
    pub examined: usize,
    /// With `min_itm_prob`: how deep the cut-off looked and why it stopped there.
    pub cutoff: Option<ItmCutoff>,
}

/// How deep ITM judged the candidates of a search with a cut-off (`min_itm_prob`), and why it
/// stopped: whether candidates beyond what it judged could still match.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItmCutoff {
    /// The p(match) a result needed.
    pub min_itm_prob: f32,
    /// Most candidates ITM could judge.
    pub budget: usize,
    /// Candidates judged per round (`rerank_k`).
    pub round: usize,
    /// Rounds run (the one a deadline cut short not counted).
    pub rounds: usize,
    /// Why it stopped.
    pub stop: CutoffStop,
}

/// Why a cut-off's rerank stopped. ITM judges the fused candidates best first, `rerank_k` at a
/// time, and after each round stops at the first of these that holds (in this order):
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CutoffStop {
    /// Every candidate retrieved was judged: nothing retrieved is left out. Retrieval asks each
    /// retriever for at least the budget, so fewer candidates than the budget means the vector
    /// list held every image that passes the filter (in `text` mode: every BM25 match).
    Exhausted,
    /// The last round had no candidate at or above `min_itm_prob`: the fused order has left the
    /// matching images behind. A match further down remains possible (ITM and the retrievers
    /// can disagree) but a whole round without one is the sign that the rest are unlikely.
    NoMatch,
    /// The budget is spent while the last round still had matches: more may lie deeper, the
    /// answer may be incomplete (ask again with a larger budget).
    Budget,
    /// The models did not answer a later round before the caller's deadline (the server's
    /// request timeout): the answer holds what was judged in time, and more may lie deeper.
    Deadline,
}

impl CutoffStop {
    /// Whether a limit (the budget, a deadline) stopped the rerank while the rule would have
    /// gone on: the answer may then miss matches that a larger limit would find.
    pub fn limited(self) -> bool {
        matches!(self, Self::Budget | Self::Deadline)
    }
}

/// Fuses ranked lists of `(id, score)` (best first) into one list, best first.
/// Ties are broken by id so that the order is deterministic.
///
/// ```
/// use blipsearch::engine::search::{fuse, Fusion};
///
/// let vector = [(7, 0.41), (3, 0.38)]; // (id, cosine)
/// let text = [(3, 12.5), (9, 4.0)]; // (id, BM25)
/// let fused = fuse(&vector, &text, Fusion::Rrf { k: 60.0 });
/// // Image 3 is in both lists, so it comes first; then 7 (first in one list) before 9
/// // (second in one list).
/// let ids: Vec<u64> = fused.iter().map(|(id, _)| *id).collect();
/// assert_eq!(ids, [3, 7, 9]);
/// ```
pub fn fuse(vector: &[(u64, f32)], text: &[(u64, f32)], fusion: Fusion) -> Vec<(u64, f32)> {
    let mut acc: HashMap<u64, f32> = HashMap::new();
    match fusion {
        Fusion::Rrf { k } => {
            for list in [vector, text] {
                for (rank, (id, _)) in list.iter().enumerate() {
                    *acc.entry(*id).or_default() += 1.0 / (k + rank as f32 + 1.0);
                }
            }
        }
        Fusion::Weighted {
            vector: wv,
            text: wt,
        } => {
            for (id, s) in vector {
                *acc.entry(*id).or_default() += wv * s;
            }
            let max = text.iter().map(|(_, s)| *s).fold(0f32, f32::max);
            for (id, s) in text {
                let norm = if max > 0.0 { s / max } else { 0.0 };
                *acc.entry(*id).or_default() += wt * norm;
            }
        }
    }
    let mut out: Vec<(u64, f32)> = acc.into_iter().collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

/// Groups of a ranked result set by product, in the order of each group's best result: the
/// indexes into `products` (one per result, best first) of each group, best first. A result
/// without a product is a group of its own.
fn group_by_product(products: &[Option<Product>]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut of: HashMap<&str, usize> = HashMap::new();
    for (i, p) in products.iter().enumerate() {
        match p {
            Some(p) => match of.get(p.id.as_str()) {
                Some(&g) => groups[g].push(i),
                None => {
                    of.insert(&p.id, groups.len());
                    groups.push(vec![i]);
                }
            },
            None => groups.push(vec![i]),
        }
    }
    groups
}

/// Runs searches against a store and its blobs with a retrieval model.
///
/// The store's lock is taken for each store call, never across a forward pass: a search that
/// reranks deep would otherwise keep a writer waiting, and with it (the lock lets a waiting
/// writer go first) every other search. Records removed meanwhile are dropped from the answer.
pub(crate) struct Searcher<'a, M: Encoders + ?Sized> {
    store: &'a RwLock<Box<dyn Store>>,
    blobs: &'a BlobStore,
    models: &'a M,
}

impl<'a, M: Encoders + ?Sized> Searcher<'a, M> {
    /// A searcher over `store`, whose vectors the retrieval model of `models` made.
    pub fn new(store: &'a RwLock<Box<dyn Store>>, blobs: &'a BlobStore, models: &'a M) -> Self {
        Self {
            store,
            blobs,
            models,
        }
    }

    /// The store, for one call.
    fn store(&self) -> Result<RwLockReadGuard<'a, Box<dyn Store>>> {
        self.store
            .read()
            .map_err(|_| EngineError::Internal("the collection lock is poisoned".into()))
    }

    /// Checks and bounds `params` for a query by text (`by_text`) or by image; the answer's
    /// `rerank_k` is always set, and its `rerank_budget` when it has a cut-off.
    fn clamp(params: &SearchParams, by_text: bool) -> Result<(SearchParams, Vec<String>)> {
        params.check(by_text)?;
        let mut p = params.clone();
        p.rerank_k = Some(match by_text {
            true => p.rerank_k.unwrap_or(DEFAULT_RERANK_K),
            false => 0,
        });
        let mut notices = Vec::new();
        if p.k > MAX_K {
            notices.push(format!("k {} clamped to {MAX_K}", p.k));
            p.k = MAX_K;
        }
        if let Some(k) = p.rerank_k.filter(|k| *k > MAX_RERANK_K) {
            notices.push(format!("rerank_k {k} clamped to {MAX_RERANK_K}"));
            p.rerank_k = Some(MAX_RERANK_K);
        }
        if p.limit > MAX_K {
            notices.push(format!("limit {} clamped to {MAX_K}", p.limit));
            p.limit = MAX_K;
        }
        if p.min_itm_prob.is_some() {
            let mut budget = p.rerank_budget.unwrap_or(DEFAULT_RERANK_BUDGET);
            if budget > MAX_RERANK_BUDGET {
                notices.push(format!(
                    "rerank_budget {budget} clamped to {MAX_RERANK_BUDGET}"
                ));
                budget = MAX_RERANK_BUDGET;
            }
            p.rerank_budget = Some(budget);
        }
        if p.group_by.is_some() {
            p.k = p.k.saturating_mul(GROUP_FETCH).min(MAX_K);
        }
        if let Some(budget) = p.rerank_budget {
            // Enough candidates for the budget to be spent (within MAX_K: so is the budget).
            p.k = p.k.max(budget);
        }
        Ok((p, notices))
    }

    /// Searches by a text query.
    pub fn search_text(&self, query: &str, params: &SearchParams) -> Result<SearchResults> {
        if query.trim().is_empty() {
            return Err(EngineError::InvalidInput("empty query".into()));
        }
        // Before any forward pass: a query the text index cannot parse is refused at once.
        crate::index::text::check_query(query)?;
        let (p, mut notices) = Self::clamp(params, true)?;
        // BM25 alone, not reranked: the query needs no encoding (and the caller no model).
        let (q, truncated) = if p.mode == SearchMode::Text && p.rerank_k == Some(0) {
            (Vec::new(), false)
        } else {
            let emb = self
                .models
                .encode_texts(vec![query.to_string()])?
                .pop()
                .ok_or_else(|| EngineError::InvalidInput("query could not be encoded".into()))?;
            (emb.itc, emb.truncated)
        };
        if truncated {
            notices.push("query cut to BLIP's 35-token limit".into());
        }
        let vector = if p.mode != SearchMode::Text {
            self.vector_candidates(&q, &p)?
        } else {
            Vec::new()
        };
        let text = if p.mode != SearchMode::Vector {
            self.text_candidates(query, &p)?
        } else {
            Vec::new()
        };
        let mut res = self.finish(Some(query), &q, vector, text, &p)?;
        res.truncated = truncated;
        res.notices = notices;
        Ok(res)
    }

    /// Searches by an image (no reranking: ITM needs a text).
    pub fn search_image(
        &self,
        image: &DynamicImage,
        params: &SearchParams,
    ) -> Result<SearchResults> {
        let (p, notices) = Self::clamp(params, false)?;
        let emb = self.models.encode_images(vec![image.clone()])?;
        let q = emb
            .itc
            .into_iter()
            .next()
            .ok_or_else(|| EngineError::InvalidInput("image could not be encoded".into()))?;
        self.search_vector(&q, &p, None, notices)
    }

    /// Searches by an indexed image; the image itself is left out unless `include_self`.
    pub fn search_similar(&self, id: ImageId, params: &SearchParams) -> Result<SearchResults> {
        let (p, notices) = Self::clamp(params, false)?;
        let record = self
            .store()?
            .get(id)?
            .ok_or_else(|| EngineError::NotFound(format!("no image with id {}", id.0)))?;
        let leave_out = (!p.include_self).then_some(id.0);
        self.search_vector(&record.itc, &p, leave_out, notices)
    }

    fn search_vector(
        &self,
        q: &[f32],
        p: &SearchParams,
        leave_out: Option<u64>,
        notices: Vec<String>,
    ) -> Result<SearchResults> {
        let mut vector = match leave_out {
            // One more candidate, so that `k` remain without it.
            Some(_) => self.vector_candidates(
                q,
                &SearchParams {
                    k: p.k + 1,
                    ..p.clone()
                },
            )?,
            None => self.vector_candidates(q, p)?,
        };
        if let Some(id) = leave_out {
            vector.retain(|h| h.0 != id);
            vector.truncate(p.k);
        }
        let mut res = self.finish(None, q, vector, Vec::new(), p)?;
        res.notices = notices;
        Ok(res)
    }

    fn vector_candidates(&self, q: &[f32], p: &SearchParams) -> Result<Vec<(u64, f32)>> {
        let hits = self.store()?.vector_search(q, p.k, p.ef, &p.filter)?;
        Ok(hits.into_iter().map(|(id, s)| (id.0, s)).collect())
    }

    fn text_candidates(&self, query: &str, p: &SearchParams) -> Result<Vec<(u64, f32)>> {
        let hits = self.store()?.text_search(query, p.k, &p.filter)?;
        Ok(hits.into_iter().map(|(id, s)| (id.0, s)).collect())
    }

    fn finish(
        &self,
        query: Option<&str>,
        q: &[f32],
        vector: Vec<(u64, f32)>,
        text: Vec<(u64, f32)>,
        p: &SearchParams,
    ) -> Result<SearchResults> {
        let vrank: HashMap<u64, (usize, f32)> = vector
            .iter()
            .enumerate()
            .map(|(i, (id, s))| (*id, (i + 1, *s)))
            .collect();
        let trank: HashMap<u64, (usize, f32)> = text
            .iter()
            .enumerate()
            .map(|(i, (id, s))| (*id, (i + 1, *s)))
            .collect();
        let fused = fuse(&vector, &text, p.fusion);
        let candidates = fused.len();
        // Records are read only for the hits that need them (the reranked ones and the page):
        // the rest of the set is ranked by its scores and counted by its products.
        let mut hits: Vec<SearchHit> = fused
            .into_iter()
            .map(|(id, f)| SearchHit {
                id,
                path: String::new(),
                score: f,
                itc: vrank.get(&id).map(|x| x.1),
                bm25: trank.get(&id).map(|x| x.1),
                vector_rank: vrank.get(&id).map(|x| x.0),
                text_rank: trank.get(&id).map(|x| x.0),
                fused: f,
                reranked: false,
                itm_logit: None,
                itm_prob: None,
                captions: Vec::new(),
                product: None,
                group: None,
            })
            .collect();
        let mut read = vec![false; hits.len()];
        let mut examined = 0;
        let mut cutoff = None;
        if let Some(query) = query {
            let round = p.rerank_k.unwrap_or(0);
            match p.min_itm_prob {
                // The first `rerank_k` hits whose records are still there.
                None => examined = self.rerank(query, q, &mut hits, &mut read, 0, round)?,
                Some(min) => {
                    let budget = p.rerank_budget.unwrap_or(DEFAULT_RERANK_BUDGET);
                    let c = self.rerank_deep(query, q, &mut hits, &mut read, min, round, budget)?;
                    examined = c.0;
                    cutoff = Some(c.1);
                    // Only what ITM has seen can be said to match: unjudged candidates go too.
                    hits.truncate(examined);
                    hits.retain(|h| h.itm_prob.unwrap_or(0.0) >= min);
                    read.truncate(hits.len());
                }
            }
            let judged = examined.min(hits.len());
            hits[..judged].sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
        }
        // From here `hits` is the relevant set, best first.
        let products = if p.group_by.is_some() || !p.facets.is_empty() {
            let ids: Vec<ImageId> = hits.iter().map(|h| ImageId(h.id)).collect();
            self.store()?.products_of(&ids)?
        } else {
            Vec::new()
        };
        let groups: Vec<Vec<usize>> = match p.group_by {
            Some(GroupBy::Product) => group_by_product(&products),
            None => (0..hits.len()).map(|i| vec![i]).collect(),
        };
        let facets = if p.facets.is_empty() {
            Vec::new()
        } else {
            // One count per result, or per group (its products are one product).
            let set: Vec<Option<&Product>> =
                groups.iter().map(|g| products[g[0]].as_ref()).collect();
            count_facets(&p.facets, &set)
        };
        let mut total = groups.len();
        let mut page: Vec<Vec<usize>> = Vec::with_capacity(p.limit.min(groups.len()));
        for mut group in groups.into_iter().skip(p.offset) {
            if page.len() == p.limit {
                break;
            }
            // The group's best image whose record is still there stands for it.
            while let Some(&i) = group.first() {
                if read[i] || self.fill(&mut hits[i], q)? {
                    read[i] = true;
                    break;
                }
                group.remove(0);
            }
            if group.is_empty() {
                total -= 1; // removed since the candidate lists were made
            } else {
                page.push(group);
            }
        }
        let sizes = if p.group_by.is_some() {
            let names: Vec<String> = page
                .iter()
                .filter_map(|g| hits[g[0]].product.as_ref().map(|p| p.id.clone()))
                .collect();
            self.store()?.product_images(Some(&names))?
        } else {
            Default::default()
        };
        let mut slots: Vec<Option<SearchHit>> = hits.into_iter().map(Some).collect();
        let mut out = Vec::with_capacity(page.len());
        for group in page {
            let Some(mut hit) = slots[group[0]].take() else {
                continue;
            };
            if p.group_by.is_some() {
                let product = hit.product.as_ref().map(|p| p.id.clone());
                let size = product
                    .as_ref()
                    .and_then(|id| sizes.get(id))
                    .map_or(0, Vec::len)
                    .max(group.len());
                hit.group = Some(HitGroup {
                    product,
                    size,
                    matching: group[1..]
                        .iter()
                        .filter_map(|&i| slots[i].as_ref().map(|h| h.id))
                        .collect(),
                });
            }
            out.push(hit);
        }
        Ok(SearchResults {
            hits: out,
            candidates,
            total,
            facets,
            truncated: false,
            notices: Vec::new(),
            examined,
            cutoff,
        })
    }

    /// Reads `hit`'s record into it: path, kept captions, product, and the ITC cosine when the
    /// vector list did not give it. `false` when the image is gone.
    fn fill(&self, hit: &mut SearchHit, q: &[f32]) -> Result<bool> {
        let Some(record) = self.store()?.get(ImageId(hit.id))? else {
            return Ok(false);
        };
        if hit.itc.is_none() && !q.is_empty() {
            hit.itc = Some(dot(q, &record.itc));
        }
        hit.path = record.path;
        hit.captions = record.captions.into_iter().filter(|c| c.kept).collect();
        hit.product = record.product;
        Ok(true)
    }

    /// Judges with ITM the next `want` candidates from `hits[start]` on, in one call to the
    /// models: sets their `itm_*` and `score = itm_logit + itc`, and reads their records
    /// (`read`). A candidate removed since the candidate lists were made is dropped from `hits`.
    /// Returns how many were judged: fewer than `want` only when the candidates ran out.
    fn rerank(
        &self,
        query: &str,
        q: &[f32],
        hits: &mut Vec<SearchHit>,
        read: &mut Vec<bool>,
        start: usize,
        want: usize,
    ) -> Result<usize> {
        let mut data = Vec::new();
        let mut shape = (0, 0);
        let mut end = start;
        while end < start + want && end < hits.len() {
            let features = match self.fill(&mut hits[end], q)? {
                true => self.features(hits[end].id)?,
                false => None,
            };
            match features {
                Some(f) => {
                    shape = (f.rows, f.cols);
                    data.extend(f.data);
                    read[end] = true;
                    end += 1;
                }
                None => {
                    hits.remove(end);
                    read.remove(end);
                }
            }
        }
        let n = end - start;
        if n == 0 {
            return Ok(0);
        }
        // Built on the CPU: the model's owner moves it to its device.
        let tokens = Tensor::from_vec(data, (n, shape.0, shape.1), &candle_core::Device::Cpu)
            .map_err(crate::model::ModelError::from)?;
        let scores = self.models.itm(query.to_string(), tokens)?;
        if scores.len() != n {
            return Err(EngineError::Internal(format!(
                "ITM answered {} scores for {n} candidates",
                scores.len()
            )));
        }
        for (h, s) in hits[start..end].iter_mut().zip(scores) {
            h.reranked = true;
            h.itm_logit = Some(s.logits[1]);
            h.itm_prob = Some(s.prob);
            h.score = s.logits[1] + h.itc.unwrap_or(0.0);
        }
        Ok(n)
    }

    /// The rerank features of image `id`; `None` when it has been removed (blobs go after their
    /// record, so features missing under a record are an error).
    fn features(&self, id: u64) -> Result<Option<crate::index::FeatureMatrix>> {
        match self.blobs.features(ImageId(id)) {
            Ok(f) => Ok(Some(f)),
            Err(IndexError::NotFound(_)) if self.store()?.get(ImageId(id))?.is_none() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The rerank of a search with a cut-off: ITM judges `hits` (the fused candidates, best
    /// first) in rounds of `round` from the top, each round one call to the models (on the
    /// server, one job on the inference queue, so that other searches' jobs are served between
    /// rounds), and stops by the rule of [`CutoffStop`]: every candidate judged; else a round
    /// without any p(match) at or above `min`; else `budget` candidates judged. A round the
    /// models time out on (the caller's deadline) ends it too, after the first; the first
    /// round's failure is the search's. Returns how many hits at the front were judged.
    #[allow(clippy::too_many_arguments)]
    fn rerank_deep(
        &self,
        query: &str,
        q: &[f32],
        hits: &mut Vec<SearchHit>,
        read: &mut Vec<bool>,
        min: f32,
        round: usize,
        budget: usize,
    ) -> Result<(usize, ItmCutoff)> {
        let mut judged = 0;
        let mut rounds = 0;
        let stop = loop {
            let want = round.min(budget - judged);
            let n = match self.rerank(query, q, hits, read, judged, want) {
                Ok(n) => n,
                Err(EngineError::TimedOut(_)) if rounds > 0 => break CutoffStop::Deadline,
                Err(e) => return Err(e),
            };
            let matched = hits[judged..judged + n]
                .iter()
                .any(|h| h.itm_prob.is_some_and(|p| p >= min));
            judged += n;
            rounds += usize::from(n > 0);
            if judged == hits.len() {
                break CutoffStop::Exhausted;
            }
            if !matched {
                break CutoffStop::NoMatch;
            }
            if judged >= budget {
                break CutoffStop::Budget;
            }
        };
        let report = ItmCutoff {
            min_itm_prob: min,
            budget,
            round,
            rounds,
            stop,
        };
        Ok((judged, report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    /// A ranked list: distinct ids, scores best first.
    fn ranked() -> impl Strategy<Value = Vec<(u64, f32)>> {
        proptest::collection::hash_map(0u64..60, 0f32..1.0, 0..25).prop_map(|m| {
            let mut v: Vec<(u64, f32)> = m.into_iter().collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            v
        })
    }

    fn ids(v: &[(u64, f32)]) -> Vec<u64> {
        v.iter().map(|x| x.0).collect()
    }

    proptest! {
        #[test]
        fn fusion_ranks_the_union_once(v in ranked(), t in ranked(), rrf in any::<bool>()) {
            let fusion = if rrf { Fusion::Rrf { k: 60.0 } } else { Fusion::Weighted { vector: 1.0, text: 0.5 } };
            let f = fuse(&v, &t, fusion);
            let mut got = ids(&f);
            got.sort_unstable();
            let mut want: Vec<u64> = ids(&v).into_iter().chain(ids(&t)).collect();
            want.sort_unstable();
            want.dedup();
            prop_assert_eq!(got, want);
            prop_assert!(f.windows(2).all(|w| w[0].1 >= w[1].1));
        }

        #[test]
        fn fusion_of_one_list_keeps_its_order(v in ranked()) {
            // With nothing to fuse with, both fusions agree with the list itself.
            prop_assert_eq!(ids(&fuse(&v, &[], Fusion::Rrf { k: 60.0 })), ids(&v));
            prop_assert_eq!(ids(&fuse(&v, &[], Fusion::Weighted { vector: 1.0, text: 0.0 })), ids(&v));
            prop_assert_eq!(ids(&fuse(&[], &v, Fusion::Rrf { k: 60.0 })), ids(&v));
        }

        #[test]
        fn first_in_both_lists_wins_rrf(v in ranked(), t in ranked()) {
            prop_assume!(!v.is_empty());
            let top = v[0].0;
            let mut t2: Vec<(u64, f32)> = t.into_iter().filter(|x| x.0 != top).collect();
            t2.insert(0, (top, 1.0));
            prop_assert_eq!(fuse(&v, &t2, Fusion::Rrf { k: 60.0 })[0].0, top);
        }
    }
}

/// Facets, grouping and totals on a collection built by hand: vectors at known cosines to the
/// query image, so that the order, the groups and every count are known in advance.
#[cfg(test)]
mod catalogue_tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::engine::models::NoModels;
    use crate::engine::Engine;
    use crate::index::{
        content_hash, AttrType, AttrValue, Collection, CollectionInfo, HnswParams, ImageRecord,
        Schema,
    };

    fn schema() -> Schema {
        Schema::from([
            ("brand".to_string(), AttrType::Keyword),
            ("color".to_string(), AttrType::Keyword),
            ("price".to_string(), AttrType::Number),
            ("in_stock".to_string(), AttrType::Bool),
            ("released".to_string(), AttrType::Date),
        ])
    }

    fn product(id: &str, attrs: &[(&str, AttrValue)]) -> Product {
        Product {
            id: id.into(),
            title: Some(format!("title of {id}")),
            description: None,
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn t(s: &str) -> AttrValue {
        AttrValue::Text(s.into())
    }

    /// The collection, and the id of each image by name. The query image `q` lies outside
    /// `/cat/`; ranked by cosine to it, the images under `/cat/` are a1 n1 b1 a2 c1 b2 n2 a3 d1
    /// (a: product P1, b: P2, c: P3, d: P4, n: none); P1 has a fourth image, a4, outside `/cat/`.
    fn build(dir: &std::path::Path) -> (Engine, BTreeMap<&'static str, u64>) {
        let p1 = product(
            "P1",
            &[
                ("brand", t("acme")),
                ("color", t("red")),
                ("price", AttrValue::Number(10.0)),
                ("in_stock", AttrValue::Bool(true)),
                ("released", t("2024-01-05")),
            ],
        );
        let p2 = product(
            "P2",
            &[
                ("brand", t("zenith")),
                ("color", t("blue")),
                ("price", AttrValue::Number(55.5)),
                ("in_stock", AttrValue::Bool(false)),
                ("released", t("2023-06-01")),
            ],
        );
        let p3 = product(
            "P3",
            &[
                ("brand", t("acme")),
                ("color", t("red")),
                ("price", AttrValue::Number(99.0)),
                ("released", t("2024-01-05")),
            ],
        );
        let p4 = product(
            "P4",
            &[
                ("brand", t("acme")),
                ("color", t("green")),
                ("price", AttrValue::Number(120.0)),
                ("in_stock", AttrValue::Bool(true)),
            ],
        );
        let images: [(&str, &str, f32, Option<&Product>); 11] = [
            ("q", "/q/", 1.0, None),
            ("a1", "/cat/", 0.99, Some(&p1)),
            ("a4", "/hidden/", 0.98, Some(&p1)),
            ("n1", "/cat/", 0.97, None),
            ("b1", "/cat/", 0.95, Some(&p2)),
            ("a2", "/cat/", 0.90, Some(&p1)),
            ("c1", "/cat/", 0.85, Some(&p3)),
            ("b2", "/cat/", 0.80, Some(&p2)),
            ("n2", "/cat/", 0.60, None),
            ("a3", "/cat/", 0.50, Some(&p1)),
            ("d1", "/cat/", 0.10, Some(&p4)),
        ];
        let info = CollectionInfo::new("test/model", None, 4, 5, 8);
        let mut c = Collection::open(dir, &info, HnswParams::default()).unwrap();
        c.extend_schema(&schema()).unwrap();
        let mut ids = BTreeMap::new();
        for (name, folder, cos, product) in images {
            let hash = content_hash(name.as_bytes());
            let id = c.allocate_id(&hash).unwrap();
            c.insert(ImageRecord {
                id,
                path: format!("{folder}{name}.jpg"),
                content_hash: hash,
                size_bytes: 1,
                width: 10,
                height: 10,
                mtime_unix: 0,
                exif_date: None,
                itc: vec![cos, (1.0 - cos * cos).max(0.0).sqrt(), 0.0, 0.0],
                captions: vec![],
                given_texts: vec![],
                added_unix: 0,
                product: product.cloned(),
                pdq: None,
                flags: Vec::new(),
            })
            .unwrap();
            ids.insert(name, id.0);
        }
        c.commit().unwrap();
        (Engine::over(dir, Box::new(c)).unwrap(), ids)
    }

    fn counts(f: &FacetCounts) -> Vec<(&str, usize)> {
        f.values
            .iter()
            .map(|v| (v.value.as_str(), v.count))
            .collect()
    }

    fn names(ids: &BTreeMap<&'static str, u64>, hits: &[u64]) -> Vec<&'static str> {
        hits.iter()
            .map(|h| *ids.iter().find(|(_, id)| *id == h).unwrap().0)
            .collect()
    }

    fn params(e: &Engine, group: bool) -> SearchParams {
        SearchParams {
            filter: Filter {
                path_prefix: Some("/cat/".into()),
                ..Filter::default()
            },
            facets: e
                .parse_facets("brand,color,price,in_stock,released")
                .unwrap(),
            group_by: group.then_some(GroupBy::Product),
            ..SearchParams::default()
        }
    }

    #[test]
    fn facets_count_every_result_and_total_counts_before_paging() {
        let tmp = tempfile::tempdir().unwrap();
        let (e, ids) = build(tmp.path());
        let p = SearchParams {
            limit: 3,
            ..params(&e, false)
        };
        let r = e.search_similar(&NoModels, ImageId(ids["q"]), &p).unwrap();
        let got: Vec<u64> = r.hits.iter().map(|h| h.id).collect();
        assert_eq!(names(&ids, &got), ["a1", "n1", "b1"]);
        assert_eq!((r.total, r.candidates), (9, 9));
        // By hand over the nine results a1 n1 b1 a2 c1 b2 n2 a3 d1.
        let f = &r.facets;
        assert_eq!(f.len(), 5);
        assert_eq!(counts(&f[0]), [("acme", 5), ("zenith", 2)]);
        assert_eq!(f[0].missing, 2);
        assert_eq!(counts(&f[1]), [("red", 4), ("blue", 2), ("green", 1)]);
        assert_eq!(
            counts(&f[2]),
            [("0..50", 3), ("50..100", 3), ("100..150", 1)]
        );
        assert_eq!(f[2].missing, 2);
        assert_eq!(counts(&f[3]), [("true", 4), ("false", 2)]);
        assert_eq!(f[3].missing, 3);
        assert_eq!(counts(&f[4]), [("2024-01-05", 4), ("2023-06-01", 2)]);
        assert_eq!(f[4].missing, 3);
        // Hits carry their product; ungrouped hits no group.
        assert_eq!(r.hits[0].product.as_ref().unwrap().id, "P1");
        assert_eq!(r.hits[0].path, "/cat/a1.jpg");
        assert!(r.hits[1].product.is_none());
        assert!(r.hits.iter().all(|h| h.group.is_none()));

        // A later page: the same total and facets.
        let p2 = SearchParams {
            offset: 7,
            ..p.clone()
        };
        let r2 = e.search_similar(&NoModels, ImageId(ids["q"]), &p2).unwrap();
        let got: Vec<u64> = r2.hits.iter().map(|h| h.id).collect();
        assert_eq!(names(&ids, &got), ["a3", "d1"]);
        assert_eq!(r2.total, 9);
        assert_eq!(r2.facets, r.facets);

        // Ranges asked for, and facets of a smaller relevant set (k: the four best).
        let p3 = SearchParams {
            k: 4,
            facets: e.parse_facets("price:..50|50..").unwrap(),
            ..p
        };
        let r3 = e.search_similar(&NoModels, ImageId(ids["q"]), &p3).unwrap();
        assert_eq!(r3.total, 4);
        assert_eq!(counts(&r3.facets[0]), [("..50", 2), ("50..", 1)]);
        assert_eq!(r3.facets[0].missing, 1);

        // Facets built by hand are bounded like parsed ones.
        let price = e.parse_facets("price").unwrap().remove(0);
        let too_many = SearchParams {
            facets: vec![price; MAX_FACETS + 1],
            ..SearchParams::default()
        };
        let err = e.search_similar(&NoModels, ImageId(ids["q"]), &too_many);
        assert!(matches!(err, Err(EngineError::InvalidInput(_))), "{err:?}");
    }

    #[test]
    fn grouping_gives_one_hit_per_product_with_its_other_matches_and_size() {
        let tmp = tempfile::tempdir().unwrap();
        let (e, ids) = build(tmp.path());
        let r = e
            .search_similar(&NoModels, ImageId(ids["q"]), &params(&e, true))
            .unwrap();
        let got: Vec<u64> = r.hits.iter().map(|h| h.id).collect();
        assert_eq!(names(&ids, &got), ["a1", "n1", "b1", "c1", "n2", "d1"]);
        assert_eq!(r.total, 6);
        let groups: Vec<(Option<&str>, usize, Vec<&str>)> = r
            .hits
            .iter()
            .map(|h| {
                let g = h.group.as_ref().unwrap();
                (g.product.as_deref(), g.size, names(&ids, &g.matching))
            })
            .collect();
        assert_eq!(
            groups,
            [
                // a4 is P1's too, outside the filter: counted in the size, not matching.
                (Some("P1"), 4, vec!["a2", "a3"]),
                (None, 1, vec![]),
                (Some("P2"), 2, vec!["b2"]),
                (Some("P3"), 1, vec![]),
                (None, 1, vec![]),
                (Some("P4"), 1, vec![]),
            ]
        );
        // Facets count groups: P1 P3 P4 are acme, P2 zenith, the two without product missing.
        assert_eq!(counts(&r.facets[0]), [("acme", 3), ("zenith", 1)]);
        assert_eq!(r.facets[0].missing, 2);
        assert_eq!(
            counts(&r.facets[1]),
            [("red", 2), ("blue", 1), ("green", 1)]
        );
        assert_eq!(
            counts(&r.facets[2]),
            [("0..50", 1), ("50..100", 2), ("100..150", 1)]
        );
        assert_eq!(counts(&r.facets[3]), [("true", 2), ("false", 1)]);
        assert_eq!(r.facets[3].missing, 3);

        // Pages count groups.
        let p = SearchParams {
            offset: 1,
            limit: 2,
            ..params(&e, true)
        };
        let page = e.search_similar(&NoModels, ImageId(ids["q"]), &p).unwrap();
        let got: Vec<u64> = page.hits.iter().map(|h| h.id).collect();
        assert_eq!(names(&ids, &got), ["n1", "b1"]);
        assert_eq!(page.total, 6);
        assert_eq!(page.facets, r.facets);

        // `k` counts images; grouping asks for GROUP_FETCH times as many: k 1 is the 4 best
        // images a1 n1 b1 a2, three groups.
        let p = SearchParams {
            k: 1,
            ..params(&e, true)
        };
        let few = e.search_similar(&NoModels, ImageId(ids["q"]), &p).unwrap();
        assert_eq!((few.candidates, few.total), (GROUP_FETCH, 3));
        let g = few.hits[0].group.as_ref().unwrap();
        assert_eq!(names(&ids, &g.matching), ["a2"]);

        // With an attribute filter: only acme's products are grouped and counted.
        let mut p = params(&e, true);
        p.filter.attributes = e.parse_filters(&["brand:acme".into()]).unwrap();
        let acme = e.search_similar(&NoModels, ImageId(ids["q"]), &p).unwrap();
        let got: Vec<u64> = acme.hits.iter().map(|h| h.id).collect();
        assert_eq!(names(&ids, &got), ["a1", "c1", "d1"]);
        assert_eq!(acme.total, 3);
        assert_eq!(counts(&acme.facets[0]), [("acme", 3)]);
        assert_eq!(acme.facets[0].missing, 0);
    }

    /// After the ITM cut-off the relevant set is what ITM kept: facets and groups count those,
    /// not the candidates. On the tiny fixture model, with the cut-off at the median p(match).
    #[test]
    fn facets_and_groups_count_what_the_itm_cut_off_keeps() {
        use crate::engine::{IngestOptions, Silent};
        use crate::model::{ModelSource, Retriever};

        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let r = Retriever::load(
            &ModelSource::Dir(fixtures.join("tiny-a/retrieval")),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let photos = tmp.path().join("photos");
        std::fs::create_dir_all(&photos).unwrap();
        for f in [
            "chelsea.png",
            "coffee.png",
            "rocket.jpg",
            "astronaut.png",
            "camera.png",
        ] {
            std::fs::copy(fixtures.join("images").join(f), photos.join(f)).unwrap();
        }
        for i in 0..11u32 {
            image::RgbImage::from_fn(24, 16 + i % 5, |x, y| {
                image::Rgb([
                    (x * 9 + i * 31) as u8,
                    (y * 13 + i * 7) as u8,
                    (i * 5) as u8,
                ])
            })
            .save(photos.join(format!("noise_{i}.png")))
            .unwrap();
        }
        let cfg = r.config();
        let info = CollectionInfo::new(
            r.name(),
            None,
            r.embedding_dim(),
            cfg.vision.num_tokens(),
            cfg.vision.hidden_size,
        );
        let e = Engine::open(tmp.path().join("index").as_path(), &info).unwrap();
        let opts = IngestOptions {
            capfilt: None,
            ..Default::default()
        };
        let s = e.ingest(&r, opts, &[photos], false, &Silent).unwrap();
        assert_eq!(s.added, 16);
        // Products by id: three images each of five products, the last image none.
        e.write().unwrap().extend_schema(&schema()).unwrap();
        let mut records = Vec::new();
        e.read()
            .unwrap()
            .for_each(&mut |rec| {
                records.push(rec);
                Ok(())
            })
            .unwrap();
        records.sort_by_key(|rec| rec.id);
        let brands = ["acme", "zenith", "acme", "orbit", "zenith"];
        for (i, mut rec) in records.into_iter().enumerate() {
            rec.product =
                (i < 15).then(|| product(&format!("P{}", i / 3), &[("brand", t(brands[i / 3]))]));
            e.update(&rec).unwrap();
        }
        e.commit().unwrap();

        let query = "a cat lying on a sofa";
        let all = SearchParams {
            mode: SearchMode::Vector,
            rerank_k: Some(16),
            limit: 100,
            facets: e.parse_facets("brand").unwrap(),
            ..SearchParams::default()
        };
        let every = e.search_text(&r, query, &all).unwrap();
        assert_eq!(every.total, 16);
        let mut probs: Vec<f32> = every.hits.iter().map(|h| h.itm_prob.unwrap()).collect();
        probs.sort_by(|a, b| b.total_cmp(a));
        let min = probs[7];
        assert!(
            probs[0] > min,
            "ITM gives the images distinct p(match): {probs:?}"
        );
        let kept: Vec<&SearchHit> = every
            .hits
            .iter()
            .filter(|h| h.itm_prob.unwrap() >= min)
            .collect();

        // Counted by hand over the hits ITM kept, with their products as ingested above.
        let by_hand = |hits: &[&SearchHit]| {
            let mut c: BTreeMap<String, usize> = BTreeMap::new();
            let mut missing = 0;
            for h in hits {
                match &h.product {
                    Some(p) => {
                        *c.entry(p.attributes["brand"].as_text().unwrap().to_string())
                            .or_default() += 1
                    }
                    None => missing += 1,
                }
            }
            let mut v: Vec<(String, usize)> = c.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            (v, missing)
        };
        let owned = |f: &FacetCounts| -> (Vec<(String, usize)>, usize) {
            (
                f.values
                    .iter()
                    .map(|v| (v.value.clone(), v.count))
                    .collect(),
                f.missing,
            )
        };
        let everything: Vec<&SearchHit> = every.hits.iter().collect();
        assert_eq!(owned(&every.facets[0]), by_hand(&everything));

        let cut = SearchParams {
            min_itm_prob: Some(min),
            ..all.clone()
        };
        let r1 = e.search_text(&r, query, &cut).unwrap();
        assert_eq!(r1.total, kept.len());
        assert!(kept.len() >= 8 && kept.len() < 16);
        let got: Vec<u64> = r1.hits.iter().map(|h| h.id).collect();
        let want: Vec<u64> = kept.iter().map(|h| h.id).collect();
        assert_eq!(got, want);
        assert_eq!(owned(&r1.facets[0]), by_hand(&kept));
        assert_ne!(r1.facets, every.facets, "the cut-off changed the counts");

        // Grouped: one group per product among the kept, in the order of their best image.
        let grouped = SearchParams {
            group_by: Some(GroupBy::Product),
            ..cut
        };
        let r2 = e.search_text(&r, query, &grouped).unwrap();
        let mut seen: Vec<Option<String>> = Vec::new();
        let mut reps = Vec::new();
        for h in &kept {
            let key = h.product.as_ref().map(|p| p.id.clone());
            if key.is_none() || !seen.contains(&key) {
                seen.push(key);
                reps.push(*h);
            }
        }
        let got: Vec<u64> = r2.hits.iter().map(|h| h.id).collect();
        let want: Vec<u64> = reps.iter().map(|h| h.id).collect();
        assert_eq!(got, want);
        assert_eq!(r2.total, reps.len());
        assert_eq!(owned(&r2.facets[0]), by_hand(&reps));
        for h in &r2.hits {
            let g = h.group.as_ref().unwrap();
            let others: Vec<u64> = kept
                .iter()
                .filter(|k| k.id != h.id && k.product.is_some() && k.product == h.product)
                .map(|k| k.id)
                .collect();
            assert_eq!(g.matching, others);
            assert_eq!(g.size, if h.product.is_some() { 3 } else { 1 });
        }
    }
}

//! `GET /api/search` (text) and `POST /api/search/image` (upload or an indexed id).

use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::{
    content_type, decode_upload, is_multipart, read_upload, BodyDeadline, Endpoint, FileOut,
    PathView,
};
use crate::engine::facets::{FacetCounts, GroupBy};
use crate::engine::search::{
    ItmCutoff, SearchHit, SearchMode, SearchParams, SearchResults, MAX_K, MAX_RERANK_BUDGET,
    MAX_RERANK_K,
};
use crate::engine::{check_list_name, Caption, Engine, Filter, Flag, FlagFilter, ImageId};
use crate::server::error::{ApiError, ApiResult};
use crate::server::state::AppState;

/// Registers the search routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    Endpoint::new("/api/search").get(search_text).register(cfg);
    Endpoint::new("/api/search/image")
        .post(search_image)
        .register(cfg);
}

/// Largest `offset`: past every candidate list a search can make (two retrievers of at most
/// `MAX_K` each), so nothing is lost by the bound.
const MAX_OFFSET: usize = 10_000;

/// Most `filter` parameters of one search.
const MAX_FILTERS: usize = 32;
/// Longest `facets` list, in characters (what the OpenAPI document's `maxLength` counts).
const MAX_FACETS_CHARS: usize = 2000;

/// Query parameters of both searches but the repeatable `filter` (see [`read_query`]). Unknown
/// parameters are refused (400), so that a misspelt filter is not silently ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchQuery {
    q: Option<String>,
    k: Option<usize>,
    rerank_k: Option<usize>,
    mode: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
    folder: Option<String>,
    date_from: Option<String>,
    date_to: Option<String>,
    min_itm_prob: Option<f64>,
    /// With `min_itm_prob`: most candidates ITM judges.
    rerank_budget: Option<usize>,
    include_self: Option<bool>,
    /// Facets to count: `brand,color,price:..50|50..`.
    facets: Option<String>,
    /// `product`: one hit per product.
    group_by: Option<String>,
    /// Only images flagged by this match list (`*`: by any); needs the key.
    flagged: Option<String>,
    /// The API key of a GET request (`auth` reads it); accepted here, never used.
    #[serde(rename = "api_key")]
    _api_key: Option<serde::de::IgnoredAny>,
}

/// Refuses `value` of parameter `name` outside `range`, which the OpenAPI document states.
fn check_range(
    name: &str,
    value: Option<usize>,
    range: std::ops::RangeInclusive<usize>,
) -> ApiResult<()> {
    match value {
        Some(v) if !range.contains(&v) => Err(ApiError::bad_request(format!(
            "{name} must be between {} and {}",
            range.start(),
            range.end()
        ))),
        _ => Ok(()),
    }
}

/// The query string of a search: the `filter` values (each `name:value`, repeatable, all of
/// which must hold) and the other parameters, each given at most once.
fn read_query(req: &HttpRequest) -> ApiResult<(SearchQuery, Vec<String>)> {
    let malformed = |e: &dyn std::fmt::Display| ApiError::bad_request(format!("{e}"));
    let mut rest = Vec::new();
    let mut filters = Vec::new();
    for piece in req.query_string().split('&').filter(|p| !p.is_empty()) {
        let pair = web::Query::<Vec<(String, String)>>::from_query(piece)
            .map_err(|e| malformed(&e))?
            .into_inner();
        match pair.as_slice() {
            [(name, value)] if name == "filter" => filters.push(value.clone()),
            _ => rest.push(piece),
        }
    }
    if filters.len() > MAX_FILTERS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_FILTERS} filter parameters"
        )));
    }
    let query = web::Query::<SearchQuery>::from_query(&rest.join("&"))
        .map_err(|e| malformed(&e))?
        .into_inner();
    Ok((query, filters))
}

impl SearchQuery {
    /// The parameters that need no look at the collection; see [`Self::attach_products`] for
    /// the rest.
    fn params(&self, view: &PathView) -> ApiResult<SearchParams> {
        let d = SearchParams::default();
        let mode = match &self.mode {
            None => SearchMode::Hybrid,
            Some(m) => m.parse::<SearchMode>()?,
        };
        check_range("k", self.k, 1..=MAX_K)?;
        check_range("rerank_k", self.rerank_k, 0..=MAX_RERANK_K)?;
        check_range("limit", self.limit, 1..=MAX_K)?;
        check_range("offset", self.offset, 0..=MAX_OFFSET)?;
        check_range("rerank_budget", self.rerank_budget, 1..=MAX_RERANK_BUDGET)?;
        if let Some(p) = self.min_itm_prob {
            if !(0.0..=1.0).contains(&p) {
                return Err(ApiError::bad_request(
                    "min_itm_prob must be between 0 and 1",
                ));
            }
        }
        if self
            .facets
            .as_ref()
            .is_some_and(|f| f.chars().count() > MAX_FACETS_CHARS)
        {
            return Err(ApiError::bad_request(format!(
                "facets is over {MAX_FACETS_CHARS} characters"
            )));
        }
        let blank = |s: &Option<String>| s.clone().filter(|x| !x.trim().is_empty());
        let flagged = match self.flagged.as_deref() {
            None => None,
            // Flags are moderation's business: a caller who may not see them may not ask by them.
            Some(_) if !view.full() => {
                return Err(ApiError::new(
                    actix_web::http::StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "flagged= needs the API key (Authorization: Bearer KEY)",
                ))
            }
            Some("*") => Some(FlagFilter::default()),
            Some(list) => {
                check_list_name(list).map_err(|e| ApiError::bad_request(e.to_string()))?;
                Some(FlagFilter {
                    list: Some(list.to_string()),
                    pending_only: false,
                })
            }
        };
        let group_by = match &self.group_by {
            None => None,
            Some(g) => Some(g.parse::<GroupBy>()?),
        };
        Ok(SearchParams {
            k: self.k.unwrap_or(d.k),
            rerank_k: self.rerank_k,
            mode,
            limit: self.limit.unwrap_or(d.limit),
            offset: self.offset.unwrap_or(0),
            min_itm_prob: self.min_itm_prob.map(|p| p as f32),
            rerank_budget: self.rerank_budget,
            include_self: self.include_self.unwrap_or(false),
            filter: Filter {
                path_prefix: blank(&self.folder).map(|f| view.resolve(&f)),
                date_from: self.date_from.clone(),
                date_to: self.date_to.clone(),
                flagged,
                ..Default::default()
            },
            group_by,
            ..d
        })
    }

    /// Adds the attribute filters and facets, parsed with the collection's attribute types (a
    /// look at the collection: call it off the HTTP workers).
    fn attach_products(
        &self,
        engine: &Engine,
        filters: &[String],
        params: &mut SearchParams,
    ) -> ApiResult<()> {
        params.filter.attributes = engine.parse_filters(filters)?;
        if let Some(list) = self.facets.as_deref() {
            params.facets = engine.parse_facets(list)?;
        }
        Ok(())
    }
}

/// One result as the API shows it: the engine's hit (its path as the caller may see it), the
/// file, and the caption that best explains a text match.
#[derive(Debug, Serialize)]
struct HitOut {
    #[serde(flatten)]
    hit: SearchHit,
    #[serde(flatten)]
    file: FileOut,
    matched_caption: Option<String>,
    /// Match-list flags, to a caller who may see them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    flags: Vec<Flag>,
}

#[derive(Debug, Serialize)]
struct SearchOut {
    query: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    similar_to: Option<u64>,
    hits: Vec<HitOut>,
    candidates: usize,
    total: usize,
    facets: Vec<FacetCounts>,
    truncated: bool,
    notices: Vec<String>,
    examined: usize,
    cutoff: Option<ItmCutoff>,
    took_ms: f64,
}

/// The kept caption sharing most words with the query (the first kept one when none does).
fn matched_caption(query: Option<&str>, captions: &[Caption]) -> Option<String> {
    let words: Vec<String> = query
        .unwrap_or("")
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() > 1)
        .map(str::to_lowercase)
        .collect();
    let overlap = |c: &Caption| {
        let text = c.text.to_lowercase();
        let mine: Vec<&str> = text.split(|c: char| !c.is_alphanumeric()).collect();
        words.iter().filter(|w| mine.contains(&w.as_str())).count()
    };
    let mut best: Option<(&Caption, usize)> = None;
    for c in captions.iter().filter(|c| c.kept) {
        let n = overlap(c);
        if best.is_none_or(|(_, m)| n > m) {
            best = Some((c, n));
        }
    }
    best.map(|(c, _)| c.text.clone())
}

fn render(
    engine: &Engine,
    view: &PathView,
    query: Option<&str>,
    similar_to: Option<u64>,
    r: SearchResults,
    started: Instant,
) -> ApiResult<SearchOut> {
    let mut hits = Vec::with_capacity(r.hits.len());
    for mut hit in r.hits {
        let (width, height, flags) = engine
            .get(ImageId(hit.id))?
            .map_or((0, 0, Vec::new()), |rec| (rec.width, rec.height, rec.flags));
        let flags = if view.full() { flags } else { Vec::new() };
        hit.path = view.show(&hit.path);
        hits.push(HitOut {
            file: FileOut::new(hit.id, &hit.path, width, height),
            matched_caption: matched_caption(query, &hit.captions),
            flags,
            hit,
        });
    }
    Ok(SearchOut {
        query: query.map(str::to_string),
        similar_to,
        hits,
        candidates: r.candidates,
        total: r.total,
        facets: r.facets,
        truncated: r.truncated,
        notices: r.notices,
        examined: r.examined,
        cutoff: r.cutoff,
        took_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

async fn search_text(
    state: web::Data<AppState>,
    req: HttpRequest,
    view: PathView,
) -> ApiResult<HttpResponse> {
    let started = Instant::now();
    let (query, filters) = read_query(&req)?;
    let q = query
        .q
        .clone()
        .map(|q| q.trim().to_string())
        .filter(|q| !q.is_empty())
        .ok_or_else(|| ApiError::bad_request("missing query: pass q=..."))?;
    let mut params = query.params(&view)?;
    let out = web::block(move || -> ApiResult<SearchOut> {
        query.attach_products(&state.engine, &filters, &mut params)?;
        // Every round of a deep rerank waits within the one request deadline.
        let client = state.client.for_request(started);
        let r = state.engine.search_text(&client, &q, &params)?;
        render(&state.engine, &view, Some(&q), None, r, started)
    })
    .await??;
    Ok(HttpResponse::Ok().json(out))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ById {
    /// The indexed image to search from; `id` is its older name.
    #[serde(alias = "id")]
    similar_to: u64,
}

async fn search_image(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
    view: PathView,
) -> ApiResult<HttpResponse> {
    let started = Instant::now();
    let (query, filters) = read_query(&req)?;
    if query.q.is_some() || query.mode.is_some() {
        return Err(ApiError::bad_request(
            "a search by image takes no q or mode (it compares image vectors)",
        ));
    }
    let mut params = query.params(&view)?;
    params.mode = SearchMode::Vector;
    // Before reading a body: refuse what a search by image cannot do, and filters or facets
    // the collection cannot answer.
    let params = {
        let state = state.clone();
        web::block(move || -> ApiResult<SearchParams> {
            query.attach_products(&state.engine, &filters, &mut params)?;
            params.check(false)?;
            Ok(params)
        })
        .await??
    };
    if is_multipart(&req) {
        if params.include_self {
            return Err(ApiError::bad_request(
                "include_self applies to a search by an indexed image ({\"similar_to\": ...})",
            ));
        }
        let upload = read_upload(&req, payload, &state.settings).await?;
        let bytes = upload
            .image
            .ok_or_else(|| ApiError::bad_request("missing the `image` file field"))?;
        let out = web::block(move || -> ApiResult<SearchOut> {
            // The search sends a copy of the image to the models.
            let admitted = decode_upload(&bytes, &state.settings, 2)?;
            let r = state
                .engine
                .search_image(&state.client, &admitted.image, &params)?;
            render(&state.engine, &view, None, None, r, started)
        })
        .await??;
        Ok(HttpResponse::Ok().json(out))
    } else if content_type(&req).starts_with("application/json") {
        let body = BodyDeadline::new(&state.settings)
            .within(payload.to_bytes_limited(64 * 1024))
            .await?
            .map_err(|_| ApiError::too_large("the JSON body is over 64 KiB"))?
            .map_err(|e| ApiError::bad_request(format!("cannot read the body: {e}")))?;
        let ById { similar_to: id } = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!("expected {{\"similar_to\": <image id>}}: {e}"))
        })?;
        let out = web::block(move || -> ApiResult<SearchOut> {
            let r = state
                .engine
                .search_similar(&state.client, ImageId(id), &params)?;
            render(&state.engine, &view, None, Some(id), r, started)
        })
        .await??;
        Ok(HttpResponse::Ok().json(out))
    } else {
        Err(ApiError::unsupported_media(
            "send multipart/form-data with an `image` file, or JSON {\"similar_to\": ...}",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::CaptionSource;

    fn cap(text: &str, kept: bool) -> Caption {
        Caption {
            text: text.into(),
            source: CaptionSource::Beam,
            p_match: None,
            kept,
        }
    }

    #[test]
    fn matched_caption_prefers_overlap_and_kept() {
        let caps = [
            cap("a cat on a sofa", true),
            cap("a dog on a beach", true),
            cap("a dog playing on the beach", false),
        ];
        assert_eq!(
            matched_caption(Some("dog beach"), &caps).as_deref(),
            Some("a dog on a beach")
        );
        assert_eq!(
            matched_caption(Some("rocket"), &caps).as_deref(),
            Some("a cat on a sofa")
        );
        assert_eq!(matched_caption(None, &[cap("x", false)]), None);
    }
}

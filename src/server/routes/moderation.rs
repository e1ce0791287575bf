//! Moderation: match lists and their entries, matches of the collection against them, the
//! review queue and the audit log. Every route here needs the key ([`Access::Moderate`]), and
//! what it changes is recorded with the key's id as the actor.
//!
//! [`Access::Moderate`]: crate::server::auth::Access::Moderate

use actix_multipart::Multipart;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{check_upload, is_multipart, read_field, BodyDeadline, Endpoint, ImageOut, PathView};
use crate::engine::{
    check_list_name, AuditEntry, ErrorKind, Flag, ImageId, ListEntry, ListInfo, MatchParams,
    MatchRule, MatchRules, ReferenceDecode, ReferenceImage, Silent, Skipped, Verdict,
};
use crate::server::auth::key_id;
use crate::server::error::{ApiError, ApiResult};
use crate::server::state::{ApiSettings, AppState};

/// Most reference images one request may carry.
const MAX_IMAGES: usize = 16;
/// Largest hash file, in bytes (about 50,000 hashes with short labels).
const MAX_HASH_FILE_BYTES: usize = 4 * 1024 * 1024;
/// Longest label, in characters.
const MAX_LABEL_CHARS: usize = 256;
/// Longest review note, in characters.
const MAX_NOTE_CHARS: usize = 2000;
/// Largest JSON body of these routes.
const MAX_JSON_BYTES: usize = 64 * 1024;
/// Most matches one answer lists.
const MAX_MATCHES: usize = 10_000;
/// Most review items or audit events one answer lists.
const MAX_PAGE: usize = 1000;
/// Largest `offset` of the review queue.
const MAX_OFFSET: usize = 1_000_000;

/// Registers the moderation routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    Endpoint::new("/api/lists")
        .get(all_lists)
        .post(create_list)
        .register(cfg);
    Endpoint::new("/api/lists/{name}")
        .get(show_list)
        .delete(delete_list)
        .register(cfg);
    Endpoint::new("/api/lists/{name}/entries")
        .post(add_entries)
        .register(cfg);
    Endpoint::new("/api/lists/{name}/entries/{entry}")
        .delete(remove_entry)
        .register(cfg);
    Endpoint::new("/api/matches").get(matches).register(cfg);
    Endpoint::new("/api/review").get(review).register(cfg);
    Endpoint::new("/api/review/{id}").post(decide).register(cfg);
    Endpoint::new("/api/audit").get(audit).register(cfg);
}

/// The actor of a moderation request: the id of the server's key, which the route's guard has
/// checked was presented.
fn actor(settings: &ApiSettings) -> ApiResult<String> {
    settings
        .api_key
        .as_deref()
        .map(key_id)
        .ok_or_else(|| ApiError::internal("a moderation route ran on a server without a key"))
}

/// A list name from the path, checked.
fn list_name(name: &str) -> ApiResult<String> {
    check_list_name(name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(name.to_string())
}

/// A list entry as the API shows it: its hashes in hex, not its vector.
#[derive(Debug, Serialize)]
pub struct EntryOut {
    id: u64,
    list: String,
    label: Option<String>,
    source: Option<String>,
    /// The plain PDQ hash, hex.
    pdq: Option<String>,
    /// The seven other dihedral variants of a reference image's hash, hex, in the PDQ
    /// reference's order (rotated 90, 180 and 270 degrees counter-clockwise, mirrored top-bottom,
    /// mirrored left-right, transposed, mirrored about the other diagonal): a reviewer sees the
    /// variant that matched.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pdq_variants: Vec<String>,
    /// Whether the entry matches the eight dihedral variants (a reference image) or its plain
    /// hash only (a hash file).
    dihedral: bool,
    quality: Option<u8>,
    /// Whether the entry has an ITC vector (a reference image), so the ITC rule applies.
    itc: bool,
    added_unix: i64,
}

impl From<&ListEntry> for EntryOut {
    fn from(e: &ListEntry) -> Self {
        Self {
            id: e.id,
            list: e.list.clone(),
            label: e.label.clone(),
            source: e.source.clone(),
            pdq: e.pdq.first().map(|h| h.to_hex()),
            pdq_variants: e.pdq.iter().skip(1).map(|h| h.to_hex()).collect(),
            dihedral: e.pdq.len() == 8,
            quality: e.quality,
            itc: e.itc.is_some(),
            added_unix: e.added_unix,
        }
    }
}

async fn all_lists(state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    let lists =
        web::block(move || -> ApiResult<Vec<ListInfo>> { Ok(state.engine.lists()?) }).await??;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "lists": lists })))
}

/// Reads a JSON body of at most [`MAX_JSON_BYTES`] into `T`, refusing unknown fields.
async fn json_body<T: serde::de::DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
    settings: &ApiSettings,
    shape: &str,
) -> ApiResult<T> {
    if !super::content_type(req).starts_with("application/json") {
        return Err(ApiError::unsupported_media(format!(
            "send application/json: {shape}"
        )));
    }
    let body = BodyDeadline::new(settings)
        .within(payload.to_bytes_limited(MAX_JSON_BYTES))
        .await?
        .map_err(|_| ApiError::too_large(format!("the JSON body is over {MAX_JSON_BYTES} bytes")))?
        .map_err(|e| ApiError::bad_request(format!("cannot read the body: {e}")))?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("expected {shape}: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewList {
    name: String,
    pdq_distance: Option<u32>,
    min_cosine: Option<f32>,
}

async fn create_list(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> ApiResult<HttpResponse> {
    let NewList {
        name,
        pdq_distance,
        min_cosine,
    } = json_body(
        &req,
        payload,
        &state.settings,
        "{\"name\": \"list-name\", \"pdq_distance\": 31, \"min_cosine\": 0.92}",
    )
    .await?;
    let name = list_name(&name)?;
    let defaults = MatchRules::default();
    let rules = MatchRules {
        pdq_distance: pdq_distance.unwrap_or(defaults.pdq_distance),
        min_cosine: min_cosine.unwrap_or(defaults.min_cosine),
    };
    rules
        .check()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let who = actor(&state.settings)?;
    // Creating a list that exists answers it as it is: a script may ensure its lists.
    let (created, info) = web::block(move || -> ApiResult<(bool, ListInfo)> {
        match state.engine.create_list(&name, rules, &who) {
            Ok(info) => Ok((true, info)),
            Err(e) if e.kind() == ErrorKind::Conflict => {
                let info = state.engine.lists()?.into_iter().find(|l| l.name == name);
                info.map(|i| (false, i)).ok_or_else(|| e.into())
            }
            Err(e) => Err(e.into()),
        }
    })
    .await??;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(HttpResponse::build(status).json(info))
}

#[derive(Serialize)]
struct ListOut {
    list: ListInfo,
    entries: Vec<EntryOut>,
}

async fn show_list(state: web::Data<AppState>, name: web::Path<String>) -> ApiResult<HttpResponse> {
    let name = list_name(&name)?;
    let out = web::block(move || -> ApiResult<ListOut> {
        let info = state
            .engine
            .lists()?
            .into_iter()
            .find(|l| l.name == name)
            .ok_or_else(|| ApiError::not_found(format!("no match list {name:?}")))?;
        let entries = state.engine.list_entries(&name)?;
        Ok(ListOut {
            list: info,
            entries: entries.iter().map(EntryOut::from).collect(),
        })
    })
    .await??;
    Ok(HttpResponse::Ok().json(out))
}

async fn delete_list(
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let name = list_name(&name)?;
    let who = actor(&state.settings)?;
    let info =
        web::block(move || -> ApiResult<ListInfo> { Ok(state.engine.delete_list(&name, &who)?) })
            .await??;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "deleted": info })))
}

/// What an entries upload carried.
#[derive(Default)]
struct EntriesForm {
    images: Vec<(Vec<u8>, Option<String>)>,
    label: Option<String>,
    hashes: Option<(String, Option<String>)>,
}

/// Reads `image` fields (at most [`MAX_IMAGES`]), one `label` and one `pdq` hash file within
/// `settings.body_timeout`; 400 for any other field.
async fn read_entries_form(
    req: &HttpRequest,
    payload: web::Payload,
    settings: &ApiSettings,
) -> ApiResult<EntriesForm> {
    const SHAPE: &str = "send multipart/form-data with `image` file fields (reference images), \
                         a `pdq` file field (hex PDQ hashes, one per line, optional label after \
                         a comma), or both, and an optional `label`";
    if !is_multipart(req) {
        return Err(ApiError::unsupported_media(SHAPE));
    }
    let deadline = BodyDeadline::new(settings);
    let mut form = Multipart::new(req.headers(), payload);
    let mut out = EntriesForm::default();
    while let Some(field) = deadline.within(form.next()).await? {
        let mut field =
            field.map_err(|e| ApiError::bad_request(format!("malformed multipart body: {e}")))?;
        let name = field.name().unwrap_or("").to_string();
        let limit = match name.as_str() {
            "image" if out.images.len() >= MAX_IMAGES => {
                return Err(ApiError::bad_request(format!(
                    "at most {MAX_IMAGES} `image` fields"
                )))
            }
            "image" => settings.max_upload_bytes,
            "label" if out.label.is_some() => {
                return Err(ApiError::bad_request("send one `label` field"))
            }
            "label" => 4 * MAX_LABEL_CHARS,
            "pdq" if out.hashes.is_some() => {
                return Err(ApiError::bad_request("send one `pdq` field"))
            }
            "pdq" => MAX_HASH_FILE_BYTES,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unexpected form field {name:?}: {SHAPE}"
                )))
            }
        };
        let file_name = field
            .content_disposition()
            .and_then(|cd| cd.get_filename())
            .map(str::to_string);
        let buf = read_field(&mut field, deadline, limit, || match name.as_str() {
            "image" => ApiError::too_large(format!(
                "an image is over the upload limit of {limit} bytes"
            )),
            "pdq" => ApiError::too_large(format!(
                "the hash file is over {MAX_HASH_FILE_BYTES} bytes: send it in parts"
            )),
            _ => ApiError::bad_request(format!("the label is over {MAX_LABEL_CHARS} characters")),
        })
        .await?;
        let text = |buf: Vec<u8>, what: &str| {
            String::from_utf8(buf)
                .map_err(|_| ApiError::bad_request(format!("{what} is not UTF-8")))
        };
        match name.as_str() {
            "image" => out.images.push((buf, file_name)),
            "label" => {
                // Trimmed by the engine, which also refuses control characters.
                let label = text(buf, "the label")?;
                if label.chars().count() > MAX_LABEL_CHARS {
                    return Err(ApiError::bad_request(format!(
                        "the label is over {MAX_LABEL_CHARS} characters"
                    )));
                }
                out.label = Some(label);
            }
            _ => out.hashes = Some((text(buf, "the hash file")?, file_name)),
        }
    }
    if out.images.is_empty() && out.hashes.is_none() {
        return Err(ApiError::bad_request(SHAPE));
    }
    Ok(out)
}

#[derive(Serialize)]
struct AddedOut {
    list: String,
    added: Vec<EntryOut>,
    skipped: Vec<Skipped>,
    /// Collection images the new entries flagged.
    flagged: usize,
}

async fn add_entries(
    state: web::Data<AppState>,
    name: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> ApiResult<HttpResponse> {
    let name = list_name(&name)?;
    let form = read_entries_form(&req, payload, &state.settings).await?;
    let who = actor(&state.settings)?;
    let out = web::block(move || -> ApiResult<AddedOut> {
        let engine = &state.engine;
        let mut out = AddedOut {
            list: name.clone(),
            added: Vec::new(),
            skipped: Vec::new(),
            flagged: 0,
        };
        if !form.images.is_empty() {
            let mut images = Vec::with_capacity(form.images.len());
            for (i, (bytes, file)) in form.images.into_iter().enumerate() {
                let name = file.unwrap_or_else(|| format!("image {}", i + 1));
                // The header alone: too big or not an image is refused before any decode.
                match check_upload(&bytes, &state.settings, 2) {
                    Ok(_) => images.push(ReferenceImage { name, bytes }),
                    Err(e) => out.skipped.push(Skipped {
                        source: name,
                        reason: e.message,
                    }),
                }
            }
            // Reference images share the decode budget with every other request.
            let decode = ReferenceDecode {
                limits: state.settings.limits,
                budget: state.settings.budget.clone(),
                wait: Some(state.settings.decode_wait),
            };
            let done = engine.add_list_images(
                &state.client,
                &name,
                images,
                form.label.as_deref(),
                &who,
                &decode,
                &Silent,
            )?;
            out.added.extend(done.added.iter().map(EntryOut::from));
            out.skipped.extend(done.skipped);
            out.flagged += done.flagged;
        }
        if let Some((text, file)) = form.hashes {
            let done = engine.add_list_hashes(&name, &text, file.as_deref(), &who)?;
            out.added.extend(done.added.iter().map(EntryOut::from));
            out.skipped.extend(done.skipped);
            out.flagged += done.flagged;
        }
        Ok(out)
    })
    .await??;
    Ok(HttpResponse::Ok().json(out))
}

async fn remove_entry(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> ApiResult<HttpResponse> {
    let (name, entry) = path.into_inner();
    let name = list_name(&name)?;
    let entry: u64 = entry
        .parse()
        .map_err(|_| ApiError::bad_request(format!("entry {entry:?} is not an entry id")))?;
    let who = actor(&state.settings)?;
    let removed = web::block(move || -> ApiResult<ListEntry> {
        Ok(state.engine.remove_list_entry(&name, entry, &who)?)
    })
    .await??;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "removed": EntryOut::from(&removed) })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchQuery {
    list: Option<String>,
    pdq_distance: Option<u32>,
    min_cosine: Option<f32>,
    limit: Option<usize>,
    #[serde(rename = "api_key")]
    _api_key: Option<serde::de::IgnoredAny>,
}

#[derive(Serialize)]
struct MatchOut {
    id: u64,
    path: String,
    list: String,
    entry: u64,
    label: Option<String>,
    rule: MatchRule,
    pdq_distance: Option<u32>,
    cosine: Option<f32>,
}

/// A query string read into `T`, with a 400 naming what is wrong.
fn query<T: serde::de::DeserializeOwned>(req: &HttpRequest) -> ApiResult<T> {
    web::Query::<T>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

async fn matches(
    state: web::Data<AppState>,
    req: HttpRequest,
    view: PathView,
) -> ApiResult<HttpResponse> {
    let q: MatchQuery = query(&req)?;
    let list = q.list.as_deref().map(list_name).transpose()?;
    let pdq_distance = q.pdq_distance;
    if pdq_distance.is_some_and(|d| d > 128) {
        return Err(ApiError::bad_request(
            "pdq_distance must be between 0 and 128",
        ));
    }
    let min_cosine = q.min_cosine;
    if min_cosine.is_some_and(|c| !(-1.0..=1.0).contains(&c)) {
        return Err(ApiError::bad_request("min_cosine must be between -1 and 1"));
    }
    let limit = q.limit.unwrap_or(1000);
    if !(1..=MAX_MATCHES).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_MATCHES}"
        )));
    }
    let params = MatchParams {
        list,
        pdq_distance,
        min_cosine,
    };
    let out = web::block(move || -> ApiResult<serde_json::Value> {
        let all = state.engine.matches(&params)?;
        let total = all.len();
        let matches: Vec<MatchOut> = all
            .into_iter()
            .take(limit)
            .map(|m| MatchOut {
                id: m.id.0,
                path: view.show(&m.path),
                list: m.list,
                entry: m.entry,
                label: m.label,
                rule: m.rule,
                pdq_distance: m.pdq_distance,
                cosine: m.cosine,
            })
            .collect();
        Ok(serde_json::json!({ "total": total, "matches": matches }))
    })
    .await??;
    Ok(HttpResponse::Ok().json(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewQuery {
    list: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
    #[serde(rename = "api_key")]
    _api_key: Option<serde::de::IgnoredAny>,
}

#[derive(Serialize)]
struct ReviewItemOut {
    image: ImageOut,
    /// The flags waiting for a decision.
    pending: Vec<Flag>,
    /// The list entries they name.
    entries: Vec<EntryOut>,
}

async fn review(
    state: web::Data<AppState>,
    req: HttpRequest,
    view: PathView,
) -> ApiResult<HttpResponse> {
    let q: ReviewQuery = query(&req)?;
    let list = q.list.as_deref().map(list_name).transpose()?;
    let offset = q.offset.unwrap_or(0);
    let limit = q.limit.unwrap_or(20);
    if offset > MAX_OFFSET {
        return Err(ApiError::bad_request(format!(
            "offset must be between 0 and {MAX_OFFSET}"
        )));
    }
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let out = web::block(move || -> ApiResult<serde_json::Value> {
        let page = state.engine.review_queue(list.as_deref(), offset, limit)?;
        let items: Vec<ReviewItemOut> = page
            .items
            .into_iter()
            .map(|i| ReviewItemOut {
                image: ImageOut::new(i.record, &view),
                pending: i.flags,
                entries: i.entries.iter().map(EntryOut::from).collect(),
            })
            .collect();
        Ok(serde_json::json!({ "total": page.total, "items": items }))
    })
    .await??;
    Ok(HttpResponse::Ok().json(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionIn {
    decision: Verdict,
    #[serde(default)]
    note: String,
}

async fn decide(
    state: web::Data<AppState>,
    id: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
    view: PathView,
) -> ApiResult<HttpResponse> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("{:?} is not an image id", id.as_str())))?;
    let DecisionIn { decision, note } = json_body(
        &req,
        payload,
        &state.settings,
        "{\"decision\": \"confirmed\" | \"cleared\", \"note\": \"...\"}",
    )
    .await?;
    if note.chars().count() > MAX_NOTE_CHARS {
        return Err(ApiError::bad_request(format!(
            "the note is over {MAX_NOTE_CHARS} characters"
        )));
    }
    let who = actor(&state.settings)?;
    let image = web::block(move || -> ApiResult<ImageOut> {
        let record = state
            .engine
            .decide(ImageId(id), decision, note.trim(), &who)?;
        Ok(ImageOut::new(record, &view))
    })
    .await??;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "image": image })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    after: Option<u64>,
    limit: Option<usize>,
    #[serde(rename = "api_key")]
    _api_key: Option<serde::de::IgnoredAny>,
}

async fn audit(state: web::Data<AppState>, req: HttpRequest) -> ApiResult<HttpResponse> {
    let q: AuditQuery = query(&req)?;
    let after = q.after.unwrap_or(0);
    if after > i64::MAX as u64 {
        return Err(ApiError::bad_request(format!(
            "after must be between 0 and {}",
            i64::MAX
        )));
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let entries =
        web::block(move || -> ApiResult<Vec<AuditEntry>> { Ok(state.engine.audit(after, limit)?) })
            .await??;
    let next = entries.last().map_or(after, |e| e.seq);
    Ok(HttpResponse::build(StatusCode::OK)
        .json(serde_json::json!({ "entries": entries, "next_after": next })))
}

//! The HTTP routes, one file per area; each exposes `configure(cfg)` (qdrant's shape). Shared
//! here: the JSON shapes of images and hits, and reading uploads.

pub mod images;
pub mod moderation;
pub mod products;
pub mod search;
pub mod system;
pub mod ui;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use actix_multipart::Multipart;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, Condition};
use actix_web::{
    guard, web, FromRequest, Handler, HttpMessage, HttpRequest, Resource, Responder, ResponseError,
    Route,
};
use futures_util::StreamExt;
use serde::Serialize;

use super::auth::{self, Access, KeyPresented};
use super::error::{ApiError, ApiResult};
use super::state::{ApiSettings, AppState};
use crate::engine::models::{decode_admitted, decode_cost, Admitted};
use crate::engine::{Caption, EngineError, Flag, ImageRecord};

/// Every route as (method, pattern, who may call it): what the server registers (see
/// [`Endpoint`]) and what the OpenAPI document must describe. `get` routes answer HEAD too.
pub const ROUTES: &[(&str, &str, Access)] = &[
    ("get", "/api/search", Access::Read),
    // Searching by an uploaded image is a read that happens to need a body.
    ("post", "/api/search/image", Access::Read),
    ("get", "/api/images/{id}", Access::Read),
    ("get", "/api/images/{id}/thumbnail", Access::Read),
    ("get", "/api/images/{id}/file", Access::Read),
    ("post", "/api/images", Access::Write),
    ("delete", "/api/images/{id}", Access::Write),
    ("post", "/api/products", Access::Write),
    ("delete", "/api/products/{product}", Access::Write),
    // Captioning changes nothing but spends model time for the caller.
    ("post", "/api/caption", Access::Write),
    // Moderation always needs the key: every action is recorded with who took it.
    ("get", "/api/lists", Access::Moderate),
    ("post", "/api/lists", Access::Moderate),
    ("get", "/api/lists/{name}", Access::Moderate),
    ("delete", "/api/lists/{name}", Access::Moderate),
    ("post", "/api/lists/{name}/entries", Access::Moderate),
    (
        "delete",
        "/api/lists/{name}/entries/{entry}",
        Access::Moderate,
    ),
    ("get", "/api/matches", Access::Moderate),
    ("get", "/api/review", Access::Moderate),
    ("post", "/api/review/{id}", Access::Moderate),
    ("get", "/api/audit", Access::Moderate),
    ("get", "/api/status", Access::Read),
    ("get", "/api/openapi.json", Access::Open),
    ("get", "/healthz", Access::Open),
    ("get", "/readyz", Access::Open),
    ("get", "/metrics", Access::Read),
    ("get", "/", Access::Open),
    ("get", "/assets/{file}", Access::Open),
];

/// API routes whose handlers read and check their own query parameters (refusing unknown ones);
/// every other API route takes none but `api_key`.
const OWN_QUERY: &[&str] = &[
    "/api/search",
    "/api/search/image",
    "/api/matches",
    "/api/review",
    "/api/audit",
];

/// Refuses query parameters on a route that takes none (`api_key` aside, which `auth` reads), as
/// unknown JSON fields are refused: a misspelt option is never silently ignored.
async fn no_query(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<
    actix_web::dev::ServiceResponse<actix_web::body::EitherBody<impl actix_web::body::MessageBody>>,
    actix_web::Error,
> {
    let pairs = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .unwrap_or_else(|_| vec![(req.query_string().to_string(), String::new())]);
    let unknown: Vec<String> = pairs
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k != "api_key")
        .collect();
    if !unknown.is_empty() {
        let err = ApiError::bad_request(format!(
            "unknown query parameter {}: this endpoint takes none",
            unknown.join(", ")
        ));
        return Ok(req.error_response(err).map_into_right_body());
    }
    Ok(next.call(req).await?.map_into_left_body())
}

/// Who may call `method pattern`, from [`ROUTES`]; a route missing there needs the key.
fn access_of(method: &str, pattern: &str) -> Access {
    ROUTES
        .iter()
        .find(|(m, p, _)| *m == method && *p == pattern)
        .map_or(Access::Write, |r| r.2)
}

/// One path and its methods, each guarded by the key check at its [`Access`] level (from
/// [`ROUTES`]); GET routes answer HEAD too, and any other method answers 405 with `Allow`.
pub struct Endpoint {
    pattern: &'static str,
    resource: Resource,
    allow: Vec<&'static str>,
}

impl Endpoint {
    /// An endpoint at `pattern`, with no methods yet.
    pub fn new(pattern: &'static str) -> Self {
        Self {
            pattern,
            resource: web::resource(pattern),
            allow: Vec::new(),
        }
    }

    fn route<F, Args>(mut self, method: &'static str, route: Route, handler: F) -> Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        let access = access_of(&method.to_ascii_lowercase(), self.pattern);
        self.allow.push(method);
        let checks_query = self.pattern.starts_with("/api/") && !OWN_QUERY.contains(&self.pattern);
        self.resource = self.resource.route(
            route
                .to(handler)
                .wrap(Condition::new(checks_query, from_fn(no_query)))
                .wrap(auth::guard(access)),
        );
        self
    }

    /// GET (and HEAD) answered by `handler`.
    pub fn get<F, Args>(mut self, handler: F) -> Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        let route = Route::new().guard(guard::Any(guard::Get()).or(guard::Head()));
        self = self.route("GET", route, handler);
        self.allow.push("HEAD");
        self
    }

    /// POST answered by `handler`.
    pub fn post<F, Args>(self, handler: F) -> Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.route("POST", web::post(), handler)
    }

    /// DELETE answered by `handler`.
    pub fn delete<F, Args>(self, handler: F) -> Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.route("DELETE", web::delete(), handler)
    }

    /// Adds the endpoint to the app.
    pub fn register(self, cfg: &mut web::ServiceConfig) {
        let allow = self.allow.join(", ");
        cfg.service(
            self.resource
                .default_service(web::to(move |req: HttpRequest| {
                    let allow = allow.clone();
                    async move {
                        let mut res = ApiError::new(
                            StatusCode::METHOD_NOT_ALLOWED,
                            "method_not_allowed",
                            format!("{} is not allowed here; use {allow}", req.method()),
                        )
                        .error_response();
                        if let Ok(v) = HeaderValue::from_str(&allow) {
                            res.headers_mut().insert(header::ALLOW, v);
                        }
                        res
                    }
                })),
        );
    }
}

/// An image as the API shows it.
#[derive(Debug, Serialize)]
pub struct ImageOut {
    id: u64,
    path: String,
    #[serde(flatten)]
    file: FileOut,
    size_bytes: u64,
    mtime_unix: i64,
    exif_date: Option<String>,
    added_unix: i64,
    content_hash: String,
    captions: Vec<Caption>,
    given_texts: Vec<String>,
    /// Match-list flags, shown to whoever may see whole paths (the key holder, or anyone on a
    /// server without a key).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    flags: Vec<Flag>,
    /// The PDQ hash, hex, to the same callers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pdq: Option<String>,
}

/// What every answer about an image shows beside its id and path: where the file lies, its size
/// in pixels, and the URLs of its thumbnail and file.
#[derive(Debug, Serialize)]
pub struct FileOut {
    file_name: String,
    folder: String,
    width: u32,
    height: u32,
    thumbnail_url: String,
    file_url: String,
}

impl FileOut {
    /// The file of image `id`, whose path the caller sees as `shown_path`.
    pub fn new(id: u64, shown_path: &str, width: u32, height: u32) -> Self {
        let p = Path::new(shown_path);
        Self {
            file_name: p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            folder: p
                .parent()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            width,
            height,
            thumbnail_url: format!("/api/images/{id}/thumbnail"),
            file_url: format!("/api/images/{id}/file"),
        }
    }
}

/// How paths appear to a caller: whole to whoever presented the key (and to everyone when the
/// server has no key, since anyone may then write), otherwise starting from the name of the
/// root folder they lie in (a watched folder, or the upload folder), so that the server's
/// file-system layout stays private. A path under no root shows as its file name.
#[derive(Debug, Clone)]
pub struct PathView {
    full: bool,
    roots: Vec<PathBuf>,
}

impl PathView {
    /// The view for a caller who presented the key (`full`) or not.
    pub fn new(state: &AppState, full: bool) -> Self {
        let mut roots = state.settings.folders.clone();
        roots.push(state.engine.uploads_dir().to_path_buf());
        Self {
            full: full || state.settings.api_key.is_none(),
            roots,
        }
    }

    /// Whether this caller sees whole paths, and with them moderation flags.
    pub fn full(&self) -> bool {
        self.full
    }

    fn root_of(&self, path: &Path) -> Option<&PathBuf> {
        self.roots.iter().find(|r| path.starts_with(r))
    }

    /// `path` as this caller sees it.
    pub fn show(&self, path: &str) -> String {
        if self.full {
            return path.to_string();
        }
        let p = Path::new(path);
        match self.root_of(p) {
            Some(root) => {
                let name = root
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default();
                match p.strip_prefix(root) {
                    Ok(rest) if !rest.as_os_str().is_empty() => {
                        Path::new(name.as_ref()).join(rest).display().to_string()
                    }
                    _ => name.into_owned(),
                }
            }
            None => p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// A folder as a caller wrote it (whole, or from a root's name as [`Self::show`] writes
    /// it) as the collection stores it.
    pub fn resolve(&self, shown: &str) -> String {
        let p = Path::new(shown);
        if p.is_absolute() {
            return shown.to_string();
        }
        let mut parts = p.components();
        let first = parts.next().map(|c| c.as_os_str().to_owned());
        match first.and_then(|f| self.roots.iter().find(|r| r.file_name() == Some(&f))) {
            Some(root) => root.join(parts.as_path()).display().to_string(),
            None => shown.to_string(),
        }
    }
}

impl FromRequest for PathView {
    type Error = actix_web::Error;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let full = req.extensions().get::<KeyPresented>().is_some_and(|k| k.0);
        std::future::ready(match req.app_data::<web::Data<AppState>>() {
            Some(state) => Ok(Self::new(state, full)),
            None => Err(ApiError::internal("the app state is missing").into()),
        })
    }
}

impl ImageOut {
    /// `r` as the caller of `view` sees it.
    pub fn new(r: ImageRecord, view: &PathView) -> Self {
        let path = view.show(&r.path);
        let id = r.id.0;
        Self {
            file: FileOut::new(id, &path, r.width, r.height),
            id,
            path,
            size_bytes: r.size_bytes,
            mtime_unix: r.mtime_unix,
            exif_date: r.exif_date,
            added_unix: r.added_unix,
            content_hash: r.content_hash,
            captions: r.captions,
            given_texts: r.given_texts,
            flags: if view.full { r.flags } else { Vec::new() },
            pdq: r.pdq.filter(|_| view.full).map(|p| p.hash.to_hex()),
        }
    }
}

/// What a multipart upload carried.
#[derive(Default)]
pub struct Upload {
    /// The `image` field's bytes.
    pub image: Option<Vec<u8>>,
    /// The file name the client gave the image, if any.
    pub file_name: Option<String>,
    /// The `text` fields.
    pub texts: Vec<String>,
}

/// The time left to read a request body, whole: a stalled or trickling body is answered 408
/// and its connection closed.
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline {
    at: Instant,
    limit: Duration,
}

impl BodyDeadline {
    /// From now, `settings.body_timeout`.
    pub fn new(settings: &ApiSettings) -> Self {
        Self {
            at: Instant::now() + settings.body_timeout,
            limit: settings.body_timeout,
        }
    }

    /// Awaits `next` (a part of the body) until the deadline; past it, 408.
    pub async fn within<T>(self, next: impl std::future::Future<Output = T>) -> ApiResult<T> {
        actix_web::rt::time::timeout(self.at.saturating_duration_since(Instant::now()), next)
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!(
                        "the request body did not arrive within {:.0} s",
                        self.limit.as_secs_f64()
                    ),
                )
            })
    }
}

/// Longest `text` field, in characters (what the OpenAPI document's `maxLength` counts).
const MAX_TEXT_CHARS: usize = 4096;
/// Most bytes read of a `text` field: enough for [`MAX_TEXT_CHARS`] of any UTF-8.
const MAX_TEXT_BYTES: usize = 4 * MAX_TEXT_CHARS;
/// Most `text` fields, empty ones included.
const MAX_TEXTS: usize = 16;

/// Whether the request body is `multipart/form-data`.
pub fn is_multipart(req: &HttpRequest) -> bool {
    content_type(req).starts_with("multipart/form-data")
}

/// The request's media type, lowercased.
pub fn content_type(req: &HttpRequest) -> String {
    req.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Reads a multipart upload: one `image` file (at most `settings.max_upload_bytes`) and
/// optional `text` fields, within `settings.body_timeout`; 400 for any other field, a text over
/// `MAX_TEXT_CHARS` (4096) characters or more than `MAX_TEXTS` (16) texts.
pub async fn read_upload(
    req: &HttpRequest,
    payload: web::Payload,
    settings: &ApiSettings,
) -> ApiResult<Upload> {
    let max_bytes = settings.max_upload_bytes;
    if !is_multipart(req) {
        return Err(ApiError::unsupported_media(
            "send multipart/form-data with an `image` file field",
        ));
    }
    let deadline = BodyDeadline::new(settings);
    let mut form = Multipart::new(req.headers(), payload);
    let mut out = Upload::default();
    let mut texts = 0;
    while let Some(field) = deadline.within(form.next()).await? {
        let mut field =
            field.map_err(|e| ApiError::bad_request(format!("malformed multipart body: {e}")))?;
        let name = field.name().unwrap_or("").to_string();
        if name != "image" && name != "text" {
            return Err(ApiError::bad_request(format!(
                "unexpected form field {name:?}: send `image` and optional `text`"
            )));
        }
        if name == "image" {
            out.file_name = field
                .content_disposition()
                .and_then(|cd| cd.get_filename())
                .map(str::to_string);
        }
        let limit = if name == "image" {
            max_bytes
        } else {
            MAX_TEXT_BYTES
        };
        let buf = read_field(&mut field, deadline, limit, || {
            if name == "image" {
                ApiError::too_large(format!(
                    "the image is over the upload limit of {max_bytes} bytes"
                ))
            } else {
                ApiError::bad_request(format!("a text field is over {MAX_TEXT_CHARS} characters"))
            }
        })
        .await?;
        match name.as_str() {
            "image" => {
                if out.image.is_some() {
                    return Err(ApiError::bad_request("send one `image` field"));
                }
                out.image = Some(buf);
            }
            "text" => {
                let t = String::from_utf8(buf)
                    .map_err(|_| ApiError::bad_request("a text field is not UTF-8"))?;
                if t.chars().count() > MAX_TEXT_CHARS {
                    return Err(ApiError::bad_request(format!(
                        "a text field is over {MAX_TEXT_CHARS} characters"
                    )));
                }
                texts += 1;
                if texts > MAX_TEXTS {
                    return Err(ApiError::bad_request(format!(
                        "at most {MAX_TEXTS} text fields"
                    )));
                }
                let t = t.trim().to_string();
                if !t.is_empty() {
                    out.texts.push(t);
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Reads one multipart field whole, within `deadline`: 400 for a malformed body, and
/// `over_limit` as soon as it passes `limit` bytes (nothing more is read).
pub async fn read_field(
    field: &mut actix_multipart::Field,
    deadline: BodyDeadline,
    limit: usize,
    over_limit: impl Fn() -> ApiError,
) -> ApiResult<Vec<u8>> {
    let mut buf = Vec::new();
    while let Some(chunk) = deadline.within(field.next()).await? {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("malformed multipart body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(over_limit());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// Checks uploaded image bytes from their header alone, before anything is decoded: 415 for
/// what is not an image format we read, 413 over the pixel limit or for an image that needs
/// more memory to decode than the whole decode budget (counting `copies` of it kept), 422 for
/// a header that does not parse. Returns the format's file extension.
pub fn check_upload(bytes: &[u8], settings: &ApiSettings, copies: u64) -> ApiResult<&'static str> {
    if bytes.is_empty() {
        return Err(ApiError::unprocessable(
            "invalid_image",
            "the image is empty",
        ));
    }
    let format = image::guess_format(bytes).map_err(|_| {
        ApiError::unsupported_media(
            "not an image format blipsearch reads (JPEG, PNG, WebP, GIF, BMP, TIFF)",
        )
    })?;
    let ext = format.extensions_str().first().copied().unwrap_or("img");
    let cost = decode_cost(bytes, Path::new("<upload>"), settings.limits, copies)
        .map_err(|e| ApiError::from(EngineError::Model(e)))?;
    if cost > settings.budget.capacity() {
        return Err(ApiError::too_large(format!(
            "decoding this image needs {} MiB, over the server's decode memory budget of {} MiB",
            cost.div_ceil(1 << 20),
            settings.budget.capacity() >> 20
        )));
    }
    Ok(ext)
}

/// [`check_upload`], then decodes under the decode budget (429 when it stays taken for
/// `decode_wait`). The image holds its share of the budget for as long as it lives.
pub fn decode_upload(bytes: &[u8], settings: &ApiSettings, copies: u64) -> ApiResult<Admitted> {
    check_upload(bytes, settings, copies)?;
    decode_admitted(
        bytes,
        Path::new("<upload>"),
        settings.limits,
        &settings.budget,
        Some(settings.decode_wait),
        copies,
    )
    .map_err(|e| EngineError::Model(e).into())
}

/// Parses a path id.
pub fn parse_id(raw: &str) -> ApiResult<u64> {
    raw.parse::<u64>()
        .map_err(|_| ApiError::bad_request(format!("{raw:?} is not an image id")))
}

/// A safe file-name stem from a client's file name: letters, digits, `-` and `_` only (others
/// become `_`), at most 60 characters, no extension; `None` when nothing is left.
pub fn safe_stem(name: &str) -> Option<String> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let stem = base.rsplit_once('.').map_or(base, |(s, _)| s);
    let clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(60)
        .collect();
    let clean = clean.trim_matches('_').to_string();
    (!clean.is_empty()).then_some(clean)
}

/// Who an API request's changes are audited as: the id of the server's key (which a write
/// presented), or `api` on a server without a key.
pub(crate) fn api_actor(settings: &crate::server::state::ApiSettings) -> String {
    settings
        .api_key
        .as_deref()
        .map_or_else(|| "api".to_string(), crate::server::auth::key_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_stem_keeps_only_harmless_characters() {
        assert_eq!(
            safe_stem("Holiday 2024.JPG").as_deref(),
            Some("Holiday_2024")
        );
        assert_eq!(safe_stem("../../etc/passwd").as_deref(), Some("passwd"));
        assert_eq!(safe_stem("C:\\x\\été.png").as_deref(), Some("t"));
        assert_eq!(safe_stem("....png"), None);
        assert_eq!(safe_stem(""), None);
        assert_eq!(safe_stem(&"a".repeat(100)).unwrap().len(), 60);
    }
}

//! The HTTP routes, one file per area; each exposes `configure(cfg)` (qdrant's shape). Shared
//! here: the JSON shapes of images and hits, and reading uploads.

pub mod images;
pub mod search;
pub mod system;
pub mod ui;

use std::io::Cursor;
use std::path::Path;

use actix_multipart::Multipart;
use actix_web::{web, HttpRequest};
use futures_util::StreamExt;
use image::DynamicImage;
use serde::Serialize;

use super::error::{ApiError, ApiResult};
use crate::index::{Caption, ImageRecord};
use crate::model::preprocess::{decode_image, DecodeLimits};

/// Every route as (method, pattern): what the OpenAPI document must describe.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/api/search"),
    ("post", "/api/search/image"),
    ("get", "/api/images/{id}"),
    ("get", "/api/images/{id}/thumbnail"),
    ("get", "/api/images/{id}/file"),
    ("post", "/api/images"),
    ("delete", "/api/images/{id}"),
    ("post", "/api/caption"),
    ("get", "/api/status"),
    ("get", "/api/openapi.json"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
];

/// An image as the API shows it.
#[derive(Debug, Serialize)]
pub struct ImageOut {
    id: u64,
    path: String,
    file_name: String,
    folder: String,
    width: u32,
    height: u32,
    size_bytes: u64,
    mtime_unix: i64,
    exif_date: Option<String>,
    added_unix: i64,
    content_hash: String,
    captions: Vec<Caption>,
    given_texts: Vec<String>,
    thumbnail_url: String,
    file_url: String,
}

fn split_path(path: &str) -> (String, String) {
    let p = Path::new(path);
    (
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        p.parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
    )
}

impl From<ImageRecord> for ImageOut {
    fn from(r: ImageRecord) -> Self {
        let (file_name, folder) = split_path(&r.path);
        let id = r.id.0;
        Self {
            id,
            path: r.path,
            file_name,
            folder,
            width: r.width,
            height: r.height,
            size_bytes: r.size_bytes,
            mtime_unix: r.mtime_unix,
            exif_date: r.exif_date,
            added_unix: r.added_unix,
            content_hash: r.content_hash,
            captions: r.captions,
            given_texts: r.given_texts,
            thumbnail_url: format!("/api/images/{id}/thumbnail"),
            file_url: format!("/api/images/{id}/file"),
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

/// Reads a multipart upload: one `image` file (at most `max_bytes`) and optional `text` fields
/// (400 for any other field, a text over [`MAX_TEXT_CHARS`] or more than [`MAX_TEXTS`] texts).
pub async fn read_upload(
    req: &HttpRequest,
    payload: web::Payload,
    max_bytes: usize,
) -> ApiResult<Upload> {
    if !is_multipart(req) {
        return Err(ApiError::unsupported_media(
            "send multipart/form-data with an `image` file field",
        ));
    }
    let mut form = Multipart::new(req.headers(), payload);
    let mut out = Upload::default();
    let mut texts = 0;
    while let Some(field) = form.next().await {
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
        let mut buf = Vec::new();
        while let Some(chunk) = field.next().await {
            let chunk = chunk
                .map_err(|e| ApiError::bad_request(format!("malformed multipart body: {e}")))?;
            if buf.len() + chunk.len() > limit {
                return Err(if name == "image" {
                    ApiError::too_large(format!(
                        "the image is over the upload limit of {max_bytes} bytes"
                    ))
                } else {
                    ApiError::bad_request(format!(
                        "a text field is over {MAX_TEXT_CHARS} characters"
                    ))
                });
            }
            buf.extend_from_slice(&chunk);
        }
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

/// Checks and decodes uploaded image bytes: 415 for what is not an image format we read, 413
/// over the pixel limit (before decoding), 422 for a file that does not decode.
pub fn decode_upload(
    bytes: &[u8],
    limits: DecodeLimits,
) -> ApiResult<(DynamicImage, &'static str)> {
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
    let dims = image::ImageReader::with_format(Cursor::new(bytes), format).into_dimensions();
    if let Ok((w, h)) = dims {
        let pixels = u64::from(w) * u64::from(h);
        if pixels > limits.max_pixels {
            return Err(ApiError::too_large(format!(
                "{w}x{h} is {:.1} megapixels, over the limit of {:.1}",
                pixels as f64 / 1e6,
                limits.max_pixels as f64 / 1e6
            )));
        }
    }
    let image = decode_image(bytes, Path::new("<upload>"), limits).map_err(|e| match e {
        crate::model::ModelError::Image { reason, .. } => {
            ApiError::unprocessable("invalid_image", format!("cannot use the image: {reason}"))
        }
        other => ApiError::internal(other),
    })?;
    Ok((image, ext))
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

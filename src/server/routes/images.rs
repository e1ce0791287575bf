//! Images: metadata, thumbnail and file (served by id only, never by a path from the request),
//! upload (CapFilt captions, indexed at once), delete, and captioning without indexing.

use std::collections::HashMap;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;

use super::{decode_upload, parse_id, read_upload, safe_stem, ImageOut};
use crate::engine::ingest::caption_of;
use crate::engine::{Encoders, IngestOptions, Ingestor};
use crate::index::{content_hash, Caption, ImageId, IndexError};
use crate::server::error::{ApiError, ApiResult};
use crate::server::state::AppState;

/// Registers the image routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/images", web::post().to(upload))
        .route("/api/images/{id}", web::get().to(get_image))
        .route("/api/images/{id}", web::delete().to(delete_image))
        .route("/api/images/{id}/thumbnail", web::get().to(thumbnail))
        .route("/api/images/{id}/file", web::get().to(file))
        .route("/api/caption", web::post().to(caption));
}

async fn get_image(state: web::Data<AppState>, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = parse_id(&id)?;
    let rec = web::block(move || -> ApiResult<_> { Ok(state.read()?.get(ImageId(id))?) })
        .await??
        .ok_or_else(|| ApiError::not_found(format!("no image with id {id}")))?;
    Ok(HttpResponse::Ok().json(ImageOut::from(rec)))
}

async fn thumbnail(state: web::Data<AppState>, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = parse_id(&id)?;
    let bytes = web::block(move || -> ApiResult<Vec<u8>> {
        let c = state.read()?;
        if c.get(ImageId(id))?.is_none() {
            return Err(ApiError::not_found(format!("no image with id {id}")));
        }
        match c.thumbnail(ImageId(id)) {
            Ok(b) => Ok(b),
            Err(IndexError::NotFound(_)) => {
                Err(ApiError::not_found(format!("image {id} has no thumbnail")))
            }
            Err(e) => Err(e.into()),
        }
    })
    .await??;
    Ok(HttpResponse::Ok()
        .content_type("image/jpeg")
        .insert_header(("Cache-Control", "private, max-age=3600"))
        .body(bytes))
}

async fn file(state: web::Data<AppState>, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = parse_id(&id)?;
    let (path, bytes) = web::block(move || -> ApiResult<_> {
        let rec = state
            .read()?
            .get(ImageId(id))?
            .ok_or_else(|| ApiError::not_found(format!("no image with id {id}")))?;
        // The path comes from the collection, which only holds what was indexed.
        let bytes = std::fs::read(&rec.path).map_err(|e| {
            ApiError::not_found(format!("the file of image {id} cannot be read: {e}"))
        })?;
        Ok((rec.path, bytes))
    })
    .await??;
    let mime = mime_guess::from_path(&path).first_or_octet_stream();
    Ok(HttpResponse::Ok()
        .content_type(mime.essence_str())
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .body(bytes))
}

#[derive(Serialize)]
struct UploadOut {
    id: u64,
    duplicate: bool,
    captions: Vec<Caption>,
    image: ImageOut,
}

async fn upload(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> ApiResult<HttpResponse> {
    let form = read_upload(&req, payload, state.settings.max_upload_bytes).await?;
    let bytes = form
        .image
        .ok_or_else(|| ApiError::bad_request("missing the `image` file field"))?;
    let texts = form.texts;
    let stem = form.file_name.as_deref().and_then(safe_stem);
    let (status, out) = web::block(move || -> ApiResult<(StatusCode, UploadOut)> {
        let (_, ext) = decode_upload(&bytes, state.settings.limits)?;
        let hash = content_hash(&bytes);
        // One guard at a time: a second read lock on this thread could deadlock behind a
        // waiting writer.
        let existing = state.read()?.by_hash(&hash)?;
        if let Some(id) = existing {
            let rec = state
                .read()?
                .get(id)?
                .ok_or_else(|| ApiError::internal("hash points to a missing record"))?;
            let out = UploadOut {
                id: id.0,
                duplicate: true,
                captions: rec.captions.clone(),
                image: rec.into(),
            };
            return Ok((StatusCode::OK, out));
        }
        let dir = &state.settings.uploads_dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
        // Named by content (unique) and by what the user called it (readable).
        let name = match &stem {
            Some(stem) => format!("{}-{stem}.{ext}", &hash[..12]),
            None => format!("{}.{ext}", &hash[..32]),
        };
        let path = dir.join(name);
        std::fs::write(&path, &bytes)
            .map_err(|e| ApiError::internal(format!("writing {}: {e}", path.display())))?;
        let canonical = std::fs::canonicalize(&path)
            .map_err(|e| ApiError::internal(format!("{}: {e}", path.display())))?;
        let options = IngestOptions {
            batch_size: 1,
            commit_every: 1,
            limits: state.settings.limits,
            capfilt: state.settings.capfilt.clone(),
            progress: false,
            observer: None,
        };
        let given = HashMap::from([(canonical.display().to_string(), texts)]);
        let summary = Ingestor::new(&state.collection, &state.client, options)?
            .with_given_texts(given)
            .add(std::slice::from_ref(&canonical));
        let summary = match summary {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&canonical);
                return Err(e.into());
            }
        };
        if let Some(f) = summary.failed.first() {
            let _ = std::fs::remove_file(&canonical);
            return Err(ApiError::unprocessable("invalid_image", f.reason.clone()));
        }
        let c = state.read()?;
        let id = c
            .by_path(&canonical.display().to_string())?
            .ok_or_else(|| ApiError::internal("the uploaded image was not indexed"))?;
        let rec = c
            .get(id)?
            .ok_or_else(|| ApiError::internal("the uploaded image has no record"))?;
        let duplicate = summary.added == 0;
        Ok((
            if duplicate {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            },
            UploadOut {
                id: id.0,
                duplicate,
                captions: rec.captions.clone(),
                image: rec.into(),
            },
        ))
    })
    .await??;
    Ok(HttpResponse::build(status).json(out))
}

async fn delete_image(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = parse_id(&id)?;
    web::block(move || -> ApiResult<()> {
        let mut c = state.write()?;
        let rec = c
            .get(ImageId(id))?
            .ok_or_else(|| ApiError::not_found(format!("no image with id {id}")))?;
        c.remove(ImageId(id))?;
        c.commit()?;
        drop(c);
        // Uploaded files are ours to delete; files in the user's folders never are.
        let p = std::path::Path::new(&rec.path);
        if let Ok(dir) = std::fs::canonicalize(&state.settings.uploads_dir) {
            if p.starts_with(&dir) {
                let _ = std::fs::remove_file(p);
            }
        }
        Ok(())
    })
    .await??;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "deleted": id })))
}

#[derive(Serialize)]
struct CaptionOut {
    captions: Vec<Caption>,
}

async fn caption(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> ApiResult<HttpResponse> {
    let Some(params) = state.settings.capfilt.clone() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_caption_model",
            "this server runs without a caption model (--no-captions)",
        ));
    };
    let form = read_upload(&req, payload, state.settings.max_upload_bytes).await?;
    let bytes = form
        .image
        .ok_or_else(|| ApiError::bad_request("missing the `image` file field"))?;
    let texts = form.texts;
    let out = web::block(move || -> ApiResult<CaptionOut> {
        let (image, _) = decode_upload(&bytes, state.settings.limits)?;
        let cands = state
            .client
            .capfilt(vec![image], None, vec![texts], params)?
            .pop()
            .unwrap_or_default();
        Ok(CaptionOut {
            captions: cands.into_iter().map(caption_of).collect(),
        })
    })
    .await??;
    Ok(HttpResponse::Ok().json(out))
}

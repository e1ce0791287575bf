//! Images: metadata, thumbnail and file (served by id only, never by a path from the request),
//! upload (CapFilt captions, indexed at once), delete, and captioning without indexing.

use actix_files::NamedFile;
use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde::Serialize;

use super::{
    check_upload, decode_upload, parse_id, read_upload, safe_stem, Endpoint, ImageOut, PathView,
};
use crate::engine::ingest::caption_of;
use crate::engine::{CapFiltJob, Caption, Encoders, ImageId, IngestOptions, NewUpload};
use crate::server::error::{ApiError, ApiResult};
use crate::server::state::AppState;

/// Registers the image routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    Endpoint::new("/api/images").post(upload).register(cfg);
    Endpoint::new("/api/images/{id}")
        .get(get_image)
        .delete(delete_image)
        .register(cfg);
    Endpoint::new("/api/images/{id}/thumbnail")
        .get(thumbnail)
        .register(cfg);
    Endpoint::new("/api/images/{id}/file")
        .get(file)
        .register(cfg);
    Endpoint::new("/api/caption").post(caption).register(cfg);
}

async fn get_image(
    state: web::Data<AppState>,
    id: web::Path<String>,
    view: PathView,
) -> ApiResult<HttpResponse> {
    let id = parse_id(&id)?;
    let rec = web::block(move || -> ApiResult<_> { Ok(state.engine.get(ImageId(id))?) })
        .await??
        .ok_or_else(|| ApiError::not_found(format!("no image with id {id}")))?;
    Ok(HttpResponse::Ok().json(ImageOut::new(rec, &view)))
}

async fn thumbnail(state: web::Data<AppState>, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = parse_id(&id)?;
    let bytes =
        web::block(move || -> ApiResult<Vec<u8>> { Ok(state.engine.thumbnail(ImageId(id))?) })
            .await??;
    Ok(HttpResponse::Ok()
        .content_type("image/jpeg")
        .insert_header(("Cache-Control", "private, max-age=3600"))
        .body(bytes))
}

/// The original file, streamed (with Range, conditional requests and HEAD).
async fn file(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = parse_id(&id)?;
    let file = web::block(move || -> ApiResult<NamedFile> {
        let rec = state
            .engine
            .get(ImageId(id))?
            .ok_or_else(|| ApiError::not_found(format!("no image with id {id}")))?;
        // The path comes from the collection, which only holds what was indexed.
        NamedFile::open(&rec.path)
            .map_err(|e| ApiError::not_found(format!("the file of image {id} cannot be read: {e}")))
    })
    .await??;
    let mime = mime_guess::from_path(file.path()).first_or_octet_stream();
    let mut res = file
        .set_content_type(mime)
        .disable_content_disposition()
        .into_response(&req);
    // actix-files answers a bad or unsatisfiable range and a failed precondition with an empty
    // body: make them JSON errors like every other (416 keeps its Content-Range).
    let refusal = match res.status() {
        StatusCode::RANGE_NOT_SATISFIABLE => {
            Some(("range_not_satisfiable", "the range is outside the file"))
        }
        StatusCode::PRECONDITION_FAILED => Some((
            "precondition_failed",
            "the If-Match or If-Unmodified-Since given does not hold",
        )),
        StatusCode::BAD_REQUEST => Some(("bad_request", "the Range header does not parse")),
        _ => None,
    };
    if let Some((code, message)) = refusal {
        let mut err = ApiError::new(res.status(), code, message).error_response();
        if let Some(range) = res.headers().get(header::CONTENT_RANGE) {
            err.headers_mut()
                .insert(header::CONTENT_RANGE, range.clone());
        }
        return Ok(err);
    }
    res.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    Ok(res)
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
    view: PathView,
) -> ApiResult<HttpResponse> {
    let form = read_upload(&req, payload, &state.settings).await?;
    let bytes = form
        .image
        .ok_or_else(|| ApiError::bad_request("missing the `image` file field"))?;
    let texts = form.texts;
    let stem = form.file_name.as_deref().and_then(safe_stem);
    let (status, out) = web::block(move || -> ApiResult<(StatusCode, UploadOut)> {
        let s = &state.settings;
        // CapFilt reads a second copy of the image beside the retrieval model's.
        let copies = if s.capfilt.is_some() { 2 } else { 1 };
        let ext = check_upload(&bytes, s, copies)?;
        let options = IngestOptions {
            batch_size: 1,
            commit_every: 1,
            limits: s.limits,
            drop_vanished: false,
            capfilt: s.capfilt.clone(),
            budget: s.budget.clone(),
            budget_wait: Some(s.decode_wait),
            actor: super::api_actor(s),
        };
        let done = state.engine.upload(
            &state.client,
            options,
            NewUpload {
                bytes: &bytes,
                stem: stem.as_deref(),
                ext,
            },
            texts,
        )?;
        let rec = state.engine.get(done.id)?.ok_or_else(|| {
            ApiError::not_found(format!("image {} was deleted meanwhile", done.id))
        })?;
        let status = if done.duplicate {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        Ok((
            status,
            UploadOut {
                id: done.id.0,
                duplicate: done.duplicate,
                captions: rec.captions.clone(),
                image: ImageOut::new(rec, &view),
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
        if state
            .engine
            .remove(ImageId(id), &super::api_actor(&state.settings))?
        {
            Ok(())
        } else {
            Err(ApiError::not_found(format!("no image with id {id}")))
        }
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
    let form = read_upload(&req, payload, &state.settings).await?;
    let bytes = form
        .image
        .ok_or_else(|| ApiError::bad_request("missing the `image` file field"))?;
    let texts = form.texts;
    let out = web::block(move || -> ApiResult<CaptionOut> {
        let admitted = decode_upload(&bytes, &state.settings, 1)?;
        let cands = state
            .client
            .capfilt(CapFiltJob {
                images: vec![admitted.image],
                tokens: None,
                given: vec![texts],
                params,
            })?
            .pop()
            .unwrap_or_default();
        Ok(CaptionOut {
            captions: cands.into_iter().map(caption_of).collect(),
        })
    })
    .await??;
    Ok(HttpResponse::Ok().json(out))
}

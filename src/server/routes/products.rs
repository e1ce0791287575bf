//! Products: one product sent with its images at once (its images and texts replaced), and
//! removed with all its images.

use actix_multipart::Multipart;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::Serialize;

use super::{
    check_upload, decode_upload, is_multipart, read_field, safe_stem, BodyDeadline, Endpoint,
    ImageOut, PathView,
};
use crate::engine::catalogue::{check_product_id, read_product};
use crate::engine::{IngestOptions, NewUpload, Product};
use crate::server::error::{ApiError, ApiResult};
use crate::server::state::{ApiSettings, AppState};

/// Most images one request may carry.
const MAX_IMAGES: usize = 16;
/// Largest `product` field, in bytes.
const MAX_PRODUCT_BYTES: usize = 64 * 1024;

/// Registers the product routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    Endpoint::new("/api/products")
        .post(put_product)
        .register(cfg);
    Endpoint::new("/api/products/{product}")
        .delete(delete_product)
        .register(cfg);
}

/// What a product upload carried.
#[derive(Default)]
struct ProductForm {
    /// The `product` field: JSON.
    product: Option<Vec<u8>>,
    /// The `image` fields, with the file names the client gave.
    images: Vec<(Vec<u8>, Option<String>)>,
}

/// Reads `product` (JSON, at most [`MAX_PRODUCT_BYTES`]) and `image` fields (at most
/// [`MAX_IMAGES`], each at most `settings.max_upload_bytes`) within `settings.body_timeout`;
/// 400 for any other field.
async fn read_product_form(
    req: &HttpRequest,
    payload: web::Payload,
    settings: &ApiSettings,
) -> ApiResult<ProductForm> {
    if !is_multipart(req) {
        return Err(ApiError::unsupported_media(
            "send multipart/form-data with a `product` JSON field and `image` file fields",
        ));
    }
    let deadline = BodyDeadline::new(settings);
    let mut form = Multipart::new(req.headers(), payload);
    let mut out = ProductForm::default();
    while let Some(field) = deadline.within(form.next()).await? {
        let mut field =
            field.map_err(|e| ApiError::bad_request(format!("malformed multipart body: {e}")))?;
        let name = field.name().unwrap_or("").to_string();
        let limit = match name.as_str() {
            "product" if out.product.is_some() => {
                return Err(ApiError::bad_request("send one `product` field"))
            }
            "product" => MAX_PRODUCT_BYTES,
            "image" if out.images.len() >= MAX_IMAGES => {
                return Err(ApiError::bad_request(format!(
                    "at most {MAX_IMAGES} `image` fields"
                )))
            }
            "image" => settings.max_upload_bytes,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unexpected form field {name:?}: send `product` and `image` fields"
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
            _ => ApiError::bad_request(format!(
                "the product field is over {MAX_PRODUCT_BYTES} bytes"
            )),
        })
        .await?;
        match name.as_str() {
            "product" => out.product = Some(buf),
            _ => out.images.push((buf, file_name)),
        }
    }
    Ok(out)
}

#[derive(Serialize)]
struct ProductOut {
    product: Product,
    created: bool,
    images: Vec<ImageOut>,
    embedded: usize,
    updated: usize,
    unchanged: usize,
    removed: usize,
}

/// `POST /api/products`: the product's images become the ones sent (others it had leave the
/// collection, uploaded files with them), and its texts and attributes the ones sent.
async fn put_product(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
    view: PathView,
) -> ApiResult<HttpResponse> {
    let form = read_product_form(&req, payload, &state.settings).await?;
    let raw = form.product.ok_or_else(|| {
        ApiError::bad_request(
            "missing the `product` field: {\"product\": \"SKU-1\", \"title\": ..., \
             \"description\": ..., \"attributes\": {...}}",
        )
    })?;
    let value: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::bad_request(format!("the product field is not JSON: {e}")))?;
    if form.images.is_empty() {
        return Err(ApiError::bad_request(
            "a product needs at least one `image` file field",
        ));
    }
    let (status, out) = web::block(move || -> ApiResult<(StatusCode, ProductOut)> {
        let engine = &state.engine;
        let (product, types) =
            read_product(value, &engine.info()?.attributes).map_err(ApiError::bad_request)?;
        let s = &state.settings;
        // CapFilt reads a second copy of each image beside the retrieval model's.
        let copies = if s.capfilt.is_some() { 2 } else { 1 };
        let mut exts = Vec::with_capacity(form.images.len());
        for (bytes, _) in &form.images {
            // Every image must decode before the product changes at all.
            exts.push(check_upload(bytes, s, copies)?);
            drop(decode_upload(bytes, s, copies)?);
        }
        let stems: Vec<Option<String>> = form
            .images
            .iter()
            .map(|(_, name)| name.as_deref().and_then(safe_stem))
            .collect();
        let uploads: Vec<NewUpload<'_>> = form
            .images
            .iter()
            .zip(&stems)
            .zip(&exts)
            .map(|(((bytes, _), stem), ext)| NewUpload {
                bytes,
                stem: stem.as_deref(),
                ext,
            })
            .collect();
        let options = IngestOptions {
            batch_size: uploads.len(),
            commit_every: 64,
            limits: s.limits,
            drop_vanished: false,
            capfilt: s.capfilt.clone(),
            budget: s.budget.clone(),
            budget_wait: Some(s.decode_wait),
            actor: super::api_actor(s),
        };
        let id = product.id.clone();
        let done = engine.upload_product(&state.client, options, product, types, &uploads)?;
        let mut images = Vec::with_capacity(done.ids.len());
        let mut stored = None;
        for &image in &done.ids {
            if let Some(rec) = engine.get(image)? {
                stored = stored.or_else(|| rec.product.clone());
                images.push(ImageOut::new(rec, &view));
            }
        }
        let product = stored
            .ok_or_else(|| ApiError::not_found(format!("product {id:?} was removed meanwhile")))?;
        let status = match done.created {
            true => StatusCode::CREATED,
            false => StatusCode::OK,
        };
        let s = &done.summary;
        Ok((
            status,
            ProductOut {
                product,
                created: done.created,
                images,
                embedded: s.images_embedded,
                updated: s.images_updated,
                unchanged: s.images_unchanged,
                removed: s.images_removed,
            },
        ))
    })
    .await??;
    Ok(HttpResponse::build(status).json(out))
}

/// `DELETE /api/products/{product}`: every image of the product leaves the collection.
async fn delete_product(
    state: web::Data<AppState>,
    product: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = product.into_inner();
    check_product_id(&id).map_err(ApiError::bad_request)?;
    let shown = id.clone();
    let images = web::block(move || -> ApiResult<usize> {
        let who = super::api_actor(&state.settings);
        Ok(state.engine.remove_product(&id, &who)?)
    })
    .await??;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "deleted": shown, "images": images })))
}

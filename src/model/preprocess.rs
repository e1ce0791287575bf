//! Image decoding and `BlipImageProcessor` preprocessing: EXIF orientation, RGB (transparency
//! composited on white, as transformers does), bicubic resize of both sides to the model's input
//! size with Pillow's arithmetic, scale by 1/255, CLIP mean/std
//! normalisation, CHW layout.

use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use super::error::{ModelError, Result};
use super::resample::resize_bicubic_u8;

/// OpenAI CLIP mean, used by every BLIP checkpoint (the digits transformers writes).
pub const MEAN: [f64; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP standard deviation.
pub const STD: [f64; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Limits applied while decoding untrusted images.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest accepted width x height (default 100 megapixels): bigger files are refused before
    /// any pixel is decoded, which defeats decompression bombs.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_pixels: 100_000_000,
        }
    }
}

/// A process-wide budget of memory for decoded images, in bytes. Every decode of untrusted
/// input is admitted first, by the bytes its header says it will take ([`decode_cost`]), and
/// holds a [`DecodePermit`] for as long as its pixels live; so whatever the concurrency, the
/// decoded images of a process never take more than the budget.
#[derive(Debug)]
pub struct DecodeBudget {
    capacity: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

/// A share of a [`DecodeBudget`], given back when dropped.
#[derive(Debug)]
pub struct DecodePermit {
    budget: Arc<DecodeBudget>,
    bytes: u64,
}

const MIB: u64 = 1 << 20;

impl DecodeBudget {
    /// A budget of `capacity` bytes.
    pub fn new(capacity: u64) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            used: Mutex::new(0),
            freed: Condvar::new(),
        })
    }

    /// Its size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes held by permits now.
    pub fn in_use(&self) -> u64 {
        self.used.lock().map_or(self.capacity, |u| *u)
    }

    /// Takes `bytes` of the budget for `name`, waiting for other permits to be given back for
    /// at most `wait` (`None`: as long as it takes). More than the whole budget is
    /// [`ModelError::OverBudget`] at once; still short after `wait`, [`ModelError::Busy`].
    pub fn admit(
        self: &Arc<Self>,
        bytes: u64,
        name: &Path,
        wait: Option<Duration>,
    ) -> Result<DecodePermit> {
        if bytes > self.capacity {
            return Err(ModelError::OverBudget {
                path: name.to_path_buf(),
                needed_mib: bytes.div_ceil(MIB),
                capacity_mib: self.capacity / MIB,
            });
        }
        let poisoned = || ModelError::InvalidInput("the decode budget's lock is poisoned".into());
        let deadline = wait.map(|w| Instant::now() + w);
        let mut used = self.used.lock().map_err(|_| poisoned())?;
        while *used + bytes > self.capacity {
            used = match deadline {
                None => self.freed.wait(used).map_err(|_| poisoned())?,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ModelError::Busy(format!(
                            "the decode memory budget ({} MiB) is taken by other images; \
                             retry shortly",
                            self.capacity / MIB
                        )));
                    }
                    self.freed
                        .wait_timeout(used, left)
                        .map_err(|_| poisoned())?
                        .0
                }
            };
        }
        *used += bytes;
        Ok(DecodePermit {
            budget: self.clone(),
            bytes,
        })
    }
}

impl DecodePermit {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Gives back what is held beyond `bytes` (once a decode's scratch is freed).
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes < self.bytes {
            self.budget.release(self.bytes - bytes);
            self.bytes = bytes;
        }
    }
}

impl DecodeBudget {
    fn release(&self, bytes: u64) {
        if let Ok(mut used) = self.used.lock() {
            *used = used.saturating_sub(bytes);
        }
        self.freed.notify_all();
    }
}

impl Drop for DecodePermit {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// A decoded image (8-bit RGB) and the share of the decode budget its pixels hold.
#[derive(Debug)]
pub struct Admitted {
    /// The image, EXIF orientation applied, transparency composited on white.
    pub image: DynamicImage,
    /// Held for as long as the image lives.
    pub permit: DecodePermit,
}

/// What decoding an image takes at its peak, from its header alone: the decoder's output
/// (`width x height x bytes per pixel` of its colour type), an 8-bit RGBA copy for images with
/// transparency, and the 8-bit RGB image kept afterwards; or, when more, the `copies` of the
/// RGB image its caller keeps. Errors as [`decode_image`] would give them for a header that
/// does not parse or is over `limits`.
pub fn decode_cost(bytes: &[u8], name: &Path, limits: DecodeLimits, copies: u64) -> Result<u64> {
    let fail = |reason: String| ModelError::Image {
        path: name.to_path_buf(),
        reason,
    };
    let decoder = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| fail(e.to_string()))?
        .into_decoder()
        .map_err(|e| fail(format!("cannot read header: {e}")))?;
    let (w, h) = decoder.dimensions();
    let pixels = u64::from(w) * u64::from(h);
    check_pixels(name, w, h, limits)?;
    let alpha = if decoder.color_type().has_alpha() {
        4 * pixels
    } else {
        0
    };
    let peak = decoder.total_bytes() + alpha + 3 * pixels;
    Ok(peak.max(copies * 3 * pixels))
}

fn check_pixels(name: &Path, w: u32, h: u32, limits: DecodeLimits) -> Result<()> {
    let pixels = u64::from(w) * u64::from(h);
    if pixels == 0 {
        return Err(ModelError::Image {
            path: name.to_path_buf(),
            reason: "image has no pixels".into(),
        });
    }
    if pixels > limits.max_pixels {
        return Err(ModelError::TooManyPixels {
            path: name.to_path_buf(),
            width: w,
            height: h,
            max_pixels: limits.max_pixels,
        });
    }
    Ok(())
}

/// Decodes untrusted image bytes under `budget`: admitted by [`decode_cost`] (waiting at most
/// `wait`), decoded, converted to 8-bit RGB with [`to_rgb`] (what the models read first), and
/// the permit shrunk to the RGB pixels that stay, `copies` times (a caller that will copy the
/// image counts the copies).
pub fn decode_admitted(
    bytes: &[u8],
    name: &Path,
    limits: DecodeLimits,
    budget: &Arc<DecodeBudget>,
    wait: Option<Duration>,
    copies: u64,
) -> Result<Admitted> {
    let copies = copies.max(1);
    let cost = decode_cost(bytes, name, limits, copies)?;
    let rgb = |w: u32, h: u32| 3 * u64::from(w) * u64::from(h);
    let mut permit = budget.admit(cost, name, wait)?;
    let image = decode_image(bytes, name, limits)?;
    let image = match image {
        DynamicImage::ImageRgb8(_) => image,
        other => DynamicImage::ImageRgb8(to_rgb(&other)),
    };
    permit.shrink_to(copies * rgb(image.width(), image.height()));
    Ok(Admitted { image, permit })
}

/// Reads and decodes an image file, applying its EXIF orientation.
pub fn load_image(path: &Path, limits: DecodeLimits) -> Result<DynamicImage> {
    let bytes = fs_err::read(path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    decode_image(&bytes, path, limits)
}

/// Decodes an in-memory image (`name` appears in errors), applying its EXIF orientation.
pub fn decode_image(bytes: &[u8], name: &Path, limits: DecodeLimits) -> Result<DynamicImage> {
    let fail = |reason: String| ModelError::Image {
        path: name.to_path_buf(),
        reason,
    };
    if bytes.is_empty() {
        return Err(fail("empty file".into()));
    }
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| fail(e.to_string()))
    };
    let probe = reader()?;
    match probe.format() {
        None => return Err(fail("not an image (unrecognised format)".into())),
        // JPEG decoders fill a cut-off file with grey instead of failing: check the end marker.
        Some(image::ImageFormat::Jpeg) if !jpeg_is_complete(bytes) => {
            return Err(fail(
                "truncated JPEG (no end-of-image marker after the last scan)".into(),
            ))
        }
        _ => {}
    }
    let (w, h) = probe
        .into_dimensions()
        .map_err(|e| fail(format!("cannot read header: {e}")))?;
    let pixels = u64::from(w) * u64::from(h);
    check_pixels(name, w, h, limits)?;
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(w);
    image_limits.max_image_height = Some(h);
    // Room for the decoded image in its widest layout (16-bit RGBA) plus decoder scratch.
    image_limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(64 << 20));
    let mut r = reader()?;
    r.limits(image_limits);
    let is_jpeg = r.format() == Some(image::ImageFormat::Jpeg);
    let mut decoder = r.into_decoder().map_err(|e| fail(e.to_string()))?;
    let orientation = decoder.orientation().ok();
    let libjpeg = if is_jpeg {
        decode_jpeg_libjpeg(bytes)
    } else {
        None
    };
    let mut img = match libjpeg {
        Some(img) => img,
        None => DynamicImage::from_decoder(decoder).map_err(|e| fail(e.to_string()))?,
    };
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(img)
}

/// Decodes a JPEG with libjpeg-turbo (mozjpeg), the decoder Pillow ships: its IDCT and "fancy"
/// chroma upsampling differ from the pure-Rust decoder by up to 4 levels on 4:2:0 files, enough
/// to move the model's inputs. `None` for colour spaces it cannot turn into RGB (CMYK) or any
/// failure, so that the caller falls back to the `image` crate's decoder and its error messages.
fn decode_jpeg_libjpeg(bytes: &[u8]) -> Option<DynamicImage> {
    std::panic::catch_unwind(|| -> Option<DynamicImage> {
        let d = mozjpeg::Decompress::new_mem(bytes).ok()?;
        if !matches!(
            d.color_space(),
            mozjpeg::ColorSpace::JCS_YCbCr
                | mozjpeg::ColorSpace::JCS_GRAYSCALE
                | mozjpeg::ColorSpace::JCS_RGB
        ) {
            return None;
        }
        let mut started = d.rgb().ok()?;
        let (w, h) = (started.width() as u32, started.height() as u32);
        let data: Vec<u8> = started.read_scanlines().ok()?;
        started.finish().ok()?;
        RgbImage::from_raw(w, h, data).map(DynamicImage::ImageRgb8)
    })
    .ok()
    .flatten()
}

/// Whether an end-of-image marker (FF D9) follows the last start-of-scan marker (FF DA). Inside
/// entropy-coded data every FF byte is followed by 00 or a restart marker, so both markers are
/// unambiguous; data appended after EOI (motion photos) is tolerated.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_sos {
        Some(p) => bytes[p..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => false,
    }
}

/// Converts to 8-bit RGB; transparent pixels are composited on white (transformers'
/// `convert_to_rgb`).
pub fn to_rgb(img: &DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (src, dst) in rgba.pixels().zip(out.pixels_mut()) {
        let a = u32::from(src[3]);
        for c in 0..3 {
            let v = u32::from(src[c]) * a + 255 * (255 - a);
            dst[c] = ((v + 127) / 255) as u8;
        }
    }
    out
}

/// Resizes to `size` x `size` exactly as Pillow's `resize(..., BICUBIC)` does (see
/// [`super::resample`]).
pub fn resize_bicubic(rgb: &RgbImage, size: u32) -> Result<RgbImage> {
    let (w, h) = rgb.dimensions();
    let s = size as usize;
    let out = resize_bicubic_u8(rgb.as_raw(), w as usize, h as usize, 3, s, s);
    RgbImage::from_raw(size, size, out)
        .ok_or_else(|| ModelError::InvalidInput("resize produced a wrong-sized buffer".into()))
}

/// Normalised CHW floats of one image, `3 * size * size` values.
pub fn normalize_chw(rgb: &RgbImage) -> Vec<f32> {
    let (w, h) = rgb.dimensions();
    let plane = (w * h) as usize;
    // One lookup table per channel: every 8-bit value maps to one float.
    let lut: Vec<[f32; 256]> = (0..3)
        .map(|c| std::array::from_fn(|v| ((v as f64 / 255.0 - MEAN[c]) / STD[c]) as f32))
        .collect();
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = lut[c][usize::from(p[c])];
        }
    }
    out
}

/// The model input for a batch of images: `(N, 3, size, size)` f32.
pub fn pixel_values(images: &[DynamicImage], size: usize, device: &Device) -> Result<Tensor> {
    if images.is_empty() {
        return Err(ModelError::InvalidInput("no images given".into()));
    }
    let mut data = Vec::with_capacity(images.len() * 3 * size * size);
    for img in images {
        let rgb = match img {
            // Decoded under a budget, images are RGB already: no full-size copy.
            DynamicImage::ImageRgb8(rgb) => resize_bicubic(rgb, size as u32)?,
            other => resize_bicubic(&to_rgb(other), size as u32)?,
        };
        data.extend(normalize_chw(&rgb));
    }
    Ok(Tensor::from_vec(
        data,
        (images.len(), 3, size, size),
        device,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_garbage_are_refused_with_the_name() {
        let e = decode_image(b"", Path::new("zero.jpg"), DecodeLimits::default()).unwrap_err();
        assert!(
            e.to_string().contains("zero.jpg") && e.to_string().contains("empty"),
            "{e}"
        );
        let e = decode_image(
            b"hello, not an image",
            Path::new("x.png"),
            DecodeLimits::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("x.png"), "{e}");
    }

    #[test]
    fn truncated_png_is_an_error_not_a_panic() {
        let img = RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut buf = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut buf), image::ImageFormat::Png)
            .unwrap();
        buf.truncate(buf.len() / 2);
        assert!(decode_image(&buf, Path::new("cut.png"), DecodeLimits::default()).is_err());
    }

    #[test]
    fn decompression_bomb_is_refused_before_decoding() {
        // A valid PNG header claiming 100000 x 100000 pixels: 10 gigapixels.
        let img = RgbImage::new(1, 1);
        let mut buf = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut buf), image::ImageFormat::Png)
            .unwrap();
        // The IHDR chunk: length at 8..12, type at 12..16, width and height at 16..24, the rest
        // of its 13 bytes of data up to 29, then the CRC of type and data at 29..33.
        assert_eq!(&buf[12..16], b"IHDR");
        buf[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        buf[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32fast::hash(&buf[12..29]);
        buf[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = decode_image(&buf, Path::new("bomb.png"), DecodeLimits::default()).unwrap_err();
        assert!(e.to_string().contains("bomb.png"), "{e}");
        assert!(
            matches!(
                e,
                ModelError::TooManyPixels {
                    width: 100_000,
                    height: 100_000,
                    max_pixels: 100_000_000,
                    ..
                }
            ),
            "refused by the decoder rather than the pixel limit: {e}"
        );
    }

    #[test]
    fn transparent_pixels_become_white() {
        let img = image::RgbaImage::from_pixel(2, 2, image::Rgba([0, 0, 0, 0]));
        let rgb = to_rgb(&DynamicImage::ImageRgba8(img));
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
    }

    #[test]
    fn shape_and_normalisation() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(10, 7, image::Rgb([255, 0, 128])));
        let t = pixel_values(&[img.clone(), img], 8, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3, 8, 8]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!((f64::from(v[0]) - (1.0 - MEAN[0]) / STD[0]).abs() < 1e-5);
        assert!((f64::from(v[64]) - (0.0 - MEAN[1]) / STD[1]).abs() < 1e-5);
    }
}

//! Thumbnails for result lists (directory `thumbs/`): JPEG, longest side at most
//! [`THUMB_MAX_SIDE`] pixels, quality [`THUMB_QUALITY`], one file per image at
//! `thumbs/<xx>/<id>.jpg` (`xx` = low byte of the id in hex). Typically 8-20 KB per image.
//!
//! Thumbnails are a convenience: they can be regenerated from the originals, so they are not part
//! of the recovery protocol beyond being deleted with their image.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::codecs::jpeg::JpegEncoder;
use image::DynamicImage;

use super::error::{IndexError, Result};
use super::fsutil;
use super::id::ImageId;

/// Longest side of a thumbnail, in pixels. Smaller images are not enlarged.
pub const THUMB_MAX_SIDE: u32 = 256;
/// JPEG quality of thumbnails.
pub const THUMB_QUALITY: u8 = 80;

/// The thumbnail files of a collection.
pub struct ThumbnailStore {
    dir: PathBuf,
}

impl ThumbnailStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        fs_err::create_dir_all(dir)?;
        Ok(ThumbnailStore {
            dir: dir.to_path_buf(),
        })
    }

    /// Where the thumbnail of `id` lives.
    pub fn path(&self, id: ImageId) -> PathBuf {
        self.dir
            .join(format!("{:02x}", id.0 & 0xff))
            .join(format!("{}.jpg", id.0))
    }

    /// Encodes the thumbnail of `image` as JPEG bytes (no file is written).
    pub fn encode(image: &DynamicImage) -> Result<Vec<u8>> {
        let small = if image.width().max(image.height()) > THUMB_MAX_SIDE {
            // Area-averaging downscale that keeps the aspect ratio.
            image.thumbnail(THUMB_MAX_SIDE, THUMB_MAX_SIDE)
        } else {
            image.clone()
        };
        // JPEG has no alpha; flatten to RGB.
        let rgb = small.to_rgb8();
        let mut out = Cursor::new(Vec::new());
        rgb.write_with_encoder(JpegEncoder::new_with_quality(&mut out, THUMB_QUALITY))?;
        Ok(out.into_inner())
    }

    /// Stores the thumbnail of `image` for `id` (replacing any).
    pub fn put(&self, id: ImageId, image: &DynamicImage) -> Result<()> {
        let bytes = Self::encode(image)?;
        let path = self.path(id);
        fs_err::create_dir_all(fsutil::parent(&path))?;
        fsutil::write_atomic(&path, &bytes)
    }

    /// The JPEG bytes of the thumbnail of `id`; [`IndexError::NotFound`] if there is none.
    pub fn get(&self, id: ImageId) -> Result<Vec<u8>> {
        let path = self.path(id);
        match std::fs::read(&path) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(IndexError::NotFound(id)),
            Err(e) => Err(fsutil::fs_err_io(e, "read", &path)),
        }
    }

    /// Deletes the thumbnail of `id`; returns whether there was one.
    pub fn remove(&self, id: ImageId) -> Result<bool> {
        fsutil::remove_if_exists(&self.path(id))
    }

    /// Bytes used on disk by all thumbnails.
    pub fn bytes_on_disk(&self) -> Result<u64> {
        fsutil::dir_size(&self.dir)
    }

    /// Ids that have a thumbnail (for orphan sweeps after a crash).
    pub fn ids(&self) -> Result<Vec<ImageId>> {
        super::features::ids_in(&self.dir, ".jpg")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GenericImageView, Rgba, RgbaImage};

    fn gradient(w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageRgba8(RgbaImage::from_fn(w, h, |x, y| {
            Rgba([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8, 128])
        }))
    }

    #[test]
    fn thumbnails_fit_256_keep_aspect_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = ThumbnailStore::open(dir.path()).unwrap();
        store.put(ImageId(1), &gradient(1024, 512)).unwrap();
        let bytes = store.get(ImageId(1)).unwrap();
        assert_eq!(&bytes[..2], &[0xFF, 0xD8], "JPEG SOI marker");
        let decoded = image::load_from_memory(&bytes).unwrap();
        assert_eq!(decoded.dimensions(), (256, 128));

        // Portrait, odd size.
        store.put(ImageId(2), &gradient(300, 1000)).unwrap();
        let d = image::load_from_memory(&store.get(ImageId(2)).unwrap()).unwrap();
        assert_eq!(d.height(), 256);
        assert!((76..=77).contains(&d.width()), "{}", d.width());

        // Small images are not enlarged.
        store.put(ImageId(3), &gradient(40, 30)).unwrap();
        let d = image::load_from_memory(&store.get(ImageId(3)).unwrap()).unwrap();
        assert_eq!(d.dimensions(), (40, 30));

        assert_eq!(
            store.ids().unwrap(),
            vec![ImageId(1), ImageId(2), ImageId(3)]
        );
        assert!(store.remove(ImageId(1)).unwrap());
        assert!(matches!(
            store.get(ImageId(1)),
            Err(IndexError::NotFound(_))
        ));
        assert!(!store.remove(ImageId(1)).unwrap());
    }
}

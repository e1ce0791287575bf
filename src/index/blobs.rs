//! The blob store: per-image files too big for a record store, keyed by image id, in one
//! directory (which may be a shared mount, so any node can rerank any hit):
//! `features/` (ViT outputs for ITM, [`FeatureStore`]) and `thumbs/` (JPEG previews,
//! [`ThumbnailStore`]). Every file is written atomically (temporary file, fsync, rename).
//!
//! Blobs are written before their record and removed after it, so a crash can leave blobs no
//! record owns but never a record whose blobs are missing; [`BlobStore::sweep`] removes the
//! former.

use std::path::{Path, PathBuf};

use image::DynamicImage;

use super::error::Result;
use super::features::{FeatureMatrix, FeatureStore};
use super::id::ImageId;
use super::thumbs::ThumbnailStore;

/// Features and thumbnails of a collection, by image id.
pub struct BlobStore {
    dir: PathBuf,
    features: FeatureStore,
    thumbs: ThumbnailStore,
}

impl BlobStore {
    /// The subdirectories of the blob store, which are all of it.
    pub const PARTS: [&'static str; 2] = ["features", "thumbs"];

    /// Opens (creating if needed) the blob store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self {
            dir: dir.to_path_buf(),
            features: FeatureStore::open(&dir.join(Self::PARTS[0]))?,
            thumbs: ThumbnailStore::open(&dir.join(Self::PARTS[1]))?,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores the blobs of `id` (replacing any). On failure nothing of `id` is left.
    pub fn put(
        &self,
        id: ImageId,
        features: Option<&FeatureMatrix>,
        thumbnail: Option<&DynamicImage>,
    ) -> Result<()> {
        let written = (|| {
            if let Some(f) = features {
                self.features.put(id, f.rows, f.cols, &f.data)?;
            }
            if let Some(img) = thumbnail {
                self.thumbs.put(id, img)?;
            }
            Ok(())
        })();
        if written.is_err() {
            let _ = self.remove(id);
        }
        written
    }

    /// The stored ViT features of `id` ([`super::IndexError::NotFound`] if none).
    pub fn features(&self, id: ImageId) -> Result<FeatureMatrix> {
        self.features.get(id)
    }

    /// The JPEG thumbnail of `id` ([`super::IndexError::NotFound`] if none).
    pub fn thumbnail(&self, id: ImageId) -> Result<Vec<u8>> {
        self.thumbs.get(id)
    }

    /// Removes every blob of `id`; returns how many files went.
    pub fn remove(&self, id: ImageId) -> Result<usize> {
        Ok(self.features.remove(id)? as usize + self.thumbs.remove(id)? as usize)
    }

    /// Removes the blobs of every id for which `owned` is false; returns how many files went.
    pub fn sweep(&self, owned: impl Fn(ImageId) -> bool) -> Result<usize> {
        let mut removed = 0;
        for id in self.features.ids()? {
            if !owned(id) {
                removed += self.features.remove(id)? as usize;
            }
        }
        for id in self.thumbs.ids()? {
            if !owned(id) {
                removed += self.thumbs.remove(id)? as usize;
            }
        }
        Ok(removed)
    }

    /// Bytes on disk of (features, thumbnails).
    pub fn bytes_on_disk(&self) -> Result<(u64, u64)> {
        Ok((self.features.bytes_on_disk()?, self.thumbs.bytes_on_disk()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::IndexError;
    use image::RgbImage;

    #[test]
    fn put_get_remove_and_sweep() {
        let tmp = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(tmp.path()).unwrap();
        let f = FeatureMatrix {
            rows: 2,
            cols: 3,
            data: vec![0.5, 1.0, -2.0, 0.25, 0.0, 4.0],
        };
        let thumb = DynamicImage::ImageRgb8(RgbImage::new(40, 30));
        for id in 0..4 {
            blobs
                .put(ImageId(id), Some(&f), (id % 2 == 0).then_some(&thumb))
                .unwrap();
        }
        assert_eq!(blobs.features(ImageId(3)).unwrap(), f);
        assert!(blobs
            .thumbnail(ImageId(2))
            .unwrap()
            .starts_with(&[0xFF, 0xD8]));
        assert!(matches!(
            blobs.thumbnail(ImageId(1)),
            Err(IndexError::NotFound(_))
        ));
        assert_eq!(blobs.remove(ImageId(0)).unwrap(), 2);
        assert_eq!(blobs.remove(ImageId(0)).unwrap(), 0);
        // Ids 1 and 2 are owned; 3 is not: its one file goes.
        assert_eq!(blobs.sweep(|id| id.0 < 3).unwrap(), 1);
        assert!(matches!(
            blobs.features(ImageId(3)),
            Err(IndexError::NotFound(_))
        ));
        assert_eq!(blobs.features(ImageId(1)).unwrap(), f);
        let (features, thumbs) = blobs.bytes_on_disk().unwrap();
        assert_eq!(features, 2 * FeatureStore::bytes_per_image(2, 3));
        assert!(thumbs > 0);
    }
}

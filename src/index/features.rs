//! Per-image ViT features for ITM reranking (directory `features/`).
//!
//! ITM needs the full ViT output of each candidate image (577 x 768 for ViT-B/16 at 384) and
//! recomputing the ViT at query time costs ~55 GMACs per image, so ingestion stores it once, as
//! `f16`. One file per image, `features/<xx>/<id>.f16` where `xx` is the id's low byte in hex
//! (256 sub-directories keep directory sizes sane at millions of images).
//!
//! File format (little-endian), [`HEADER_LEN`] = 20 bytes of header then the payload:
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 4 | magic `BSVF` |
//! | 4 | 2 | format version (1) |
//! | 6 | 2 | element type (1 = IEEE binary16) |
//! | 8 | 4 | rows (tokens) |
//! | 12 | 4 | cols (hidden size) |
//! | 16 | 4 | CRC32 of the payload |
//! | 20 | rows·cols·2 | row-major `f16` values |
//!
//! ViT-B: 577·768·2 = 886,272 bytes of payload + 20 = **886,292 bytes per image**; ViT-L (1024
//! hidden): 1,181,716. Files are written atomically (temporary file, fsync, rename, fsync of the
//! directory); a truncated or corrupt file is an [`IndexError::Corrupt`] error on read, never a
//! panic or garbage.

use std::path::{Path, PathBuf};

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use super::error::{IndexError, Result};
use super::fsutil;
use super::id::ImageId;

const MAGIC: [u8; 4] = *b"BSVF";
const VERSION: u16 = 1;
const DTYPE_F16: u16 = 1;
/// Bytes of the header before the `f16` payload.
pub const HEADER_LEN: usize = 20;

/// A `rows x cols` row-major matrix of ViT output features.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureMatrix {
    /// Tokens (`[CLS]` + patches).
    pub rows: usize,
    /// Hidden size.
    pub cols: usize,
    /// `rows * cols` values, row-major.
    pub data: Vec<f32>,
}

/// The feature files of a collection.
pub struct FeatureStore {
    dir: PathBuf,
}

impl FeatureStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        fs_err::create_dir_all(dir)?;
        Ok(FeatureStore {
            dir: dir.to_path_buf(),
        })
    }

    /// File size for one image with `rows x cols` features.
    pub fn bytes_per_image(rows: usize, cols: usize) -> u64 {
        (HEADER_LEN + rows * cols * 2) as u64
    }

    /// Where the features of `id` live.
    pub fn path(&self, id: ImageId) -> PathBuf {
        self.dir
            .join(format!("{:02x}", id.0 & 0xff))
            .join(format!("{}.f16", id.0))
    }

    /// Stores the features of `id` (replacing any), converted to `f16`.
    pub fn put(&self, id: ImageId, rows: usize, cols: usize, data: &[f32]) -> Result<()> {
        if rows == 0 || cols == 0 || rows.checked_mul(cols) != Some(data.len()) {
            return Err(IndexError::InvalidParams(format!(
                "feature matrix {rows}x{cols} with {} values",
                data.len()
            )));
        }
        let (r32, c32) = match (u32::try_from(rows), u32::try_from(cols)) {
            (Ok(r), Ok(c)) => (r, c),
            _ => {
                return Err(IndexError::InvalidParams(format!(
                    "feature matrix {rows}x{cols} too large"
                )))
            }
        };
        let mut halves = vec![f16::ZERO; data.len()];
        halves.convert_from_f32_slice(data);
        let bits: &[u16] = halves.reinterpret_cast();
        let mut bytes = Vec::with_capacity(HEADER_LEN + bits.len() * 2);
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&DTYPE_F16.to_le_bytes());
        bytes.extend_from_slice(&r32.to_le_bytes());
        bytes.extend_from_slice(&c32.to_le_bytes());
        bytes.extend_from_slice(&[0; 4]); // CRC, filled below
        for b in bits {
            bytes.extend_from_slice(&b.to_le_bytes());
        }
        let crc = crc32fast::hash(&bytes[HEADER_LEN..]);
        bytes[16..20].copy_from_slice(&crc.to_le_bytes());

        let path = self.path(id);
        fs_err::create_dir_all(fsutil::parent(&path))?;
        fsutil::write_atomic(&path, &bytes)
    }

    /// Reads the features of `id`; [`IndexError::NotFound`] if none are stored,
    /// [`IndexError::Corrupt`] if the file is damaged.
    pub fn get(&self, id: ImageId) -> Result<FeatureMatrix> {
        let path = self.path(id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IndexError::NotFound(id))
            }
            Err(e) => return Err(fsutil::fs_err_io(e, "read", &path)),
        };
        decode(&bytes).map_err(|reason| IndexError::Corrupt { path, reason })
    }

    /// Whether features are stored for `id`.
    pub fn contains(&self, id: ImageId) -> bool {
        self.path(id).is_file()
    }

    /// Deletes the features of `id`; returns whether there were any.
    pub fn remove(&self, id: ImageId) -> Result<bool> {
        fsutil::remove_if_exists(&self.path(id))
    }

    /// Bytes used on disk by all feature files.
    pub fn bytes_on_disk(&self) -> Result<u64> {
        fsutil::dir_size(&self.dir)
    }

    /// Ids that have a feature file (for orphan sweeps after a crash).
    pub fn ids(&self) -> Result<Vec<ImageId>> {
        ids_in(&self.dir, ".f16")
    }
}

/// Ids of the `<xx>/<id><suffix>` files under `dir`, sorted.
pub(crate) fn ids_in(dir: &Path, suffix: &str) -> Result<Vec<ImageId>> {
    let mut ids = Vec::new();
    for shard in fs_err::read_dir(dir)? {
        let shard = shard?;
        if !shard.file_type()?.is_dir() {
            continue;
        }
        for entry in fs_err::read_dir(shard.path())? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name.strip_suffix(suffix).and_then(|s| s.parse().ok()) {
                ids.push(ImageId(id));
            }
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

fn decode(bytes: &[u8]) -> std::result::Result<FeatureMatrix, String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!("{} bytes, shorter than the header", bytes.len()));
    }
    if bytes[0..4] != MAGIC {
        return Err("not a feature file (bad magic)".into());
    }
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    let u32_at =
        |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let (version, dtype) = (u16_at(4), u16_at(6));
    if version != VERSION || dtype != DTYPE_F16 {
        return Err(format!("unsupported version {version} / type {dtype}"));
    }
    let (rows, cols) = (u32_at(8) as usize, u32_at(12) as usize);
    let expected = rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(2))
        .and_then(|n| n.checked_add(HEADER_LEN));
    if expected != Some(bytes.len()) {
        return Err(format!(
            "{rows}x{cols} needs {} bytes, file has {}",
            expected.map_or("too many".to_string(), |n| n.to_string()),
            bytes.len()
        ));
    }
    let payload = &bytes[HEADER_LEN..];
    if crc32fast::hash(payload) != u32_at(16) {
        return Err("checksum mismatch".into());
    }
    let bits: Vec<u16> = payload
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let halves: &[f16] = bits.reinterpret_cast();
    let mut data = vec![0f32; halves.len()];
    halves.convert_to_f32_slice(&mut data);
    Ok(FeatureMatrix { rows, cols, data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::testutil::Rng;

    fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..rows * cols)
            .map(|_| rng.normal() as f32 * 2.0)
            .collect()
    }

    #[test]
    fn round_trip_is_f16_exact_and_sized_as_documented() {
        let dir = tempfile::tempdir().unwrap();
        let store = FeatureStore::open(dir.path()).unwrap();
        let (rows, cols) = (577, 768);
        let data = matrix(rows, cols, 1);
        store.put(ImageId(300), rows, cols, &data).unwrap();
        assert!(store.path(ImageId(300)).ends_with("2c/300.f16"));
        assert_eq!(
            std::fs::metadata(store.path(ImageId(300))).unwrap().len(),
            886_292
        );
        assert_eq!(FeatureStore::bytes_per_image(rows, cols), 886_292);

        let back = store.get(ImageId(300)).unwrap();
        assert_eq!((back.rows, back.cols), (rows, cols));
        for (a, b) in data.iter().zip(&back.data) {
            // f16 keeps 11 significant bits: relative error <= 2^-11.
            assert!((a - b).abs() <= a.abs() * 4.9e-4 + 1e-7, "{a} vs {b}");
            assert_eq!(*b, f16::from_f32(*a).to_f32());
        }
        assert_eq!(store.ids().unwrap(), vec![ImageId(300)]);
        assert!(store.remove(ImageId(300)).unwrap());
        assert!(!store.remove(ImageId(300)).unwrap());
        assert!(matches!(
            store.get(ImageId(300)),
            Err(IndexError::NotFound(ImageId(300)))
        ));
    }

    #[test]
    fn damaged_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let store = FeatureStore::open(dir.path()).unwrap();
        let id = ImageId(5);
        store.put(id, 3, 4, &matrix(3, 4, 2)).unwrap();
        let path = store.path(id);
        let good = std::fs::read(&path).unwrap();

        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated payload", good[..good.len() - 1].to_vec()),
            ("truncated header", good[..7].to_vec()),
            ("empty", Vec::new()),
            ("bad magic", [b"XXXX", &good[4..]].concat()),
            ("flipped bit", {
                let mut b = good.clone();
                b[HEADER_LEN + 3] ^= 0x10;
                b
            }),
            ("huge dims", {
                let mut b = good.clone();
                b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
                b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
                b
            }),
        ];
        for (what, bytes) in cases {
            std::fs::write(&path, &bytes).unwrap();
            match store.get(id) {
                Err(IndexError::Corrupt { .. }) => {}
                other => panic!("{what}: expected Corrupt, got {other:?}"),
            }
        }
        std::fs::write(&path, &good).unwrap();
        assert_eq!(store.get(id).unwrap().rows, 3);
    }

    #[test]
    fn bad_shapes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = FeatureStore::open(dir.path()).unwrap();
        assert!(store.put(ImageId(1), 2, 2, &[0.0; 3]).is_err());
        assert!(store.put(ImageId(1), 0, 2, &[]).is_err());
        assert!(!store.contains(ImageId(1)));
    }
}

//! PDQ, Meta's perceptual hash: 256 bits and a quality score from an image's luminance, and the
//! hashes of its eight dihedral transforms.

use image::DynamicImage;

/// The PDQ hash of `image` (its 32 bytes, in the reference's byte order) and its quality (0 to
/// 100); `None` for an image under 5 pixels on a side.
pub fn pdq_hash(image: &DynamicImage) -> Option<([u8; 32], u8)> {
    let _ = image;
    todo!("PDQ")
}

/// The hashes of `image` and of its seven other dihedral transforms, in the reference's order
/// (original, rotated 90, 180, 270 degrees, mirrored left-right, mirrored top-bottom, mirrored
/// about the main and the other diagonal), and the quality.
pub fn pdq_dihedral(image: &DynamicImage) -> Option<([[u8; 32]; 8], u8)> {
    let _ = image;
    todo!("PDQ dihedral")
}

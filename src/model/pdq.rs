//! PDQ, Meta's perceptual hash: 256 bits and a quality score from an image's luminance, and the
//! hashes of its eight dihedral transforms.
//!
//! A port of the reference implementation (`facebook/ThreatExchange`, `pdq/cpp`: the hashing,
//! the Jarosz downscaling and Torben's median), written to give the same bits: every step runs
//! in `f32` with the reference's operation order, so that sums round as they do there. The
//! algorithm (see the reference's `pdqhash-2017-10-09.pdf`):
//!
//! 1. luminance `0.299 R + 0.587 G + 0.114 B` of every pixel;
//! 2. two passes of a box filter along the rows and then the columns (a tent filter; the window
//!    is an image side over 128, rounded up), then one sample per cell of a 64 x 64 grid, at the
//!    cell's centre;
//! 3. the quality: the sum of the quantised gradients of that 64 x 64 image, over 90, at most
//!    100 (flat images score low, and their hashes match unrelated pictures);
//! 4. a DCT of the 64 x 64 image, keeping the 16 x 16 lowest frequencies but the constant ones;
//! 5. one bit per coefficient: whether it is above the coefficients' median.
//!
//! The hashes of the image rotated or mirrored come from the 16 x 16 coefficients directly (a
//! mirror negates the odd-frequency ones, a transposition swaps the axes), as the reference
//! computes them, without hashing transformed images.
//!
//! Why here rather than a crate: `pdqhash` 0.1.1 depends on `image` 0.23 (this crate uses 0.25)
//! and has no dihedral hashes; `pdq-rs` compiles the C++ through `bindgen`, which needs libclang
//! at build time.
//!
//! What the hash is computed from, against the reference's entry points:
//!
//! - The pixels are 8-bit RGB: other layouts are converted first as [`to_rgb`] does (grey
//!   replicated, transparency composited on white), the pixels the engine keeps after decoding.
//! - The luminance is computed in `f64` and rounded to `f32`, as PyPI `pdqhash`'s `compute`
//!   does (NumPy arithmetic on the 8-bit pixels); the C++ command-line hasher computes it in
//!   `f32`, which can differ in the last bit of a pixel's luminance.
//! - Images of any size are hashed at full resolution, as PyPI `pdqhash` does (the C++
//!   command-line hasher first resizes images larger than 512 pixels on a side to 512 x 512).
//!   The filter runs over a stream of rows, keeping only as many rows as its window spans, so
//!   the memory it takes is about `8 x width x height / 128` bytes, not the reference's two
//!   full-size `f32` buffers; the result is the same to the bit.
//! - An image of exactly 64 x 64 pixels is hashed without the filter by [`pdq_hash`] and with it
//!   by [`pdq_dihedral`], as the reference's two entry points do; at that size the filter's
//!   window is one pixel and changes values by float rounding only.

use image::DynamicImage;

use super::preprocess::to_rgb;

/// Side of the downsampled image the DCT runs on.
const DOWNSAMPLED: usize = 64;
/// Side of the block of DCT coefficients kept.
const KEPT: usize = 16;
/// The smallest side hashed.
const MIN_SIDE: u32 = 5;

/// The PDQ hash of `image` (its 32 bytes, in the reference's byte order) and its quality (0 to
/// 100); `None` for an image under 5 pixels on a side.
pub fn pdq_hash(image: &DynamicImage) -> Option<([u8; 32], u8)> {
    let (small, quality) = downsample(image, true)?;
    let dct = dct_64_to_16(&small);
    Some((hash_bits(&dct), quality))
}

/// The hashes of `image` and of its seven other dihedral transforms, in the reference's order
/// (original; rotated 90, 180 and 270 degrees counter-clockwise; mirrored top-bottom, mirrored
/// left-right; mirrored about the main diagonal (transposed) and about the other diagonal), and
/// the quality.
pub fn pdq_dihedral(image: &DynamicImage) -> Option<([[u8; 32]; 8], u8)> {
    let (small, quality) = downsample(image, false)?;
    let dct = dct_64_to_16(&small);
    let hashes = Dihedral::ALL.map(|d| hash_bits(&d.apply(&dct)));
    Some((hashes, quality))
}

type Block64 = [[f32; DOWNSAMPLED]; DOWNSAMPLED];
type Block16 = [[f32; KEPT]; KEPT];

/// The luminance of a row of 8-bit RGB pixels: in `f64`, rounded to `f32`.
fn luma_row(rgb: &[u8], out: &mut [f32]) {
    for (px, y) in rgb.chunks_exact(3).zip(out.iter_mut()) {
        let (r, g, b) = (f64::from(px[0]), f64::from(px[1]), f64::from(px[2]));
        *y = (r * 0.299 + g * 0.587 + b * 0.114) as f32;
    }
}

/// The 64 x 64 image the DCT runs on and the quality, or `None` below the smallest side.
/// `direct_at_64`: take a 64 x 64 image as it is, as the reference's plain hash does.
fn downsample(image: &DynamicImage, direct_at_64: bool) -> Option<(Box<Block64>, u8)> {
    let (w, h) = (image.width(), image.height());
    if w < MIN_SIDE || h < MIN_SIDE {
        return None;
    }
    let converted;
    let rgb = match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => {
            converted = to_rgb(other);
            &converted
        }
    };
    let (w, h) = (w as usize, h as usize);
    let rows = rgb.as_raw().chunks_exact(3 * w);
    let mut small = Box::new([[0f32; DOWNSAMPLED]; DOWNSAMPLED]);
    if direct_at_64 && w == DOWNSAMPLED && h == DOWNSAMPLED {
        for (row, out) in rows.zip(small.iter_mut()) {
            luma_row(row, out);
        }
    } else {
        let mut filter = TentDownsampler::new(w, h);
        let mut luma = vec![0f32; w];
        for row in rows {
            luma_row(row, &mut luma);
            filter.push(&luma, &mut small);
        }
        filter.finish(&mut small);
    }
    let quality = quality(&small);
    Some((small, quality))
}

/// The reference's box-filter window along a side of `len` pixels sampled down to 64: half a
/// sample's span (two passes make the whole span), rounded up.
fn window(len: usize) -> usize {
    len.div_ceil(2 * DOWNSAMPLED)
}

/// Pixels a window of `window` reaches before its centre: with `window - half` after it, the
/// reference's asymmetric split (7 -> 3 before and 3 after, 8 -> 4 before and 3 after).
fn half(window: usize) -> usize {
    (window + 2) / 2
}

/// One box-filter pass along a contiguous line, as the reference runs it: a running sum that
/// grows over the first half window, slides, and shrinks over the last half window, each output
/// the sum over the count of values in it at that point.
fn box_line(input: &[f32], out: &mut [f32], window: usize) {
    let n = input.len();
    let half = half(window);
    let mut sum = 0f32;
    let mut count = 0usize;
    let (mut right, mut left, mut o) = (0usize, 0usize, 0usize);
    // The window's leading values: added, nothing written yet.
    for _ in 0..half - 1 {
        sum += input[right];
        count += 1;
        right += 1;
    }
    // The window grows to its full size.
    for _ in 0..window - half + 1 {
        sum += input[right];
        count += 1;
        out[o] = sum / count as f32;
        right += 1;
        o += 1;
    }
    // The full window slides.
    for _ in 0..n - window {
        sum += input[right];
        sum -= input[left];
        out[o] = sum / count as f32;
        left += 1;
        right += 1;
        o += 1;
    }
    // The window shrinks past the end.
    for _ in 0..half - 1 {
        sum -= input[left];
        count -= 1;
        out[o] = sum / count as f32;
        left += 1;
        o += 1;
    }
}

/// [`box_line`] along the columns of an image fed one row at a time: every column runs the same
/// sequence of additions, subtractions and divisions as `box_line` would on it, and the output
/// rows come out in order, `half - 1` rows behind the input. Keeps the last `window` input rows
/// (what the subtractions need) and one running sum per column.
struct ColumnBox {
    width: usize,
    window: usize,
    half: usize,
    /// The last `window` rows pushed, row `r` in slot `r % window`.
    ring: Vec<f32>,
    sums: Vec<f32>,
    pushed: usize,
    /// Output rows written by [`ColumnBox::drain`].
    drained: usize,
}

impl ColumnBox {
    fn new(width: usize, window: usize) -> Self {
        Self {
            width,
            window,
            half: half(window),
            ring: vec![0f32; width * window],
            sums: vec![0f32; width],
            pushed: 0,
            drained: 0,
        }
    }

    /// Takes the next input row; writes the next output row into `out` and returns true once
    /// the window has reached its first half.
    fn push(&mut self, row: &[f32], out: &mut [f32]) -> bool {
        let r = self.pushed;
        let slot = &mut self.ring[(r % self.window) * self.width..][..self.width];
        if r >= self.window {
            // The slot holds row `r - window`, which leaves the window as row `r` enters it.
            for ((s, &new), old) in self.sums.iter_mut().zip(row).zip(slot.iter_mut()) {
                *s += new;
                *s -= *old;
                *old = new;
            }
        } else {
            for ((s, &new), old) in self.sums.iter_mut().zip(row).zip(slot.iter_mut()) {
                *s += new;
                *old = new;
            }
        }
        self.pushed += 1;
        if self.pushed < self.half {
            return false;
        }
        let count = self.pushed.min(self.window) as f32;
        for (o, &s) in out.iter_mut().zip(&self.sums) {
            *o = s / count;
        }
        true
    }

    /// After the last input row: writes the next of the `half - 1` output rows left into `out`
    /// and returns true, or returns false when none is left.
    fn drain(&mut self, out: &mut [f32]) -> bool {
        let n = self.pushed;
        let k = self.drained;
        if k + 1 >= self.half {
            return false;
        }
        self.drained += 1;
        let leaving = n - self.window + k;
        let slot = &self.ring[(leaving % self.window) * self.width..][..self.width];
        let count = (self.window - 1 - k) as f32;
        for ((s, &old), o) in self.sums.iter_mut().zip(slot).zip(out.iter_mut()) {
            *s -= old;
            *o = *s / count;
        }
        true
    }
}

/// The reference's downscaling to 64 x 64 (a Jarosz tent filter of two box passes, each along
/// the rows then along the columns, then the centre sample of each cell) over a stream of rows.
struct TentDownsampler {
    row_window: usize,
    first: ColumnBox,
    second: ColumnBox,
    /// The input row sampled for each output row: the centre of its cell.
    sample_rows: [usize; DOWNSAMPLED],
    sample_cols: [usize; DOWNSAMPLED],
    /// Output rows of the second column pass so far.
    done: usize,
    line: Vec<f32>,
    between: Vec<f32>,
    column_out: Vec<f32>,
}

impl TentDownsampler {
    fn new(width: usize, height: usize) -> Self {
        // The reference computes the centres in f64: (i + 0.5) * side / 64, truncated.
        let centres = |side: usize| {
            std::array::from_fn(|i| ((i as f64 + 0.5) * side as f64 / DOWNSAMPLED as f64) as usize)
        };
        let column_window = window(height);
        Self {
            row_window: window(width),
            first: ColumnBox::new(width, column_window),
            second: ColumnBox::new(width, column_window),
            sample_rows: centres(height),
            sample_cols: centres(width),
            done: 0,
            line: vec![0f32; width],
            between: vec![0f32; width],
            column_out: vec![0f32; width],
        }
    }

    /// Takes the next row of luminance.
    fn push(&mut self, luma: &[f32], out: &mut Block64) {
        box_line(luma, &mut self.line, self.row_window);
        if self.first.push(&self.line, &mut self.between) {
            self.second_pass(out);
        }
    }

    /// Flushes the rows still in the filters' windows.
    fn finish(mut self, out: &mut Block64) {
        while self.first.drain(&mut self.between) {
            self.second_pass(out);
        }
        let mut column_out = std::mem::take(&mut self.column_out);
        while self.second.drain(&mut column_out) {
            self.sample(&column_out, out);
        }
    }

    /// Runs a row that came out of the first pass (in `between`) through the second.
    fn second_pass(&mut self, out: &mut Block64) {
        box_line(&self.between, &mut self.line, self.row_window);
        let mut column_out = std::mem::take(&mut self.column_out);
        if self.second.push(&self.line, &mut column_out) {
            self.sample(&column_out, out);
        }
        self.column_out = column_out;
    }

    /// Takes the samples of the next filtered row, for every output row centred on it.
    fn sample(&mut self, row: &[f32], out: &mut Block64) {
        let r = self.done;
        self.done += 1;
        for (i, &sr) in self.sample_rows.iter().enumerate() {
            if sr == r {
                for (o, &c) in out[i].iter_mut().zip(&self.sample_cols) {
                    *o = row[c];
                }
            }
        }
    }
}

/// The reference's quality heuristic: the gradients between neighbours of the 64 x 64 image,
/// each as a whole percentage of the full range (truncated), summed, over 90, at most 100.
fn quality(small: &Block64) -> u8 {
    let step = |u: f32, v: f32| ((((u - v) * 100.0) / 255.0) as i32).abs();
    let mut sum = 0i32;
    for (upper, lower) in small.iter().zip(&small[1..]) {
        for (&u, &v) in upper.iter().zip(lower) {
            sum += step(u, v);
        }
    }
    for row in small.iter() {
        for (&u, &v) in row.iter().zip(&row[1..]) {
            sum += step(u, v);
        }
    }
    (sum / 90).min(100) as u8
}

/// Rows 1 to 16 of the 64-point DCT-II matrix (the constant row 0 left out), scaled by
/// sqrt(2 / 64): `D[i][j] = s cos(pi / 128 (i + 1) (2 j + 1))`, the scale in `f32` and the
/// product in `f64`, rounded to `f32`, as the reference builds it.
fn dct_matrix() -> &'static [[f32; DOWNSAMPLED]; KEPT] {
    static MATRIX: std::sync::OnceLock<[[f32; DOWNSAMPLED]; KEPT]> = std::sync::OnceLock::new();
    MATRIX.get_or_init(|| {
        let scale = (2.0 / DOWNSAMPLED as f64).sqrt() as f32;
        let step = std::f64::consts::PI / 2.0 / DOWNSAMPLED as f64;
        std::array::from_fn(|i| {
            std::array::from_fn(|j| {
                let angle = step * (i + 1) as f64 * (2 * j + 1) as f64;
                (f64::from(scale) * angle.cos()) as f32
            })
        })
    })
}

/// The 16 x 16 low frequencies of the 64 x 64 image's DCT: `D A D^T`, each sum accumulated in
/// `f32` in index order as the reference does.
fn dct_64_to_16(a: &Block64) -> Block16 {
    let d = dct_matrix();
    let mut t = [[0f32; DOWNSAMPLED]; KEPT];
    for (i, t_row) in t.iter_mut().enumerate() {
        for (j, t_ij) in t_row.iter_mut().enumerate() {
            let mut sum = 0f32;
            for k in 0..DOWNSAMPLED {
                sum += d[i][k] * a[k][j];
            }
            *t_ij = sum;
        }
    }
    let mut b = [[0f32; KEPT]; KEPT];
    for (i, b_row) in b.iter_mut().enumerate() {
        for (j, b_ij) in b_row.iter_mut().enumerate() {
            let mut sum = 0f32;
            for k in 0..DOWNSAMPLED {
                sum += t[i][k] * d[j][k];
            }
            *b_ij = sum;
        }
    }
    b
}

/// The median of `values` by Torben Mogensen's method, as the reference finds it: bisects on
/// value between the minimum and the maximum, without sorting. For an even count it is the
/// lower middle value.
fn torben_median(values: &[f32]) -> f32 {
    let n = values.len();
    let mut min = values[0];
    let mut max = values[0];
    for &v in &values[1..] {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let middle = n.div_ceil(2);
    loop {
        let guess = (min + max) / 2.0;
        let (mut less, mut greater, mut equal) = (0usize, 0usize, 0usize);
        let mut max_below = min;
        let mut min_above = max;
        for &v in values {
            if v < guess {
                less += 1;
                if v > max_below {
                    max_below = v;
                }
            } else if v > guess {
                greater += 1;
                if v < min_above {
                    min_above = v;
                }
            } else {
                equal += 1;
            }
        }
        if less <= middle && greater <= middle {
            return if less >= middle {
                max_below
            } else if less + equal >= middle {
                guess
            } else {
                min_above
            };
        }
        if less > greater {
            max = max_below;
        } else {
            min = min_above;
        }
    }
}

/// The hash of a block of coefficients: bit `16 i + j` is set when coefficient `(i, j)` is above
/// the median. The reference keeps the bits in sixteen 16-bit words, bit `k` in word `k / 16`,
/// and writes the words from the last to the first as hex; the bytes here are in that written
/// order, so bit `k` is bit `k % 8` of byte `31 - k / 8`.
fn hash_bits(block: &Block16) -> [u8; 32] {
    let flat: Vec<f32> = block.iter().flatten().copied().collect();
    let median = torben_median(&flat);
    let mut out = [0u8; 32];
    for (k, &v) in flat.iter().enumerate() {
        if v > median {
            out[31 - k / 8] |= 1 << (k % 8);
        }
    }
    out
}

/// The eight symmetries of the square, as the reference orders its dihedral hashes.
#[derive(Clone, Copy)]
enum Dihedral {
    Original,
    Rotate90,
    Rotate180,
    Rotate270,
    /// Mirrored top-bottom (about the horizontal axis).
    FlipX,
    /// Mirrored left-right (about the vertical axis).
    FlipY,
    /// Mirrored about the main diagonal (transposed).
    FlipPlus1,
    /// Mirrored about the other diagonal.
    FlipMinus1,
}

impl Dihedral {
    const ALL: [Dihedral; 8] = [
        Dihedral::Original,
        Dihedral::Rotate90,
        Dihedral::Rotate180,
        Dihedral::Rotate270,
        Dihedral::FlipX,
        Dihedral::FlipY,
        Dihedral::FlipPlus1,
        Dihedral::FlipMinus1,
    ];

    /// The DCT coefficients of the transformed image, from those of the image. Coefficient
    /// `(i, j)` is of vertical frequency `i + 1` and horizontal frequency `j + 1`; mirroring an
    /// axis negates the coefficients odd along it (even `i` or `j` here), and the transforms
    /// that swap the axes transpose the block.
    fn apply(self, a: &Block16) -> Block16 {
        let mut b = [[0f32; KEPT]; KEPT];
        for i in 0..KEPT {
            for j in 0..KEPT {
                let v = a[i][j];
                let odd_i = i % 2 == 1;
                let odd_j = j % 2 == 1;
                let keep = |k: bool| if k { v } else { -v };
                match self {
                    Dihedral::Original => b[i][j] = v,
                    Dihedral::Rotate90 => b[j][i] = keep(odd_j),
                    Dihedral::Rotate180 => b[i][j] = keep(odd_i == odd_j),
                    Dihedral::Rotate270 => b[j][i] = keep(odd_i),
                    Dihedral::FlipX => b[i][j] = keep(odd_i),
                    Dihedral::FlipY => b[i][j] = keep(odd_j),
                    Dihedral::FlipPlus1 => b[j][i] = v,
                    Dihedral::FlipMinus1 => b[j][i] = keep(odd_i == odd_j),
                }
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use image::{GrayImage, RgbImage, RgbaImage};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// The reference's downscaling on whole buffers: all rows, all columns, then all rows and
    /// columns again, then the samples.
    fn downsample_whole(luma: &[f32], w: usize, h: usize) -> Block64 {
        let mut a = luma.to_vec();
        let mut b = vec![0f32; w * h];
        let (rw, cw) = (window(w), window(h));
        let mut col_in = vec![0f32; h];
        let mut col_out = vec![0f32; h];
        for _pass in 0..2 {
            for r in 0..h {
                box_line(&a[r * w..][..w], &mut b[r * w..][..w], rw);
            }
            for c in 0..w {
                for r in 0..h {
                    col_in[r] = b[r * w + c];
                }
                box_line(&col_in, &mut col_out, cw);
                for r in 0..h {
                    a[r * w + c] = col_out[r];
                }
            }
        }
        let centre = |i: usize, side: usize| ((i as f64 + 0.5) * side as f64 / 64.0) as usize;
        std::array::from_fn(|i| std::array::from_fn(|j| a[centre(i, h) * w + centre(j, w)]))
    }

    #[test]
    fn streamed_filter_equals_the_whole_buffer_one_to_the_bit() {
        let mut rng = StdRng::seed_from_u64(7);
        for (w, h) in [
            (5, 5),
            (64, 64),
            (65, 7),
            (129, 300),
            (300, 129),
            (517, 260),
        ] {
            let luma: Vec<f32> = (0..w * h)
                .map(|_| rng.random_range(0.0f32..255.0))
                .collect();
            let mut streamed = Box::new([[0f32; 64]; 64]);
            let mut filter = TentDownsampler::new(w, h);
            for row in luma.chunks_exact(w) {
                filter.push(row, &mut streamed);
            }
            filter.finish(&mut streamed);
            let whole = downsample_whole(&luma, w, h);
            for i in 0..64 {
                for j in 0..64 {
                    assert_eq!(
                        streamed[i][j].to_bits(),
                        whole[i][j].to_bits(),
                        "{w}x{h} at ({i}, {j})"
                    );
                }
            }
        }
    }

    #[test]
    fn box_line_matches_the_reference_window_counts() {
        // The reference's worked example: window 7 over 0..16 gives the sums
        // 6 10 15 21 28 35 ... 84 75 65 54 over 4 5 6 7 7 ... 7 6 5 4 values.
        let input: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let mut out = vec![0f32; 16];
        box_line(&input, &mut out, 7);
        let sums = [
            6, 10, 15, 21, 28, 35, 42, 49, 56, 63, 70, 77, 84, 75, 65, 54,
        ];
        let counts = [4, 5, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 6, 5, 4];
        for k in 0..16 {
            assert_eq!(out[k], sums[k] as f32 / counts[k] as f32, "{k}");
        }
    }

    #[test]
    fn torben_finds_the_lower_median() {
        let mut rng = StdRng::seed_from_u64(1);
        for n in [1usize, 2, 3, 4, 255, 256] {
            let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(-5.0f32..5.0)).collect();
            let m = torben_median(&v);
            v.sort_by(f32::total_cmp);
            assert_eq!(m, v[(n - 1) / 2], "n = {n}");
        }
        // Ties.
        assert_eq!(torben_median(&[1.0, 1.0, 1.0, 2.0]), 1.0);
    }

    #[test]
    fn small_images_have_no_hash_and_flat_ones_no_quality() {
        let tiny = DynamicImage::ImageRgb8(RgbImage::new(4, 100));
        assert!(pdq_hash(&tiny).is_none());
        assert!(pdq_dihedral(&tiny).is_none());
        let flat = DynamicImage::ImageRgb8(RgbImage::from_pixel(80, 60, image::Rgb([90; 3])));
        assert_eq!(pdq_hash(&flat).unwrap().1, 0);
    }

    /// A smooth picture with structure at every scale PDQ sees, like a photo's.
    fn picture(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            let v = 128.0
                + 60.0 * (7.0 * fx + 3.0 * fy * fy).sin()
                + 50.0 * (11.0 * fy * fx + 2.0 * fx).cos();
            image::Rgb([v as u8, (255.0 - v) as u8, (v * fx) as u8])
        })
    }

    fn distance(a: &[u8; 32], b: &[u8; 32]) -> u32 {
        a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
    }

    #[test]
    fn layouts_hash_as_their_rgb_pixels() {
        let rgb = picture(90, 70);
        let grey = GrayImage::from_fn(90, 70, |x, y| image::Luma([rgb.get_pixel(x, y)[1]]));
        let grey_rgb = DynamicImage::ImageLuma8(grey.clone()).to_rgb8();
        assert_eq!(
            pdq_hash(&DynamicImage::ImageLuma8(grey)),
            pdq_hash(&DynamicImage::ImageRgb8(grey_rgb))
        );
        // Opaque RGBA is its RGB.
        let rgba = RgbaImage::from_fn(90, 70, |x, y| {
            let p = rgb.get_pixel(x, y);
            image::Rgba([p[0], p[1], p[2], 255])
        });
        assert_eq!(
            pdq_hash(&DynamicImage::ImageRgba8(rgba)),
            pdq_hash(&DynamicImage::ImageRgb8(rgb))
        );
    }

    /// The image's own transforms, in the order of the dihedral hashes (the `image` crate
    /// rotates clockwise).
    fn transforms(img: &DynamicImage) -> [DynamicImage; 8] {
        [
            img.clone(),
            img.rotate270(),
            img.rotate180(),
            img.rotate90(),
            img.flipv(),
            img.fliph(),
            img.rotate90().fliph(),
            img.rotate270().fliph(),
        ]
    }

    #[test]
    fn dihedral_hashes_are_the_hashes_of_the_transformed_image() {
        // At 64 x 64 pixels the filter and the sampling move nothing, so the hashes computed
        // from the coefficients are those of the transformed pixels exactly.
        let img = DynamicImage::ImageRgb8(picture(64, 64));
        let (hashes, q) = pdq_dihedral(&img).unwrap();
        assert_eq!(pdq_hash(&img).unwrap(), (hashes[0], q));
        for (k, t) in transforms(&img).iter().enumerate() {
            assert_eq!(pdq_hash(t).unwrap().0, hashes[k], "variant {k}");
        }
        // Larger, the filter's window is not centred (one pixel more before than after when
        // even) and the samples are not symmetric, so a mirrored image filters a little
        // differently: near, and nearer than any other variant.
        let img = DynamicImage::ImageRgb8(picture(640, 480));
        let (hashes, q) = pdq_dihedral(&img).unwrap();
        assert_eq!(pdq_hash(&img).unwrap(), (hashes[0], q));
        for (k, t) in transforms(&img).iter().enumerate() {
            let (h, _) = pdq_hash(t).unwrap();
            let own = distance(&h, &hashes[k]);
            assert!(own <= 12, "variant {k}: {own}");
            for (other, hk) in hashes.iter().enumerate() {
                if other != k {
                    assert!(distance(&h, hk) > own + 8, "variant {k} against {other}");
                }
            }
        }
    }

    #[test]
    fn large_images_hash_without_full_size_buffers() {
        // 12 MP: the full-size f32 buffers would take 96 MB; the filter keeps 2 x 24 rows.
        // The same picture at a tenth of the size hashes nearly alike.
        let (hash, _) = pdq_hash(&DynamicImage::ImageRgb8(picture(4000, 3000))).unwrap();
        let (small, _) = pdq_hash(&DynamicImage::ImageRgb8(picture(400, 300))).unwrap();
        let d = distance(&hash, &small);
        assert!(d <= 8, "{d}");
    }
}

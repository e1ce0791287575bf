//! Pillow's bicubic resampling, reimplemented value for value so that blipsearch feeds BLIP the
//! same pixels as the reference (`PIL.Image.resize(..., BICUBIC)`, which `BlipImageProcessor` and
//! the original BLIP transform call).
//!
//! Pillow resamples horizontally first, rounds the intermediate image to 8 bits, then resamples
//! vertically; each pass uses a cubic kernel (a = -0.5) widened by the downscale factor, weights
//! normalised in f64 and then turned into 22-bit fixed point. SIMD resizers (fast_image_resize
//! among them) use 16-bit weights and the other pass order, which moves values by 1-4 levels.

/// Fixed-point precision of the weights (Pillow: `32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output position: the first input index and its fixed-point weights.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

fn coefficients(in_size: usize, out_size: usize) -> Coeffs {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; `center - support + 0.5` can be negative.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut total = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            total += w;
        }
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let w = if total != 0.0 { kx / total } else { *kx };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

#[inline]
fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resizes packed 8-bit pixels with `channels` per pixel from `w` x `h` to `out_w` x `out_h`.
pub fn resize_bicubic_u8(
    src: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    assert_eq!(
        src.len(),
        w * h * channels,
        "buffer does not match its size"
    );
    let round = 1i64 << (PRECISION_BITS - 1);
    let need_h = out_w != w;
    let need_v = out_h != h;
    let vert = coefficients(h, out_h);
    // Only the rows the vertical pass reads need the horizontal pass.
    let (first_row, last_row) = if need_v {
        let (s, _) = vert.bounds[0];
        let (ls, lsize) = vert.bounds[out_h - 1];
        (s, ls + lsize)
    } else {
        (0, h)
    };
    let tmp_h = last_row - first_row;
    let horizontal: Vec<u8> = if need_h {
        let c = coefficients(w, out_w);
        let mut out = vec![0u8; out_w * tmp_h * channels];
        for y in 0..tmp_h {
            let row = &src[(y + first_row) * w * channels..(y + first_row + 1) * w * channels];
            for (xx, &(xmin, xmax)) in c.bounds.iter().enumerate() {
                let k = &c.weights[xx * c.ksize..xx * c.ksize + xmax];
                for ch in 0..channels {
                    let mut ss = round;
                    for (x, &kw) in k.iter().enumerate() {
                        ss += i64::from(row[(xmin + x) * channels + ch]) * i64::from(kw);
                    }
                    out[(y * out_w + xx) * channels + ch] = clip8(ss);
                }
            }
        }
        out
    } else {
        src[first_row * w * channels..last_row * w * channels].to_vec()
    };
    if !need_v {
        return horizontal;
    }
    let row_len = out_w * channels;
    let mut out = vec![0u8; out_h * row_len];
    let mut acc = vec![0i64; row_len];
    for (yy, &(ymin, ymax)) in vert.bounds.iter().enumerate() {
        let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + ymax];
        acc.fill(round);
        for (y, &kw) in k.iter().enumerate() {
            let row =
                &horizontal[(ymin - first_row + y) * row_len..(ymin - first_row + y + 1) * row_len];
            let kw = i64::from(kw);
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i64::from(p) * kw;
            }
        }
        for (o, &a) in out[yy * row_len..(yy + 1) * row_len].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(451, 32), (200, 384), (384, 384), (7, 3)] {
            let c = coefficients(i, o);
            for xx in 0..o {
                let s: i64 = c.weights[xx * c.ksize..(xx + 1) * c.ksize]
                    .iter()
                    .map(|&w| i64::from(w))
                    .sum();
                // Each weight is rounded on its own: at most half a unit of error apiece.
                let tol = c.ksize as i64 / 2 + 1;
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= tol,
                    "{i}->{o} at {xx}: {s}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 13 * 9 * 3];
        let out = resize_bicubic_u8(&src, 13, 9, 3, 5, 17);
        assert!(out.iter().all(|&v| v == 77));
    }

    #[test]
    fn identity_size_is_a_copy() {
        let src: Vec<u8> = (0..6 * 4 * 3).map(|v| v as u8).collect();
        assert_eq!(resize_bicubic_u8(&src, 6, 4, 3, 6, 4), src);
    }
}

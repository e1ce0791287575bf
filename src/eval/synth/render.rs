//! Painting a [`Scene`] into pixels: a light, possibly noisy background and the shapes in their
//! half of the image, with jittered colour, size and placement and soft (supersampled) edges.

use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::Rng;

use super::scene::{Position, Scene, Shape, Size};

impl Scene {
    /// Paints the scene on a `size` x `size` canvas.
    pub fn render(&self, size: u32, rng: &mut StdRng) -> RgbImage {
        const BACKGROUNDS: [[u8; 3]; 4] = [
            [245, 245, 245],
            [232, 232, 226],
            [250, 244, 232],
            [234, 240, 246],
        ];
        let bg = BACKGROUNDS[rng.random_range(0..BACKGROUNDS.len())];
        let noise: i32 = if rng.random_bool(0.5) { 10 } else { 0 };
        let mut img = RgbImage::from_fn(size, size, |_, _| {
            let d = if noise > 0 {
                rng.random_range(-noise..=noise)
            } else {
                0
            };
            Rgb(bg.map(|c| (c as i32 + d).clamp(0, 255) as u8))
        });
        let s = size as f32;
        let base = self.colour.rgb();
        let fill: [u8; 3] =
            base.map(|c| (c as i32 + rng.random_range(-12..=12)).clamp(0, 255) as u8);
        // Radius (half the width) of every shape.
        let r = match self.size {
            Size::Small => s * 0.07,
            Size::Large => s * 0.14,
        } * rng.random_range(0.9..1.1);
        // The half the shapes live in, as (x0, y0, width, height), and whether slots run along y.
        let half = s / 2.0;
        let (x0, y0, w, h, vertical) = match self.position {
            Position::Left => (0.0, 0.0, half, s, true),
            Position::Right => (half, 0.0, half, s, true),
            Position::Top => (0.0, 0.0, s, half, false),
            Position::Bottom => (0.0, half, s, half, false),
        };
        let n = self.count as f32;
        for i in 0..self.count {
            let slot = (i as f32 + 0.5) / n;
            let (long, short) = if vertical { (h, w) } else { (w, h) };
            let slot_len = long / n;
            // Small jitter, so that a lone shape "on the left" never sits in a corner where it
            // could as well be "at the top": the caption must be decidable from the pixels.
            let jitter_long = (slot_len / 2.0 - r - 1.0).max(0.0).min(0.15 * slot_len);
            let jitter_short = (short / 2.0 - r - 1.0).max(0.0) * 0.5;
            let a = slot * long + sym(rng, jitter_long);
            let b = short / 2.0 + sym(rng, jitter_short);
            let (cx, cy) = if vertical {
                (x0 + b, y0 + a)
            } else {
                (x0 + a, y0 + b)
            };
            paint(&mut img, self.shape, cx, cy, r, fill);
        }
        img
    }
}

fn sym(rng: &mut StdRng, amplitude: f32) -> f32 {
    if amplitude <= 0.0 {
        0.0
    } else {
        rng.random_range(-amplitude..amplitude)
    }
}

/// Whether (x, y) lies inside `shape` centred at (cx, cy) with radius `r`.
fn inside(shape: Shape, x: f32, y: f32, cx: f32, cy: f32, r: f32) -> bool {
    let (dx, dy) = (x - cx, y - cy);
    match shape {
        Shape::Circle => dx * dx + dy * dy <= r * r,
        // Same area as the circle would be too small to tell apart at 4 px: 0.85 r half-side.
        Shape::Square => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
        Shape::Triangle => {
            // Apex (0, -r), base corners (-r, 0.8r) and (r, 0.8r).
            let top = -r;
            let bottom = 0.8 * r;
            if dy < top || dy > bottom {
                return false;
            }
            let half_width = r * (dy - top) / (bottom - top);
            dx.abs() <= half_width
        }
    }
}

/// Paints one shape with 4x4 supersampled coverage (soft edges, as a photo would have).
fn paint(img: &mut RgbImage, shape: Shape, cx: f32, cy: f32, r: f32, fill: [u8; 3]) {
    let (w, h) = img.dimensions();
    let x_lo = ((cx - r - 1.0).floor().max(0.0)) as u32;
    let x_hi = ((cx + r + 1.0).ceil() as u32).min(w);
    let y_lo = ((cy - r - 1.0).floor().max(0.0)) as u32;
    let y_hi = ((cy + r + 1.0).ceil() as u32).min(h);
    for y in y_lo..y_hi {
        for x in x_lo..x_hi {
            let mut hits = 0u32;
            for sy in 0..4 {
                for sx in 0..4 {
                    let px = x as f32 + (sx as f32 + 0.5) / 4.0;
                    let py = y as f32 + (sy as f32 + 0.5) / 4.0;
                    if inside(shape, px, py, cx, cy, r) {
                        hits += 1;
                    }
                }
            }
            if hits == 0 {
                continue;
            }
            let a = hits as f32 / 16.0;
            let p = img.get_pixel_mut(x, y);
            for (v, f) in p.0.iter_mut().zip(fill) {
                *v = (*v as f32 * (1.0 - a) + f as f32 * a).round() as u8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::eval::synth::scene::Colour;

    #[test]
    fn shapes_are_painted_in_their_half() {
        let mut rng = StdRng::seed_from_u64(3);
        for position in Position::ALL {
            let s = Scene {
                shape: Shape::Square,
                colour: Colour::Blue,
                size: Size::Large,
                count: 3,
                position,
            };
            let img = s.render(64, &mut rng);
            let blue = |x: u32, y: u32| {
                let p = img.get_pixel(x, y).0;
                p[2] > 150 && p[0] < 120
            };
            let mut inside = 0;
            let mut outside = 0;
            for y in 0..64 {
                for x in 0..64 {
                    if !blue(x, y) {
                        continue;
                    }
                    let in_half = match position {
                        Position::Left => x < 32,
                        Position::Right => x >= 32,
                        Position::Top => y < 32,
                        Position::Bottom => y >= 32,
                    };
                    if in_half {
                        inside += 1
                    } else {
                        outside += 1
                    }
                }
            }
            // Three large squares of side ~15 px.
            assert!(inside > 3 * 150, "{position:?}: {inside}");
            assert_eq!(outside, 0, "{position:?}");
        }
    }
}

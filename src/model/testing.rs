//! Seeded test data for the kernel tests of this layer: the same inputs on every run, so a
//! tolerance that passes once passes always.

use candle_core::{Device, Shape, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A seeded uniform draw in [-1, 1), advancing `seed` (a linear congruential generator).
pub(crate) fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// A CPU tensor of normal draws (`mean`, `std`) from a generator seeded with `seed`: the seeded
/// counterpart of `Tensor::randn`.
pub(crate) fn randn<S: Into<Shape>>(seed: u64, mean: f32, std: f32, shape: S) -> Tensor {
    let shape = shape.into();
    let mut rng = StdRng::seed_from_u64(seed);
    let data: Vec<f32> = (0..shape.elem_count())
        .map(|_| {
            // Box-Muller: 1 - u keeps the logarithm's argument in (0, 1].
            let (u, v): (f64, f64) = (rng.random(), rng.random());
            let z = (-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos();
            mean + std * z as f32
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("the data fills the shape")
}

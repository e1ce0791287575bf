//! The decoder as the search loops drive it: [`Stepper`] (prefill, keep some rows, one token
//! more per row), [`ModelStepper`] over BLIP's text decoder with a KV cache; and what a search
//! is given ([`Plan`]) and gives back ([`Generated`]).

use candle_core::{DType, Device, Tensor};

use super::logits::Logits;
use crate::model::error::Result;
use crate::model::text::{ImageKv, KvCache, TextDecoder};

/// What the search loops need from a decoder. Rows are laid out image by image,
/// `rows_per_image` consecutive rows each, all of the same length.
pub(super) trait Stepper {
    /// Runs the prompt once per image (one row per image) and returns the next-token logits.
    fn prefill(&mut self, prompt: &[u32]) -> Result<Logits>;
    /// Keeps rows `rows` (indices into the current rows) and images `images` (indices into the
    /// current images), `rows_per_image` rows per image afterwards.
    fn select(&mut self, rows: &[u32], images: &[u32], rows_per_image: usize) -> Result<()>;
    /// Appends one token per row and returns the next-token logits.
    fn step(&mut self, tokens: &[u32]) -> Result<Logits>;
}

/// [`Stepper`] over the BLIP text decoder with a KV cache.
pub(super) struct ModelStepper<'a> {
    pub(super) decoder: &'a TextDecoder,
    pub(super) images: ImageKv,
    pub(super) rows_per_image: usize,
    pub(super) cache: KvCache,
    pub(super) device: Device,
}

impl ModelStepper<'_> {
    fn run(&mut self, ids: &Tensor) -> Result<Logits> {
        let image = self.images.shared_by(self.rows_per_image);
        let h = self
            .decoder
            .bert
            .forward(ids, None, Some(&image), true, Some(&mut self.cache))?;
        let l = h.dims()[1];
        let logits = self
            .decoder
            .head
            .forward(&h.narrow(1, l - 1, 1)?.contiguous()?)?
            .squeeze(1)?;
        let (_, vocab) = logits.dims2()?;
        Ok(Logits {
            data: logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            vocab,
        })
    }
}

fn is_identity(index: &[u32], len: usize) -> bool {
    index.len() == len && index.iter().enumerate().all(|(i, &j)| i as u32 == j)
}

impl Stepper for ModelStepper<'_> {
    fn prefill(&mut self, prompt: &[u32]) -> Result<Logits> {
        let n = self.images.batch();
        let ids: Vec<u32> = (0..n).flat_map(|_| prompt.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, (n, prompt.len()), &self.device)?;
        self.rows_per_image = 1;
        self.run(&ids)
    }

    fn select(&mut self, rows: &[u32], images: &[u32], rows_per_image: usize) -> Result<()> {
        let current_rows = self.images.batch() * self.rows_per_image;
        if !is_identity(rows, current_rows) {
            self.cache.select(&Tensor::new(rows, &self.device)?)?;
        }
        if !is_identity(images, self.images.batch()) {
            self.images = self.images.select(&Tensor::new(images, &self.device)?)?;
        }
        self.rows_per_image = rows_per_image;
        Ok(())
    }

    fn step(&mut self, tokens: &[u32]) -> Result<Logits> {
        let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), &self.device)?;
        self.run(&ids)
    }
}

/// Decoder input and length limits of one generation call.
pub(super) struct Plan {
    pub(super) prompt: Vec<u32>,
    pub(super) max_length: usize,
    pub(super) min_length: usize,
}

/// A finished decoder sequence.
#[derive(Debug, Clone)]
pub(super) struct Generated {
    pub(super) ids: Vec<u32>,
    pub(super) score: Option<f32>,
}

//! Dataset bootstrapping with CapFilt (BLIP §3.3): for every image of a captioned dataset the
//! captioner writes a beam caption and nucleus samples, and the ITM filter judges those together
//! with the image's own texts; the result is the bootstrapped dataset (every text with its
//! p(match), source and verdict) and counts of texts kept and dropped by source, as the paper
//! reports them. When the input marks texts as wrong (the synthetic world does), the filter's
//! precision and recall at dropping them are measured too.

use std::io::Write;
use std::path::Path;

use serde::Serialize;

use super::dataset::Dataset;
use super::error::{check_batch_size, EvalError, Result};
use crate::model::preprocess::{load_image, DecodeLimits};
use crate::model::{capfilt_images, CandidateSource, CapFiltParams, Captioner, Retriever};
use crate::progress::{Event, Progress};

/// Options of [`capfilt_dataset`].
#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    /// Folder the dataset's relative image paths are under.
    pub images_root: std::path::PathBuf,
    /// Images per batch.
    pub batch_size: usize,
    /// Image decoding limits.
    pub limits: DecodeLimits,
    /// Captioner and filter settings.
    pub params: CapFiltParams,
}

/// One line of the bootstrapped dataset.
#[derive(Debug, Clone, Serialize)]
pub struct BootstrapRecord {
    /// The image path as the input wrote it.
    pub image: String,
    /// The text.
    pub caption: String,
    /// given, beam or sample.
    pub source: CandidateSource,
    /// ITM p(match).
    pub p_match: f32,
    /// Whether the filter keeps it.
    pub kept: bool,
    /// The input's mark for a given text known to be wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wrong: Option<bool>,
}

/// Texts of one source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SourceCounts {
    /// Judged.
    pub total: usize,
    /// Kept.
    pub kept: usize,
    /// Dropped.
    pub dropped: usize,
}

impl SourceCounts {
    fn add(&mut self, kept: bool) {
        self.total += 1;
        if kept {
            self.kept += 1;
        } else {
            self.dropped += 1;
        }
    }
}

/// How well the filter drops the given texts marked wrong (dropping is the positive class).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct FilterQuality {
    /// Given texts marked wrong.
    pub wrong: usize,
    /// Given texts marked right.
    pub right: usize,
    /// Wrong texts dropped.
    pub dropped_wrong: usize,
    /// Right texts dropped.
    pub dropped_right: usize,
    /// dropped_wrong / (dropped_wrong + dropped_right); absent when nothing was dropped.
    pub precision: Option<f64>,
    /// dropped_wrong / wrong; absent without wrong texts.
    pub recall: Option<f64>,
}

/// An image that could not be used.
#[derive(Debug, Clone, Serialize)]
pub struct SkippedImage {
    /// The image path as the input wrote it.
    pub image: String,
    /// Why.
    pub error: String,
}

/// What [`capfilt_dataset`] did.
#[derive(Debug, Clone, Serialize)]
pub struct BootstrapSummary {
    /// Images processed.
    pub images: usize,
    /// Images skipped (missing or unreadable).
    pub skipped: Vec<SkippedImage>,
    /// p(match) threshold.
    pub threshold: f32,
    /// The input's texts.
    pub given: SourceCounts,
    /// Beam captions.
    pub beam: SourceCounts,
    /// Nucleus samples.
    pub sample: SourceCounts,
    /// Texts in the output marked kept, all sources.
    pub kept: usize,
    /// Filter quality on texts marked wrong/right, when the input marks any.
    pub quality: Option<FilterQuality>,
}

/// Runs CapFilt over every image of `data` and writes the bootstrapped dataset to `out` as JSON
/// lines of [`BootstrapRecord`] (every text, kept or not). Images that are missing or cannot be
/// decoded are reported in the summary and skipped.
pub fn capfilt_dataset(
    captioner: &Captioner,
    filter: &Retriever,
    data: &Dataset,
    out: &Path,
    opts: &BootstrapOptions,
    progress: &dyn Progress,
) -> Result<BootstrapSummary> {
    check_batch_size(opts.batch_size)?;
    let file = fs_err::File::create(out)?;
    let mut writer = std::io::BufWriter::new(file);
    let mut summary = BootstrapSummary {
        images: 0,
        skipped: Vec::new(),
        threshold: opts.params.threshold,
        given: SourceCounts::default(),
        beam: SourceCounts::default(),
        sample: SourceCounts::default(),
        kept: 0,
        quality: None,
    };
    let mut quality = FilterQuality::default();
    progress.event(Event::Started {
        what: "images",
        total: data.items.len() as u64,
        done: 0,
    });
    for chunk in data.items.chunks(opts.batch_size) {
        let mut images = Vec::with_capacity(chunk.len());
        let mut items = Vec::with_capacity(chunk.len());
        for item in chunk {
            let path = data.resolve(&opts.images_root, item);
            match load_image(&path, opts.limits) {
                Ok(img) => {
                    images.push(img);
                    items.push(item);
                }
                Err(e) => {
                    tracing::warn!("skipping {}: {e}", path.display());
                    summary.skipped.push(SkippedImage {
                        image: item.image.clone(),
                        error: e.to_string(),
                    });
                }
            }
        }
        progress.event(Event::Done {
            n: chunk.len() as u64,
        });
        if images.is_empty() {
            continue;
        }
        let given: Vec<Vec<String>> = items
            .iter()
            .map(|it| it.texts.iter().map(|t| t.text.clone()).collect())
            .collect();
        let judged = capfilt_images(captioner, filter, &images, &given, &opts.params)?;
        for (item, candidates) in items.iter().zip(judged) {
            summary.images += 1;
            for (j, c) in candidates.into_iter().enumerate() {
                // Given texts come first, in the item's order.
                let wrong = match c.source {
                    CandidateSource::Given => item.texts.get(j).and_then(|t| t.wrong),
                    _ => None,
                };
                match c.source {
                    CandidateSource::Given => summary.given.add(c.kept),
                    CandidateSource::Beam => summary.beam.add(c.kept),
                    CandidateSource::Sample => summary.sample.add(c.kept),
                }
                if c.kept {
                    summary.kept += 1;
                }
                match wrong {
                    Some(true) => {
                        quality.wrong += 1;
                        if !c.kept {
                            quality.dropped_wrong += 1;
                        }
                    }
                    Some(false) => {
                        quality.right += 1;
                        if !c.kept {
                            quality.dropped_right += 1;
                        }
                    }
                    None => {}
                }
                let record = BootstrapRecord {
                    image: item.image.clone(),
                    caption: c.text,
                    source: c.source,
                    p_match: c.p_match,
                    kept: c.kept,
                    wrong,
                };
                let line = serde_json::to_string(&record)
                    .map_err(|e| EvalError::InvalidInput(format!("cannot serialise: {e}")))?;
                writeln!(writer, "{line}")?;
            }
        }
    }
    progress.event(Event::Finished);
    writer.flush()?;
    if quality.wrong + quality.right > 0 {
        let dropped = quality.dropped_wrong + quality.dropped_right;
        quality.precision = (dropped > 0).then(|| quality.dropped_wrong as f64 / dropped as f64);
        quality.recall =
            (quality.wrong > 0).then(|| quality.dropped_wrong as f64 / quality.wrong as f64);
        summary.quality = Some(quality);
    }
    Ok(summary)
}

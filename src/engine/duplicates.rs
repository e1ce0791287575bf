//! Near-duplicate groups: images whose ITC vectors are within a cosine threshold of each other
//! (resized, recompressed, lightly edited or burst shots of the same scene).

use std::collections::HashMap;

use serde::Serialize;

use super::error::{EngineError, Result};
use crate::index::{Filter, ImageId, Store};

/// Neighbours examined per image.
const NEIGHBOURS: usize = 16;

/// One group of near-duplicates, most connected first.
#[derive(Debug, Clone, Serialize)]
pub struct DuplicateGroup {
    /// Image ids and paths in the group.
    pub images: Vec<(u64, String)>,
    /// The highest cosine between two members.
    pub max_cosine: f32,
}

fn find(parent: &mut HashMap<u64, u64>, x: u64) -> u64 {
    let p = *parent.get(&x).unwrap_or(&x);
    if p == x {
        return x;
    }
    let root = find(parent, p);
    parent.insert(x, root);
    root
}

/// Groups images linked by a cosine of at least `threshold` (transitively), largest groups first.
pub fn near_duplicates(store: &dyn Store, threshold: f32) -> Result<Vec<DuplicateGroup>> {
    if !(-1.0..=1.0).contains(&threshold) {
        return Err(EngineError::InvalidInput(format!(
            "threshold {threshold} is not a cosine in [-1, 1]"
        )));
    }
    let mut parent: HashMap<u64, u64> = HashMap::new();
    let mut best: HashMap<u64, f32> = HashMap::new();
    let mut paths: HashMap<u64, String> = HashMap::new();
    let everything = Filter::default();
    store.for_each(&mut |r| {
        for (other, cos) in store.vector_search(&r.itc, NEIGHBOURS, None, &everything)? {
            if other == r.id || cos < threshold {
                continue;
            }
            let (a, b) = (find(&mut parent, r.id.0), find(&mut parent, other.0));
            if a != b {
                parent.insert(a, b);
            }
            for id in [r.id.0, other.0] {
                let e = best.entry(id).or_insert(cos);
                *e = e.max(cos);
            }
        }
        paths.insert(r.id.0, r.path);
        Ok(())
    })?;
    let mut groups: HashMap<u64, Vec<u64>> = HashMap::new();
    for &id in best.keys() {
        let root = find(&mut parent, id);
        groups.entry(root).or_default().push(id);
    }
    let mut out: Vec<DuplicateGroup> = groups
        .into_values()
        .map(|mut ids| {
            ids.sort_unstable();
            let max_cosine = ids.iter().map(|i| best[i]).fold(f32::MIN, f32::max);
            let images = ids
                .into_iter()
                .map(|i| (i, paths.get(&i).cloned().unwrap_or_default()))
                .collect();
            DuplicateGroup { images, max_cosine }
        })
        .collect();
    out.sort_by(|a, b| {
        b.images
            .len()
            .cmp(&a.images.len())
            .then(b.max_cosine.total_cmp(&a.max_cosine))
            .then(a.images[0].0.cmp(&b.images[0].0))
    });
    // Confirm the collection still has what we report (ids removed mid-scan are dropped).
    for g in &mut out {
        g.images
            .retain(|(id, _)| store.contains(ImageId(*id)).unwrap_or(false));
    }
    out.retain(|g| g.images.len() > 1);
    Ok(out)
}

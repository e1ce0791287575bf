//! Ranking by score: [`Scored`], a score with an id in a total order, and [`TopK`], the best
//! `k` of a stream of them. Every heap of scored ids in the index layer uses these.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// A score and the id it belongs to, ordered by score (`f32::total_cmp`, so NaN has a place),
/// then by id with the smaller id ranking higher: ties always break the same way.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) struct Scored<I> {
    pub(crate) score: f32,
    pub(crate) id: I,
}

impl<I: Ord> Eq for Scored<I> {}

impl<I: Ord> PartialOrd for Scored<I> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<I: Ord> Ord for Scored<I> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.id.cmp(&self.id))
    }
}

/// The best `k` of a stream of `(score, id)`; ties go to the smaller id.
pub(crate) struct TopK {
    k: usize,
    /// The worst kept on top.
    heap: BinaryHeap<Reverse<Scored<u64>>>,
}

impl TopK {
    pub(crate) fn new(k: usize) -> Self {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    pub(crate) fn offer(&mut self, score: f32, id: u64) {
        if self.k == 0 {
            return;
        }
        let item = Reverse(Scored { score, id });
        if self.heap.len() < self.k {
            self.heap.push(item);
        } else if self.heap.peek().is_some_and(|worst| item < *worst) {
            self.heap.pop();
            self.heap.push(item);
        }
    }

    /// Best first, as `(id, score)`.
    pub(crate) fn into_sorted(self) -> Vec<(u64, f32)> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|Reverse(s)| (s.id, s.score))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_the_best_and_breaks_ties_by_id() {
        let mut top = TopK::new(3);
        for (id, s) in [(5, 0.1), (4, 0.9), (3, 0.5), (2, 0.5), (1, 0.2), (0, 0.5)] {
            top.offer(s, id);
        }
        assert_eq!(top.into_sorted(), vec![(4, 0.9), (0, 0.5), (2, 0.5)]);
        let mut none = TopK::new(0);
        none.offer(1.0, 1);
        assert!(none.into_sorted().is_empty());
    }

    #[test]
    fn scored_orders_by_score_then_smaller_id_first() {
        let s = |score, id: u32| Scored { score, id };
        assert!(s(0.5, 1) > s(0.4, 0));
        assert!(s(0.5, 1) > s(0.5, 2));
        assert!(s(f32::NAN, 0) > s(f32::INFINITY, 0));
        assert_eq!(s(0.5, 3).cmp(&s(0.5, 3)), Ordering::Equal);
    }
}

//! Per-person ordering: one lane per people id. Jobs for a person run one after the
//! other in arrival order; different people run concurrently.
//!
//! A lane is keyed by a 64-bit hash of the people id, not the id itself, so opening one
//! allocates nothing (an idle lane's `VecDeque` is empty and unallocated). Two people
//! whose hashes collide share a lane: each keeps its order, they only wait on each other.

use foldhash::fast::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Mutex;

#[derive(Debug)]
pub struct Lanes<J> {
    /// foldhash, seeded per process: SipHash here was a visible share of the CPU per
    /// message, and a collision only makes two people share a lane.
    hasher: RandomState,
    queued: Mutex<HashMap<u64, VecDeque<J>, RandomState>>,
}

impl<J> Default for Lanes<J> {
    fn default() -> Self {
        Self {
            hasher: RandomState::default(),
            queued: Mutex::new(HashMap::default()),
        }
    }
}

impl<J> Lanes<J> {
    /// The lane key of a people id.
    pub fn key(&self, people_id: &str) -> u64 {
        self.hasher.hash_one(people_id)
    }

    /// Queues `job` behind the lane's running job, or, when the lane is idle, opens it and
    /// hands the job back: the caller then runs the lane.
    pub fn push(&self, key: u64, job: J) -> Option<J> {
        let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        match queued.get_mut(&key) {
            Some(waiting) => {
                waiting.push_back(job);
                None
            }
            None => {
                queued.insert(key, VecDeque::new());
                Some(job)
            }
        }
    }

    /// The lane's next job; `None` closes the lane.
    pub fn next(&self, key: u64) -> Option<J> {
        let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        let next = queued.get_mut(&key).and_then(VecDeque::pop_front);
        if next.is_none() {
            queued.remove(&key);
        }
        next
    }

    /// Closes the lane and gives back every job still queued on it, in order: a later
    /// delivery of that person opens a new lane.
    pub fn close(&self, key: u64) -> VecDeque<J> {
        let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        queued.remove(&key).unwrap_or_default()
    }

    #[cfg(test)]
    pub fn open_lanes(&self) -> usize {
        self.queued.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_runner_per_key_in_arrival_order() {
        let lanes = Lanes::default();
        let (a, b) = (lanes.key("a"), lanes.key("b"));
        assert_ne!(a, b);
        assert_eq!(lanes.push(a, 1), Some(1));
        assert_eq!(lanes.push(a, 2), None);
        assert_eq!(lanes.push(b, 10), Some(10));
        assert_eq!(lanes.push(a, 3), None);
        assert_eq!(lanes.next(a), Some(2));
        assert_eq!(lanes.next(a), Some(3));
        assert_eq!(lanes.next(a), None);
        assert_eq!(lanes.open_lanes(), 1);
        assert_eq!(lanes.push(a, 4), Some(4), "a closed lane reopens");
        assert_eq!(lanes.push(a, 5), None);
        assert_eq!(lanes.push(a, 6), None);
        assert_eq!(Vec::from(lanes.close(a)), vec![5, 6]);
        assert_eq!(lanes.push(a, 7), Some(7), "closed: the next push opens it");
    }
}

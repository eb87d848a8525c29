//! Per-person ordering: one lane per people id. Jobs for a person run one after the
//! other in arrival order; different people run concurrently.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

#[derive(Debug)]
pub struct Lanes<J> {
    queued: Mutex<HashMap<String, VecDeque<J>>>,
}

impl<J> Default for Lanes<J> {
    fn default() -> Self {
        Self {
            queued: Mutex::new(HashMap::new()),
        }
    }
}

impl<J> Lanes<J> {
    /// Queues `job` behind the lane's running job, or, when the lane is idle, opens it and
    /// hands the job back: the caller then runs the lane.
    pub fn push(&self, key: &str, job: J) -> Option<J> {
        let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        match queued.get_mut(key) {
            Some(waiting) => {
                waiting.push_back(job);
                None
            }
            None => {
                queued.insert(key.to_owned(), VecDeque::new());
                Some(job)
            }
        }
    }

    /// The lane's next job; `None` closes the lane.
    pub fn next(&self, key: &str) -> Option<J> {
        let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        let next = queued.get_mut(key).and_then(VecDeque::pop_front);
        if next.is_none() {
            queued.remove(key);
        }
        next
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
        assert_eq!(lanes.push("a", 1), Some(1));
        assert_eq!(lanes.push("a", 2), None);
        assert_eq!(lanes.push("b", 10), Some(10));
        assert_eq!(lanes.push("a", 3), None);
        assert_eq!(lanes.next("a"), Some(2));
        assert_eq!(lanes.next("a"), Some(3));
        assert_eq!(lanes.next("a"), None);
        assert_eq!(lanes.open_lanes(), 1);
        assert_eq!(lanes.push("a", 4), Some(4), "a closed lane reopens");
    }
}

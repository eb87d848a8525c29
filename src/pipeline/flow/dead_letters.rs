//! The dead-letter block (see [`super`]): while a dead-letter copy finds no queue,
//! nothing is sent; the block ends with its last blocked copy.

use super::*;

/// One dead letter waiting for a queue to take its copy. When the last one stops
/// waiting (taken, handed back, stopping) without a copy taken, the block ends: a
/// block with nobody left to lift it would stall the pod for good.
pub struct DeadLetterBlock<'a> {
    pub(super) flow: &'a Flow,
    pub(super) began: bool,
}

impl DeadLetterBlock<'_> {
    /// This copy began the block (so one log line says so).
    pub fn began(&self) -> bool {
        self.began
    }
}

impl Drop for DeadLetterBlock<'_> {
    fn drop(&mut self) {
        let mut ended = false;
        self.flow.published.send_if_modified(|p| {
            p.blocked_copies = p.blocked_copies.saturating_sub(1);
            if p.blocked_copies == 0 && p.dead_letters_blocked {
                p.dead_letters_blocked = false;
                ended = true;
            }
            ended
        });
        if ended {
            metrics::dead_letters_blocked(false);
        }
    }
}

impl Flow {
    /// A dead-letter copy found no queue: nothing is sent until one is taken, or until
    /// no blocked copy waits any more (the returned `DeadLetterBlock` is one waiting).
    pub fn block_dead_letters(&self) -> DeadLetterBlock<'_> {
        let mut began = false;
        self.published.send_if_modified(|p| {
            p.blocked_copies += 1;
            if !p.dead_letters_blocked {
                p.dead_letters_blocked = true;
                began = true;
            }
            began
        });
        if began {
            metrics::dead_letters_blocked(true);
        }
        DeadLetterBlock { flow: self, began }
    }

    /// A dead-letter copy was taken by a queue: the block ends; true when it was on.
    pub fn unblock_dead_letters(&self) -> bool {
        if !self.published.borrow().dead_letters_blocked {
            return false;
        }
        let unblocked = self.published.send_if_modified(|p| {
            let change = p.dead_letters_blocked;
            p.dead_letters_blocked = false;
            change
        });
        if unblocked {
            metrics::dead_letters_blocked(false);
        }
        unblocked
    }
}

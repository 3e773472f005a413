//! Settling deliveries with the broker in batches.
//!
//! Handlers finish in any order; the consume loop feeds their verdicts to [`Settlements`], which
//! answers with the frames to send. Finished deliveries form a contiguous run from the lowest
//! unsettled delivery tag; that run is acked with one `basic.ack(multiple = true)` for its
//! highest tag. On a quorum queue every ack is a replicated log command, so one ack for many
//! deliveries takes most of the per-message work off the broker (see docs/performance.md).
//!
//! A finished delivery waiting behind a slower one (a gap in the run) is not held for long: it
//! is acked on its own once it has waited [`Settlements::hold`], or at once when so many wait
//! that the prefetch window would otherwise fill with finished work. Requeues are sent at once
//! and on their own, before any later multiple-ack can cover their tag.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What a handler decided for its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done (including "dead-lettered"): remove it from the queue.
    Ack,
    /// Not done: give it back to the queue for redelivery.
    Requeue,
}

/// A frame to send on the consuming channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `basic.ack(tag, multiple = true)`: every unsettled delivery up to `tag`.
    AckUpTo(u64),
    /// `basic.ack(tag, multiple = false)`.
    Ack(u64),
    /// `basic.nack(tag, multiple = false, requeue = true)`.
    Requeue(u64),
}

#[derive(Debug, Clone, Copy)]
enum Done {
    /// Finished, to be acked; since when it waits.
    Pending(Instant),
    /// Already settled on its own (requeued, or acked singly after waiting).
    Sent,
}

/// Tracks finished deliveries of one channel and decides which acks to send.
#[derive(Debug)]
pub struct Settlements {
    /// Lowest tag not yet covered by a multiple-ack; `None` before the first delivery.
    next: Option<u64>,
    /// Finished deliveries at or above `next`.
    done: BTreeMap<u64, Done>,
    pending: usize,
    hold: Duration,
    max_pending: usize,
}

impl Settlements {
    /// `prefetch` bounds what may wait: at a quarter of it, waiting acks go out singly, well
    /// before finished-but-unacked deliveries could fill the window and stall the consumer.
    pub fn new(prefetch: u16, hold: Duration) -> Self {
        Self {
            next: None,
            done: BTreeMap::new(),
            pending: 0,
            hold,
            max_pending: usize::from(prefetch / 4).max(1),
        }
    }

    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// A delivery arrived (tags on a channel grow by one per delivery).
    pub fn delivered(&mut self, tag: u64) {
        if self.next.is_none() {
            self.next = Some(tag);
        }
    }

    /// A handler finished; the frames to send now, in order.
    pub fn finished(&mut self, tag: u64, verdict: Settle, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.next.is_none_or(|n| tag < n) || self.done.contains_key(&tag) {
            // Unknown or already settled: nothing a frame could fix.
            return actions;
        }
        match verdict {
            Settle::Requeue => {
                actions.push(Action::Requeue(tag));
                self.done.insert(tag, Done::Sent);
            }
            Settle::Ack => {
                self.done.insert(tag, Done::Pending(now));
                self.pending += 1;
            }
        }
        self.advance(&mut actions);
        if self.pending >= self.max_pending {
            self.release(&mut actions, |_| true);
        }
        actions
    }

    /// Acks that have waited `hold` behind a gap, sent singly.
    pub fn overdue(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let hold = self.hold;
        self.release(&mut actions, |since| {
            now.saturating_duration_since(since) >= hold
        });
        actions
    }

    /// When the oldest waiting ack falls due, if any waits.
    pub fn deadline(&self) -> Option<Instant> {
        self.done
            .values()
            .filter_map(|d| match d {
                Done::Pending(since) => Some(*since + self.hold),
                Done::Sent => None,
            })
            .min()
    }

    /// Consuming ends: every finished delivery still waiting is acked singly.
    pub fn finish(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        self.release(&mut actions, |_| true);
        actions
    }

    /// Finished deliveries whose ack has not been sent.
    pub fn waiting(&self) -> usize {
        self.pending
    }

    /// Pop the contiguous run of finished tags from `next`; one multiple-ack covers it.
    fn advance(&mut self, actions: &mut Vec<Action>) {
        let Some(mut next) = self.next else { return };
        let mut last_pending = None;
        while let Some(done) = self.done.remove(&next) {
            if let Done::Pending(_) = done {
                last_pending = Some(next);
                self.pending -= 1;
            }
            next += 1;
        }
        self.next = Some(next);
        if let Some(tag) = last_pending {
            actions.push(Action::AckUpTo(tag));
        }
    }

    fn release(&mut self, actions: &mut Vec<Action>, due: impl Fn(Instant) -> bool) {
        for (tag, done) in self.done.iter_mut() {
            if let Done::Pending(since) = *done {
                if due(since) {
                    actions.push(Action::Ack(*tag));
                    *done = Done::Sent;
                    self.pending -= 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_millis(10);

    fn with(tags: std::ops::RangeInclusive<u64>, prefetch: u16) -> Settlements {
        let mut s = Settlements::new(prefetch, HOLD);
        for t in tags {
            s.delivered(t);
        }
        s
    }

    #[test]
    fn in_order_run_is_one_multiple_ack() {
        let mut s = with(1..=4, 100);
        let now = Instant::now();
        assert_eq!(s.finished(1, Settle::Ack, now), vec![Action::AckUpTo(1)]);
        // 3 and 4 wait behind 2; 2 releases all three with one frame.
        assert!(s.finished(3, Settle::Ack, now).is_empty());
        assert!(s.finished(4, Settle::Ack, now).is_empty());
        assert_eq!(s.waiting(), 2);
        assert_eq!(s.finished(2, Settle::Ack, now), vec![Action::AckUpTo(4)]);
        assert_eq!(s.waiting(), 0);
        assert_eq!(s.deadline(), None);
    }

    #[test]
    fn requeue_goes_out_at_once_and_is_not_covered_twice() {
        let mut s = with(1..=3, 100);
        let now = Instant::now();
        assert!(s.finished(2, Settle::Ack, now).is_empty());
        assert_eq!(
            s.finished(1, Settle::Requeue, now),
            vec![Action::Requeue(1), Action::AckUpTo(2)]
        );
        // A requeue at the end of the run: nothing left to ack.
        assert_eq!(
            s.finished(3, Settle::Requeue, now),
            vec![Action::Requeue(3)]
        );
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn multiple_ack_names_the_last_pending_tag_not_a_requeued_one() {
        let mut s = with(1..=3, 100);
        let now = Instant::now();
        assert!(s.finished(2, Settle::Ack, now).is_empty());
        assert_eq!(
            s.finished(3, Settle::Requeue, now),
            vec![Action::Requeue(3)]
        );
        assert_eq!(s.finished(1, Settle::Ack, now), vec![Action::AckUpTo(2)]);
    }

    #[test]
    fn acks_behind_a_slow_delivery_go_out_singly_after_the_hold() {
        let mut s = with(1..=3, 100);
        let t0 = Instant::now();
        assert!(s.finished(2, Settle::Ack, t0).is_empty());
        assert!(s.finished(3, Settle::Ack, t0 + HOLD / 2).is_empty());
        assert_eq!(s.deadline(), Some(t0 + HOLD));
        assert!(s.overdue(t0 + HOLD / 4).is_empty());
        assert_eq!(s.overdue(t0 + HOLD), vec![Action::Ack(2)]);
        assert_eq!(s.overdue(t0 + HOLD * 2), vec![Action::Ack(3)]);
        // The slow one finishes: 2 and 3 are settled already, so it is acked on its own tag.
        assert_eq!(
            s.finished(1, Settle::Ack, t0 + HOLD * 3),
            vec![Action::AckUpTo(1)]
        );
        // The run moved past 3: a late duplicate verdict is ignored.
        assert!(s.finished(3, Settle::Ack, t0).is_empty());
    }

    #[test]
    fn too_many_waiting_are_released_before_the_prefetch_window_fills() {
        // prefetch 16: at 4 waiting, they go out.
        let mut s = with(1..=10, 16);
        let now = Instant::now();
        for t in 2..=4 {
            assert!(s.finished(t, Settle::Ack, now).is_empty());
        }
        assert_eq!(
            s.finished(5, Settle::Ack, now),
            vec![
                Action::Ack(2),
                Action::Ack(3),
                Action::Ack(4),
                Action::Ack(5)
            ]
        );
        assert_eq!(s.waiting(), 0);
        assert_eq!(s.finished(1, Settle::Ack, now), vec![Action::AckUpTo(1)]);
        assert_eq!(s.finished(6, Settle::Ack, now), vec![Action::AckUpTo(6)]);
    }

    #[test]
    fn finish_acks_what_waits_behind_a_delivery_that_never_finished() {
        let mut s = with(1..=3, 100);
        let now = Instant::now();
        assert!(s.finished(2, Settle::Ack, now).is_empty());
        assert!(s.finished(3, Settle::Ack, now).is_empty());
        assert_eq!(s.finish(), vec![Action::Ack(2), Action::Ack(3)]);
        assert!(s.finish().is_empty());
    }

    #[test]
    fn prefetch_of_one_never_holds() {
        let mut s = with(1..=2, 1);
        let now = Instant::now();
        assert_eq!(s.finished(2, Settle::Ack, now), vec![Action::Ack(2)]);
        assert_eq!(s.finished(1, Settle::Ack, now), vec![Action::AckUpTo(1)]);
    }

    #[test]
    fn unknown_tags_are_ignored() {
        let mut s = Settlements::new(10, HOLD);
        assert!(s.finished(5, Settle::Ack, Instant::now()).is_empty());
        s.delivered(7);
        assert!(s.finished(6, Settle::Ack, Instant::now()).is_empty());
        assert_eq!(
            s.finished(7, Settle::Ack, Instant::now()),
            vec![Action::AckUpTo(7)]
        );
    }
}

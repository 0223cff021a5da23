//! Busy polling a relay's sockets for a short while after it forwarded something, before it
//! sleeps until the runtime wakes it. Waking a sleeping thread costs tens of microseconds of
//! CPU and latency where the kernel must wake an idle CPU (on virtual machines above all); an
//! answer that comes back within the budget is taken without that wakeup.
//!
//! Polling is spent only where it pays:
//! - a relay polls after forwarding one way only when, the last time it forwarded that way,
//!   the next datagram came within the budget (a flow of slow answers, or a quiet one, stops
//!   polling after one miss and starts again after one quick answer);
//! - the relays sharing a [`Polling`] (all of a router's) poll one at a time, so at most one
//!   thread spends its time so and the others keep serving every other flow;
//! - between two polls the relay yields its CPU (`sched_yield`): the thread it forwarded to, or
//!   the one it forwarded for, is often woken on this same CPU, and spinning would hold it off
//!   until the budget ran out. Where no other thread waits, the yield returns at once.
//! - the relays may run on threads of their own ([`Polling::on_threads`]), each relay whole on
//!   one: a relay that keeps catching datagrams never waits, so the runtime's cooperative budget
//!   makes it yield every so often, and a runtime with other threads wakes one of them, which may
//!   take the relay over; on a thread of its own it carries on where it was.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::datagrams::Way;
use crate::links::LinkThreads;

/// How relays busy poll: their budget, the turn they take one at a time, and where they run.
#[derive(Debug, Clone, Default)]
pub struct Polling {
    budget: Duration,
    /// Held by the relay polling now.
    turn: Arc<AtomicBool>,
    /// The threads relays run on, each whole on one; without them, where they are spawned.
    threads: Option<LinkThreads>,
}

impl Polling {
    /// Polls for at most `budget` after each datagram forwarded; zero never polls.
    pub fn new(budget: Duration) -> Self {
        Polling {
            budget,
            turn: Arc::default(),
            threads: None,
        }
    }

    /// The same, each relay run whole on one of `threads`, given in turn.
    pub fn on_threads(self, threads: LinkThreads) -> Self {
        Polling {
            threads: Some(threads),
            ..self
        }
    }

    /// The runtime of the thread for the next relay, when relays have threads of their own.
    pub fn home(&self) -> Option<tokio::runtime::Handle> {
        self.threads.as_ref().map(LinkThreads::next)
    }
}

/// One relay's record of how soon datagrams follow what it forwarded, and its polling.
#[derive(Debug)]
pub struct BusyPoll {
    polling: Polling,
    /// The last datagram forwarded: its way and when.
    last: Option<(Way, Instant)>,
    /// Per way ([`Way::Out`], [`Way::In`]): how soon the next datagram came after the last
    /// one forwarded that way; `None` until known.
    gaps: [Option<Duration>; 2],
}

impl BusyPoll {
    pub fn new(polling: Polling) -> Self {
        BusyPoll {
            polling,
            last: None,
            gaps: [None; 2],
        }
    }

    /// A window to poll in now, if polling is worth it and no other relay polls: it closes a
    /// budget after the last datagram forwarded, and gives the turn back when dropped.
    pub fn window(&self) -> Option<Window<'_>> {
        let Polling { budget, turn, .. } = &self.polling;
        let (way, at) = self.last?;
        let quick = self.gaps[slot(way)].is_none_or(|gap| gap <= *budget);
        if budget.is_zero() || !quick {
            return None;
        }
        turn.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        Some(Window {
            turn,
            until: at + *budget,
        })
    }

    /// A datagram came (from either side): how long after the last one forwarded.
    pub fn arrived(&mut self) {
        self.arrived_at(Instant::now());
    }

    /// A datagram was forwarded `way`.
    pub fn forwarded(&mut self, way: Way) {
        self.forwarded_at(way, Instant::now());
    }

    fn arrived_at(&mut self, now: Instant) {
        if let Some((way, at)) = self.last {
            self.gaps[slot(way)] = Some(now.saturating_duration_since(at));
        }
    }

    fn forwarded_at(&mut self, way: Way, now: Instant) {
        self.last = Some((way, now));
    }
}

fn slot(way: Way) -> usize {
    match way {
        Way::Out => 0,
        Way::In => 1,
    }
}

/// The turn at polling, until a deadline.
#[derive(Debug)]
pub struct Window<'a> {
    turn: &'a AtomicBool,
    until: Instant,
}

impl Window<'_> {
    /// Whether polling may go on.
    pub fn open(&self) -> bool {
        Instant::now() < self.until
    }

    /// Between two polls: gives this CPU to any thread waiting for it (`sched_yield`), as the
    /// thread whose datagram is awaited may be one of them; returns at once where none waits.
    pub fn pause(&self) {
        std::thread::yield_now();
    }
}

impl Drop for Window<'_> {
    fn drop(&mut self) {
        self.turn.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Duration = Duration::from_micros(50);
    const QUICK: Duration = Duration::from_micros(20);
    const SLOW: Duration = Duration::from_micros(500);

    fn poll(budget: Duration) -> BusyPoll {
        BusyPoll::new(Polling::new(budget))
    }

    /// Forwards `way` at `now`, and the next datagram comes `gap` later.
    fn answered(poll: &mut BusyPoll, way: Way, now: &mut Instant, gap: Duration) {
        poll.forwarded_at(way, *now);
        *now += gap;
        poll.arrived_at(*now);
    }

    #[test]
    fn nothing_to_wait_for_before_the_first_datagram_or_without_a_budget() {
        assert!(poll(BUDGET).window().is_none());
        let mut off = poll(Duration::ZERO);
        off.forwarded(Way::Out);
        assert!(off.window().is_none());
    }

    #[test]
    fn polls_after_a_quick_answer_and_stops_after_a_slow_one_per_way() {
        let mut poll = poll(BUDGET);
        let mut now = Instant::now();
        poll.forwarded_at(Way::Out, now);
        assert!(poll.window().is_some(), "unknown gaps are tried once");
        // Answers to what goes out come quickly; the next request after an answer does not.
        answered(&mut poll, Way::Out, &mut now, QUICK);
        answered(&mut poll, Way::In, &mut now, SLOW);
        poll.forwarded_at(Way::Out, now);
        assert!(poll.window().is_some(), "after a request out");
        poll.forwarded_at(Way::In, now);
        assert!(poll.window().is_none(), "after an answer in");
        // One quick one starts it again.
        answered(&mut poll, Way::In, &mut now, QUICK);
        poll.forwarded_at(Way::In, now);
        assert!(poll.window().is_some(), "after a quick one in");
    }

    #[test]
    fn the_window_closes_a_budget_after_the_datagram_forwarded() {
        let mut long = poll(Duration::from_secs(3600));
        long.forwarded(Way::Out);
        assert!(long.window().expect("a window").open());
        let mut short = poll(Duration::from_millis(1));
        short.forwarded(Way::Out);
        let window = short.window().expect("a window");
        std::thread::sleep(Duration::from_millis(1));
        assert!(!window.open());
    }

    #[test]
    fn relays_run_where_they_are_spawned_unless_given_threads_then_on_each_in_turn() {
        assert!(Polling::new(BUDGET).home().is_none());
        let threads = LinkThreads::start_named(2, "relay-test").expect("threads");
        let polling = Polling::new(BUDGET).on_threads(threads);
        let ran_on: Vec<Option<String>> = (0..4)
            .map(|_| {
                let home = polling.home().expect("a thread");
                futures::executor::block_on(
                    home.spawn(async { std::thread::current().name().map(String::from) }),
                )
                .expect("ran")
            })
            .collect();
        let named = |name: &str| Some(name.to_string());
        assert_eq!(
            ran_on,
            [
                named("relay-test-0"),
                named("relay-test-1"),
                named("relay-test-0"),
                named("relay-test-1")
            ]
        );
    }

    #[test]
    fn relays_sharing_a_polling_poll_one_at_a_time() {
        let polling = Polling::new(BUDGET);
        let mut first = BusyPoll::new(polling.clone());
        let mut second = BusyPoll::new(polling);
        let mut apart = poll(BUDGET);
        for poll in [&mut first, &mut second, &mut apart] {
            poll.forwarded(Way::Out);
        }
        let window = first.window().expect("the first takes the turn");
        assert!(second.window().is_none(), "the turn is taken");
        assert!(apart.window().is_some(), "another polling has its own turn");
        drop(window);
        assert!(second.window().is_some(), "the turn is free again");
    }
}

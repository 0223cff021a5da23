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
//! - while more than one flow is busy, none polls: a relay that wants to poll and finds the turn
//!   taken holds all of them off for [`HOLD_OFF`] when its own flow is active (its last
//!   [`ACTIVE_STREAK`] datagrams each within [`ACTIVE_GAP`] of the one before; a lookup's few
//!   datagrams are not). Polling pays where the CPU it spins on would otherwise wait for the one
//!   flow's next datagram; with several flows busy, that CPU has their work to do;
//! - between two polls the relay yields its CPU (`sched_yield`): the thread it forwarded to, or
//!   the one it forwarded for, is often woken on this same CPU, and spinning would hold it off
//!   until the budget ran out. Where no other thread waits, the yield returns at once.
//! - the one busy flow runs on a thread of its own ([`Polling::on_thread`]) while it is the only
//!   one: a relay that keeps catching datagrams never waits, so the runtime's cooperative budget
//!   makes it yield every so often, and a runtime with other threads wakes one of them, which may
//!   take the relay over; on a thread of its own it carries on where it was. A relay takes the
//!   thread when it is active, its datagrams follow each other within the budget both ways and
//!   no other flow is busy ([`BusyPoll::take_thread`]), and gives it back as soon as another
//!   active flow wants to poll or finds the thread held ([`BusyPoll::crowded`]), or it waited
//!   [`QUIET`] for a datagram, so that a quiet flow does not keep the thread from a busy one.
//!   With several flows busy, all run on the runtime that spawned them: its threads find one
//!   flow's datagram ready while another's is on its way, where a thread per relay would sleep
//!   for its own;
//! - where the router may use one CPU only, every busy flow runs on that thread and none holds
//!   polling off ([`Polling::on_shared_thread`]): there, relays polling in turn with yields
//!   carried several flows better than relays on the runtime that stop polling while several are
//!   busy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::datagrams::Way;
use crate::links::LinkThreads;

/// How long no relay polls after one found the turn taken.
pub const HOLD_OFF: Duration = Duration::from_millis(10);

/// A flow is active while this many datagrams in a row each came within [`ACTIVE_GAP`] of the
/// one forwarded before.
pub const ACTIVE_STREAK: u8 = 8;

/// See [`ACTIVE_STREAK`].
pub const ACTIVE_GAP: Duration = Duration::from_millis(1);

/// How long the relay on the thread of its own waits for a datagram before it gives the thread
/// back.
pub const QUIET: Duration = Duration::from_millis(10);

/// How relays busy poll: their budget, the turn they take one at a time, and the thread the one
/// busy flow runs on.
#[derive(Debug, Clone, Default)]
pub struct Polling {
    budget: Duration,
    /// Held by the relay polling now.
    turn: Arc<AtomicBool>,
    /// When a relay last found the turn taken.
    contended: Arc<Contention>,
    /// The thread busy flows' relays run on whole; without it, relays run where they are
    /// spawned.
    thread: Option<RelayThread>,
}

/// The thread of [`Polling::on_thread`] or [`Polling::on_shared_thread`].
#[derive(Debug, Clone)]
struct RelayThread {
    runtime: LinkThreads,
    /// Whether a relay holds it (the one busy flow's).
    held: Arc<AtomicBool>,
    /// Every busy flow's, none holding polling off.
    shared: bool,
}

impl Polling {
    /// Polls for at most `budget` after each datagram forwarded; zero never polls.
    pub fn new(budget: Duration) -> Self {
        Polling {
            budget,
            ..Polling::default()
        }
    }

    /// The same, the one busy flow's relay run whole on `thread` (its first thread).
    pub fn on_thread(self, thread: LinkThreads) -> Self {
        self.with_thread(thread, false)
    }

    /// The same, every busy flow's relay run whole on `thread`, and none holding polling off
    /// while several are busy: for a router with one CPU, where polling in turn with yields
    /// carried several flows as well as one.
    pub fn on_shared_thread(self, thread: LinkThreads) -> Self {
        self.with_thread(thread, true)
    }

    fn with_thread(self, runtime: LinkThreads, shared: bool) -> Self {
        Polling {
            thread: Some(RelayThread {
                runtime,
                held: Arc::default(),
                shared,
            }),
            ..self
        }
    }

    fn shared(&self) -> bool {
        self.thread.as_ref().is_some_and(|thread| thread.shared)
    }
}

/// A relay's place on the thread of [`Polling::on_thread`] (held, given back when dropped) or
/// of [`Polling::on_shared_thread`].
#[derive(Debug)]
pub struct Home {
    runtime: tokio::runtime::Handle,
    held: Option<Arc<AtomicBool>>,
}

impl Home {
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        if let Some(held) = &self.held {
            held.store(false, Ordering::Release);
        }
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
    /// How many datagrams in a row came within [`ACTIVE_GAP`] of the last one forwarded (up to
    /// [`ACTIVE_STREAK`]).
    streak: u8,
}

impl BusyPoll {
    pub fn new(polling: Polling) -> Self {
        BusyPoll {
            polling,
            last: None,
            gaps: [None; 2],
            streak: 0,
        }
    }

    /// A window to poll in now, if polling is worth it, no other relay polls and none found
    /// the turn taken within [`HOLD_OFF`]: it closes a budget after the last datagram
    /// forwarded, and gives the turn back when dropped.
    pub fn window(&self) -> Option<Window<'_>> {
        let Polling {
            budget,
            turn,
            contended,
            ..
        } = &self.polling;
        let (way, at) = self.last?;
        let quick = self.gaps[slot(way)].is_none_or(|gap| gap <= *budget);
        if budget.is_zero() || !quick || self.crowded() {
            return None;
        }
        if turn
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            // A lookup's few datagrams leave the busy flow be.
            if self.active() {
                contended.seen(at);
            }
            return None;
        }
        Some(Window {
            turn,
            until: at + *budget,
        })
    }

    /// The thread of [`Polling::on_thread`], held until the [`Home`] is dropped: given when
    /// this flow is busy (a flow whose requests come at intervals does not move for each), no
    /// other flow is ([`BusyPoll::crowded`]) and no other relay holds the thread. An active flow
    /// that finds another holding the thread counts as another flow busy, as one finding the
    /// turn at polling taken does: the flow on the thread then gives it back.
    pub fn take_thread(&self) -> Option<Home> {
        let thread = self.polling.thread.as_ref()?;
        let (_, at) = self.last?;
        if thread.shared {
            return self.busy().then(|| Home {
                runtime: thread.runtime.next(),
                held: None,
            });
        }
        let held = &thread.held;
        if !self.active() || self.crowded() {
            return None;
        }
        if held.load(Ordering::Relaxed) {
            self.polling.contended.seen(at);
            return None;
        }
        if !self.busy() {
            return None;
        }
        if held
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.polling.contended.seen(at);
            return None;
        }
        Some(Home {
            runtime: thread.runtime.next(),
            held: Some(held.clone()),
        })
    }

    /// Whether this flow is active: its last [`ACTIVE_STREAK`] datagrams each came within
    /// [`ACTIVE_GAP`] of the one forwarded before (a lookup's few datagrams are not).
    fn active(&self) -> bool {
        self.streak >= ACTIVE_STREAK
    }

    /// Whether this flow is busy: polling on, active, and the last datagram forwarded each way
    /// was followed by the next within the budget.
    fn busy(&self) -> bool {
        let budget = self.polling.budget;
        !budget.is_zero()
            && self.active()
            && self
                .gaps
                .iter()
                .all(|gap| gap.is_some_and(|gap| gap <= budget))
    }

    /// Whether this relay, on the thread, gives it back after waiting [`QUIET`] for a datagram:
    /// so when it holds the thread, not on a shared one.
    pub fn leaves_when_quiet(&self) -> bool {
        !self.polling.shared()
    }

    /// Whether another flow is busy too: a relay found the turn taken less than [`HOLD_OFF`]
    /// before the last datagram this one forwarded (never so with a shared thread).
    pub fn crowded(&self) -> bool {
        !self.polling.shared()
            && self
                .last
                .is_some_and(|(_, at)| self.polling.contended.within(at, HOLD_OFF))
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
            let gap = now.saturating_duration_since(at);
            self.gaps[slot(way)] = Some(gap);
            self.streak = if gap <= ACTIVE_GAP {
                (self.streak + 1).min(ACTIVE_STREAK)
            } else {
                0
            };
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

/// The last time a relay found the turn taken, as microseconds after `since`, plus one (zero:
/// never).
#[derive(Debug)]
struct Contention {
    since: Instant,
    last: AtomicU64,
}

impl Default for Contention {
    fn default() -> Self {
        Contention {
            since: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

impl Contention {
    fn stamp(&self, at: Instant) -> u64 {
        let micros = at.saturating_duration_since(self.since).as_micros();
        u64::try_from(micros).unwrap_or(u64::MAX - 1) + 1
    }

    fn seen(&self, at: Instant) {
        self.last.fetch_max(self.stamp(at), Ordering::Relaxed);
    }

    /// Whether a relay found the turn taken less than `hold_off` before `at`.
    fn within(&self, at: Instant, hold_off: Duration) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        last != 0 && self.stamp(at).saturating_sub(last) < hold_off.as_micros() as u64
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

    /// Makes `poll` a busy flow's: quick answers both ways, the last one forwarded out at
    /// `now`.
    fn busy_until(poll: &mut BusyPoll, now: Instant) {
        exchanged(poll, now, usize::from(ACTIVE_STREAK), QUICK);
    }

    /// `datagrams` datagrams out and in by turns, each `gap` after the one before, the last
    /// forwarded at `now`.
    fn exchanged(poll: &mut BusyPoll, now: Instant, datagrams: usize, gap: Duration) {
        let mut at = now - gap * u32::try_from(datagrams).expect("few");
        for way in [Way::Out, Way::In].into_iter().cycle().take(datagrams) {
            answered(poll, way, &mut at, gap);
        }
        poll.forwarded_at(Way::Out, now);
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
    fn relays_sharing_a_polling_poll_one_at_a_time() {
        let polling = Polling::new(BUDGET);
        let mut first = BusyPoll::new(polling.clone());
        let mut second = BusyPoll::new(polling);
        let mut apart = poll(BUDGET);
        let start = Instant::now();
        for poll in [&mut first, &mut second, &mut apart] {
            poll.forwarded_at(Way::Out, start);
        }
        let window = first.window().expect("the first takes the turn");
        assert!(second.window().is_none(), "the turn is taken");
        assert!(apart.window().is_some(), "another polling has its own turn");
        drop(window);
        assert!(
            second.window().is_some(),
            "the turn is free again, not held off: the second flow is not active"
        );
    }

    #[test]
    fn a_busy_relay_finding_the_turn_taken_holds_every_relay_off_for_a_while() {
        let polling = Polling::new(BUDGET);
        let mut first = BusyPoll::new(polling.clone());
        let mut second = BusyPoll::new(polling.clone());
        let mut trying = BusyPoll::new(polling);
        let start = Instant::now();
        busy_until(&mut first, start);
        busy_until(&mut second, start);
        let window = first.window().expect("the first takes the turn");
        // A flow whose answers are not known yet finds the turn taken: no other flow is busy.
        trying.forwarded_at(Way::Out, start);
        assert!(trying.window().is_none(), "the turn is taken");
        assert!(!first.crowded(), "a flow trying its first answers");
        assert!(second.window().is_none(), "the turn is taken");
        drop(window);
        // Two flows busy at once: the turn is free, and neither polls.
        let soon = start + HOLD_OFF / 2;
        first.forwarded_at(Way::Out, soon);
        assert!(first.crowded());
        assert!(
            first.window().is_none(),
            "the one that had the turn is held off"
        );
        second.forwarded_at(Way::Out, soon);
        assert!(
            second.window().is_none(),
            "so is the one that found it taken"
        );
        // Held off without finding the turn taken, neither put the hold-off forward.
        first.forwarded_at(Way::Out, start + HOLD_OFF);
        assert!(!first.crowded());
        assert!(first.window().is_some(), "polling again after the hold-off");
    }

    /// Polling with a thread named `name` (shared or the one busy flow's), checked to give it
    /// to no lookup: its few datagrams, quickly answered, do not make a busy flow.
    fn on_a_thread(name: &str, shared: bool) -> Polling {
        let thread = LinkThreads::start_named(1, name).expect("thread");
        let polling = match shared {
            true => Polling::new(BUDGET).on_shared_thread(thread),
            false => Polling::new(BUDGET).on_thread(thread),
        };
        let mut lookup = BusyPoll::new(polling.clone());
        exchanged(&mut lookup, Instant::now(), 3, QUICK);
        assert!(lookup.take_thread().is_none(), "a lookup's few datagrams");
        polling
    }

    fn thread_name(home: &Home) -> Option<String> {
        futures::executor::block_on(
            home.runtime()
                .spawn(async { std::thread::current().name().map(String::from) }),
        )
        .expect("ran")
    }

    #[test]
    fn the_thread_goes_to_a_busy_flow_while_no_other_is_busy_one_relay_at_a_time() {
        let mut nowhere = poll(BUDGET);
        busy_until(&mut nowhere, Instant::now());
        assert!(nowhere.take_thread().is_none(), "no thread given");

        let polling = on_a_thread("relay-test", false);
        let relay = || BusyPoll::new(polling.clone());
        let now = Instant::now();
        let mut slow = relay();
        exchanged(&mut slow, now, 20, SLOW);
        assert!(
            slow.take_thread().is_none(),
            "answers slower than the budget"
        );
        assert!(!slow.crowded());

        let mut first = relay();
        busy_until(&mut first, now);
        let home = first.take_thread().expect("busy and alone");
        assert_eq!(thread_name(&home).as_deref(), Some("relay-test-0"));
        assert!(!first.crowded());

        // While the first holds it, the slow flow, active too, finds it held: another flow
        // is busy, and the first gives the thread back at its next datagram.
        slow.forwarded_at(Way::Out, now);
        assert!(slow.take_thread().is_none(), "held by the first");
        first.forwarded_at(Way::In, now);
        assert!(first.crowded(), "a second active flow");
        drop(home);
        let mut second = relay();
        busy_until(&mut second, now + HOLD_OFF / 2);
        assert!(second.take_thread().is_none(), "crowded");

        // Past the hold-off: free again.
        busy_until(&mut second, now + HOLD_OFF);
        let home = second.take_thread().expect("free again");
        assert_eq!(thread_name(&home).as_deref(), Some("relay-test-0"));
        drop(home);

        // A busy relay finding the turn at polling taken counts the same.
        let later = now + HOLD_OFF * 2;
        busy_until(&mut second, later);
        let window = second.window().expect("the turn");
        let mut third = relay();
        busy_until(&mut third, later);
        assert!(third.window().is_none());
        drop(window);
        assert!(second.crowded());
        assert!(second.take_thread().is_none(), "another flow is busy");
    }

    #[test]
    fn a_shared_thread_goes_to_every_busy_flow_and_none_holds_polling_off() {
        let polling = on_a_thread("shared-test", true);
        let relay = || BusyPoll::new(polling.clone());
        let now = Instant::now();
        let mut first = relay();
        let mut second = relay();
        busy_until(&mut first, now);
        busy_until(&mut second, now);
        let first_home = first.take_thread().expect("busy");
        let second_home = second.take_thread().expect("busy too, the same thread");
        assert_eq!(thread_name(&first_home).as_deref(), Some("shared-test-0"));
        assert_eq!(thread_name(&second_home).as_deref(), Some("shared-test-0"));
        let window = first.window().expect("the turn");
        assert!(second.window().is_none(), "polling still one at a time");
        drop(window);
        assert!(!first.crowded() && !second.crowded());
        assert!(second.window().is_some(), "nor held off");
    }
}

//! Busy polling a relay's sockets for a short while after it forwarded something, before it
//! sleeps until the runtime wakes it. Waking a sleeping thread costs tens of microseconds of
//! CPU and latency where the kernel must wake an idle CPU (on virtual machines above all); an
//! answer that comes back within the budget is taken without that wakeup. What follows is the
//! UDP relays' rules; a TCP stream polls its emptied socket with the same budget and turn
//! ([`Polling::stream_window`], `super::splice`).
//!
//! Polling is spent only where it pays:
//! - a relay polls after forwarding one way only when, the last time it forwarded that way,
//!   the next datagram came within the budget (a flow of slow answers, or a quiet one, stops
//!   polling after one miss and starts again after one quick answer);
//! - the relays sharing a [`Polling`] (all of a router's) poll one at a time, but for those on a
//!   thread of their own (below): so of the threads that serve several flows, at most one
//!   spends its time so and the others keep serving every other flow;
//! - while more flows are busy than can poll (one per thread for them, below, and one on the
//!   runtime), none polls: an active flow (its last [`ACTIVE_STREAK`] datagrams each within
//!   [`ACTIVE_GAP`] of the one before; a lookup's few datagrams are not) that finds every thread
//!   held and the turn taken, itself or the flow holding the turn busy, holds all of them off
//!   for [`HOLD_OFF`]. Polling pays where the CPU it spins on would otherwise wait for its flow's
//!   next datagram; with many more flows busy than CPUs, that CPU has their work to do. Two flows
//!   that are not busy (each waiting for the answer to a request it sends every so often)
//!   meeting at the turn do not count: the turn is given back within the budget, and such flows
//!   beside the busy ones are not more busy flows than can poll;
//! - between two polls the relay yields its CPU (`sched_yield`): the thread it forwarded to, or
//!   the one it forwarded for, is often woken on this same CPU, and spinning would hold it off
//!   until the budget ran out. Where no other thread waits, the yield returns at once.
//! - each busy flow runs on a thread of its own ([`Polling::on_threads`], one per CPU) while one
//!   is free, and polls there without taking the turn: a relay that keeps catching datagrams
//!   never waits, so the runtime's cooperative budget makes it yield every so often, and a
//!   runtime with other threads wakes one of them, which may take the relay over; on a thread of
//!   its own it carries on where it was, and sleeps for its own flow only. A relay takes a
//!   thread when it is active, its datagrams follow each other within the budget both ways and
//!   a thread is free ([`BusyPoll::take_thread`]), and gives it back as soon as more flows are
//!   busy than can poll ([`BusyPoll::crowded`]), or it waited [`QUIET`] for a datagram, so that
//!   a quiet flow does not keep a thread from a busy one. One busy flow more than threads polls
//!   on the runtime with the turn; with more still, all run on the runtime that spawned them:
//!   its threads find one flow's datagram ready while another's is on its way, where a thread
//!   shared by several relays would serve one while the others wait;
//! - where the router may use one CPU only, every busy flow runs on its one thread and none
//!   holds polling off ([`Polling::on_shared_thread`]): there, relays polling in turn with
//!   yields carried two flows as well as a thread per relay, and holding polling off had cost
//!   two flows (with the benchmark's earlier load; `BENCHMARKS.md`, UDP's section).
//!
//! Each window is counted by what it caught ([`PollCounts`]: the router's `busy_polls_total`),
//! so that an operator can see whether polling pays on a node.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use super::datagrams::Way;
use crate::links::LinkThreads;

/// How long no relay polls after an active one found every thread held and the turn taken, it
/// or the holder busy.
pub const HOLD_OFF: Duration = Duration::from_millis(10);

/// A flow is active while this many datagrams in a row each came within [`ACTIVE_GAP`] of the
/// one forwarded before.
pub const ACTIVE_STREAK: u8 = 8;

/// See [`ACTIVE_STREAK`].
pub const ACTIVE_GAP: Duration = Duration::from_millis(1);

/// How long a relay on a thread of its own waits for a datagram before it gives the thread
/// back.
pub const QUIET: Duration = Duration::from_millis(10);

/// How relays busy poll: their budget, the turn they take one at a time, and the threads busy
/// flows run on.
#[derive(Debug, Clone, Default)]
pub struct Polling {
    budget: Duration,
    /// Held by the relay polling now: [`FREE`], [`TAKEN`] or [`TAKEN_BY_BUSY`].
    turn: Arc<AtomicU8>,
    /// When an active relay last found every thread held and the turn taken, it or the holder
    /// busy.
    contended: Arc<Contention>,
    /// The threads busy flows' relays run on whole; without them, relays run where they are
    /// spawned.
    threads: Option<RelayThreads>,
    /// What the windows opened caught (one count shared, so that cloning a polling for each
    /// relay adds one reference, not one per counter).
    counts: Arc<PollCounts>,
}

/// What the windows relays polled in caught, per kind of relay (the router's
/// `busy_polls_total`).
#[derive(Debug, Clone, Default)]
pub struct PollCounts {
    /// The UDP relays' windows ([`BusyPoll::window`]).
    pub udp: Outcomes,
    /// A TCP stream's windows ([`Polling::stream_window`]).
    pub stream: Outcomes,
}

/// How many windows caught something (a datagram, a stream's next bytes) and how many closed
/// with nothing caught.
#[derive(Debug, Clone, Default)]
pub struct Outcomes {
    pub caught: Counter,
    pub missed: Counter,
}

/// The turn at polling is free.
const FREE: u8 = 0;
/// The turn at polling is taken by a relay whose flow is not busy.
const TAKEN: u8 = 1;
/// The turn at polling is taken by a busy flow's relay.
const TAKEN_BY_BUSY: u8 = 2;

/// The threads of [`Polling::on_threads`] or the thread of [`Polling::on_shared_thread`].
#[derive(Debug, Clone)]
struct RelayThreads {
    runtime: LinkThreads,
    /// Per thread, whether a relay holds it (a busy flow's).
    held: Arc<[AtomicBool]>,
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

    /// The same, each busy flow's relay run whole on one of `threads` of its own while one is
    /// free.
    pub fn on_threads(self, threads: LinkThreads) -> Self {
        self.with_threads(threads, false)
    }

    /// The same, every busy flow's relay run whole on `thread` (its first), and none holding
    /// polling off while several are busy: for a router with one CPU, where polling in turn
    /// with yields carried several flows as well as one.
    pub fn on_shared_thread(self, thread: LinkThreads) -> Self {
        self.with_threads(thread, true)
    }

    /// The same, what each window catches counted in `counts`.
    pub fn counted(self, counts: PollCounts) -> Self {
        Polling {
            counts: Arc::new(counts),
            ..self
        }
    }

    fn with_threads(self, runtime: LinkThreads, shared: bool) -> Self {
        Polling {
            threads: Some(RelayThreads {
                held: (0..runtime.count())
                    .map(|_| AtomicBool::new(false))
                    .collect(),
                runtime,
                shared,
            }),
            ..self
        }
    }

    fn shared(&self) -> bool {
        self.threads.as_ref().is_some_and(|threads| threads.shared)
    }

    /// A window to poll a TCP stream's socket in, from now for the budget, with the turn: for a
    /// relay whose read emptied the socket in the midst of a stream, whose next bytes are most
    /// likely on their way. `None` if polling is off, held off because more UDP flows are busy
    /// than can poll (as for them, [`BusyPoll::crowded`]), or another relay polls.
    pub fn stream_window(&self) -> Option<Window<'_>> {
        if self.budget.is_zero() {
            return None;
        }
        let now = Instant::now();
        if !self.shared() && self.contended.within(now, HOLD_OFF) {
            return None;
        }
        self.turn
            .compare_exchange(FREE, TAKEN, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        Some(Window {
            turn: Some(&self.turn),
            until: now + self.budget,
            outcomes: &self.counts.stream,
        })
    }
}

/// A relay's place on a thread of [`Polling::on_threads`] (held, given back when dropped) or
/// on that of [`Polling::on_shared_thread`].
#[derive(Debug)]
pub struct Home {
    runtime: tokio::runtime::Handle,
    /// The threads' flags and this one's index, when it is held.
    held: Option<(Arc<[AtomicBool]>, usize)>,
}

impl Home {
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        if let Some((held, index)) = &self.held {
            held[*index].store(false, Ordering::Release);
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

    /// A window to poll in now, for a relay running on a thread of [`BusyPoll::take_thread`]
    /// (`on_thread`) or where it was spawned: if polling is worth it, the relay is not crowded
    /// ([`BusyPoll::crowded`]) and it holds its thread ([`BusyPoll::holds_thread`]) or no other
    /// relay polls. It closes a budget after the last datagram forwarded, and gives the turn
    /// back when dropped. An active relay that finds the turn taken while every thread is held,
    /// itself or the holder busy, holds all polling off for [`HOLD_OFF`].
    pub fn window(&self, on_thread: bool) -> Option<Window<'_>> {
        let Polling {
            budget,
            turn,
            counts,
            ..
        } = &self.polling;
        let (way, at) = self.last?;
        let quick = self.gaps[slot(way)].is_none_or(|gap| gap <= *budget);
        if budget.is_zero() || !quick || self.crowded() {
            return None;
        }
        let until = at + *budget;
        let outcomes = &counts.udp;
        if self.holds_thread(on_thread) {
            return Some(Window {
                turn: None,
                until,
                outcomes,
            });
        }
        let busy = self.busy();
        let taken = if busy { TAKEN_BY_BUSY } else { TAKEN };
        if let Err(holder) =
            turn.compare_exchange(FREE, taken, Ordering::Acquire, Ordering::Relaxed)
        {
            let a_busy_one = busy || holder == TAKEN_BY_BUSY;
            if a_busy_one && self.active() && self.every_thread_held() {
                self.polling.contended.seen(at);
            }
            return None;
        }
        Some(Window {
            turn: Some(turn),
            until,
            outcomes,
        })
    }

    /// A thread of [`Polling::on_threads`], held until the [`Home`] is dropped: given when this
    /// flow is busy (a flow whose requests come at intervals does not move for each), not
    /// crowded ([`BusyPoll::crowded`]) and a thread is free. A flow that finds every thread held
    /// stays where it is and polls there with the turn ([`BusyPoll::window`]). With
    /// [`Polling::on_shared_thread`], the one thread to every busy flow.
    pub fn take_thread(&self) -> Option<Home> {
        let threads = self.polling.threads.as_ref()?;
        if threads.shared {
            return self.busy().then(|| Home {
                runtime: threads.runtime.at(0),
                held: None,
            });
        }
        let held = &threads.held;
        // A plain read first: a flow finding every thread held need not take the lines.
        if !self.busy() || self.crowded() || self.every_thread_held() {
            return None;
        }
        let index = held.iter().position(|held| {
            held.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        })?;
        Some(Home {
            runtime: threads.runtime.at(index),
            held: Some((held.clone(), index)),
        })
    }

    /// Whether every thread of [`Polling::on_threads`] is held (a plain read: no line taken).
    fn every_thread_held(&self) -> bool {
        self.polling.threads.as_ref().is_some_and(|threads| {
            !threads.shared && threads.held.iter().all(|held| held.load(Ordering::Relaxed))
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

    /// Whether this relay, running on a thread of [`BusyPoll::take_thread`] (`on_thread`), holds
    /// it alone (not so on a shared one): it polls there without the turn, and gives the thread
    /// back after waiting [`QUIET`] for a datagram.
    pub fn holds_thread(&self, on_thread: bool) -> bool {
        on_thread && !self.polling.shared()
    }

    /// Whether more flows are busy than can poll: an active relay found every thread held and
    /// the turn taken, it or the holder busy, less than [`HOLD_OFF`] before the last datagram
    /// this one forwarded (never so with a shared thread).
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

/// The last time an active relay found every thread held and the turn taken, it or the holder
/// busy, as microseconds after `since`, plus one (zero: never).
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
    /// The turn taken, where the relay shares its thread.
    turn: Option<&'a AtomicU8>,
    until: Instant,
    /// Where [`Window::poll`] counts what it caught.
    outcomes: &'a Outcomes,
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

    /// Tries `attempt` until it catches something or the window closes, pausing between tries,
    /// and counts which it was; an error ends it, uncounted.
    pub fn poll<T>(
        &self,
        mut attempt: impl FnMut() -> io::Result<Option<T>>,
    ) -> io::Result<Option<T>> {
        loop {
            if let Some(caught) = attempt()? {
                self.outcomes.caught.inc();
                return Ok(Some(caught));
            }
            if !self.open() {
                self.outcomes.missed.inc();
                return Ok(None);
            }
            self.pause();
        }
    }
}

impl Drop for Window<'_> {
    fn drop(&mut self) {
        if let Some(turn) = self.turn {
            turn.store(FREE, Ordering::Release);
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Duration = Duration::from_micros(50);
    const QUICK: Duration = Duration::from_micros(20);
    const SLOW: Duration = Duration::from_micros(500);
    /// Within [`ACTIVE_GAP`], longer than [`BUDGET`].
    const PACE: Duration = Duration::from_micros(900);

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

    /// Makes `poll` a paced flow's: a request every [`PACE`], each answered quickly, so active
    /// but not busy; the last request forwarded out at `now`.
    fn paced_until(poll: &mut BusyPoll, now: Instant) {
        let mut at = now - PACE * u32::from(ACTIVE_STREAK);
        for _ in 0..ACTIVE_STREAK {
            answered(poll, Way::Out, &mut at, QUICK);
            answered(poll, Way::In, &mut at, PACE - QUICK);
        }
        poll.forwarded_at(Way::Out, now);
    }

    /// A relay of `polling` whose flow is busy ([`busy_until`] `now`).
    fn busy_relay(polling: &Polling, now: Instant) -> BusyPoll {
        let mut relay = BusyPoll::new(polling.clone());
        busy_until(&mut relay, now);
        relay
    }

    /// A relay of `polling` whose flow is paced ([`paced_until`] `now`).
    fn paced_relay(polling: &Polling, now: Instant) -> BusyPoll {
        let mut relay = BusyPoll::new(polling.clone());
        paced_until(&mut relay, now);
        relay
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
        assert!(poll(BUDGET).window(false).is_none());
        let mut off = poll(Duration::ZERO);
        off.forwarded(Way::Out);
        assert!(off.window(false).is_none());
    }

    #[test]
    fn polls_after_a_quick_answer_and_stops_after_a_slow_one_per_way() {
        let mut poll = poll(BUDGET);
        let mut now = Instant::now();
        poll.forwarded_at(Way::Out, now);
        assert!(poll.window(false).is_some(), "unknown gaps are tried once");
        // Answers to what goes out come quickly; the next request after an answer does not.
        answered(&mut poll, Way::Out, &mut now, QUICK);
        answered(&mut poll, Way::In, &mut now, SLOW);
        poll.forwarded_at(Way::Out, now);
        assert!(poll.window(false).is_some(), "after a request out");
        poll.forwarded_at(Way::In, now);
        assert!(poll.window(false).is_none(), "after an answer in");
        // One quick one starts it again.
        answered(&mut poll, Way::In, &mut now, QUICK);
        poll.forwarded_at(Way::In, now);
        assert!(poll.window(false).is_some(), "after a quick one in");
    }

    #[test]
    fn the_window_closes_a_budget_after_the_datagram_forwarded() {
        let mut long = poll(Duration::from_secs(3600));
        long.forwarded(Way::Out);
        assert!(long.window(false).expect("a window").open());
        let mut short = poll(Duration::from_millis(1));
        short.forwarded(Way::Out);
        let window = short.window(false).expect("a window");
        std::thread::sleep(Duration::from_millis(1));
        assert!(!window.open());
    }

    #[test]
    fn relays_sharing_a_polling_poll_one_at_a_time_and_hold_no_one_off() {
        let polling = Polling::new(BUDGET);
        let mut first = BusyPoll::new(polling.clone());
        let mut second = BusyPoll::new(polling);
        let mut apart = poll(BUDGET);
        let start = Instant::now();
        busy_until(&mut first, start);
        busy_until(&mut second, start);
        apart.forwarded_at(Way::Out, start);
        let window = first.window(false).expect("the first takes the turn");
        assert!(second.window(false).is_none(), "the turn is taken");
        assert!(
            apart.window(false).is_some(),
            "another polling has its own turn"
        );
        drop(window);
        assert!(
            !first.crowded() && !second.crowded(),
            "a busy flow finding the turn taken holds no one off"
        );
        assert!(
            second.window(false).is_some(),
            "the turn is free again at once"
        );
    }

    /// Polling with `threads` threads named `name` (shared or one per busy flow), checked to
    /// give none to a lookup: its few datagrams, quickly answered, do not make a busy flow.
    fn on_threads(name: &str, threads: usize, shared: bool) -> Polling {
        let threads = LinkThreads::start_named(threads, name).expect("threads");
        let polling = match shared {
            true => Polling::new(BUDGET).on_shared_thread(threads),
            false => Polling::new(BUDGET).on_threads(threads),
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
    fn each_busy_flow_takes_a_thread_of_its_own_while_one_is_free() {
        let mut nowhere = poll(BUDGET);
        busy_until(&mut nowhere, Instant::now());
        assert!(nowhere.take_thread().is_none(), "no thread given");

        let polling = on_threads("relay-test", 2, false);
        let now = Instant::now();
        let mut slow = BusyPoll::new(polling.clone());
        exchanged(&mut slow, now, 20, SLOW);
        assert!(
            slow.take_thread().is_none(),
            "answers slower than the budget"
        );
        assert!(!slow.crowded());

        // Two busy flows, a thread each, and each polls there without taking the turn.
        let mut first = busy_relay(&polling, now);
        let second = busy_relay(&polling, now);
        let first_home = first.take_thread().expect("busy, a thread free");
        let second_home = second.take_thread().expect("busy, the other thread free");
        assert_eq!(thread_name(&first_home).as_deref(), Some("relay-test-0"));
        assert_eq!(thread_name(&second_home).as_deref(), Some("relay-test-1"));
        let first_window = first.window(true).expect("polls alone on its thread");
        assert!(second.window(true).is_some(), "so does the second");
        drop(first_window);
        assert!(!first.crowded() && !second.crowded());

        // Two paced flows on the runtime, active but not busy: one polls for its answer with
        // the turn, and the other, finding the turn taken by a flow that is not busy, crowds no
        // one.
        let paced = paced_relay(&polling, now);
        let other_paced = paced_relay(&polling, now);
        assert!(paced.take_thread().is_none(), "not busy");
        let paced_window = paced.window(false).expect("the turn, for its answer");
        assert!(other_paced.window(false).is_none(), "the turn is taken");
        drop(paced_window);
        assert!(
            !first.crowded() && !other_paced.crowded(),
            "paced flows beside the busy ones are not more busy flows than can poll"
        );

        // A third busy flow finds every thread held: it stays on the runtime and polls there
        // with the turn, crowding no one.
        let mut third = busy_relay(&polling, now);
        assert!(third.take_thread().is_none(), "every thread held");
        assert!(
            !first.crowded(),
            "one flow more than threads, on the runtime"
        );
        let third_window = third.window(false).expect("the turn on the runtime");
        // A fourth busy flow finds the turn taken too: more flows are busy than can poll, and
        // the holders give their threads back at their next datagram.
        let fourth = busy_relay(&polling, now);
        assert!(fourth.window(false).is_none(), "the turn is taken");
        drop(third_window);
        first.forwarded_at(Way::In, now);
        assert!(first.crowded(), "a fourth active flow");
        assert!(first.window(true).is_none(), "no polling while crowded");
        assert!(second.crowded() && third.crowded());
        drop((first_home, second_home));
        busy_until(&mut third, now + HOLD_OFF / 2);
        assert!(third.take_thread().is_none(), "crowded");

        // Past the hold-off: free again.
        busy_until(&mut third, now + HOLD_OFF);
        let home = third.take_thread().expect("free again");
        assert_eq!(thread_name(&home).as_deref(), Some("relay-test-0"));
    }

    #[test]
    fn a_busy_flow_finding_the_turn_taken_by_a_paced_one_crowds_the_others() {
        let polling = on_threads("paced-test", 1, false);
        let now = Instant::now();
        let on_thread = busy_relay(&polling, now);
        let _home = on_thread.take_thread().expect("busy, the thread free");
        let paced = paced_relay(&polling, now);
        let paced_window = paced.window(false).expect("the turn, for its answer");
        let busy = busy_relay(&polling, now);
        assert!(busy.take_thread().is_none(), "the thread held");
        assert!(busy.window(false).is_none(), "the turn is taken");
        drop(paced_window);
        assert!(
            on_thread.crowded() && paced.crowded(),
            "a busy flow more than can poll"
        );
    }

    #[test]
    fn a_shared_thread_goes_to_every_busy_flow_and_none_holds_polling_off() {
        let polling = on_threads("shared-test", 1, true);
        let now = Instant::now();
        let first = busy_relay(&polling, now);
        let second = busy_relay(&polling, now);
        let first_home = first.take_thread().expect("busy");
        let second_home = second.take_thread().expect("busy too, the same thread");
        assert_eq!(thread_name(&first_home).as_deref(), Some("shared-test-0"));
        assert_eq!(thread_name(&second_home).as_deref(), Some("shared-test-0"));
        let window = first.window(true).expect("the turn");
        assert!(second.window(true).is_none(), "polling still one at a time");
        drop(window);
        assert!(!first.crowded() && !second.crowded());
        assert!(second.window(true).is_some(), "nor held off");
    }

    #[test]
    fn a_stream_polls_for_the_budget_with_the_turn_and_not_when_off() {
        assert!(
            Polling::new(Duration::ZERO).stream_window().is_none(),
            "polling off"
        );
        let polling = Polling::new(BUDGET);
        let before = Instant::now();
        let window = polling.stream_window().expect("the turn is free");
        assert!(window.until >= before + BUDGET && window.until <= Instant::now() + BUDGET);
        assert!(
            polling.stream_window().is_none(),
            "one relay polls at a time"
        );
        let now = Instant::now();
        let udp = busy_relay(&polling, now);
        assert!(udp.window(false).is_none(), "the same turn as datagrams'");
        drop(window);
        let udp_window = udp.window(false).expect("given back");
        assert!(
            polling.stream_window().is_none(),
            "taken by the datagrams now"
        );
        drop(udp_window);
        assert!(polling.stream_window().is_some());
    }

    #[test]
    fn a_stream_does_not_poll_while_the_udp_flows_crowd() {
        let polling = Polling::new(BUDGET);
        polling.contended.seen(Instant::now());
        assert!(polling.stream_window().is_none(), "held off");
        let shared = on_threads("stream-shared", 1, true);
        shared.contended.seen(Instant::now());
        assert!(
            shared.stream_window().is_some(),
            "never held off with one shared thread"
        );
    }

    #[test]
    fn each_window_counts_what_it_caught_for_its_kind_of_relay() {
        let counts = PollCounts::default();
        let polling = Polling::new(Duration::from_secs(3600)).counted(counts.clone());
        let tally = |outcomes: &Outcomes| (outcomes.caught.get(), outcomes.missed.get());
        let mut tries = 0;
        let caught = polling.stream_window().expect("a window").poll(|| {
            tries += 1;
            Ok((tries == 3).then_some(tries))
        });
        assert_eq!(caught.expect("no error"), Some(3), "tried until it caught");
        assert_eq!(
            (tally(&counts.stream), tally(&counts.udp)),
            ((1, 0), (0, 0))
        );

        let mut udp = BusyPoll::new(polling.clone());
        udp.forwarded(Way::Out);
        let caught = udp.window(false).expect("a window").poll(|| Ok(Some(())));
        assert!(caught.expect("no error").is_some());
        let failed = udp
            .window(false)
            .expect("a window")
            .poll(|| Err::<Option<()>, _>(io::ErrorKind::ConnectionRefused.into()));
        assert!(failed.is_err(), "an error ends it");
        assert_eq!(
            (tally(&counts.stream), tally(&counts.udp)),
            ((1, 0), (1, 0))
        );

        let short = Polling::new(Duration::from_millis(1)).counted(counts.clone());
        let mut quiet = BusyPoll::new(short.clone());
        quiet.forwarded(Way::In);
        let nothing = quiet
            .window(false)
            .expect("a window")
            .poll(|| Ok(None::<()>));
        assert!(nothing.expect("no error").is_none());
        let nothing = short
            .stream_window()
            .expect("a window")
            .poll(|| Ok(None::<()>));
        assert!(nothing.expect("no error").is_none());
        assert_eq!(
            (tally(&counts.stream), tally(&counts.udp)),
            ((1, 1), (1, 1))
        );
    }
}

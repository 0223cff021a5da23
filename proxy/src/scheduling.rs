//! How the kernel schedules the router's threads.
//!
//! A relay is woken by the bytes an application writes, on the writer's CPU. Scheduled as usual
//! it preempts the writer there, so that when it passes the bytes on, the writer is still
//! runnable on that CPU and the reader is woken on another one; where that CPU is idle, waking it
//! costs most of a small request's time through the relay. Under `SCHED_BATCH` a woken thread
//! does not preempt the one running: the writer goes on to wait for its answer, and the relay
//! then wakes the reader on the CPU they share. The price is that on a node whose every CPU is
//! busy with other work, a woken relay waits for the running thread's time slice instead of
//! taking the CPU at once. `Auto`, the default, therefore follows the node: batch while at
//! least one of its CPUs stands idle, normal while they are all busy, decided again every
//! second from `/proc/stat`. Each thread puts itself under the policy wanted when it next wakes
//! (the runtimes call [`follow`] as their threads unpark), as a thread can set only its own nice
//! value and the library takes a thread's policy and nice value together.

use std::cell::Cell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use thread_priority::{
    NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
};

/// The scheduling policy of the router's threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Scheduling {
    /// The kernel's default (`SCHED_OTHER`): a woken thread may preempt the running one.
    Normal,
    /// `SCHED_BATCH`: a woken thread waits for the running one to sleep or use its time slice.
    Batch,
    /// `Batch` while at least one of the node's CPUs is idle, `Normal` while none is.
    #[default]
    Auto,
}

/// As the flag takes it.
impl fmt::Display for Scheduling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use clap::ValueEnum;
        let value = self
            .to_possible_value()
            .expect("every choice is a flag value");
        f.write_str(value.get_name())
    }
}

impl Scheduling {
    fn policy(self) -> ThreadSchedulePolicy {
        ThreadSchedulePolicy::Normal(match self {
            Scheduling::Normal | Scheduling::Auto => NormalThreadSchedulePolicy::Other,
            Scheduling::Batch => NormalThreadSchedulePolicy::Batch,
        })
    }

    /// Its number in [`WANTED`].
    fn index(self) -> u8 {
        match self {
            Scheduling::Normal => 0,
            Scheduling::Batch => 1,
            Scheduling::Auto => 2,
        }
    }

    /// The policy a number in [`WANTED`] stands for: `None` for [`UNDECIDED`], and for `Auto`,
    /// which is not a policy of its own.
    fn from_index(index: u8) -> Option<Scheduling> {
        [Scheduling::Normal, Scheduling::Batch]
            .into_iter()
            .find(|s| s.index() == index)
    }
}

/// Puts the calling thread under `scheduling`, keeping its nice value; threads it starts from
/// then on inherit it, so the router calls this before it starts any. `Normal` changes
/// nothing. `Auto` starts the watch of the node's CPUs, reading `/proc/stat` every second,
/// and leaves the threads as they are until it has decided. An error says why the kernel
/// refused (a seccomp profile may forbid the call) or why the CPUs cannot be read.
pub fn apply(scheduling: Scheduling) -> Result<(), String> {
    match scheduling {
        Scheduling::Normal => Ok(()),
        Scheduling::Batch => set(Scheduling::Batch),
        Scheduling::Auto => watch(PathBuf::from(PROC_STAT), WATCH_INTERVAL),
    }
}

/// Puts the calling thread under `scheduling`'s policy, keeping its nice value.
fn set(scheduling: Scheduling) -> Result<(), String> {
    let policy = scheduling.policy();
    let nice = rustix::process::getpriority_process(None)
        .map_err(|e| format!("cannot read this thread's nice value: {e}"))?;
    let priority = priority_keeping(nice, policy)
        .ok_or_else(|| format!("no priority keeps the nice value {nice}"))?;
    thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        priority,
        policy,
    )
    .map_err(|error| {
        let why = match error {
            thread_priority::Error::OS(code) => std::io::Error::from_raw_os_error(code).to_string(),
            other => other.to_string(),
        };
        format!("cannot schedule the router's threads as {scheduling}: {why}")
    })
}

/// Where the kernel counts the time each CPU spent idle.
const PROC_STAT: &str = "/proc/stat";
/// How often `Auto` decides again.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// What `Auto` wants the threads under now: [`UNDECIDED`] unless it runs, else a
/// [`Scheduling`] as its index among the choices.
static WANTED: AtomicU8 = AtomicU8::new(UNDECIDED);
const UNDECIDED: u8 = u8::MAX;

thread_local! {
    /// What the calling thread last put itself under through [`follow`].
    static HELD: Cell<u8> = const { Cell::new(UNDECIDED) };
}

/// Puts the calling thread under the policy `Auto` wants, if it is not under it already: a
/// load and a compare unless the wish changed. The runtimes call it as each thread unparks. A
/// refusal leaves the thread as it was, and is logged as a warning the first time, at debug
/// after.
pub fn follow() {
    static REFUSED: AtomicBool = AtomicBool::new(false);
    let wanted = WANTED.load(Ordering::Relaxed);
    if HELD.get() == wanted {
        return;
    }
    HELD.set(wanted);
    if let Some(scheduling) = Scheduling::from_index(wanted)
        && let Err(error) = set(scheduling)
    {
        if REFUSED.swap(true, Ordering::Relaxed) {
            tracing::debug!("{error}; this thread stays as it was");
        } else {
            tracing::warn!("{error}; the threads stay as they were");
        }
    }
}

/// One reading of `/proc/stat`: the time all CPUs together spent idle and in total (in the
/// kernel's ticks), and how many CPUs there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Times {
    idle: u64,
    total: u64,
    cpus: u32,
}

impl Times {
    /// Parses `/proc/stat`'s text: the first line sums every CPU's times (user, nice, system,
    /// idle, iowait, irq, softirq, steal; guest time is counted in user already), a `cpuN`
    /// line follows per CPU. Idle is idle and iowait.
    fn parse(text: &str) -> Result<Times, String> {
        let mut lines = text.lines();
        let first = lines.next().unwrap_or_default();
        let mut fields = first.split_whitespace();
        if fields.next() != Some("cpu") {
            return Err(format!("its first line is not the CPUs' sum: {first:?}"));
        }
        let counts = fields
            .take(8)
            .map(|field| field.parse::<u64>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("a count of its first line: {e}"))?;
        if counts.len() < 5 {
            return Err(format!("its first line has no idle or iowait: {first:?}"));
        }
        let cpus = lines
            .filter(|line| {
                line.strip_prefix("cpu")
                    .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
            })
            .count();
        Ok(Times {
            idle: counts[3].saturating_add(counts[4]),
            total: counts.iter().fold(0u64, |sum, n| sum.saturating_add(*n)),
            cpus: u32::try_from(cpus).unwrap_or(u32::MAX).max(1),
        })
    }

    fn read(path: &Path) -> Result<Times, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Times::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// `Batch` if the CPUs idled at least one CPU's worth of the time from `self` to `later`,
    /// `Normal` if not; `None` if no time passed.
    fn choice_until(self, later: Times) -> Option<Scheduling> {
        let total = later.total.checked_sub(self.total).filter(|t| *t > 0)?;
        let idle = later.idle.saturating_sub(self.idle);
        // Idle CPUs = idle / total × cpus, compared with 1.
        let idle_cpus_at_least_one = u128::from(idle) * u128::from(later.cpus) >= u128::from(total);
        Some(if idle_cpus_at_least_one {
            Scheduling::Batch
        } else {
            Scheduling::Normal
        })
    }
}

/// Starts the thread that decides, every `interval`, what [`follow`] puts threads under, from
/// the CPUs' times in `path`, for the life of the process. Fails if `path` cannot be read to
/// begin with.
fn watch(path: PathBuf, interval: Duration) -> Result<(), String> {
    let mut watch = Watch::new(path)?;
    std::thread::Builder::new()
        .name("scheduling".into())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                if let Some(choice) = watch.step() {
                    WANTED.store(choice.index(), Ordering::Relaxed);
                }
            }
        })
        .map(drop)
        .map_err(|e| format!("cannot start the scheduling thread: {e}"))
}

/// `Auto`'s readings of the CPUs' times.
#[derive(Debug)]
struct Watch {
    path: PathBuf,
    before: Times,
    /// The last choice, to log a change once.
    chosen: Option<Scheduling>,
}

impl Watch {
    fn new(path: PathBuf) -> Result<Watch, String> {
        let before = Times::read(&path)?;
        Ok(Watch {
            path,
            before,
            chosen: None,
        })
    }

    /// Reads the times again and chooses from the time since the last reading; a failed read
    /// keeps the last choice.
    fn step(&mut self) -> Option<Scheduling> {
        match Times::read(&self.path) {
            Ok(now) => {
                if let Some(choice) = self.before.choice_until(now)
                    && self.chosen != Some(choice)
                {
                    // The first choice at info, the changes (up to one a reading) at debug.
                    if self.chosen.is_none() {
                        tracing::info!(scheduling = %choice, "first choice for the node's CPUs");
                    } else {
                        tracing::debug!(scheduling = %choice, "the node's CPUs changed");
                    }
                    self.chosen = Some(choice);
                }
                self.before = now;
            }
            Err(error) => tracing::debug!("{error}; the threads' scheduling stays"),
        }
        self.chosen
    }
}

/// The library sets the nice value along with the policy, from a priority of 0 to 99: the one
/// that gives `nice` under `policy`, so that setting the policy keeps it.
fn priority_keeping(nice: i32, policy: ThreadSchedulePolicy) -> Option<ThreadPriority> {
    (0..=99u8)
        .filter_map(|value| ThreadPriorityValue::try_from(value).ok())
        .map(ThreadPriority::Crossplatform)
        .find(|priority| priority.to_posix(policy).ok() == Some(nice))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current() -> ThreadSchedulePolicy {
        thread_priority::thread_schedule_policy().expect("the policy is readable")
    }

    /// Run in threads of their own, so that the test harness's threads keep their policy.
    #[test]
    fn batch_is_set_for_the_thread_and_those_it_starts_keeping_the_nice_value() {
        std::thread::spawn(|| {
            let nice = rustix::process::getpriority_process(None).expect("nice");
            assert_eq!(current(), Scheduling::Normal.policy());
            apply(Scheduling::Batch).expect("a thread may choose batch");
            assert_eq!(current(), Scheduling::Batch.policy());
            assert_eq!(
                rustix::process::getpriority_process(None).expect("nice"),
                nice
            );
            let started = std::thread::spawn(current).join().expect("join");
            assert_eq!(started, Scheduling::Batch.policy());
        })
        .join()
        .expect("join");
    }

    #[test]
    fn choices_read_as_the_flag_takes_them() {
        assert_eq!(Scheduling::Normal.to_string(), "normal");
        assert_eq!(Scheduling::Batch.to_string(), "batch");
        assert_eq!(Scheduling::Auto.to_string(), "auto");
    }

    /// `/proc/stat` of a node with `cpus` CPUs whose times sum to `idle` and `iowait` idle and
    /// `busy` spread over user, system and steal.
    fn stat(cpus: usize, idle: u64, iowait: u64, busy: u64) -> String {
        let mut text = format!(
            "cpu  {} 0 {} {idle} {iowait} 0 0 {} 0 0\n",
            busy / 2,
            busy / 4,
            busy - busy / 2 - busy / 4
        );
        for cpu in 0..cpus {
            text.push_str(&format!("cpu{cpu} 1 0 1 1 0 0 0 0 0 0\n"));
        }
        text.push_str("intr 12 0 0\nctxt 345\nbtime 1700000000\nprocs_running 1\n");
        text
    }

    #[test]
    fn proc_stat_gives_the_idle_time_the_total_and_the_cpus() {
        let times = Times::parse(&stat(4, 700, 50, 250)).expect("parses");
        assert_eq!(
            times,
            Times {
                idle: 750,
                total: 1000,
                cpus: 4
            }
        );
        // Guest time is in user already, so the last two fields are not added.
        let times = Times::parse("cpu  10 0 10 80 0 0 0 0 500 500\ncpu0 1\n").expect("parses");
        assert_eq!(times.total, 100);
    }

    #[test]
    fn a_proc_stat_not_as_the_kernel_writes_it_is_refused() {
        for (text, says) in [
            ("", "not the CPUs' sum"),
            ("intr 1 2\ncpu 1 2 3 4 5\n", "not the CPUs' sum"),
            ("cpu  1 2 3\n", "no idle or iowait"),
            ("cpu  1 2 x 4 5\n", "a count of its first line"),
            ("cpu  1 2 3 4 -5\n", "a count of its first line"),
        ] {
            let error = Times::parse(text).expect_err(text);
            assert!(error.contains(says), "{text:?}: {error}");
        }
    }

    #[test]
    fn batch_while_a_whole_cpu_idles_normal_while_none_does() {
        let at = |idle, busy| Times {
            idle,
            total: idle + busy,
            cpus: 2,
        };
        let start = at(1_000, 1_000);
        // Two CPUs over 100 ticks of each: 120 idle is 1.2 CPUs, 100 is one, 80 is 0.8.
        assert_eq!(
            start.choice_until(at(1_120, 1_080)),
            Some(Scheduling::Batch)
        );
        assert_eq!(
            start.choice_until(at(1_100, 1_100)),
            Some(Scheduling::Batch)
        );
        assert_eq!(
            start.choice_until(at(1_080, 1_120)),
            Some(Scheduling::Normal)
        );
        assert_eq!(
            start.choice_until(at(1_000, 1_200)),
            Some(Scheduling::Normal)
        );
        // No time passed (or the counts went back): no choice.
        assert_eq!(start.choice_until(start), None);
        assert_eq!(start.choice_until(at(900, 900)), None);
        // One CPU can never spare a whole one.
        let one = |idle, busy| Times {
            idle,
            total: idle + busy,
            cpus: 1,
        };
        assert_eq!(one(0, 0).choice_until(one(99, 1)), Some(Scheduling::Normal));
    }

    #[test]
    fn the_watch_chooses_from_each_reading_and_keeps_its_choice_when_one_fails() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("stat");
        let write = |idle, busy| std::fs::write(&path, stat(2, idle, 0, busy)).expect("write");
        write(1_000, 1_000);
        let mut watch = Watch::new(path.clone()).expect("readable");
        write(1_150, 1_050);
        assert_eq!(watch.step(), Some(Scheduling::Batch));
        write(1_200, 1_200);
        assert_eq!(watch.step(), Some(Scheduling::Normal));
        std::fs::write(&path, "garbage").expect("write");
        assert_eq!(watch.step(), Some(Scheduling::Normal));
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(watch.step(), Some(Scheduling::Normal));
        // It goes on from the last good reading.
        write(1_400, 1_200);
        assert_eq!(watch.step(), Some(Scheduling::Batch));
        let error = Watch::new(dir.path().join("none")).expect_err("no file");
        assert!(error.contains("cannot read"), "{error}");
    }

    /// The only test that sets what `Auto` wants, so that none sees another's wish.
    #[test]
    fn threads_follow_the_wish_when_they_next_wake() {
        std::thread::spawn(|| {
            let nice = rustix::process::getpriority_process(None).expect("nice");
            follow();
            assert_eq!(current(), Scheduling::Normal.policy(), "nothing wished yet");
            WANTED.store(Scheduling::Batch.index(), Ordering::Relaxed);
            assert_eq!(current(), Scheduling::Normal.policy(), "not woken yet");
            follow();
            assert_eq!(current(), Scheduling::Batch.policy());
            assert_eq!(
                rustix::process::getpriority_process(None).expect("nice"),
                nice
            );
            WANTED.store(Scheduling::Normal.index(), Ordering::Relaxed);
            follow();
            assert_eq!(current(), Scheduling::Normal.policy());
            WANTED.store(Scheduling::Batch.index(), Ordering::Relaxed);
            // A runtime's threads call it as they unpark.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_unpark(follow)
                .build()
                .expect("runtime");
            runtime.block_on(async { tokio::time::sleep(Duration::from_millis(5)).await });
            assert_eq!(current(), Scheduling::Batch.policy());
            WANTED.store(UNDECIDED, Ordering::Relaxed);
        })
        .join()
        .expect("join");
    }

    #[test]
    fn normal_changes_nothing() {
        std::thread::spawn(|| {
            apply(Scheduling::Normal).expect("nothing to refuse");
            assert_eq!(current(), Scheduling::Normal.policy());
        })
        .join()
        .expect("join");
    }

    #[test]
    fn every_nice_value_has_a_priority_that_keeps_it() {
        let policy = Scheduling::Batch.policy();
        for nice in -20..=19 {
            let priority = priority_keeping(nice, policy);
            let posix = priority.map(|p| p.to_posix(policy).expect("a priority of the policy"));
            assert_eq!(posix, Some(nice), "nice {nice}");
        }
    }
}

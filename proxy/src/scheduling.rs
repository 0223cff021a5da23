//! How the kernel schedules the router's threads.
//!
//! A relay is woken by the bytes an application writes, on the writer's CPU. Scheduled as usual
//! it preempts the writer there, so that when it passes the bytes on, the writer is still
//! runnable on that CPU and the reader is woken on another one; where that CPU is idle, waking it
//! costs most of a small request's time through the relay. Under `SCHED_BATCH` a woken thread
//! does not preempt the one running: the writer goes on to wait for its answer, and the relay
//! then wakes the reader on the CPU they share. The price is that on a node whose every CPU is
//! busy with other work, a woken relay waits for the running thread's time slice instead of
//! taking the CPU at once, so it is the operator's choice (`--scheduling`), not the default.

use std::fmt;

use thread_priority::{
    NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
};

/// The scheduling policy of the router's threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Scheduling {
    /// The kernel's default (`SCHED_OTHER`): a woken thread may preempt the running one.
    #[default]
    Normal,
    /// `SCHED_BATCH`: a woken thread waits for the running one to sleep or use its time slice.
    Batch,
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
            Scheduling::Normal => NormalThreadSchedulePolicy::Other,
            Scheduling::Batch => NormalThreadSchedulePolicy::Batch,
        })
    }
}

/// Puts the calling thread under `scheduling`, keeping its nice value; threads it starts from
/// then on inherit it, so the router calls this before it starts any. `Normal` changes
/// nothing. An error says why the kernel refused (a seccomp profile may forbid the call).
pub fn apply(scheduling: Scheduling) -> Result<(), String> {
    if scheduling == Scheduling::Normal {
        return Ok(());
    }
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
        format!("cannot schedule this process as {scheduling}: {why}")
    })
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

//! The e2e test binaries' runner: async tests sharing one cluster, run as libtest-mimic trials
//! (so `cargo test` filters, lists and reports them as usual).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use libtest_mimic::{Arguments, Conclusion, Failed, Trial};

pub type TestFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;
/// A test: its name and the function that runs it against the shared state.
pub type Test<S> = (&'static str, fn(Arc<S>) -> TestFuture);

/// Warnings, and what the cluster harness says it does, into the test output.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "warn,servicekeel_e2e=info,kube_client=off",
        ))
        .with_test_writer()
        .with_ansi(servicekeel_api::logs::colour(&std::io::stdout()))
        .init();
}

/// Whether this run only lists the tests (`--list`): nothing needs to start.
pub fn list_only<S>(args: &Arguments, tests: &[Test<S>]) -> Option<Conclusion> {
    args.list.then(|| {
        let trials = tests
            .iter()
            .map(|(name, _)| Trial::test(*name, || Ok(())))
            .collect();
        libtest_mimic::run(args, trials)
    })
}

/// Runs each test on `runtime` against `shared`; a failure reports the test's error followed by
/// `explain`'s words about the shared state (what runs, what it logged).
pub fn run<S: Send + Sync + 'static>(
    args: &Arguments,
    tests: Vec<Test<S>>,
    shared: &Arc<S>,
    runtime: &tokio::runtime::Handle,
    explain: fn(&S) -> String,
) -> Conclusion {
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            let shared = shared.clone();
            let runtime = runtime.clone();
            Trial::test(name, move || {
                runtime.block_on(test(shared.clone())).map_err(|error| {
                    let context = explain(&shared);
                    let sep = if context.is_empty() { "" } else { "\n" };
                    Failed::from(format!("{error:#}{sep}{context}"))
                })
            })
        })
        .collect();
    libtest_mimic::run(args, trials)
}

//! The pod sandbox's process: holds the pod's namespaces, reaps orphans, exits on SIGTERM or
//! SIGINT (as PID 1 it would otherwise ignore them).

use signal_hook::consts::{SIGCHLD, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

fn main() {
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGCHLD]) {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("pause: cannot handle signals: {error}");
            std::process::exit(1);
        }
    };
    for signal in signals.forever() {
        if signal == SIGCHLD {
            while let Ok(Some(_)) = rustix::process::wait(rustix::process::WaitOptions::NOHANG) {}
        } else {
            std::process::exit(0);
        }
    }
}

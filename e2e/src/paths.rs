//! Where things are: the checkout, the cache outside it, the binaries of this workspace, kubectl.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::kubernetes::is_executable;

/// The repository checkout this crate was built from.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ sits in the repository")
        .to_path_buf()
}

/// The Go module that builds Kubernetes.
pub fn kube_module() -> PathBuf {
    repo().join("e2e/kube")
}

/// `$SERVICEKEEL_CACHE`, else `$XDG_CACHE_HOME/servicekeel`, else `~/.cache/servicekeel`.
pub fn cache_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SERVICEKEEL_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("servicekeel"));
    }
    let home = std::env::var_os("HOME").context("neither SERVICEKEEL_CACHE nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/servicekeel"))
}

/// A binary of this workspace (`servicekeel-webhook`, ...), from the target directory the
/// running program was built into. It is built there (same profile) or brought up to date first,
/// once per process, so a run never uses a binary older than the source; without cargo at hand
/// the one found there is used as it is.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let exe = std::env::current_exe().context("cannot find the running program")?;
    // target/<profile>/servicekeel-e2e, or target/<profile>/deps/<test>-<hash>.
    let find = || {
        exe.ancestors()
            .skip(1)
            .take(2)
            .map(|dir| dir.join(name))
            .find(|candidate| is_executable(candidate))
    };
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if built.iter().any(|b| b == name) {
        return find().with_context(|| format!("{name} is gone from beside {}", exe.display()));
    }
    let release = exe.components().any(|c| c.as_os_str() == "release");
    let mut command = cargo();
    command.args(["build", "--quiet", "-p", name, "--bin", name]);
    if release {
        command.arg("--release");
    }
    match command.status() {
        Ok(status) if status.success() => {}
        Ok(status) => bail!("`cargo build -p {name}` failed ({status})"),
        Err(error) => match find() {
            Some(found) => {
                tracing::warn!(binary = name, %error, "cannot run cargo; using the binary as it is");
                return Ok(found);
            }
            None => return Err(error).context("cannot run cargo"),
        },
    }
    built.push(name.to_string());
    find().with_context(|| format!("{name} is still not next to {}", exe.display()))
}

/// Cargo (`$CARGO`, else `cargo`) in the repository, without the variables cargo sets for the
/// crate it runs (`CARGO_PKG_*`, `CARGO_MANIFEST_*`, ...). A build script that asks to rerun when
/// one of those changes (ring's does) would otherwise see them differ between a build run from
/// here and one run by hand, and every such switch would rebuild all that depends on it.
pub fn cargo() -> std::process::Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = std::process::Command::new(program);
    command.current_dir(repo());
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_for_the_crate = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || matches!(
                key,
                "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "OUT_DIR"
            );
        if set_for_the_crate {
            command.env_remove(key);
        }
    }
    command
}

/// kubectl: `$KUBECTL`, else the 1.33 build if installed beside the default one, else `kubectl`.
pub fn kubectl() -> PathBuf {
    if let Some(path) = std::env::var_os("KUBECTL") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.push(PathBuf::from("/usr/lib/google-cloud-sdk/bin"));
    dirs.into_iter()
        .map(|dir| dir.join("kubectl.1.33"))
        .find(|candidate| is_executable(candidate))
        .unwrap_or_else(|| PathBuf::from("kubectl"))
}

/// A directory for this run's cluster under the system temp dir, after removing those of runs
/// whose process is gone (a killed run cannot clean up after itself).
pub fn run_dir(prefix: &str) -> PathBuf {
    let temp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&temp) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = name
                .strip_prefix(prefix)
                .and_then(|pid| pid.strip_prefix('-'))
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
            if stale {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    temp.join(format!("{prefix}-{}", std::process::id()))
}

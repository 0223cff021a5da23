//! Kubernetes binaries built from the Kubernetes Go modules, through the Go module proxy.
//!
//! `e2e/kube/go.mod` (written by `update-go-mod.sh`) pins the release; it is the one place the
//! version is named. Binaries are built into `<cache>/kubernetes-<version>/` outside the
//! checkout and reused until missing; a lock file keeps two runs from building at once.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::paths;
use crate::process::log_tail;

/// The Kubernetes commands this project builds.
pub const APISERVER: &str = "kube-apiserver";
pub const CONTROLLER_MANAGER: &str = "kube-controller-manager";
pub const SCHEDULER: &str = "kube-scheduler";
pub const KUBELET: &str = "kubelet";

#[derive(Debug, Clone)]
pub struct KubeBinaries {
    version: String,
    dir: PathBuf,
}

impl KubeBinaries {
    /// The pinned release, read from `e2e/kube/go.mod`.
    pub fn pinned_version() -> anyhow::Result<String> {
        let go_mod = paths::kube_module().join("go.mod");
        let text = std::fs::read_to_string(&go_mod)
            .with_context(|| format!("cannot read {}", go_mod.display()))?;
        text.lines()
            .find_map(|line| {
                let line = line.trim().trim_start_matches("require").trim();
                line.strip_prefix("k8s.io/kubernetes ")
                    .map(|version| version.trim().to_string())
            })
            .with_context(|| format!("{} does not require k8s.io/kubernetes", go_mod.display()))
    }

    /// The binaries named, built first where missing.
    pub fn ensure(names: &[&str]) -> anyhow::Result<KubeBinaries> {
        let version = Self::pinned_version()?;
        let dir = paths::cache_dir()?.join(format!("kubernetes-{version}"));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let binaries = KubeBinaries { version, dir };
        if names.iter().all(|name| binaries.path(name).exists()) {
            return Ok(binaries);
        }
        let lock = File::create(binaries.dir.join(".lock"))?;
        lock.lock()
            .context("cannot lock the Kubernetes build directory")?;
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|name| !binaries.path(name).exists())
            .collect();
        if !missing.is_empty() {
            binaries.build(&missing)?;
        }
        Ok(binaries)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Builds `names` in one `go build`, so that the packages they share compile once.
    fn build(&self, names: &[&str]) -> anyhow::Result<()> {
        let go = which_go()?;
        let log_path = self.dir.join("build.log");
        let log = File::create(&log_path)?;
        let partial = self.dir.join("partial");
        if partial.exists() {
            std::fs::remove_dir_all(&partial)?;
        }
        std::fs::create_dir_all(&partial)?;
        let minor = self
            .version
            .trim_start_matches('v')
            .split('.')
            .nth(1)
            .unwrap_or_default()
            .to_string();
        let mut ldflags = vec!["-s".to_string(), "-w".to_string()];
        for package in [
            "k8s.io/component-base/version",
            "k8s.io/client-go/pkg/version",
        ] {
            ldflags.push(format!("-X {package}.gitVersion={}", self.version));
            ldflags.push(format!("-X {package}.gitMajor=1"));
            ldflags.push(format!("-X {package}.gitMinor={minor}"));
            ldflags.push(format!("-X {package}.gitTreeState=clean"));
        }
        tracing::info!(
            binaries = names.join(", "),
            version = %self.version,
            log = %log_path.display(),
            "building from the Kubernetes Go modules (the first build takes several minutes)"
        );
        let mut output_dir = partial.clone().into_os_string();
        // With several packages, `-o` names a directory when it ends in a slash.
        output_dir.push("/");
        let status = Command::new(&go)
            .current_dir(paths::kube_module())
            .env("CGO_ENABLED", "0")
            .env("GOFLAGS", "-mod=readonly")
            .args(["build", "-trimpath", "-ldflags", &ldflags.join(" "), "-o"])
            .arg(&output_dir)
            .args(
                names
                    .iter()
                    .map(|name| format!("k8s.io/kubernetes/cmd/{name}")),
            )
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .with_context(|| format!("cannot run {}", go.display()))?;
        if !status.success() {
            bail!(
                "building {} {} failed ({status}); the end of {}:\n{}",
                names.join(", "),
                self.version,
                log_path.display(),
                log_tail(&log_path, 30)
            );
        }
        for name in names {
            std::fs::rename(partial.join(name), self.path(name))
                .with_context(|| format!("go build made no {name}"))?;
        }
        std::fs::remove_dir_all(&partial)?;
        Ok(())
    }
}

fn which_go() -> anyhow::Result<PathBuf> {
    let output = Command::new("go").arg("version").output();
    match output {
        Ok(output) if output.status.success() => Ok(PathBuf::from("go")),
        _ => bail!(
            "Go is needed to build the Kubernetes binaries (go version 1.24 or newer on the PATH); \
             none was found"
        ),
    }
}

/// Whether `path` is an executable file.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

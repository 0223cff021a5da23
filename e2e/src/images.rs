//! Container images of this workspace's binaries, built here and handed to containerd as OCI
//! image-layout tarballs: static musl binaries, one uncompressed layer, no base image, no
//! registry. Their names are the ones `manifests/` uses, so the manifests apply unchanged.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::json;

use crate::paths;

/// The target every image binary is built for: static, so an image needs nothing but the file.
pub const TARGET: &str = "x86_64-unknown-linux-musl";

/// An image: one binary at the root of an otherwise empty filesystem.
#[derive(Debug, Clone, Copy)]
pub struct ImageSpec {
    /// The reference pods use (as written in `manifests/`).
    pub reference: &'static str,
    pub package: &'static str,
    pub binary: &'static str,
    /// `uid:gid`; `None` runs as root unless the pod says otherwise.
    pub user: Option<&'static str>,
}

/// The sidecar and the router (`servicekeel-proxy sidecar|router`).
pub const PROXY: ImageSpec = ImageSpec {
    reference: "docker.io/servicekeel/proxy:0.1.0",
    package: "servicekeel-proxy",
    binary: "servicekeel-proxy",
    user: Some("65532:65532"),
};
pub const WEBHOOK: ImageSpec = ImageSpec {
    reference: "docker.io/servicekeel/webhook:0.1.0",
    package: "servicekeel-webhook",
    binary: "servicekeel-webhook",
    user: Some("65532:65532"),
};
/// The workloads of `manifests/examples/`.
pub const DEMO: ImageSpec = ImageSpec {
    reference: "docker.io/servicekeel/demo:0.1.0",
    package: "servicekeel-demo",
    binary: "servicekeel-demo",
    user: Some("65532:65532"),
};
/// The pod sandbox image the node's containerd is configured with.
pub const PAUSE: ImageSpec = ImageSpec {
    reference: "docker.io/servicekeel/pause:0.1.0",
    package: "servicekeel-demo",
    binary: "pause",
    user: None,
};

pub const ALL: [ImageSpec; 4] = [PROXY, WEBHOOK, DEMO, PAUSE];

/// How the images' binaries are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Quick to build: what the tests run.
    Debug,
    /// Optimised: what users run, and what the benchmarks measure.
    Release,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

/// Builds the static binaries of `images` (one cargo run) and writes each image's tarball into
/// `dir`; returns the tarballs in the order given.
pub fn build(images: &[ImageSpec], dir: &Path, profile: Profile) -> anyhow::Result<Vec<PathBuf>> {
    let binaries = static_binaries(images, profile)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    images
        .iter()
        .zip(binaries)
        .map(|(image, binary)| {
            let tarball = dir.join(format!("{}.oci.tar", image.binary));
            write_layout(image, &binary, &tarball)?;
            Ok(tarball)
        })
        .collect()
}

/// Builds the static binaries of `images`, the ones their images hold, in one cargo run;
/// returns their paths in the order given.
pub fn static_binaries(images: &[ImageSpec], profile: Profile) -> anyhow::Result<Vec<PathBuf>> {
    let mut command = paths::cargo();
    command.args(["build", "--locked", "--target", TARGET]);
    if profile == Profile::Release {
        command.arg("--release");
    }
    for image in images {
        command
            .args(["-p", image.package])
            .args(["--bin", image.binary]);
    }
    tracing::info!(
        target = TARGET,
        ?profile,
        "building the images' static binaries"
    );
    let output = command
        .stdout(std::process::Stdio::null())
        .output()
        .context("cannot run cargo")?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
        let hint = if stderr.contains("musl-gcc") || stderr.contains("target may not be installed")
        {
            "\n(run e2e/node/install.sh: it installs musl-tools and the musl Rust target)"
        } else {
            ""
        };
        bail!(
            "building the static binaries failed ({}):\n{}{hint}",
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let dir = paths::repo()
        .join("target")
        .join(TARGET)
        .join(profile.dir());
    images
        .iter()
        .map(|image| {
            let path = dir.join(image.binary);
            anyhow::ensure!(path.is_file(), "cargo built no {}", path.display());
            Ok(path)
        })
        .collect()
}

/// Writes an OCI image layout (index, manifest, config, one layer) as a tarball.
pub fn write_layout(image: &ImageSpec, binary: &Path, tarball: &Path) -> anyhow::Result<()> {
    let layer = layer(binary, image.binary)?;
    let layer_digest = digest(&layer);
    let mut config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": [format!("/{}", image.binary)],
            "Env": ["PATH=/"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    if let Some(user) = image.user {
        config["config"]["User"] = json!(user);
    }
    let config = serde_json::to_vec(&config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))?;
    let tag = image
        .reference
        .rsplit_once(':')
        .map_or("latest", |(_, tag)| tag);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest),
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": image.reference,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))?;

    let partial = tarball.with_extension("partial");
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let mut archive = tar::Builder::new(std::io::BufWriter::new(file));
    for blob in [&layer, &config, &manifest] {
        let name = format!("blobs/sha256/{}", &digest(blob)["sha256:".len()..]);
        append(&mut archive, &name, blob, 0o644)?;
    }
    append(
        &mut archive,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    )?;
    append(&mut archive, "index.json", &index, 0o644)?;
    archive.into_inner()?.flush()?;
    std::fs::rename(&partial, tarball)?;
    Ok(())
}

/// The layer: the binary, mode 755, owned by root, at `/<name>`.
fn layer(binary: &Path, name: &str) -> anyhow::Result<Vec<u8>> {
    let contents =
        std::fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    let mut archive = tar::Builder::new(Vec::new());
    append(&mut archive, name, &contents, 0o755)?;
    Ok(archive.into_inner()?)
}

fn append<W: Write>(
    archive: &mut tar::Builder<W>,
    name: &str,
    contents: &[u8],
    mode: u32,
) -> anyhow::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_size(contents.len() as u64);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    archive.append_data(&mut header, name, contents)?;
    Ok(())
}

fn digest(bytes: &[u8]) -> String {
    let hash = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sidecar's postStart hook runs the proxy binary by this path.
    #[test]
    fn the_proxy_binary_is_where_the_sidecar_hook_runs_it() {
        assert_eq!(
            format!("/{}", PROXY.binary),
            servicekeel_api::defaults::SIDECAR_BINARY
        );
    }

    #[test]
    fn digests_are_sha256_in_hex() {
        assert_eq!(
            digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn a_layout_names_the_image_and_holds_every_blob_it_refers_to() {
        let dir = tempfile::tempdir().expect("temp dir");
        let binary = dir.path().join("app");
        std::fs::write(&binary, b"\x7fELF not really").expect("write");
        let tarball = dir.path().join("app.oci.tar");
        write_layout(&DEMO, &binary, &tarball).expect("layout");

        let mut files = std::collections::BTreeMap::new();
        let mut archive = tar::Archive::new(std::fs::File::open(&tarball).expect("open"));
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let path = entry.path().expect("path").display().to_string();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes).expect("read");
            files.insert(path, bytes);
        }
        let blob = |digest: &str| {
            let name = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
            let bytes = files.get(&name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(
                super::digest(bytes),
                digest,
                "{name} is not what its name says"
            );
            bytes.clone()
        };
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).expect("index");
        let descriptor = &index["manifests"][0];
        assert_eq!(
            descriptor["annotations"]["io.containerd.image.name"],
            DEMO.reference
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&blob(descriptor["digest"].as_str().expect("digest")))
                .expect("manifest");
        let config: serde_json::Value = serde_json::from_slice(&blob(
            manifest["config"]["digest"].as_str().expect("digest"),
        ))
        .expect("config");
        assert_eq!(config["config"]["Entrypoint"][0], "/servicekeel-demo");
        assert_eq!(config["config"]["User"], "65532:65532");
        let layer_digest = manifest["layers"][0]["digest"].as_str().expect("digest");
        assert_eq!(config["rootfs"]["diff_ids"][0], layer_digest);

        let layer = blob(layer_digest);
        let mut layer = tar::Archive::new(&layer[..]);
        let mut entry = layer
            .entries()
            .expect("entries")
            .next()
            .expect("one file")
            .expect("entry");
        assert_eq!(
            entry.path().expect("path").display().to_string(),
            "servicekeel-demo"
        );
        assert_eq!(entry.header().mode().expect("mode"), 0o755);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).expect("read");
        assert_eq!(bytes, b"\x7fELF not really");
    }
}

//! `cargo xtask install [--prefix P]`: builds the release binaries and installs agt-jail as a
//! host daemon.
//!
//! - `PREFIX/bin/agt-jail` and `PREFIX/bin/agt-jail-full` (the one finds the other beside it);
//! - `PREFIX/share/agt-jail/profiles/` and `.../policies/`: the ring profiles (built into the
//!   binary; these copies are for reading and for `--profile FILE`) and the example policies
//!   (`--policy` always names a file: nothing is looked up there implicitly);
//! - `/etc/systemd/system/agt-jail.service` from deploy/systemd/, its `ExecStart=` pointing at
//!   `PREFIX/bin/agt-jail` (the admin's unit directory, searched whatever the prefix);
//! - the system group `agt-jail` (members may use the control socket), when missing;
//! - `systemctl daemon-reload` where systemd runs.
//!
//! Then: `systemctl enable --now agt-jail`. The test VM's systemd guest runs this command
//! itself (`--prebuilt`), under systemd.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};

use crate::util::{is_root, output, repo_root, run_checked, target_dir};

/// The unit as kept in the repository.
pub const UNIT: &str = include_str!("../../deploy/systemd/agt-jail.service");
/// Where the unit's `ExecStart=` points in the repository copy.
const UNIT_BINARY: &str = "/usr/local/bin/agt-jail";
/// Where the unit is installed (relative to the root installed into).
pub const UNIT_PATH: &str = "etc/systemd/system/agt-jail.service";
pub const GROUP: &str = "agt-jail";
const BINARIES: [&str; 2] = ["agt-jail", "agt-jail-full"];

#[derive(clap::Args)]
pub struct Options {
    /// Installation prefix: binaries in PREFIX/bin, profiles and example policies in
    /// PREFIX/share/agt-jail. The unit always goes to /etc/systemd/system.
    #[arg(long, default_value = "/usr/local")]
    prefix: PathBuf,
    /// Install the `agt-jail` and `agt-jail-full` found in DIR instead of building release
    /// binaries (binaries built elsewhere; the test VM's systemd guest installs this way).
    #[arg(long, value_name = "DIR")]
    prebuilt: Option<PathBuf>,
}

pub fn run(opts: &Options) -> Result<()> {
    ensure!(opts.prefix.is_absolute(), "--prefix {} is not an absolute path", opts.prefix.display());
    ensure!(
        is_root(),
        "install writes {} and /{UNIT_PATH} and adds a system group: run it as root",
        opts.prefix.display()
    );
    let built = match &opts.prebuilt {
        Some(dir) => dir.clone(),
        None => build_release()?,
    };
    let placed = stage(Path::new("/"), &opts.prefix, &built)?;
    for path in &placed {
        println!("install: {}", path.display());
    }
    ensure_group()?;
    if Path::new("/run/systemd/system").is_dir() {
        run_checked(Command::new("systemctl").arg("daemon-reload"))?;
        println!("install: systemctl daemon-reload done; start it with: systemctl enable --now agt-jail");
    } else {
        println!(
            "install: systemd is not running on this machine: the unit is in place for when it does \
             (then: systemctl daemon-reload && systemctl enable --now agt-jail)"
        );
    }
    Ok(())
}

/// `cargo build --release --locked` of the two binaries; returns the directory holding them.
fn build_release() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    run_checked(Command::new(cargo).current_dir(repo_root()).args([
        "build",
        "--release",
        "--locked",
        "-p",
        "agt-jail-cli",
        "--bin",
        "agt-jail",
        "--bin",
        "agt-jail-full",
    ]))?;
    Ok(target_dir().join("release"))
}

/// Places the binaries from `bin_dir`, profiles, policies and the unit under `root` (`/` for
/// this machine, a staging tree for the test VM) for `prefix`. Files are written beside their
/// destination and renamed over it, so a running daemon's binary is replaced, never
/// rewritten in place. Returns the paths written.
pub fn stage(root: &Path, prefix: &Path, bin_dir: &Path) -> Result<Vec<PathBuf>> {
    let under = |path: &Path| root.join(path.strip_prefix("/").unwrap_or(path));
    let mut placed = Vec::new();
    for name in BINARIES {
        let from = bin_dir.join(name);
        let data = fs::read(&from).with_context(|| format!("cannot read {} (was it built?)", from.display()))?;
        placed.push(put(&under(&prefix.join("bin").join(name)), &data, 0o755)?);
    }
    let share = under(&prefix.join("share/agt-jail"));
    let repo = repo_root();
    for dir in ["profiles", "policies"] {
        copy_tree(&repo.join(dir), &share.join(dir), &mut placed)?;
    }
    let unit = unit_for(&prefix.join("bin/agt-jail"))?;
    placed.push(put(&root.join(UNIT_PATH), unit.as_bytes(), 0o644)?);
    Ok(placed)
}

/// The unit with `ExecStart=` (and `ExecReload=`) naming `binary`.
pub fn unit_for(binary: &Path) -> Result<String> {
    let binary = binary.to_str().with_context(|| format!("{} is not UTF-8", binary.display()))?;
    ensure!(
        !binary.contains(char::is_whitespace),
        "the install path {binary} holds whitespace, which ExecStart= would split"
    );
    let mut found = 0;
    let text: String = UNIT
        .lines()
        .map(|line| {
            for key in ["ExecStart=", "ExecReload="] {
                if let Some(args) = line.strip_prefix(key).and_then(|rest| rest.strip_prefix(UNIT_BINARY)) {
                    found += usize::from(key == "ExecStart=");
                    return format!("{key}{binary}{args}\n");
                }
            }
            format!("{line}\n")
        })
        .collect();
    if found != 1 {
        bail!("deploy/systemd/agt-jail.service has {found} `ExecStart={UNIT_BINARY} ...` lines, expected one");
    }
    Ok(text)
}

fn put(dest: &Path, data: &[u8], mode: u32) -> Result<PathBuf> {
    let dir = dest.parent().with_context(|| format!("{} has no parent directory", dest.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.install-{}", std::process::id()));
    fs::write(&tmp, data).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", tmp.display()))?;
    fs::rename(&tmp, dest).with_context(|| format!("cannot move {} to {}", tmp.display(), dest.display()))?;
    Ok(dest.to_path_buf())
}

fn copy_tree(from: &Path, to: &Path, placed: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> =
        fs::read_dir(from).with_context(|| format!("cannot list {}", from.display()))?.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&path, &to.join(entry.file_name()), placed)?;
        } else if kind.is_file() {
            let data = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            placed.push(put(&to.join(entry.file_name()), &data, 0o644)?);
        }
    }
    Ok(())
}

/// Adds the system group that may use the control socket, unless it exists.
fn ensure_group() -> Result<()> {
    if output(Command::new("getent").args(["group", GROUP])).is_some() {
        return Ok(());
    }
    run_checked(Command::new("groupadd").args(["--system", GROUP]))?;
    println!("install: added system group {GROUP} (its members may use /run/agt-jail/agt.sock)");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_unit_points_at_the_prefix_and_nothing_else_changes() {
        let unit = unit_for(Path::new("/opt/agt/bin/agt-jail")).unwrap();
        assert!(unit.contains("\nExecStart=/opt/agt/bin/agt-jail daemon\n"), "{unit}");
        assert!(unit.contains("\nExecReload=/opt/agt/bin/agt-jail reload\n"), "{unit}");
        assert!(!unit.contains(UNIT_BINARY));
        assert_eq!(unit.lines().count(), UNIT.lines().count());
        assert!(format!("{:#}", unit_for(Path::new("/opt/a b/agt-jail")).unwrap_err()).contains("whitespace"));
    }

    #[test]
    fn stage_places_binaries_profiles_policies_and_the_unit() {
        let tmp = std::env::temp_dir().join(format!("agt-install-test-{}", std::process::id()));
        let bins = tmp.join("bins");
        fs::create_dir_all(&bins).unwrap();
        for name in BINARIES {
            fs::write(bins.join(name), b"\x7fELF").unwrap();
        }
        let root = tmp.join("root");
        stage(&root, Path::new("/usr/local"), &bins).unwrap();
        let agt = root.join("usr/local/bin/agt-jail");
        assert_eq!(fs::metadata(&agt).unwrap().permissions().mode() & 0o777, 0o755);
        assert!(root.join("usr/local/bin/agt-jail-full").is_file());
        assert!(root.join("usr/local/share/agt-jail/profiles/ring2.yaml").is_file());
        assert!(root.join("usr/local/share/agt-jail/policies/coding-agent/policy.yaml").is_file());
        let unit = fs::read_to_string(root.join(UNIT_PATH)).unwrap();
        assert!(unit.contains("ExecStart=/usr/local/bin/agt-jail daemon"));
        // A second install over the first replaces, never fails.
        stage(&root, Path::new("/usr/local"), &bins).unwrap();
        let missing = format!("{:#}", stage(&root, Path::new("/usr/local"), &tmp.join("none")).unwrap_err());
        assert!(missing.contains("none/agt-jail") && missing.contains("was it built"), "{missing}");
        fs::remove_dir_all(&tmp).unwrap();
    }

    /// `systemd-analyze verify` of the unit as installed (ExecStart= must name an existing
    /// executable, so it points at this test binary). Where systemd-analyze is missing the
    /// test says so and checks nothing; CI has it (.ci/run checks the unit too).
    #[test]
    fn the_installed_unit_passes_systemd_analyze_verify() {
        if output(Command::new("sh").args(["-c", "command -v systemd-analyze"])).is_none() {
            eprintln!("systemd-analyze is not installed: unit not verified");
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let dir = std::env::temp_dir().join(format!("agt-unit-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let unit = dir.join("agt-jail.service");
        fs::write(&unit, unit_for(&exe).unwrap()).unwrap();
        let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        fs::remove_dir_all(&dir).unwrap();
        assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {}\n{said}", out.status);
    }
}

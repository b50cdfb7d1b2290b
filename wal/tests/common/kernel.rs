//! Real filesystems for fault tests: loop-mounted XFS images that can be
//! shut down (a dead disk, or a power cut when the log is not flushed) and
//! size-limited tmpfs mounts (a full disk). Every mount is undone by `Drop`,
//! also when the test fails.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why kernel fault tests cannot run here, or `None` when they can.
/// With `DATANODE_REQUIRE_KERNEL_TESTS=1` (set by CI) a missing capability
/// fails the test instead of skipping it.
pub fn unavailable(tools: &[&str]) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let reason = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root".to_string())
    } else {
        tools.iter().find(|tool| which(tool).is_none()).map(|tool| format!("{tool} is not installed"))
    };
    if let Some(reason) = &reason {
        assert!(
            std::env::var("DATANODE_REQUIRE_KERNEL_TESTS").as_deref() != Ok("1"),
            "kernel fault test cannot run: {reason}"
        );
        eprintln!("SKIPPED: {reason}");
    }
    reason
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

pub fn run(program: &str, args: &[&str]) {
    let output = Command::new(which(program).unwrap_or_else(|| PathBuf::from(program))).args(args).output();
    let output = output.unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An XFS filesystem on a sparse image file, loop-mounted.
pub struct XfsDisk {
    _scratch: tempfile::TempDir,
    image: PathBuf,
    mount_point: PathBuf,
    mounted: bool,
}

impl XfsDisk {
    /// Makes and mounts a fresh filesystem (300 MiB, the XFS minimum;
    /// sparse, so it costs only what is written).
    pub fn new() -> XfsDisk {
        let scratch = tempfile::tempdir().unwrap();
        let image = scratch.path().join("disk.img");
        let mount_point = scratch.path().join("mnt");
        std::fs::create_dir(&mount_point).unwrap();
        std::fs::File::create(&image).unwrap().set_len(300 << 20).unwrap();
        run("mkfs.xfs", &["-q", image.to_str().unwrap()]);
        let mut disk = XfsDisk { _scratch: scratch, image, mount_point, mounted: false };
        disk.mount();
        disk
    }

    pub fn path(&self) -> &Path {
        &self.mount_point
    }

    pub fn mount(&mut self) {
        run("mount", &["-o", "loop", self.image.to_str().unwrap(), self.mount_point.to_str().unwrap()]);
        self.mounted = true;
    }

    pub fn unmount(&mut self) {
        run("umount", &[self.mount_point.to_str().unwrap()]);
        self.mounted = false;
    }

    /// Shuts the filesystem down: every later operation fails with EIO.
    /// With `flush_log` the journal is written first (a dead disk); without
    /// it, whatever was not yet on the journal is lost (a power cut).
    pub fn shutdown(&self, flush_log: bool) {
        let command = if flush_log { "shutdown -f" } else { "shutdown" };
        run("xfs_io", &["-x", "-c", command, self.mount_point.to_str().unwrap()]);
    }

    /// Power cut and reboot: shut down without flushing, unmount, mount
    /// again (the journal is replayed).
    pub fn power_cycle(&mut self) {
        self.shutdown(false);
        self.unmount();
        self.mount();
    }
}

impl Drop for XfsDisk {
    fn drop(&mut self) {
        if self.mounted {
            let target = self.mount_point.to_str().unwrap_or_default();
            let clean = Command::new("umount").arg(target).status().is_ok_and(|s| s.success());
            if !clean {
                let _ = Command::new("umount").args(["-l", target]).status();
            }
        }
    }
}

/// A tmpfs of a fixed size: writes past it fail with ENOSPC.
pub struct SmallTmpfs {
    _scratch: tempfile::TempDir,
    mount_point: PathBuf,
}

impl SmallTmpfs {
    pub fn new(bytes: u64) -> SmallTmpfs {
        let scratch = tempfile::tempdir().unwrap();
        let mount_point = scratch.path().join("mnt");
        std::fs::create_dir(&mount_point).unwrap();
        run("mount", &["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs", mount_point.to_str().unwrap()]);
        SmallTmpfs { _scratch: scratch, mount_point }
    }

    pub fn path(&self) -> &Path {
        &self.mount_point
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount_point).status();
    }
}

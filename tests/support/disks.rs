//! Real filesystems for fault tests: loop-mounted XFS and ext4 images that
//! can be shut down (a dead disk, or a power cut when the log is not
//! flushed), and size-limited tmpfs mounts (a full disk). Every mount is
//! undone by `Drop`, also when the test fails.
//!
//! Shared by the WAL's kernel tests (`wal/tests/kernel_faults.rs`) and the
//! node's (`tests/faults.rs`); see `fuse.rs` for images with injected
//! faults.
#![allow(dead_code, clippy::unwrap_used)]

use std::any::Any;
use std::ops::Range;
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
    skipped(reason)
}

/// [`unavailable`] for another missing capability: `reason`, when given,
/// is printed as SKIPPED, or fails the test under
/// `DATANODE_REQUIRE_KERNEL_TESTS=1`.
pub fn skipped(reason: Option<String>) -> Option<String> {
    if let Some(reason) = &reason {
        assert!(
            std::env::var("DATANODE_REQUIRE_KERNEL_TESTS").as_deref() != Ok("1"),
            "kernel fault test cannot run: {reason}"
        );
        eprintln!("SKIPPED: {reason}");
    }
    reason
}

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// Runs a command; panics with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(which(program).unwrap_or_else(|| PathBuf::from(program))).args(args).output();
    let output = output.unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Evicts clean cached pages of every file (root only), so that the next
/// reads go to the disk. Returns whether it could.
pub fn drop_page_cache() -> bool {
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// The filesystem on a loop disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fs {
    Xfs,
    Ext4,
}

impl Fs {
    /// The tools a test on this filesystem needs.
    pub fn tools(self) -> &'static [&'static str] {
        match self {
            Fs::Xfs => &["mkfs.xfs", "xfs_io", "mount", "umount"],
            Fs::Ext4 => &["mkfs.ext4", "xfs_io", "mount", "umount"],
        }
    }
}

/// A filesystem on an image file, loop-mounted.
pub struct LoopDisk {
    image: PathBuf,
    mount_point: PathBuf,
    fs: Fs,
    mounted: bool,
    /// Whatever serves the image (a FUSE session); dropped after the
    /// unmount, before the scratch directory goes.
    _backing: Option<Box<dyn Any>>,
    _scratch: tempfile::TempDir,
}

/// A small disk (XFS's smallest filesystem is 300 MiB); the image is
/// sparse, so it costs only what is written.
const IMAGE_BYTES: u64 = 320 << 20;

impl LoopDisk {
    /// Makes and mounts a fresh filesystem on a sparse image in a scratch
    /// directory.
    pub fn new(fs: Fs) -> LoopDisk {
        let scratch = tempfile::tempdir().unwrap();
        let image = scratch.path().join("disk.img");
        std::fs::File::create(&image).unwrap().set_len(IMAGE_BYTES).unwrap();
        LoopDisk::on_image(fs, image, scratch, None)
    }

    /// Makes and mounts a filesystem on `image` (an existing file of the
    /// right size), kept alive by `backing`.
    pub fn on_image(fs: Fs, image: PathBuf, scratch: tempfile::TempDir, backing: Option<Box<dyn Any>>) -> LoopDisk {
        let mount_point = scratch.path().join("mnt");
        std::fs::create_dir(&mount_point).unwrap();
        match fs {
            Fs::Xfs => run("mkfs.xfs", &["-q", "-f", image.to_str().unwrap()]),
            Fs::Ext4 => run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]),
        };
        let mut disk = LoopDisk { image, mount_point, fs, mounted: false, _backing: backing, _scratch: scratch };
        disk.mount();
        disk
    }

    /// The size images are made with.
    pub fn image_bytes() -> u64 {
        IMAGE_BYTES
    }

    pub fn path(&self) -> &Path {
        &self.mount_point
    }

    pub fn fs(&self) -> Fs {
        self.fs
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
    /// `xfs_io` shuts ext4 down too (the same ioctl).
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

    /// Where `file` (on this filesystem) lies in the image, as byte ranges,
    /// from FIEMAP (`xfs_io -c fiemap`). Holes and unwritten extents are
    /// left out.
    pub fn extents(&self, file: &Path) -> Vec<Range<u64>> {
        let out = run("xfs_io", &["-r", "-c", "fiemap", file.to_str().unwrap()]);
        out.lines()
            .filter_map(|line| {
                // "0: [0..127]: 2048..2175" in 512-byte sectors
                let physical = line.rsplit(':').next()?.trim();
                let (start, end) = physical.split_once("..")?;
                let (start, end): (u64, u64) = (start.parse().ok()?, end.parse().ok()?);
                Some(start * 512..(end + 1) * 512)
            })
            .collect()
    }

    /// Where every file under `dir` (on this filesystem) lies in the image.
    pub fn extents_under(&self, dir: &Path) -> Vec<Range<u64>> {
        let mut ranges = Vec::new();
        let mut dirs = vec![dir.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    ranges.extend(self.extents(&path));
                }
            }
        }
        ranges
    }
}

impl Drop for LoopDisk {
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

    /// Grows (or shrinks) the filesystem in place: space returns.
    pub fn resize(&self, bytes: u64) {
        run("mount", &["-o", &format!("remount,size={bytes}"), self.mount_point.to_str().unwrap()]);
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount_point).status();
    }
}

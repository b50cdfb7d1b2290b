//! The shipped systemd unit: `systemd-analyze verify` is clean, the
//! exposure score of `systemd-analyze security` is under 4.0 (OK), and it
//! has what the daemon relies on (notify, reload by SIGHUP, watchdog,
//! start timeout, its disks mounted first).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

/// The unit with its `ExecStart` pointing at the binary under test (verify
/// checks that the program exists), in a scratch directory.
fn unit_under_test() -> (tempfile::TempDir, std::path::PathBuf) {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/datanode.service")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("datanode.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/datanode", env!("CARGO_BIN_EXE_datanode"))).unwrap();
    (dir, path)
}

fn systemd_analyze() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|d| d.join("systemd-analyze")).find(|p| p.is_file()));
    if found.is_none() {
        assert!(
            std::env::var("DATANODE_REQUIRE_KERNEL_TESTS").as_deref() != Ok("1"),
            "systemd-analyze is required (scripts/test.sh installs systemd)"
        );
        eprintln!("SKIPPED: systemd-analyze is not installed (apt-get install systemd)");
    }
    found
}

#[test]
fn the_unit_has_what_the_daemon_relies_on() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/datanode.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=",
        "TimeoutStartSec=",
        "RequiresMountsFor=/var/lib/datanode",
        "RestartPreventExitStatus=78",
    ] {
        assert!(unit.lines().any(|l| l.starts_with(line)), "the unit lacks {line}");
    }
}

#[test]
fn systemd_analyze_verify_is_clean_and_security_scores_under_4() {
    let Some(analyze) = systemd_analyze() else { return };
    let (_dir, unit) = unit_under_test();
    let verify = Command::new(&analyze).arg("verify").arg(&unit).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&verify.stdout), String::from_utf8_lossy(&verify.stderr));
    assert!(verify.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    let security = Command::new(&analyze).args(["security", "--offline=true"]).arg(&unit).output().unwrap();
    let text = String::from_utf8_lossy(&security.stdout).into_owned();
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for datanode.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in: {text}{}", String::from_utf8_lossy(&security.stderr)));
    assert!(score < 4.0, "exposure {score}, not under 4.0:\n{text}");
}

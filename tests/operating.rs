//! What an operator meets on the way in, on the real binary: flags in
//! either position, configuration messages that name the file, key,
//! value or variable, `check-config` refusing what `serve` refuses, and
//! start-up failures that exit 78 with one message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Command, Output};

fn datanode(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_datanode"))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn flags_work_before_and_after_the_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[limits]\nmax_blob_size = \"1MiB\"\n").unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[wal]\ndurability = \"sometimes\"\n").unwrap();
    let (good, bad) = (good.to_str().unwrap(), bad.to_str().unwrap());
    for args in [["--config", bad, "check-config"], ["check-config", "--config", bad]] {
        let output = datanode(&args, &[]);
        assert_eq!(output.status.code(), Some(78), "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains("wal.durability"), "{args:?}: {}", stderr(&output));
    }
    for args in [
        ["--config", good, "--http-addr", "127.0.0.1:7507", "check-config"],
        ["check-config", "--config", good, "--http-addr", "127.0.0.1:7507"],
        ["--config", good, "check-config", "--http-addr", "127.0.0.1:7507"],
    ] {
        let output = datanode(&args, &[]);
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
        assert!(text.contains("max_blob_size = \"1MiB\"") && text.contains("127.0.0.1:7507"), "{args:?}: {text}");
    }
}

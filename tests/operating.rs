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

#[test]
fn configuration_messages_name_the_file_key_value_or_variable() {
    let check = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = vec!["check-config"];
        all.extend_from_slice(args);
        datanode(&all, env)
    };
    // Sizes: KB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024.
    for (value, shown) in [("1MB", "1000000"), ("1MiB", "1MiB"), ("100 KB", "100000"), ("2GiB", "2GiB")] {
        let output = check(&[], &[("DATANODE_WAL__SEGMENT_SIZE", value)]);
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains(&format!("segment_size = \"{shown}\"")), "{value}: {}{text}", stderr(&output));
    }
    let output = check(&[], &[("DATANODE_LIMITS__MAX_BLOB_SIZE", "16m")]);
    assert_eq!(output.status.code(), Some(78), "an ambiguous unit is refused");
    assert!(stderr(&output).contains("limits.max_blob_size") && stderr(&output).contains("KiB"), "{}", stderr(&output));

    // A host name is resolved; one that does not resolve names key and value.
    let output = check(&["--http-addr", "localhost:7502"], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("http_addr = \"127.0.0.1:7502\""));
    let output = check(&["--http-addr", "no-such-host.invalid:7502"], &[]);
    assert_eq!(output.status.code(), Some(78));
    assert!(stderr(&output).contains("node.http_addr = \"no-such-host.invalid:7502\""), "{}", stderr(&output));

    // An unknown key names the file, the line and the key.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.toml");
    std::fs::write(&file, "[node]\nshutdown_timeout = \"5s\"\nshutdown_timout = \"5s\"\n").unwrap();
    let output = check(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(78));
    let said = stderr(&output);
    assert!(said.contains(&format!("{}:3", file.display())) && said.contains("node.shutdown_timout"), "{said}");

    // An environment variable that configures nothing is named, with the
    // one it probably meant; variables of the test harness are left alone.
    let output = check(&[], &[("DATANODE_WAL_SEGMENT_SIZE", "8MiB")]);
    assert_eq!(output.status.code(), Some(78));
    assert!(stderr(&output).contains("DATANODE_WAL_SEGMENT_SIZE"), "{}", stderr(&output));
    assert!(stderr(&output).contains("DATANODE_WAL__SEGMENT_SIZE"), "{}", stderr(&output));
    let output = check(&[], &[("DATANODE_NODE__NO_SUCH_KEY", "1")]);
    assert_eq!(output.status.code(), Some(78));
    assert!(stderr(&output).contains("DATANODE_NODE__NO_SUCH_KEY"), "{}", stderr(&output));
    assert!(check(&[], &[("DATANODE_REQUIRE_KERNEL_TESTS", "1")]).status.success());
}

#[test]
fn check_config_refuses_what_serve_refuses_with_exit_78_and_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let empty_token = dir.path().join("empty.token");
    std::fs::write(&empty_token, "\n").unwrap();
    let port = support::free_port().to_string();
    let addr = format!("127.0.0.1:{port}");
    let cases: Vec<(String, String)> = vec![
        (
            format!("[node]\nadmin_token_file = \"{}\"\n", dir.path().join("missing.token").display()),
            "missing.token".into(),
        ),
        (format!("[node]\nadmin_token_file = \"{}\"\n", empty_token.display()), "is empty".into()),
        (format!("[[disk]]\nname = \"d0\"\npath = \"{}\"\n", file.display()), "is not a directory".into()),
        (
            format!("[[disk]]\nname = \"d0\"\npath = \"{}\"\n", dir.path().join("no/such/dir").display()),
            "does not exist".into(),
        ),
    ];
    for (toml, expected) in cases {
        let config = dir.path().join("case.toml");
        std::fs::write(&config, &toml).unwrap();
        let config = config.to_str().unwrap();
        for command in ["check-config", "serve"] {
            let output = datanode(&[command, "--config", config, "--http-addr", &addr], &[]);
            let said = stderr(&output);
            assert_eq!(output.status.code(), Some(78), "{command} with {toml}: {said}");
            assert!(said.contains(&expected), "{command} with {toml}: {said}");
            assert_eq!(said.trim().lines().count(), 1, "{command}: one message: {said}");
        }
    }
    assert!(!dir.path().join("no").exists(), "nothing was created for a disk that cannot be");
    // A token file that others can read works, with a warning.
    let token = dir.path().join("open.token");
    std::fs::write(&token, "s3cret\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let config = dir.path().join("open.toml");
    std::fs::write(&config, format!("[node]\nadmin_token_file = \"{}\"\n", token.display())).unwrap();
    let output = datanode(&["check-config", "--config", config.to_str().unwrap()], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("readable by other users"), "{}", stderr(&output));
}

#[test]
fn a_port_in_use_is_found_before_anything_is_created_and_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("d0");
    let output = datanode(&["serve", "--data-dir", dir.to_str().unwrap(), "--http-addr", &addr], &[]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains(&addr), "names the address: {}", stderr(&output));
    assert!(!dir.join("partitions").exists(), "nothing bootstrapped");
}

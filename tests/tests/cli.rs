//! The `xlb` command line on bad input: every mistake gets a clear message naming what is
//! wrong and a non-zero exit, never a panic. `xlb check` needs no root; the `xlb run` cases
//! fail before anything is loaded.

use std::process::Output;

use xlb_tests::{demo_config::CONFIG_TOML, xlb::xlb_command};

fn xlb(args: &[&str]) -> Output {
    xlb_command(args).expect("running xlb")
}

fn config_file(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("xlb-cli-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).expect("writing a temp config");
    path
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_accepts_the_demo_config() {
    let path = config_file("good", CONFIG_TOML);
    let out = xlb(&["check", "--config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("is valid: 2 service(s), 6 backend(s)"),
        "{stdout}"
    );
    // 32,768 flows: 65,536 entries of 160 bytes and as many 16-byte buckets, 11.0 MiB, and
    // the buckets of a 65,536-entry and a 32,768-entry hash map sized with the table, 1.5
    // MiB; 64 services' two Maglev tables of 65,537 4-byte slots, in 8,193 pages, 32.0 MiB.
    assert!(
        stdout.contains(
            "kernel memory when xlb starts: conntrack for 32768 flows 12.5 MiB, Maglev tables \
             32.0 MiB, the others "
        ),
        "{stdout}"
    );
    // The others: per possible CPU at least the next-hop cache's 4,096 slots of 64 bytes
    // and 4,096 backends' counters of 40, 0.41 MiB, and under 8 KiB more (the services'
    // counters, the scratch slots); and under 1 MiB that does not grow with the CPUs.
    let cpus = aya::util::nr_cpus().expect("the possible CPUs") as f64;
    let (others, on) = stdout
        .split_once("the others ")
        .and_then(|(_, rest)| rest.trim_end().split_once(" MiB on this host's "))
        .expect("the other maps' figure");
    let others: f64 = others.parse().expect("a figure in MiB");
    let mib = |bytes: f64| bytes / f64::from(1 << 20);
    let (least, most) = (
        mib(4096.0 * (64.0 + 40.0)) * cpus,
        mib(4096.0 * (64.0 + 40.0) + 8192.0) * cpus + 1.0,
    );
    assert!(
        on == format!("{cpus} possible CPUs") && (least..most).contains(&others),
        "{stdout}"
    );
}

#[test]
fn check_lists_every_problem_with_its_field() {
    let bad = CONFIG_TOML
        .replacen("vip = \"10.10.0.100:80\"", "vip = \"10.10.0.100\"", 1)
        .replacen("snat = \"10.20.0.1\"", "snat = \"10.20.0.300\"", 1)
        .replacen(
            "address = \"10.20.1.2:8080\"",
            "address = \"10.20.1.2:0\"",
            1,
        );
    let path = config_file("bad", &bad);
    let out = xlb(&["check", "--config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    for field in [
        "service[0].vip:",
        "service[0].snat:",
        "service[0].backend[0].address:",
    ] {
        assert!(err.contains(field), "no {field:?} in:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn syntax_errors_and_unknown_keys_name_the_place() {
    let path = config_file("syntax", "[dataplane]\ninterfaces = [\"a\"\n");
    let out = xlb(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("line 2"), "{}", stderr(&out));

    let path2 = config_file("unknown", "[dataplane]\ninterfacez = [\"a\"]\n");
    let out = xlb(&["check", "--config", path2.to_str().unwrap()]);
    for p in [path, path2] {
        let _ = std::fs::remove_file(p);
    }
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("interfacez"), "{}", stderr(&out));
}

#[test]
fn a_missing_file_and_bad_arguments_are_clear_errors() {
    let out = xlb(&["check", "--config", "/nonexistent/xlb.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/nonexistent/xlb.toml"),
        "{}",
        stderr(&out)
    );

    let out = xlb(&["run"]);
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
    assert!(stderr(&out).contains("--config"), "{}", stderr(&out));

    let out = xlb(&["run", "--config", "x.toml", "--xdp-mode", "turbo"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("turbo"), "{}", stderr(&out));

    // Once a panic in tokio's interval.
    let out = xlb(&["run", "--config", "x.toml", "--stats-interval", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--stats-interval"),
        "{}",
        stderr(&out)
    );
}

/// A config of the skeleton's days: the keys that moved to `[conntrack]` are refused with
/// their new names.
#[test]
fn moved_conntrack_keys_name_their_new_place() {
    let old = CONFIG_TOML.replace(
        "[conntrack]\nentries = 32768",
        "conntrack_entries = 65536\ntcp_idle_timeout = 100",
    );
    assert_ne!(
        old, CONFIG_TOML,
        "the demo config changed: update this test"
    );
    let path = config_file("moved", &old);
    let out = xlb(&["check", "--config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("dataplane.conntrack_entries: this setting moved: use [conntrack] entries"),
        "{err}"
    );
    assert!(
        err.contains("dataplane.tcp_idle_timeout: this setting moved: use [conntrack] tcp_established_timeout"),
        "{err}"
    );
}

#[test]
fn run_on_a_missing_interface_fails_before_loading_anything() {
    // Its own socket and pins, and no metrics port: should the check ever come too late,
    // this xlb (in the root namespace) still touches nothing a real one uses.
    let path = config_file(
        "noiface",
        &format!("{CONFIG_TOML}\n[api]\nmetrics = \"\"\n"),
    );
    let socket = xlb_tests::xlb::test_path(&std::env::temp_dir(), "noiface.sock");
    let pins = xlb_tests::xlb::test_pin_path("noiface");
    let out = xlb(&[
        "run",
        "--config",
        path.to_str().unwrap(),
        "--iface",
        "xlb-nosuch0",
        "--socket",
        socket.to_str().unwrap(),
        "--pin-path",
        pins.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&socket);
    let pinned = pins.exists();
    let _ = std::fs::remove_dir_all(&pins);
    assert!(
        !pinned,
        "a run that failed its checks pinned {}",
        pins.display()
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("interface \"xlb-nosuch0\" does not exist"),
        "{}",
        stderr(&out)
    );
}

//! Rings 1-2 run what the agent builds: files in the workspace and in `--rw` paths may be
//! executed (scripts, a venv's tools, compiled binaries), while a binary written anywhere
//! else (the private /tmp) or found in a read-only extra path may not. A profile with
//! `exec.workspace: false` keeps exec to the system paths, and ring 3 runs only its entry
//! command. (That every such exec still passes the policy's exec plane is in
//! tests/enforce_policy.rs.)
#![allow(clippy::unwrap_used)]

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use agt_jail_test_support::{assert_one_line_error, require, Need};

const BIN: &str = env!("CARGO_BIN_EXE_agt-jail");
/// The marker the compiled helper prints when it runs inside the jail.
const BUILT_MARKER: &str = "built binary ran";

/// A workspace with what an agent would have built in it, a writable and a read-only
/// extra path with a tool each, removed on drop.
struct Fixture {
    root: PathBuf,
}

fn executable(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let root = PathBuf::from(format!("/tmp/agt-jail-wsexec-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let fx = Fixture { root };
        let ws = fx.workspace();
        executable(&ws.join("run.sh"), "#!/bin/sh\necho script ran\n");
        // A virtualenv-style tool: a script in the project's .venv/bin run through env.
        executable(&ws.join(".venv/bin/tool"), "#!/usr/bin/env python3\nprint('venv tool ran')\n");
        // A compiled test binary in the project's build directory: this test's own binary
        // (present wherever the test runs), run as its helper below.
        fs::create_dir_all(ws.join("target")).unwrap();
        fs::copy(std::env::current_exe().unwrap(), ws.join("target/selftest")).unwrap();
        fs::write(ws.join("hello.c"), "#include <stdio.h>\nint main(void) { puts(\"compiled ran\"); return 0; }\n")
            .unwrap();
        executable(&fx.rw().join("tool.sh"), "#!/bin/sh\necho rw tool ran\n");
        executable(&fx.ro().join("tool.sh"), "#!/bin/sh\necho ro tool ran\n");
        fx
    }

    fn workspace(&self) -> PathBuf {
        self.root.join("ws")
    }

    fn rw(&self) -> PathBuf {
        self.root.join("rw")
    }

    fn ro(&self) -> PathBuf {
        self.root.join("ro")
    }

    /// `agt-jail exec FLAGS --workspace WS --rw RW --ro RO -- /bin/sh -c SCRIPT`.
    fn run(&self, flags: &[&str], script: &str) -> Output {
        Command::new(BIN)
            .arg("exec")
            .args(flags)
            .arg("--workspace")
            .arg(self.workspace())
            .arg("--rw")
            .arg(self.rw())
            .arg("--ro")
            .arg(self.ro())
            .args(["--", "/bin/sh", "-c", script])
            .current_dir(self.workspace())
            .output()
            .unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Not a test of its own: the compiled binary the workspace tests run inside the jail.
#[test]
#[ignore = "helper: run inside the jail by ring_2_runs_what_the_agent_builds_and_nothing_written_elsewhere"]
fn helper_built_binary() {
    println!("{BUILT_MARKER}");
}

/// The script's `NAME: STATUS` lines.
fn statuses(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout).lines().filter(|l| l.contains(": ")).map(str::to_string).collect()
}

fn assert_status(output: &Output, name: &str, status: u8) {
    let line = format!("{name}: {status}");
    assert!(
        statuses(output).contains(&line),
        "expected {line:?}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs each of the agent's builds and tools, printing `name: status` for each.
fn attempts(fx: &Fixture) -> String {
    let (rw, ro) = (fx.rw().join("tool.sh"), fx.ro().join("tool.sh"));
    format!(
        "./run.sh; echo \"script: $?\"
         .venv/bin/tool; echo \"venv: $?\"
         ./target/selftest --exact helper_built_binary --ignored --nocapture; echo \"selftest: $?\"
         {rw}; echo \"rw: $?\"
         {ro}; echo \"ro: $?\"
         cp ./run.sh /tmp/copied.sh && /tmp/copied.sh; echo \"tmp: $?\"
         /bin/true; echo \"system: $?\"",
        rw = rw.display(),
        ro = ro.display()
    )
}

#[test]
fn ring_2_runs_what_the_agent_builds_and_nothing_written_elsewhere() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let fx = Fixture::new("r2");
    for ring in ["1", "2"] {
        let output = fx.run(&["--ring", ring], &attempts(&fx));
        assert_eq!(output.status.code(), Some(0), "ring {ring}: {output:?}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        for (name, marker) in [
            ("script", "script ran"),
            ("venv", "venv tool ran"),
            ("selftest", BUILT_MARKER),
            ("rw", "rw tool ran"),
            ("system", ""),
        ] {
            assert_status(&output, name, 0);
            assert!(stdout.contains(marker), "ring {ring}: {name} printed nothing: {stdout}");
        }
        // A read-only extra path is not the agent's to build in; the private /tmp is
        // writable but write-then-exec outside the workspace stays refused.
        assert_status(&output, "ro", 126);
        assert_status(&output, "tmp", 126);
        assert!(!stdout.contains("ro tool ran"), "ring {ring}: {stdout}");
    }
}

#[test]
fn ring_2_builds_with_cc_and_a_virtualenv_and_runs_the_results() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let fx = Fixture::new("build");
    let ws = fx.workspace();
    // A real virtualenv made inside the jail (no pip: nothing is downloaded), and a script
    // whose #! names the venv's interpreter, as pip writes them.
    executable(
        &ws.join("hello.py"),
        &format!("#!{}/.venv2/bin/python\nimport sys\nprint('venv', sys.prefix)\n", ws.display()),
    );
    let mut script = String::from(
        "/usr/bin/python3 -m venv --without-pip .venv2; echo \"mkvenv: $?\"
         .venv2/bin/python -c 'print(1)'; echo \"venv-python: $?\"
         ./hello.py; echo \"venv-script: $?\"",
    );
    // The compiler itself is a host program the test VM's minimal userspace does not have;
    // where it is installed, the agent compiles and runs its own program.
    let cc = Path::new("/usr/bin/cc").exists();
    if cc {
        script.push_str("\n cc -o hello hello.c; echo \"cc: $?\"; ./hello; echo \"compiled: $?\"");
    } else {
        eprintln!("no /usr/bin/cc on this host: the compile step is not run (the compiled test binary case still is)");
    }
    let output = fx.run(&["--ring", "2"], &script);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    for name in ["mkvenv", "venv-python", "venv-script"] {
        assert_status(&output, name, 0);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(&format!("venv {}/.venv2", ws.display())), "{stdout}");
    if cc {
        assert_status(&output, "cc", 0);
        assert_status(&output, "compiled", 0);
        assert!(stdout.contains("compiled ran"), "{stdout}");
    }
}

#[test]
fn a_profile_can_turn_workspace_exec_off() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let fx = Fixture::new("off");
    let ring2 = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../profiles/ring2.yaml")).unwrap();
    assert!(ring2.contains("\n  workspace: true\n"), "ring 2's profile no longer says workspace: true");
    let profile = fx.root.join("no-workspace-exec.yaml");
    fs::write(&profile, ring2.replace("\n  workspace: true\n", "\n  workspace: false\n")).unwrap();
    let output = fx.run(&["--profile", profile.to_str().unwrap()], &attempts(&fx));
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    for name in ["script", "venv", "selftest", "rw", "ro", "tmp"] {
        assert_status(&output, name, 126);
    }
    assert_status(&output, "system", 0);
    assert!(!String::from_utf8_lossy(&output.stdout).contains("ran"), "{output:?}");
}

#[test]
fn ring_3_runs_only_its_entry_command() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock, Need::Ring3);
    let fx = Fixture::new("r3");
    let ws = fx.workspace();
    // The entry command (python) tries the workspace, shown read-only beside the scratch
    // /workspace, and a script it writes into the scratch /workspace itself.
    let script = format!(
        "import os, subprocess\n\
         with open('/workspace/s.sh', 'w') as f:\n    f.write('#!/bin/sh\\necho scratch ran\\n')\n\
         os.chmod('/workspace/s.sh', 0o755)\n\
         for name, path in [('workspace', '{ws}/run.sh'), ('selftest', '{ws}/target/selftest'), ('scratch', '/workspace/s.sh')]:\n\
         \x20   try:\n\
         \x20       subprocess.run([path], check=False)\n\
         \x20       print(name + ': ran')\n\
         \x20   except PermissionError:\n\
         \x20       print(name + ': 126')\n",
        ws = ws.display()
    );
    let output = Command::new(BIN)
        .args(["exec", "--ring", "3", "--workspace"])
        .arg(&ws)
        .args(["--", "/usr/bin/python3", "-c", &script])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    for name in ["workspace", "selftest", "scratch"] {
        assert_status(&output, name, 126);
    }
    assert!(!String::from_utf8_lossy(&output.stdout).contains("ran"), "{output:?}");
    // Nor can a profile give it workspace exec.
    let profile = fx.root.join("ring3-exec.yaml");
    fs::write(&profile, "ring: 3\nexec:\n  workspace: true\n").unwrap();
    let output =
        Command::new(BIN).args(["exec", "--profile", profile.to_str().unwrap(), "--", "/bin/true"]).output().unwrap();
    assert_one_line_error(&output, 125, ":3:14: ring 3 runs only its entry command");
}

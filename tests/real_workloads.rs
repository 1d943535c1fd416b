//! Real developer workloads run inside the jail exactly as outside it: each case runs the
//! same command twice in a fresh copy of the same workspace, at the same path and with the
//! same environment, once directly and once under `agt-jail exec --ring 2`, and compares
//! exit status and output (beside checking that the output is what the workload should
//! print, so two identical failures cannot pass).
//!
//! Ring 2 (the default for agents) is enough for every case here. A case whose program this machine lacks (the test
//! VM has no compiler, make, git, tmux, pip or Rust toolchain) is a counted skip with the
//! reason (`program_missing`).
#![allow(clippy::unwrap_used)]

use std::{
    ffi::OsString,
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use agt_jail_test_support::{current_test_name, program_missing, require, Need, RemoteHost, TestResolver};

const BIN: &str = env!("CARGO_BIN_EXE_agt-jail");
/// The search path the jail gives a command; the outside run gets the same.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Every case's ring: the default ring for agents.
const RING: &str = "2";

/// A directory under /tmp holding the workspace (`ws`) and whatever a case keeps beside
/// it (a wheel directory, a git config), removed on drop.
struct Fixture {
    root: PathBuf,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let root = PathBuf::from(format!("/tmp/agt-jail-workload-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("ws")).unwrap();
        Fixture { root }
    }

    fn workspace(&self) -> PathBuf {
        self.root.join("ws")
    }

    /// Writes `text` to `rel` under the workspace.
    fn write(&self, rel: &str, text: &str) {
        let path = self.workspace().join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    /// Empties the workspace, so the second run starts where the first did.
    fn reset(&self) {
        fs::remove_dir_all(self.workspace()).unwrap();
        fs::create_dir_all(self.workspace()).unwrap();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// One workload: the command, the environment both runs get (on top of PATH, HOME (the
/// workspace), TERM and LANG, which is what the jail gives), the extra jail flags a user
/// would pass for it, and what writes its workspace.
struct Case<'a> {
    name: &'a str,
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    jail_flags: Vec<OsString>,
    prepare: &'a dyn Fn(&Fixture),
}

impl Case<'_> {
    fn new<'a>(name: &'a str, prepare: &'a dyn Fn(&Fixture), cmd: &[&str]) -> Case<'a> {
        Case {
            name,
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            jail_flags: Vec::new(),
            prepare,
        }
    }

    /// The environment of both runs, the case's entries replacing the base ones.
    fn environment(&self, fx: &Fixture) -> Vec<(String, String)> {
        let ws = fx.workspace().display().to_string();
        let mut env: Vec<(String, String)> =
            [("PATH", PATH), ("HOME", ws.as_str()), ("TERM", "dumb"), ("LANG", "C.UTF-8")]
                .iter()
                .filter(|(key, _)| !self.env.iter().any(|(k, _)| k == key))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        env.extend(self.env.iter().cloned());
        env
    }

    /// `cmd` outside the jail, with the same environment and working directory.
    fn outside(&self, fx: &Fixture) -> Command {
        let mut cmd = Command::new(&self.cmd[0]);
        cmd.args(&self.cmd[1..]).env_clear().envs(self.environment(fx)).current_dir(fx.workspace());
        cmd
    }

    /// `agt-jail exec --ring 2 --workspace WS FLAGS --env ... -- cmd`.
    fn inside(&self, fx: &Fixture) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["exec", "--ring", RING, "--workspace"]).arg(fx.workspace()).args(&self.jail_flags);
        for (key, value) in self.environment(fx) {
            cmd.arg("--env").arg(format!("{key}={value}"));
        }
        cmd.arg("--").args(&self.cmd).current_dir(fx.workspace()).stdin(Stdio::null());
        cmd
    }

    /// Runs the case outside, then inside (each in a freshly prepared workspace), prints
    /// how long each took and returns both outputs after checking they are the same.
    fn run_both(&self, fx: &Fixture) -> Output {
        let outside = timed(self.name, "outside", fx, self.prepare, &mut self.outside(fx));
        let inside = timed(self.name, "inside", fx, self.prepare, &mut self.inside(fx));
        assert_same(self.name, &outside, &inside);
        outside
    }
}

/// Prepares a fresh workspace and runs `cmd` in it, printing the wall time of the run.
fn timed(name: &str, side: &str, fx: &Fixture, prepare: &dyn Fn(&Fixture), cmd: &mut Command) -> Output {
    fx.reset();
    prepare(fx);
    let start = Instant::now();
    let output = cmd.stdin(Stdio::null()).output().unwrap();
    eprintln!("TIME {name} {side}: {:.2} s", start.elapsed().as_secs_f64());
    output
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Exit status and stdout must be the same inside and outside; on a difference, both
/// sides are printed whole.
fn assert_same(name: &str, outside: &Output, inside: &Output) {
    assert!(
        outside.status.code() == inside.status.code() && outside.stdout == inside.stdout,
        "{name}: the jail changed the result\n--- outside ({}):\n{}\n--- stderr:\n{}\n--- inside ({}):\n{}\n--- stderr:\n{}",
        outside.status,
        text(&outside.stdout),
        text(&outside.stderr),
        inside.status,
        text(&inside.stdout),
        text(&inside.stderr)
    );
}

/// Asserts what the workload itself must print (checked on the outside run; the inside
/// run equals it).
fn assert_prints(name: &str, output: &Output, lines: &[&str]) {
    let stdout = text(&output.stdout);
    for line in lines {
        assert!(
            stdout.lines().any(|l| l == *line),
            "{name}: no line {line:?} in\n{stdout}\nstderr:\n{}",
            text(&output.stderr)
        );
    }
}

/// The program `name` on the jail's PATH, or a counted skip naming it.
fn program(name: &str) -> Option<PathBuf> {
    let found = PATH.split(':').map(|dir| Path::new(dir).join(name)).find(|path| path.exists());
    if found.is_none() {
        program_missing(&current_test_name(name), &format!("no `{name}` on {PATH}: the workload cannot run here"));
    }
    found
}

/// Every named program, each missing one a counted skip.
fn programs(names: &[&str]) -> bool {
    names.iter().all(|name| program(name).is_some())
}

const PY_PACKAGE: &str = "[build-system]
requires = [\"setuptools\"]
build-backend = \"setuptools.build_meta\"

[project]
name = \"greet\"
version = \"1.2.0\"

[project.scripts]
greet = \"greet:main\"
";

const PY_MODULE: &str = "import sys

def hello(name):
    return 'hello ' + name

def main():
    print(hello(sys.argv[1] if len(sys.argv) > 1 else 'world'))
";

const PY_TESTS: &str = "import unittest

import greet

class GreetTest(unittest.TestCase):
    def test_hello(self):
        self.assertEqual(greet.hello('jail'), 'hello jail')

    def test_installed_in_the_venv(self):
        import sys
        self.assertTrue(greet.__file__.startswith(sys.prefix), greet.__file__)
";

/// A package the test writes, built into a wheel outside the jail (no index, no build
/// isolation: nothing is downloaded), then inside the workspace: a venv with pip, the wheel
/// installed from the local wheel directory, its console script run, the project's tests
/// run with the venv's interpreter. (pytest is not on this host, nor installable without
/// an index, so the tests run with `python -m unittest`.)
#[test]
fn python_venv_installs_a_local_wheel_and_runs_the_tests() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    if !programs(&["python3"]) {
        return;
    }
    let probe = Command::new("/usr/bin/python3").args(["-c", "import importlib.util as u, sys; sys.exit(any(not u.find_spec(m) for m in ('ensurepip', 'pip', 'setuptools', 'wheel')))"]).output().unwrap();
    if !probe.status.success() {
        let reason =
            format!("/usr/bin/python3 lacks ensurepip, pip, setuptools or wheel {}", text(&probe.stderr).trim());
        program_missing(&current_test_name("python_venv"), &reason);
        return;
    }
    let fx = Fixture::new("venv");
    let source = fx.root.join("src/greet");
    fs::create_dir_all(source.join("greet")).unwrap();
    fs::write(source.join("pyproject.toml"), PY_PACKAGE).unwrap();
    fs::write(source.join("greet/__init__.py"), PY_MODULE).unwrap();
    let wheels = fx.root.join("wheels");
    let build = Command::new("/usr/bin/python3")
        .args(["-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"])
        .args(["--disable-pip-version-check", "--wheel-dir"])
        .arg(&wheels)
        .arg(&source)
        .env("HOME", &fx.root)
        .output()
        .unwrap();
    assert!(build.status.success(), "building the wheel: {build:?}");
    let script = format!(
        "python3 -m venv .venv; echo \"venv: $?\"
         .venv/bin/pip install --quiet --disable-pip-version-check --no-index --find-links {wheels} greet; echo \"install: $?\"
         .venv/bin/pip list --disable-pip-version-check --format=freeze | grep -i '^greet=='
         .venv/bin/greet agents; echo \"script: $?\"
         .venv/bin/python -m unittest -v 2>unittest.log; echo \"unittest: $?\"
         grep -E ' \\.\\.\\. (ok|FAIL|ERROR)$' unittest.log
         python3 -c 'import greet' 2>/dev/null; echo \"system python sees it: $?\"",
        wheels = wheels.display()
    );
    let prepare = |fx: &Fixture| fx.write("test_greet.py", PY_TESTS);
    let mut case = Case::new("python venv", &prepare, &["/bin/sh", "-c", &script]);
    case.jail_flags = vec!["--ro".into(), wheels.into()];
    let output = case.run_both(&fx);
    assert_prints(
        case.name,
        &output,
        &[
            "venv: 0",
            "install: 0",
            "greet==1.2.0",
            "hello agents",
            "script: 0",
            "unittest: 0",
            "test_hello (test_greet.GreetTest.test_hello) ... ok",
            "test_installed_in_the_venv (test_greet.GreetTest.test_installed_in_the_venv) ... ok",
            "system python sees it: 1",
        ],
    );
}

/// The user's git configuration, kept outside the workspace as in a real home directory.
const GITCONFIG: &str = "[init]\n\tdefaultBranch = trunk\n[alias]\n\tone = log --format=%H%x20%an%x20<%ae>%x20%s\n";

/// git init, commits, a bare clone, a clone of that, a commit pushed back: the commit
/// hashes (dates fixed, identity from the environment) must be the same inside and out.
/// Ring 2 hides /root and the jail sets HOME to the workspace, so a user's ~/.gitconfig
/// is not seen: a user shows it read-only and names it (`--ro ~/.gitconfig --env
/// GIT_CONFIG_GLOBAL=~/.gitconfig`), and gives the identity as git's environment variables.
#[test]
fn git_init_commit_clone_and_push_in_the_workspace() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    if !programs(&["git"]) {
        return;
    }
    let fx = Fixture::new("git");
    let gitconfig = fx.root.join("home/.gitconfig");
    fs::create_dir_all(gitconfig.parent().unwrap()).unwrap();
    fs::write(&gitconfig, GITCONFIG).unwrap();
    let script = "set -e
        git init -q project && cd project
        echo 'fn main() {}' > main.rs && git add main.rs && git commit -q -m first
        echo '// more' >> main.rs && git commit -q -am second
        git branch --show-current && git one && git status --porcelain && git fsck --no-progress
        cd .. && git clone -q --bare project shared.git && git clone -q shared.git work && cd work
        echo notes > NOTES && git add NOTES && git commit -q -m third && git push -q origin trunk
        git -C ../shared.git one trunk && git -C ../shared.git count-objects | cut -d' ' -f1";
    let prepare = |_: &Fixture| {};
    let mut case = Case::new("git", &prepare, &["/bin/sh", "-c", script]);
    case.jail_flags = vec!["--ro".into(), gitconfig.clone().into()];
    case.env = [
        ("GIT_CONFIG_GLOBAL", gitconfig.to_str().unwrap()),
        ("GIT_AUTHOR_NAME", "Jail User"),
        ("GIT_AUTHOR_EMAIL", "agent@example.com"),
        ("GIT_COMMITTER_NAME", "Jail User"),
        ("GIT_COMMITTER_EMAIL", "agent@example.com"),
        ("GIT_AUTHOR_DATE", "2026-01-02T03:04:05Z"),
        ("GIT_COMMITTER_DATE", "2026-01-02T03:04:05Z"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let output = case.run_both(&fx);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let stdout = text(&output.stdout);
    assert_eq!(stdout.lines().next(), Some("trunk"), "the user's init.defaultBranch was not read: {stdout}");
    // Two commits in the project, three in the shared repository after the push.
    assert_eq!(stdout.lines().filter(|l| l.ends_with("<agent@example.com> first")).count(), 2, "{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.ends_with("<agent@example.com> third")).count(), 1, "{stdout}");
}

const MAKEFILE: &str = "CFLAGS = -O2 -Wall
hello: hello.o fact.o
\t$(CC) $(CFLAGS) -o $@ $^
check: hello
\t./hello 5
";

const HELLO_C: &str = "#include <stdio.h>
#include <stdlib.h>
int fact(int);
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 3;
    printf(\"fact(%d) = %d\\n\", n, fact(n));
    return n;
}
";

/// `make` compiles two files with `cc`, links them and runs the program, whose exit
/// status (5) makes make fail (2): the same program bytes and the same statuses inside.
#[test]
fn make_and_cc_build_and_run_a_program() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    if !programs(&["make", "cc"]) {
        return;
    }
    let fx = Fixture::new("make");
    let prepare = |fx: &Fixture| {
        fx.write("Makefile", MAKEFILE);
        fx.write("hello.c", HELLO_C);
        fx.write("fact.c", "int fact(int n) { return n <= 1 ? 1 : n * fact(n - 1); }\n");
    };
    let script = "make check; echo \"make: $?\"; cksum hello | cut -d' ' -f1,2; ./hello 3; echo \"hello: $?\"";
    let case = Case::new("make + cc", &prepare, &["/bin/sh", "-c", script]);
    let output = case.run_both(&fx);
    assert_prints(
        case.name,
        &output,
        &["cc -O2 -Wall -o hello hello.o fact.o", "./hello 5", "fact(5) = 120", "make: 2", "fact(3) = 6", "hello: 3"],
    );
}

/// Where a Rust toolchain lives and what a user passes to reach it from ring 2.
struct Toolchain {
    /// Jail flags: the toolchain read-only and executable.
    flags: Vec<OsString>,
    env: Vec<(String, String)>,
}

/// A rustup toolchain under CARGO_HOME/RUSTUP_HOME (by default in ~, which ring 2 hides)
/// needs both shown read-only (`--ro`), allowed to run (`--allow-exec`: a `--ro` path is
/// not executable) and named in the environment. A system cargo in /usr needs nothing.
fn toolchain() -> Option<Toolchain> {
    let home = PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()));
    let dir = |var: &str, default: &str| std::env::var_os(var).map_or_else(|| home.join(default), PathBuf::from);
    let (cargo_home, rustup_home) = (dir("CARGO_HOME", ".cargo"), dir("RUSTUP_HOME", ".rustup"));
    if cargo_home.join("bin/cargo").exists() && rustup_home.join("toolchains").is_dir() {
        let mut flags = Vec::new();
        for (dir, exec) in [(&cargo_home, cargo_home.join("bin")), (&rustup_home, rustup_home.join("toolchains"))] {
            flags.extend(["--ro".into(), dir.clone().into_os_string(), "--allow-exec".into(), exec.into_os_string()]);
        }
        let env = vec![
            ("CARGO_HOME".to_string(), cargo_home.display().to_string()),
            ("RUSTUP_HOME".to_string(), rustup_home.display().to_string()),
            ("PATH".to_string(), format!("{}:{PATH}", cargo_home.join("bin").display())),
        ];
        return Some(Toolchain { flags, env });
    }
    program("cargo").map(|_| Toolchain { flags: Vec::new(), env: Vec::new() })
}

/// `cargo build --offline` of a crate without dependencies, then the built binary and the
/// crate's own test run.
#[test]
fn cargo_builds_tests_and_runs_a_crate_offline() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let Some(toolchain) = toolchain() else { return };
    let fx = Fixture::new("cargo");
    let prepare = |fx: &Fixture| {
        fx.write(
            "hello/Cargo.toml",
            "[package]\nname = \"hello\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\n",
        );
        fx.write(
            "hello/src/main.rs",
            "fn answer() -> u32 { 6 * 7 }\nfn main() { println!(\"answer {}\", answer()); }\n\
             #[test]\nfn it_answers() { assert_eq!(answer(), 42); }\n",
        );
    };
    let script = "cd hello
        cargo build --offline --quiet; echo \"build: $?\"
        ./target/debug/hello; echo \"run: $?\"
        cargo test --offline --quiet >test.log 2>&1; echo \"test: $?\"
        grep -c '^test result: ok. 1 passed' test.log";
    let mut case = Case::new("cargo", &prepare, &["/bin/sh", "-c", script]);
    case.jail_flags = toolchain.flags;
    case.env = toolchain.env;
    let output = case.run_both(&fx);
    assert_prints(case.name, &output, &["build: 0", "answer 42", "run: 0", "test: 0", "1"]);
}

const MULTIPROCESSING: &str = "import multiprocessing as mp
from multiprocessing import shared_memory

def square(x):
    return x * x

def record(shared, items, key):
    shared[key] = key * 10
    items.append(key)

def fill(name):
    block = shared_memory.SharedMemory(name=name)
    block.buf[:4] = b'jail'
    block.close()

if __name__ == '__main__':
    for method in ('fork', 'spawn', 'forkserver'):
        ctx = mp.get_context(method)
        with ctx.Pool(4) as pool:
            print(method, 'pool', sum(pool.map(square, range(1000))), pool.apply(square, (12,)))
        with ctx.Manager() as manager:
            shared, items = manager.dict(), manager.list()
            workers = [ctx.Process(target=record, args=(shared, items, k)) for k in range(6)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            print(method, 'manager', sorted(shared.items()), sorted(items), [w.exitcode for w in workers])
        block = shared_memory.SharedMemory(create=True, size=16)
        worker = ctx.Process(target=fill, args=(block.name,))
        worker.start()
        worker.join()
        print(method, 'shared memory', bytes(block.buf[:4]))
        block.close()
        block.unlink()
        queue = ctx.Queue()
        worker = ctx.Process(target=queue.put, args=('queued',))
        worker.start()
        print(method, 'queue', queue.get(timeout=60))
        worker.join()
";

/// Pool, Manager, shared memory and a queue, under each start method.
#[test]
fn python_multiprocessing_pool_and_manager() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    if !programs(&["python3"]) {
        return;
    }
    let fx = Fixture::new("mp");
    let prepare = |fx: &Fixture| fx.write("mp.py", MULTIPROCESSING);
    let case = Case::new("multiprocessing", &prepare, &["python3", "mp.py"]);
    let output = case.run_both(&fx);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    for method in ["fork", "spawn", "forkserver"] {
        assert_prints(
            case.name,
            &output,
            &[
                &format!("{method} pool 332833500 144"),
                &format!(
                    "{method} manager [(0, 0), (1, 10), (2, 20), (3, 30), (4, 40), (5, 50)] [0, 1, 2, 3, 4, 5] [0, 0, 0, 0, 0, 0]"
                ),
                &format!("{method} shared memory b'jail'"),
                &format!("{method} queue queued"),
            ],
        );
    }
}

/// 1 GiB (16,384 blocks of 64 KiB, each block its index repeated) written by Python.
/// A web server in a process of its own on loopback, as dev servers, language servers
/// and test runners talk to their own workers over TCP.
const HTTP_SERVER: &str = "import functools, http.server
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory='site')
handler.log_message = lambda *args: None
httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
print(httpd.server_address[1], flush=True)
httpd.serve_forever()
";

/// Its client: starts the server, fetches two pages and a missing one, stops it.
const HTTP_CLIENT: &str = "import subprocess, sys, urllib.error, urllib.request
server = subprocess.Popen([sys.executable, 'server.py'], stdout=subprocess.PIPE, text=True)
port = int(server.stdout.readline())
for name in ['index.html', 'data.txt', 'missing']:
    try:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/{name}', timeout=10) as r:
            print(name, r.status, r.read().decode().strip())
    except urllib.error.HTTPError as e:
        print(name, e.code)
server.kill()
server.wait()
";

#[test]
fn a_loopback_web_server_and_its_client() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    if !programs(&["python3"]) {
        return;
    }
    let fx = Fixture::new("http");
    let prepare = |fx: &Fixture| {
        fx.write("server.py", HTTP_SERVER);
        fx.write("client.py", HTTP_CLIENT);
        fx.write("site/index.html", "<p>jail</p>\n");
        fx.write("site/data.txt", "42\n");
    };
    let case = Case::new("loopback http", &prepare, &["python3", "client.py"]);
    let output = case.run_both(&fx);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_prints(case.name, &output, &["index.html 200 <p>jail</p>", "data.txt 200 42", "missing 404"]);
}

const NAME_CLIENT: &str = "import socket, sys
name, port = sys.argv[1], int(sys.argv[2])
print('resolved', sorted({a[4][0] for a in socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)}))
with socket.create_connection((name, port), timeout=10) as s:
    s.sendall(b'GET / HTTP/1.1\\r\\nHost: ' + name.encode() + b'\\r\\n\\r\\n')
    print('greeting', s.recv(5).decode())
";

/// A client that resolves a name and connects to it, as one reaching an API by its host
/// name does. The name exists only in a test upstream resolver on the host's loopback
/// (127.0.0.153:53); its address is a test server beyond a veth on the host (no outside
/// traffic). Outside, the client's resolv.conf names that resolver (a mount namespace of
/// its own); inside, the agent's resolver asks it (`--dns-upstream`) for the one name
/// `--allow-connect` allows, and opens its address before the answer arrives.
#[test]
fn a_name_allowed_connect_reaches_its_server() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    if !programs(&["python3", "unshare", "mount"]) {
        return;
    }
    const NAME: &str = "api.agt-workload.example";
    let remote = RemoteHost::start("wlnam");
    let _upstream = TestResolver::start_on("127.0.0.153:53", &[(NAME, RemoteHost::LISTED.parse().unwrap())]);
    let fx = Fixture::new("names");
    let resolv = fx.root.join("resolv.conf");
    fs::write(&resolv, "nameserver 127.0.0.153\n").unwrap();
    let prepare = |fx: &Fixture| fx.write("client.py", NAME_CLIENT);
    let port = remote.port.to_string();
    let mut case = Case::new("name-allowed connect", &prepare, &["python3", "client.py", NAME, &port]);
    case.jail_flags = ["--allow-connect", &format!("{NAME}:{port}"), "--dns-upstream", "127.0.0.153:53"]
        .iter()
        .map(OsString::from)
        .collect();
    let mount = format!("mount --bind {} /etc/resolv.conf && exec python3 client.py {NAME} {port}", resolv.display());
    let outside_case = Case::new("name-allowed connect", &prepare, &["unshare", "--mount", "sh", "-c", &mount]);
    let outside = timed(case.name, "outside", &fx, &prepare, &mut outside_case.outside(&fx));
    let inside = timed(case.name, "inside", &fx, &prepare, &mut case.inside(&fx));
    assert_same(case.name, &outside, &inside);
    assert_eq!(outside.status.code(), Some(0), "{outside:?}");
    assert_prints(case.name, &outside, &["resolved ['203.0.113.2']", "greeting hello"]);
}

const GIB_WRITER: &str = "import sys
out = sys.stdout.buffer
for i in range(16384):
    out.write(i.to_bytes(8, 'little') * 8192)
out.flush()
";

/// Runs `cmd` with stdout piped and returns how many bytes came out, their SHA-256 and the
/// exit status. The bytes are counted here and hashed by `sha256sum` (this test binary's
/// own code is unoptimised: hashing 1 GiB here takes half a minute, much longer in the VM).
fn digest_stdout(cmd: &mut Command) -> (u64, String, ExitStatus) {
    let mut hasher =
        Command::new(program("sha256sum").unwrap()).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut hash_input = hasher.stdin.take().unwrap();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (mut count, mut buf) = (0u64, vec![0u8; 1 << 20]);
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        count += n as u64;
        hash_input.write_all(&buf[..n]).unwrap();
    }
    drop(hash_input);
    let status = child.wait().unwrap();
    let hashed = hasher.wait_with_output().unwrap();
    assert!(hashed.status.success(), "sha256sum: {hashed:?}");
    let digest = text(&hashed.stdout).split_whitespace().next().unwrap().to_string();
    (count, digest, status)
}

/// 1 GiB through the jailed command's stdout: every byte arrives, in order.
#[test]
fn one_gib_through_stdout_arrives_whole() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    if !programs(&["python3", "sha256sum"]) {
        return;
    }
    let fx = Fixture::new("gib");
    let prepare = |fx: &Fixture| fx.write("gib.py", GIB_WRITER);
    let case = Case::new("1 GiB", &prepare, &["python3", "gib.py"]);
    let mut results = Vec::new();
    for (side, mut cmd) in [("outside", case.outside(&fx)), ("inside", case.inside(&fx))] {
        fx.reset();
        prepare(&fx);
        let start = Instant::now();
        let result = digest_stdout(&mut cmd);
        eprintln!("TIME {} {side}: {:.2} s", case.name, start.elapsed().as_secs_f64());
        assert!(result.2.success(), "{side}: {:?}", result.2);
        assert_eq!(result.0, 1 << 30, "{side}: byte count");
        results.push(result);
    }
    assert_eq!(results[0].1, results[1].1, "the jail changed the bytes");
}

/// A tmux server of its own (`tmux -L`), killed on drop.
struct Tmux {
    tmux: PathBuf,
    socket: String,
    config: PathBuf,
}

impl Tmux {
    fn new(tmux: PathBuf, fx: &Fixture, tag: &str) -> Tmux {
        // Keep the pane after its command exits, to read its exit status.
        let config = fx.root.join("tmux.conf");
        fs::write(&config, "set -g remain-on-exit on\nset -g history-limit 5000\n").unwrap();
        Tmux { tmux, socket: format!("agt-jail-workload-{}-{tag}", std::process::id()), config }
    }

    fn cmd(&self, args: &[&str]) -> Output {
        let output = Command::new(&self.tmux)
            .arg("-L")
            .arg(&self.socket)
            .arg("-f")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "tmux {args:?}: {output:?}");
        output
    }

    /// The pane's whole history and screen, wrapped lines joined.
    fn pane(&self) -> String {
        text(&self.cmd(&["capture-pane", "-p", "-J", "-S", "-", "-t", "main"]).stdout)
    }

    /// Waits until the pane shows a line starting with `marker` (a bound against a hang, not a
    /// timing assertion: a loaded machine answers in well under a second).
    fn wait_for(&self, marker: &str) {
        let start = Instant::now();
        while !self.pane().lines().any(|l| l.starts_with(marker)) {
            assert!(start.elapsed() < Duration::from_secs(120), "no {marker:?} in the pane:\n{}", self.pane());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn send(&self, keys: &str) {
        self.cmd(&["send-keys", "-t", "main", "-l", keys]);
        self.cmd(&["send-keys", "-t", "main", "Enter"]);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new(&self.tmux).arg("-L").arg(&self.socket).arg("kill-server").output();
    }
}

/// Drives an interactive bash on a terminal: terminal checks, Ctrl-C to a foreground
/// program, Ctrl-Z and job control, `exit 3`. Returns the result lines (`R...`) the session
/// printed, the last the shell's exit status as the pane's own shell saw it (tmux 3.3 can
/// mark a pane dead before it has reaped its process, with no status). The typed lines
/// spell each marker split in two (`R""1`), so only output lines match.
fn interactive_session(tmux: &Tmux, command: &str) -> Vec<String> {
    let command = format!("{command}; echo \"R9 exit=$?\"");
    tmux.cmd(&["new-session", "-d", "-x", "120", "-y", "40", "-s", "main", &command]);
    tmux.wait_for("wl$ ");
    tmux.send(
        "tty >/dev/null; echo \"R\"\"1 tty=$?\"; test -t 0 -a -t 1 -a -t 2; echo \"R\"\"1 isatty=$?\"; \
         echo \"R\"\"1 size=$(stty size)\"",
    );
    tmux.wait_for("R1 size=");
    tmux.send("python3 -c 'import time; print(\"R2\" \"-ready\", flush=True); time.sleep(300)'");
    tmux.wait_for("R2-ready");
    tmux.cmd(&["send-keys", "-t", "main", "C-c"]);
    tmux.send("echo \"R\"\"2 rc=$?\"");
    tmux.wait_for("R2 rc=");
    // Stopped, then continued in the foreground (it says so on SIGCONT), then interrupted.
    tmux.send(
        "python3 -c 'import signal, time; signal.signal(signal.SIGCONT, lambda *_: print(\"R3\" \"-cont\", flush=True)); \
         print(\"R3\" \"-ready\", flush=True); time.sleep(300)'",
    );
    tmux.wait_for("R3-ready");
    tmux.cmd(&["send-keys", "-t", "main", "C-z"]);
    tmux.send("echo \"R\"\"3 rc=$?\"; echo \"R\"\"3 stopped=$(jobs -s | wc -l)\"; fg");
    tmux.wait_for("R3-cont");
    tmux.cmd(&["send-keys", "-t", "main", "C-c"]);
    tmux.send("echo \"R\"\"3 done=$?\"");
    tmux.wait_for("R3 done");
    tmux.send("exit 3");
    tmux.wait_for("R9 exit=");
    tmux.pane()
        .lines()
        .filter(|l| l.starts_with('R') && l.chars().nth(1).is_some_and(|c| c.is_ascii_digit()))
        .map(str::to_string)
        .collect()
}

/// An interactive shell on `--tty`, driven through tmux exactly as outside the jail.
#[test]
fn interactive_shell_on_a_tty_through_tmux() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let Some(tmux) = program("tmux") else { return };
    if !programs(&["bash", "python3"]) {
        return;
    }
    let fx = Fixture::new("tty");
    let ws = fx.workspace().display().to_string();
    let env = [format!("PATH={PATH}"), format!("HOME={ws}"), "LANG=C.UTF-8".into(), "PS1=wl$ ".into()];
    let quoted: Vec<String> = env.iter().map(|var| format!("'{var}'")).collect();
    let outside = format!("cd {ws} && env -i {} TERM=\"$TERM\" /bin/bash --norc -i", quoted.join(" "));
    let inside = format!(
        "{BIN} exec --ring {RING} --tty --workspace {ws} --env TERM=\"$TERM\" --env {} -- /bin/bash --norc -i",
        quoted.join(" --env ")
    );
    let mut runs = Vec::new();
    for (side, command) in [("outside", outside), ("inside", inside)] {
        let start = Instant::now();
        let session = Tmux::new(tmux.clone(), &fx, side);
        runs.push(interactive_session(&session, &command));
        eprintln!("TIME tty {side}: {:.2} s", start.elapsed().as_secs_f64());
    }
    let expected: Vec<String> = [
        "R1 tty=0",
        "R1 isatty=0",
        "R1 size=40 120",
        "R2-ready",
        "R2 rc=130",
        "R3-ready",
        "R3 rc=148",
        "R3 stopped=1",
        "R3-cont",
        "R3 done=130",
        "R9 exit=3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(runs[0], expected, "outside the jail");
    assert_eq!(runs[1], runs[0], "the jail changed the session");
}

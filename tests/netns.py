"""A real NAT for tests, built from Linux network namespaces, veth pairs and iptables.

::

    carrier 192.0.2.10/24 ── 192.0.2.1 router 10.99.0.1 ── 10.99.0.2/24 box (default via 10.99.0.1)

The router DNATs UDP to its public address (SIP and the RTP range) to the box and
MASQUERADEs what the box sends out, like a 1:1 port-forwarding NAT in front of a box
on a private network. The carrier has no route to 10.99.0.0/24: only what the NAT lets
through reaches the box. Namespaces are named after the pid (several suites may run at
once) and ``Nat.close()`` deletes them (and stops whatever still runs inside).

``in_netns(ns, fn)`` runs ``fn`` in a thread that has entered ``ns``: sockets it creates
(an RtpPeer, an HTTP client's connection) belong to that namespace for good, and may be
used from any thread afterwards.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000

CARRIER_IP = "192.0.2.10"
PUBLIC_IP = "192.0.2.1"
ROUTER_INSIDE = "10.99.0.1"
BOX_IP = "10.99.0.2"


class NetnsUnavailable(RuntimeError):
    """Not root, or the kernel/iproute2/iptables here cannot build the NAT."""


def _run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise NetnsUnavailable(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def exec_prefix(ns: str) -> list[str]:
    """The argv prefix that runs a command inside ``ns``."""
    return ["ip", "netns", "exec", ns]


def in_netns(ns: str, fn, *args, **kw):
    """``fn(*args, **kw)`` in a thread that entered network namespace ``ns``; its result (or exception)."""
    out: dict = {}

    def body():
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({ns}) failed")
            finally:
                os.close(fd)
            out["value"] = fn(*args, **kw)
        except BaseException as exc:         # re-raised in the caller's thread
            out["error"] = exc
    t = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


@dataclass
class Nat:
    """carrier <-> router (NAT) <-> box; ``forward``: (proto, "port" or "lo:hi") the router forwards to the box."""
    forward: list[tuple[str, str]]
    tag: str = field(default_factory=lambda: str(os.getpid()))
    carrier: str = ""
    router: str = ""
    box: str = ""
    rules: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.carrier, self.router, self.box = (f"tl{x}{self.tag}" for x in ("c", "r", "b"))

    def open(self) -> "Nat":
        if os.geteuid() != 0:
            raise NetnsUnavailable("needs root (ip netns, iptables)")
        for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
            if not shutil.which(tool):            # a missing package is a failure, not a skip (TEST_DEBS)
                raise RuntimeError(f"{tool} not found: install the Debian package {package!r}")
        try:
            for ns in (self.carrier, self.router, self.box):
                _run("ip", "netns", "add", ns)
                _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "link", "add", "c0", "netns", self.carrier, "type", "veth", "peer", "name", "r0",
                 "netns", self.router)
            _run("ip", "link", "add", "b0", "netns", self.box, "type", "veth", "peer", "name", "r1",
                 "netns", self.router)
            for ns, dev, addr in ((self.carrier, "c0", f"{CARRIER_IP}/24"), (self.router, "r0", f"{PUBLIC_IP}/24"),
                                  (self.router, "r1", f"{ROUTER_INSIDE}/24"), (self.box, "b0", f"{BOX_IP}/24")):
                _run("ip", "-n", ns, "addr", "add", addr, "dev", dev)
                _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", self.box, "route", "add", "default", "via", ROUTER_INSIDE)
            _run(*exec_prefix(self.router), "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self.rules = [f"-t nat -A PREROUTING -i r0 -d {PUBLIC_IP} -p {proto} --dport {ports} "
                          f"-j DNAT --to-destination {BOX_IP}" for proto, ports in self.forward]
            self.rules.append(f"-t nat -A POSTROUTING -o r0 -s {BOX_IP}/32 -j MASQUERADE")
            for rule in self.rules:
                _run(*exec_prefix(self.router), "iptables", *rule.split())
        except (NetnsUnavailable, OSError, subprocess.TimeoutExpired) as exc:
            self.close()
            raise NetnsUnavailable(str(exc)) from None
        return self

    def close(self) -> None:
        """Stop what runs inside and delete the namespaces (their veths and rules go with them)."""
        for ns in (self.carrier, self.box, self.router):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for p in pids:
                try:
                    os.kill(int(p), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            if pids:
                time.sleep(0.2)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def exists(self) -> list[str]:
        """The namespaces of this NAT that still exist (for a teardown check)."""
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        return [ns for ns in (self.carrier, self.router, self.box) if ns in names]

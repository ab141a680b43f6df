"""Simulated machines on one host: Linux network namespaces with hostnames of their own.

K *nodes* are K network namespaces, each joined to one bridge (in a namespace of its own,
the *switch*) by a veth pair, with an address on ``10.77.X.0/24``.  A command runs "on" a
node through ``ip netns exec NS unshare --uts sh -c 'hostname NODE; ...'``: its own network
stack, its own hostname, the same file system.  Open MPI reaches the nodes as machines: its
launcher starts one daemon per node through an rsh agent (``plm_rsh_agent``) that enters
the node's namespace instead of running ssh, and every byte between ranks and daemons goes
over TCP on the veth subnet (``btl tcp,self``, ``oob``/``pmix`` on the same interface).

Each node also has a disk of its own: ``local`` (the same path on every node) is, in each
node's mount namespace, a bind mount of that node's ``disk-NODE`` directory, so that state
kept on node-local disks (``checkpoint.site_dir``) is exercised, not only a shared file system.

Cutting a node's wire (``cut``) takes its veth down on the switch's side: the node keeps its
own address (so its own ranks still talk among themselves) but nothing reaches the others.

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and ``ip``/``unshare``; :func:`unavailable` says
why not when that is missing.  Used by ``tests/multinode`` and ``benchmarks/bench_multinode.py``;
docs/hpc.md gives the same recipe by hand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

AGENT = """#!/bin/sh
# rsh agent for Open MPI: "agent [options] HOST COMMAND..." runs COMMAND on node HOST,
# i.e. inside HOST's network namespace under HOST's hostname (as ssh would on a machine)
while [ $# -gt 0 ]; do
  case "$1" in
    -x|-n|-q|-T|-t) shift ;;
    -o|-p|-l|-i) shift 2 ;;
    *) break ;;
  esac
done
host="$1"; shift
exec ip netns exec "{prefix}$host" unshare --uts --mount --propagation private sh -c \
  "mount --bind {dir}/disk-$host {dir}/local && hostname $(cat {dir}/hostname-$host) && $*"
"""


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (iproute2 / util-linux)"
    probe = f"fsprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"'ip netns add' failed: {made.stderr.strip()}"
    try:
        uts = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--uts", "--mount",
                              "--propagation", "private", "sh", "-c",
                              "mount --bind /tmp /tmp"], capture_output=True, text=True)
        if uts.returncode != 0:
            return f"'unshare --uts --mount' failed: {uts.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class NetBed:
    """``num_nodes`` simulated machines named ``node0``, ``node1``, ...; use as a context
    manager (everything it made is removed on exit, also after a failure)."""

    def __init__(self, num_nodes: int, *, tag: str | None = None,
                 hostnames: Sequence[str] | None = None) -> None:
        self.num_nodes = num_nodes
        self.tag = tag or f"fs{os.getpid() % 100000}"
        self.prefix = f"{self.tag}-"
        self.nodes = [f"node{i}" for i in range(num_nodes)]
        #: the hostname each node's processes see (the same one twice: the misconfigured
        #: case; the launcher still reaches the nodes by their names, node0, node1, ...)
        self.hostnames = list(hostnames) if hostnames else list(self.nodes)
        self.subnet_octet = 77 + (os.getpid() % 150)
        self.subnet = f"10.{self.subnet_octet}.0.0/24"
        self.switch = f"{self.tag}-sw"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-bed-"))
        self.agent = self.dir / "agent.sh"
        self.hostfile = self.dir / "hostfile"
        #: node-local disks: this path shows node N's ``disk_of(N)`` to node N's processes
        self.local = self.dir / "local"
        self._made: list[str] = []

    # -- set up and tear down ----------------------------------------------------------

    def address(self, node: int) -> str:
        return f"10.{self.subnet_octet}.0.{node + 1}"

    def disk_of(self, node: int) -> Path:
        """Node ``node``'s own disk as seen from the host (its processes see it at ``local``)."""
        return self.dir / f"disk-{self.nodes[node]}"

    def ns(self, node: int) -> str:
        return self.prefix + self.nodes[node]

    def port(self, node: int) -> str:
        """The switch's end of node ``node``'s wire."""
        return f"{self.tag}p{node}"

    def __enter__(self) -> "NetBed":
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ip(self, *args: str, ns: str | None = None) -> None:
        command = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")

    def _up(self) -> None:
        self._ip("netns", "add", self.switch)
        self._made.append(self.switch)
        self._ip("link", "add", "br0", "type", "bridge", ns=self.switch)
        self._ip("link", "set", "br0", "up", ns=self.switch)
        self._ip("link", "set", "lo", "up", ns=self.switch)
        hosts = ["127.0.0.1 localhost"] + [f"{self.address(i)} {name}"
                                            for i, name in enumerate(self.nodes)]
        for i in range(self.num_nodes):
            ns = self.ns(i)
            self._ip("netns", "add", ns)
            self._made.append(ns)
            # the pair is made in the node and one end moved to the switch
            self._ip("link", "add", "eth0", "type", "veth", "peer", "name", self.port(i), ns=ns)
            self._ip("link", "set", self.port(i), "netns", self.switch, ns=ns)
            self._ip("addr", "add", f"{self.address(i)}/24", "dev", "eth0", ns=ns)
            self._ip("link", "set", "eth0", "up", ns=ns)
            self._ip("link", "set", "lo", "up", ns=ns)
            self._ip("link", "set", self.port(i), "master", "br0", ns=self.switch)
            self._ip("link", "set", self.port(i), "up", ns=self.switch)
            # ip netns exec bind-mounts /etc/netns/NS/* over /etc: each node's /etc/hosts
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("\n".join(hosts) + "\n")
        self.local.mkdir()
        for i, (node, hostname) in enumerate(zip(self.nodes, self.hostnames)):
            (self.dir / f"hostname-{node}").write_text(hostname + "\n")
            self.disk_of(i).mkdir()
        self.agent.write_text(AGENT.replace("{prefix}", self.prefix)
                              .replace("{dir}", str(self.dir)))
        self.agent.chmod(0o755)

    def close(self) -> None:
        self.kill_all()
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self._made.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill_all(self) -> None:
        """Kill every process still running in a node (a job left behind by a cut wire)."""
        for ns in self._made:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass

    def processes(self, node: int, *, containing: str, launcher: bool = False) -> list[int]:
        """The processes running on node ``node`` whose command line holds ``containing``
        (the MPI launcher, whose arguments hold the ranks' command, only with ``launcher``)."""
        pids = subprocess.run(["ip", "netns", "pids", self.ns(node)], capture_output=True,
                              text=True).stdout.split()
        found = []
        for pid in pids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            program = Path(cmdline.split(b" ", 1)[0].decode(errors="replace")).name
            if not launcher and program in ("prterun", "mpirun", "mpiexec", "prted"):
                continue
            if containing.encode() in cmdline:
                found.append(int(pid))
        return found

    # -- running -----------------------------------------------------------------------

    def on(self, node: int, argv: Sequence[str]) -> list[str]:
        """``argv`` as a command line run on node ``node`` (its namespace and hostname)."""
        import shlex

        return ["ip", "netns", "exec", self.ns(node), "unshare", "--uts", "--mount",
                "--propagation", "private", "sh", "-c",
                f"mount --bind {self.disk_of(node)} {self.local} && "
                f"hostname {self.hostnames[node]} && exec {shlex.join(argv)}"]

    def mpirun(self, ranks_per_node: Sequence[int], argv: Sequence[str], *,
               mpirun: str, keepalive: tuple[int, int, int] | None = None) -> list[str]:
        """``mpirun`` started on node 0, placing ``ranks_per_node[i]`` ranks on node i (in
        rank order: node 0 holds rank 0, the coordinator), everything over TCP.

        ``keepalive`` (idle, interval, probes; seconds) is how soon Open MPI's launcher
        declares a node whose wire was cut lost and ends the job: after fedsilo's watchdog
        has spoken (docs/hpc.md); by default it takes 300 + 9 x 20 s."""
        lines = [f"{self.nodes[i]} slots={n}" for i, n in enumerate(ranks_per_node) if n]
        self.hostfile.write_text("\n".join(lines) + "\n")
        command = [mpirun, "-n", str(sum(ranks_per_node)), "--hostfile", str(self.hostfile),
                   "--map-by", "slot", "--bind-to", "none", "--oversubscribe",
                   "--allow-run-as-root",
                   "--mca", "plm_rsh_agent", str(self.agent),
                   "--mca", "btl", "tcp,self",
                   "--mca", "btl_tcp_if_include", self.subnet,
                   "--mca", "oob_tcp_if_include", self.subnet,
                   "--prtemca", "plm_rsh_agent", str(self.agent),
                   "--prtemca", "oob_tcp_if_include", self.subnet,
                   "--mca", "pml", "ob1"]
        if keepalive is not None:
            for name, value in zip(("time", "intvl", "probes"), keepalive):
                command += ["--prtemca", f"oob_tcp_keepalive_{name}", str(value)]
        command += list(argv)
        return self.on(0, command)

    # -- faults and links ----------------------------------------------------------------

    def cut(self, node: int) -> None:
        """Take node ``node``'s wire down (at the switch): it can reach no other node."""
        self._ip("link", "set", self.port(node), "down", ns=self.switch)

    def restore(self, node: int) -> None:
        self._ip("link", "set", self.port(node), "up", ns=self.switch)

    def limit(self, rate: str, *, burst: str = "32kbit", latency: str = "50ms") -> None:
        """Every node's link limited to ``rate`` each way (``tc ... tbf``)."""
        for i in range(self.num_nodes):
            for dev, ns in (("eth0", self.ns(i)), (self.port(i), self.switch)):
                done = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev",
                                       dev, "root", "tbf", "rate", rate, "burst", burst,
                                       "latency", latency], capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"tc on {ns}/{dev}: {done.stderr.strip()}")

"""`python -m loopfast doctor`: the healthy path end to end, and each finding it tells apart.

Port findings are made against real sockets on 127.0.0.1 / ::1 (refused, a silent listener, a
non-loopfast banner, a loopfast Listener, a reset). A silently dropped port and a disabled IPv6
need a private network namespace (root, `unshare -n`, and iptables or nft for the DROP rule):
elsewhere those tests skip and say which tool is missing. The host's own firewall and sysctls are
never touched. The doctor's own traffic is watched with an audit hook: loopback only.
"""

import errno
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import sys

import pytest
from conftest import IPV6_AVAILABLE, JOIN_TIMEOUT, Background

import loopfast
from loopfast import _peer
from loopfast.tools import cli
from loopfast.tools import doctor as _doctor

RUN_TIMEOUT = 60
SHORT = 0.5  # seconds the doctor waits for a port's answer in the in-process tests
NOT_LOOPBACK = "10.20.30.40"  # only ever written in a fake hosts file; never contacted

# Runs `python -m loopfast doctor ARGS` with an audit hook that records every address the
# process binds, connects or sends to, and every getaddrinfo() call, into the file argv[1].
# argv[2], when not "-": a hosts file the doctor reads instead of /etc/hosts.
WATCHED = r"""
import json, socket, sys
events = []
def hook(event, args):
    if event in ("socket.connect", "socket.bind"):
        events.append([event, str(args[1][0]) if isinstance(args[1], tuple) else repr(args[1])])
    elif event == "socket.sendto" and args[0].family != getattr(socket, "AF_NETLINK", -1):
        events.append([event, str(args[-1][0])])  # (a netlink query asks this kernel only)
    elif event == "socket.getaddrinfo":
        events.append([event, str(args[0])])
sys.addaudithook(hook)
if sys.argv[2] != "-":
    from loopfast.tools import doctor as _doctor
    _doctor.HOSTS_FILE = sys.argv[2]
from loopfast.tools.cli import main
try:
    code = main(sys.argv[3:])
finally:
    with open(sys.argv[1], "w") as f:
        json.dump(events, f)
sys.exit(code)
"""


def _mapped_hosts(tmp_path):
    """A hosts file that maps localhost elsewhere (and to 127.0.0.1)."""
    hosts = tmp_path / "hosts"
    hosts.write_text(f"{NOT_LOOPBACK} localhost  # moved\n127.0.0.1 localhost\n")
    return str(hosts)


def _watched_doctor(tmp_path, *args, mapped=False):
    """(completed process, recorded socket events) of one doctor run in a child process."""
    events = tmp_path / f"events-{len(list(tmp_path.iterdir()))}.json"
    done = subprocess.run(
        [sys.executable, "-c", WATCHED, str(events), _mapped_hosts(tmp_path) if mapped else "-",
         "doctor", *args], capture_output=True, text=True, encoding="utf-8", timeout=RUN_TIMEOUT,
        check=False)
    assert events.exists(), done.stderr
    return done, json.loads(events.read_text())


def _is_loopback(text):
    return ipaddress.ip_address(text.split("%")[0]).is_loopback


def _by_name(report):
    return {check["name"]: check for check in report["checks"]}


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """One `doctor --json` run on this machine: (completed process, report, socket events)."""
    done, events = _watched_doctor(tmp_path_factory.mktemp("doctor"), "--json")
    return done, json.loads(done.stdout), events


# ---- the healthy path ---------------------------------------------------------------------------

def test_healthy_machine_exits_0_with_no_error(healthy):
    done, report, _ = healthy
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["status"] in ("ok", "warning")
    assert report["counts"]["error"] == 0


def test_json_has_every_check_with_status_message_and_hint(healthy):
    _, report, _ = healthy
    checks = _by_name(report)
    assert set(checks) == {"implementation", "cpus", "ipv4", "ipv6", "localhost", "peer-identity",
                           "socket-buffers", "ephemeral-ports", "round-trip"}
    for check in report["checks"]:
        assert check["status"] in ("ok", "warning", "error")
        assert isinstance(check["message"], str) and check["message"]
        assert isinstance(check["hint"], str) and isinstance(check["details"], dict)
    assert checks["ipv4"]["status"] == "ok"
    assert checks["ipv4"]["details"]["steps"] == ["socket", "bind", "listen", "connect",
                                                  "accept", "handshake", "round trip"]
    assert checks["ipv6"]["status"] == ("ok" if IPV6_AVAILABLE else "warning")


def test_json_has_the_machine_facts(healthy):
    _, report, _ = healthy
    facts = report["machine"]
    assert facts["implementation"] == loopfast.implementation
    assert facts["usable_cpus"] >= 1
    assert facts["spin_us"] >= 0
    assert set(facts["socket_buffers"]) == {"rmem_max", "wmem_max", "tcp_rmem", "tcp_wmem"}
    if os.path.exists("/proc/sys/net/ipv4/ip_local_port_range"):
        ports = facts["ephemeral_ports"]
        assert ports["count"] == ports["high"] - ports["low"] + 1 > 0
    measured = facts["round_trip"]
    kinds = ["blocking", "spinning"] if loopfast.implementation == "compiled" else ["blocking"]
    for kind in kinds:
        assert measured[kind]["message_size"] == 64
        assert measured[kind]["round_trips"] > 0 and measured[kind]["median_us"] > 0
    assert measured["blocking"]["spin_us"] == 0
    if loopfast.implementation != "compiled":  # the twin never busy-polls
        assert measured["spinning"] is None


def test_doctor_contacts_loopback_addresses_only(healthy):
    _, _, events = healthy
    addresses = [address for event, address in events if event != "socket.getaddrinfo"]
    assert addresses, "the audit hook saw no socket at all"
    assert all(_is_loopback(address) for address in addresses), events
    looked_up = {host for event, host in events if event == "socket.getaddrinfo"}
    assert looked_up <= {"127.0.0.1", "::1"}  # never a name (no DNS query can leave)


def test_text_output_lists_every_check_and_the_verdict():
    done = subprocess.run([sys.executable, "-m", "loopfast", "doctor"], capture_output=True,
                          text=True, encoding="utf-8", timeout=RUN_TIMEOUT, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for title in ("implementation", "CPUs", "127.0.0.1", "::1", "localhost", "peer identity",
                  "socket buffers", "ephemeral ports", "round trip"):
        assert title in done.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith("healthy")
    assert "Traceback" not in done.stderr


# ---- localhost ----------------------------------------------------------------------------------

@pytest.fixture
def connects(monkeypatch):
    """Every address this process connects to while the test runs (an audit hook)."""
    seen = []
    active = [True]

    def hook(event, args):
        if active[0] and event == "socket.connect":
            seen.append(args[1])

    sys.addaudithook(hook)  # hooks cannot be removed: this one goes quiet after the test
    yield seen
    active[0] = False


def _no_lookups(monkeypatch):
    def refuse(host, *args, **kwargs):
        raise AssertionError(f"the doctor resolved {host!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_localhost_mapped_elsewhere_is_a_warning_that_shows_the_mapping(monkeypatch, tmp_path,
                                                                        connects):
    _no_lookups(monkeypatch)
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost4\n{NOT_LOOPBACK} localhost  # moved\n")
    check = _doctor.check_localhost(hosts_file=str(hosts))
    assert check.status == "warning"
    assert f"{NOT_LOOPBACK} (not loopback)" in check.message
    assert "without a lookup" in check.message and "127.0.0.1 and ::1 only" in check.hint
    assert check.details["hosts_file"]["lines"] == [f"{NOT_LOOPBACK} localhost  # moved"]
    assert [a["address"] for a in check.details["addresses"]] == [NOT_LOOPBACK]
    assert check.details["uses"] == {"AF_INET": "127.0.0.1", "AF_INET6": "::1"}
    assert connects == []


def test_localhost_on_loopback_only_is_ok(monkeypatch, tmp_path):
    _no_lookups(monkeypatch)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
    check = _doctor.check_localhost(hosts_file=str(hosts))
    assert check.status == "ok"
    assert [a["loopback"] for a in check.details["addresses"]] == [True, True]
    assert "127.0.0.1, ::1" in check.message


def test_localhost_missing_from_the_hosts_file_is_ok_without_a_lookup(monkeypatch, tmp_path):
    _no_lookups(monkeypatch)
    check = _doctor.check_localhost(hosts_file=str(tmp_path / "absent"))
    assert check.status == "ok" and "nothing in" in check.message


def test_cli_with_localhost_mapped_elsewhere_warns_exits_0_and_never_contacts_it(tmp_path):
    done, events = _watched_doctor(tmp_path, "--json", mapped=True)
    assert done.returncode == 0, done.stdout + done.stderr
    check = _by_name(json.loads(done.stdout))["localhost"]
    assert check["status"] == "warning" and NOT_LOOPBACK in check["message"]
    assert all(_is_loopback(address) for event, address in events
               if event != "socket.getaddrinfo"), events
    assert "localhost" not in [address for event, address in events
                               if event == "socket.getaddrinfo"], events


def test_strict_makes_a_warning_exit_1(tmp_path):
    done, _ = _watched_doctor(tmp_path, "--strict", mapped=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "WARNING" in done.stdout and "localhost" in done.stdout


# ---- 127.0.0.1 and ::1 --------------------------------------------------------------------------

def test_ipv6_unavailable_is_a_plain_warning(monkeypatch):
    def no_ipv6(family, host, timeout, steps):
        raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))

    monkeypatch.setattr(_doctor, "_socket_probe", no_ipv6)
    check = _doctor.check_loopback("::1", timeout=SHORT)
    assert (check.name, check.status) == ("ipv6", "warning")
    assert "IPv6 loopback is not available" in check.message and "EAFNOSUPPORT" in check.message
    assert "127.0.0.1" in check.hint
    assert check.details["available"] is False and check.details["failed_step"] == "socket"


def test_python_without_ipv6_is_a_plain_warning(monkeypatch):
    monkeypatch.setattr(socket, "has_ipv6", False)
    check = _doctor.check_loopback("::1", timeout=SHORT)
    assert check.status == "warning" and "socket.has_ipv6 is False" in check.message


def test_ipv4_that_cannot_bind_is_an_error_with_a_hint(monkeypatch):
    def no_loopback(family, host, timeout, steps):
        steps.append("socket")
        raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))

    monkeypatch.setattr(_doctor, "_socket_probe", no_loopback)
    check = _doctor.check_loopback("127.0.0.1", timeout=SHORT)
    assert (check.name, check.status) == ("ipv4", "error")
    assert check.details["failed_step"] == "bind" and "ip link set lo up" in check.hint


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_loopback_round_trip_works_in_process(host):
    if host == "::1" and not IPV6_AVAILABLE:
        pytest.skip("IPv6 loopback (::1) is not available on this machine")
    check = _doctor.check_loopback(host, timeout=5.0)
    assert check.status == "ok", check
    assert check.details["steps"][-2:] == ["handshake", "round trip"]


# ---- --port -------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_port_with_nothing_listening_is_refused():
    port = _free_port()
    checks = _doctor.check_port(port, timeout=SHORT)
    assert checks[0].details["outcome"] == "refused"
    assert checks[0].status == "error" and "nothing is listening" in checks[0].message
    assert checks[0].title == f"127.0.0.1:{port}"
    if IPV6_AVAILABLE:
        assert checks[1].details["outcome"] == "refused"


def test_port_of_a_silent_listener_is_listening_but_not_loopfast():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)  # never accepts: the kernel completes the connection, nobody speaks
        check, = _doctor.check_port(server.getsockname()[1], timeout=SHORT,
                                    hosts=("127.0.0.1",))
    assert check.details["outcome"] == "listening"
    assert check.details["speaks_loopfast"] is False
    assert check.status == "warning" and "silent" in check.message


def test_port_of_another_protocol_shows_its_first_bytes_and_is_sent_nothing():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(JOIN_TIMEOUT)

        def banner_then_read():
            conn, _ = server.accept()
            with conn:
                conn.settimeout(JOIN_TIMEOUT)
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                return conn.recv(1024)  # b"" once the doctor hangs up

        serving = Background(banner_then_read)
        check, = _doctor.check_port(server.getsockname()[1], timeout=5.0, hosts=("127.0.0.1",))
        assert serving.result() == b""
    assert check.details["speaks_loopfast"] is False
    assert check.status == "warning" and "SSH-2.0" in check.message


@pytest.mark.parametrize("authkey", [None, b"secret"], ids=["no-authkey", "authkey"])
def test_port_of_a_loopfast_listener_is_recognised(authkey):
    with loopfast.Listener(authkey=authkey, handshake_timeout=JOIN_TIMEOUT) as listener:
        accepting = Background(listener.accept)
        checks = _doctor.check_port(listener.address[1], timeout=5.0)
        with pytest.raises((loopfast.ProtocolError, EOFError)):
            accepting.result()  # the doctor hung up without a word, as a port scan would
    check = checks[0]
    assert check.status == "ok", check
    assert check.details["speaks_loopfast"] is True and check.details["protocol_version"] == 1
    assert check.details["authkey_required"] is (authkey is not None)
    assert ("authkey required" in check.message) is (authkey is not None)
    if IPV6_AVAILABLE:  # the listener is on 127.0.0.1 only
        assert checks[1].details["outcome"] == "refused" and checks[1].status == "ok"
        assert f"listens on 127.0.0.1:{listener.address[1]} only" in checks[1].message


def test_port_that_accepts_and_resets_is_reset():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(JOIN_TIMEOUT)

        def accept_and_reset():
            conn, _ = server.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # linger 0: an RST instead of a FIN

        resetting = Background(accept_and_reset)
        check, = _doctor.check_port(server.getsockname()[1], timeout=5.0, hosts=("127.0.0.1",))
        resetting.result()
    assert check.details["outcome"] == "reset"
    assert check.status == "error" and check.message.startswith("reset")


# ---- the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["doctor", "--port", "0"], ["doctor", "--port", "65536"],
                                  ["doctor", "--timeout", "0"], ["doctor", "--timeout", "nan"]])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_port_refused_on_the_command_line_exits_1():
    port = _free_port()
    done = subprocess.run([sys.executable, "-m", "loopfast", "doctor", "--json", "--port",
                           str(port), "--timeout", "1"], capture_output=True, text=True,
                          encoding="utf-8", timeout=RUN_TIMEOUT, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    check = _by_name(json.loads(done.stdout))[f"port 127.0.0.1:{port}"]
    assert check["details"]["outcome"] == "refused" and check["status"] == "error"


# ---- inside a private network namespace ---------------------------------------------------------

SETUP_FAILED = 97


def _in_namespace(setup, *doctor_args):
    """Run `setup` (shell) then `python -m loopfast doctor ARGS` in a new network namespace with
    only `lo` up; skip, saying why, where this machine cannot."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root for a private network namespace (unshare -n)")
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs the {tool} command")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True,
                           timeout=RUN_TIMEOUT, check=False)
    if probe.returncode != 0:
        pytest.skip(f"unshare -n does not work here: {probe.stderr.strip()}")
    script = (f"ip link set lo up || exit {SETUP_FAILED}\n{setup} || exit {SETUP_FAILED}\n"
              f'exec "$0" -m loopfast doctor "$@"')
    done = subprocess.run(["unshare", "-n", "sh", "-c", script, sys.executable, *doctor_args],
                          capture_output=True, text=True, encoding="utf-8",
                          timeout=RUN_TIMEOUT, check=False)
    if done.returncode == SETUP_FAILED:
        pytest.skip(f"could not set up the namespace ({setup}): {done.stderr.strip()}")
    return done


def _drop_rule(port):
    if shutil.which("iptables"):
        rule = f"iptables -A INPUT -p tcp --dport {port} -j DROP"
        if shutil.which("ip6tables"):
            rule += f" && ip6tables -A INPUT -p tcp --dport {port} -j DROP"
        return rule
    if shutil.which("nft"):
        return ("nft add table inet doctor_test && nft add chain inet doctor_test input "
                "'{ type filter hook input priority 0 ; }' && nft add rule inet doctor_test "
                f"input tcp dport {port} drop")
    pytest.skip("needs iptables or nft for a DROP rule (neither is installed)")


def test_port_behind_a_drop_rule_is_dropped_after_the_timeout():
    port = 47011
    done = _in_namespace(_drop_rule(port), "--json", "--port", str(port), "--timeout", "1")
    assert done.returncode == 1, done.stdout + done.stderr
    check = _by_name(json.loads(done.stdout))[f"port 127.0.0.1:{port}"]
    assert check["details"]["outcome"] == "dropped" and check["status"] == "error"
    assert "no answer at all within 1 s" in check["message"]
    assert "firewall" in check["hint"]


def test_ipv6_disabled_for_real_is_a_warning_not_a_traceback():
    port = 47012
    done = _in_namespace("echo 1 > /proc/sys/net/ipv6/conf/lo/disable_ipv6", "--json",
                         "--port", str(port), "--timeout", "1")
    checks = _by_name(json.loads(done.stdout))
    assert checks["ipv6"]["status"] == "warning", checks["ipv6"]
    assert "not available" in checks["ipv6"]["message"]
    assert checks["ipv4"]["status"] == "ok"
    assert checks[f"port [::1]:{port}"]["details"]["outcome"] == "unavailable"
    assert "Traceback" not in done.stderr



# ---- peer identity ------------------------------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sock_diag is Linux's")
def test_peer_identity_reports_sock_diag_and_its_cost():
    check = _doctor.check_peer_identity()
    assert check.status == "ok", check
    assert check.details["mechanism"] == "sock_diag"
    assert check.details["peer_uid"] == check.details["uid"] == os.geteuid()
    assert 0 < check.details["query_us"] < 1e6


def test_peer_identity_where_the_platform_cannot_tell_is_a_warning_that_says_what_to_do(
        monkeypatch):
    monkeypatch.setattr(_peer, "mechanism", lambda: None)
    check = _doctor.check_peer_identity()
    assert check.status == "warning"
    assert check.details["mechanism"] is None
    assert "allow_users='any'" in check.hint


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sock_diag is Linux's")
def test_peer_identity_query_failing_is_an_error(monkeypatch):
    def refused(fd, timeout=0.1):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(_peer, "peer_identity", refused)
    check = _doctor.check_peer_identity()
    assert check.status == "error"
    assert "Operation not permitted" in check.message
    assert "allow_users='any'" in check.hint

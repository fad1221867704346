"""Every subcommand of ``cfrseg``, ``cfrseg stack`` and ``cfrseg client`` answers ``--help`` (the list is derived
from the parsers, so new subcommands are covered), and the connection/stack options are accepted before and
after the subcommand."""

from __future__ import annotations

import argparse

import pytest

from cfrseg import cli
from tests.stack_helpers import cfrseg


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:  # argparse keeps subcommands here; there is no public accessor
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _commands() -> list[list[str]]:
    from services import client, stack

    real = {"stack": stack.build_parser(), "client": client.build_parser()}
    out: list[list[str]] = []

    def walk(prefix: list[str], p: argparse.ArgumentParser) -> None:
        out.append(prefix)
        for name, sub in _subparsers(p).items():
            walk([*prefix, name], real.get(name, sub) if len(prefix) == 0 else sub)

    walk([], cli.build_parser())
    return out


COMMANDS = _commands()


def test_the_walk_finds_the_nested_commands():
    names = {" ".join(c) for c in COMMANDS}
    assert {"run", "data fetch", "weights fetch", "stack up", "stack status", "client upload-dataset",
            "client submit", "client health"} <= names, names
    assert len(COMMANDS) > 20


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "cfrseg")
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*cmd, "--help"])
    out = capsys.readouterr()
    assert e.value.code == 0, out.err
    assert out.out.startswith("usage: cfrseg" + "".join(f" {c}" for c in cmd[:1])), out.out[:200]
    assert not out.err


def test_help_through_the_installed_entry_point():
    for args in (["stack", "--help"], ["client", "--help"], ["client", "list", "--help"], ["stack", "up", "-h"]):
        r = cfrseg(*args, timeout=60)
        assert r.returncode == 0 and r.stdout.startswith("usage: cfrseg"), (args, r.stderr)


def test_options_in_any_position():
    from services import client, stack

    for argv in (["--stack-dir", "S", "--address", "A:1", "list"], ["list", "--stack-dir", "S", "--address", "A:1"],
                 ["--stack-dir", "S", "list", "--address", "A:1"]):
        a = client.parse(argv)
        assert (a.cmd, a.stack_dir, a.address, a.token) == ("list", "S", "A:1", ""), argv
    a = client.parse(["submit", "--dataset", "ds", "--tls-ca", "ca.pem", "--tls-cert", "c", "--tls-key", "k"])
    assert (a.tls_ca, a.tls_cert, a.tls_key, a.stack_dir) == ("ca.pem", "c", "k", ".stack")
    for argv in (["--dir", "D", "status"], ["status", "--dir", "D"]):
        assert stack.build_parser().parse_args(argv).dir == "D"
    r = cfrseg("client", "--stack-dir", "/nonexistent-stack", "list", timeout=60)
    assert "no gateway address/token" in r.stderr and "unrecognized arguments" not in r.stderr

"""`appliance run | check-config | ca init|show|export | pac | users ... | version`: the command line.

`users add | remove | list` (the proxy-auth users file) live in `users_cli.py`.

`check-config` prints `FILE:LINE: key: what is wrong` for every problem and exits 1, like
`nginx -t`; `run` refuses to start on the same errors.

`ca init` creates the CA ahead of the first start (so its fingerprint can be rolled out first),
`ca show` says which CA clients must trust, and `ca export` prints it for them; `ca` failures
exit 1 with `appliance: CA: FILE: what is wrong`. Only `init` and `export` ever create a CA,
never `show`: looking must not mint a new root that nobody has trusted yet.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from datetime import datetime, timezone

from . import __version__, users_cli

DEFAULT_CONFIG = os.environ.get("APPLIANCE_CONFIG", "appliance.toml")


def _load(path: str):
    from .config import ConfigErrors, load
    try:
        return load(path)
    except ConfigErrors as exc:
        print(exc, file=sys.stderr)
        return None


def _with_config(command):
    """Load `--config` before `command` runs; a config with errors is printed and exits 1."""
    @functools.wraps(command)
    def run(args) -> int:
        config = _load(args.config)
        return 1 if config is None else command(args, config)
    return run


@_with_config
def cmd_check_config(args, config) -> int:
    print(f"{args.config}: ok")
    return 0


@_with_config
def cmd_run(args, config) -> int:
    """One process serves; with `[appliance] workers` > 1 this one supervises that many workers
    (`supervisor.py`), each of which runs this again, told by its environment that it is one."""
    from .supervisor import Supervisor, WorkerSettings, attend
    worker = WorkerSettings.from_environ(os.environ)
    supervising = worker is None and config.appliance.workers > 1
    whose = "" if worker is None and not supervising else "[%(process)d]"   # they share stderr
    level = getattr(logging, config.log.level.upper())
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s{whose}: %(message)s")
    for chatty in ("hpack", "h2"):          # per-frame debug lines would drown ours
        logging.getLogger(chatty).setLevel(max(level, logging.INFO))
    from certs import CAError
    try:
        os.makedirs(config.appliance.state_dir, exist_ok=True)
        if supervising:
            return Supervisor(config, args.config).run()
        from .server import ApplianceServer
        if worker is None:
            server = ApplianceServer(config)
        else:
            server = ApplianceServer(config, worker.index, worker.status_dir)
            attend(server, worker)
        server.serve_forever()
    except (OSError, CAError) as exc:
        logging.getLogger("appliance").error("cannot start: %s", exc)
        return 1
    return 0


def _ca_error(exc: Exception) -> int:
    print(f"appliance: CA: {exc}", file=sys.stderr)
    return 1


@_with_config
def cmd_ca_init(args, config) -> int:
    """Create the CA under state_dir with `[ca] key_type`; an existing CA is left as it is."""
    from certs.authority import CAError, CertificateAuthority, describe_key, key_type_of
    state_dir, now = config.appliance.state_dir, datetime.now(timezone.utc)
    try:
        if CertificateAuthority.exists(state_dir):
            ca = CertificateAuthority.load(state_dir, now)  # reads only: a broken CA is an error
            note = ""
            if key_type_of(ca.key) != config.ca.key_type:
                note = (f" (config asks for key_type {config.ca.key_type!r}; "
                        f"the existing CA is kept)")
            print(f"CA exists already, left unchanged: {ca.cert_path}{note}")
        else:
            ca = CertificateAuthority.create(state_dir, now, key_type=config.ca.key_type)
            print(f"created CA {ca.cert_path} ({describe_key(ca.key)})")
    except (CAError, OSError, ValueError) as exc:
        return _ca_error(exc)
    print(f"SHA-256 fingerprint: {ca.fingerprint_sha256()}")
    return 0


@_with_config
def cmd_ca_show(args, config) -> int:
    """Describe the CA; exit 1 when there is none yet (showing never creates one)."""
    from certs.authority import CAError, CertificateAuthority, describe_key, validity_utc
    state_dir = config.appliance.state_dir
    try:
        if not CertificateAuthority.exists(state_dir):
            cert_path, _ = CertificateAuthority.paths(state_dir)
            return _ca_error(f"{cert_path.parent}: no CA yet; create it with "
                             f"`appliance ca init --config {args.config}`")
        ca = CertificateAuthority.load(state_dir, datetime.now(timezone.utc))
    except (CAError, OSError) as exc:
        return _ca_error(exc)
    not_before, not_after = validity_utc(ca.cert)
    for label, value in (("subject", ca.cert.subject.rfc4514_string()),
                         ("SHA-256 fingerprint", ca.fingerprint_sha256()),
                         ("not before", f"{not_before:%Y-%m-%d %H:%M:%S} UTC"),
                         ("not after", f"{not_after:%Y-%m-%d %H:%M:%S} UTC"),
                         ("key", describe_key(ca.key)),
                         ("certificate", ca.cert_path),
                         ("private key", ca.key_path)):
        print(f"{label + ':':21}{value}")
    return 0


@_with_config
def cmd_ca_export(args, config) -> int:
    """Print the appliance CA certificate (PEM, or DER with --der), creating the CA if this is
    its first use (with `[ca] key_type`)."""
    from certs.authority import CAError, CertificateAuthority
    try:
        ca = CertificateAuthority.load_or_create(config.appliance.state_dir,
                                                 datetime.now(timezone.utc),
                                                 key_type=config.ca.key_type)
    except (CAError, OSError) as exc:
        return _ca_error(exc)
    if args.der:
        sys.stdout.flush()
        sys.stdout.buffer.write(ca.cert_der())
        sys.stdout.buffer.flush()
    else:
        sys.stdout.write(ca.cert_pem().decode())
    return 0


@_with_config
def cmd_pac(args, config) -> int:
    """Print the PAC file the pac listener serves for this config."""
    from pac.render import render_pac
    sys.stdout.write(render_pac(config, __version__))
    return 0


def cmd_version(args) -> int:
    print(f"appliance {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="Forward-proxy appliance")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("run", cmd_run, "serve until SIGTERM"),
                             ("check-config", cmd_check_config, "validate the config and exit"),
                             ("pac", cmd_pac, "print the PAC file served at /proxy.pac and /wpad.dat"),
                             ("version", cmd_version, "print the version")):
        p = sub.add_parser(name, help=text)
        p.set_defaults(func=func)
        if name != "version":
            _config_option(p)
    ca = sub.add_parser("ca", help="the appliance CA").add_subparsers(dest="ca_command", required=True)
    for name, func, text in (
            ("init", cmd_ca_init, "create the CA under state_dir ([ca] key_type) unless it exists"),
            ("show", cmd_ca_show, "describe the CA: subject, fingerprint, validity, key, files"),
            ("export", cmd_ca_export, "print the CA certificate for clients to trust")):
        p = ca.add_parser(name, help=text)
        p.set_defaults(func=func)
        _config_option(p)
        if name == "export":
            p.add_argument("--der", action="store_true",
                           help="write DER bytes instead of PEM text (for /ca.der-style installs)")
    users_cli.add_parser(sub, _config_option)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                        help=f"config file (default: {DEFAULT_CONFIG})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

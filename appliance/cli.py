"""`appliance run | check-config | ca export | users ... | version`: the admins' command line.

`users add | remove | list` (the proxy-auth users file) live in `users_cli.py`.

`check-config` prints `FILE:LINE: key: what is wrong` for every problem and exits 1, like
`nginx -t`; `run` refuses to start on the same errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__, users_cli

DEFAULT_CONFIG = os.environ.get("APPLIANCE_CONFIG", "appliance.toml")


def _load(path: str):
    from .config import ConfigErrors, load
    try:
        return load(path)
    except ConfigErrors as exc:
        print(exc, file=sys.stderr)
        return None


def cmd_check_config(args) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    print(f"{args.config}: ok")
    return 0


def cmd_run(args) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    level = getattr(logging, config.log.level.upper())
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("hpack", "h2"):          # per-frame debug lines would drown ours
        logging.getLogger(chatty).setLevel(max(level, logging.INFO))
    from .server import ApplianceServer
    try:
        os.makedirs(config.appliance.state_dir, exist_ok=True)
        server = ApplianceServer(config)
        server.serve_forever()
    except OSError as exc:
        logging.getLogger("appliance").error("cannot start: %s", exc)
        return 1
    return 0


def cmd_ca_export(args) -> int:
    """Print the appliance CA certificate (PEM), creating the CA if this is its first use."""
    config = _load(args.config)
    if config is None:
        return 1
    from datetime import datetime, timezone

    from certs.authority import CAError, CertificateAuthority
    try:
        ca = CertificateAuthority.load_or_create(config.appliance.state_dir, datetime.now(timezone.utc))
    except (CAError, OSError) as exc:
        print(f"appliance: CA: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(ca.cert_pem().decode())
    return 0


def cmd_version(args) -> int:
    print(f"appliance {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="Forward-proxy appliance")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("run", cmd_run, "serve until SIGTERM"),
                             ("check-config", cmd_check_config, "validate the config and exit"),
                             ("version", cmd_version, "print the version")):
        p = sub.add_parser(name, help=text)
        p.set_defaults(func=func)
        if name != "version":
            _config_option(p)
    ca = sub.add_parser("ca", help="the appliance CA").add_subparsers(dest="ca_command", required=True)
    export = ca.add_parser("export", help="print the CA certificate (PEM) for clients to trust")
    export.set_defaults(func=cmd_ca_export)
    _config_option(export)
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

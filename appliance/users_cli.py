"""`appliance users add | remove | list`: keeps the proxy-auth users file (see `auth.py`).

Not on the data path: an admin's tool. The running appliance re-reads the file when its mtime
changes, so every write replaces the file in one step (temp file in the same folder, then
`os.replace`): a reader sees the old file or the new one, never half of one. The format and the
scrypt hashing are `protocols/proxy_auth.py`; the salt is drawn here, because the sans-I/O core
takes no randomness.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import stat
import sys
import tempfile
from pathlib import Path

from .protocols.proxy_auth import format_users, hash_password, parse_users, valid_user_name

NEW_FILE_MODE = 0o640          # owner writes, the proxy's group reads, nobody else sees hashes


class UsersError(Exception):
    """Anything that stops a users command; the message is printed and the exit status is 1."""


def add_parser(sub: argparse._SubParsersAction, config_option) -> None:
    """Registers `users add|remove|list` under the `appliance` parser's subcommands."""
    users = sub.add_parser("users", help="the proxy-auth users file ([auth] users_file)")
    commands = users.add_subparsers(dest="users_command", required=True)
    add = commands.add_parser("add", help="add a user, or replace the password of an existing one")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input (for scripts)")
    remove = commands.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    listing = commands.add_parser("list", help="print the user names, one a line")
    for parser, func in ((add, cmd_add), (remove, cmd_remove), (listing, cmd_list)):
        parser.set_defaults(func=func)
        which = parser.add_mutually_exclusive_group()
        config_option(which)
        which.add_argument("--users-file", metavar="FILE",
                           help="the users file to edit (default: [auth] users_file of the config)")


def cmd_add(args) -> int:
    def change(path: Path, users: dict[str, str]) -> str:
        password = _read_password(args.name, args.password_stdin)
        existed = args.name in users
        users[args.name] = hash_password(password, os.urandom(16))
        if existed:
            return f"replaced the password of user {args.name!r} in {path}"
        return f"added user {args.name!r} to {path}"
    return _edit(args, change)


def cmd_remove(args) -> int:
    def change(path: Path, users: dict[str, str]) -> str:
        if users.pop(args.name, None) is None:
            raise UsersError(f"{path}: no user {args.name!r}")
        return f"removed user {args.name!r} from {path}"
    return _edit(args, change)


def cmd_list(args) -> int:
    try:
        users = _read_users(_users_file(args))
    except UsersError as exc:
        return _fail(exc)
    for name in sorted(users):
        print(name)
    return 0


def _edit(args, change) -> int:
    """Read the file, let `change` edit the dict (and say what it did), write the file back."""
    try:
        if not valid_user_name(args.name):
            raise UsersError(f"invalid user name {args.name!r}: use 1 to 64 of A-Z a-z 0-9 . _ @ + -")
        path = _users_file(args)
        users = _read_users(path)
        message = change(path, users)
        write_atomically(path, format_users(users))
    except UsersError as exc:
        return _fail(exc)
    print(message)
    return 0


def _fail(exc: UsersError) -> int:
    print(f"appliance: users: {exc}", file=sys.stderr)
    return 1


def _users_file(args) -> Path:
    """`--users-file` as given (relative to the current folder), else the config's [auth] users_file."""
    if args.users_file:
        return Path(args.users_file)
    from .config import ConfigErrors, load
    try:
        config = load(args.config)
    except ConfigErrors as exc:
        raise UsersError(f"cannot read the config:\n{exc}") from None
    if config.auth.users_file is None:
        raise UsersError(f"{args.config}: [auth] users_file is not set; "
                         "set it there, or name the file with --users-file FILE")
    return config.auth.users_file


def _read_users(path: Path) -> dict[str, str]:
    """The users in `path`; a missing file has none. A damaged file is an error, never overwritten."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return parse_users(text)
    except ValueError as exc:
        raise UsersError(f"{path}: {exc}") from None


def _read_password(name: str, from_stdin: bool) -> str:
    if from_stdin:
        raw = sys.stdin.buffer.readline().rstrip(b"\r\n")
        try:
            password = raw.decode("utf-8")   # what Basic credentials decode as (charset="UTF-8")
        except UnicodeDecodeError:
            raise UsersError("the password on standard input is not UTF-8") from None
    else:
        password = _prompt_password(name)
    if not password:
        raise UsersError("empty password refused")
    try:
        password.encode("utf-8")             # a terminal in another encoding yields surrogates
    except UnicodeEncodeError:
        raise UsersError("the password is not valid UTF-8 text") from None
    return password


def _prompt_password(name: str) -> str:
    try:
        password = getpass.getpass(f"Password for {name}: ")
        again = getpass.getpass("Repeat the password: ")
    except EOFError:
        raise UsersError("no password given (use --password-stdin in scripts)") from None
    if password != again:
        raise UsersError("the passwords do not match")
    return password


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step, keeping its mode and owner (new files: 0640).

    The owner and group matter: when root edits a `root:proxy 0640` file, a fresh temp file
    would be `root:root`, and the proxy could no longer read its users.
    """
    target = Path(os.path.realpath(path))          # edit the file a symlink points to, keep the link
    try:
        old = os.stat(target)
    except FileNotFoundError:
        old = None
    except OSError as exc:
        raise UsersError(f"{path}: {exc.strerror}") from None
    try:
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise UsersError(f"{path}: cannot write in {target.parent}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            _copy_metadata(file.fileno(), old, path)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise UsersError(f"{path}: cannot write: {exc.strerror or exc}") from None
        raise
    _sync_folder(target.parent)


def _copy_metadata(fd: int, old: os.stat_result | None, path: Path) -> None:
    os.fchmod(fd, NEW_FILE_MODE if old is None else stat.S_IMODE(old.st_mode))
    if old is None:
        return
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        print(f"appliance: users: warning: {path} is now owned by you, no longer by uid "
              f"{old.st_uid} gid {old.st_gid}; check the proxy can still read it", file=sys.stderr)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable; best effort (some file systems refuse fsync on folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""`appliance users add | remove | list`, run as admins run it: `python -m appliance` in a child
process, against a config in a temporary folder. The prompt (getpass) is checked in-process.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import cli
from appliance.protocols.proxy_auth import SCRYPT_N, hash_password, parse_users, verify_password

REPO = Path(__file__).resolve().parents[1]


def appliance(*args: str, stdin: str | bytes | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("APPLIANCE_CONFIG", None)
    data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
    done = subprocess.run([sys.executable, "-m", "appliance", *args], cwd=REPO, env=env,
                          input=data if data is not None else b"", capture_output=True, timeout=60)
    done.stdout, done.stderr = done.stdout.decode(), done.stderr.decode()
    return done


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text('[auth]\nusers_file = "users"     # relative: beside this file\nrealm = "test"\n')
    return path


def users_of(config: Path) -> dict[str, str]:
    return parse_users((config.parent / "users").read_text())


def add(config: Path, name: str, password: str) -> subprocess.CompletedProcess:
    return appliance("users", "add", name, "--password-stdin", "--config", str(config),
                     stdin=password + "\n")


def test_add_creates_the_file_beside_the_config(config):
    done = add(config, "alice", "s3cret")
    assert done.returncode == 0, done.stderr
    assert "added user 'alice'" in done.stdout
    users = users_of(config)
    assert list(users) == ["alice"]
    assert users["alice"].startswith(f"scrypt${SCRYPT_N}$")     # the default cost, not a test one
    assert verify_password("s3cret", users["alice"])
    assert not verify_password("s3cret ", users["alice"])


def test_new_file_mode_is_0640(config):
    old = os.umask(0o077)                # the mode is set explicitly, not left to the umask
    try:
        assert add(config, "alice", "pw").returncode == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((config.parent / "users").stat().st_mode) == 0o640


def test_salts_differ(config):
    add(config, "alice", "same")
    add(config, "bob", "same")
    users = users_of(config)
    assert users["alice"].split("$")[4] != users["bob"].split("$")[4]


def test_password_stdin_reads_only_the_first_line_verbatim(config):
    done = appliance("users", "add", "alice", "--password-stdin", "-c", str(config),
                     stdin=" pä:ss wörd \r\nsecond line\n")
    assert done.returncode == 0, done.stderr
    stored = users_of(config)["alice"]
    assert verify_password(" pä:ss wörd ", stored)
    assert not verify_password("second line", stored)


def test_password_stdin_without_final_newline(config):
    done = appliance("users", "add", "alice", "--password-stdin", "-c", str(config), stdin="pw")
    assert done.returncode == 0, done.stderr
    assert verify_password("pw", users_of(config)["alice"])


def test_list_prints_one_name_per_line_sorted(config):
    for name in ("carol", "alice", "bob"):
        assert add(config, name, f"pw-{name}").returncode == 0
    done = appliance("users", "list", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "alice\nbob\ncarol\n"


def test_list_without_a_file_is_empty(config):
    done = appliance("users", "list", "--config", str(config))
    assert (done.returncode, done.stdout) == (0, "")
    assert not (config.parent / "users").exists()


def test_add_existing_user_replaces_the_password_and_keeps_the_mode(config):
    add(config, "alice", "old")
    add(config, "bob", "bobs")
    users_file = config.parent / "users"
    users_file.chmod(0o600)
    bob_before = users_of(config)["bob"]
    done = add(config, "alice", "new")
    assert done.returncode == 0, done.stderr
    assert "replaced the password of user 'alice'" in done.stdout
    users = users_of(config)
    assert sorted(users) == ["alice", "bob"]
    assert verify_password("new", users["alice"])
    assert not verify_password("old", users["alice"])
    assert users["bob"] == bob_before
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600


def test_remove(config):
    add(config, "alice", "a")
    add(config, "bob", "b")
    done = appliance("users", "remove", "alice", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "removed user 'alice'" in done.stdout
    assert list(users_of(config)) == ["bob"]
    assert appliance("users", "list", "-c", str(config)).stdout == "bob\n"


def test_remove_unknown_user_fails_and_leaves_the_file(config):
    add(config, "alice", "a")
    before = (config.parent / "users").read_bytes()
    done = appliance("users", "remove", "mallory", "--config", str(config))
    assert done.returncode == 1
    assert "no user 'mallory'" in done.stderr
    assert (config.parent / "users").read_bytes() == before


def test_remove_without_a_file_fails_and_creates_none(config):
    done = appliance("users", "remove", "alice", "--config", str(config))
    assert done.returncode == 1
    assert "no user 'alice'" in done.stderr
    assert not (config.parent / "users").exists()


@pytest.mark.parametrize("name", ["al ice", "al:ice", "jürgen", "x" * 65, "a/b", "#alice"])
def test_invalid_name_refused(config, name):
    done = add(config, name, "pw")
    assert done.returncode == 1
    assert "invalid user name" in done.stderr
    assert not (config.parent / "users").exists()


def test_invalid_name_refused_by_remove(config):
    done = appliance("users", "remove", "al ice", "-c", str(config))
    assert done.returncode == 1
    assert "invalid user name" in done.stderr


@pytest.mark.parametrize("stdin", ["\n", "", "\r\n"], ids=["newline", "eof", "crlf"])
def test_empty_password_refused(config, stdin):
    done = appliance("users", "add", "alice", "--password-stdin", "-c", str(config), stdin=stdin)
    assert done.returncode == 1
    assert "empty password" in done.stderr
    assert not (config.parent / "users").exists()


def test_password_stdin_must_be_utf8(config):
    done = appliance("users", "add", "alice", "--password-stdin", "-c", str(config), stdin=b"p\xffw\n")
    assert done.returncode == 1
    assert "UTF-8" in done.stderr


@pytest.mark.parametrize("command", [["add", "alice", "--password-stdin"], ["remove", "alice"], ["list"]])
def test_no_users_file_configured(tmp_path, command):
    config = tmp_path / "appliance.toml"
    config.write_text('[auth]\nusers_file = ""\n')
    done = appliance("users", *command, "--config", str(config), stdin="pw\n")
    assert done.returncode == 1
    assert "users_file is not set" in done.stderr
    assert "--users-file" in done.stderr
    assert str(config) in done.stderr


def test_config_errors_reported(tmp_path):
    config = tmp_path / "appliance.toml"
    config.write_text('[auth]\nusers_file = 3\n')
    done = appliance("users", "list", "--config", str(config))
    assert done.returncode == 1
    assert f"{config}:2: auth.users_file" in done.stderr


def test_users_file_option_needs_no_config(tmp_path):
    users_file = tmp_path / "other-users"
    done = appliance("users", "add", "alice", "--password-stdin", "--users-file", str(users_file),
                     stdin="pw\n")
    assert done.returncode == 0, done.stderr
    assert verify_password("pw", parse_users(users_file.read_text())["alice"])
    assert appliance("users", "list", "--users-file", str(users_file)).stdout == "alice\n"


def test_users_file_and_config_are_exclusive(config, tmp_path):
    done = appliance("users", "list", "--config", str(config), "--users-file", str(tmp_path / "u"))
    assert done.returncode == 2
    assert "not allowed with" in done.stderr


def test_damaged_file_is_reported_and_not_overwritten(config):
    users_file = config.parent / "users"
    damaged = f"alice:{hash_password('pw', b'0123456789abcdef', n=2 ** 10)}\nthis is not a user line\n"
    users_file.write_text(damaged)
    done = add(config, "bob", "pw")
    assert done.returncode == 1
    assert "line 2" in done.stderr and str(users_file) in done.stderr
    assert users_file.read_text() == damaged


def test_comments_are_not_kept_but_users_are(config):
    # format_users writes only users; the file is the tool's, as the config comment says.
    users_file = config.parent / "users"
    add(config, "alice", "a")
    users_file.write_text("# hand-written note\n" + users_file.read_text())
    assert add(config, "bob", "b").returncode == 0
    assert sorted(users_of(config)) == ["alice", "bob"]


def test_no_temporary_files_left_behind(config):
    add(config, "alice", "a")
    add(config, "alice", "b")
    appliance("users", "remove", "nobody", "-c", str(config))
    appliance("users", "remove", "alice", "-c", str(config))
    assert sorted(p.name for p in config.parent.iterdir()) == ["appliance.toml", "users"]


def test_symlinked_users_file_stays_a_symlink(config, tmp_path):
    real = tmp_path / "real-users"
    (config.parent / "users").symlink_to(real)
    assert add(config, "alice", "pw").returncode == 0
    assert (config.parent / "users").is_symlink()
    assert "alice" in parse_users(real.read_text())


def test_missing_folder_reported(tmp_path):
    done = appliance("users", "add", "alice", "--password-stdin",
                     "--users-file", str(tmp_path / "no" / "such" / "users"), stdin="pw\n")
    assert done.returncode == 1
    assert "cannot write" in done.stderr


# --- the prompt (no --password-stdin), in-process ------------------------------------------------

def prompting(monkeypatch, *answers: str) -> list[str]:
    prompts: list[str] = []
    replies = iter(answers)

    def fake_getpass(prompt: str = "Password: ") -> str:
        prompts.append(prompt)
        return next(replies)
    monkeypatch.setattr("getpass.getpass", fake_getpass)
    return prompts


def test_prompt_asks_twice(monkeypatch, config, capsys):
    prompts = prompting(monkeypatch, "hunter2", "hunter2")
    assert cli.main(["users", "add", "alice", "--config", str(config)]) == 0
    assert len(prompts) == 2 and "alice" in prompts[0]
    assert verify_password("hunter2", users_of(config)["alice"])


def test_prompt_mismatch_refused(monkeypatch, config, capsys):
    prompting(monkeypatch, "hunter2", "hunter3")
    assert cli.main(["users", "add", "alice", "--config", str(config)]) == 1
    assert "do not match" in capsys.readouterr().err
    assert not (config.parent / "users").exists()


def test_prompt_empty_refused(monkeypatch, config, capsys):
    prompting(monkeypatch, "", "")
    assert cli.main(["users", "add", "alice", "--config", str(config)]) == 1
    assert "empty password" in capsys.readouterr().err


def test_prompt_at_eof_refused(monkeypatch, config, capsys):
    def eof(prompt: str = "") -> str:
        raise EOFError
    monkeypatch.setattr("getpass.getpass", eof)
    assert cli.main(["users", "add", "alice", "--config", str(config)]) == 1
    assert "--password-stdin" in capsys.readouterr().err


def test_invalid_name_refused_before_prompting(monkeypatch, config):
    prompts = prompting(monkeypatch)
    assert cli.main(["users", "add", "bad name", "--config", str(config)]) == 1
    assert prompts == []


# --- the other commands still work beside `users` ----------------------------------------------------

def test_version_and_check_config_unchanged(config):
    done = appliance("version")
    assert done.returncode == 0 and done.stdout.startswith("appliance ")
    done = appliance("check-config", "--config", str(config))
    assert (done.returncode, done.stdout) == (0, f"{config}: ok\n")


def test_help_lists_users():
    done = appliance("--help")
    assert done.returncode == 0
    for command in ("run", "check-config", "ca", "users", "version"):
        assert command in done.stdout

"""RFC 7617 (Basic) and RFC 9110 §11.7 (Proxy-Authorization, Proxy-Authenticate) checks of
`appliance.protocols.proxy_auth`, plus its scrypt hash strings and users-file format.
"""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.protocols.proxy_auth import (
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    Credentials,
    basic_credentials,
    challenge,
    format_users,
    hash_password,
    parse_users,
    valid_user_name,
    verify_password,
)

SMALL_N = 2 ** 10                  # fast enough for many cases; the defaults get one test of their own
SALT = bytes(range(16))


def basic(raw: bytes, scheme: str = "Basic", field: str = "Proxy-Authorization") -> tuple:
    return ((field, f"{scheme} {base64.b64encode(raw).decode('ascii')}"),)


def small_hash(password: str, salt: bytes = SALT) -> str:
    return hash_password(password, salt, n=SMALL_N)


# --- Proxy-Authorization: Basic (RFC 7617 §2) -------------------------------------------------

def test_basic_credentials_decoded():
    assert basic_credentials(basic(b"alice:secret")) == Credentials("alice", "secret")


@pytest.mark.parametrize("scheme", ["basic", "BASIC", "bAsIc"])
def test_scheme_name_is_case_insensitive(scheme):
    # RFC 9110 §11.1: auth-scheme is case-insensitive.
    assert basic_credentials(basic(b"alice:secret", scheme)) == Credentials("alice", "secret")


def test_field_name_is_case_insensitive_and_surrounding_space_ignored():
    token = base64.b64encode(b"alice:secret").decode()
    headers = (("proxy-authorization", f"  Basic   {token}  "),)
    assert basic_credentials(headers) == Credentials("alice", "secret")


def test_password_may_hold_colons_and_utf8():
    # RFC 7617 §2: the user-id cannot contain a colon, the password can; charset="UTF-8" (§2.1).
    raw = "bob:pä:ss:wörd:".encode("utf-8")
    assert basic_credentials(basic(raw)) == Credentials("bob", "pä:ss:wörd:")


def test_utf8_user_name_decoded():
    assert basic_credentials(basic("jürgen:x".encode("utf-8"))) == Credentials("jürgen", "x")


def test_empty_password_is_still_credentials():
    # Refusing it is the users file's business (no user has an empty password), not the parser's.
    assert basic_credentials(basic(b"alice:")) == Credentials("alice", "")


@pytest.mark.parametrize("headers", [
    (),
    (("Proxy-Authorization", ""),),
    (("Proxy-Authorization", "Basic"),),
    (("Proxy-Authorization", "Basic "),),
], ids=["absent", "empty", "scheme-only", "scheme-and-space"])
def test_absent_or_empty_credentials(headers):
    assert basic_credentials(headers) is None


@pytest.mark.parametrize("token", [
    "!!!!", "YWxpY2U6c2VjcmV", "YWxp Y2U6c2VjcmV0", "YWxpY2U6c2VjcmV0\x00", "YWxpY2U6c2VjcmV0LQ=",
    "Zm9v=YmFy", "YWxpY2U6c2VjcmV0-_", "YWxpY2U6c2VjcmV0.",
], ids=["punctuation", "unpadded", "inner-space", "nul", "short-pad", "pad-inside", "urlsafe", "dot"])
def test_bad_base64_refused(token):
    assert basic_credentials((("Proxy-Authorization", f"Basic {token}"),)) is None


def test_missing_colon_refused():
    assert basic_credentials(basic(b"alicesecret")) is None


def test_empty_user_refused():
    assert basic_credentials(basic(b":secret")) is None


def test_invalid_utf8_refused():
    assert basic_credentials(basic(b"alice:\xff\xfe")) is None


@pytest.mark.parametrize("value", [
    "Bearer YWxpY2U6c2VjcmV0",
    'Digest username="alice", realm="x", nonce="n", uri="/", response="r"',
    "Negotiate YWxpY2U6c2VjcmV0",
    "BasicYWxpY2U6c2VjcmV0",
])
def test_other_schemes_refused(value):
    assert basic_credentials((("Proxy-Authorization", value),)) is None


def test_origin_authorization_field_is_not_proxy_credentials():
    # RFC 9110 §11.6.2 vs §11.7.2: Authorization is for the origin; a proxy must not consume it.
    assert basic_credentials(basic(b"alice:secret", field="Authorization")) is None


def test_first_proxy_authorization_field_counts():
    headers = basic(b"alice:one") + basic(b"bob:two")
    assert basic_credentials(headers) == Credentials("alice", "one")


@given(user=st.text(min_size=1).filter(lambda s: ":" not in s), password=st.text())
def test_any_utf8_credentials_round_trip(user, password):
    raw = f"{user}:{password}".encode("utf-8", "surrogatepass")
    expected = Credentials(user, password)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        expected = None                        # lone surrogates are not UTF-8
    assert basic_credentials(basic(raw)) == expected


@given(st.text())
@settings(max_examples=300)
def test_arbitrary_field_values_never_raise(value):
    result = basic_credentials((("Proxy-Authorization", value),))
    assert result is None or (result.user and ":" not in result.user)


# --- Proxy-Authenticate challenge (RFC 7617 §2, §2.1; RFC 9110 §5.6.4 quoting) ----------------

def test_challenge_field():
    assert challenge("appliance") == ("Proxy-Authenticate", 'Basic realm="appliance", charset="UTF-8"')


def test_challenge_quotes_dquote_and_backslash():
    name, value = challenge('say "hi" \\ bye')
    assert name == "Proxy-Authenticate"
    assert value == 'Basic realm="say \\"hi\\" \\\\ bye", charset="UTF-8"'


def _unquote(quoted: str) -> str:
    """RFC 9110 §5.6.4: quoted-string with quoted-pair."""
    assert quoted[0] == quoted[-1] == '"'
    return re.sub(r"\\(.)", r"\1", quoted[1:-1])


@given(st.text(alphabet=st.characters(min_codepoint=0x20, blacklist_characters="\x7f")))
def test_challenge_realm_survives_quoting(realm):
    _, value = challenge(realm)
    match = re.fullmatch(r'Basic realm=("(?:[^"\\]|\\.)*"), charset="UTF-8"', value)
    assert match, value
    assert _unquote(match.group(1)) == realm


# --- scrypt hash strings -----------------------------------------------------------------------

def test_hash_format():
    stored = small_hash("secret")
    kind, n, r, p, salt, digest = stored.split("$")
    assert (kind, int(n), int(r), int(p)) == ("scrypt", SMALL_N, SCRYPT_R, SCRYPT_P)
    assert base64.b64decode(salt, validate=True) == SALT
    assert len(base64.b64decode(digest, validate=True)) == 32


def test_hash_is_deterministic_for_a_salt_and_differs_across_salts():
    assert small_hash("secret") == small_hash("secret")
    assert small_hash("secret") != small_hash("secret", salt=b"\x01" * 16)


def test_round_trip_small_parameters():
    stored = small_hash("correct horse")
    assert verify_password("correct horse", stored)
    assert not verify_password("correct horsE", stored)
    assert not verify_password("", stored)


def test_round_trip_default_parameters():
    stored = hash_password("s3cret:with:colons", SALT)
    assert stored.startswith(f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}$")
    assert verify_password("s3cret:with:colons", stored)
    assert not verify_password("s3cret:with:colon", stored)


def test_round_trip_utf8_password():
    stored = small_hash("pässwörd ☃")
    assert verify_password("pässwörd ☃", stored)
    assert not verify_password("passwort ☃", stored)


def test_wrong_password_rejected():
    assert not verify_password("wrong", small_hash("right"))


def _tampered() -> list[str]:
    kind, n, r, p, salt, digest = small_hash("pw").split("$")
    other_salt = base64.b64encode(b"\x01" * 16).decode()
    return [
        f"scrypt${n}${r}${p}${other_salt}${digest}",        # salt changed
        f"scrypt${n}${r}${p}${salt}${digest[:-4]}AAA=",     # digest changed
        f"scrypt$2048${r}${p}${salt}${digest}",             # cost changed
    ]


@pytest.mark.parametrize("stored", _tampered(), ids=["salt", "digest", "cost"])
def test_tampered_hash_rejected(stored):
    assert not verify_password("pw", stored)


_N, _R, _P, _SALT, _DIGEST = small_hash("pw").split("$")[1:]


@pytest.mark.parametrize("stored", [
    "",
    "pw",
    "garbage",
    "scrypt$",
    "scrypt$x$y$z$a$b",
    f"scrypt${_N}${_R}${_P}${_SALT}",                    # a field short
    f"scrypt${_N}${_R}${_P}${_SALT}${_DIGEST}$extra",     # a field too many
    f"scrypt${_N}${_R}${_P}$!!!!${_DIGEST}",             # salt not base64
    f"scrypt${_N}${_R}${_P}${_SALT}$!!!!",               # digest not base64
    f"scrypt${_N}${_R}${_P}${_SALT}$",                    # empty digest must not match everything
    f"scrypt$1000${_R}${_P}${_SALT}${_DIGEST}",          # N not a power of two
    f"scrypt$0${_R}${_P}${_SALT}${_DIGEST}",
    f"scrypt${_N}$0${_P}${_SALT}${_DIGEST}",
    f"scrypt${_N}${_R}$0${_SALT}${_DIGEST}",
    f"scrypt${2 ** 40}${_R}${_P}${_SALT}${_DIGEST}",     # over the memory bound: refused, not run
    f"scrypt${_N}${_R}${_P}${_SALT}$é",
], ids=lambda s: s[:24] or "empty")
def test_garbage_hash_rejected(stored):
    assert verify_password("pw", stored) is False


def test_negative_cost_rejected():
    assert verify_password("pw", f"scrypt$-1024${_R}${_P}${_SALT}${_DIGEST}") is False


@pytest.mark.parametrize("stored", [
    "$2b$12$KIXQJQ8yqD7QO2Sx1f5Rwe7n0s1u0r1qkPl3cQ9l8vVr0Wz5YQK9W",         # bcrypt
    "$6$rounds=5000$salt$" + "x" * 86,                                       # sha512-crypt
    "pbkdf2_sha256$600000$salt$" + "A" * 44,
    f"SCRYPT${_N}${_R}${_P}${_SALT}${_DIGEST}",                             # kind is case-sensitive
    f"argon2${_N}${_R}${_P}${_SALT}${_DIGEST}",                             # right shape, wrong kind
    "pw",                                                                   # plain text
], ids=["bcrypt", "sha512-crypt", "pbkdf2", "upper-kind", "other-kind", "plain"])
def test_non_scrypt_hash_rejected(stored):
    assert verify_password("pw", stored) is False


# --- user names and the users file --------------------------------------------------------------

@pytest.mark.parametrize("name", ["alice", "a", "bob.smith", "first_last", "ops+proxy", "me@example.com",
                                  "A-Z.0-9", "x" * 64])
def test_valid_user_names(name):
    assert valid_user_name(name)


@pytest.mark.parametrize("name", ["", "x" * 65, "al ice", "al:ice", "jürgen", "a/b", "#alice", "a\nb",
                                  "alice\n", "tab\t"])
def test_invalid_user_names(name):
    assert not valid_user_name(name)


def test_parse_users_skips_blank_lines_and_comments():
    one, two = small_hash("1"), small_hash("2", salt=b"\x02" * 16)
    text = f"# users of the appliance\n\nalice:{one}\n   \n  # bob below\r\nbob:{two}\r\n"
    assert parse_users(text) == {"alice": one, "bob": two}


def test_parse_users_empty():
    assert parse_users("") == {}
    assert parse_users("# nobody yet\n") == {}


@pytest.mark.parametrize("bad_line", [
    "alice",                          # no colon
    "alice:",                         # no hash
    "alice:secret",                   # plain password, not a hash
    "alice:$2b$12$abc",               # another hash kind
    "al ice:scrypt$1$1$1$a$b",        # invalid name
    ":scrypt$1$1$1$a$b",              # empty name
], ids=["no-colon", "no-hash", "plain", "bcrypt", "bad-name", "empty-name"])
def test_parse_users_error_names_the_line(bad_line):
    text = f"# header\n\nalice2:{small_hash('x')}\n{bad_line}\n"
    with pytest.raises(ValueError, match=r"^line 4: "):
        parse_users(text)


def test_parse_users_duplicate_names_the_second_line_and_the_user():
    text = f"alice:{small_hash('1')}\nbob:{small_hash('2')}\nalice:{small_hash('3')}\n"
    with pytest.raises(ValueError, match=r"^line 3: .*'alice'"):
        parse_users(text)


def test_format_users_sorted_one_line_each():
    users = {"bob": "scrypt$b", "alice": "scrypt$a"}
    assert format_users(users) == "alice:scrypt$a\nbob:scrypt$b\n"
    assert format_users({}) == ""


def test_format_parse_round_trip_with_real_hashes():
    users = {"alice": small_hash("1"), "bob": small_hash("2", salt=b"\x02" * 16)}
    assert parse_users(format_users(users)) == users


_names = st.from_regex(r"[A-Za-z0-9._@+-]{1,64}", fullmatch=True)
# Well-formed stored hashes (the shape parse_users accepts): real costs, base64 salt and digest.
_stored = st.builds(
    lambda n, r, p, salt, digest: "scrypt${}${}${}${}${}".format(
        n, r, p, base64.b64encode(salt).decode(), base64.b64encode(digest).decode()),
    st.sampled_from([2 ** 10, 2 ** 14, 2 ** 20]), st.integers(1, 32), st.integers(1, 16),
    st.binary(min_size=1, max_size=64), st.binary(min_size=32, max_size=32))


@given(st.dictionaries(_names, _stored, max_size=20))
def test_format_parse_round_trip(users):
    assert parse_users(format_users(users)) == users


@given(st.text())
@settings(max_examples=300)
def test_parse_users_raises_only_value_error(text):
    try:
        users = parse_users(text)
    except ValueError as exc:
        assert re.match(r"line \d+: ", str(exc))
    else:
        assert all(valid_user_name(name) and stored.startswith("scrypt$") for name, stored in users.items())

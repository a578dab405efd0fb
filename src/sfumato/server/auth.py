"""Who may call the server: API keys (Bearer) and A1111's `--api-auth user:pass` (HTTP Basic).

With neither configured the server is open, which is why it then binds only to loopback.
A keys file (JSON or TOML) lists keys, each with an optional monthly image quota:

    {"keys": [{"name": "alice", "key": "s3cret", "monthly_images": 500}]}

    [[keys]]
    name = "alice"
    key = "s3cret"
    monthly_images = 500
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path

from sfumato.errors import SfumatoError


@dataclass(frozen=True)
class ApiKey:
    name: str
    key: str
    monthly_images: int | None = None  # None: unlimited


@dataclass(frozen=True)
class Principal:
    """The caller of one request. `name` None: an open server (no credentials configured)."""
    name: str | None
    monthly_images: int | None = None


@dataclass(frozen=True)
class AuthConfig:
    keys: tuple[ApiKey, ...] = ()
    basic: dict[str, str] = field(default_factory=dict)  # user -> password

    @property
    def enabled(self) -> bool:
        return bool(self.keys or self.basic)

    def check(self, authorization: str | None) -> Principal | None:
        """The principal for an Authorization header, or None if it grants nothing."""
        if not self.enabled:
            return Principal(None)
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() == "bearer":
            return self._by_key(credentials.strip())
        if scheme.lower() == "basic":
            user, password = _decode_basic(credentials)
            if user is None:
                return None
            # a browser can carry an API key as the Basic password (user name ignored), so
            # that the web page works on a key-protected server without a login form
            return self._by_basic(user, password) or self._by_key(password)
        return None

    def _by_key(self, presented: str) -> Principal | None:
        found = None
        for key in self.keys:  # compare with every key, so timing does not tell which matched
            if hmac.compare_digest(presented.encode(), key.key.encode()):
                found = key
        return Principal(found.name, found.monthly_images) if found else None

    def _by_basic(self, user: str, password: str) -> Principal | None:
        found = False
        for known_user, known_password in self.basic.items():
            same_user = hmac.compare_digest(user.encode(), known_user.encode())
            same_password = hmac.compare_digest(password.encode(), known_password.encode())
            found |= same_user and same_password
        return Principal(f"user:{user}") if found else None


def _decode_basic(credentials: str) -> tuple[str | None, str]:
    try:
        text = base64.b64decode(credentials.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None, ""
    user, sep, password = text.partition(":")
    return (user, password) if sep else (None, "")


def parse_api_auth(value: str | None) -> dict[str, str]:
    """A1111's `--api-auth user:pass[,user2:pass2]`."""
    users = {}
    for item in filter(None, (value or "").split(",")):
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise SfumatoError(f"--api-auth {item!r}: expected user:password[,user:password...]")
        users[user] = password
    return users


def load_keys_file(path: str | Path) -> tuple[ApiKey, ...]:
    """Keys from a .json or .toml file (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SfumatoError(f"cannot read keys file {path}: {error.strerror}") from None
    try:
        if path.suffix.lower() == ".toml":
            import tomllib  # Python 3.11+

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ImportError:
        raise SfumatoError("TOML keys files need Python 3.11+; use a .json keys file") from None
    except ValueError as error:
        raise SfumatoError(f"keys file {path} is not valid {path.suffix[1:] or 'JSON'}: {error}") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise SfumatoError(f"keys file {path}: expected a non-empty list under 'keys'")
    return tuple(_api_key(entry, i, path) for i, entry in enumerate(entries))


def _api_key(entry: object, index: int, path: Path) -> ApiKey:
    where = f"keys file {path}, entry {index}"
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or len(entry["key"]) < 8:
        raise SfumatoError(f"{where}: needs a 'key' string of at least 8 characters")
    quota = entry.get("monthly_images")
    if quota is not None and (not isinstance(quota, int) or isinstance(quota, bool) or quota < 0):
        raise SfumatoError(f"{where}: 'monthly_images' must be a whole number >= 0")
    return ApiKey(name=str(entry.get("name", f"key{index}")), key=entry["key"], monthly_images=quota)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, auth: AuthConfig) -> None:
    """Refuse to expose an open server to the network."""
    if not is_loopback(host) and not auth.enabled:
        raise SfumatoError(
            f"refusing to listen on {host} without credentials: anyone who can reach it could use "
            "it. Add --api-key KEY, --keys-file FILE or --api-auth user:pass, or bind 127.0.0.1")

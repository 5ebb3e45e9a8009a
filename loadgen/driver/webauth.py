"""HTTP basic auth for the live console (`--web-auth USER:PASSWORD`), through Locust's own login switch.

Locust's web UI is protected by its `web_login` option (`locust --web-login`): each of its routes, and each
route added through `WebUI.auth_required_if_enabled` (all of loadgen's /loadgen routes), then asks
flask-login's LoginManager for the user, and who the user is is left to an extension (Locust's docs:
"extending-locust.html#authentication"). Earlier Locust versions had basic auth built in, as
`--web-auth USER:PASSWORD` (it now tells the user to use --web-login instead); loadgen keeps that flag
and plugs it into --web-login: the LoginManager gets a request loader that reads the request's
`Authorization: Basic` header and an unauthorized handler that answers 401 with `WWW-Authenticate`, so a
browser asks for the user and password and curl or httpx send them (-u, auth=). Nothing is kept in a
session: each request proves itself. Only Locust's static assets and its (unused) login page stay open.

The password is held here only: it is never printed, and the console's outputs (summary.json,
sweep.json) do not hold the console's options at all.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any

from flask import Response
from flask_login import UserMixin

__all__ = ["WebAuth", "protect"]

_REALM = "loadgen console"


@dataclass(frozen=True)
class WebAuth:
    """The user and password the console asks for (the password is left out of repr)."""

    user: str
    password: str = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> WebAuth:
        """"USER:PASSWORD" -> WebAuth; ValueError (that never quotes the text: it holds a password) when
        either part is empty."""
        user, colon, password = text.partition(":")
        if not colon or not user or not password:
            raise ValueError("expected USER:PASSWORD (a user name, a colon, then a password; neither empty)")
        return cls(user, password)

    def accepts(self, user: str | None, password: str | None) -> bool:
        """Whether the given credentials are these (compared in constant time)."""
        if user is None or password is None:
            return False
        same_user = hmac.compare_digest(user.encode("utf-8"), self.user.encode("utf-8"))
        same_password = hmac.compare_digest(password.encode("utf-8"), self.password.encode("utf-8"))
        return same_user and same_password


class _User(UserMixin):
    def __init__(self, name: str) -> None:
        self.id = name


def protect(web_ui: Any, auth: WebAuth) -> None:
    """Make `web_ui` (a Locust WebUI created with web_login=True) take `auth` by HTTP basic auth."""
    manager = web_ui.login_manager
    # Locust's guard writes to Flask's session on every request: it needs a key (one per process).
    web_ui.app.secret_key = secrets.token_bytes(32)

    @manager.user_loader
    def _from_session(_user_id: str) -> None:
        return None  # never logged in by session: each request sends its credentials

    @manager.request_loader
    def _from_request(request: Any) -> _User | None:
        given = request.authorization
        if given is None or given.type != "basic":
            return None
        return _User(auth.user) if auth.accepts(given.username, given.password) else None

    @manager.unauthorized_handler
    def _unauthorized() -> Response:
        return Response("the loadgen console asks for a user and password (--web-auth)\n", 401,
                        {"WWW-Authenticate": f'Basic realm="{_REALM}", charset="UTF-8"'}, mimetype="text/plain")

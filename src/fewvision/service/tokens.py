"""Bearer tokens: created (only a hash is stored), listed, revoked, and checked on every request."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select

from . import store
from .common import ServiceError, check_text, not_found
from .store import Token, utcnow


class Tokens:
    """Methods of :class:`~fewvision.service.core.Service` for its tokens."""

    def create_token(self, name: str, project_id: int | None = None) -> tuple[dict, str]:
        check_text(name, "the token's name")
        if project_id is not None:
            self.project(project_id)
        token = "fv_" + secrets.token_urlsafe(32)
        with self.Session.begin() as s:
            row = Token(name=name or "token", token_hash=hash_token(token), project_id=project_id)
            s.add(row)
            s.flush()
            out = store.as_dict(row, ["id", "name", "project_id", "created_at", "revoked_at"])
        return out, token

    def tokens(self) -> list[dict]:
        with self.Session() as s:
            rows = s.scalars(select(Token).order_by(Token.id)).all()
            return [store.as_dict(r, ["id", "name", "project_id", "created_at", "revoked_at"]) for r in rows]

    def revoke_token(self, token_id: int) -> dict:
        with self.Session.begin() as s:
            row = s.get(Token, token_id)
            if row is None:
                raise not_found("token", token_id)
            row.revoked_at = row.revoked_at or utcnow()
            return store.as_dict(row, ["id", "name", "project_id", "created_at", "revoked_at"])

    def authenticate(self, token: str | None) -> Token:
        if not token:
            raise ServiceError(401, "unauthorized", "this endpoint needs 'Authorization: Bearer <token>' (create "
                                                   "one with 'fewvision tokens create')")
        with self.Session() as s:
            row = s.scalars(select(Token).where(Token.token_hash == hash_token(token))).first()
        if row is None or row.revoked_at is not None:
            raise ServiceError(401, "unauthorized", "unknown or revoked token")
        return row

    @staticmethod
    def allow(token: Token, project_id: int) -> None:
        if token.project_id is not None and token.project_id != project_id:
            raise ServiceError(403, "forbidden", f"this token is limited to project {token.project_id}")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()

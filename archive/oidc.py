"""OIDC bearer tokens: JWTs validated against the configured issuer's JWKS (PyJWT).

Signature, issuer, audience, expiry and not-before are PyJWT's checks; the signing keys come
from the issuer's JWKS (its URL from `[auth.oidc] jwks_url`, else the issuer's discovery
document) and are cached by PyJWKClient, refreshed every `jwks_refresh_minutes` and at once
when a token names a key id the cache does not hold (key rotation). Roles come from a claim
(`role_claim`, a dotted path such as `realm_access.roles`) through `role_map`; with no map the
claim's values are taken as pathpacs role names. No cryptography is written here.
"""
from __future__ import annotations

import json
import logging
import urllib.request
from datetime import datetime, timezone
from typing import Any

import jwt

from .access import Forbidden, Principal, ROLES, check_roles

log = logging.getLogger("pathpacs.auth")
FETCH_TIMEOUT = 5.0


class OidcError(Exception):
    """The token is not valid for this archive (the reason is safe to tell the client)."""


def _claim(claims: dict, path: str) -> Any:
    cur: Any = claims
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


class OidcVerifier:
    def __init__(self, settings: dict, allow_combined_admin_roles: bool = False) -> None:
        self.issuer: str = settings["issuer"]
        self.audience: str = settings["audience"]
        self.algorithms: list[str] = list(settings.get("algorithms") or ["RS256", "ES256"])
        self.role_claim: str = settings.get("role_claim", "roles")
        self.role_map: dict[str, list[str]] = dict(settings.get("role_map") or {})
        self.name_claim: str = settings.get("name_claim", "preferred_username")
        self.leeway = int(settings.get("leeway_seconds", 30))
        self.allow_combined = allow_combined_admin_roles
        self._jwks_url: str | None = settings.get("jwks_url")
        self._lifespan = float(settings.get("jwks_refresh_minutes", 60.0)) * 60
        self._cooldown = float(settings.get("jwks_cooldown_seconds", 30.0))
        self.client_id: str | None = settings.get("client_id")
        self.scope: str = settings.get("scope", "openid profile")
        self._client: jwt.PyJWKClient | None = None
        self._discovery: dict | None = None

    def _keys(self) -> jwt.PyJWKClient:
        if self._client is None:
            url = self._jwks_url or self._discover()
            self._client = jwt.PyJWKClient(url, cache_keys=True, lifespan=self._lifespan, timeout=FETCH_TIMEOUT,
                                          cooldown_duration=self._cooldown)
        return self._client

    def discovery(self) -> dict:
        """The issuer's discovery document (fetched once; may block: call it off the loop)."""
        if self._discovery is not None:
            return self._discovery
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT) as resp:
                doc = json.loads(resp.read(1 << 20))
        except Exception as exc:
            log.warning("OIDC discovery at %s failed: %s", url, exc)
            raise OidcError("the identity provider cannot be reached") from None
        if not isinstance(doc, dict) or doc.get("issuer") != self.issuer or not isinstance(doc.get("jwks_uri"), str):
            raise OidcError("the identity provider's discovery document does not match auth.oidc.issuer")
        self._discovery = doc
        return doc

    def _discover(self) -> str:
        return self.discovery()["jwks_uri"]

    def login_config(self) -> dict | None:
        """What the pages need for the authorization code + PKCE login (None: no client_id)."""
        if not self.client_id:
            return None
        doc = self.discovery()
        auth, token = doc.get("authorization_endpoint"), doc.get("token_endpoint")
        if not isinstance(auth, str) or not isinstance(token, str):
            raise OidcError("the identity provider publishes no authorization or token endpoint")
        return {"authorization_endpoint": auth, "token_endpoint": token, "client_id": self.client_id,
                "scope": self.scope}

    def roles_of(self, claims: dict) -> frozenset[str]:
        raw = _claim(claims, self.role_claim)
        values = [raw] if isinstance(raw, str) else [v for v in raw if isinstance(v, str)] if isinstance(raw, list) else []
        roles: set[str] = set()
        for v in values:
            if self.role_map:
                roles.update(self.role_map.get(v, ()))
            elif v in ROLES:
                roles.add(v)
        try:
            return check_roles(roles, self.allow_combined)
        except ValueError as exc:
            raise Forbidden(str(exc)) from None

    def verify(self, token: str) -> tuple[Principal, datetime]:
        """The principal of a valid JWT and its expiry; OidcError (safe reason) otherwise."""
        try:
            key = self._keys().get_signing_key_from_jwt(token)
            claims = jwt.decode(token, key.key, algorithms=self.algorithms, audience=self.audience,
                                issuer=self.issuer, leeway=self.leeway,
                                options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError:
            raise OidcError("the token has expired") from None
        except jwt.InvalidAudienceError:
            raise OidcError("the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise OidcError("the token is from another issuer") from None
        except jwt.PyJWKClientConnectionError:
            raise OidcError("the identity provider's keys cannot be fetched") from None
        except jwt.PyJWKClientError:
            raise OidcError("the token is signed with a key the identity provider does not publish") from None
        except jwt.InvalidTokenError as exc:
            raise OidcError(f"invalid token ({type(exc).__name__})") from None
        sub = str(claims["sub"])
        name = str(_claim(claims, self.name_claim) or sub)[:128]
        expires = datetime.fromtimestamp(int(claims["exp"]), timezone.utc)
        return Principal(f"oidc:{sub}", name, self.roles_of(claims), "oidc"), expires

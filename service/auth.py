"""Token authentication of the gRPC API, and the token and TLS settings that servers and clients share.

The token travels in the request metadata as ``authorization: Bearer <token>``.
The server compares it with ``hmac.compare_digest`` and never logs it. This
module imports only grpc and the standard library, so the client and the CLI
use it without the service's dependencies.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc

logger = logging.getLogger(__name__)

TOKEN_ENV = "NANWATCH_TOKEN"
TOKEN_FILE_ENV = "NANWATCH_TOKEN_FILE"
TLS_CA_ENV = "NANWATCH_TLS_CA"
TLS_CLIENT_CERT_ENV = "NANWATCH_TLS_CLIENT_CERT"
TLS_CLIENT_KEY_ENV = "NANWATCH_TLS_CLIENT_KEY"
AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "bearer "

AuthMode = Literal["all", "operator", "none"]
AUTH_MODES: tuple[str, ...] = ("all", "operator", "none")
# Calls that change a run on an operator's request; "operator" mode guards only these.
OPERATOR_METHODS = frozenset({"/nanwatch.v1.Nanwatch/HaltRun"})
# Kubernetes native gRPC probes send no metadata, so health checks never need a token.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


class AuthConfigError(ValueError):
    """A token or TLS setting is invalid; the message names the setting and the file."""


def read_token(token_file: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """Return the token from token_file, else $NANWATCH_TOKEN_FILE, else $NANWATCH_TOKEN, else None.

    A file is read as a Kubernetes Secret mounts it: surrounding whitespace and the
    trailing newline are stripped.

    Raises:
        AuthConfigError: the file cannot be read, or the token is empty after stripping.
    """
    environ = os.environ if environ is None else environ
    path = token_file or environ.get(TOKEN_FILE_ENV) or None
    if path is not None:
        source = f"token file {path}"
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise AuthConfigError(f"cannot read the {source}: {error}; check {TOKEN_FILE_ENV} or --token-file") from None
    elif environ.get(TOKEN_ENV) is not None:
        source, token = f"${TOKEN_ENV}", environ[TOKEN_ENV].strip()
    else:
        return None
    if not token:
        raise AuthConfigError(f"the {source} is empty; put the token in it or unset it")
    return token


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Return the call metadata that carries token, or no metadata when token is None."""
    return () if token is None else ((AUTHORIZATION_KEY, f"Bearer {token}"),)


@dataclass(frozen=True, slots=True)
class ClientTls:
    """PEM bytes a client needs for TLS: the CA that signed the server, and an optional client pair."""

    root_certificates: bytes
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


def read_client_tls(tls_ca: str | None = None, environ: Mapping[str, str] | None = None) -> ClientTls | None:
    """Return the client's TLS files from tls_ca, else $NANWATCH_TLS_CA; None means plaintext.

    $NANWATCH_TLS_CLIENT_CERT and $NANWATCH_TLS_CLIENT_KEY add a client certificate for
    a server that requires mutual TLS.
    """
    environ = os.environ if environ is None else environ
    ca_path = tls_ca or environ.get(TLS_CA_ENV) or None
    if ca_path is None:
        return None
    cert_path = environ.get(TLS_CLIENT_CERT_ENV) or None
    key_path = environ.get(TLS_CLIENT_KEY_ENV) or None
    if (cert_path is None) != (key_path is None):
        raise AuthConfigError(
            f"set both ${TLS_CLIENT_CERT_ENV} and ${TLS_CLIENT_KEY_ENV} for mutual TLS, or neither"
        )
    return ClientTls(
        root_certificates=read_pem(ca_path, "TLS CA"),
        certificate_chain=read_pem(cert_path, "TLS client certificate") if cert_path else None,
        private_key=read_pem(key_path, "TLS client key") if key_path else None,
    )


def read_pem(path: str, what: str) -> bytes:
    """Return the bytes of a PEM file, or raise AuthConfigError naming what and the path."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise AuthConfigError(f"cannot read the {what} file {path}: {error.strerror}") from None
    if b"-----BEGIN" not in data:
        raise AuthConfigError(f"the {what} file {path} is not PEM (no -----BEGIN line)")
    return data


def resolve_auth_mode(mode: str | None, token: str | None) -> AuthMode:
    """Return the auth mode: mode if given, else "operator" with a token and "none" without.

    Raises:
        AuthConfigError: mode is unknown, or it requires a token and none is configured.
    """
    if mode is None:
        return "operator" if token is not None else "none"
    if mode not in AUTH_MODES:
        raise AuthConfigError(f"auth mode {mode!r} is invalid; use one of {', '.join(AUTH_MODES)}")
    if mode != "none" and token is None:
        raise AuthConfigError(
            f"auth mode {mode!r} needs a token; set {TOKEN_FILE_ENV}, {TOKEN_ENV} or --token-file"
        )
    return mode  # type: ignore[return-value]


def check_authorization(metadata: Sequence[tuple[str, str | bytes]] | None, token: str) -> str | None:
    """Return None when metadata carries the token, else the reason to reject the call.

    The reason never contains the sent value, so it is safe to log and to return.
    """
    values = [value for key, value in (metadata or ()) if key == AUTHORIZATION_KEY]
    if not values:
        return "missing `authorization: Bearer <token>` metadata"
    value = values[0] if isinstance(values[0], str) else values[0].decode("utf-8", "replace")
    if not value[: len(BEARER_PREFIX)].lower() == BEARER_PREFIX:
        return "the authorization metadata is not a Bearer token"
    sent = value[len(BEARER_PREFIX):].strip().encode("utf-8")
    if not hmac.compare_digest(sent, token.encode("utf-8")):
        return "invalid token"
    return None


RejectHook = Callable[[str, grpc.StatusCode], None]


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the service token with UNAUTHENTICATED.

    A missing and a wrong token are both rejected with UNAUTHENTICATED. With one shared
    token, a caller that sends the wrong one is not identified at all, and gRPC keeps
    PERMISSION_DENIED for identified callers who lack a permission.

    Args:
        token: the service token.
        mode: "all" guards every call except health checks, "operator" guards only HaltRun.
        on_reject: called with the method name and status code of each rejected call.
    """

    def __init__(self, *, token: str, mode: AuthMode, on_reject: RejectHook | None = None) -> None:
        self._token = token
        self._mode = mode
        self._on_reject = on_reject
        self._warned: set[tuple[str, str]] = set()

    def requires_token(self, method: str) -> bool:
        if self._mode == "none" or method.startswith(UNAUTHENTICATED_PREFIXES):
            return False
        return self._mode == "all" or method in OPERATOR_METHODS

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.requires_token(method):
            return handler
        reason = check_authorization(handler_call_details.invocation_metadata, self._token)
        if reason is None:
            return handler
        self._record_rejection(method, reason)
        return _rejecting_handler(handler, f"{method} requires the service token: {reason}")

    def _record_rejection(self, method: str, reason: str) -> None:
        # The first rejection of each kind is a WARNING; repeats only count, so a
        # client retrying with a bad token cannot flood the log.
        if self._on_reject is not None:
            self._on_reject(method.rsplit("/", 1)[-1], grpc.StatusCode.UNAUTHENTICATED)
        log = logger.debug if (method, reason) in self._warned else logger.warning
        self._warned.add((method, reason))
        log("rejected %s with UNAUTHENTICATED: %s", method, reason)


def _rejecting_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """Return a handler of the same kind as handler that aborts every call with UNAUTHENTICATED."""

    async def reject(unused_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject, **serializers)
    return grpc.unary_unary_rpc_method_handler(reject, **serializers)

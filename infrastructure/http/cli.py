"""``daybook serve`` and ``daybook tokens create|list|revoke``."""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
import ssl
import sys
from typing import Any

from daybook.infrastructure.cli import (
    add_log_arguments,
    add_readmodels_argument,
    add_startup_wait_argument,
    add_url_argument,
    checked_settings,
    command,
    positive_rate,
    rate,
    seconds,
    setup_logging,
    when_usable,
    whole_number,
)
from daybook.infrastructure.http.options import HttpOptions
from daybook.infrastructure.http.tokens import SCOPES, TokenError, check_name, open_tokens
from daybook.infrastructure.preflight import where

_PG = "postgresql://daybook@localhost/daybook"
_DEFAULTS = HttpOptions()


def register(subparsers: Any) -> None:
    serve = command(
        subparsers,
        "serve",
        help="serve the ledger over HTTP (commands, reads, OpenAPI docs at /docs)",
        description=(
            "Serve the ledger over HTTP with uvicorn: POST /v1/commands/<name> for every "
            "command (Idempotency-Key required), reads under /v1/ that say which log "
            "position they reflect, /health, the OpenAPI document at /openapi.json "
            "with its docs page at /docs, and the dashboard at /. Every route but /health, "
            "/problems, the docs and the dashboard's page (/ and its files under "
            "/dashboard/, which hold no data: the page asks for a token) needs a bearer "
            "token (daybook tokens create). Keeps the read models up to date "
            "in-process unless --no-projections, and records hold and reservation expiries unless "
            "--no-sweeper. SIGTERM or Ctrl-C: stop accepting, answer "
            "every request in progress, commit what was accepted, exit."
        ),
        examples=[
            "daybook serve",
            f"daybook serve --url {_PG} --host 0.0.0.0 --port 8443 "
            "--tls-cert cert.pem --tls-key key.pem",
            f"daybook serve --url {_PG} --readmodels-url postgresql://daybook@views/daybook "
            "--no-projections",
            f"daybook serve --url {_PG} --port 8001 --no-projections --no-sweeper",
            f"daybook serve --url {_PG} --startup-wait 120",
            "daybook serve --cors-origin https://dashboard.example.com --token-rate 200",
            "daybook serve --command-capacity 4096 --read-capacity 512 --read-connections 8",
            "daybook serve --token-cache-seconds 1 --max-body-bytes 16384 --body-timeout 10 "
            "--max-read-wait 5",
            "daybook serve --no-access-log --log-level warning --log-format json",
        ],
    )
    add_url_argument(serve)
    add_readmodels_argument(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=whole_number(1, 65535), default=8000, help="port")
    serve.add_argument(
        "--tls-cert", help="TLS certificate chain (PEM); with --tls-key: HTTPS (default: none)"
    )
    serve.add_argument("--tls-key", help="TLS private key (PEM) (default: none, plain HTTP)")
    serve.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        type=_cors_origin,
        help="a browser origin allowed to call the API, as browsers send it: scheme://host[:port] "
        "(lowercase, no path or trailing slash, no default port), or * for any; repeat for more "
        "(default: none, CORS off)",
    )
    serve.add_argument(
        "--no-projections",
        action="store_true",
        help="do not run the projections here (another process keeps the read models)",
    )
    serve.add_argument(
        "--no-sweeper",
        action="store_true",
        help="do not record hold and reservation expiries here (another process does: "
        "another daybook serve, or daybook sagas run)",
    )
    serve.add_argument(
        "--command-capacity",
        type=whole_number(1),
        default=_DEFAULTS.command_capacity,
        help="commands in progress at most; more are refused with 503 and Retry-After (a "
        "list of more commands than this, with 422)",
    )
    serve.add_argument(
        "--read-capacity",
        type=whole_number(1),
        default=_DEFAULTS.read_capacity,
        help="reads in progress at most; more are refused with 503 and Retry-After",
    )
    serve.add_argument(
        "--read-connections",
        type=whole_number(1, 64),
        default=_DEFAULTS.read_connections,
        help="read-model connections (default: %(default)s; a read holds one while it "
        "queries, not while it waits for a position)",
    )
    serve.add_argument(
        "--token-rate",
        type=rate,
        default=_DEFAULTS.token_rate,
        help="requests per second per token unless the token has its own (0: no limit; default: 0)",
    )
    serve.add_argument(
        "--token-cache-seconds",
        type=seconds,
        default=_DEFAULTS.token_cache_seconds,
        help="how long a verified token is trusted before it is looked up again (a "
        "revocation by another process takes effect within it)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=whole_number(64),
        default=_DEFAULTS.max_body_bytes,
        help="largest body taken",
    )
    serve.add_argument(
        "--body-timeout",
        type=seconds,
        default=_DEFAULTS.body_timeout,
        help="longest wait for the next part of a request's body, in seconds: then 408 "
        "request_timeout, nothing done (a client gone mid-upload holds nothing, nor a stop); "
        "the whole body may take this plus a second per 500 bytes received",
    )
    serve.add_argument(
        "--max-read-wait",
        type=seconds,
        default=_DEFAULTS.max_read_wait,
        help="longest wait a read may ask for with min_position, in seconds (a read that "
        "asks for none waits 2, or this if shorter); also the longest a read with no "
        "min_position, or one already reached, waits its turn for a read-model connection "
        "(then 503 overloaded)",
    )
    serve.add_argument("--no-access-log", action="store_true", help="do not log each request")
    add_log_arguments(serve)
    add_startup_wait_argument(serve)
    serve.set_defaults(handler=_serve)

    tokens = command(
        subparsers,
        "tokens",
        help="create, list or revoke the HTTP API's bearer tokens",
        description="Bearer tokens for daybook serve, stored hashed in the event store's "
        "database. A token's name is recorded as the actor of every command sent with it.",
        examples=[
            "daybook tokens create dashboard --scope read",
            "daybook tokens list",
            "daybook tokens revoke dashboard",
        ],
    )
    token_commands = tokens.add_subparsers(dest="tokens_command", metavar="COMMAND")
    create = command(
        token_commands,
        "create",
        help="make a token and print it (once: only its hash is kept)",
        description="Make a bearer token with the given scopes and print it on stdout; it "
        "cannot be shown again. Scopes: read (queries), write (commands), admin (everything).",
        examples=[
            "daybook tokens create dashboard --scope read",
            f"daybook tokens create checkout --scope read --scope write --rate 50 --url {_PG}",
            "daybook tokens create ops --scope admin",
        ],
    )
    create.add_argument(
        "name", type=_token_name, help="who the token speaks for (recorded as the actor)"
    )
    create.add_argument(
        "--scope",
        action="append",
        choices=SCOPES,
        required=True,
        help="a scope; repeat for more",
    )
    create.add_argument(
        "--rate",
        type=positive_rate,
        help="requests per second this token may send (default: the server's --token-rate)",
    )
    add_url_argument(create)
    create.set_defaults(handler=_create)

    listing = command(
        token_commands,
        "list",
        help="the tokens: name, scopes, created, revoked",
        description="Every token ever made, revoked ones included (never their secrets).",
        examples=["daybook tokens list", f"daybook tokens list --url {_PG}"],
    )
    add_url_argument(listing)
    listing.set_defaults(handler=_list)

    revoke = command(
        token_commands,
        "revoke",
        help="revoke a token",
        description="Revoke a token: a running server refuses it within its "
        "--token-cache-seconds. Its name stays taken.",
        examples=["daybook tokens revoke dashboard", f"daybook tokens revoke ops --url {_PG}"],
    )
    revoke.add_argument("name", help="the token's name")
    add_url_argument(revoke)
    revoke.set_defaults(handler=_revoke)
    tokens.set_defaults(handler=lambda args: _help(tokens))


def _token_name(text: str) -> str:
    """A name checked as the arguments are read: a refused one never opens (and so never
    creates) the database."""
    try:
        return check_name(text)
    except TokenError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


#: An origin as a browser sends it in ``Origin`` (RFC 6454 serialisation): a lowercase http or
#: https scheme and host (a name, an IPv4 address, or an IPv6 one in brackets), an optional
#: port, and nothing after it, not even a slash.
_ORIGIN = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://"
    r"(?P<host>\[(?P<ipv6>[0-9a-f:.]+)\]|[a-z0-9]([a-z0-9.-]*[a-z0-9])?)"
    r"(:(?P<port>[1-9][0-9]{0,4}))?"
)
#: The port a browser leaves out of an origin: it sends ``https://a.example``, never
#: ``https://a.example:443``.
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _cors_origin(text: str) -> str:
    """An argparse type: ``*`` or an origin, as a browser serializes it. CORS compares the
    browser's ``Origin`` with each allowed one as text, so any other value (a trailing
    slash, a path, capitals, a default port, an IPv6 address written out in full) would
    silently allow nobody. Any scheme: an app's web view or a browser extension sends its
    own (``capacitor://localhost``, ``chrome-extension://<id>``)."""
    if text == "*":
        return text
    origin = _ORIGIN.fullmatch(text)
    if origin is None or not _as_browsers_send(origin):
        raise argparse.ArgumentTypeError(
            "expected * or an origin as a browser sends it, scheme://host[:port] (lowercase; "
            "no path, query, fragment or trailing slash; no :80 for http nor :443 for "
            f"https), got {text!r}"
        )
    return text


def _as_browsers_send(origin: re.Match[str]) -> bool:
    port, ipv6 = origin.group("port"), origin.group("ipv6")
    if port is not None and (int(port) > 65535 or _DEFAULT_PORTS.get(origin["scheme"]) == port):
        return False
    if ipv6 is not None:
        try:
            return ipaddress.IPv6Address(ipv6).compressed == ipv6
        except ValueError:
            return False
    return True


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


_WHY = (
    "memory:// lives inside one process, and this command would see an empty ledger of its "
    "own (and no tokens)"
)


def _tls_problem(cert: str, key: str) -> str | None:
    """Why the server could not use this certificate and key, or None: read here, before
    anything starts, so a wrong path is one line rather than the server's traceback. (A key
    protected by a passphrase is refused too: the server could not ask for it.)"""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as error:
        return (
            f"the TLS certificate {cert!r} and key {key!r} do not make a pair it can use "
            f"({error.reason or error}); give PEM files, the key without a passphrase"
        )
    except OSError as error:
        return f"cannot read the TLS certificate or key: {error.filename or cert}: {error.strerror}"
    return None


def _listen_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on ``host:port`` (taken, not an address of this
    machine), or None: tried before anything is opened, so the answer is one line rather
    than a banner followed by the server's error. Binds every address the host names, as
    the server (asyncio's ``create_server``) does, then lets them go; the server binds again."""
    probes: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            probe = socket.socket(family, kind, proto)
            probes.append(probe)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(address)
    except (OSError, UnicodeError) as error:
        # UnicodeError: a host name IDNA cannot encode (an empty label, one over 63
        # characters), which getaddrinfo refuses before any lookup.
        reason = getattr(error, "strerror", None) or str(error)
        return f"cannot listen on {host}:{port}: {reason}; choose another --port or --host"
    finally:
        for probe in probes:
            probe.close()
    return None


def _serve(args: argparse.Namespace) -> int:
    from daybook.infrastructure.bootstrap import http_parts
    from daybook.infrastructure.collector import settle_collector
    from daybook.infrastructure.http.server import run

    if bool(args.tls_cert) != bool(args.tls_key):
        print("daybook serve: give both --tls-cert and --tls-key, or neither", file=sys.stderr)
        return 2
    if args.tls_cert and (problem := _tls_problem(args.tls_cert, args.tls_key)):
        print(f"daybook serve: {problem}", file=sys.stderr)
        return 2
    if problem := _listen_problem(args.host, args.port):
        print(f"daybook serve: {problem}", file=sys.stderr)
        return 2
    setup_logging(args)
    settings = when_usable(
        args, lambda: checked_settings(args, why=_WHY, existing=False, readmodels=True)
    )
    options = HttpOptions(
        command_capacity=args.command_capacity,
        read_capacity=args.read_capacity,
        read_connections=args.read_connections,
        token_rate=args.token_rate,
        token_cache_seconds=args.token_cache_seconds,
        max_body_bytes=args.max_body_bytes,
        body_timeout=args.body_timeout,
        max_read_wait=args.max_read_wait,
        cors_origins=tuple(args.cors_origin),
        access_log=not args.no_access_log,
    )
    sweep = not args.no_sweeper
    if args.no_projections:
        parts = http_parts(settings, options, projections=None, sweep=sweep)
    else:
        parts = http_parts(settings, options, sweep=sweep)
    settle_collector()  # started: what exists now lives as long as the process
    scheme = "https" if args.tls_cert else "http"
    print(
        f"daybook serve: {where(settings.url)} on {scheme}://{args.host}:{args.port} "
        f"(docs at /docs)",
        file=sys.stderr,
        flush=True,
    )
    return run(
        parts,
        host=args.host,
        port=args.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        access_log=False,  # the application logs each request itself, with its ids
        log_level=args.log_level,
    )


def _tokens(args: argparse.Namespace, *, existing: bool = True) -> Any:
    """The token store; only ``create`` may start a new database (list and revoke refuse a
    mistyped path instead of making an empty database there)."""
    settings = checked_settings(args, why=_WHY, existing=existing)
    return open_tokens(settings.url)


def _create(args: argparse.Namespace) -> int:
    store = _tokens(args, existing=False)
    try:
        token, secret = store.create(args.name, args.scope, rate=args.rate)
    except TokenError as error:
        print(f"daybook tokens: {error}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(secret)
    print(
        f"daybook tokens: {token.name} ({', '.join(sorted(token.scopes))}): this is the only "
        "time the token is shown; keep it secret",
        file=sys.stderr,
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    store = _tokens(args)
    try:
        found = store.list()
    finally:
        store.close()
    if not found:
        print("no tokens (daybook tokens create NAME --scope read)")
    for token in found:
        state = f"revoked {token.revoked_at}" if token.revoked_at else "active"
        rate = f"{token.rate:g}/s" if token.rate else "server default rate"
        print(
            f"{token.name:<24} {' '.join(sorted(token.scopes)):<18} created {token.created_at}"
            f"  {state}  {rate}"
        )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    store = _tokens(args)
    try:
        token = store.revoke(args.name)
    except TokenError as error:
        print(f"daybook tokens: {error}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"{token.name}: revoked {token.revoked_at}")
    return 0

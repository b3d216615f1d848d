"""
C{iap-pki}: create a CA and IAP role certificates from the command line (DESIGN.md 7).

A thin layer over L{iapd.pki}: argument parsing, and errors turned into one line on
stderr with exit code 2 instead of a traceback, because the user can fix every one of
them (a wrong role, a bad name, a missing CA, a file in the way).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import typing
from pathlib import Path

from iapd import pki
from iapd.roles import IAP_ALERT_CONSUMER, IAP_ALERT_GENERATOR, IAP_IDEF_CONFIGURATOR

PROG = "iap-pki"

_ROLES_HELP = f"""\
roles (each a critical Extended Key Usage extension, DESIGN.md section 4):
  sensor   clientAuth + IAP_ALERT_GENERATOR: an IAP client that sends alerts
  manager  serverAuth + IAP_ALERT_CONSUMER: an IAP server that receives alerts;
           with --configurator also IAP_IDEF_CONFIGURATOR (may send configuration)
  proxy    serverAuth + clientAuth, no IAP role: proxies are untrusted relays and
           never see the sensor-manager TLS session; this certificate only serves
           a TLS connection to the proxy itself

IAP role OIDs (UUID arc 2.25, no registration needed):
  IAP_ALERT_GENERATOR    {IAP_ALERT_GENERATOR.dotted_string}
  IAP_ALERT_CONSUMER     {IAP_ALERT_CONSUMER.dotted_string}
  IAP_IDEF_CONFIGURATOR  {IAP_IDEF_CONFIGURATOR.dotted_string}
"""


class _Parser(argparse.ArgumentParser):
    """
    Reports usage errors as C{iap-pki: error: ...}, also from subcommands (whose own
    prog would be C{iap-pki issue}), so that every error line looks the same.
    """

    def error(self, message: str) -> typing.NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _fill(text: str) -> str:
    # The raw formatter keeps the role table's layout, so wrap the prose ourselves.
    return textwrap.fill(text, width=78)


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description=_fill(
            "Create a CA and certificates carrying IAP role OIDs. Keys are ECDSA"
            " P-256, written unencrypted with mode 0600; existing files are never"
            " overwritten."
        ),
        epilog=_ROLES_HELP,
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser(
        "init-ca",
        help="create ca.key and ca.crt in DIR",
        description=_fill("Create a CA (ca.key, mode 0600, and ca.crt) in DIR, creating DIR"
        " with mode 0700 if needed. The CA carries no Extended Key Usage, so that it"
        " can issue every IAP role. Give ca.crt to sensors and managers as tls.ca."),
        formatter_class=formatter,
    )
    init.add_argument("directory", metavar="DIR", type=Path, help="where to write the CA")
    init.add_argument("--name", default=pki.DEFAULT_CA_NAME, help="CA subject common name"
                      " (default: %(default)s)")
    init.add_argument("--days", type=_positive_int, default=pki.DEFAULT_CA_DAYS,
                      help="validity in days (default: %(default)s)")

    issue = commands.add_parser(
        "issue",
        help="issue a sensor, manager or proxy certificate from the CA in DIR",
        description=_fill("Issue a certificate for the DNS name NAME from the CA in DIR,"
        " written to DIR/NAME.crt and DIR/NAME.key (mode 0600). NAME becomes the"
        " subject CN and the DNS subjectAltName: the sensor's identity, or the host"
        " that sensors put in CONNECT for a manager."),
        epilog=_ROLES_HELP,
        formatter_class=formatter,
    )
    issue.add_argument("directory", metavar="DIR", type=Path, help="directory of the CA")
    issue.add_argument("--role", required=True, choices=pki.ROLES, help="certificate role")
    issue.add_argument("name", metavar="NAME", help="DNS name of the certificate holder")
    issue.add_argument("--days", type=_positive_int, default=pki.DEFAULT_LEAF_DAYS,
                       help="validity in days (default: %(default)s)")
    issue.add_argument("--configurator", action="store_true",
                       help="managers only: also grant IAP_IDEF_CONFIGURATOR")
    return parser


def _run(args: argparse.Namespace) -> list[Path]:
    if args.command == "init-ca":
        cert = pki.init_ca(args.directory, name=args.name, days=args.days)
        return [cert.with_name(pki.CA_KEY), cert]
    cert, key = pki.issue(
        args.directory, args.role, args.name, days=args.days, configurator=args.configurator
    )
    return [key, cert]


def main(argv: list[str] | None = None) -> int:
    """
    Run C{iap-pki} with C{argv} (default: C{sys.argv[1:]}) and return the exit code:
    0 on success, 2 on any error (usage, PKI or file system), reported on stderr.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        written = _run(args)
    except (pki.PKIError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
C{iap-send -c sensor.yaml FILE... | -}: deliver alerts once and say which were not.

For scripts and first tests: one connection, alerts pipelined up to the configured
window, exit status 0 only when every alert was acknowledged with 200.  Each alert that
was not is named on stderr with the status code or the reason, so nothing fails quietly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from twisted.internet import endpoints
from twisted.internet.defer import Deferred, fail

from .client import Outcome, SensorSettings, deliver, deliver_inbound
from .config import ConfigError, load_sensor
from .errors import REASONS
from .messages import IDEF_ALERT

EXIT_UNACKNOWLEDGED = 1
EXIT_USAGE = 2


def _read_alerts(files: Sequence[str]) -> list[tuple[str, bytes]]:
    alerts = []
    for name in files:
        if name == "-":
            alerts.append(("-", sys.stdin.buffer.read()))
            continue
        try:
            alerts.append((name, Path(name).read_bytes()))
        except OSError as e:
            raise ConfigError(f"{name}: cannot read: {e.strerror}") from None
    return alerts


def send_files(
    reactor: Any, config_path: Path, files: Sequence[str], content_type: str = IDEF_ALERT, wait: float = 60.0
) -> Deferred[list[tuple[str, Outcome]]]:
    """Read C{files} and deliver them with the sensor configuration at C{config_path}."""
    try:
        config = load_sensor(config_path)
        material = config.tls.load(str(config_path))
        alerts = _read_alerts(files)
    except ConfigError as e:
        return fail(e)
    settings = SensorSettings(
        manager=config.manager, material=material, window=config.window,
        setup_timeout=config.setup_timeout, ack_timeout=config.ack_timeout,
    )
    bodies = [(content_type, body) for _, body in alerts]

    def inbound(_: Any = None) -> Deferred[list[Outcome]]:
        # the manager dials in (draft 6.1)
        assert config.listen is not None
        return deliver_inbound(reactor, endpoints.serverFromString(reactor, config.listen), settings, bodies, wait)

    if config.connect is None:
        d = inbound()
    else:
        d = deliver(reactor, endpoints.clientFromString(reactor, config.connect), settings, bodies)
        if config.listen is not None:
            # both configured: when the first hop cannot be reached, wait for the manager
            def fall_back(outcomes: list[Outcome]) -> Any:
                if outcomes and all(o.code is None and o.reason.startswith("cannot connect") for o in outcomes):
                    return inbound()
                return outcomes

            d.addCallback(fall_back)
    return d.addCallback(lambda outcomes: [(name, o) for (name, _), o in zip(alerts, outcomes)])


def describe_outcome(outcome: Outcome) -> str:
    """C{415 Unsupported Media Type}, or the reason when no status code came back."""
    if outcome.code is None:
        return outcome.reason or "no answer"
    phrase = REASONS.get(outcome.code, "")
    if outcome.reason and outcome.reason != phrase:
        phrase = f"{phrase}: {outcome.reason}" if phrase else outcome.reason
    return f"{outcome.code} {phrase}".rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="iap-send",
        description="Send alert files to an IAP manager once, over TLS with the sensor's certificate. "
        "Exits 0 only if every alert was acknowledged (IAP/0.2 200).",
    )
    parser.add_argument("-c", "--config", required=True, help="the sensor's YAML configuration (sensor.yaml)")
    parser.add_argument("--content-type", default=IDEF_ALERT, help=f"Content-Type of every alert (default {IDEF_ALERT})")
    parser.add_argument(
        "--wait", type=float, default=60.0,
        help="with 'listen' configured: seconds to wait for the manager to connect, when there is no "
        "'connect' or it cannot be reached (default 60)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing for acknowledged alerts")
    parser.add_argument("files", nargs="+", metavar="FILE", help="alert files; - reads one alert from standard input")
    args = parser.parse_args(argv)

    from twisted.internet.task import react

    result: dict[str, int] = {}

    def run(reactor: Any) -> Deferred[None]:
        d = send_files(reactor, Path(args.config), args.files, args.content_type, args.wait)

        def report(results: list[tuple[str, Outcome]]) -> None:
            missing = 0
            for name, outcome in results:
                if outcome.acknowledged:
                    if not args.quiet:
                        print(f"{name}: acknowledged")
                else:
                    missing += 1
                    print(f"iap-send: {name}: NOT acknowledged: {describe_outcome(outcome)}", file=sys.stderr)
            if missing:
                print(f"iap-send: {missing} of {len(results)} alerts not acknowledged", file=sys.stderr)
            result["code"] = EXIT_UNACKNOWLEDGED if missing else 0

        def config_failed(failure: Any) -> None:
            failure.trap(ConfigError)
            print(f"iap-send: error: {failure.value}", file=sys.stderr)
            result["code"] = EXIT_USAGE

        return d.addCallbacks(report, config_failed)

    try:
        react(run, [])
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    return result.get("code", 1)


if __name__ == "__main__":
    sys.exit(main())

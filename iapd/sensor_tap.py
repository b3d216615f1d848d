"""
C{twistd iap-sensor -c sensor.yaml}: take alerts from the configured inputs, keep them
in the spool, deliver them to the manager, emit heartbeats.
"""

from __future__ import annotations

from pathlib import Path

from twisted.application import service
from twisted.python import usage

from .config import ConfigError, load_sensor
from .reload import ReloadOnHangup
from .sdnotify import ReadyNotifier
from .sensor import SensorService
from .services import configuration_error


class Options(usage.Options):
    synopsis = "-c sensor.yaml"
    longdesc = (
        "Run an IAP/0.2 sensor: alerts from the inputs (a drop directory, a local socket, "
        "Suricata's eve.json) are kept in an fsync'd spool until the manager acknowledges them."
    )
    optParameters = [["config", "c", None, "the sensor's YAML configuration file"]]

    def postOptions(self) -> None:
        if self["config"] is None:
            raise SystemExit("twistd iap-sensor: -c sensor.yaml is required (see twistd iap-sensor --help)")
        path = Path(self["config"])
        try:
            self.sensor_config = load_sensor(path)
            if self.sensor_config.spool is None:
                raise ConfigError(f"{path}: spool: is required to run the sensor daemon")
            self.material = self.sensor_config.tls.load(str(path))
        except ConfigError as e:
            configuration_error("iap-sensor", e)


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    top = service.MultiService()
    try:
        sensor = SensorService(options.sensor_config, options.material, reactor)
    except ConfigError as e:
        configuration_error("iap-sensor", e)
    # before the sensor's services: its listeners bind before the reactor runs (ReloadOnHangup)
    ReloadOnHangup(reactor, sensor.reload, "sensor").setServiceParent(top)
    sensor.setServiceParent(top)
    ReadyNotifier(reactor, "sensor").setServiceParent(top)  # last
    return top

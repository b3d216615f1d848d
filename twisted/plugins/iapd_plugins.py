# twistd plugins of iapd: data only, each names the module that builds the service.
# No __init__.py may live next to this file (it would break plugin discovery).
from twisted.application.service import ServiceMaker

iap_manager = ServiceMaker(
    "IAP manager",
    "iapd.manager_tap",
    "IAP/0.2 manager: receives and stores alerts from sensors over TLS",
    "iap-manager",
)

iap_proxy = ServiceMaker(
    "IAP proxy", "iapd.proxy_tap", "IAP/0.2 proxy: relays sensors to managers across perimeters", "iap-proxy"
)

iap_sensor = ServiceMaker(
    "IAP sensor", "iapd.sensor_tap", "IAP/0.2 sensor: spools alerts from its inputs and delivers them", "iap-sensor"
)

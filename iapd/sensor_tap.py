"""C{twistd iap-sensor}: reserved; see L{iapd.reserved_tap}."""

from .reserved_tap import reserved

Options, makeService = reserved("iap-sensor", "use iap-send -c sensor.yaml FILE... to deliver alerts")
